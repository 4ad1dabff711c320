//! Every branch of attribution, on a small inventory, without root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;
use crate::capture::{DrainReport, FlowDrop, Losses, Sample};
use crate::flow::{Direction, Protocol, SPARE_CAPACITY};
use crate::inventory::{
    Endpoint, Inventory, Labels, Namespace, NodeAddrs, Pod, PodPhase, Service, Workload,
};

const NODE: &str = "192.168.1.1";
const CLIENT: &str = "10.0.1.5";
const DB: &str = "10.0.0.10";
const WEB: &str = "10.0.0.20";
const WORLD: &str = "8.8.8.8";
const WORLD_2: &str = "1.1.1.1";
/// prod/api's ClusterIP.
const CLUSTER_IP: &str = "10.96.0.10";
/// In the Service range, but no Service's.
const NOT_A_CLUSTER_IP: &str = "10.96.0.11";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn namespace(name: &str) -> Namespace {
    Namespace {
        name: name.into(),
        labels: labels(&[("kubernetes.io/metadata.name", name)]),
    }
}

fn pod(namespace: &str, name: &str, workload: &str, app: &str, ip: &str) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip.parse().expect("test address")],
        host_network: false,
        node_name: None,
        phase: PodPhase::Running,
        uid: None,
        created_unix: 0,
        ports: vec![],
        workload: Workload {
            kind: "Deployment".into(),
            name: workload.into(),
        },
    }
}

fn policy(yaml: &str) -> Arc<NetworkPolicy> {
    Arc::new(serde_yaml::from_str(yaml).expect("test policy"))
}

/// prod/db and prod/web behind an ingress default deny that lets web reach db on 5432;
/// dev/client behind an egress default deny.
fn views() -> Views {
    let inv = Inventory {
        namespaces: ["prod", "dev"]
            .into_iter()
            .map(|n| (n.to_owned(), namespace(n)))
            .collect::<BTreeMap<_, _>>(),
        pods: vec![
            Arc::new(pod("prod", "db-0", "db", "db", DB)),
            Arc::new(pod("prod", "web-0", "web", "web", WEB)),
            Arc::new(pod("dev", "client-0", "client", "client", CLIENT)),
        ],
        policies: vec![
            policy(
                "metadata: {name: default-deny-ingress, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}",
            ),
            policy(
                "metadata: {name: allow-web-to-db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432, protocol: TCP}]",
            ),
            policy(
                "metadata: {name: deny-egress, namespace: dev}
spec: {podSelector: {}, policyTypes: [Egress]}",
            ),
        ],
        services: vec![Arc::new(Service {
            namespace: "prod".into(),
            name: "api".into(),
            cluster_ips: vec![CLUSTER_IP.parse().expect("test address")],
            external_ips: vec![],
            selector: None,
            ports: Vec::new(),
        })],
        ..Inventory::default()
    };
    views_of(inv)
}

/// Views of `inv` on the test node.
fn views_of(inv: Inventory) -> Views {
    Views::new(
        Arc::new(inv),
        NodeAddrs::new([NODE.parse::<IpAddr>().expect("node address")]),
    )
}

struct Reasons {
    netfilter: Arc<str>,
    no_socket: Arc<str>,
}

fn reasons() -> Reasons {
    Reasons {
        netfilter: Arc::from("netfilter_drop"),
        no_socket: Arc::from("no_socket"),
    }
}

fn flow(
    reason: &Arc<str>,
    src: Option<&str>,
    dst: Option<&str>,
    protocol: Protocol,
    port: u16,
    packets: u64,
) -> FlowDrop {
    FlowDrop {
        reason: Arc::clone(reason),
        src: src.map(|s| s.parse().expect("test address")),
        dst: dst.map(|s| s.parse().expect("test address")),
        protocol,
        dst_port: port,
        icmp: None,
        netns: 0,
        packets,
        bytes: packets * 100,
    }
}

