//! The drain's per-flow work in a port scan (issue 16): one drain of 4,096 flows between one
//! pair of pods, each on its own port and denied by an ingress default deny, through
//! attribution and the two sinks every daemon runs (Prometheus export and the alert stage).
//!
//! The baseline, timed in the same run, sums the same flows in a hash map keyed by address
//! pair and port: the least a drain that keeps per-edge state can do. The printed ratio is the
//! drain's time per flow in units of that. The cold variant writes `PIPELINE_COLD_MIB` (64
//! by default) MiB between two timed drains, as the flood and the reader thread evict the
//! drain's state between two drains in the daemon.
//!
//! `cargo bench -p observer --bench pipeline`

#[path = "common/times.rs"]
mod times;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use observer::alert::{AlertConfig, AlertSink, AlertStage};
use observer::attribute::{Attribution, Sink, Views};
use observer::capture::{DrainReport, FlowDrop};
use observer::export::{Metrics, MetricsConfig, MetricsSink};
use observer::flow::{FastMap, Protocol};
use observer::inventory::{Inventory, Labels, Namespace, NodeAddrs, Pod, PodPhase, Workload};
use times::{rate, record};

const FLOWS: u16 = 4096;
const SRC: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
const DST: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);

fn pod(namespace: &str, workload: &str, ip: Ipv4Addr) -> Arc<Pod> {
    Arc::new(Pod {
        namespace: namespace.into(),
        name: format!("{workload}-5f6b7-abcde"),
        labels: Labels::from([("app", workload)]),
        ips: vec![IpAddr::V4(ip)],
        host_network: false,
        node_name: Some("bench-node".into()),
        phase: PodPhase::Running,
        uid: None,
        created_unix: 0,
        ports: vec![],
        workload: Workload {
            kind: "Deployment".into(),
            name: workload.into(),
        },
    })
}

fn views() -> Views {
    let mut inv = Inventory::default();
    for ns in ["scan", "prod"] {
        inv.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: Labels::from([("kubernetes.io/metadata.name", ns)]),
            },
        );
    }
    inv.pods = vec![pod("scan", "scanner", SRC), pod("prod", "db", DST)];
    let policy = "metadata: {name: default-deny-ingress, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}";
    inv.policies = vec![Arc::new(match serde_yaml::from_str(policy) {
        Ok(p) => p,
        Err(e) => panic!("policy: {e}"),
    })];
    Views::new(
        Arc::new(inv),
        NodeAddrs::new([IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2))]),
    )
}

fn report() -> DrainReport {
    let reason: Arc<str> = Arc::from("netfilter_drop");
    DrainReport {
        drops: (1..=FLOWS)
            .map(|port| FlowDrop {
                reason: Arc::clone(&reason),
                src: Some(IpAddr::V4(SRC)),
                dst: Some(IpAddr::V4(DST)),
                protocol: Protocol::Udp,
                dst_port: port,
                icmp: None,
                netns: 1,
                packets: 40,
                bytes: 2_400,
            })
            .collect(),
        ..DrainReport::default()
    }
}

struct Daemon {
    views: Views,
    core: Attribution,
    metrics: MetricsSink,
    alert: AlertSink,
    now: SystemTime,
}

impl Daemon {
    fn new() -> Self {
        let metrics = match Metrics::new(MetricsConfig::default()) {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("metrics: {e}"),
        };
        let mut config = AlertConfig::default();
        config.edges.state_dir = None;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let stage = match AlertStage::new(config, metrics.registry(), now) {
            Ok(s) => s,
            Err(e) => panic!("alert stage: {e}"),
        };
        Self {
            views: views(),
            core: Attribution::new(false, now),
            metrics: MetricsSink::new(metrics),
            alert: AlertSink::new(stage),
            now,
        }
    }

    fn drain(&mut self, report: &DrainReport) -> usize {
        self.now += Duration::from_secs(1);
        let out = self.core.attribute(&self.views, report, &[], self.now);
        let edges = out.edges.len();
        self.metrics.record(out, self.now);
        self.alert.record(out, self.now);
        edges
    }
}

fn bench(c: &mut Criterion) {
    let report = report();
    let mut daemon = Daemon::new();
    // The work is the work we claim: every flow denied by the policy, one edge per port.
    assert_eq!(daemon.drain(&report), usize::from(FLOWS));
    let flows = u64::from(FLOWS);

    let mut group = c.benchmark_group("drain_4096_port_scan");
    group.throughput(Throughput::Elements(flows));
    group.bench_function("baseline_edge_map", |b| {
        let mut edges: FastMap<(IpAddr, IpAddr, u16), u64> = FastMap::default();
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                edges.clear();
                for d in &report.drops {
                    if let (Some(s), Some(t)) = (d.src, d.dst) {
                        *edges.entry((s, t, d.dst_port)).or_default() += d.packets;
                    }
                }
                black_box(&edges);
            }
            let took = start.elapsed();
            record("baseline_edge_map", iters * flows, took);
            took
        });
    });
    group.bench_function("attribute_and_sinks", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(daemon.drain(&report));
            }
            let took = start.elapsed();
            record("attribute_and_sinks", iters * flows, took);
            took
        });
    });
    // In the daemon the flood and the reader thread evict the drain's state between two
    // drains (a second apart): the same drain with every cache line of it cold.
    let mut thrash = vec![0u8; cold_bytes()];
    group.bench_function("attribute_and_sinks_cold", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            for i in 0..iters {
                evict(&mut thrash, i);
                let start = Instant::now();
                black_box(daemon.drain(&report));
                took += start.elapsed();
            }
            record("attribute_and_sinks_cold", iters * flows, took);
            took
        });
    });
    group.bench_function("attribute_only", |b| {
        let mut core = Attribution::new(false, daemon.now);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                daemon.now += Duration::from_secs(1);
                black_box(
                    core.attribute(&daemon.views, &report, &[], daemon.now)
                        .edges
                        .len(),
                );
            }
            let took = start.elapsed();
            record("attribute_only", iters * flows, took);
            took
        });
    });
    group.finish();
}

/// Bytes written between two cold drains: more than this host's L3 (32 MiB), unless
/// `PIPELINE_COLD_MIB` says otherwise.
fn cold_bytes() -> usize {
    std::env::var("PIPELINE_COLD_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64)
        << 20
}

/// Writes every cache line of `buf`.
fn evict(buf: &mut [u8], round: u64) {
    for line in buf.chunks_mut(64) {
        line[0] = round as u8;
    }
    black_box(&buf);
}

fn summary() {
    let per_flow = |name: &str| rate(name).map(|r| 1e9 / r);
    println!("\ndrain of a {FLOWS}-port scan, ns per flow over all samples:");
    let base = per_flow("baseline_edge_map");
    for name in [
        "baseline_edge_map",
        "attribute_only",
        "attribute_and_sinks",
        "attribute_and_sinks_cold",
    ] {
        match (per_flow(name), base) {
            (Some(t), Some(b)) => {
                println!("  {name:<22} {t:>8.1} ns/flow   {:.2}x the baseline", t / b)
            }
            (Some(t), None) => println!("  {name:<22} {t:>8.1} ns/flow"),
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
