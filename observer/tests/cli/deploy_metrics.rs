//! No dangling series names: every `deny_observer_*` metric that the shipped Prometheus rules
//! (deploy/prometheus/rules.yaml, the PrometheusRule holds the same groups) and the Grafana
//! dashboard (deploy/grafana/deny-observer.json) read is one the daemon exports; and every
//! alert's runbook (and the runbook index) states the severity the rule gives it.
//!
//! The extractor is this file's own (observer cannot depend on xtask); xtask's
//! `deploycheck::referenced_metric_names` applies the same rules.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Names read by the rules or the dashboard whose stage is not merged into this branch yet, with
/// the stage that owns them. The test below fails as soon as one of them is exported, so each
/// entry is removed (and the stage's names joined into [`daemon_metric_names`]) when its stage
/// lands; it also fails if an entry is no longer referenced.
/// Names referenced by rules or panels that no stage exports yet, with the stage that will.
/// Empty now: every stage has landed. Kept so a future stage can land its panels first.
const PENDING: &[(&str, &str)] = &[];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every metric family the daemon registers. Later stages register theirs into the same
/// [`Metrics`] through `Metrics::register`; add their registration here when they land.
fn daemon_metric_names() -> BTreeSet<String> {
    observer::daemon::exported_metric_names()
        .expect("daemon metrics build")
        .into_iter()
        .collect()
}

/// `deny_observer_*` names in one PromQL expression or template; recording-rule outputs
/// (`level:metric:ops`) are skipped, histogram suffixes stripped.
fn names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("deny_observer_") && !t.contains(':'))
        .map(|t| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| t.strip_suffix(s))
                .unwrap_or(t)
                .to_owned()
        })
        .collect()
}

/// Expressions and annotation templates (which run queries) of every rule.
fn rule_texts(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse rules");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.extend(rule["expr"].as_str().map(str::to_owned));
            if let Some(annotations) = rule["annotations"].as_mapping() {
                out.extend(
                    annotations
                        .values()
                        .filter_map(|v| v.as_str().map(str::to_owned)),
                );
            }
        }
    }
    out
}

/// Panel target expressions and variable queries of a dashboard.
fn dashboard_texts(path: &Path) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    match (key.as_str(), inner) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(inner, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(path).expect("read dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("parse dashboard");
    let mut out = Vec::new();
    walk(&dashboard, &mut out);
    out
}

fn referenced() -> BTreeSet<String> {
    let root = repo_root();
    let mut texts = rule_texts(&root.join("deploy/prometheus/rules.yaml"));
    texts.extend(dashboard_texts(
        &root.join("deploy/grafana/deny-observer.json"),
    ));
    texts.iter().flat_map(|t| names_in(t)).collect()
}

#[test]
fn every_metric_in_rules_and_dashboard_is_exported() {
    let exported = daemon_metric_names();
    let pending: BTreeSet<String> = PENDING.iter().map(|(n, _)| (*n).to_owned()).collect();
    let referenced = referenced();

    let dangling: Vec<&String> = referenced
        .iter()
        .filter(|n| !exported.contains(*n) && !pending.contains(*n))
        .collect();
    assert!(
        dangling.is_empty(),
        "rules/dashboard read metrics the daemon does not export: {dangling:?}\nexported: {exported:?}"
    );

    let landed: Vec<&String> = pending.intersection(&exported).collect();
    assert!(
        landed.is_empty(),
        "now exported, remove from PENDING: {landed:?}"
    );
    let stale: Vec<&String> = pending.difference(&referenced).collect();
    assert!(
        stale.is_empty(),
        "PENDING names no rule or panel reads: {stale:?}"
    );
}

#[test]
fn rules_and_dashboard_cover_the_exported_metrics_that_matter() {
    // The other direction, for the metrics an SRE acts on: each has a panel or a rule.
    let referenced = referenced();
    for name in [
        "deny_observer_drops_total",
        "deny_observer_policy_denies_total",
        "deny_observer_kernel_drops_total",
        "deny_observer_events_lost_total",
        "deny_observer_flow_map_entries",
        "deny_observer_flow_map_capacity",
        "deny_observer_inventory_reloads_total",
        "deny_observer_inventory_watch_errors_total",
        "deny_observer_series_overflow_total",
        "deny_observer_build_info",
    ] {
        assert!(
            referenced.contains(name),
            "{name} is exported but no rule or dashboard panel reads it"
        );
    }
}

#[test]
fn extractor_skips_recording_rules_and_labels() {
    let names = names_in(
        r#"workload:deny_observer_deny_rate:sum > 4 * deny_observer_x_bucket{direction="deny_observer_not_a_label_name"} and deny-observer.io/y"#,
    );
    // The quoted label value is a token too; the rules never quote metric-like values, and a
    // false positive here only makes the test stricter.
    assert_eq!(
        names,
        BTreeSet::from([
            "deny_observer_x".to_owned(),
            "deny_observer_not_a_label_name".to_owned()
        ])
    );
}

#[test]
fn every_alert_has_a_runbook_stating_its_severity_and_listed_in_the_index() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("deploy/prometheus/rules.yaml")).expect("rules");
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse rules");
    let index =
        std::fs::read_to_string(root.join("docs/runbooks/README.md")).expect("runbook index");
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let severity = rule["labels"]["severity"].as_str().expect("severity");
            let page = format!("docs/runbooks/{alert}.md");
            let runbook = std::fs::read_to_string(root.join(&page))
                .unwrap_or_else(|e| panic!("{alert}: {page}: {e}"));
            let stated = runbook
                .lines()
                .find_map(|l| l.strip_prefix("**Severity:**"))
                .unwrap_or_else(|| panic!("{page} has no **Severity:** line"));
            assert!(
                stated.contains(severity),
                "{page} states severity {stated:?}, the rule says {severity}"
            );
            let row = index
                .lines()
                .find(|l| l.starts_with(&format!("| {alert} |")))
                .unwrap_or_else(|| panic!("docs/runbooks/README.md does not list {alert}"));
            assert!(
                row.contains(severity),
                "docs/runbooks/README.md lists {alert} as {row:?}, the rule says {severity}"
            );
        }
    }
    assert!(alerts >= 9, "only {alerts} alerts in the rules");
}