fn report(drops: Vec<FlowDrop>) -> DrainReport {
    DrainReport {
        drops,
        ..DrainReport::default()
    }
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Attributes one drain made one second after the stage started.
fn attribute(events: bool, drops: Vec<FlowDrop>) -> Outcomes {
    let views = views();
    let mut core = Attribution::new(events, t0());
    core.attribute(&views, &report(drops), &[], t0() + Duration::from_secs(1));
    std::mem::take(&mut core.out)
}

fn labels_of(ep: Option<&Endpoint>) -> String {
    let (ns, wl) = endpoint_labels(ep);
    format!("{ns}/{wl}")
}

#[test]
fn egress_default_deny_is_a_drop_a_deny_an_edge_and_a_notice_on_the_source() {
    let r = reasons();
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(CLIENT),
            Some(DB),
            Protocol::Tcp,
            5432,
            3,
        )],
    );
    assert_eq!(out.drops.len(), 1);
    let d = &out.drops[0];
    assert_eq!(d.direction, Direction::Egress);
    assert_eq!((d.packets, d.bytes), (3, 300));
    assert_eq!(labels_of(d.src.as_ref()), "dev/client");
    assert_eq!(labels_of(d.dst.as_ref()), "prod/db");

    assert_eq!(out.denies.len(), 1);
    let deny = &out.denies[0];
    assert_eq!(deny.policy_match, PolicyMatch::DefaultDeny);
    assert_eq!(deny.direction, Direction::Egress);
    assert_eq!(&*deny.policy, "dev/deny-egress");
    assert_eq!(deny.packets, 3);

    assert_eq!(out.edges.len(), 1);
    let e = &out.edges[0];
    assert_eq!(
        (e.direction, e.protocol, e.port, e.packets),
        (Direction::Egress, Protocol::Tcp, 5432, 3)
    );
    assert_eq!(
        e.isolating_policies().collect::<Vec<_>>(),
        vec![("dev", "deny-egress")]
    );

    assert_eq!(out.notices.len(), 1);
    let n = &out.notices[0];
    assert_eq!(
        (n.pod.namespace.as_str(), n.pod.name.as_str()),
        ("dev", "client-0")
    );
    assert_eq!(labels_of(n.peer.as_ref()), "prod/db");
    assert_eq!(n.port, Some(5432));
    assert_eq!(n.packets, 3);
    assert_eq!(n.window, Duration::from_secs(1));
}

#[test]
fn a_drop_still_addressed_to_a_cluster_ip_is_the_service_and_no_policy_deny() {
    let r = reasons();
    // dev/client is egress-isolated and no rule allows 10.96.0.0/12: judged as an address,
    // the drop would be a default deny by dev/deny-egress. But the packet was never
    // translated to a backend (kube-proxy rejects a Service without endpoints that way), so
    // NetworkPolicy did not decide it.
    let out = attribute(
        true,
        vec![
            flow(
                &r.netfilter,
                Some(CLIENT),
                Some(CLUSTER_IP),
                Protocol::Tcp,
                80,
                4,
            ),
            flow(
                &r.netfilter,
                Some(CLIENT),
                Some(NOT_A_CLUSTER_IP),
                Protocol::Tcp,
                80,
                1,
            ),
        ],
    );
    let to_service = out
        .drops
        .iter()
        .find(|d| labels_of(d.dst.as_ref()) == "prod/service/api")
        .expect("a drop series to the Service");
    assert_eq!(to_service.direction, Direction::Unknown);
    assert_eq!(to_service.packets, 4);
    assert_eq!(labels_of(to_service.src.as_ref()), "dev/client");
    assert_eq!(
        to_service.dst.as_ref().map(Endpoint::workload_kind),
        Some("Service")
    );
    // Only the address that is no Service's is judged by the policies.
    assert_eq!(out.denies.len(), 1);
    assert_eq!(out.denies[0].packets, 1);
    assert_eq!(labels_of(out.denies[0].dst.as_ref()), "/private");
    assert_eq!(out.edges.len(), 1);
    assert_eq!(out.notices.len(), 1);
}

