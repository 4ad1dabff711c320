//! End to end on the real kernel (privileged): nftables in simulated pods drops known numbers
//! of TCP SYNs and UDP datagrams, over IPv4 and then IPv6; the daemon from `DENY_OBSERVER_BIN`
//! must count exactly those, on the right workloads, with reason `netfilter_drop`, and must not
//! count allowed traffic.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics};
use testkit::simnode::{
    EGRESS_DROP_COUNTER, Enforcement, INGRESS_DROP_COUNTER, Proto, Rule, SimNode,
};

const DROPS: &str = "deny_observer_drops_total";
const LOST: &str = "deny_observer_events_lost_total";
const APP_NS: &str = "e2e-app";
const TOOLS_NS: &str = "e2e-tools";

/// An expected `deny_observer_drops_total` value: (source ns, source workload, destination ns,
/// destination workload, protocol) → packets.
type Expected = BTreeMap<
    (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    ),
    u64,
>;

fn observed(m: &Metrics, k: &(&str, &str, &str, &str, &str)) -> f64 {
    m.sum(
        DROPS,
        &[
            ("reason", "netfilter_drop"),
            ("source_namespace", k.0),
            ("source_workload", k.1),
            ("destination_namespace", k.2),
            ("destination_workload", k.3),
            ("protocol", k.4),
        ],
    )
}

/// Drops of any reason to or from the client, whose traffic is all allowed.
fn allowed_traffic_counted(m: &Metrics) -> f64 {
    m.sum(
        DROPS,
        &[("source_namespace", APP_NS), ("source_workload", "client")],
    ) + m.sum(
        DROPS,
        &[
            ("destination_namespace", APP_NS),
            ("destination_workload", "client"),
        ],
    )
}

fn dump(m: &Metrics, daemon: &Daemon) -> String {
    let mut s = String::from("deny_observer_drops_total series:\n");
    for sample in m.select(DROPS, &[]) {
        s.push_str(&format!("  {:?} {}\n", sample.labels, sample.value));
    }
    s.push_str(&format!(
        "daemon log ({}):\n{}",
        daemon.log().display(),
        daemon.log_tail()
    ));
    s
}

