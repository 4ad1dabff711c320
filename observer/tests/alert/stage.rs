//! The alert stage as the daemon drives it: denies in, transitions and Prometheus series out.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::alert::{
    AlertConfig, AlertStage, DeniedEdge, EXPECTED_DENIES_ANNOTATION, EdgeConfig, SpikeConfig,
    metric_names,
};
use observer::flow::{Direction, Protocol};
use prometheus::Registry;

fn at(sec: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + sec)
}

/// The short settings an end-to-end test would use.
fn short(state_dir: Option<&std::path::Path>) -> AlertConfig {
    AlertConfig {
        spike: SpikeConfig {
            for_duration: Duration::from_secs(5),
            cool_down: Duration::from_secs(10),
            warm_up: Duration::from_secs(30),
            half_life: Duration::from_secs(60),
            rate_window: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(600),
            ..SpikeConfig::default()
        },
        edges: EdgeConfig {
            state_dir: state_dir.map(|p| p.to_path_buf()),
            ..EdgeConfig::default()
        },
        expected_edges: vec!["*/*->monitoring/*".parse().unwrap()],
    }
}

fn ingress(src: &str, dst_ns: &str, dst: &str, port: u16) -> DeniedEdge {
    DeniedEdge {
        direction: Direction::Ingress,
        source_namespace: "shop".into(),
        source_workload: src.into(),
        destination_namespace: dst_ns.into(),
        destination_workload: dst.into(),
        protocol: Protocol::Tcp,
        port,
        ports_folded: false,
    }
}

fn annotated(ns: &str, name: &str) -> NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": ns, "name": name,
                     "annotations": {EXPECTED_DENIES_ANNOTATION: "true"}},
        "spec": {"podSelector": {}}
    }))
    .unwrap()
}

/// Every sample of `name`, as (labels, value).
fn samples(reg: &Registry, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for fam in reg.gather() {
        if fam.name() != name {
            continue;
        }
        for m in fam.get_metric() {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            let v = if name.ends_with("_total") {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            };
            out.push((labels, v));
        }
    }
    out
}

fn value(reg: &Registry, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples(reg, name)
        .into_iter()
        .find(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
}

const NO_POLICIES: [(&str, &str); 0] = [];

#[test]
fn a_flood_pages_once_with_labels_and_expected_denies_do_not() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(short(None), &reg, at(0)).unwrap();
    stage.set_policies(&[annotated("db", "scanner-noise")]);

    let cart = ingress("cart", "db", "postgres", 5432);
    let scanner = ingress("scanner", "db", "postgres", 22);
    let mut transitions = Vec::new();
    for s in 0..200 {
        let flood = s >= 120;
        let n = if flood { 400 } else { 3 };
        let out = stage.record_deny(at(s), &cart, n, [("db", "default-deny")]);
        assert!(!out.expected);
        assert_eq!(out.new_edge, s == 0);
        let out = stage.record_deny(
            at(s),
            &scanner,
            n,
            [("db", "default-deny"), ("db", "scanner-noise")],
        );
        assert!(out.expected);
        transitions.extend(stage.tick(at(s)));
    }
    assert_eq!(transitions.len(), 1, "{transitions:?}");
    let t = &transitions[0];
    assert!(t.started);
    assert_eq!(&*t.key.workload_namespace, "db");
    assert_eq!(&*t.key.workload, "postgres");
    assert_eq!(t.key.direction, Direction::Ingress);
    assert!(!t.key.expected);

    let base = [
        ("direction", "ingress"),
        ("workload_namespace", "db"),
        ("workload", "postgres"),
    ];
    let with = |expected: &'static str| {
        let mut l = base.to_vec();
        l.push(("expected", expected));
        l
    };
    for exp in ["false", "true"] {
        assert_eq!(
            value(&reg, "deny_observer_deny_spike_active", &with(exp)),
            Some(1.0),
            "expected={exp}: still exported"
        );
        let rate = value(&reg, "deny_observer_deny_rate", &with(exp)).unwrap();
        assert!((rate - 400.0).abs() < 1e-9, "rate {rate}");
        let baseline = value(&reg, "deny_observer_deny_rate_baseline", &with(exp)).unwrap();
        // 3/s before; the 80 s flood moved it only a little (damped while spiking).
        assert!((2.5..8.0).contains(&baseline), "baseline {baseline}");
    }
    // No bare `namespace` label, which scrapers rename.
    for (labels, _) in samples(&reg, "deny_observer_deny_spike_active") {
        assert!(!labels.contains_key("namespace"), "{labels:?}");
    }

    let edge_labels = |src: &'static str, port: &'static str, expected: &'static str| {
        vec![
            ("direction", "ingress"),
            ("source_namespace", "shop"),
            ("source_workload", src),
            ("destination_namespace", "db"),
            ("destination_workload", "postgres"),
            ("protocol", "tcp"),
            ("port", port),
            ("expected", expected),
        ]
    };
    let edges = samples(&reg, "deny_observer_new_denied_edges_total");
    assert_eq!(edges.len(), 2, "{edges:?}");
    assert_eq!(
        value(
            &reg,
            "deny_observer_new_denied_edges_total",
            &edge_labels("cart", "5432", "false")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &reg,
            "deny_observer_new_denied_edges_total",
            &edge_labels("scanner", "22", "true")
        ),
        Some(1.0)
    );
}

