//! One test per semantic rule of NetworkPolicy v1.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;
use crate::inventory::{ContainerPort, Inventory, Namespace, Pod, PodDelta, PodPhase, Workload};

fn ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
    let mut l: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    l.insert("kubernetes.io/metadata.name", name);
    Namespace {
        name: name.into(),
        labels: l,
    }
}

fn pod(id: &str, labels: &[(&str, &str)], ip: &str) -> Pod {
    let (namespace, name) = id.split_once('/').unwrap();
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ips: ip.split(',').map(|s| s.parse().unwrap()).collect(),
        host_network: false,
        node_name: None,
        phase: PodPhase::Running,
        uid: None,
        created_unix: 0,
        ports: vec![],
        workload: Workload {
            kind: "Pod".into(),
            name: name.into(),
        },
    }
}

fn with_port(mut p: Pod, name: &str, port: u16, protocol: Protocol) -> Pod {
    p.ports.push(ContainerPort {
        name: Some(name.into()),
        port,
        protocol,
    });
    p
}

fn policy(yaml: &str) -> Arc<NetworkPolicy> {
    Arc::new(serde_yaml::from_str(yaml).unwrap())
}

struct World {
    engine: Engine,
}

impl World {
    fn new(namespaces: Vec<Namespace>, pods: Vec<Pod>, policies: &[&str]) -> World {
        let inv = Inventory {
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect::<BTreeMap<_, _>>(),
            pods: pods.into_iter().map(Arc::new).collect(),
            policies: policies.iter().map(|y| policy(y)).collect(),
            ..Inventory::default()
        };
        World {
            engine: Engine::new(Arc::new(inv)),
        }
    }

    fn peer(&self, s: &str) -> Peer {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Peer::External(ip);
        }
        let (ns, name) = s.split_once('/').unwrap();
        Peer::Pod(Arc::clone(self.engine.find_pod(ns, name).unwrap()))
    }

    fn eval(&self, from: &str, to: &str, protocol: Protocol, port: u16) -> Verdict {
        self.engine.evaluate(&FlowQuery {
            src: self.peer(from),
            dst: self.peer(to),
            protocol,
            port,
            family: None,
            own_node: false,
            src_remote: false,
        })
    }

    fn tcp(&self, from: &str, to: &str, port: u16) -> Verdict {
        self.eval(from, to, Protocol::Tcp, port)
    }
}

/// Two namespaces `a` (team=red) and `b` (team=blue), pods web/db in a, client in b.
fn basic(policies: &[&str]) -> World {
    World::new(
        vec![ns("a", &[("team", "red")]), ns("b", &[("team", "blue")])],
        vec![
            pod("a/web", &[("app", "web")], "10.0.0.1"),
            with_port(
                pod("a/db", &[("app", "db")], "10.0.0.2"),
                "pg",
                5432,
                Protocol::Tcp,
            ),
            pod("b/client", &[("app", "web")], "10.0.1.1"),
        ],
        policies,
    )
}

const DENY_INGRESS_A: &str = "
metadata: {name: deny, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress]}";

#[test]
fn no_policy_allows_and_nothing_is_isolated() {
    let w = basic(&[]);
    let v = w.tcp("a/web", "a/db", 5432);
    assert!(v.allowed);
    assert_eq!(v.direction, None);
    assert!(!v.egress.isolated && !v.ingress.isolated);
    assert_eq!(v.policy_label(), "");
}

#[test]
fn empty_ingress_list_denies_but_empty_rule_allows_everything() {
    let deny = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {}, ingress: []}"]);
    let v = deny.tcp("b/client", "a/db", 5432);
    assert!(!v.allowed);
    assert_eq!(v.direction, Some(Direction::Ingress));
    assert_eq!(v.ingress.isolating_policies, vec!["a/p".to_owned()]);

    let allow = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {}, ingress: [{}]}"]);
    let v = allow.tcp("b/client", "a/db", 5432);
    assert!(v.allowed);
    assert!(v.ingress.isolated);
    assert_eq!(v.ingress.allowed_by, vec!["a/p".to_owned()]);
    // Also any protocol and external sources.
    assert!(allow.eval("192.0.2.1", "a/db", Protocol::Udp, 53).allowed);
    assert!(allow.eval("192.0.2.1", "a/db", Protocol::Icmp, 0).allowed);
}