/// Scrapes until every expected series has its value (the daemon drains the kernel map every
/// second), then once more a little later: the values must still be exact, not just reached.
fn assert_settles(daemon: &mut Daemon, expected: &Expected, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut last = Metrics::default();
    loop {
        daemon
            .check_alive()
            .unwrap_or_else(|e| panic!("{phase}: {e}"));
        if let Ok(m) = metrics::scrape(daemon.addr()) {
            let done = expected.iter().all(|(k, v)| observed(&m, k) >= *v as f64);
            last = m;
            if done {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let m = metrics::scrape(daemon.addr()).unwrap_or(last);
    for (k, v) in expected {
        assert_eq!(
            observed(&m, k),
            *v as f64,
            "{phase}: drops {} {}/{} -> {}/{}\n{}",
            k.4,
            k.0,
            k.1,
            k.2,
            k.3,
            dump(&m, daemon)
        );
    }
    assert_eq!(
        allowed_traffic_counted(&m),
        0.0,
        "{phase}: allowed traffic (to or from {APP_NS}/client) was counted as dropped\n{}",
        dump(&m, daemon)
    );
}

#[test]
fn nft_drops_of_syns_and_datagrams_are_counted_exactly_v4_and_v6() {
    if !testkit::privileged("nft_drops_of_syns_and_datagrams_are_counted_exactly_v4_and_v6") {
        return;
    }
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();

    let mut node = SimNode::new().expect("simulated node");
    let pods = [
        (
            APP_NS,
            "client-7f9c6d5b8-qx2lm",
            PodMeta::app(
                "client",
                Owner::Deployment {
                    name: "client".into(),
                    hash: "7f9c6d5b8".into(),
                },
            ),
        ),
        (
            APP_NS,
            "server-0",
            PodMeta::app("server", Owner::StatefulSet("server".into()))
                .port("http", 8080, Proto::Tcp)
                .port("dns", 5353, Proto::Udp),
        ),
        (TOOLS_NS, "intruder", PodMeta::app("intruder", Owner::None)),
        (
            TOOLS_NS,
            "locked-x8k2p",
            PodMeta::app("locked", Owner::Job("locked".into())),
        ),
    ];
    let mut metas = Vec::new();
    for (ns, name, meta) in pods {
        node.add_pod(ns, name).unwrap();
        metas.push(meta);
    }
    let (client, server, intruder, locked) = (0, 1, 2, 3);

    // What nftables enforces, and the NetworkPolicies that say the same.
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(server);
    policy.egress_isolated.insert(locked);
    policy
        .allow(Rule {
            from: client,
            to: server,
            protocol: Proto::Tcp,
            port: 8080,
        })
        .allow(Rule {
            from: client,
            to: server,
            protocol: Proto::Udp,
            port: 5353,
        });
    node.enforce(&policy).unwrap();
    let policies = vec![
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "server-from-client", "namespace": APP_NS},
            "spec": {
                "podSelector": {"matchLabels": {"app": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "UDP", "port": 5353}],
                }],
            },
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "locked-deny-egress", "namespace": TOOLS_NS},
            "spec": {"podSelector": {"matchLabels": {"app": "locked"}}, "policyTypes": ["Egress"]},
        }),
    ];

    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(&inventory, node.pods(), &metas, "e2e-node", policies).unwrap();

    let _tcp = node.listen(server, Proto::Tcp, 8080).unwrap();
    let _udp = node.listen(server, Proto::Udp, 5353).unwrap();

    let addr: SocketAddr = free_loopback_addr().unwrap();
    let mut daemon = Daemon::start(&bin, &inventory, addr, work.path().join("daemon.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));

    let srv = node.pod(server).unwrap().clone();
    let mut expected = Expected::new();
    let intruder_tcp = (TOOLS_NS, "intruder", APP_NS, "server", "tcp");
    let intruder_udp = (TOOLS_NS, "intruder", APP_NS, "server", "udp");
    let locked_udp = (TOOLS_NS, "locked", APP_NS, "server", "udp");
    let (mut ingress_drops, mut egress_drops) = (0, 0);
    // Different numbers per phase and per flow, so a swapped or doubled count cannot pass.
    for (phase, v6, syns, datagrams, locked_datagrams) in
        [("IPv4", false, 7, 11, 5), ("IPv6", true, 4, 6, 2)]
    {
        let at = |port| SocketAddr::new(srv.ip(v6), port);
        for _ in 0..3 {
            node.tcp_exchange(client, at(8080)).unwrap();
        }
        assert_eq!(node.send_udp(client, at(5353), 4).unwrap().sent, 4);

        let r = node.send_tcp_syns(intruder, at(8080), syns).unwrap();
        assert_eq!(r.sent, syns);
        let r = node.send_udp(intruder, at(5353), datagrams).unwrap();
        assert_eq!(r.sent, datagrams);
        let r = node.send_udp(locked, at(5353), locked_datagrams).unwrap();
        assert_eq!(r.refused_locally, locked_datagrams);

        ingress_drops += syns + datagrams;
        egress_drops += locked_datagrams;
        // The harness itself: nftables dropped exactly what was sent.
        assert_eq!(
            node.counter(server, INGRESS_DROP_COUNTER).unwrap().packets,
            ingress_drops
        );
        assert_eq!(
            node.counter(locked, EGRESS_DROP_COUNTER).unwrap().packets,
            egress_drops
        );

        *expected.entry(intruder_tcp).or_default() += syns;
        *expected.entry(intruder_udp).or_default() += datagrams;
        *expected.entry(locked_udp).or_default() += locked_datagrams;
        assert_settles(&mut daemon, &expected, phase);
    }
    // The recursion-miss loss is exported from the start (at 0) wherever the kernel reports
    // it (5.12+), so counted + lost = dropped covers drops the program was skipped for.
    let m = metrics::scrape(daemon.addr()).unwrap();
    let misses: Vec<_> = m.select(LOST, &[("stage", "recursion_miss")]).collect();
    if kernel_at_least(5, 12) {
        assert_eq!(misses.len(), 1, "{}", dump(&m, &daemon));
        assert_eq!(misses[0].value, 0.0, "{}", dump(&m, &daemon));
    }
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(r) => r,
        Err(e) => panic!("reading /proc/sys/kernel/osrelease: {e}"),
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}
