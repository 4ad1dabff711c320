//! Attribution across cluster topologies: peers on other nodes, host-network pods sharing a
//! node's address, Services, reused and pending pod addresses, link-local addresses.

use super::*;

/// This node's name and address.
const NODE_A: &str = "node-a";
const NODE_A_IP: &str = "192.168.1.1";
/// Another node, known only through the host-network pods it runs.
const NODE_B: &str = "node-b";
const NODE_B_IP: &str = "192.168.1.2";
const FRONTEND_A: &str = "10.0.1.10";
const API_B: &str = "10.0.2.10";
const REUSED: &str = "10.0.1.20";
const KUBE_DNS: &str = "10.96.0.10";
const NODE_LOCAL_DNS: &str = "169.254.20.10";
const METADATA: &str = "169.254.169.254";
/// shop/storefront's `status.loadBalancer.ingress` IP and `spec.externalIPs` entry.
const LB_IP: &str = "34.120.0.5";
const EXTERNAL_IP: &str = "192.168.50.5";

fn on(mut p: Pod, node: &str) -> Pod {
    p.node_name = Some(node.into());
    p
}

fn host_pod(ns: &str, name: &str, node: &str, ip: &str) -> Pod {
    let mut p = on(pod(ns, name, name, name, ip), node);
    p.host_network = true;
    p.workload.kind = "DaemonSet".into();
    p
}

/// shop/frontend on this node, pay/api on node-b; both namespaces deny everything but what
/// their policies allow: shop may send to pay on 8080, pay accepts nothing.
fn topology(extra_pods: Vec<Pod>, node_ips: &[&str]) -> Views {
    let mut pods = vec![
        on(
            pod("shop", "frontend-a", "frontend", "frontend", FRONTEND_A),
            NODE_A,
        ),
        on(pod("pay", "api-b", "api", "api", API_B), NODE_B),
        host_pod("kube-system", "kube-proxy-a", NODE_A, NODE_A_IP),
        host_pod("kube-system", "kube-proxy-b", NODE_B, NODE_B_IP),
        host_pod("kube-system", "node-exporter-b", NODE_B, NODE_B_IP),
    ];
    pods.extend(extra_pods);
    let inv = Inventory {
        namespaces: ["shop", "pay", "kube-system"]
            .into_iter()
            .map(|n| (n.to_owned(), namespace(n)))
            .collect(),
        pods: pods.into_iter().map(Arc::new).collect(),
        policies: vec![
            policy(
                "metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
            ),
            policy(
                "metadata: {name: to-pay, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: pay}}}]
    ports: [{port: 8080}]
  - to: [{ipBlock: {cidr: 169.254.0.0/16, except: [169.254.169.254/32]}}]",
            ),
            policy(
                "metadata: {name: default-deny, namespace: pay}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
            ),
        ],
        services: vec![
            Arc::new(Service {
                namespace: "kube-system".into(),
                name: "kube-dns".into(),
                cluster_ips: vec![KUBE_DNS.parse().expect("test address")],
                external_ips: vec![],
                selector: None,
                ports: Vec::new(),
            }),
            Arc::new(Service {
                namespace: "shop".into(),
                name: "storefront".into(),
                cluster_ips: vec!["10.96.0.80".parse().expect("test address")],
                // Bare-metal clusters often list the nodes' own addresses as externalIPs:
                // there the Service has its ports, the node everything else.
                external_ips: vec![
                    LB_IP.parse().expect("test address"),
                    EXTERNAL_IP.parse().expect("test address"),
                    NODE_A_IP.parse().expect("test address"),
                    NODE_B_IP.parse().expect("test address"),
                ],
                selector: None,
                ports: Vec::new(),
            }),
        ],
        ..Inventory::default()
    };
    let mut node = NodeAddrs::new(
        node_ips
            .iter()
            .map(|s| s.parse::<IpAddr>().expect("test address")),
    )
    .with_node_name(NODE_A);
    node.insert(NODE_A_IP.parse().expect("test address"));
    Views::new(Arc::new(inv), node)
}