#[test]
fn policy_types_defaulting() {
    // No policyTypes, egress rules present: isolates both directions.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{ports: [{port: 53, protocol: UDP}]}]"]);
    let v = w.tcp("a/web", "a/db", 5432);
    assert_eq!(v.direction, Some(Direction::Egress));
    assert!(w.eval("a/web", "a/db", Protocol::Udp, 53).allowed);
    let v = w.tcp("b/client", "a/web", 80);
    assert_eq!(
        v.direction,
        Some(Direction::Ingress),
        "Ingress is always implied"
    );

    // No policyTypes, `egress: []`: only Ingress (an empty list is no rule).
    let w = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {matchLabels: {app: web}}, egress: [], ingress: [{}]}"]);
    let v = w.tcp("a/web", "b/client", 80);
    assert!(v.allowed);
    assert!(!v.egress.isolated);

    // Explicit Egress only: ingress is not isolated even though `ingress` is absent.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {}, policyTypes: [Egress]}"]);
    assert!(w.tcp("b/client", "a/web", 80).allowed);
    assert_eq!(
        w.tcp("a/web", "b/client", 80).direction,
        Some(Direction::Egress)
    );
}

#[test]
fn pod_selector_peer_is_limited_to_the_policy_namespace() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]"]);
    assert!(w.tcp("a/web", "a/db", 5432).allowed);
    // b/client also has app=web but lives in another namespace.
    let v = w.tcp("b/client", "a/db", 5432);
    assert!(!v.allowed);
    assert_eq!(v.ingress.nearest_misses.len(), 1);
    assert_eq!(v.ingress.nearest_misses[0].miss, MissKind::Peer);
    assert_eq!(
        v.ingress.nearest_misses[0].description,
        "a/p allows all traffic only from pods with app=web in namespace a"
    );
}

#[test]
fn a_named_port_over_another_protocol_is_called_that_in_the_nearest_miss() {
    let w = World::new(
        vec![ns("a", &[])],
        vec![
            pod("a/client", &[("app", "client")], "10.0.0.1"),
            with_port(
                pod("a/dns", &[("app", "dns")], "10.0.0.2"),
                "dns",
                53,
                Protocol::Udp,
            ),
        ],
        &["
metadata: {name: allow-dns, namespace: a}
spec:
  podSelector: {matchLabels: {app: dns}}
  ingress: [{ports: [{port: dns, protocol: TCP}]}]"],
    );
    let v = w.tcp("a/client", "a/dns", 53);
    assert!(!v.allowed);
    let d = &v.ingress.nearest_misses[0].description;
    assert!(d.contains("on a/dns the port dns is UDP, not TCP"), "{d}");
}

#[test]
fn namespace_selector_alone_selects_all_pods_of_matching_namespaces() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]"]);
    assert!(w.tcp("b/client", "a/db", 5432).allowed);
    assert!(!w.tcp("a/web", "a/db", 5432).allowed);
}

#[test]
fn combined_selectors_are_and_separate_peers_are_or() {
    let and = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {app: db}}}]"]);
    assert!(
        !and.tcp("b/client", "a/db", 1).allowed,
        "pod label does not match"
    );
    let or = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}, {podSelector: {matchLabels: {app: db}}}]"]);
    assert!(or.tcp("b/client", "a/web", 1).allowed);
    assert!(or.tcp("a/db", "a/web", 1).allowed);
    assert!(!or.tcp("a/web", "a/db", 1).allowed);
}

#[test]
fn empty_selectors_in_peers() {
    // Empty podSelector: every pod of the policy's namespace.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}"]);
    assert!(w.tcp("a/web", "a/db", 1).allowed);
    assert!(!w.tcp("b/client", "a/db", 1).allowed);
    // Empty namespaceSelector: every pod of every namespace, but no external address.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}"]);
    assert!(w.tcp("b/client", "a/db", 1).allowed);
    assert!(!w.tcp("192.0.2.1", "a/db", 1).allowed);
}

