//! Connections through a Service ClusterIP on real parts: the daemon from `DENY_OBSERVER_BIN` on
//! a simulated node, a client pod that dials a ClusterIP which real nftables DNAT to a backend
//! pod, and a real Prometheus. The client socket only ever sees the ClusterIP, as behind
//! kube-proxy; the test asserts that:
//!
//! 1. `deny_observer_connections_total` holds exactly the pod-to-pod edge (client -> web on the
//!    backend port), counted once per connection, and no `private` edge for the ClusterIP;
//! 2. `deny_observer_service_connections_total` counts the same connections at the opening
//!    end, by Service and Service port;
//! 3. `deny-observer edges --prometheus` has no `private` edge, and `suggest --egress` for the
//!    client's namespace allows egress to the backend and proposes no `ipBlock`.
//!
//! A second test rejects datagrams to a Service without endpoints, as kube-proxy does, and
//! asserts that the drop is counted against the Service and is no policy deny.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::cmd::run;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::promstack::{self, PromStack, StackConfig};
use testkit::simnode::{Proto, SimNode};
use testkit::webhook::Webhook;

const CLIENT_NS: &str = "svc-app";
const SHOP_NS: &str = "svc-shop";
const NODE: &str = "svc-node";
/// The Service's port, which the client dials.
const SERVICE_PORT: u16 = 80;
/// The backend's port, which the DNAT targets and NetworkPolicy judges.
const BACKEND_PORT: u16 = 8080;
/// ClusterIPs of the dual-stack Service `web`. Only the client's netns routes them (its own
/// nft table translates them), so they collide with nothing on the machine.
const CLUSTER_IP_V4: &str = "10.96.77.10";
const CLUSTER_IP_V6: &str = "fd00:96::77:10";
/// The client's nft table (its netns is ours alone; the name says whose it is anyway).
const NFT_TABLE: &str = "svc_clusterip";
const CONNECTIONS: &str = "deny_observer_connections_total";
const SERVICE_CONNECTIONS: &str = "deny_observer_service_connections_total";

/// The daemon on `inventory` as node `NODE`, ready.
fn start_daemon(bin: &Path, inventory: &Path, work: &Path) -> Daemon {
    let mut daemon = Daemon::start_with_args(
        bin,
        inventory,
        free_loopback_addr().unwrap_or_else(|e| panic!("no free loopback port: {e}")),
        work.join("daemon.log"),
        &["--node-name", NODE],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));
    daemon
}