fn run(views: &Views, drops: Vec<FlowDrop>) -> Outcomes {
    let mut core = Attribution::new(true, t0());
    core.attribute(views, &report(drops), &[], t0() + Duration::from_secs(1));
    std::mem::take(&mut core.out)
}

fn tcp(src: &str, dst: &str, port: u16) -> FlowDrop {
    flow(
        &reasons().netfilter,
        Some(src),
        Some(dst),
        Protocol::Tcp,
        port,
        1,
    )
}

#[test]
fn egress_to_a_pod_on_another_node_is_judged_at_that_pods_ingress() {
    let views = topology(vec![], &[]);
    let out = run(&views, vec![tcp(FRONTEND_A, API_B, 8080)]);
    assert_eq!(labels_of(out.drops[0].dst.as_ref()), "pay/api");
    assert_eq!(out.denies[0].direction, Direction::Ingress);
    assert_eq!(&*out.denies[0].policy, "pay/default-deny");
    assert_eq!(out.notices[0].pod.name, "api-b");
}

#[test]
fn ingress_from_a_pod_on_another_node_is_decided_by_this_nodes_pod() {
    // Both sides deny: pay/api's egress (enforced on node-b) and shop/frontend's ingress. The
    // packet reached this node, so what dropped it here is shop/frontend's ingress.
    let views = topology(vec![], &[]);
    let out = run(&views, vec![tcp(API_B, FRONTEND_A, 80)]);
    assert_eq!(out.denies.len(), 1);
    assert_eq!(
        out.denies[0].direction,
        Direction::Ingress,
        "{:?}",
        out.denies
    );
    assert_eq!(&*out.denies[0].policy, "shop/default-deny");
    assert_eq!(out.drops[0].direction, Direction::Ingress);
    assert_eq!(out.notices[0].pod.name, "frontend-a");
    assert_eq!(out.notices[0].direction, Direction::Ingress);
    assert_eq!(
        out.edges[0].isolating_policies().collect::<Vec<_>>(),
        vec![("shop", "default-deny")]
    );
}

#[test]
fn another_nodes_address_is_host_and_never_one_of_its_host_network_pods() {
    let views = topology(vec![], &[]);
    assert_eq!(
        views.drop_endpoint(NODE_B_IP.parse().unwrap()),
        Endpoint::Host
    );
    assert_eq!(
        views.drop_endpoint(NODE_A_IP.parse().unwrap()),
        Endpoint::Node
    );
    let out = run(&views, vec![tcp(NODE_B_IP, FRONTEND_A, 80)]);
    assert_eq!(labels_of(out.drops[0].src.as_ref()), "/host");
    assert_eq!(out.denies[0].policy_match, PolicyMatch::DefaultDeny);
    assert_eq!(out.notices[0].peer, Some(Endpoint::Host));
    // This node's address, shared by kube-proxy-a: kubelet probes always pass.
    let out = run(&views, vec![tcp(NODE_A_IP, FRONTEND_A, 80)]);
    assert_eq!(labels_of(out.drops[0].src.as_ref()), "/node");
    assert_eq!(out.denies[0].policy_match, PolicyMatch::Unexplained);
}

#[test]
fn a_cluster_ip_bound_on_a_node_interface_is_still_the_service() {
    // kube-proxy in IPVS mode binds every ClusterIP to kube-ipvs0 and NodeLocal DNSCache
    // binds kube-dns's ClusterIP to its dummy interface: the node's address list has it.
    let views = topology(vec![], &[KUBE_DNS]);
    let out = run(&views, vec![tcp(FRONTEND_A, KUBE_DNS, 53)]);
    assert_eq!(
        labels_of(out.drops[0].dst.as_ref()),
        "kube-system/service/kube-dns"
    );
    assert!(out.denies.is_empty(), "{:?}", out.denies);
}

