//! Property tests of the engine over random inventories:
//! - adding an allow (a rule, or a whole policy) never turns an allow into a deny, except by
//!   isolating a pod that was not isolated before (the only way NetworkPolicy can deny);
//! - a pod that no policy selects for a direction is never denied in that direction, and the
//!   indexed lookup finds exactly the policies a brute-force scan finds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use observer::flow::{Direction, Protocol};
use observer::inventory::{ContainerPort, Inventory, Labels, Namespace, Pod, PodPhase, Workload};
use observer::verdict::{Engine, FlowQuery, Peer, Verdict};
use proptest::prelude::*;
use serde_json::{Value, json};

const KEYS: [&str; 2] = ["app", "tier"];
const VALUES: [&str; 2] = ["a", "b"];

fn labels_strategy() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(
        prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
        prop::sample::select(VALUES.to_vec()).prop_map(str::to_owned),
        0..=2,
    )
    .prop_map(Labels::from)
}

fn selector_strategy() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(KEYS.to_vec());
    let val = prop::sample::select(VALUES.to_vec());
    prop_oneof![
        Just(json!({})),
        (key.clone(), val.clone()).prop_map(|(k, v)| json!({"matchLabels": {k: v}})),
        (
            key,
            prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
            val
        )
            .prop_map(|(k, op, v)| {
                if op == "In" || op == "NotIn" {
                    json!({"matchExpressions": [{"key": k, "operator": op, "values": [v]}]})
                } else {
                    json!({"matchExpressions": [{"key": k, "operator": op}]})
                }
            }),
    ]
}

fn ns_selector_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        prop::sample::select(vec!["red", "blue"]).prop_map(|t| json!({"matchLabels": {"team": t}})),
        prop::sample::select(vec!["n0", "n1"]).prop_map(
            |n| json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [n]}]})
        ),
    ]
}

fn peer_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector_strategy().prop_map(|s| json!({"podSelector": s})),
        ns_selector_strategy().prop_map(|s| json!({"namespaceSelector": s})),
        (selector_strategy(), ns_selector_strategy())
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        prop::sample::select(vec![
            json!({"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.0/30"]}}),
            json!({"ipBlock": {"cidr": "10.0.0.4/30"}}),
            json!({"ipBlock": {"cidr": "192.0.2.0/24"}}),
        ]),
    ]
}

fn port_strategy() -> impl Strategy<Value = Value> {
    let proto = prop::sample::select(vec![None, Some("TCP"), Some("UDP")]);
    let port = prop_oneof![
        Just(Value::Null),
        prop::sample::select(vec![80, 81]).prop_map(|p| json!(p)),
        Just(json!("http")),
        Just(json!({"range": [79, 80]})),
    ];
    (proto, port).prop_map(|(proto, port)| {
        let mut m = serde_json::Map::new();
        if let Some(p) = proto {
            m.insert("protocol".into(), json!(p));
        }
        match port {
            Value::Null => {}
            Value::Object(o) => {
                m.insert("port".into(), o["range"][0].clone());
                m.insert("endPort".into(), o["range"][1].clone());
            }
            other => {
                m.insert("port".into(), other);
            }
        }
        Value::Object(m)
    })
}

fn rule_strategy(dir: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::option::of(proptest::collection::vec(peer_strategy(), 0..=2)),
        prop::option::of(proptest::collection::vec(port_strategy(), 0..=2)),
    )
        .prop_map(move |(peers, ports)| {
            let mut m = serde_json::Map::new();
            if let Some(p) = peers {
                m.insert(dir.into(), json!(p));
            }
            if let Some(p) = ports {
                m.insert("ports".into(), json!(p));
            }
            Value::Object(m)
        })
}

fn policy_strategy() -> impl Strategy<Value = Value> {
    (
        0usize..2,
        selector_strategy(),
        prop::sample::select(vec![
            None,
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
        ]),
        prop::option::of(proptest::collection::vec(rule_strategy("from"), 0..=2)),
        prop::option::of(proptest::collection::vec(rule_strategy("to"), 0..=2)),
    )
        .prop_map(|(ns, sel, types, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), sel);
            if let Some(t) = types {
                spec.insert("policyTypes".into(), json!(t));
            }
            if let Some(i) = ingress {
                spec.insert("ingress".into(), json!(i));
            }
            if let Some(e) = egress {
                spec.insert("egress".into(), json!(e));
            }
            json!({"metadata": {"name": "", "namespace": format!("n{ns}")}, "spec": spec})
        })
}

