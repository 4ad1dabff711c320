//! Invalid objects end to end: a manifest directory with the cases of issue 11 (and what the
//! verdict engine used to only log) loads without them, names each with file, object and
//! field, and `deny_observer_inventory_invalid_objects{kind}` counts them.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "integration tests panic with context"
)]

use std::fs;
use std::time::Duration;

use observer::export::{Metrics, MetricsConfig};
use observer::inventory::manifest;

/// `name` → a NetworkPolicy spec in flow YAML, and the field its error must name.
const BAD_POLICIES: &[(&str, &str, &str)] = &[
    (
        "label-key",
        "{podSelector: {matchLabels: {\"a/b/c\": x}}}",
        "spec.podSelector.matchLabels",
    ),
    (
        "policy-type",
        "{podSelector: {}, policyTypes: [Ingres]}",
        "spec.policyTypes[0]",
    ),
    (
        "except-outside",
        "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}",
        "spec.egress[0].to[0].ipBlock.except[0]",
    ),
    (
        "endport-named",
        "{podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
        "spec.ingress[0].ports[0].endPort",
    ),
    (
        "exists-values",
        "{podSelector: {matchExpressions: [{key: app, operator: Exists, values: [web]}]}}",
        "spec.podSelector.matchExpressions[0].values",
    ),
    (
        "bad-cidr",
        "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
        "spec.ingress[0].from[0].ipBlock.cidr",
    ),
    (
        "empty-peer",
        "{podSelector: {}, ingress: [{from: [{}]}]}",
        "spec.ingress[0].from[0]",
    ),
    (
        "icmp",
        "{podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}",
        "spec.ingress[0].ports[0].protocol",
    ),
    (
        "port-range",
        "{podSelector: {}, ingress: [{ports: [{port: 80, endPort: 79}]}]}",
        "spec.ingress[0].ports[0].endPort",
    ),
    (
        "in-no-values",
        "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
        "spec.podSelector.matchExpressions[0].values",
    ),
    (
        "operator",
        "{podSelector: {matchExpressions: [{key: a, operator: Like, values: [x]}]}}",
        "spec.podSelector.matchExpressions[0].operator",
    ),
];

fn gauge(m: &Metrics, kind: &str) -> Option<f64> {
    let text = m.encode_text().expect("encode");
    let prefix = format!("deny_observer_inventory_invalid_objects{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("number"))
}

#[test]
fn invalid_policies_are_left_out_named_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: good, namespace: prod}\nspec: {podSelector: {}}\n",
    );
    for (name, spec, _) in BAD_POLICIES {
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: prod}}\nspec: {spec}\n"
        ));
    }
    let file = dir.path().join("policies.yaml");
    fs::write(&file, text).unwrap();

    let inv = manifest::load_dir(dir.path()).expect("the valid rest loads");
    let names: Vec<_> = inv
        .policies
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(inv.invalid.len(), BAD_POLICIES.len());
    for (i, (name, _, field)) in BAD_POLICIES.iter().enumerate() {
        let o = inv
            .invalid
            .iter()
            .find(|o| o.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} not reported: {:#?}", inv.invalid));
        assert_eq!(o.kind, "NetworkPolicy");
        assert_eq!(o.namespace.as_deref(), Some("prod"));
        assert_eq!(
            o.source.as_deref(),
            Some(format!("{}: document {}", file.display(), i + 2).as_str())
        );
        assert!(
            o.errors
                .iter()
                .any(|e| e.starts_with(&format!("{field}: "))),
            "{name}: {:?}",
            o.errors
        );
    }

    let m = Metrics::new(MetricsConfig {
        series_limit: 100,
        expiry_grace: Duration::from_secs(60),
    })
    .expect("metrics");
    // Exported at zero before any inventory, so an alert has a series from the start.
    for kind in ["namespaces", "pods", "networkpolicies"] {
        assert_eq!(gauge(&m, kind), Some(0.0), "{kind}");
    }
    m.set_inventory_invalid_objects(&inv.invalid_counts());
    assert_eq!(
        gauge(&m, "networkpolicies"),
        Some(BAD_POLICIES.len() as f64)
    );
    assert_eq!(gauge(&m, "pods"), Some(0.0));

    // Fixed: back to zero.
    fs::write(
        &file,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: good, namespace: prod}\nspec: {podSelector: {}}\n",
    )
    .unwrap();
    let inv = manifest::load_dir(dir.path()).unwrap();
    assert!(inv.invalid.is_empty());
    m.set_inventory_invalid_objects(&inv.invalid_counts());
    assert_eq!(gauge(&m, "networkpolicies"), Some(0.0));
}