#[test]
fn ingress_default_deny_puts_the_notice_on_the_destination_with_the_peer_as_source() {
    let r = reasons();
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            5432,
            2,
        )],
    );
    assert_eq!(out.drops[0].direction, Direction::Ingress);
    assert_eq!(labels_of(out.drops[0].src.as_ref()), "/world");
    let deny = &out.denies[0];
    assert_eq!(
        &*deny.policy,
        "prod/allow-web-to-db,prod/default-deny-ingress"
    );
    let n = &out.notices[0];
    assert_eq!(n.pod.name, "db-0");
    assert_eq!(n.direction, Direction::Ingress);
    assert_eq!(n.peer, Some(Endpoint::World));
    let misses = &n.verdict.deciding_side().expect("denied").nearest_misses;
    assert!(!misses.is_empty(), "the web rule is a near miss");
}

#[test]
fn allowed_flow_dropped_by_a_filter_is_unexplained_with_no_policy_and_no_edge() {
    let r = reasons();
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(WEB),
            Some(DB),
            Protocol::Tcp,
            5432,
            4,
        )],
    );
    assert_eq!(out.drops[0].direction, Direction::Unknown);
    assert_eq!(out.denies.len(), 1);
    let deny = &out.denies[0];
    assert_eq!(deny.policy_match, PolicyMatch::Unexplained);
    assert_eq!(deny.direction, Direction::Unknown);
    assert_eq!(&*deny.policy, "");
    assert_eq!(deny.packets, 4);
    assert!(out.edges.is_empty());
    assert!(out.notices.is_empty());
}

#[test]
fn a_drop_between_a_pod_and_its_own_node_is_never_a_policy_deny() {
    // Kubernetes always allows a pod's traffic with its node (kubelet probes): prod/db's
    // ingress default deny cannot be what dropped a packet from this node's address.
    let r = reasons();
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(NODE),
            Some(DB),
            Protocol::Tcp,
            8080,
            3,
        )],
    );
    assert_eq!(labels_of(out.drops[0].src.as_ref()), "/node");
    assert_eq!(out.denies.len(), 1);
    assert_eq!(out.denies[0].policy_match, PolicyMatch::Unexplained);
    assert!(out.edges.is_empty(), "{:?}", out.edges);
    assert!(out.notices.is_empty());
    // The same packet from another address is the policy's deny.
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            8080,
            3,
        )],
    );
    assert_eq!(out.denies[0].policy_match, PolicyMatch::DefaultDeny);
}

#[test]
fn drops_for_other_reasons_count_as_drops_only() {
    let r = reasons();
    let out = attribute(
        true,
        vec![
            // Allowed by policy, dropped for lack of a socket.
            flow(&r.no_socket, Some(WEB), Some(DB), Protocol::Tcp, 5432, 1),
            // Denied by policy, yet dropped for another reason first: the direction still
            // says which side's policy would deny it.
            flow(&r.no_socket, Some(WORLD), Some(DB), Protocol::Tcp, 5432, 1),
        ],
    );
    assert_eq!(out.drops.len(), 2);
    let directions: Vec<_> = out.drops.iter().map(|d| d.direction).collect();
    assert_eq!(directions, vec![Direction::Unknown, Direction::Ingress]);
    assert!(out.denies.is_empty());
    assert!(out.edges.is_empty());
    assert!(out.notices.is_empty());
}

#[test]
fn flows_without_a_verdict_count_as_drops_only() {
    let r = reasons();
    let out = attribute(
        true,
        vec![
            // Not parsed down to IP.
            flow(&r.netfilter, None, None, Protocol::Other, 0, 1),
            // Destination unknown.
            flow(&r.netfilter, Some(CLIENT), None, Protocol::Tcp, 0, 1),
            // No pod at either end.
            flow(&r.netfilter, Some(NODE), Some(WORLD), Protocol::Tcp, 443, 1),
            // A protocol policies cannot name.
            flow(&r.netfilter, Some(CLIENT), Some(DB), Protocol::Other, 0, 1),
        ],
    );
    assert_eq!(out.drops.len(), 4);
    assert!(out.drops.iter().all(|d| d.direction == Direction::Unknown));
    let ends: Vec<_> = out
        .drops
        .iter()
        .map(|d| (labels_of(d.src.as_ref()), labels_of(d.dst.as_ref())))
        .collect();
    assert_eq!(ends[0], ("/unknown".to_owned(), "/unknown".to_owned()));
    assert_eq!(ends[1], ("dev/client".to_owned(), "/unknown".to_owned()));
    assert_eq!(ends[2], ("/node".to_owned(), "/world".to_owned()));
    assert!(out.denies.is_empty() && out.edges.is_empty() && out.notices.is_empty());
}

