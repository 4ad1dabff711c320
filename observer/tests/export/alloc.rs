//! The drain path allocates nothing per flow once it has seen a drain of the same shape:
//! attribution (endpoint lookups, verdicts, grouping), the Prometheus sink and the alert sink.
//! Counted by a global allocator that counts the allocations of the current thread only, so
//! parallel tests do not disturb it.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use observer::alert::{AlertConfig, AlertSink, AlertStage};
use observer::attribute::{Attribution, Sink as _, Views};
use observer::capture::{DrainReport, FlowDrop};
use observer::export::{
    DropLabels, Metrics, MetricsConfig, MetricsSink, PolicyDenyLabels, PolicyMatch,
};
use observer::flow::{Direction, Protocol};
use observer::inventory::{Inventory, Namespace, NodeAddrs, Pod, PodPhase, Workload};

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread-local may be gone during thread teardown.
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn recording_into_existing_series_does_not_allocate() {
    let m = Metrics::new(MetricsConfig {
        series_limit: 1,
        expiry_grace: Duration::from_secs(60),
    })
    .expect("metrics");
    let drop = DropLabels {
        reason: "netfilter_drop",
        direction: Direction::Egress,
        source_namespace: "a",
        source_workload: "web",
        destination_namespace: "b",
        destination_workload: "db",
        protocol: Protocol::Udp,
    };
    let overflowing = DropLabels {
        source_workload: "other",
        ..drop
    };
    let deny = PolicyDenyLabels {
        direction: Direction::Egress,
        source_namespace: "a",
        source_workload: "web",
        destination_namespace: "b",
        destination_workload: "db",
        protocol: Protocol::Udp,
        policy: "a/default-deny",
        policy_match: PolicyMatch::DefaultDeny,
    };
    // First samples create the series (and the overflow series): those may allocate.
    let before = allocations();
    m.record_drop(&drop, 1, 1);
    m.record_drop(&overflowing, 1, 1);
    m.record_policy_deny(&deny, 1);
    assert!(
        allocations() > before,
        "the allocation counter does not count"
    );

    let before = allocations();
    for _ in 0..1000 {
        m.record_drop(&drop, 1, 100);
        m.record_drop(&overflowing, 1, 100);
        m.record_policy_deny(&deny, 1);
    }
    assert_eq!(allocations() - before, 0, "hot path allocated");
    assert_eq!(m.series_counts().drops, 1);
    assert_eq!(m.series_counts().drops_overflow, 1);
}

fn pod(namespace: &str, name: &str, app: &str, ip: Ipv4Addr) -> Arc<Pod> {
    Arc::new(Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ips: vec![IpAddr::V4(ip)],
        host_network: false,
        node_name: None,
        phase: PodPhase::Running,
        uid: None,
        created_unix: 0,
        ports: vec![],
        workload: Workload {
            kind: "Deployment".into(),
            name: app.into(),
        },
    })
}

/// 20 pods in `prod` behind an ingress default deny that lets `app=web` reach port 80, and
/// 20 in `dev` behind an egress default deny.
fn views() -> Views {
    let policy = |yaml: &str| Arc::new(serde_yaml::from_str(yaml).expect("policy"));
    let namespace = |name: &str| {
        (
            name.to_owned(),
            Namespace {
                name: name.into(),
                labels: [("kubernetes.io/metadata.name".to_owned(), name.to_owned())].into(),
            },
        )
    };
    let mut pods = Vec::new();
    for i in 0..20u8 {
        let app = if i % 2 == 0 { "web" } else { "db" };
        pods.push(pod(
            "prod",
            &format!("{app}-{i}"),
            app,
            Ipv4Addr::new(10, 0, 0, i + 1),
        ));
        pods.push(pod(
            "dev",
            &format!("client-{i}"),
            "client",
            Ipv4Addr::new(10, 0, 1, i + 1),
        ));
    }
    let inv = Inventory {
        namespaces: [namespace("prod"), namespace("dev")]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        pods,
        policies: vec![
            policy(
                "metadata: {name: default-deny-ingress, namespace: prod}\n\
                 spec: {podSelector: {}, policyTypes: [Ingress]}",
            ),
            policy(
                "metadata: {name: allow-web, namespace: prod}\n\
                 spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  \
                 - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 80}]",
            ),
            policy(
                "metadata: {name: deny-egress, namespace: dev}\n\
                 spec: {podSelector: {}, policyTypes: [Egress]}",
            ),
        ],
        ..Inventory::default()
    };
    Views::new(
        Arc::new(inv),
        NodeAddrs::new([IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))]),
    )
}