#[derive(Debug, Clone)]
struct World {
    ns_teams: Vec<&'static str>,
    pods: Vec<(usize, Labels, bool)>,
    policies: Vec<Value>,
}

fn world_strategy() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(prop::sample::select(vec!["red", "blue"]), 2),
        proptest::collection::vec(
            (0usize..2, labels_strategy(), prop::bool::weighted(0.15)),
            1..=5,
        ),
        proptest::collection::vec(policy_strategy(), 0..=5),
    )
        .prop_map(|(ns_teams, pods, policies)| World {
            ns_teams,
            pods,
            policies,
        })
}

fn build(world: &World, policies: &[Value]) -> Inventory {
    let namespaces: BTreeMap<String, Namespace> = world
        .ns_teams
        .iter()
        .enumerate()
        .map(|(i, team)| {
            let name = format!("n{i}");
            let labels = Labels::from([
                ("team".to_owned(), (*team).to_owned()),
                ("kubernetes.io/metadata.name".to_owned(), name.clone()),
            ]);
            (name.clone(), Namespace { name, labels })
        })
        .collect();
    let pods = world
        .pods
        .iter()
        .enumerate()
        .map(|(i, (ns, labels, host))| {
            Arc::new(Pod {
                namespace: format!("n{ns}"),
                name: format!("p{i}"),
                labels: labels.clone(),
                ips: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
                host_network: *host,
                node_name: None,
                phase: PodPhase::Running,
                uid: None,
                created_unix: 0,
                ports: if i % 2 == 0 {
                    vec![ContainerPort {
                        name: Some("http".into()),
                        port: 80,
                        protocol: Protocol::Tcp,
                    }]
                } else {
                    vec![]
                },
                workload: Workload {
                    kind: "Pod".into(),
                    name: format!("p{i}"),
                },
            })
        })
        .collect();
    let policies = policies
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut v = v.clone();
            v["metadata"]["name"] = json!(format!("pol{i}"));
            Arc::new(serde_json::from_value::<NetworkPolicy>(v).unwrap())
        })
        .collect();
    Inventory {
        namespaces,
        pods,
        policies,
        ..Inventory::default()
    }
}

fn endpoints(engine: &Engine) -> Vec<Peer> {
    let mut v: Vec<Peer> = engine
        .inventory()
        .pods
        .iter()
        .map(|p| Peer::Pod(Arc::clone(p)))
        .collect();
    for ip in ["192.0.2.7", "10.0.0.200"] {
        v.push(Peer::External(ip.parse::<IpAddr>().unwrap()));
    }
    v
}

/// Every flow of the world: endpoint pairs × {TCP, UDP} × {80, 81}.
fn all_verdicts(engine: &Engine) -> Vec<(String, Verdict)> {
    let eps = endpoints(engine);
    let mut out = Vec::new();
    for s in &eps {
        for d in &eps {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                for port in [80, 81] {
                    let q = FlowQuery {
                        src: s.clone(),
                        dst: d.clone(),
                        protocol,
                        port,
                        family: None,
                        own_node: false,
                        src_remote: false,
                    };
                    let key = format!(
                        "{} -> {} {protocol}/{port}",
                        s.display_name(),
                        d.display_name()
                    );
                    out.push((key, engine.evaluate(&q)));
                }
            }
        }
    }
    out
}

/// Independent selector check straight from the API types.
fn brute_matches(sel: &LabelSelector, labels: &Labels) -> bool {
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().flatten().all(|e| {
            let vals = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels
                    .get(&e.key)
                    .is_some_and(|v| vals.iter().any(|x| x == v)),
                "NotIn" => labels
                    .get(&e.key)
                    .is_none_or(|v| vals.iter().all(|x| x != v)),
                "Exists" => labels.contains_key(&e.key),
                "DoesNotExist" => !labels.contains_key(&e.key),
                _ => false,
            }
        })
}

