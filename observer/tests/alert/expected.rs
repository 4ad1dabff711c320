//! Expected denies: `--expected-edge` parsing and matching, and the policy annotation rule.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic with context, like the tests"
)]

use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::alert::edges::DeniedEdge;
use observer::alert::expected::{
    EXPECTED_DENIES_ANNOTATION, ExpectedDenies, ExpectedEdge, policy_marks_expected,
};
use observer::flow::{Direction, Protocol};

fn policy(ns: &str, name: &str, annotation: Option<&str>) -> NetworkPolicy {
    let mut v = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    });
    if let Some(a) = annotation {
        v["metadata"]["annotations"] = serde_json::json!({ EXPECTED_DENIES_ANNOTATION: a });
    }
    serde_json::from_value(v).unwrap()
}

fn edge(
    src_ns: &str,
    src: &str,
    dst_ns: &str,
    dst: &str,
    proto: Protocol,
    port: u16,
) -> DeniedEdge {
    DeniedEdge {
        direction: Direction::Egress,
        source_namespace: src_ns.into(),
        source_workload: src.into(),
        destination_namespace: dst_ns.into(),
        destination_workload: dst.into(),
        protocol: proto,
        port,
        ports_folded: false,
    }
}

#[test]
fn edge_patterns_parse_and_round_trip() {
    for text in [
        "shop/cart->db/postgres",
        "shop/cart->db/postgres:TCP",
        "shop/cart->db/postgres:UDP/53",
        "*/*->monitoring/prometheus:TCP/9090",
        "kube-system/*->*/*",
    ] {
        let e: ExpectedEdge = text.parse().unwrap();
        assert_eq!(e.to_string(), text);
    }
    let e: ExpectedEdge = " shop/cart -> db/postgres : tcp / 5432 ".parse().unwrap();
    assert_eq!(e.to_string(), "shop/cart->db/postgres:TCP/5432");
}

#[test]
fn bad_edge_patterns_say_what_is_wrong() {
    for (text, hint) in [
        ("shop/cart", "SRC_NS/SRC_WORKLOAD->"),
        ("shop->db/postgres", "NAMESPACE/WORKLOAD"),
        ("shop/cart->db", "NAMESPACE/WORKLOAD"),
        ("/cart->db/postgres", "non-empty"),
        ("shop/cart->db/postgres:HTTP/80", "unknown protocol"),
        ("shop/cart->db/postgres:TCP/99999", "99999"),
        ("shop/cart->db/postgres:TCP/x", "\"x\""),
        ("a/b/c->d/e", "non-empty"),
    ] {
        let err = text.parse::<ExpectedEdge>().unwrap_err().to_string();
        assert!(err.contains(&format!("{text:?}")), "{err}");
        assert!(err.contains(hint), "{text}: {err}");
    }
}

#[test]
fn edge_patterns_match_with_wildcards() {
    let tcp = edge("shop", "cart", "db", "postgres", Protocol::Tcp, 5432);
    let udp = edge("shop", "cart", "db", "postgres", Protocol::Udp, 5432);
    let other_port = edge("shop", "cart", "db", "postgres", Protocol::Tcp, 5433);
    let other_src = edge("shop", "web", "db", "postgres", Protocol::Tcp, 5432);
    let cases: [(&str, [bool; 4]); 5] = [
        ("shop/cart->db/postgres", [true, true, true, false]),
        ("shop/cart->db/postgres:TCP", [true, false, true, false]),
        (
            "shop/cart->db/postgres:TCP/5432",
            [true, false, false, false],
        ),
        ("shop/*->db/postgres:TCP/5432", [true, false, false, true]),
        ("*/*->db/redis", [false, false, false, false]),
    ];
    for (pattern, want) in cases {
        let p: ExpectedEdge = pattern.parse().unwrap();
        let got = [&tcp, &udp, &other_port, &other_src].map(|e| p.matches(e));
        assert_eq!(got, want, "{pattern}");
    }
}

#[test]
fn annotation_value_must_be_true() {
    assert!(policy_marks_expected(&policy("a", "p", Some("true"))));
    assert!(policy_marks_expected(&policy("a", "p", Some(" True "))));
    for v in ["false", "yes", "", "1"] {
        assert!(!policy_marks_expected(&policy("a", "p", Some(v))), "{v:?}");
    }
    assert!(!policy_marks_expected(&policy("a", "p", None)));
}

#[test]
fn any_annotated_isolating_policy_makes_the_deny_expected() {
    let mut x = ExpectedDenies::new(vec!["*/*->monitoring/*:TCP/9100".parse().unwrap()]);
    let policies = [
        policy("shop", "default-deny", None),
        policy("shop", "telemetry-sidecar-egress", Some("true")),
        policy("other", "telemetry-sidecar-egress", None),
    ];
    x.set_policies(&policies);
    assert_eq!(x.annotated_policies(), 1);
    let e = edge("shop", "cart", "vendor", "collector", Protocol::Tcp, 4317);

    // The denying set includes the annotated policy: expected.
    assert!(x.is_expected(
        &e,
        [
            ("shop", "default-deny"),
            ("shop", "telemetry-sidecar-egress")
        ]
    ));
    // Only unannotated policies denied: it pages.
    assert!(!x.is_expected(&e, [("shop", "default-deny")]));
    // Same name in another namespace is another policy.
    assert!(!x.is_expected(&e, [("other", "telemetry-sidecar-egress")]));
    // A configured edge is expected whatever the policies.
    let scrape = edge(
        "shop",
        "cart",
        "monitoring",
        "node-exporter",
        Protocol::Tcp,
        9100,
    );
    assert!(x.is_expected(&scrape, [("shop", "default-deny")]));
    assert!(x.is_expected(&scrape, std::iter::empty()));

    // Policies are re-read on inventory change: removing the annotation ends it.
    x.set_policies(&[
        policy("shop", "default-deny", None),
        policy("shop", "telemetry-sidecar-egress", Some("false")),
    ]);
    assert!(!x.is_expected(
        &e,
        [
            ("shop", "default-deny"),
            ("shop", "telemetry-sidecar-egress")
        ]
    ));
}