#[test]
fn connections_through_a_cluster_ip_are_one_pod_to_pod_edge() {
    if !testkit::privileged("connections_through_a_cluster_ip_are_one_pod_to_pod_edge") {
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
    let client = node.add_pod(CLIENT_NS, "client-6f7d8c9b5-h2k4m").unwrap();
    let web = node.add_pod(SHOP_NS, "web-7c8d9e6f5-p3q8r").unwrap();
    let metas = [
        PodMeta::app("client", deployment("client", "6f7d8c9b5")),
        PodMeta::app("web", deployment("web", "7c8d9e6f5")).port("http", BACKEND_PORT, Proto::Tcp),
    ];
    let backend = |v6| node.pod(web).unwrap().ip(v6);

    // kube-proxy's rule, in the client's output hook: the socket keeps the ClusterIP as its
    // peer (conntrack translates both ways) exactly as behind kube-proxy, while the backend
    // sees the client's own address. (On this bridge the node's prerouting hook would miss the
    // replies, which go pod to pod.)
    node.nft(
        client,
        &format!(
            "table inet {NFT_TABLE} {{\n\
             \tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr {CLUSTER_IP_V4} tcp dport {SERVICE_PORT} dnat ip to {}:{BACKEND_PORT}\n\
             \t\tip6 daddr {CLUSTER_IP_V6} tcp dport {SERVICE_PORT} dnat ip6 to [{}]:{BACKEND_PORT}\n\
             \t}}\n\
             }}\n",
            backend(false),
            backend(true),
        ),
    )
    .unwrap();

    let inventory = work.path().join("inventory");
    manifests::write_inventory(&inventory, node.pods(), &metas, NODE, vec![]).unwrap();
    manifests::write_list(
        &inventory,
        "services.json",
        vec![
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": SHOP_NS},
                "spec": {"selector": {"app": "web"}, "clusterIP": CLUSTER_IP_V4,
                         "clusterIPs": [CLUSTER_IP_V4, CLUSTER_IP_V6],
                         "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                         "ports": [{"name": "http", "port": SERVICE_PORT,
                                    "targetPort": "http", "protocol": "TCP"}]},
            }),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web-headless", "namespace": SHOP_NS},
                "spec": {"selector": {"app": "web"}, "clusterIP": "None",
                         "ports": [{"port": BACKEND_PORT}]},
            }),
        ],
    )
    .unwrap();

    let mut daemon = start_daemon(&bin, &inventory, work.path());
    let metrics = testkit::metrics::scrape(daemon.addr()).unwrap();
    assert_eq!(
        metrics.sum("deny_observer_inventory_objects", &[("kind", "services")]),
        2.0,
        "both Services are in the inventory: the headless one for its selector (explain), \
         with no address to attribute"
    );
    let mut stack = PromStack::start(
        &StackConfig {
            job: "deny-observer".into(),
            targets: vec![daemon.addr()],
            rule_files: vec![],
        },
        Webhook::start().unwrap(),
    );

    // Rounds of one connection per ClusterIP family until Prometheus has the edge.
    let listener = node.listen(web, Proto::Tcp, BACKEND_PORT).unwrap();
    let cluster_ips: [IpAddr; 2] = [
        CLUSTER_IP_V4.parse().unwrap(),
        CLUSTER_IP_V6.parse().unwrap(),
    ];
    let prometheus = format!("http://{}", stack.prometheus_addr());
    let mut rounds = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let edges_text = loop {
        for ip in cluster_ips {
            node.tcp_exchange(client, SocketAddr::new(ip, SERVICE_PORT))
                .unwrap_or_else(|e| panic!("connecting to the ClusterIP {ip}: {e}"));
        }
        rounds += 1;
        std::thread::sleep(Duration::from_secs(2));
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        stack.check_alive();
        let (code, out, err) = run(
            &bin,
            &["edges", "--prometheus", &prometheus, "--window", "10m"],
        );
        assert_eq!(code, 0, "edges failed: {err}");
        if out
            .lines()
            .any(|l| l.contains("\"destination_workload\":\"web\""))
        {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "no edge to web in Prometheus after 120s:\n{out}\n{}\n{}",
            stack.report(),
            daemon.log_tail()
        );
    };

    // Exact counts once the daemon has drained every connection the backend accepted.
    let sent = rounds * 2;
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.received() < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        listener.received(),
        sent,
        "connections the backend accepted"
    );
    let port = BACKEND_PORT.to_string();
    let edge = [
        ("source_namespace", CLIENT_NS),
        ("source_workload", "client"),
        ("destination_namespace", SHOP_NS),
        ("destination_workload", "web"),
        ("protocol", "tcp"),
        ("port", port.as_str()),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = testkit::metrics::scrape(daemon.addr()).unwrap();
        if m.sum(CONNECTIONS, &edge) >= sent as f64 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        metrics.sum(CONNECTIONS, &edge),
        sent as f64,
        "client -> web after {rounds} rounds\n{}",
        daemon.log_tail()
    );
    let from_client: Vec<_> = metrics
        .select(CONNECTIONS, &[("source_workload", "client")])
        .collect();
    assert_eq!(
        from_client.len(),
        1,
        "the pod-to-pod edge is the client's only edge (no `private` ClusterIP edge): {from_client:?}"
    );
    assert_eq!(
        metrics
            .select(CONNECTIONS, &[("destination_workload", "private")])
            .count(),
        0,
        "{:?}",
        metrics.select(CONNECTIONS, &[]).collect::<Vec<_>>()
    );
    let service_port = SERVICE_PORT.to_string();
    assert_eq!(
        metrics.sum(
            SERVICE_CONNECTIONS,
            &[
                ("source_namespace", CLIENT_NS),
                ("source_workload", "client"),
                ("service_namespace", SHOP_NS),
                ("service", "web"),
                ("protocol", "tcp"),
                ("port", service_port.as_str()),
            ]
        ),
        sent as f64,
        "opening ends through the Service\n{}",
        daemon.log_tail()
    );

    let lines: Vec<Value> = edges_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine: Vec<&Value> = lines
        .iter()
        .filter(|e| e["source_namespace"] == CLIENT_NS)
        .collect();
    assert_eq!(mine.len(), 1, "{edges_text}");
    assert_eq!(mine[0]["destination_workload"], "web", "{edges_text}");
    assert_eq!(mine[0]["port"], BACKEND_PORT, "{edges_text}");
    assert_eq!(mine[0]["verdict"], "allow", "{edges_text}");

    let edges = work.path().join("edges.jsonl");
    std::fs::write(&edges, &edges_text).unwrap();
    let (code, yaml, err) = run(
        &bin,
        &[
            "suggest",
            "--inventory",
            inventory.to_str().unwrap(),
            "--namespace",
            CLIENT_NS,
            "--edges",
            edges.to_str().unwrap(),
            "--egress",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !yaml.contains("ipBlock"),
        "suggest --egress proposes an address range for Service traffic:\n{yaml}"
    );
    assert!(
        yaml.contains(&format!("port: {BACKEND_PORT}")) || yaml.contains("port: http"),
        "the egress to the backend port is allowed:\n{yaml}"
    );
    println!("edges:\n{edges_text}\nsuggested:\n{yaml}");
    drop(stack);
}

/// ClusterIPs of `empty`, a dual-stack Service with no ready endpoint, and an address of the
/// same range that is no Service's.
const EMPTY_IP_V4: &str = "10.96.77.20";
const EMPTY_IP_V6: &str = "fd00:96::77:20";
const NOT_A_SERVICE_V4: &str = "10.96.77.21";
const DNS_PORT: u16 = 53;
const DROPS: &str = "deny_observer_drops_total";
const DENIES: &str = "deny_observer_policy_denies_total";