#[test]
fn match_expressions_in_policy_and_peer_selectors() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [db, cache]}]}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [red]}]}
      podSelector: {matchExpressions: [{key: app, operator: Exists}, {key: legacy, operator: DoesNotExist}]}"]);
    assert!(w.tcp("b/client", "a/db", 1).allowed);
    assert!(!w.tcp("a/web", "a/db", 1).allowed);
    // a/web is not selected (app=web not in (db,cache)).
    assert!(!w.tcp("b/client", "a/web", 1).ingress.isolated);
}

#[test]
fn ip_block_with_except_v4_and_v6_and_external_peers() {
    let w = World::new(
        vec![ns("a", &[])],
        vec![pod("a/srv", &[("app", "srv")], "10.0.0.1,fd00::1")],
        &["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from:
    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}
    - ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}
    - podSelector: {}"],
    );
    assert!(w.tcp("192.0.2.1", "a/srv", 80).allowed);
    assert!(!w.tcp("192.0.2.200", "a/srv", 80).allowed);
    assert!(w.tcp("2001:db8:2::1", "a/srv", 80).allowed);
    assert!(!w.tcp("2001:db8:1::1", "a/srv", 80).allowed);
    assert!(
        !w.tcp("198.51.100.1", "a/srv", 80).allowed,
        "pod selectors never match addresses"
    );
}

#[test]
fn ip_block_also_matches_pod_addresses() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}]}]"]);
    assert!(!w.tcp("a/web", "a/db", 5432).allowed);
    assert!(w.tcp("a/web", "10.0.0.9", 80).allowed);
    assert!(!w.tcp("a/web", "b/client", 80).allowed);
}

#[test]
fn ip_block_judges_a_dual_stack_pod_by_the_packets_address_family() {
    let w = World::new(
        vec![ns("a", &[])],
        vec![
            pod("a/client", &[("app", "client")], "10.0.0.1,fd00::1"),
            pod("a/web", &[("app", "web")], "10.0.0.2,fd00::2"),
        ],
        &["
metadata: {name: v6-only, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 'fd00::/64'}}]}]"],
    );
    let q = |family| FlowQuery {
        src: w.peer("a/client"),
        dst: w.peer("a/web"),
        protocol: Protocol::Tcp,
        port: 80,
        family,
        own_node: false,
        src_remote: false,
    };
    // An IPv4 packet comes from 10.0.0.1, which the IPv6 block does not hold.
    assert!(!w.engine.evaluate(&q(Some(IpFamily::V4))).allowed);
    assert!(w.engine.evaluate(&q(Some(IpFamily::V6))).allowed);
    // Named by pods, with no packet to say which: either address may match.
    assert!(w.engine.evaluate(&q(None)).allowed);
    // The cache keeps the two families apart.
    let cache = VerdictCache::new(100);
    assert!(
        cache
            .get_or_evaluate(&w.engine, &q(Some(IpFamily::V6)))
            .allowed
    );
    assert!(
        !cache
            .get_or_evaluate(&w.engine, &q(Some(IpFamily::V4)))
            .allowed
    );
}

#[test]
fn numeric_ports_end_port_and_protocols() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: 5432}, {port: 8000, endPort: 8080}, {protocol: UDP, port: 53}, {protocol: SCTP}]"]);
    assert!(w.tcp("b/client", "a/db", 5432).allowed);
    assert!(w.tcp("b/client", "a/db", 8000).allowed);
    assert!(w.tcp("b/client", "a/db", 8080).allowed);
    assert!(!w.tcp("b/client", "a/db", 8081).allowed);
    assert!(!w.tcp("b/client", "a/db", 53).allowed, "TCP is not UDP");
    assert!(w.eval("b/client", "a/db", Protocol::Udp, 53).allowed);
    assert!(
        !w.eval("b/client", "a/db", Protocol::Udp, 5432).allowed,
        "TCP is the default"
    );
    assert!(w.eval("b/client", "a/db", Protocol::Sctp, 9).allowed);
    assert!(!w.eval("b/client", "a/db", Protocol::Icmp, 0).allowed);
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    // The policy selects the client for egress; "pg" is a port of the destination db.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{ports: [{port: pg}]}]"]);
    assert!(w.tcp("a/web", "a/db", 5432).allowed);
    assert!(!w.tcp("a/web", "a/db", 5433).allowed);
    assert!(
        !w.tcp("a/web", "b/client", 5432).allowed,
        "b/client has no port named pg"
    );
    assert!(
        !w.tcp("a/web", "192.0.2.1", 5432).allowed,
        "external peers have no names"
    );
    // Wrong protocol: pg is a TCP port.
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{ports: [{port: pg, protocol: UDP}]}]"]);
    assert!(!w.eval("b/client", "a/db", Protocol::Udp, 5432).allowed);
    assert!(!w.tcp("b/client", "a/db", 5432).allowed);
}

