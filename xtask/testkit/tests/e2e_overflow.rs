//! End to end on the real kernel (privileged), issue 2: a flood of more distinct flows than the
//! in-kernel flow map holds. The daemon runs with `--flow-map-entries 64`; a pod sends UDP to
//! well over 1000 distinct ports of a pod whose nftables ingress drops everything. What the
//! map could not hold must show up as `deny_observer_events_lost_total{stage="flow_map_evicted"}`,
//! and nothing may vanish: attributed drops plus evicted packets equal nft's counter exactly.
//!
//! The daemon only watches the flooded pod's network namespace (`--netns-inode`): other
//! people's drops on this shared machine would otherwise land in the same tiny map, and
//! their evictions in the same loss counter.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics};
use testkit::simnode::{Enforcement, INGRESS_DROP_COUNTER, SimNode};

const NS: &str = "e2e-flood";
const FLOW_MAP: u32 = 64;
/// Distinct destination ports per address family.
const PORTS: u16 = 1200;
const FIRST_PORT: u16 = 20_000;

/// (drops attributed to the flooded workload, evicted packets, netfilter_drop kernel total).
fn observed(m: &Metrics) -> (f64, f64, f64) {
    (
        m.sum(
            "deny_observer_drops_total",
            &[
                ("destination_namespace", NS),
                ("destination_workload", "sink"),
            ],
        ),
        m.sum(
            "deny_observer_events_lost_total",
            &[("stage", "flow_map_evicted")],
        ),
        m.sum(
            "deny_observer_kernel_drops_total",
            &[("reason", "netfilter_drop")],
        ),
    )
}

#[test]
fn flood_beyond_the_flow_map_is_counted_as_evicted_and_nothing_vanishes() {
    if !testkit::privileged("flood_beyond_the_flow_map_is_counted_as_evicted_and_nothing_vanishes")
    {
        return;
    }
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();
    let t0 = Instant::now();

    let mut node = SimNode::new().expect("simulated node");
    let source = node.add_pod(NS, "source").unwrap();
    let sink = node.add_pod(NS, "sink-0").unwrap();
    let metas = [
        PodMeta::app("source", Owner::None),
        PodMeta::app("sink", Owner::StatefulSet("sink".into())),
    ];
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(sink);
    node.enforce(&policy).unwrap();

    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(&inventory, node.pods(), &metas, "e2e-node", Vec::new()).unwrap();

    let sink_pod = node.pod(sink).unwrap().clone();
    let netns_path = format!("/run/netns/{}", sink_pod.netns);
    let inode = std::fs::metadata(&netns_path)
        .unwrap_or_else(|e| panic!("stat {netns_path}: {e}"))
        .ino()
        .to_string();
    let addr: SocketAddr = free_loopback_addr().unwrap();
    let flow_map = FLOW_MAP.to_string();
    let mut daemon = Daemon::start_with_args(
        &bin,
        &inventory,
        addr,
        work.path().join("daemon.log"),
        &[
            "--flow-map-entries",
            &flow_map,
            // The flow map alone: with the drop cache it only gets the drops the cache's
            // flush log refuses, which depends on the reader thread's timing.
            "--drop-log-records",
            "0",
            "--netns-inode",
            &inode,
            "--reasons",
            "all",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));

    // Each port gets 1 to 3 datagrams, so the total is not simply a multiple of the flows.
    let mut sent = 0u64;
    for v6 in [false, true] {
        let dst = sink_pod.ip(v6);
        let n = node
            .in_pod(source, || {
                let bind: SocketAddr = if v6 {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                };
                let sock = UdpSocket::bind(bind).unwrap();
                let mut n = 0u64;
                for i in 0..PORTS {
                    for _ in 0..=(i % 3) {
                        sock.send_to(&[0xa5; 48], SocketAddr::new(dst, FIRST_PORT + i))
                            .unwrap();
                        n += 1;
                    }
                }
                n
            })
            .unwrap();
        sent += n;
    }
    let flood_secs = t0.elapsed().as_secs_f64();
    let dropped = node.counter(sink, INGRESS_DROP_COUNTER).unwrap().packets;
    assert_eq!(dropped, sent, "the harness: nft must drop every datagram");

    // Settle: wait until attributed + evicted reach nft's count, then until two scrapes a
    // drain apart agree.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut prev: Option<(f64, f64, f64)> = None;
    let m = loop {
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        let m = metrics::scrape(daemon.addr()).unwrap();
        let now = observed(&m);
        if prev == Some(now) && now.0 + now.1 >= dropped as f64 {
            break m;
        }
        if Instant::now() > deadline {
            break m;
        }
        prev = Some(now);
        std::thread::sleep(Duration::from_millis(1500));
    };
    let (attributed, evicted, kernel) = observed(&m);
    let log = || format!("daemon log:\n{}", daemon.log_tail());
    assert!(
        evicted > 0.0,
        "{} flows into a {FLOW_MAP}-entry map, yet no flow_map_evicted loss (attributed \
         {attributed}, nft {dropped})\n{}",
        2 * u64::from(PORTS),
        log()
    );
    assert_eq!(
        kernel,
        dropped as f64,
        "per-reason kernel totals are never evicted: must equal nft's count\n{}",
        log()
    );
    // The daemon only watches the sink's namespace, but the kernel drops a few other packets
    // there too (neighbour discovery and the like), and an evicted flow can no longer say
    // which it was. So the identity holds over every reason of that namespace, and the flood's
    // share of the loss is bounded by it.
    let all_attributed = m.sum("deny_observer_drops_total", &[]);
    let all_kernel = m.sum("deny_observer_kernel_drops_total", &[]);
    assert_eq!(
        all_attributed + evicted,
        all_kernel,
        "attributed {all_attributed} + evicted {evicted} != kernel total {all_kernel} \
         (flood: attributed {attributed}, nft {dropped})\n{}",
        log()
    );
    assert!(
        attributed + evicted >= dropped as f64 && attributed <= dropped as f64,
        "flood: attributed {attributed} + evicted {evicted} does not cover nft's {dropped}\n{}",
        log()
    );
    assert!(
        attributed > 0.0,
        "nothing attributed at all; the map should still hold some flows\n{}",
        log()
    );
    eprintln!(
        "e2e_overflow: {dropped} datagrams over {} flows in {flood_secs:.1} s: attributed \
         {attributed}, evicted {evicted}; total {:.1} s",
        2 * u64::from(PORTS),
        t0.elapsed().as_secs_f64()
    );
}