#[test]
fn link_local_dns_and_metadata_are_private_and_judged_by_ip_block_except() {
    let views = topology(vec![], &[]);
    let out = run(
        &views,
        vec![
            tcp(FRONTEND_A, NODE_LOCAL_DNS, 53),
            tcp(FRONTEND_A, METADATA, 80),
        ],
    );
    // 169.254.20.10 is allowed by the ipBlock: a drop of it is unexplained.
    let dns = out
        .denies
        .iter()
        .find(|d| d.policy_match == PolicyMatch::Unexplained);
    assert!(dns.is_some(), "{:?}", out.denies);
    let meta = out
        .denies
        .iter()
        .find(|d| d.policy_match == PolicyMatch::DefaultDeny);
    assert_eq!(
        labels_of(meta.expect("metadata denied").dst.as_ref()),
        "/private"
    );
    assert_eq!(out.notices[0].port, Some(80));
}

#[test]
fn a_reused_address_is_the_running_pod_and_same_names_stay_apart() {
    let mut done = on(pod("shop", "job-x", "job", "job", REUSED), NODE_A);
    done.phase = PodPhase::Terminated;
    done.created_unix = 10;
    let mut live = on(pod("pay", "frontend-a", "worker", "worker", REUSED), NODE_A);
    live.created_unix = 5;
    let mut pending = on(
        pod("pay", "pending", "pending", "pending", "10.0.1.99"),
        NODE_A,
    );
    pending.ips.clear();
    pending.phase = PodPhase::Pending;
    let views = topology(vec![done, live, pending], &[]);
    let out = run(&views, vec![tcp(REUSED, FRONTEND_A, 80)]);
    assert_eq!(labels_of(out.drops[0].src.as_ref()), "pay/worker");
    // Both pods are here: pay's egress default deny decides, on pay/frontend-a, not on the
    // shop pod of the same name.
    let n = &out.notices[0];
    assert_eq!(
        (n.pod.namespace.as_str(), n.pod.name.as_str()),
        ("pay", "frontend-a")
    );
    assert_eq!(n.direction, Direction::Egress);
    assert_eq!(labels_of(n.peer.as_ref()), "shop/frontend");
    assert_eq!(
        views.drop_endpoint("10.0.1.99".parse().unwrap()),
        Endpoint::Private
    );
}

#[test]
fn a_drop_to_a_load_balancer_or_external_ip_is_the_service_not_world() {
    // kube-proxy drops traffic to a LoadBalancer IP or an external IP when the Service has no
    // endpoint (on this node, with externalTrafficPolicy: Local) before any translation.
    let views = topology(vec![], &[]);
    let out = run(
        &views,
        vec![tcp("8.8.8.8", LB_IP, 443), tcp(FRONTEND_A, EXTERNAL_IP, 80)],
    );
    let dsts: Vec<String> = out
        .drops
        .iter()
        .map(|d| labels_of(d.dst.as_ref()))
        .collect();
    assert_eq!(dsts, ["shop/service/storefront", "shop/service/storefront"]);
    assert!(out.denies.is_empty(), "{:?}", out.denies);
}

#[test]
fn an_external_ip_that_is_a_node_address_stays_the_node() {
    let views = topology(vec![], &[]);
    let out = run(
        &views,
        vec![
            tcp(FRONTEND_A, NODE_A_IP, 10250),
            tcp(FRONTEND_A, NODE_B_IP, 22),
            tcp(FRONTEND_A, EXTERNAL_IP, 80),
        ],
    );
    let dsts: Vec<String> = out
        .drops
        .iter()
        .map(|d| labels_of(d.dst.as_ref()))
        .collect();
    assert_eq!(dsts, ["/node", "/host", "shop/service/storefront"]);
    // Connections dialled to a node address are the node's, not the Service's.
    for ip in [NODE_A_IP, NODE_B_IP] {
        let ip = ip.parse().expect("test address");
        assert!(views.service(ip).is_none(), "{ip}");
    }
    let lb = LB_IP.parse().expect("test address");
    assert_eq!(
        views.service(lb).map(|s| s.name.as_str()),
        Some("storefront")
    );
}
