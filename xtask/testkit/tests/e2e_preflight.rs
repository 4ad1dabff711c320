//! Policies as code on real parts: the daemon from `DENY_OBSERVER_BIN` on a simulated node sees
//! real denied traffic, a real Prometheus scrapes it, and then:
//!
//! 1. The daemon counts the allowed TCP connections and UDP flows exactly on
//!    `deny_observer_connections_total`, and none of the denied ones.
//! 2. `deny-observer edges --prometheus` writes the allowed and denied edges from Prometheus'
//!    HTTP API, and `deny-observer preflight` over them exits 4 on a change that denies the
//!    observed allowed traffic and names the policy, and 0 on a harmless change, which it
//!    reports as newly allowing the observed denied edge.
//! 3. `deny-observer suggest` for the namespace, applied by `preflight`, breaks nothing.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::cmd::run;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::promstack::{self, PromStack, StackConfig};
use testkit::simnode::{Enforcement, Proto, SimNode};
use testkit::webhook::Webhook;

const APP_NS: &str = "pf-app";
const OTHER_NS: &str = "pf-other";
const NODE: &str = "pf-node";
const API_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 9000;
const CLIENT_TCP_PORT: u16 = 9001;
const API_TCP_PORT: u16 = 8443;
const UDP_FLOWS_PER_ROUND: u64 = 2;
const CONNECTIONS: &str = "deny_observer_connections_total";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Labels of the allowed edge probe -> client.
fn probe_to_client<'a>(protocol: &'a str, port: &'a str) -> [(&'a str, &'a str); 6] {
    [
        ("source_namespace", OTHER_NS),
        ("source_workload", "probe"),
        ("destination_namespace", APP_NS),
        ("destination_workload", "client"),
        ("protocol", protocol),
        ("port", port),
    ]
}

