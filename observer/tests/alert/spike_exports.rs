//! What the spike rule and its annotation read from the alert stage:
//! `deny_observer_deny_baseline_ready` (0 during the warm-up, then 1) and
//! `deny_observer_deny_top_port` (the busiest denied port of a workload, one series per key).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use observer::alert::{AlertConfig, AlertStage, DeniedEdge, EdgeConfig, SpikeConfig};
use observer::flow::{Direction, Protocol};
use prometheus::Registry;

fn at(sec: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + sec)
}

fn config() -> AlertConfig {
    AlertConfig {
        spike: SpikeConfig {
            for_duration: Duration::from_secs(5),
            cool_down: Duration::from_secs(10),
            warm_up: Duration::from_secs(30),
            half_life: Duration::from_secs(60),
            rate_window: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(20),
            ..SpikeConfig::default()
        },
        edges: EdgeConfig::default(),
        expected_edges: Vec::new(),
    }
}

fn edge(dst: &str, protocol: Protocol, port: u16) -> DeniedEdge {
    DeniedEdge {
        direction: Direction::Ingress,
        source_namespace: "shop".into(),
        source_workload: "frontend".into(),
        destination_namespace: "shop".into(),
        destination_workload: dst.into(),
        protocol,
        port,
        ports_folded: false,
    }
}

fn samples(reg: &Registry, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    reg.gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_owned(), l.value().to_owned()))
                .collect();
            (labels, m.get_gauge().get_value())
        })
        .collect()
}

fn for_workload(
    reg: &Registry,
    name: &str,
    workload: &str,
) -> Vec<(BTreeMap<String, String>, f64)> {
    samples(reg, name)
        .into_iter()
        .filter(|(l, _)| l.get("workload").map(String::as_str) == Some(workload))
        .collect()
}

const NONE: [(&str, &str); 0] = [];

#[test]
fn baseline_ready_is_zero_during_the_warm_up_then_one() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(config(), &reg, at(0)).unwrap();
    for s in 0..40 {
        stage.record_deny(at(s), &edge("api", Protocol::Tcp, 8080), 3, NONE);
        stage.tick(at(s));
        let ready = for_workload(&reg, "deny_observer_deny_baseline_ready", "api");
        assert_eq!(ready.len(), 1, "one series per key: {ready:?}");
        let want = if s < 30 { 0.0 } else { 1.0 };
        assert_eq!(ready[0].1, want, "second {s}");
        assert_eq!(ready[0].0["direction"], "ingress");
        assert_eq!(ready[0].0["workload_namespace"], "shop");
        assert_eq!(ready[0].0["expected"], "false");
    }
}

#[test]
fn top_port_follows_the_flood_with_one_series_per_key() {
    let reg = Registry::new();
    let mut stage = AlertStage::new(config(), &reg, at(0)).unwrap();
    // A background on 8080 and a scan over many ports, then a flood on 5432.
    for s in 0..10 {
        stage.record_deny(at(s), &edge("api", Protocol::Tcp, 8080), 20, NONE);
        for p in 0..40u16 {
            stage.record_deny(at(s), &edge("api", Protocol::Tcp, 30_000 + p), 1, NONE);
        }
        stage.tick(at(s));
    }
    let top = for_workload(&reg, "deny_observer_deny_top_port", "api");
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(top[0].0["port"], "8080");
    assert_eq!(top[0].0["protocol"], "tcp");
    // 20 packets/s steady: the decayed estimate is close.
    assert!((12.0..=28.0).contains(&top[0].1), "{top:?}");

    for s in 10..20 {
        stage.record_deny(at(s), &edge("api", Protocol::Tcp, 8080), 20, NONE);
        stage.record_deny(at(s), &edge("api", Protocol::Udp, 5432), 500, NONE);
        stage.tick(at(s));
    }
    let top = for_workload(&reg, "deny_observer_deny_top_port", "api");
    assert_eq!(top.len(), 1, "the old top's series is gone: {top:?}");
    assert_eq!(
        (top[0].0["protocol"].as_str(), top[0].0["port"].as_str()),
        ("udp", "5432")
    );
    assert!(top[0].1 > 250.0, "{top:?}");

    // Another workload has its own top port; an idle key's series go away with it.
    stage.record_deny(at(20), &edge("db", Protocol::Sctp, 9999), 5, NONE);
    stage.tick(at(20));
    let db = for_workload(&reg, "deny_observer_deny_top_port", "db");
    assert_eq!(db.len(), 1);
    assert_eq!(db[0].0["port"], "9999");
    for s in 21..60 {
        stage.tick(at(s));
    }
    assert!(for_workload(&reg, "deny_observer_deny_top_port", "api").is_empty());
    assert!(for_workload(&reg, "deny_observer_deny_baseline_ready", "api").is_empty());
    assert!(for_workload(&reg, "deny_observer_deny_top_port", "db").is_empty());
}