/// A drain of 2,000 flows: every branch of attribution (default denies both ways,
/// unexplained drops, other reasons, outside peers, unparsed packets) over many ports.
fn drain(reasons: &[Arc<str>; 2]) -> DrainReport {
    let mut drops = Vec::new();
    for i in 0..2_000u32 {
        let octet = |n: u32| u8::try_from(n % 20 + 1).expect("small");
        let prod = IpAddr::V4(Ipv4Addr::new(10, 0, 0, octet(i)));
        let dev = IpAddr::V4(Ipv4Addr::new(10, 0, 1, octet(i / 3)));
        let world = IpAddr::V4(Ipv4Addr::new(8, 8, u8::try_from(i % 7).expect("small"), 8));
        let (src, dst) = match i % 5 {
            0 => (Some(dev), Some(prod)),
            1 => (Some(world), Some(prod)),
            2 => (Some(prod), Some(prod)),
            3 => (Some(prod), Some(world)),
            _ => (None, None),
        };
        drops.push(FlowDrop {
            reason: Arc::clone(&reasons[usize::from(i % 11 == 0)]),
            src,
            dst,
            protocol: if i % 13 == 0 {
                Protocol::Icmp
            } else {
                Protocol::Tcp
            },
            dst_port: u16::try_from(i % 200).expect("small") + 1,
            icmp: None,
            netns: 0,
            packets: 1,
            bytes: 60,
        });
    }
    DrainReport {
        drops,
        reason_totals: reasons.iter().map(|r| (Arc::clone(r), 1, 60)).collect(),
        ..DrainReport::default()
    }
}

#[test]
fn a_steady_drain_allocates_nothing_from_attribution_to_the_sinks() {
    let metrics = Arc::new(
        Metrics::new(MetricsConfig {
            series_limit: 100,
            expiry_grace: Duration::from_secs(60),
        })
        .expect("metrics"),
    );
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let stage =
        AlertStage::new(AlertConfig::default(), metrics.registry(), t0).expect("alert stage");
    let mut alert = AlertSink::new(stage);
    let mut export = MetricsSink::new(Arc::clone(&metrics));
    let views = views();
    let mut core = Attribution::new(false, t0);
    let reasons: [Arc<str>; 2] = [Arc::from("netfilter_drop"), Arc::from("no_socket")];
    let report = drain(&reasons);

    let mut run = |now: SystemTime| {
        let out = core.attribute(&views, &report, &[], now);
        export.record(out, now);
        alert.record(out, now);
        (out.drops.len(), out.denies.len(), out.edges.len())
    };
    // The first drain creates series, verdicts, edges and map capacity: it may allocate.
    let before = allocations();
    let (drops, denies, edges) = run(t0);
    assert!(
        allocations() > before,
        "the allocation counter does not count"
    );
    assert!(
        drops > 10 && denies > 10 && edges > 100,
        "{drops} {denies} {edges}"
    );

    // Later drains of the same flows, within the same second and the next ones.
    for n in 1..4u64 {
        let before = allocations();
        run(t0 + Duration::from_millis(300 * n));
        assert_eq!(allocations() - before, 0, "drain {n} allocated");
    }
}

/// The alert sink serves a run of edges between the same workloads with one edge value (a
/// scan's ports): the stage must end up exactly as if each edge had been recorded on its own.
#[test]
fn the_alert_sink_records_what_each_edge_would_alone() {
    use observer::alert::sink::{Names, denied_edge};

    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let views = views();
    let mut core = Attribution::new(false, t0);
    let reasons: [Arc<str>; 2] = [Arc::from("netfilter_drop"), Arc::from("no_socket")];
    let report = drain(&reasons);
    let stage = |registry: &prometheus::Registry| {
        AlertStage::new(AlertConfig::default(), registry, t0).expect("alert stage")
    };
    let (ra, rb) = (prometheus::Registry::new(), prometheus::Registry::new());
    let mut sink = AlertSink::new(stage(&ra));
    let mut alone = stage(&rb);
    let mut names = Names::default();
    let mut edges = Vec::new();
    for n in 0..3u64 {
        let now = t0 + Duration::from_millis(700 * n);
        let out = core.attribute(&views, &report, &[], now);
        sink.record(out, now);
        for e in &out.edges {
            let edge = denied_edge(e, &mut names);
            alone.record_deny(now, &edge, e.packets, e.isolating_policies());
            edges.push(edge);
        }
    }
    let later = t0 + Duration::from_secs(3);
    assert_eq!(sink.stage_mut().tick(later), alone.tick(later));
    let (a, b) = (sink.stage(), &alone);
    assert!(a.edges().len() > 20, "{} edges", a.edges().len());
    assert_eq!(a.edges().len(), b.edges().len());
    for e in &edges {
        for edge in [e.clone(), e.folded()] {
            assert_eq!(
                a.edges().is_known(later, &edge),
                b.edges().is_known(later, &edge),
                "{edge:?}"
            );
        }
    }
    let statuses = |s: &AlertStage| {
        let mut v: Vec<String> = s.detector().statuses().map(|s| format!("{s:?}")).collect();
        v.sort();
        v
    };
    assert!(!statuses(a).is_empty());
    assert_eq!(statuses(a), statuses(b));
}
