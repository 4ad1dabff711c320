//! Attribution lookups per second with 10,000 pods (issue 6, "inventory scale").
//!
//! Three lookups run over the same addresses: [`Attributor::lookup`] for pod addresses (hits),
//! for addresses that are no pod's (misses, which fall through to the range classification),
//! and, as the baseline, a plain `HashMap<IpAddr, Arc<Pod>>::get` over the same pod
//! addresses. The baseline is timed in the same run, so the printed ratio means something on a
//! noisy machine where absolute numbers do not.
//!
//! `cargo bench -p observer --bench attribution`

#[path = "common/times.rs"]
mod times;

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use observer::flow::Protocol;
use observer::inventory::{
    Attributor, ContainerPort, Endpoint, Inventory, Labels, Namespace, NodeAddrs, Pod, PodPhase,
    Workload,
};
use times::{rate, record};

const PODS: usize = 10_000;
/// Addresses looked up per iteration: enough to defeat the branch predictor's memory of one
/// address, few enough to keep an iteration short.
const BATCH: usize = 4_096;

/// A 10,000-pod inventory spread over 100 namespaces and 1,000 Deployments, each pod dual-stack.
fn inventory() -> Inventory {
    let mut inv = Inventory::default();
    for ns in 0..100 {
        let name = format!("team-{ns}");
        inv.namespaces.insert(
            name.clone(),
            Namespace {
                name: name.clone(),
                labels: Labels::from([("kubernetes.io/metadata.name", &name)]),
            },
        );
    }
    for i in 0..PODS {
        let [_, _, hi, lo] = u32::try_from(i).unwrap_or(0).to_be_bytes();
        let v4 = Ipv4Addr::new(10, 42, hi, lo);
        let v6 = Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, u16::from(hi), u16::from(lo));
        let deployment = format!("app-{}", i / 10);
        inv.pods.push(Arc::new(Pod {
            namespace: format!("team-{}", i % 100),
            name: format!("{deployment}-5d8f7-{i:05}"),
            labels: Labels::from([("app", &deployment)]),
            ips: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
            host_network: false,
            node_name: Some(format!("node-{}", i % 50)),
            phase: PodPhase::Running,
            uid: None,
            created_unix: 1_700_000_000,
            ports: vec![ContainerPort {
                name: Some("http".to_owned()),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            workload: Workload {
                kind: "Deployment".to_owned(),
                name: deployment,
            },
        }));
    }
    inv
}

/// A fixed pseudo-random permutation (xorshift), so lookups do not walk the table in insertion
/// order.
fn shuffled<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            items[(state % items.len() as u64) as usize].clone()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let inv = inventory();
    let attributor = Attributor::new(
        &inv,
        NodeAddrs::new([IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))]),
    );
    assert_eq!(attributor.pod_ips(), 2 * PODS);
    let baseline: HashMap<IpAddr, Arc<Pod>> = inv
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.clone())))
        .collect();

    let pod_ips: Vec<IpAddr> = inv.pods.iter().flat_map(|p| p.ips.clone()).collect();
    let hits = shuffled(&pod_ips, BATCH);
    // Misses: a mix of what drops really carry: public peers, other private ranges, IPv6.
    let miss_pool: Vec<IpAddr> = (0..256u16)
        .flat_map(|i| {
            let [a, b] = i.to_be_bytes();
            [
                IpAddr::V4(Ipv4Addr::new(93, 184, a, b)),
                IpAddr::V4(Ipv4Addr::new(172, 20, a, b)),
                IpAddr::V6(Ipv6Addr::new(0x2a00, 0x1450, 0, 0, 0, 0, 0, i)),
                IpAddr::V4(Ipv4Addr::new(10, 99, a, b)),
            ]
        })
        .collect();
    let misses = shuffled(&miss_pool, BATCH);

    // Check the work is the work we claim before timing it.
    assert!(
        hits.iter()
            .all(|ip| matches!(attributor.lookup(*ip), Endpoint::Pod(_)))
    );
    assert!(
        misses
            .iter()
            .all(|ip| !matches!(attributor.lookup(*ip), Endpoint::Pod(_)))
    );
    assert!(hits.iter().all(|ip| baseline.contains_key(ip)));

    let mut group = c.benchmark_group("attribution_10k_pods");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("baseline_hashmap_hit", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for ip in &hits {
                    black_box(baseline.get(black_box(ip)).cloned());
                }
            }
            let took = start.elapsed();
            record("baseline_hashmap_hit", iters * BATCH as u64, took);
            took
        });
    });
    group.bench_function("attributor_hit", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for ip in &hits {
                    black_box(attributor.lookup(black_box(*ip)));
                }
            }
            let took = start.elapsed();
            record("attributor_hit", iters * BATCH as u64, took);
            took
        });
    });
    group.bench_function("attributor_miss", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for ip in &misses {
                    black_box(attributor.lookup(black_box(*ip)));
                }
            }
            let took = start.elapsed();
            record("attributor_miss", iters * BATCH as u64, took);
            took
        });
    });
    group.finish();
}

fn summary() {
    println!(
        "\nattribution with {PODS} pods ({} addresses), lookups/s over all samples:",
        2 * PODS
    );
    let base = rate("baseline_hashmap_hit");
    for name in ["baseline_hashmap_hit", "attributor_hit", "attributor_miss"] {
        match (rate(name), base) {
            (Some(r), Some(b)) => println!(
                "  {name:<22} {:>8.2} M lookups/s   {:.2}x the baseline's time per lookup",
                r / 1e6,
                b / r
            ),
            (Some(r), None) => println!("  {name:<22} {:>8.2} M lookups/s", r / 1e6),
            _ => println!("  {name:<22} not measured (criterion filter or --test mode)"),
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