#[test]
fn edges_from_prometheus_gate_a_policy_change() {
    if !testkit::privileged("edges_from_prometheus_gate_a_policy_change") {
        return;
    }
    let bin = testkit::daemon_bin();
    promstack::require_binaries();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();

    let mut node = SimNode::new().expect("simulated node");
    let deployment = |name: &str, hash: &str| Owner::Deployment {
        name: name.into(),
        hash: hash.into(),
    };
    let pods = [
        (
            APP_NS,
            "client-5d4f8c7b9-w8xkq",
            PodMeta::app("client", deployment("client", "5d4f8c7b9"))
                .port("ingest", CLIENT_PORT, Proto::Udp)
                .port("grpc", CLIENT_TCP_PORT, Proto::Tcp),
        ),
        (
            APP_NS,
            "api-6c9f8b7d4-k2x9z",
            PodMeta::app("api", deployment("api", "6c9f8b7d4")).port("http", API_PORT, Proto::Udp),
        ),
        (
            OTHER_NS,
            "probe-7b8c9d6f5-q4r7t",
            PodMeta::app("probe", deployment("probe", "7b8c9d6f5")),
        ),
    ];
    let mut metas = Vec::new();
    for (ns, name, meta) in pods {
        node.add_pod(ns, name).unwrap();
        metas.push(meta);
    }
    let (client, api, probe) = (0, 1, 2);
    let mut enforcement = Enforcement::default();
    enforcement.ingress_isolated.insert(api);
    node.enforce(&enforcement).unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(
        &inventory,
        node.pods(),
        &metas,
        NODE,
        vec![json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "api-deny-ingress", "namespace": APP_NS},
            "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"]},
        })],
    )
    .unwrap();

    let mut daemon = Daemon::start_with_args(
        &bin,
        &inventory,
        free_loopback_addr().unwrap(),
        work.path().join("daemon.log"),
        &["--node-name", NODE],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stack = PromStack::start(
        &StackConfig {
            job: "deny-observer".into(),
            targets: vec![daemon.addr()],
            rule_files: vec![],
        },
        Webhook::start().unwrap(),
    );

    // Real traffic in rounds until Prometheus has an increase of every edge: allowed TCP
    // connections (IPv4 and IPv6) and UDP flows probe -> client, which the kernel counts, and
    // denied UDP datagrams and TCP SYNs client -> api, which it must not count as allowed.
    let client_ip = |v6| node.pod(client).unwrap().ip(v6);
    let udp_listener = node.listen(client, Proto::Udp, CLIENT_PORT).unwrap();
    let tcp_listener = node.listen(client, Proto::Tcp, CLIENT_TCP_PORT).unwrap();
    let api_addr = SocketAddr::new(node.pod(api).unwrap().ip(false), API_PORT);
    let prometheus = format!("http://{}", stack.prometheus_addr());
    let mut rounds = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let edges_text = loop {
        for v6 in [false, false, true] {
            node.tcp_exchange(probe, SocketAddr::new(client_ip(v6), CLIENT_TCP_PORT))
                .unwrap();
        }
        for _ in 0..UDP_FLOWS_PER_ROUND {
            // One socket per call: one flow of 10 datagrams each.
            node.send_udp(probe, SocketAddr::new(client_ip(false), CLIENT_PORT), 10)
                .unwrap();
        }
        node.send_udp(client, api_addr, 20).unwrap();
        node.send_tcp_syns(client, SocketAddr::new(api_addr.ip(), API_TCP_PORT), 5)
            .unwrap();
        rounds += 1;
        std::thread::sleep(Duration::from_secs(2));
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        stack.check_alive();
        let (code, out, err) = run(
            &bin,
            &["edges", "--prometheus", &prometheus, "--window", "10m"],
        );
        assert_eq!(code, 0, "edges failed: {err}");
        let has = |verdict: &str, proto: &str| {
            out.lines().any(|l| {
                l.contains(&format!("\"verdict\":\"{verdict}\""))
                    && l.contains(&format!("\"protocol\":\"{proto}\""))
            })
        };
        if has("deny", "udp") && has("allow", "udp") && has("allow", "tcp") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "edges incomplete in Prometheus after 120s:\n{out}\n{}\n{}",
            stack.report(),
            daemon.log_tail()
        );
    };

    // Exact counts on the daemon: one per TCP connection, one per UDP socket (its datagrams
    // are one flow), and nothing for denied traffic.
    let tcp_sent = rounds * 3;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_listener.received() < tcp_sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tcp_listener.received(),
        tcp_sent,
        "TCP connections accepted"
    );
    assert_eq!(udp_listener.received(), rounds * UDP_FLOWS_PER_ROUND * 10);
    let metrics = testkit::metrics::scrape(daemon.addr()).unwrap();
    let (tcp_port, udp_port) = (CLIENT_TCP_PORT.to_string(), CLIENT_PORT.to_string());
    let tcp_edge = probe_to_client("tcp", &tcp_port);
    let udp_edge = probe_to_client("udp", &udp_port);
    assert_eq!(
        metrics.sum(CONNECTIONS, &tcp_edge),
        tcp_sent as f64,
        "TCP connections probe -> client after {rounds} rounds\n{}",
        daemon.log_tail()
    );
    assert_eq!(
        metrics.sum(CONNECTIONS, &udp_edge),
        (rounds * UDP_FLOWS_PER_ROUND) as f64,
        "UDP flows probe -> client after {rounds} rounds"
    );
    assert_eq!(
        metrics
            .select(CONNECTIONS, &[("destination_workload", "api")])
            .count(),
        0,
        "denied traffic counted as allowed: {:?}",
        metrics.select(CONNECTIONS, &[]).collect::<Vec<_>>()
    );
    for hook in ["tcp", "udp_receive"] {
        assert_eq!(
            metrics.sum("deny_observer_connection_hooks", &[("hook", hook)]),
            1.0,
            "hook {hook} not attached on this kernel"
        );
    }

    let lines: Vec<Value> = edges_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied = lines
        .iter()
        .find(|e| e["destination_workload"] == "api" && e["protocol"] == "udp")
        .unwrap_or_else(|| panic!("no UDP edge to api in {edges_text}"));
    assert!(
        lines.iter().any(|e| e["destination_workload"] == "api"
            && e["protocol"] == "tcp"
            && e["verdict"] == "deny"),
        "the denied SYNs to api are a denied edge: {edges_text}"
    );
    assert_eq!(denied["source_namespace"], APP_NS, "{denied}");
    assert_eq!(denied["source_workload"], "client", "{denied}");
    assert_eq!(denied["protocol"], "udp", "{denied}");
    assert_eq!(denied["verdict"], "deny", "{denied}");
    // The drop metrics carry no port: it comes from the daemon's new-denied-edge series.
    assert_eq!(denied["port"], API_PORT, "{denied}");
    assert!(
        lines.iter().any(|e| e["destination_workload"] == "api"
            && e["protocol"] == "tcp"
            && e["verdict"] == "deny"
            && e["port"] == API_TCP_PORT),
        "the denied SYNs' port: {edges_text}"
    );
    for (proto, port) in [("tcp", CLIENT_TCP_PORT), ("udp", CLIENT_PORT)] {
        let allowed = lines
            .iter()
            .find(|e| e["verdict"] == "allow" && e["protocol"] == proto)
            .unwrap_or_else(|| panic!("no allowed {proto} edge in {edges_text}"));
        assert_eq!(allowed["source_workload"], "probe", "{allowed}");
        assert_eq!(allowed["destination_workload"], "client", "{allowed}");
        assert_eq!(allowed["port"], port, "{allowed}");
        assert!(allowed["observed"].as_u64().unwrap_or(0) > 0, "{allowed}");
    }
    assert_eq!(
        lines.iter().filter(|e| e["verdict"] == "allow").count(),
        2,
        "only probe -> client is allowed traffic between pods: {edges_text}"
    );

    let edges = work.path().join("edges.jsonl");
    write(&edges, &edges_text);
    let edges = edges.to_str().unwrap();
    let inv = inventory.to_str().unwrap();

    // A lockdown that forgets the probe: exit 4, the probe edge named with the new policy.
    let breaking = work.path().join("breaking.yaml");
    write(
        &breaking,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: lockdown, namespace: {APP_NS}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
        ),
    );
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            breaking.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 4, "breaking change must exit 4\n{out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let breaks = report["breaks"].as_array().unwrap();
    assert_eq!(breaks.len(), 2, "both observed allowed edges break: {out}");
    for b in breaks {
        assert_eq!(b["source_workload"], "probe", "{out}");
        assert_eq!(b["destination_workload"], "client", "{out}");
        assert!(b["observed"].as_u64().unwrap_or(0) > 0, "{out}");
        assert_eq!(
            b["policies"],
            json!([format!("{APP_NS}/lockdown")]),
            "{out}"
        );
    }
    let mut ports: Vec<u64> = breaks.iter().filter_map(|b| b["port"].as_u64()).collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        [u64::from(CLIENT_PORT), u64::from(CLIENT_TCP_PORT)],
        "{out}"
    );
    let judged = report["edges_evaluated"].as_u64().unwrap_or(0) as usize
        + report["edges_unresolved"].as_array().map_or(0, Vec::len);
    assert_eq!(judged, lines.len(), "every edge is judged or named: {out}");

    // Opening api to client: nothing breaks, the observed denied edge is newly allowed on
    // the port api declares.
    let harmless = work.path().join("harmless.yaml");
    write(
        &harmless,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: {APP_NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{protocol: UDP, port: http}}]\n"
        ),
    );
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            harmless.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "harmless change must exit 0\n{out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let opened = report["newly_allowed"].as_array().unwrap();
    assert!(
        opened
            .iter()
            .any(|c| c["destination_workload"] == "api" && c["port"] == API_PORT),
        "{out}"
    );

    // The suggestion for the namespace, applied, breaks nothing and keeps client -> api denied.
    let (code, yaml, err) = run(
        &bin,
        &[
            "suggest",
            "--inventory",
            inv,
            "--namespace",
            APP_NS,
            "--edges",
            edges,
            "--egress",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let suggested = work.path().join("suggested.yaml");
    write(&suggested, &yaml);
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            suggested.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(
        code, 0,
        "the suggestion breaks observed traffic\n{yaml}\n{out}\n{err}"
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["newly_allowed"], json!([]), "{yaml}\n{out}");
    println!("edges:\n{edges_text}\nsuggested:\n{yaml}");
    drop(stack);
}
