//! End to end on the real kernel (privileged), issue 3: NetworkPolicies enforced by nftables in
//! simulated pods, the allow matrix taken from the real binary's `explain --flows -`, denied
//! and allowed traffic driven over IPv4 and IPv6, and the daemon from `DENY_OBSERVER_BIN` must
//! put exactly the right `policy`, `match` and `direction` labels, with exact packet counts, on
//! `deny_observer_policy_denies_total`, and the verdict's `direction` on
//! `deny_observer_drops_total`. A firewall outside Kubernetes (an nft drop of a flow the
//! policies allow) must come out as `match="unexplained"`.
//!
//! Expected labels are written by hand from the policies below, not taken from the engine:
//! explain's answers are checked against them before anything is enforced.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::demo::{self, Verdict};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics, Sample};
use testkit::simnode::{EGRESS_DROP_COUNTER, INGRESS_DROP_COUNTER, Proto, SimNode};

const DROPS: &str = "deny_observer_drops_total";
const DENIES: &str = "deny_observer_policy_denies_total";
const WEB: &str = "pol-web";
const OPS: &str = "pol-ops";
/// The firewall outside Kubernetes, in the frontend pod.
const FW_TABLE: &str = "e2e_outside_firewall";
const FW_COUNTER: &str = "fw_drop";

fn policies() -> Vec<serde_json::Value> {
    let np = |ns: &str, name: &str, spec: serde_json::Value| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        })
    };
    // Listed out of alphabetical order on purpose: the label must be sorted.
    vec![
        np(
            WEB,
            "default-deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        np(
            WEB,
            "allow-frontend-http",
            json!({
                "podSelector": {"matchLabels": {"app": "frontend"}},
                "ingress": [{"ports": [{"protocol": "TCP", "port": "http"}]}],
            }),
        ),
        np(
            WEB,
            "allow-frontend-to-api",
            json!({
                "podSelector": {"matchLabels": {"app": "api"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }],
            }),
        ),
        np(
            WEB,
            "db-from-api",
            json!({
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                    "ports": [{"protocol": "TCP", "port": "postgres"}],
                }],
            }),
        ),
        np(
            OPS,
            "scanner-egress",
            json!({
                "podSelector": {"matchLabels": {"app": "scanner"}},
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": WEB}},
                        "podSelector": {"matchLabels": {"app": "frontend"}},
                    }],
                    "ports": [{"protocol": "TCP", "port": 80}],
                }],
            }),
        ),
        np(
            OPS,
            "scanner-dns",
            json!({
                "podSelector": {"matchLabels": {"app": "scanner"}},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}],
            }),
        ),
    ]
}

/// A `deny_observer_policy_denies_total` series: direction, source ns/workload, destination
/// ns/workload, protocol, policy, match.
type DenyKey = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);
/// A `deny_observer_drops_total` series: reason, direction, source ns/workload, destination
/// ns/workload, protocol.
type DropKey = (String, String, String, String, String, String, String);

fn label(s: &Sample, k: &str) -> String {
    s.labels.get(k).cloned().unwrap_or_default()
}

fn ours(s: &Sample) -> bool {
    [WEB, OPS].contains(&label(s, "source_namespace").as_str())
        || [WEB, OPS].contains(&label(s, "destination_namespace").as_str())
}

fn deny_series(m: &Metrics) -> BTreeMap<Vec<String>, f64> {
    m.select(DENIES, &[])
        .filter(|s| ours(s))
        .map(|s| {
            let k = [
                "direction",
                "source_namespace",
                "source_workload",
                "destination_namespace",
                "destination_workload",
                "protocol",
                "policy",
                "match",
            ]
            .iter()
            .map(|l| label(s, l))
            .collect();
            (k, s.value)
        })
        .collect()
}

