//! Verdict throughput on a synthetic cluster of 10,000 pods and 2,000 NetworkPolicies:
//! - `evaluate_cold`: every flow evaluated by the engine (no cache);
//! - `evaluate_cached`: the same flows through a warm [`VerdictCache`];
//! - `engine_build`: compiling the policies and building the indexes.
//!
//! Throughput is reported in elements/s, one element being one verdict.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::flow::Protocol;
use observer::inventory::{ContainerPort, Inventory, Labels, Namespace, Pod, PodPhase, Workload};
use observer::verdict::{Engine, FlowQuery, Peer, VerdictCache};
use serde_json::json;

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const POLICIES_PER_NS: usize = 20;
const APPS: usize = 25;
const FLOWS: usize = 1_000;

fn inventory() -> Inventory {
    let mut namespaces = BTreeMap::new();
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        namespaces.insert(
            ns.clone(),
            Namespace {
                name: ns.clone(),
                labels: Labels::from([
                    ("kubernetes.io/metadata.name".to_owned(), ns.clone()),
                    ("team".to_owned(), format!("t{}", n % 10)),
                ]),
            },
        );
        for p in 0..PODS_PER_NS {
            let app = format!("app{}", p % APPS);
            let idx = n * PODS_PER_NS + p;
            pods.push(Arc::new(Pod {
                namespace: ns.clone(),
                name: format!("{app}-{p}"),
                labels: Labels::from([
                    ("app".to_owned(), app.clone()),
                    ("tier".to_owned(), format!("tier{}", p % 3)),
                    ("pod-template-hash".to_owned(), format!("h{p}")),
                ]),
                ips: vec![
                    format!("10.{}.{}.{}", idx / 65536, (idx / 256) % 256, idx % 256)
                        .parse()
                        .unwrap_or_else(|e| panic!("bad ip: {e}")),
                ],
                host_network: false,
                node_name: None,
                phase: PodPhase::Running,
                uid: None,
                created_unix: 0,
                ports: vec![ContainerPort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                workload: Workload {
                    kind: "Deployment".into(),
                    name: app,
                },
            }));
        }
        for k in 0..POLICIES_PER_NS {
            let target = format!("app{}", k % APPS);
            let from = format!("app{}", (k + 1) % APPS);
            let spec = match k % 5 {
                // Default deny for the namespace.
                0 => json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                1 => json!({
                    "podSelector": {"matchLabels": {"app": target}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                                 "ports": [{"port": "http"}]}]
                }),
                2 => json!({
                    "podSelector": {"matchLabels": {"app": target}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 10)}},
                                           "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["tier0", "tier1"]}]}}],
                                 "ports": [{"port": 8000, "endPort": 8100}]}]
                }),
                3 => json!({
                    "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [target, from]}]},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {}}]},
                               {"ports": [{"port": 53, "protocol": "UDP"}]}]
                }),
                _ => json!({
                    "podSelector": {"matchLabels": {"app": target, "tier": "tier2"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.1.0/24"]}}]}]
                }),
            };
            let np: NetworkPolicy = serde_json::from_value(json!({
                "metadata": {"name": format!("pol{k}"), "namespace": ns},
                "spec": spec,
            }))
            .unwrap_or_else(|e| panic!("bad policy: {e}"));
            policies.push(Arc::new(np));
        }
    }
    Inventory {
        namespaces,
        pods,
        policies,
        ..Inventory::default()
    }
}

/// Deterministic pseudo-random flows between pods, plus some from outside.
fn flows(inv: &Inventory) -> Vec<FlowQuery> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..FLOWS)
        .map(|i| {
            let src = if i % 10 == 0 {
                Peer::External("192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}")))
            } else {
                Peer::Pod(Arc::clone(&inv.pods[next() as usize % inv.pods.len()]))
            };
            let dst = Peer::Pod(Arc::clone(&inv.pods[next() as usize % inv.pods.len()]));
            let port = [8080, 8050, 5432][next() as usize % 3];
            FlowQuery {
                src,
                dst,
                protocol: Protocol::Tcp,
                port,
                family: None,
                own_node: false,
                src_remote: false,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let inv = Arc::new(inventory());
    assert_eq!(inv.pods.len(), 10_000);
    assert_eq!(inv.policies.len(), 2_000);
    let engine = Engine::new(Arc::clone(&inv));
    let flows = flows(&inv);
    let denied = flows.iter().filter(|f| !engine.evaluate(f).allowed).count();
    eprintln!("{denied} of {} flows denied", flows.len());

    let mut g = c.benchmark_group("verdict");
    g.throughput(Throughput::Elements(flows.len() as u64));
    g.bench_function("evaluate_cold", |b| {
        b.iter(|| {
            for f in &flows {
                black_box(engine.evaluate(black_box(f)));
            }
        })
    });
    let cache = VerdictCache::new(100_000);
    for f in &flows {
        cache.get_or_evaluate(&engine, f);
    }
    g.bench_function("evaluate_cached", |b| {
        b.iter(|| {
            for f in &flows {
                black_box(cache.get_or_evaluate(&engine, black_box(f)));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("verdict_build");
    g.sample_size(10);
    g.bench_function("engine_build_10k_pods_2k_policies", |b| {
        b.iter(|| black_box(Engine::new(Arc::clone(&inv))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