#[test]
fn policies_combine_as_a_union() {
    let w = basic(&[
        "
metadata: {name: only-web, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]",
        "
metadata: {name: only-blue, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
    ]);
    let v = w.tcp("b/client", "a/db", 1);
    assert!(v.allowed);
    assert_eq!(
        v.ingress.isolating_policies,
        vec!["a/only-blue", "a/only-web"]
    );
    assert_eq!(v.ingress.allowed_by, vec!["a/only-blue"]);
    assert!(w.tcp("a/web", "a/db", 1).allowed);
}

#[test]
fn host_network_pods_are_not_subject_and_only_ip_blocks_see_them() {
    let mut host = pod("a/node-agent", &[("app", "web")], "172.16.0.5");
    host.host_network = true;
    let w = World::new(
        vec![ns("a", &[]), ns("b", &[])],
        vec![host, pod("b/srv", &[("app", "srv")], "10.0.1.1")],
        &[
            "
metadata: {name: deny-all, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
            "
metadata: {name: from-web, namespace: b}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]}]",
        ],
    );
    // Egress from the host-network pod: its policy does not apply.
    let v = w.tcp("a/node-agent", "b/srv", 80);
    assert!(!v.egress.isolated);
    // Ingress at b/srv: the selector-based rule does not see the host-network pod.
    assert_eq!(v.direction, Some(Direction::Ingress));
    let w2 = World::new(
        vec![ns("a", &[]), ns("b", &[])],
        vec![
            {
                let mut h = pod("a/node-agent", &[("app", "web")], "172.16.0.5");
                h.host_network = true;
                h
            },
            pod("b/srv", &[("app", "srv")], "10.0.1.1"),
        ],
        &["
metadata: {name: from-nodes, namespace: b}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/16}}]}]"],
    );
    assert!(w2.tcp("a/node-agent", "b/srv", 80).allowed);
    // Ingress into a host-network pod is never isolated.
    assert!(!w.tcp("b/srv", "a/node-agent", 80).ingress.isolated);
}

#[test]
fn egress_decides_first_and_both_sides_are_reported() {
    let w = basic(&[
        "
metadata: {name: deny-egress, namespace: b}
spec: {podSelector: {}, policyTypes: [Egress]}",
        DENY_INGRESS_A,
    ]);
    let v = w.tcp("b/client", "a/db", 5432);
    assert!(!v.allowed);
    assert_eq!(v.direction, Some(Direction::Egress));
    assert_eq!(v.policy_label(), "b/deny-egress");
    assert!(!v.ingress.allows());
    assert_eq!(v.ingress.isolating_policies, vec!["a/deny"]);
}

#[test]
fn policy_label_is_bounded() {
    let yamls: Vec<String> = (0..7)
        .map(|i| {
            format!(
                "metadata: {{name: p{i}, namespace: a}}\nspec: {{podSelector: {{}}, ingress: []}}"
            )
        })
        .collect();
    let refs: Vec<&str> = yamls.iter().map(String::as_str).collect();
    let w = basic(&refs);
    let v = w.tcp("b/client", "a/db", 1);
    assert_eq!(v.ingress.isolating_policies.len(), 7);
    assert_eq!(v.policy_label(), "a/p0,a/p1,a/p2,a/p3,a/p4,+2 more");
}

