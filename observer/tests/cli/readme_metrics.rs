//! The README's metrics table is the contract users read: it lists exactly the metric families
//! the daemon registers, each with exactly the label names its collector declares. A metric
//! added, renamed or relabelled without the table (or the table edited without the code) fails
//! here.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The rows of the table under `## Metrics`: every backticked `deny_observer_*` name of the
/// first column, with the label names of the second (`source_*` and `destination_*` stand for
/// the namespace and workload labels).
fn readme_table() -> BTreeMap<String, BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&path).expect("read README.md");
    let section = text
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a `## Metrics` section");
    let mut table = BTreeMap::new();
    for row in section
        .lines()
        .filter(|l| l.starts_with("| `deny_observer_"))
    {
        let cells: Vec<&str> = row.split('|').collect();
        let (names, labels) = (cells[1], cells[2]);
        let labels: BTreeSet<String> = backticked(labels)
            .flat_map(|l| match l.strip_suffix("_*") {
                Some(side) => vec![format!("{side}_namespace"), format!("{side}_workload")],
                None => vec![l.to_owned()],
            })
            .collect();
        for name in backticked(names) {
            let previous = table.insert(name.to_owned(), labels.clone());
            assert!(previous.is_none(), "{name} is in the README table twice");
        }
    }
    table
}

fn backticked(cell: &str) -> impl Iterator<Item = &str> {
    cell.split('`').skip(1).step_by(2)
}

#[test]
fn readme_metrics_table_matches_the_registered_metrics_and_labels() {
    let readme = readme_table();
    let code: BTreeMap<String, BTreeSet<String>> = observer::daemon::exported_metric_labels()
        .expect("daemon metrics build")
        .into_iter()
        .map(|(name, labels)| (name, labels.into_iter().collect()))
        .collect();

    let missing: Vec<&String> = code.keys().filter(|n| !readme.contains_key(*n)).collect();
    assert!(
        missing.is_empty(),
        "exported but not in the README's metrics table: {missing:?}"
    );
    let unknown: Vec<&String> = readme.keys().filter(|n| !code.contains_key(*n)).collect();
    assert!(
        unknown.is_empty(),
        "in the README's metrics table but not exported: {unknown:?}"
    );
    for (name, labels) in &code {
        assert_eq!(
            &readme[name], labels,
            "labels of {name}: README (left) and the registered collector (right) differ"
        );
    }
}

#[test]
fn readme_table_parser_expands_label_shorthands() {
    let labels: Vec<&str> = backticked("`direction`, `source_*`, x `port` y").collect();
    assert_eq!(labels, ["direction", "source_*", "port"]);
    // The table is there and names the core families.
    let table = readme_table();
    assert!(table["deny_observer_policy_denies_total"].contains("source_workload"));
    assert!(table["deny_observer_flow_map_capacity"].is_empty());
}