#[test]
fn portless_protocols_have_port_zero_on_the_edge_and_none_on_the_notice() {
    let r = reasons();
    let out = attribute(
        true,
        vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Icmp,
            0,
            1,
        )],
    );
    assert_eq!(out.edges[0].port, 0);
    assert_eq!(out.edges[0].protocol, Protocol::Icmp);
    assert_eq!(out.notices[0].port, None);
}

#[test]
fn an_icmp_error_or_reply_is_no_flow_of_its_own_to_judge() {
    // A destination unreachable, time exceeded, packet too big... answers a packet of another
    // flow (it quotes its header) and passes as part of that flow (conntrack RELATED), so it
    // is never a new flow towards the pod it answers. Judged as one, prod/db's ingress default
    // deny would be blamed, with a denied edge and an Event, for an error about some flow of
    // prod/db's own. An echo request is a flow of its own and is judged.
    let r = reasons();
    let icmp = |protocol, (t, c), src, dst| FlowDrop {
        icmp: Some((t, c)),
        ..flow(&r.netfilter, Some(src), Some(dst), protocol, 0, 2)
    };
    let v6_db = "fd00::10";
    let mut inv = (*views().inventory().as_ref()).clone();
    let mut db = (*inv.pods[0]).clone();
    db.ips.push(v6_db.parse().expect("test address"));
    inv.pods[0] = Arc::new(db);
    let views = views_of(inv);
    let errors = [
        icmp(Protocol::Icmp, (3, 3), WORLD, DB),
        icmp(Protocol::Icmp, (11, 0), WORLD, DB),
        icmp(Protocol::Icmpv6, (1, 4), "2606:4700::1111", v6_db),
        icmp(Protocol::Icmpv6, (2, 0), "2606:4700::1111", v6_db),
        // Replies answer a request of the pod's and are let through with it, like errors.
        icmp(Protocol::Icmp, (0, 0), WORLD, DB),
        icmp(Protocol::Icmpv6, (129, 0), "2606:4700::1111", v6_db),
    ];
    for error in errors {
        let mut core = Attribution::new(true, t0());
        let out = core.attribute(&views, &report(vec![error.clone()]), &[], t0());
        assert_eq!(out.drops.len(), 1, "{error:?}");
        assert_eq!(out.drops[0].direction, Direction::Unknown, "{error:?}");
        assert!(out.denies.is_empty(), "{error:?}: {:?}", out.denies);
        assert!(out.edges.is_empty() && out.notices.is_empty(), "{error:?}");
    }
    let echo = icmp(Protocol::Icmp, (8, 0), WORLD, DB);
    let mut core = Attribution::new(true, t0());
    let out = core.attribute(&views, &report(vec![echo]), &[], t0());
    assert_eq!(out.drops[0].direction, Direction::Ingress);
    assert_eq!(out.denies[0].policy_match, PolicyMatch::DefaultDeny);
    assert_eq!(out.edges.len(), 1);
}

#[test]
fn an_ipv4_mapped_outside_address_is_judged_as_the_ipv4_address() {
    // Attribution reads `::ffff:8.8.8.8` as 8.8.8.8 (world); an ipBlock must see it so too.
    let r = reasons();
    let mut inv = (*views().inventory().as_ref()).clone();
    inv.policies.push(policy(
        "metadata: {name: allow-resolver, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 8.8.8.0/24}}]",
    ));
    let views = views_of(inv);
    for src in [WORLD, "::ffff:8.8.8.8"] {
        let drop = flow(&r.netfilter, Some(src), Some(DB), Protocol::Tcp, 5432, 1);
        let mut core = Attribution::new(false, t0());
        let out = core.attribute(&views, &report(vec![drop]), &[], t0());
        assert_eq!(labels_of(out.drops[0].src.as_ref()), "/world", "{src}");
        assert_eq!(out.drops[0].direction, Direction::Unknown, "{src}");
        assert_eq!(
            out.denies[0].policy_match,
            PolicyMatch::Unexplained,
            "{src}"
        );
    }
}