#[test]
fn configured_expected_edges_are_labelled_and_do_not_page() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(short(None), &reg, at(0)).unwrap();
    let scrape = ingress("prometheus", "monitoring", "node-exporter", 9100);
    let mut transitions = Vec::new();
    for s in 0..200 {
        let n = if s >= 120 { 1000 } else { 2 };
        assert!(stage.record_deny(at(s), &scrape, n, NO_POLICIES).expected);
        transitions.extend(stage.tick(at(s)));
    }
    assert!(transitions.is_empty(), "{transitions:?}");
    assert_eq!(
        value(
            &reg,
            "deny_observer_deny_spike_active",
            &[("workload", "node-exporter"), ("expected", "true")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &reg,
            "deny_observer_new_denied_edges_total",
            &[
                ("destination_workload", "node-exporter"),
                ("expected", "true")
            ]
        ),
        Some(1.0)
    );
}

#[test]
fn series_of_idle_workloads_and_forgotten_edges_are_removed() {
    let reg = Registry::new();
    let mut cfg = short(None);
    cfg.edges.retention = Duration::from_secs(900);
    let mut stage = AlertStage::new(cfg, &reg, at(0)).unwrap();
    let gone = ingress("cart", "db", "postgres", 5432);
    let alive = ingress("web", "shop", "api", 8080);
    stage.record_deny(at(0), &gone, 5, NO_POLICIES);
    for s in 0..1000 {
        stage.record_deny(at(s), &alive, 1, NO_POLICIES);
        stage.tick(at(s));
    }
    let workloads: Vec<String> = samples(&reg, "deny_observer_deny_rate")
        .into_iter()
        .map(|(l, _)| l["workload"].clone())
        .collect();
    assert_eq!(workloads, vec!["api".to_owned()]);
    let edges: Vec<String> = samples(&reg, "deny_observer_new_denied_edges_total")
        .into_iter()
        .map(|(l, _)| l["destination_workload"].clone())
        .collect();
    assert_eq!(edges, vec!["api".to_owned()]);
}

#[test]
fn restart_does_not_refire_known_edges() {
    let dir = tempfile::tempdir().unwrap();
    let e = ingress("cart", "db", "postgres", 5432);
    {
        let reg = Registry::new();
        let mut stage = AlertStage::new(short(Some(dir.path())), &reg, at(0)).unwrap();
        assert!(stage.record_deny(at(0), &e, 1, NO_POLICIES).new_edge);
        stage.tick(at(0));
        stage.shutdown(at(1)).unwrap();
    }
    let reg = Registry::new();
    let mut stage = AlertStage::new(short(Some(dir.path())), &reg, at(60)).unwrap();
    assert!(!stage.record_deny(at(60), &e, 1, NO_POLICIES).new_edge);
    stage.tick(at(60));
    assert!(samples(&reg, "deny_observer_new_denied_edges_total").is_empty());
}