/// A client behind an egress default deny sends to a Service without endpoints, which
/// kube-proxy's reject rule drops while the packet still names the ClusterIP. NetworkPolicy
/// did not decide that drop: it must be counted against the Service, with no policy deny (a
/// page would send the SRE to the wrong policy). The same drop to an address that is no
/// Service's is still judged, and denied by the egress policy.
#[test]
fn a_drop_at_a_cluster_ip_without_endpoints_is_the_service_not_a_policy_deny() {
    if !testkit::privileged(
        "a_drop_at_a_cluster_ip_without_endpoints_is_the_service_not_a_policy_deny",
    ) {
        return;
    }
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();

    let mut node = SimNode::new().expect("simulated node");
    let deployment = |name: &str, hash: &str| Owner::Deployment {
        name: name.into(),
        hash: hash.into(),
    };
    let client = node.add_pod(CLIENT_NS, "client-6f7d8c9b5-z9x8w").unwrap();
    node.add_pod(SHOP_NS, "web-7c8d9e6f5-k2j3h").unwrap();
    let metas = [
        PodMeta::app("client", deployment("client", "6f7d8c9b5")),
        PodMeta::app("web", deployment("web", "7c8d9e6f5")),
    ];
    // What kube-proxy installs for a Service with no endpoint (here in the client's own netns,
    // which only this test uses).
    node.nft(
        client,
        &format!(
            "table inet {NFT_TABLE}_reject {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\tip daddr {{ {EMPTY_IP_V4}, {NOT_A_SERVICE_V4} }} udp dport {DNS_PORT} reject\n\
             \t\tip6 daddr {EMPTY_IP_V6} udp dport {DNS_PORT} reject\n\
             \t}}\n\
             }}\n"
        ),
    )
    .unwrap();

    let inventory = work.path().join("inventory");
    let egress_deny = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny-egress", "namespace": CLIENT_NS},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]},
    });
    manifests::write_inventory(&inventory, node.pods(), &metas, NODE, vec![egress_deny]).unwrap();
    manifests::write_list(
        &inventory,
        "services.json",
        vec![json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "empty", "namespace": SHOP_NS},
            "spec": {"selector": {"app": "nothing-matches"}, "clusterIP": EMPTY_IP_V4,
                     "clusterIPs": [EMPTY_IP_V4, EMPTY_IP_V6],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                     "ports": [{"port": DNS_PORT, "protocol": "UDP"}]},
        })],
    )
    .unwrap();

    let mut daemon = start_daemon(&bin, &inventory, work.path());

    const N: u64 = 25;
    for ip in [EMPTY_IP_V4, EMPTY_IP_V6, NOT_A_SERVICE_V4] {
        let to = SocketAddr::new(ip.parse().unwrap(), DNS_PORT);
        let report = node.send_udp(client, to, N).unwrap();
        assert_eq!(
            report.refused_locally, N,
            "every datagram to {to} is rejected in the client's output hook: {report:?}"
        );
    }

    let to_service = [
        ("reason", "netfilter_drop"),
        ("source_namespace", CLIENT_NS),
        ("source_workload", "client"),
        ("destination_namespace", SHOP_NS),
        ("destination_workload", "service/empty"),
        ("protocol", "udp"),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        let m = testkit::metrics::scrape(daemon.addr()).unwrap();
        let private = m.sum(DENIES, &[("destination_workload", "private")]);
        if (m.sum(DROPS, &to_service) >= (2 * N) as f64 && private >= N as f64)
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let all_drops = || metrics.select(DROPS, &[]).collect::<Vec<_>>();
    assert_eq!(
        metrics.sum(DROPS, &to_service),
        (2 * N) as f64,
        "drops at both ClusterIPs of svc-shop/empty\n{:?}\n{}",
        all_drops(),
        daemon.log_tail()
    );
    assert_eq!(
        metrics.sum(
            DROPS,
            &[
                ("destination_workload", "service/empty"),
                ("direction", "unknown")
            ]
        ),
        (2 * N) as f64,
        "no policy direction for a drop NetworkPolicy did not decide: {:?}",
        all_drops()
    );
    assert_eq!(
        metrics.sum(DENIES, &[("destination_workload", "service/empty")]),
        0.0,
        "a drop at a ClusterIP is no policy deny: {:?}",
        metrics.select(DENIES, &[]).collect::<Vec<_>>()
    );
    assert_eq!(
        metrics.sum(
            DENIES,
            &[
                ("source_workload", "client"),
                ("destination_workload", "private"),
                ("direction", "egress"),
                ("match", "default_deny"),
                ("policy", "svc-app/default-deny-egress"),
            ]
        ),
        N as f64,
        "the address that is no Service's is still judged: {:?}",
        metrics.select(DENIES, &[]).collect::<Vec<_>>()
    );
}