fn brute_isolating(inv: &Inventory, pod: &Pod, dir: Direction) -> Vec<String> {
    if pod.host_network {
        return vec![];
    }
    let mut ids: Vec<String> = inv
        .policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(&pod.namespace))
        .filter(|p| {
            let spec = p.spec.clone().unwrap_or_default();
            let types = spec.policy_types.clone().unwrap_or_default();
            let (ing, eg) = if types.is_empty() {
                (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
            } else {
                (
                    types.iter().any(|t| t == "Ingress"),
                    types.iter().any(|t| t == "Egress"),
                )
            };
            let applies = match dir {
                Direction::Ingress => ing,
                _ => eg,
            };
            applies && brute_matches(&spec.pod_selector.unwrap_or_default(), &pod.labels)
        })
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    ids.sort();
    ids
}

/// Whether the deciding side of `after` was already isolated in `before`.
fn denied_by_prior_isolation(before: &Verdict, after: &Verdict) -> bool {
    match after.direction {
        Some(Direction::Egress) => before.egress.isolated,
        Some(Direction::Ingress) => before.ingress.isolated,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn unselected_pods_are_never_denied_in_that_direction(world in world_strategy()) {
        let inv = build(&world, &world.policies);
        let engine = Engine::new(Arc::new(inv.clone()));
        for pod in &inv.pods {
            for dir in [Direction::Ingress, Direction::Egress] {
                prop_assert_eq!(engine.isolating_policies(pod, dir), brute_isolating(&inv, pod, dir));
            }
        }
        for (key, v) in all_verdicts(&engine) {
            prop_assert_eq!(v.allowed, v.egress.allows() && v.ingress.allows(), "{}", key);
            if !v.egress.isolated {
                prop_assert!(v.egress.allows(), "{}", key);
                prop_assert!(v.direction != Some(Direction::Egress), "{}", key);
            }
            if !v.ingress.isolated {
                prop_assert!(v.ingress.allows(), "{}", key);
                prop_assert!(v.direction != Some(Direction::Ingress), "{}", key);
            }
        }
    }

    #[test]
    fn adding_an_allow_rule_never_turns_an_allow_into_a_deny(
        world in world_strategy(),
        which in any::<prop::sample::Index>(),
        ingress in any::<bool>(),
        rule in prop_oneof![rule_strategy("from"), rule_strategy("to")],
    ) {
        prop_assume!(!world.policies.is_empty());
        let before = Engine::new(Arc::new(build(&world, &world.policies)));
        let mut policies = world.policies.clone();
        let i = which.index(policies.len());
        let field = if ingress { "ingress" } else { "egress" };
        let mut rule = rule;
        // Keep the rule's peer key in line with the direction it is added to.
        if let Some(peers) = rule.as_object_mut().and_then(|m| m.remove("from").or_else(|| m.remove("to"))) {
            rule[if ingress { "from" } else { "to" }] = peers;
        }
        // Adding a rule must not change which directions the policy isolates: pin policyTypes.
        let spec = &mut policies[i]["spec"];
        if spec.get("policyTypes").is_none() {
            let has_egress = spec.get("egress").and_then(Value::as_array).is_some_and(|e| !e.is_empty());
            spec["policyTypes"] = if has_egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) };
        }
        match spec.get_mut(field).and_then(Value::as_array_mut) {
            Some(rules) => rules.push(rule),
            None => spec[field] = json!([rule]),
        }
        let after = Engine::new(Arc::new(build(&world, &policies)));
        for ((key, b), (_, a)) in all_verdicts(&before).into_iter().zip(all_verdicts(&after)) {
            prop_assert!(!b.allowed || a.allowed, "{}: allowed before, {} after", key, a);
        }
    }

    #[test]
    fn adding_an_allow_policy_only_denies_through_new_isolation(
        world in world_strategy(),
        extra in policy_strategy(),
    ) {
        let before = Engine::new(Arc::new(build(&world, &world.policies)));
        let mut policies = world.policies.clone();
        policies.push(extra);
        let after = Engine::new(Arc::new(build(&world, &policies)));
        for ((key, b), (_, a)) in all_verdicts(&before).into_iter().zip(all_verdicts(&after)) {
            if b.allowed && !a.allowed {
                prop_assert!(
                    !denied_by_prior_isolation(&b, &a),
                    "{}: the new policy turned an allow into a deny on a side that was already isolated",
                    key
                );
            }
        }
    }
}
