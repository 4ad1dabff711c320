//! End to end with the real daemon (privileged), issue 11 items 2, 3, 4, 7 and issue 12's
//! `--edge-learning`:
//! - hostile HTTP clients (600 idle connections, 200 that request `/metrics` and never read)
//!   against a daemon limited to 512 file descriptors: `/healthz` keeps answering, the inventory
//!   reload keeps working, RSS grows by less than 150 MiB;
//! - a 30,000-port scan from one pod: every metric family on `/metrics` stays within the series
//!   limit, new denied edges fold into `port="other"`, the log line is rate limited;
//! - the process: a second daemon on the same state directory is refused, SIGHUP reloads,
//!   an empty inventory directory is refused and makes `/readyz` fail once older than
//!   `--inventory-max-age`, SIGTERM saves the state, edges denied while learning do not page and
//!   learning survives a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics};
use testkit::simnode::{Enforcement, PodId, SimNode};

const NEW_EDGES: &str = "deny_observer_new_denied_edges_total";

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb * 1024
}

fn set_nofile(pid: u32, n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit reads the valid rlimit passed and writes nothing (old limit is null).
    let rc = unsafe {
        libc::prlimit(
            i32::try_from(pid).unwrap(),
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
}

fn scrape_until(
    daemon: &mut Daemon,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + timeout;
    loop {
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        if let Ok(m) = metrics::scrape(daemon.addr())
            && (ok(&m) || Instant::now() > deadline)
        {
            assert!(
                ok(&m),
                "{what}: not reached in {timeout:?}\n{}",
                daemon.log_tail()
            );
            return m;
        }
        assert!(
            Instant::now() <= deadline,
            "{what}: no scrape in {timeout:?}\n{}",
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A simulated node with `client` and an ingress-isolated `sink-0` (StatefulSet `sink`, under
/// a default-deny policy) in namespace `ns`, its inventory written to `inventory`.
fn denied_pair(ns: &str, inventory: &Path) -> (SimNode, PodId, PodId) {
    let mut node = SimNode::new().expect("simulated node");
    let client = node.add_pod(ns, "client").unwrap();
    let sink = node.add_pod(ns, "sink-0").unwrap();
    let metas = [
        PodMeta::app("client", Owner::None),
        PodMeta::app("sink", Owner::StatefulSet("sink".into())),
    ];
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(sink);
    node.enforce(&policy).unwrap();
    // The NetworkPolicy the nft rules enforce: without it the drops would be `unexplained`,
    // and only policy denies make denied edges.
    let deny = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "sink-default-deny", "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "sink"}}, "policyTypes": ["Ingress"]},
    });
    manifests::write_inventory(inventory, node.pods(), &metas, "e2e-node", vec![deny]).unwrap();
    (node, client, sink)
}

fn netns_inode(node: &SimNode, pod: PodId) -> String {
    let path = format!("/run/netns/{}", node.pod(pod).unwrap().netns);
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
        .to_string()
}

#[test]
fn hostile_http_clients_do_not_starve_probes_reloads_or_memory() {
    if !testkit::privileged("hostile_http_clients_do_not_starve_probes_reloads_or_memory") {
        return;
    }
    let bin = testkit::daemon_bin();
    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    std::fs::create_dir_all(&inventory).unwrap();
    // 20,000 namespaces without policies, all exported (series limit 20,000): a /metrics of
    // about 1.5 MB, so 200 copies would be ~300 MB.
    let namespaces: Vec<_> = (0..20_000)
        .map(|i| manifests::namespace_manifest(&format!("srvh-{i:05}")))
        .collect();
    manifests::write_list(&inventory, "namespaces.json", namespaces).unwrap();
    let addr = free_loopback_addr().unwrap();
    let mut daemon = Daemon::start_with_args(
        &bin,
        &inventory,
        addr,
        work.path().join("daemon.log"),
        &[
            "--series-limit",
            "20000",
            "--reasons",
            "netfilter_drop",
            "--inventory-poll-ms",
            "500",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pid = daemon.pid();
    set_nofile(pid, 512);
    daemon
        .wait_ready(Duration::from_secs(90), || false)
        .unwrap_or_else(|e| panic!("{e}"));
    let body = metrics::http_get(addr, "/metrics").unwrap().body;
    assert!(
        body.len() > 1_000_000,
        "/metrics is only {} bytes right after /readyz",
        body.len()
    );
    let rss_before = rss_bytes(pid);
    // This process holds 800+ connections.
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on valid rlimit structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut own);
        own.rlim_cur = own.rlim_max.max(4096).min(own.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &own);
    }
    assert!(
        own.rlim_cur >= 2048,
        "test needs 2048 fds, has {}",
        own.rlim_cur
    );

    // 200 clients that ask for /metrics and never read, with tiny receive buffers.
    let mut non_readers = Vec::new();
    for _ in 0..200 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .unwrap();
        non_readers.push(s);
    }
    // 600 idle connections, kept up by a thread that replaces the closed ones.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut idle: Vec<TcpStream> = Vec::new();
            let mut opened = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                idle.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).ok();
                    !matches!(std::io::Read::read(&mut &*s, &mut b), Ok(0))
                });
                while idle.len() < 600 {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(s) => {
                            idle.push(s);
                            opened += 1;
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // Probes for 12 s; half-way, the inventory changes and must be reloaded.
    let t0 = Instant::now();
    let mut probes = 0;
    let mut changed = false;
    while t0.elapsed() < Duration::from_secs(12) {
        let start = Instant::now();
        let r = metrics::http_get(addr, "/healthz")
            .unwrap_or_else(|e| panic!("/healthz under attack: {e}\n{}", daemon.log_tail()));
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
        probes += 1;
        if !changed && t0.elapsed() > Duration::from_secs(5) {
            manifests::write_list(
                &inventory,
                "extra.json",
                vec![manifests::namespace_manifest("srvh-extra")],
            )
            .unwrap();
            changed = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss_during = rss_bytes(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = idler.join().unwrap();
    drop(non_readers);
    assert!(opened >= 600, "only {opened} idle connections opened");
    let m = scrape_until(
        &mut daemon,
        "reload of the changed inventory",
        Duration::from_secs(20),
        |m| m.sum("deny_observer_inventory_objects", &[("kind", "namespaces")]) == 20_001.0,
    );
    assert_eq!(
        m.sum(
            "deny_observer_inventory_reloads_total",
            &[("result", "error")]
        ),
        0.0,
        "{}",
        daemon.log_tail()
    );
    assert_eq!(
        m.sum("deny_observer_inventory_last_reload_successful", &[]),
        1.0
    );
    let log = std::fs::read_to_string(daemon.log()).unwrap();
    assert!(!log.contains("Too many open files"), "EMFILE in the log");
    let growth = rss_during.saturating_sub(rss_before);
    eprintln!(
        "e2e_server: {probes} probes ok, {opened} idle connections, RSS {} -> {} MiB",
        rss_before >> 20,
        rss_during >> 20
    );
    assert!(
        growth < 150 << 20,
        "RSS grew by {} MiB under 200 non-reading clients",
        growth >> 20
    );
}

#[test]
fn a_port_scan_keeps_every_metric_family_within_the_series_limit() {
    if !testkit::privileged("a_port_scan_keeps_every_metric_family_within_the_series_limit") {
        return;
    }
    const LIMIT: usize = 2000;
    const PORTS: u16 = 30_000;
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    let (node, client, sink) = denied_pair("srv-scan", &inventory);
    // 5,000 namespaces without policies, beyond the series limit.
    let open: Vec<_> = (0..5000)
        .map(|i| manifests::namespace_manifest(&format!("srv-open-{i:04}")))
        .collect();
    manifests::write_list(&inventory, "open.json", open).unwrap();
    let inode = netns_inode(&node, sink);
    let addr = free_loopback_addr().unwrap();
    let limit = LIMIT.to_string();
    let mut daemon = Daemon::start_with_args(
        &bin,
        &inventory,
        addr,
        work.path().join("daemon.log"),
        &["--series-limit", &limit, "--netns-inode", &inode],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));

    let dst = node.pod(sink).unwrap().ip(false);
    let sent = node
        .in_pod(client, || {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            for port in 1..=PORTS {
                sock.send_to(&[0x42; 16], SocketAddr::new(dst, port))
                    .unwrap();
            }
            u64::from(PORTS)
        })
        .unwrap();
    let m = scrape_until(
        &mut daemon,
        "every datagram counted",
        Duration::from_secs(30),
        |m| {
            m.sum(
                "deny_observer_policy_denies_total",
                &[("destination_workload", "sink")],
            ) == sent as f64
        },
    );
    let text = metrics::http_get(addr, "/metrics").unwrap().body;
    let mut families: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &m.samples {
        *families.entry(s.name.as_str()).or_default() += 1;
    }
    for (family, n) in &families {
        assert!(
            *n <= LIMIT + 1,
            "{family} has {n} series, beyond --series-limit {LIMIT} (+1 overflow)"
        );
    }
    // Ports beyond the budget of 16 fold into one `other` edge.
    let edges: Vec<_> = m
        .select(NEW_EDGES, &[("destination_workload", "sink")])
        .collect();
    let other: Vec<_> = edges
        .iter()
        .filter(|s| s.labels.get("port").map(String::as_str) == Some("other"))
        .collect();
    assert_eq!(edges.len(), 17, "16 ports and `other`: {edges:?}");
    assert_eq!(other.len(), 1);
    assert!(edges.iter().all(|s| s.value == 1.0), "{edges:?}");
    // Open namespaces: bounded, with the overflow series saying there are more.
    let open_ns = m.select("deny_observer_audit_open_namespace", &[]).count();
    assert!(open_ns <= LIMIT + 1, "{open_ns}");
    assert_eq!(
        m.sum(
            "deny_observer_audit_open_namespace",
            &[("target_namespace", "__overflow__")]
        ),
        1.0
    );
    assert!(text.len() < 1_000_000, "/metrics is {} bytes", text.len());
    // The log line is rate limited, and says how many it left out.
    let log = std::fs::read_to_string(daemon.log()).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("new denied edge"))
        .count();
    assert!(lines <= 20, "{lines} new-denied-edge lines for one scan");
    eprintln!(
        "e2e_server: scan of {PORTS} ports: {} families, largest {:?}, /metrics {} bytes, {lines} edge log lines",
        families.len(),
        families.iter().max_by_key(|(_, n)| **n),
        text.len()
    );
}

#[test]
fn signals_lock_staleness_and_learning() {
    if !testkit::privileged("signals_lock_staleness_and_learning") {
        return;
    }
    let bin = testkit::daemon_bin();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory");
    let (node, client, sink) = denied_pair("srv-proc", &inventory);
    let inode = netns_inode(&node, sink);
    let state = work.path().join("state");
    let state_arg = state.to_str().unwrap().to_owned();
    let args = [
        "--netns-inode",
        &inode,
        "--state-dir",
        &state_arg,
        "--edge-learning",
        "1h",
        "--inventory-poll-ms",
        "200",
        "--inventory-max-age",
        "3s",
    ];
    let addr = free_loopback_addr().unwrap();
    let mut daemon =
        Daemon::start_with_args(&bin, &inventory, addr, work.path().join("d1.log"), &args)
            .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));

    // A second daemon on the same state directory is refused, naming the first.
    let mut second = Daemon::start_with_args(
        &bin,
        &inventory,
        free_loopback_addr().unwrap(),
        work.path().join("d2.log"),
        &args,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let status = second
        .wait_exit(Duration::from_secs(15))
        .expect("the second daemon must exit");
    assert!(!status.success());
    let log2 = std::fs::read_to_string(second.log()).unwrap();
    assert!(
        log2.contains("already uses the state directory")
            && log2.contains(&format!("pid {}", daemon.pid())),
        "{log2}"
    );

    // Denied during learning: recorded, not new.
    let dst = SocketAddr::new(node.pod(sink).unwrap().ip(false), 5432);
    node.send_udp(client, dst, 5).unwrap();
    let m = scrape_until(&mut daemon, "learned edge", Duration::from_secs(15), |m| {
        m.sum("deny_observer_denied_edges_learned_total", &[]) == 1.0
    });
    assert_eq!(m.sum(NEW_EDGES, &[]), 0.0, "an edge paged during learning");
    assert_eq!(
        m.sum("deny_observer_edge_learning_active", &[]),
        1.0,
        "{:?}",
        m.select("deny_observer_edge_learning_active", &[])
            .collect::<Vec<_>>()
    );

    // SIGHUP reloads (even though nothing changed) and does not stop the daemon.
    let ok_before = m.sum("deny_observer_inventory_reloads_total", &[("result", "ok")]);
    daemon.signal(libc::SIGHUP).unwrap();
    scrape_until(
        &mut daemon,
        "reload on SIGHUP",
        Duration::from_secs(10),
        |m| m.sum("deny_observer_inventory_reloads_total", &[("result", "ok")]) == ok_before + 1.0,
    );
    daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));

    // An emptied directory is a failed reload, not an empty cluster; /readyz fails once the
    // inventory is older than --inventory-max-age, and recovers with the files.
    let saved: Vec<_> = std::fs::read_dir(&inventory)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let text = std::fs::read(&p).unwrap();
            std::fs::remove_file(&p).unwrap();
            (p, text)
        })
        .collect();
    let m = scrape_until(&mut daemon, "failed reload", Duration::from_secs(10), |m| {
        m.sum("deny_observer_inventory_last_reload_successful", &[]) == 0.0
    });
    assert!(
        m.sum(
            "deny_observer_inventory_reloads_total",
            &[("result", "error")]
        ) >= 1.0
    );
    assert!(
        m.sum("deny_observer_inventory_objects", &[("kind", "pods")]) == 2.0,
        "the last good inventory stays in use"
    );
    std::thread::sleep(Duration::from_secs(5));
    let r = metrics::http_get(addr, "/readyz").unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("inventory_fresh"), "{}", r.body);
    for (p, text) in saved {
        std::fs::write(p, text).unwrap();
    }
    scrape_until(
        &mut daemon,
        "recovered reload",
        Duration::from_secs(10),
        |m| m.sum("deny_observer_inventory_last_reload_successful", &[]) == 1.0,
    );
    assert_eq!(metrics::http_get(addr, "/readyz").unwrap().status, 200);

    // SIGTERM saves the state (the learned edge, and when learning started).
    daemon.signal(libc::SIGTERM).unwrap();
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("exit on SIGTERM");
    assert!(status.success(), "{status}\n{}", daemon.log_tail());
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("denied-edges.json")).unwrap()).unwrap();
    let started = saved["learning_started_unix_ms"]
        .as_u64()
        .expect("learning start saved");
    assert_eq!(saved["edges"][0]["port"], 5432, "{saved}");

    // A restart continues the same learning period: still learning, the edge still known.
    let mut daemon =
        Daemon::start_with_args(&bin, &inventory, addr, work.path().join("d3.log"), &args)
            .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));
    node.send_udp(client, dst, 3).unwrap();
    let m = scrape_until(
        &mut daemon,
        "denies after restart",
        Duration::from_secs(15),
        |m| {
            m.sum(
                "deny_observer_policy_denies_total",
                &[("destination_workload", "sink")],
            ) == 3.0
        },
    );
    assert_eq!(m.sum("deny_observer_edge_learning_active", &[]), 1.0);
    assert_eq!(m.sum(NEW_EDGES, &[]), 0.0);
    assert_eq!(
        m.sum("deny_observer_denied_edges_learned_total", &[]),
        0.0,
        "the edge was already known from before the restart"
    );
    drop(daemon);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("denied-edges.json")).unwrap()).unwrap();
    assert_eq!(saved["learning_started_unix_ms"].as_u64(), Some(started));
}
