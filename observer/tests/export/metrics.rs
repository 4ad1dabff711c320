//! Export stage: metric contract, series bounding and overflow, expiry with grace, and a text
//! output that the real `promtool` accepts.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use observer::export::{
    DropLabels, Metrics, MetricsConfig, OVERFLOW, PolicyDenyLabels, PolicyMatch, policy_label,
};
use observer::flow::{Direction, Protocol};

fn metrics(limit: usize, grace: Duration) -> Metrics {
    Metrics::new(MetricsConfig {
        series_limit: limit,
        expiry_grace: grace,
    })
    .expect("metrics build")
}

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Minimal parser of the text format for our own output (label values have no escapes here).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = value.parse().expect("numeric value");
        let (name, labels) = match head.split_once('{') {
            None => (head.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("closing brace");
                let labels = rest
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn samples(m: &Metrics, name: &str) -> Vec<Sample> {
    parse(&m.encode_text().expect("encode"))
        .into_iter()
        .filter(|s| s.name == name)
        .collect()
}

fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(m, name)
        .into_iter()
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn drop_labels<'a>(
    reason: &'a str,
    src: (&'a str, &'a str),
    dst: (&'a str, &'a str),
) -> DropLabels<'a> {
    DropLabels {
        reason,
        direction: Direction::Ingress,
        source_namespace: src.0,
        source_workload: src.1,
        destination_namespace: dst.0,
        destination_workload: dst.1,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn every_contract_metric_is_listed_even_without_samples() {
    let m = metrics(100, Duration::from_secs(60));
    let names = m.metric_names();
    for name in [
        "deny_observer_drops_total",
        "deny_observer_drop_bytes_total",
        "deny_observer_policy_denies_total",
        "deny_observer_kernel_drops_total",
        "deny_observer_kernel_drop_bytes_total",
        "deny_observer_events_lost_total",
        "deny_observer_flow_map_entries",
        "deny_observer_flow_map_capacity",
        "deny_observer_inventory_objects",
        "deny_observer_inventory_reloads_total",
        "deny_observer_inventory_watch_errors_total",
        "deny_observer_build_info",
        "deny_observer_series_overflow_total",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    // Nothing recorded yet: the drop families have no samples, so the names come from the
    // descriptors, not from the output.
    assert!(samples(&m, "deny_observer_drops_total").is_empty());
}

#[test]
fn other_stages_register_into_the_same_registry() {
    let m = metrics(100, Duration::from_secs(60));
    let c = prometheus::IntCounterVec::new(
        prometheus::Opts::new("deny_observer_test_alerts_total", "test"),
        &["kind"],
    )
    .expect("valid");
    m.register(Box::new(c.clone())).expect("register");
    assert!(
        m.metric_names()
            .contains(&"deny_observer_test_alerts_total".to_owned())
    );
    c.with_label_values(&["x"]).inc();
    assert_eq!(
        value(&m, "deny_observer_test_alerts_total", &[("kind", "x")]),
        Some(1.0)
    );
    // Registering the same name twice is an error naming the metric.
    let dup = prometheus::IntCounter::new("deny_observer_test_alerts_total", "dup").expect("ok");
    let err = m.register(Box::new(dup)).expect_err("duplicate");
    assert!(
        err.to_string().contains("deny_observer_test_alerts_total"),
        "{err}"
    );
}

#[test]
fn label_names_are_exactly_the_contract() {
    let m = metrics(100, Duration::from_secs(60));
    m.record_drop(&drop_labels("no_socket", ("a", "web"), ("b", "db")), 3, 180);
    m.record_policy_deny(
        &PolicyDenyLabels {
            direction: Direction::Egress,
            source_namespace: "a",
            source_workload: "web",
            destination_namespace: "b",
            destination_workload: "db",
            protocol: Protocol::Udp,
            policy: "a/deny-all",
            policy_match: PolicyMatch::DefaultDeny,
        },
        2,
    );
    m.record_kernel_drops("netfilter_drop", 5, 300);
    m.record_loss("ringbuf_full", 1);
    m.set_flow_map(10, 65536);
    m.set_inventory_objects("pods", 7);
    m.record_reload(true);
    m.record_watch_error("pods");
    m.set_build_info("0.1.0", "6.18.0", "node-1");

    let keys = |name: &str| -> Vec<Vec<String>> {
        samples(&m, name)
            .into_iter()
            .map(|s| s.labels.into_keys().collect())
            .collect()
    };
    let sorted = |l: &[&str]| {
        let mut v: Vec<String> = l.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let drop_keys = sorted(&[
        "reason",
        "direction",
        "source_namespace",
        "source_workload",
        "destination_namespace",
        "destination_workload",
        "protocol",
    ]);
    assert_eq!(keys("deny_observer_drops_total"), vec![drop_keys.clone()]);
    assert_eq!(keys("deny_observer_drop_bytes_total"), vec![drop_keys]);
    assert_eq!(
        keys("deny_observer_policy_denies_total"),
        vec![sorted(&[
            "direction",
            "source_namespace",
            "source_workload",
            "destination_namespace",
            "destination_workload",
            "protocol",
            "policy",
            "match",
        ])]
    );
    assert_eq!(
        keys("deny_observer_kernel_drops_total"),
        vec![sorted(&["reason"])]
    );
    assert_eq!(
        keys("deny_observer_kernel_drop_bytes_total"),
        vec![sorted(&["reason"])]
    );
    assert_eq!(
        keys("deny_observer_inventory_objects"),
        vec![sorted(&["kind"])]
    );
    assert_eq!(
        keys("deny_observer_inventory_watch_errors_total"),
        vec![sorted(&["resource"])]
    );
    assert_eq!(
        keys("deny_observer_build_info"),
        vec![sorted(&["version", "kernel_release", "node"])]
    );

    let drop = [
        ("reason", "no_socket"),
        ("direction", "ingress"),
        ("source_namespace", "a"),
        ("source_workload", "web"),
        ("destination_namespace", "b"),
        ("destination_workload", "db"),
        ("protocol", "tcp"),
    ];
    assert_eq!(value(&m, "deny_observer_drops_total", &drop), Some(3.0));
    assert_eq!(
        value(&m, "deny_observer_drop_bytes_total", &drop),
        Some(180.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_policy_denies_total",
            &[
                ("match", "default_deny"),
                ("direction", "egress"),
                ("protocol", "udp")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_kernel_drops_total",
            &[("reason", "netfilter_drop")]
        ),
        Some(5.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_kernel_drop_bytes_total",
            &[("reason", "netfilter_drop")]
        ),
        Some(300.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_events_lost_total",
            &[("stage", "ringbuf_full")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&m, "deny_observer_flow_map_entries", &[]), Some(10.0));
    assert_eq!(
        value(&m, "deny_observer_flow_map_capacity", &[]),
        Some(65536.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_inventory_reloads_total",
            &[("result", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_inventory_reloads_total",
            &[("result", "error")]
        ),
        Some(0.0)
    );
}

#[test]
fn build_info_keeps_only_the_latest_labels() {
    let m = metrics(100, Duration::from_secs(60));
    m.set_build_info("0.1.0", "6.1.0", "");
    m.set_build_info("0.1.0", "6.18.0", "node-a");
    let s = samples(&m, "deny_observer_build_info");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].value, 1.0);
    assert_eq!(s[0].labels["kernel_release"], "6.18.0");
    assert_eq!(s[0].labels["node"], "node-a");
}

#[test]
fn series_limit_folds_new_label_sets_into_overflow_without_losing_counts() {
    let limit = 3;
    let m = metrics(limit, Duration::from_secs(60));
    let reasons = ["netfilter_drop", "no_socket"];
    let mut total = 0u64;
    for i in 0..10u64 {
        let ws = format!("w{i}");
        let reason = reasons[(i % 2) as usize];
        m.record_drop(
            &drop_labels(reason, ("src", &ws), ("dst", "db")),
            i + 1,
            100,
        );
        total += i + 1;
    }
    // Recording into an admitted series again is not an overflow.
    m.record_drop(
        &drop_labels("netfilter_drop", ("src", "w0"), ("dst", "db")),
        1,
        100,
    );
    total += 1;

    let counts = m.series_counts();
    assert_eq!(counts.drops, limit);
    assert_eq!(counts.drops_overflow, 2, "one overflow series per reason");

    let drops = samples(&m, "deny_observer_drops_total");
    assert_eq!(drops.len(), limit + 2, "{drops:?}");
    let sum: f64 = drops.iter().map(|s| s.value).sum();
    assert_eq!(sum, total as f64, "overflow must not lose counts");
    let overflow: Vec<&Sample> = drops
        .iter()
        .filter(|s| s.labels["source_workload"] == OVERFLOW)
        .collect();
    assert_eq!(overflow.len(), 2);
    for s in &overflow {
        for l in [
            "source_namespace",
            "source_workload",
            "destination_namespace",
            "destination_workload",
        ] {
            assert_eq!(s.labels[l], OVERFLOW, "{l} in {s:?}");
        }
        assert_eq!(s.labels["protocol"], "tcp");
        assert_eq!(s.labels["direction"], "ingress");
    }
    // Flows 3..9 overflowed: odd i → no_socket (3,5,7,9), even → netfilter_drop (4,6,8).
    let ov = |reason: &str| {
        overflow
            .iter()
            .find(|s| s.labels["reason"] == reason)
            .map(|s| s.value)
    };
    assert_eq!(ov("no_socket"), Some((4 + 6 + 8 + 10) as f64));
    assert_eq!(ov("netfilter_drop"), Some((5 + 7 + 9) as f64));
    // Overflow is counted in packets (7 records of 4 to 10 packets), not in records.
    let packets = (4 + 6 + 8 + 10 + 5 + 7 + 9) as f64;
    assert_eq!(
        value(
            &m,
            "deny_observer_series_overflow_total",
            &[("metric", "deny_observer_drops_total")]
        ),
        Some(packets)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_events_lost_total",
            &[("stage", "series_overflow")]
        ),
        Some(packets)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_series",
            &[("metric", "deny_observer_drops_total")]
        ),
        Some(limit as f64)
    );
}

#[test]
fn policy_denies_overflow_folds_policy_too_and_has_its_own_limit() {
    let m = metrics(2, Duration::from_secs(60));
    for i in 0..5 {
        let ws = format!("w{i}");
        let policy = format!("ns/p{i}");
        m.record_policy_deny(
            &PolicyDenyLabels {
                direction: Direction::Ingress,
                source_namespace: "a",
                source_workload: &ws,
                destination_namespace: "b",
                destination_workload: "db",
                protocol: Protocol::Tcp,
                policy: &policy,
                policy_match: PolicyMatch::Unexplained,
            },
            i + 1,
        );
    }
    // The drop family is untouched by policy denies' limit.
    m.record_drop(&drop_labels("no_socket", ("a", "x"), ("b", "y")), 1, 1);
    let c = m.series_counts();
    assert_eq!(
        (c.policy_denies, c.policy_denies_overflow, c.drops),
        (2, 1, 1)
    );
    let ov = value(
        &m,
        "deny_observer_policy_denies_total",
        &[
            ("policy", OVERFLOW),
            ("source_workload", OVERFLOW),
            ("match", "unexplained"),
        ],
    );
    // w2..w4 overflowed, with 3 + 4 + 5 packets.
    assert_eq!(ov, Some(12.0));
    assert_eq!(
        value(
            &m,
            "deny_observer_series_overflow_total",
            &[("metric", "deny_observer_policy_denies_total")]
        ),
        Some(12.0)
    );
    // Only the drops family's overflow loses attribution: a packet folded in policy denies
    // still has its drops_total series.
    assert_eq!(
        value(
            &m,
            "deny_observer_events_lost_total",
            &[("stage", "series_overflow")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_series_overflow_total",
            &[("metric", "deny_observer_drops_total")]
        ),
        Some(0.0)
    );
}

#[test]
fn series_stay_at_the_limit_under_a_port_scan() {
    let limit = 500;
    let m = metrics(limit, Duration::from_secs(60));
    for i in 0..50_000u32 {
        let src = format!("scanner-{i}");
        m.record_drop(
            &drop_labels("netfilter_drop", ("scan", &src), ("prod", "db")),
            1,
            60,
        );
    }
    let c = m.series_counts();
    assert_eq!((c.drops, c.drops_overflow), (limit, 1));
    let drops = samples(&m, "deny_observer_drops_total");
    assert_eq!(drops.len(), limit + 1);
    assert_eq!(drops.iter().map(|s| s.value).sum::<f64>(), 50_000.0);
}

#[test]
fn gone_workloads_expire_after_the_grace_period_only() {
    let grace = Duration::from_secs(60);
    let m = metrics(2, grace);
    m.record_drop(
        &drop_labels("no_socket", ("prod", "web"), ("prod", "db")),
        1,
        1,
    );
    m.record_drop(
        &drop_labels("no_socket", ("dev", "client"), ("", "world")),
        1,
        1,
    );
    // Limit reached: this one overflows.
    m.record_drop(
        &drop_labels("no_socket", ("dev", "late"), ("prod", "db")),
        1,
        1,
    );
    assert_eq!(m.series_counts().drops, 2);

    // prod/db is gone; nothing else is live either, but world/"" are non-pod values and
    // overflow series never expire.
    let only_client = |ns: &str, wl: &str| ns == "dev" && wl == "client";
    let t0 = Instant::now();
    assert_eq!(m.retain_workloads_at(t0, &only_client), 0);
    assert_eq!(m.retain_workloads_at(t0 + grace / 2, &only_client), 0);
    assert!(
        value(
            &m,
            "deny_observer_drops_total",
            &[("destination_workload", "db"), ("source_workload", "web")]
        )
        .is_some()
    );

    assert_eq!(m.retain_workloads_at(t0 + grace, &only_client), 1);
    let drops = samples(&m, "deny_observer_drop_bytes_total");
    assert!(
        drops.iter().all(|s| s.labels["source_workload"] != "web"),
        "expired series still exported: {drops:?}"
    );
    assert!(
        drops
            .iter()
            .any(|s| s.labels["destination_workload"] == "world")
    );
    assert!(
        drops
            .iter()
            .any(|s| s.labels["source_workload"] == OVERFLOW)
    );
    assert_eq!(m.series_counts().drops, 1);
    assert_eq!(
        value(
            &m,
            "deny_observer_series",
            &[("metric", "deny_observer_drops_total")]
        ),
        Some(1.0)
    );

    // Room again below the limit: a new label set gets its own series.
    m.record_drop(
        &drop_labels("no_socket", ("dev", "new"), ("dev", "client")),
        1,
        1,
    );
    assert_eq!(m.series_counts().drops, 2);
}

#[test]
fn a_workload_that_comes_back_within_the_grace_does_not_flap() {
    let grace = Duration::from_secs(60);
    let m = metrics(10, grace);
    m.record_drop(
        &drop_labels("no_socket", ("prod", "web"), ("prod", "db")),
        5,
        1,
    );
    let t0 = Instant::now();
    let none = |_: &str, _: &str| false;
    let all = |_: &str, _: &str| true;
    assert_eq!(m.retain_workloads_at(t0, &none), 0);
    // Back (e.g. a reload that briefly missed it): the gone mark is cleared.
    assert_eq!(m.retain_workloads_at(t0 + Duration::from_secs(30), &all), 0);
    // Gone again: the grace restarts from here, not from t0.
    let t1 = t0 + Duration::from_secs(70);
    assert_eq!(m.retain_workloads_at(t1, &none), 0);
    assert_eq!(
        value(
            &m,
            "deny_observer_drops_total",
            &[("source_workload", "web")]
        ),
        Some(5.0),
        "counter must survive the flap"
    );
    assert_eq!(
        m.retain_workloads_at(t1 + Duration::from_secs(59), &none),
        0
    );
    assert_eq!(m.retain_workloads_at(t1 + grace, &none), 1);
}

#[test]
fn policy_deny_series_expire_too() {
    let m = metrics(10, Duration::ZERO);
    m.record_policy_deny(
        &PolicyDenyLabels {
            direction: Direction::Ingress,
            source_namespace: "a",
            source_workload: "web",
            destination_namespace: "b",
            destination_workload: "db",
            protocol: Protocol::Tcp,
            policy: "b/deny",
            policy_match: PolicyMatch::DefaultDeny,
        },
        1,
    );
    let live = |ns: &str, wl: &str| (ns, wl) != ("a", "web");
    assert_eq!(m.retain_workloads(&live), 1);
    assert!(samples(&m, "deny_observer_policy_denies_total").is_empty());
}

#[test]
fn policy_label_is_sorted_deduplicated_and_bounded() {
    assert_eq!(policy_label(&["b/x", "a/y", "b/x"]), "a/y,b/x");
    assert_eq!(policy_label::<&str>(&[]), "");
    let many: Vec<String> = (0..8).map(|i| format!("ns/p{i}")).collect();
    assert_eq!(policy_label(&many), "ns/p0,ns/p1,ns/p2,ns/p3,ns/p4,+3 more");
}

#[test]
fn text_output_passes_promtool() {
    let m = metrics(2, Duration::from_secs(60));
    for i in 0..5 {
        let ws = format!("w{i}");
        m.record_drop(
            &drop_labels("netfilter_drop", ("a", &ws), ("b", "db")),
            1,
            64,
        );
    }
    m.record_kernel_drops("no_socket", 1, 60);
    m.record_loss("ringbuf_full", 0);
    m.set_flow_map(1, 1024);
    m.set_inventory_objects("pods", 3);
    m.record_watch_error("networkpolicies");
    m.set_build_info("0.1.0", "6.18.0", "node-1");
    let text = m.encode_text().expect("encode");

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (cargo xtask setup installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool prints lint findings (naming conventions) on stdout even when the syntax is fine.
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool lint findings:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pod(namespace: &str, name: &str, workload: &str) -> std::sync::Arc<observer::inventory::Pod> {
    std::sync::Arc::new(observer::inventory::Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: Default::default(),
        ips: Vec::new(),
        host_network: false,
        node_name: None,
        phase: Default::default(),
        uid: None,
        created_unix: 0,
        ports: Vec::new(),
        workload: observer::inventory::Workload {
            kind: "Deployment".into(),
            name: workload.into(),
        },
    })
}

#[test]
fn metrics_sink_sums_outcomes_of_one_label_set_into_one_series() {
    use observer::attribute::{DropSeries, Outcomes, PolicyDeny, Sink as _};
    use observer::export::MetricsSink;
    use observer::inventory::Endpoint;
    use std::sync::Arc;
    use std::time::SystemTime;

    let netfilter: Arc<str> = Arc::from("netfilter_drop");
    let no_socket: Arc<str> = Arc::from("no_socket");
    let (a1, a2) = (pod("a", "web-1", "web"), pod("a", "web-2", "web"));
    let b = pod("b", "db-1", "db");
    let (web1, web2, db) = (Endpoint::Pod(a1), Endpoint::Pod(a2), Endpoint::Pod(b));
    let m = Arc::new(metrics(100, Duration::from_secs(60)));
    let mut sink = MetricsSink::new(Arc::clone(&m));
    let deny_all: Arc<str> = Arc::from("b/deny-all");
    let drop = |reason: &Arc<str>, src: &Endpoint, packets: u64| DropSeries {
        reason: Arc::clone(reason),
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        src: Some(src.clone()),
        dst: Some(db.clone()),
        packets,
        bytes: packets * 60,
    };
    let deny = |src: &Endpoint, packets: u64| PolicyDeny {
        direction: Direction::Ingress,
        protocol: Protocol::Tcp,
        src: Some(src.clone()),
        dst: Some(db.clone()),
        policy: Arc::clone(&deny_all),
        policy_match: PolicyMatch::DefaultDeny,
        packets,
    };
    // Two pods of one workload are two outcomes and one series.
    let mut out = Outcomes {
        drops: vec![
            drop(&netfilter, &web1, 11),
            drop(&netfilter, &web2, 1100),
            drop(&no_socket, &web1, 7),
            // The world peer and an unknown address keep their own label values.
            DropSeries {
                reason: Arc::clone(&no_socket),
                direction: Direction::Unknown,
                protocol: Protocol::Udp,
                src: Some(Endpoint::World),
                dst: None,
                packets: 3,
                bytes: 30,
            },
        ],
        denies: vec![deny(&web1, 18), deny(&web2, 1100)],
        ..Outcomes::default()
    };
    sink.record(&out, SystemTime::now());
    let web_db = [
        ("source_namespace", "a"),
        ("source_workload", "web"),
        ("destination_namespace", "b"),
        ("destination_workload", "db"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = web_db.to_vec();
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(
        value(
            &m,
            "deny_observer_drops_total",
            &with(&[("reason", "netfilter_drop")])
        ),
        Some(1111.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_drop_bytes_total",
            &with(&[("reason", "netfilter_drop")])
        ),
        Some(1111.0 * 60.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_drops_total",
            &with(&[("reason", "no_socket")])
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_policy_denies_total",
            &with(&[("policy", "b/deny-all")])
        ),
        Some(1118.0)
    );
    assert_eq!(
        value(
            &m,
            "deny_observer_drops_total",
            &[
                ("source_workload", "world"),
                ("destination_workload", "unknown"),
                ("protocol", "udp")
            ]
        ),
        Some(3.0)
    );
    // A second drain adds to the same series.
    out.drops = vec![drop(&netfilter, &web2, 5)];
    out.denies.clear();
    sink.record(&out, SystemTime::now());
    assert_eq!(
        value(
            &m,
            "deny_observer_drops_total",
            &with(&[("reason", "netfilter_drop")])
        ),
        Some(1116.0)
    );
}