#[test]
fn metric_names_cover_everything_registered_and_registration_is_checked() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(short(None), &reg, at(0)).unwrap();
    stage.record_deny(at(0), &ingress("a", "b", "c", 1), 1, NO_POLICIES);
    stage.tick(at(0));
    let names = metric_names();
    let mut gathered: Vec<String> = reg.gather().iter().map(|f| f.name().to_owned()).collect();
    gathered.sort();
    for g in &gathered {
        assert!(
            names.contains(&g.as_str()),
            "{g} missing from metric_names()"
        );
    }
    for n in [
        "deny_observer_deny_spike_active",
        "deny_observer_deny_rate_baseline",
        "deny_observer_deny_rate",
        "deny_observer_new_denied_edges_total",
    ] {
        assert!(gathered.iter().any(|g| g == n), "{n} not exported");
    }
    // Everything in metric_names() is registered (families without samples are not gathered,
    // so register a stand-in under each name: each must collide).
    for n in names {
        let g = prometheus::Gauge::new(n, "stand-in").unwrap();
        assert!(reg.register(Box::new(g)).is_err(), "{n} is not registered");
    }
    let err = AlertStage::new(short(None), &reg, at(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot register metric deny_observer_"),
        "{err}"
    );
}

#[test]
fn learning_records_edges_without_counting_them_and_says_so_from_the_start() {
    let reg = Registry::new();
    let mut config = short(None);
    config.edges.learning = Duration::from_secs(3600);
    let mut stage = AlertStage::new(config, &reg, at(0)).unwrap();
    assert_eq!(
        value(&reg, "deny_observer_edge_learning_active", &[]),
        Some(1.0),
        "before the first tick"
    );
    let e = ingress("cart", "db", "postgres", 5432);
    let out = stage.record_deny(at(10), &e, 3, NO_POLICIES);
    assert!(!out.new_edge && out.learned, "{out:?}");
    assert!(samples(&reg, "deny_observer_new_denied_edges_total").is_empty());
    assert_eq!(
        value(&reg, "deny_observer_denied_edges_learned_total", &[]),
        Some(1.0)
    );
    // After learning: the learned edge stays known, a new one is counted.
    stage.tick(at(3601));
    assert_eq!(
        value(&reg, "deny_observer_edge_learning_active", &[]),
        Some(0.0)
    );
    assert!(!stage.record_deny(at(3601), &e, 1, NO_POLICIES).new_edge);
    let f = ingress("web", "db", "postgres", 5432);
    assert!(stage.record_deny(at(3602), &f, 1, NO_POLICIES).new_edge);
    assert_eq!(
        samples(&reg, "deny_observer_new_denied_edges_total").len(),
        1
    );
}

#[test]
fn new_edge_series_are_bounded_with_an_overflow_series() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(short(None), &reg, at(0)).unwrap();
    let overflow = prometheus::IntCounter::new("t_overflow", "t").unwrap();
    let series = prometheus::IntGauge::new("t_series", "t").unwrap();
    stage.bound_new_edge_series(3, overflow.clone(), series.clone());
    for i in 0..10 {
        let e = ingress(&format!("w{i}"), "db", "postgres", 5432);
        assert!(stage.record_deny(at(i), &e, 1, NO_POLICIES).new_edge);
    }
    let edges = samples(&reg, "deny_observer_new_denied_edges_total");
    assert_eq!(edges.len(), 4, "3 series and one overflow: {edges:?}");
    assert_eq!(
        value(
            &reg,
            "deny_observer_new_denied_edges_total",
            &[("source_workload", "__overflow__"), ("port", "other")]
        ),
        Some(7.0)
    );
    assert_eq!((overflow.get(), series.get()), (7, 3));
}