#[test]
fn nearest_misses_name_port_and_peer_misses_in_words() {
    let w = basic(&["
metadata: {name: allow-web-to-db, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{protocol: TCP, port: 5432}]"]);
    let v = w.tcp("a/web", "a/db", 5433);
    assert_eq!(v.direction, Some(Direction::Ingress));
    let m = &v.ingress.nearest_misses;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].miss, MissKind::Port);
    assert_eq!(
        m[0].description,
        "a/allow-web-to-db allows TCP/5432 only from pods with app=web in namespace a"
    );
    let v = w.tcp("b/client", "a/db", 5432);
    assert_eq!(v.ingress.nearest_misses[0].miss, MissKind::Peer);
    // Neither port nor peer: not a near miss.
    let v = w.tcp("b/client", "a/db", 1);
    assert!(v.ingress.nearest_misses.is_empty());
    // An allowed flow carries no misses.
    assert!(
        w.tcp("a/web", "a/db", 5432)
            .ingress
            .nearest_misses
            .is_empty()
    );
}

#[test]
fn index_finds_policies_by_expression_and_respects_namespaces() {
    let w = basic(&[
        "
metadata: {name: in-expr, namespace: a}
spec: {podSelector: {matchExpressions: [{key: app, operator: In, values: [db, db, web]}]}}",
        "
metadata: {name: notin, namespace: a}
spec: {podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}",
        "
metadata: {name: other-ns, namespace: b}
spec: {podSelector: {matchLabels: {app: db}}}",
    ]);
    let db = w.engine.find_pod("a", "db").unwrap();
    assert_eq!(
        w.engine.isolating_policies(db, Direction::Ingress),
        vec!["a/in-expr", "a/notin"]
    );
    let web = w.engine.find_pod("a", "web").unwrap();
    assert_eq!(
        w.engine.isolating_policies(web, Direction::Ingress),
        vec!["a/in-expr"]
    );
    assert_eq!(w.engine.policies_selecting_no_pod(), vec!["b/other-ns"]);
}

#[test]
fn invalid_parts_match_nothing_and_warn() {
    let w = basic(&["
metadata: {name: bad, namespace: a}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: not-a-cidr}}, {}]
  - ports: [{port: 70000}]"]);
    assert!(!w.tcp("192.0.2.1", "a/db", 80).allowed);
    assert!(!w.tcp("b/client", "a/db", 4464).allowed);
    assert_eq!(w.engine.warnings().len(), 3, "{:?}", w.engine.warnings());
    assert!(w.engine.warnings()[0].contains("a/bad"));
}