fn drop_series(m: &Metrics) -> BTreeMap<DropKey, f64> {
    let mut out = BTreeMap::new();
    for s in m.select(DROPS, &[]).filter(|s| ours(s)) {
        let k = (
            label(s, "reason"),
            label(s, "direction"),
            label(s, "source_namespace"),
            label(s, "source_workload"),
            label(s, "destination_namespace"),
            label(s, "destination_workload"),
            label(s, "protocol"),
        );
        *out.entry(k).or_default() += s.value;
    }
    out
}

fn deny_key(k: &DenyKey) -> Vec<String> {
    [k.0, k.1, k.2, k.3, k.4, k.5, k.6, k.7]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

fn drop_key_of(k: &DenyKey) -> DropKey {
    (
        "netfilter_drop".to_owned(),
        k.0.to_owned(),
        k.1.to_owned(),
        k.2.to_owned(),
        k.3.to_owned(),
        k.4.to_owned(),
        k.5.to_owned(),
    )
}

fn dump(m: &Metrics, daemon: &Daemon) -> String {
    let mut s = String::new();
    for name in [DENIES, DROPS] {
        s.push_str(&format!("{name} series (ours):\n"));
        for sample in m.select(name, &[]).filter(|s| ours(s)) {
            s.push_str(&format!("  {:?} {}\n", sample.labels, sample.value));
        }
    }
    s.push_str(&format!(
        "daemon log ({}):\n{}",
        daemon.log().display(),
        daemon.log_tail()
    ));
    s
}

#[test]
fn policy_denies_carry_exact_policy_match_and_direction() {
    if !testkit::privileged("policy_denies_carry_exact_policy_match_and_direction") {
        return;
    }
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();
    let t0 = Instant::now();

    let mut node = SimNode::new().expect("simulated node");
    let deploy = |name: &str, hash: &str| Owner::Deployment {
        name: name.into(),
        hash: hash.into(),
    };
    let pods = [
        (
            WEB,
            "frontend-6c9f8d7b4-x2vqk",
            PodMeta::app("frontend", deploy("frontend", "6c9f8d7b4")).port("http", 80, Proto::Tcp),
        ),
        (
            WEB,
            "api-5d8f7c9d6-h4kwt",
            PodMeta::app("api", deploy("api", "5d8f7c9d6"))
                .port("http", 8080, Proto::Tcp)
                .port("gossip", 7946, Proto::Udp),
        ),
        (
            WEB,
            "db-0",
            PodMeta::app("db", Owner::StatefulSet("db".into())).port("postgres", 5432, Proto::Tcp),
        ),
        (
            OPS,
            "scanner-29xq7",
            PodMeta::app("scanner", Owner::Job("scanner".into())),
        ),
        (OPS, "debug", PodMeta::app("debug", Owner::None)),
    ];
    let mut metas = Vec::new();
    for (ns, name, meta) in pods {
        node.add_pod(ns, name).unwrap();
        metas.push(meta);
    }
    let (frontend, api, db, scanner, debug) = (0, 1, 2, 3, 4);

    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(&inventory, node.pods(), &metas, "e2e-node", policies()).unwrap();

    // The allow matrix, from the real binary.
    let flows = demo::flows(&node, &metas);
    let explained = demo::explain(&bin, &inventory, &node, &flows)
        .unwrap_or_else(|e| panic!("explain --flows -: {e:#}"));

    // What the policies above say, by hand: (from, to, protocol, port) → verdict, policies.
    let api_in = "pol-web/allow-frontend-to-api,pol-web/default-deny-ingress";
    let db_in = "pol-web/db-from-api,pol-web/default-deny-ingress";
    let scanner_out = "pol-ops/scanner-dns,pol-ops/scanner-egress";
    let hand = |from: usize, to: usize, proto: Proto, port: u16| -> (Verdict, &'static str) {
        if from == scanner && !(to == frontend && proto == Proto::Tcp && port == 80) {
            return (Verdict::DenyEgress, scanner_out);
        }
        match to {
            t if t == frontend => (Verdict::Allow, ""),
            t if t == api => {
                if from == frontend && proto == Proto::Tcp && port == 8080 {
                    (Verdict::Allow, "")
                } else {
                    (Verdict::DenyIngress, api_in)
                }
            }
            t if t == db => {
                if from == api && proto == Proto::Tcp && port == 5432 {
                    (Verdict::Allow, "")
                } else {
                    (Verdict::DenyIngress, db_in)
                }
            }
            _ => (Verdict::Allow, ""),
        }
    };
    for (f, e) in flows.iter().zip(&explained) {
        let (verdict, policies) = hand(f.from, f.to, f.protocol, f.port);
        assert_eq!(
            (
                &e.verdict,
                e.policies.join(",").as_str(),
                e.policy_label.as_str()
            ),
            (&verdict, policies, policies),
            "explain disagrees with the policies for {} -> {} {}/{}",
            node.pod(f.from).unwrap().key(),
            node.pod(f.to).unwrap().key(),
            f.protocol,
            f.port
        );
    }
    let verdicts: Vec<Verdict> = explained.iter().map(|e| e.verdict.clone()).collect();
    let enforcement = demo::enforcement(&flows, &verdicts);
    node.enforce(&enforcement).unwrap();

    // A firewall Kubernetes knows nothing about: the frontend drops TCP/80 from debug, which
    // the policies allow.
    let dbg = node.pod(debug).unwrap().clone();
    node.nft(
        frontend,
        &format!(
            "table inet {FW_TABLE} {{\n  counter {FW_COUNTER} {{}}\n  chain input {{\n    \
             type filter hook input priority -10; policy accept;\n    \
             ip saddr {} tcp dport 80 counter name \"{FW_COUNTER}\" drop\n    \
             ip6 saddr {} tcp dport 80 counter name \"{FW_COUNTER}\" drop\n  }}\n}}\n",
            dbg.ipv4, dbg.ipv6
        ),
    )
    .unwrap();

    let mut listeners = Vec::new();
    for (id, meta) in metas.iter().enumerate() {
        for (_, port, proto) in &meta.ports {
            listeners.push(node.listen(id, *proto, *port).unwrap());
        }
    }

    let addr: SocketAddr = free_loopback_addr().unwrap();
    let mut daemon = Daemon::start(&bin, &inventory, addr, work.path().join("daemon.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));

    // Denied flows and the series each must land on; different counts per flow and per phase,
    // so swapped or doubled counts cannot pass.
    struct Denied {
        from: usize,
        to: usize,
        proto: Proto,
        port: u16,
        n: [u64; 2],
        key: DenyKey,
    }
    let denied = [
        Denied {
            from: debug,
            to: api,
            proto: Proto::Tcp,
            port: 8080,
            n: [3, 2],
            key: (
                "ingress",
                OPS,
                "debug",
                WEB,
                "api",
                "tcp",
                api_in,
                "default_deny",
            ),
        },
        Denied {
            from: debug,
            to: api,
            proto: Proto::Udp,
            port: 7946,
            n: [5, 4],
            key: (
                "ingress",
                OPS,
                "debug",
                WEB,
                "api",
                "udp",
                api_in,
                "default_deny",
            ),
        },
        Denied {
            from: frontend,
            to: db,
            proto: Proto::Tcp,
            port: 5432,
            n: [7, 1],
            key: (
                "ingress",
                WEB,
                "frontend",
                WEB,
                "db",
                "tcp",
                db_in,
                "default_deny",
            ),
        },
        Denied {
            from: scanner,
            to: api,
            proto: Proto::Udp,
            port: 7946,
            n: [6, 2],
            key: (
                "egress",
                OPS,
                "scanner",
                WEB,
                "api",
                "udp",
                scanner_out,
                "default_deny",
            ),
        },
        Denied {
            from: scanner,
            to: db,
            proto: Proto::Tcp,
            port: 5432,
            n: [4, 3],
            key: (
                "egress",
                OPS,
                "scanner",
                WEB,
                "db",
                "tcp",
                scanner_out,
                "default_deny",
            ),
        },
        Denied {
            from: debug,
            to: frontend,
            proto: Proto::Tcp,
            port: 80,
            n: [9, 5],
            key: (
                "unknown",
                OPS,
                "debug",
                WEB,
                "frontend",
                "tcp",
                "",
                "unexplained",
            ),
        },
    ];
    for d in &denied {
        let (v, _) = hand(d.from, d.to, d.proto, d.port);
        let expected_verdict = match d.key.0 {
            "ingress" => Verdict::DenyIngress,
            "egress" => Verdict::DenyEgress,
            _ => Verdict::Allow,
        };
        assert_eq!(v, expected_verdict, "test table out of step with policies");
    }
    // Allowed flows, driven each phase; none may show up in any series.
    let allowed = [
        (frontend, api, 8080),
        (api, db, 5432),
        (scanner, frontend, 80),
        (db, frontend, 80),
    ];

    let mut expected_denies: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    let mut expected_drops: BTreeMap<DropKey, f64> = BTreeMap::new();
    let mut fw_total = 0;
    let (mut api_in_total, mut db_in_total, mut scanner_out_total) = (0, 0, 0);
    for (phase, v6) in [("IPv4", false), ("IPv6", true)] {
        let idx = usize::from(v6);
        for (from, to, port) in allowed {
            let at = SocketAddr::new(node.pod(to).unwrap().ip(v6), port);
            node.tcp_exchange(from, at)
                .unwrap_or_else(|e| panic!("{phase}: allowed flow failed: {e}"));
        }
        for d in &denied {
            let at = SocketAddr::new(node.pod(d.to).unwrap().ip(v6), d.port);
            let n = d.n[idx];
            let r = match d.proto {
                Proto::Tcp => node.send_tcp_syns(d.from, at, n).unwrap(),
                Proto::Udp => node.send_udp(d.from, at, n).unwrap(),
            };
            assert_eq!(r.sent + r.refused_locally, n, "{phase}: {:?}", d.key);
            match d.key.0 {
                "ingress" if d.to == api => api_in_total += n,
                "ingress" => db_in_total += n,
                "egress" => scanner_out_total += n,
                _ => fw_total += n,
            }
            *expected_denies.entry(deny_key(&d.key)).or_default() += n as f64;
            *expected_drops.entry(drop_key_of(&d.key)).or_default() += n as f64;
        }
        // The harness itself: nftables dropped exactly what was sent, where it should.
        assert_eq!(
            node.counter(api, INGRESS_DROP_COUNTER).unwrap().packets,
            api_in_total
        );
        assert_eq!(
            node.counter(db, INGRESS_DROP_COUNTER).unwrap().packets,
            db_in_total
        );
        assert_eq!(
            node.counter(scanner, EGRESS_DROP_COUNTER).unwrap().packets,
            scanner_out_total
        );
        assert_eq!(
            node.counter_in(frontend, FW_TABLE, FW_COUNTER)
                .unwrap()
                .packets,
            fw_total
        );

        // Scrape until the counts are reached, then once more later: exact, not just reached.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            daemon
                .check_alive()
                .unwrap_or_else(|e| panic!("{phase}: {e}"));
            if let Ok(m) = metrics::scrape(daemon.addr())
                && deny_series(&m).values().sum::<f64>() >= expected_denies.values().sum::<f64>()
            {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(Duration::from_millis(2500));
        let m = metrics::scrape(daemon.addr()).unwrap();
        assert_eq!(
            deny_series(&m),
            expected_denies,
            "{phase}: {DENIES} (direction, src ns, src wl, dst ns, dst wl, protocol, policy, \
             match)\n{}",
            dump(&m, &daemon)
        );
        assert_eq!(
            drop_series(&m),
            expected_drops,
            "{phase}: {DROPS} (reason, direction, src ns, src wl, dst ns, dst wl, protocol)\n{}",
            dump(&m, &daemon)
        );
    }
    drop(listeners);
    eprintln!(
        "e2e_policy: {} denied flows x 2 families exact, in {:.1} s",
        denied.len(),
        t0.elapsed().as_secs_f64()
    );
}