#[test]
fn flows_of_one_label_set_are_summed_once_per_drain() {
    let r = reasons();
    let out = attribute(
        true,
        vec![
            flow(&r.netfilter, Some(WORLD), Some(DB), Protocol::Tcp, 5432, 1),
            flow(
                &r.netfilter,
                Some(WORLD_2),
                Some(DB),
                Protocol::Tcp,
                5432,
                10,
            ),
            // Another port: the same drop and deny series, another edge.
            flow(
                &r.netfilter,
                Some(WORLD),
                Some(DB),
                Protocol::Tcp,
                5433,
                100,
            ),
        ],
    );
    assert_eq!(out.drops.len(), 1);
    assert_eq!(out.drops[0].packets, 111);
    // Each verdict has its own policy label, so denies may split into groups of one label
    // set; the series map sums them again.
    assert!(
        out.denies
            .iter()
            .all(|d| *d.policy == *out.denies[0].policy)
    );
    assert_eq!(out.denies.iter().map(|d| d.packets).sum::<u64>(), 111);
    let edges: Vec<_> = out.edges.iter().map(|e| (e.port, e.packets)).collect();
    assert_eq!(edges, vec![(5432, 11), (5433, 100)]);
    let notices: Vec<_> = out.notices.iter().map(|n| (n.port, n.packets)).collect();
    assert_eq!(notices, vec![(Some(5432), 11), (Some(5433), 100)]);
}

#[test]
fn without_events_no_notice_is_made_but_edges_still_are() {
    let r = reasons();
    let out = attribute(
        false,
        vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            5432,
            1,
        )],
    );
    assert_eq!(out.edges.len(), 1);
    assert!(out.notices.is_empty());
}

#[test]
fn the_notice_window_is_the_time_since_the_previous_drain() {
    let r = reasons();
    let views = views();
    let mut core = Attribution::new(true, t0());
    let drain = || {
        report(vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            5432,
            1,
        )])
    };
    let out = core.attribute(&views, &drain(), &[], t0() + Duration::from_millis(250));
    assert_eq!(out.notices[0].window, Duration::from_millis(250));
    let out = core.attribute(&views, &drain(), &[], t0() + Duration::from_millis(2250));
    assert_eq!(out.notices[0].window, Duration::from_secs(2));
    // A clock stepped back gives an empty window, not a panic.
    let out = core.attribute(&views, &drain(), &[], t0());
    assert_eq!(out.notices[0].window, Duration::ZERO);
}

#[test]
fn a_sample_of_the_flow_gives_the_notice_its_first_packet() {
    let r = reasons();
    let views = views();
    let mut core = Attribution::new(true, t0());
    let denied = flow(&r.netfilter, Some(WORLD), Some(DB), Protocol::Tcp, 5432, 1);
    let other = flow(&r.netfilter, Some(WORLD), Some(DB), Protocol::Tcp, 5433, 1);
    let sample = Sample {
        drop: FlowDrop {
            netns: 4026531840,
            ..denied.clone()
        },
        ts_ns: 0,
        location: 0,
        ifindex: 7,
        src_port: 43122,
        tcp_flags: 0x02,
    };
    let out = core.attribute(&views, &report(vec![denied, other]), &[sample], t0());
    assert_eq!(
        out.notices[0].first_packet,
        Some(FirstPacket {
            src_port: 43122,
            ifindex: 7,
            netns: 4026531840
        })
    );
    assert_eq!(out.notices[1].first_packet, None, "no sample of that flow");
}