/// a/db behind an ingress default deny that lets anyone reach it on TCP 5432.
const ALLOW_PG: &str = "
metadata: {name: allow-pg, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress: [{ports: [{port: 5432, protocol: TCP}]}]";

/// A TCP flow from b/client to a/db on `port`.
fn client_to_db(w: &World, port: u16) -> FlowQuery {
    FlowQuery {
        src: w.peer("b/client"),
        dst: w.peer("a/db"),
        protocol: Protocol::Tcp,
        port,
        family: None,
        own_node: false,
        src_remote: false,
    }
}

#[test]
fn cache_keeps_one_verdict_per_port_of_a_pair_and_forgets_them_with_the_pod() {
    let w = basic(&[DENY_INGRESS_A, ALLOW_PG]);
    let cache = VerdictCache::new(100);
    let q = |port| client_to_db(&w, port);
    // Alternating ports of one pair: each keeps its own verdict.
    for _ in 0..2 {
        assert!(cache.get_or_evaluate(&w.engine, &q(5432)).allowed);
        assert!(!cache.get_or_evaluate(&w.engine, &q(80)).allowed);
        assert!(!cache.get_or_evaluate(&w.engine, &q(81)).allowed);
    }
    // UDP is another pair; a port-less protocol has one entry whatever the port.
    let udp = FlowQuery {
        protocol: Protocol::Udp,
        ..q(5432)
    };
    assert!(!cache.get_or_evaluate(&w.engine, &udp).allowed);
    let icmp = |port| FlowQuery {
        protocol: Protocol::Icmp,
        ..q(port)
    };
    cache.get_or_evaluate(&w.engine, &icmp(1));
    cache.get_or_evaluate(&w.engine, &icmp(2));
    assert_eq!(cache.len(), 5);
    // The db pod goes: every verdict naming it goes, on every port and protocol.
    let Peer::Pod(db) = w.peer("a/db") else {
        panic!("a/db is a pod")
    };
    let delta = PodDelta {
        removed: vec![db],
        added: vec![],
    };
    assert_eq!(cache.invalidate(&delta), 5);
    assert!(cache.is_empty());
}

#[test]
fn cache_shares_equal_verdicts_of_consecutive_flows() {
    let w = basic(&[DENY_INGRESS_A, ALLOW_PG]);
    let cache = VerdictCache::new(100);
    let q = |port| client_to_db(&w, port);
    // A scan: every denied port has the same verdict, and one allocation.
    let first = cache.get_or_evaluate(&w.engine, &q(80));
    for port in 81..90 {
        let v = cache.get_or_evaluate(&w.engine, &q(port));
        assert!(Arc::ptr_eq(&first, &v), "port {port}");
    }
    // Another verdict is not folded into it, nor the one after it into the older one.
    let allowed = cache.get_or_evaluate(&w.engine, &q(5432));
    assert!(allowed.allowed && !Arc::ptr_eq(&first, &allowed));
    let again = cache.get_or_evaluate(&w.engine, &q(90));
    assert!(!again.allowed && *again == *first);
    assert_eq!(cache.len(), 12, "one entry per port all the same");
}

#[test]
fn cache_hits_and_is_invalidated_by_a_new_engine() {
    let w = basic(&[DENY_INGRESS_A]);
    let cache = VerdictCache::new(2);
    let q = FlowQuery {
        src: w.peer("b/client"),
        dst: w.peer("a/db"),
        protocol: Protocol::Tcp,
        port: 5432,
        family: None,
        own_node: false,
        src_remote: false,
    };
    let v1 = cache.get_or_evaluate(&w.engine, &q);
    let v2 = cache.get_or_evaluate(&w.engine, &q);
    assert!(Arc::ptr_eq(&v1, &v2));
    assert!(!v1.allowed);
    // A new engine (new inventory generation) must not see the old verdict.
    let w2 = basic(&[]);
    let q2 = FlowQuery {
        src: w2.peer("b/client"),
        dst: w2.peer("a/db"),
        protocol: Protocol::Tcp,
        port: 5432,
        family: None,
        own_node: false,
        src_remote: false,
    };
    let v3 = cache.get_or_evaluate(&w2.engine, &q2);
    assert!(v3.allowed);
    assert_eq!(cache.len(), 1);
    // Bounded (with a port rule, so that each port is an entry of its own).
    let w3 = basic(&[DENY_INGRESS_A, ALLOW_PG]);
    for port in 1..10 {
        cache.get_or_evaluate(&w3.engine, &client_to_db(&w3, port));
        assert!(cache.len() <= 2);
    }
}

#[test]
fn cache_serves_a_verdict_naming_no_port_to_every_port_and_keeps_port_rules_per_port() {
    // A default deny alone: the verdict is the same on every port.
    let w = basic(&[DENY_INGRESS_A]);
    let cache = VerdictCache::new(100);
    let q = |port| client_to_db(&w, port);
    let first = cache.get_or_evaluate(&w.engine, &q(80));
    assert!(first.port_independent() && !first.allowed);
    for port in 81..300 {
        let v = cache.get_or_evaluate(&w.engine, &q(port));
        assert!(Arc::ptr_eq(&first, &v), "port {port}");
    }
    assert_eq!(cache.len(), 1, "one entry for a scan of every port");
    // Another protocol is another verdict.
    let udp = FlowQuery {
        protocol: Protocol::Udp,
        ..q(80)
    };
    let v = cache.get_or_evaluate(&w.engine, &udp);
    assert!(!Arc::ptr_eq(&first, &v) || v.port_independent());
    assert_eq!(cache.len(), 2);
    // The db pod goes: its verdicts go, the one served to every port included.
    let Peer::Pod(db) = w.peer("a/db") else {
        panic!("a/db is a pod")
    };
    let delta = PodDelta {
        removed: vec![db],
        added: vec![],
    };
    assert_eq!(cache.invalidate(&delta), 2);
    assert!(cache.is_empty());
    // Evaluated again (an entry again), not served from before.
    let after = cache.get_or_evaluate(&w.engine, &q(81));
    assert_eq!(*after, *first);
    assert_eq!(cache.len(), 1);
    // A rule that names a port: each port keeps a verdict of its own, the allowed one too.
    let w = basic(&[DENY_INGRESS_A, ALLOW_PG]);
    let cache = VerdictCache::new(100);
    let denied = cache.get_or_evaluate(&w.engine, &client_to_db(&w, 80));
    assert!(!denied.allowed && !denied.port_independent());
    assert!(
        cache
            .get_or_evaluate(&w.engine, &client_to_db(&w, 5432))
            .allowed
    );
    assert!(
        !cache
            .get_or_evaluate(&w.engine, &client_to_db(&w, 81))
            .allowed
    );
    assert_eq!(cache.len(), 3);
}

#[test]
fn icmp_is_only_allowed_by_rules_without_ports() {
    let w = basic(&["
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}, {from: [{podSelector: {}}]}]"]);
    assert!(!w.eval("b/client", "a/db", Protocol::Icmp, 0).allowed);
    assert!(w.eval("a/web", "a/db", Protocol::Icmp, 0).allowed);
}

#[test]
fn audit_counts_open_namespaces_and_unused_policies() {
    let w = World::new(
        vec![ns("a", &[]), ns("b", &[]), ns("empty", &[])],
        vec![
            pod("a/web", &[("app", "web")], "10.0.0.1"),
            pod("a/db", &[("app", "db")], "10.0.0.2"),
            pod("b/x", &[], "10.0.1.1"),
        ],
        &[
            "
metadata: {name: db, namespace: a}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress, Egress]}",
            "
metadata: {name: ghost, namespace: a}
spec: {podSelector: {matchLabels: {app: ghost}}}",
        ],
    );
    let audit = w.engine.audit();
    let names: Vec<&str> = audit.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "empty"]);
    assert!(!audit[0].open);
    assert_eq!(audit[0].policies, 2);
    assert_eq!(audit[0].pods, 2);
    assert_eq!(audit[0].pods_not_isolated_ingress, 1);
    assert_eq!(audit[0].pods_not_isolated_egress, 1);
    assert_eq!(audit[0].policies_selecting_no_pod, vec!["a/ghost"]);
    assert!(audit[1].open && audit[2].open);
    assert_eq!(audit[1].pods_not_isolated_ingress, 1);
    assert_eq!(audit[2].pods, 0);
}

#[test]
fn traffic_between_a_pod_and_its_own_node_is_always_allowed() {
    let mut kubelet_probe = pod("kube-system/agent", &[], "192.168.1.10");
    kubelet_probe.host_network = true;
    kubelet_probe.node_name = Some("node-a".into());
    let mut same = pod("a/web", &[("app", "web")], "10.0.0.1");
    same.node_name = Some("node-a".into());
    let mut other = pod("a/db", &[("app", "db")], "10.0.0.2");
    other.node_name = Some("node-b".into());
    let w = World::new(
        vec![ns("a", &[]), ns("kube-system", &[])],
        vec![kubelet_probe, same, other],
        &["
metadata: {name: deny-all, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}"],
    );
    let v = w.tcp("kube-system/agent", "a/web", 8080);
    assert!(v.allowed);
    assert!(v.ingress.isolated && v.ingress.node_exempt);
    assert!(
        w.tcp("a/web", "kube-system/agent", 10250).allowed,
        "egress to its own node"
    );
    let v = w.tcp("kube-system/agent", "a/db", 8080);
    assert!(!v.allowed, "another node's host-network pod is not exempt");
    assert!(!v.ingress.node_exempt);
}

mod views {
    use super::*;
    use crate::inventory::{Endpoint, NodeAddrs};

    const DENY_DB: &str = "
metadata: {name: db-from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
";

    fn inventory(pods: Vec<Arc<Pod>>, policies: &[&str]) -> Arc<Inventory> {
        Arc::new(Inventory {
            namespaces: [("prod".to_owned(), ns("prod", &[]))].into(),
            pods,
            policies: policies.iter().map(|y| policy(y)).collect(),
            ..Inventory::default()
        })
    }

    fn peer(views: &Views, ip: &str) -> Peer {
        match views.attributor.lookup(ip.parse().unwrap()) {
            Endpoint::Pod(p) => Peer::Pod(p),
            _ => Peer::External(ip.parse().unwrap()),
        }
    }

    /// Judges src → dst:5432 through the cache, as the daemon does.
    fn judge(views: &Views, cache: &VerdictCache, src: &str, dst: &str) -> bool {
        let flow = FlowQuery {
            src: peer(views, src),
            dst: peer(views, dst),
            protocol: Protocol::Tcp,
            port: 5432,
            family: None,
            own_node: false,
            src_remote: false,
        };
        cache.get_or_evaluate(&views.engine, &flow).allowed
    }

    #[test]
    fn a_pod_change_invalidates_only_its_verdicts() {
        let web = Arc::new(pod("prod/web", &[("app", "web")], "10.0.0.1"));
        let db = Arc::new(pod("prod/db", &[("app", "db")], "10.0.0.2"));
        let cli = Arc::new(pod("prod/cli", &[("app", "cli")], "10.0.0.3"));
        let old = inventory(vec![cli.clone(), db.clone(), web.clone()], &[DENY_DB]);
        let mut views = Views::new(Arc::clone(&old), NodeAddrs::default());
        let generation = views.engine.generation();
        let cache = VerdictCache::new(100);
        assert!(judge(&views, &cache, "10.0.0.1", "10.0.0.2"));
        assert!(!judge(&views, &cache, "10.0.0.3", "10.0.0.2"));
        // An address no pod has yet: the flow is judged as from outside.
        assert!(!judge(&views, &cache, "10.0.0.9", "10.0.0.2"));
        assert_eq!(cache.len(), 3);

        // cli is relabelled app=web, and a new web pod takes 10.0.0.9.
        let cli2 = Arc::new(pod("prod/cli", &[("app", "web")], "10.0.0.3"));
        let web2 = Arc::new(pod("prod/web2", &[("app", "web")], "10.0.0.9"));
        let new = inventory(vec![cli2, db.clone(), web.clone(), web2], &[DENY_DB]);
        let new = Arc::new(Inventory {
            policies: old.policies.clone(),
            ..(*new).clone()
        });
        let update = views.update(new, &cache);
        assert_eq!(
            update,
            Update::Pods {
                removed: 1,
                added: 2,
                invalidated: 2
            }
        );
        assert_eq!(views.engine.generation(), generation, "policies kept");
        assert_eq!(cache.len(), 1, "web → db stays cached");
        assert!(
            judge(&views, &cache, "10.0.0.3", "10.0.0.2"),
            "cli is web now"
        );
        assert!(
            judge(&views, &cache, "10.0.0.9", "10.0.0.2"),
            "web2 is a pod now"
        );
        assert!(judge(&views, &cache, "10.0.0.1", "10.0.0.2"));

        // Verdicts after the update are those of a fresh engine on the same snapshot.
        let fresh = Views::new(Arc::clone(views.engine.inventory()), NodeAddrs::default());
        let fresh_cache = VerdictCache::new(100);
        for (s, d) in [("10.0.0.3", "10.0.0.2"), ("10.0.0.9", "10.0.0.2")] {
            assert_eq!(
                judge(&views, &cache, s, d),
                judge(&fresh, &fresh_cache, s, d)
            );
        }

        // A policy change rebuilds everything.
        let cur = Arc::clone(views.engine.inventory());
        let relaxed = Arc::new(Inventory {
            policies: vec![],
            ..(*cur).clone()
        });
        assert_eq!(views.update(relaxed, &cache), Update::Rebuilt);
        assert!(cache.is_empty());
        assert_ne!(views.engine.generation(), generation);
        assert!(
            judge(&views, &cache, "10.0.0.3", "10.0.0.2"),
            "no policy: allowed"
        );
    }
}