#[test]
fn kernel_counts_pass_through_and_the_next_drain_starts_empty() {
    let r = reasons();
    let views = views();
    let mut core = Attribution::new(true, t0());
    let first = DrainReport {
        drops: vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            5432,
            1,
        )],
        reason_totals: vec![(Arc::clone(&r.netfilter), 5, 500)],
        losses: Losses {
            ringbuf_full: 2,
            ..Losses::default()
        },
        flow_map_entries: 9,
        flow_map_capacity: 64,
    };
    let out = core.attribute(&views, &first, &[], t0());
    assert_eq!(
        out.kernel.reason_totals,
        vec![(Arc::clone(&r.netfilter), 5, 500)]
    );
    assert_eq!(out.kernel.losses.ringbuf_full, 2);
    assert_eq!(
        (out.kernel.flow_map_entries, out.kernel.flow_map_capacity),
        (9, 64)
    );
    let out = core.attribute(&views, &DrainReport::default(), &[], t0());
    assert!(out.drops.is_empty() && out.denies.is_empty() && out.edges.is_empty());
    assert!(out.notices.is_empty() && out.kernel.reason_totals.is_empty());
    assert_eq!(out.kernel.losses, Losses::default());
}

#[test]
fn workload_kind_is_found_while_the_workload_has_pods() {
    let views = views();
    assert_eq!(views.workload_kind("prod", "db"), Some("Deployment"));
    assert_eq!(views.workload_kind("prod", "gone"), None);
}

#[test]
fn grouping_capacity_of_a_burst_is_given_back_when_drains_are_small_again() {
    let r = reasons();
    let views = views();
    let mut core = Attribution::new(false, t0());
    // 20,000 distinct label sets: unparsed flows of as many reasons.
    let burst: Vec<Arc<str>> = (0..20_000).map(|i| Arc::from(format!("r{i}"))).collect();
    let flows = burst
        .iter()
        .map(|reason| flow(reason, None, None, Protocol::Other, 0, 1))
        .collect();
    core.attribute(&views, &report(flows), &[], t0());
    assert_eq!(core.outcomes().drops.len(), 20_000);
    let grown = core.drop_index.capacity();
    assert!(grown >= 20_000);
    let small = || {
        report(vec![flow(
            &r.netfilter,
            Some(WORLD),
            Some(DB),
            Protocol::Tcp,
            5432,
            1,
        )])
    };
    core.attribute(&views, &small(), &[], t0());
    // The first small drain still saw the burst's sizes; the next gives the room back.
    core.attribute(&views, &small(), &[], t0());
    assert!(
        core.drop_index.capacity() <= SPARE_CAPACITY,
        "{}",
        core.drop_index.capacity()
    );
    assert!(core.outcomes().drops.capacity() <= SPARE_CAPACITY);
    assert_eq!(core.outcomes().drops.len(), 1);
}

#[test]
fn a_run_of_flows_from_one_address_pair_is_attributed_like_each_alone_and_anew_each_drain() {
    let r = reasons();
    let before = views();
    let mut core = Attribution::new(false, t0());
    // Web to db on three ports: the same addresses in a row, one allowed, two denied.
    let run = || {
        [5432, 80, 81]
            .into_iter()
            .map(|port| flow(&r.netfilter, Some(WEB), Some(DB), Protocol::Tcp, port, 1))
            .collect::<Vec<_>>()
    };
    let out = core.attribute(&before, &report(run()), &[], t0() + Duration::from_secs(1));
    assert_eq!(out.edges.len(), 2, "{:?}", out.edges);
    assert!(
        out.drops
            .iter()
            .all(|d| labels_of(d.src.as_ref()) == "prod/web"
                && labels_of(d.dst.as_ref()) == "prod/db")
    );
    // The db pod is gone in the next inventory: its address is nobody's now, and the next
    // drain must not reuse the endpoints looked up in the previous one.
    let mut inv = (**before.inventory()).clone();
    inv.pods.retain(|p| p.name != "db-0");
    let after = views_of(inv);
    let out = core.attribute(&after, &report(run()), &[], t0() + Duration::from_secs(2));
    assert!(out.edges.is_empty(), "{:?}", out.edges);
    assert!(
        out.drops
            .iter()
            .all(|d| labels_of(d.dst.as_ref()) != "prod/db"),
        "{:?}",
        out.drops
    );
    assert_eq!(out.drops.iter().map(|d| d.packets).sum::<u64>(), 3);
}

mod topology;
