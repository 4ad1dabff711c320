//! `cargo xtask bench`: what deny-observer costs during a deny flood, measured against the
//! no-observer limit, against a bpftrace peer on the same hook, and against an iptables-LOG
//! plus log-tailing pipeline in the style of kube-iptables-tailer (issue 6).
//!
//! A simulated node ([`SimNode`]) holds a sender pod and a destination pod whose nftables
//! input hook drops everything (its named counter gives the actual drop count). The flood
//! sender ([`crate::flood`]) sends UDP and raw TCP SYNs to it, with few flows and with many.
//! The configurations (no observer, deny-observer, bpftrace, log-tail) are interleaved within each round,
//! with the order rotated every round: the machine is noisy, so only ratios within a run mean
//! anything. A connection-rate scenario (TCP connect/accept between two pods, nothing dropped)
//! runs with no observer and with the daemon, and checks `deny_observer_connections_total`.
//! Then two one-off phases run the daemon alone: a flood beyond a small flow map
//! (loss must be counted), and a 50,000-port scan (series must stay bounded).

mod connections;
pub mod logtail;
pub mod map;
mod observer;
mod report;
mod sys;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

// The bench's modules reach the fixtures through these names (`crate::cmd`, ...).
use observer::{Bpftrace, Daemon, LogTailer, MapSizes};
use testkit::flood::{self, FloodConfig, FloodKind, Until};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::Metrics;
use testkit::simnode::{Enforcement, INGRESS_DROP_COUNTER, PodId, SimNode};
use testkit::{cmd, daemon, metrics, simnode};

/// Kubernetes namespace of the sender pod.
pub const SRC_NAMESPACE: &str = "bench-src";
/// Workload (Deployment) of the sender pod.
pub const SRC_WORKLOAD: &str = "flood-source";
/// Kubernetes namespace of the destination pod.
pub const DST_NAMESPACE: &str = "bench-dst";
/// Workload (Deployment) of the destination pod.
pub const DST_WORKLOAD: &str = "flood-target";
/// Workload (Deployment) of the connection scenario's server pod (not isolated).
pub const CONN_WORKLOAD: &str = "conn-target";

const FEW_FLOWS: u16 = 4;
const FIRST_PORT: u16 = 10_000;
const SCAN_PORTS: u16 = 50_000;
const OVERFLOW_MAP_ENTRIES: u32 = 1024;
const OVERFLOW_FLOWS: u16 = 8192;
/// The smallest ring buffer the kernel takes (one page): the overflow phase uses it, so that
/// the daemon also survives sample loss there.
const TINY_RINGBUF: u32 = 4096;
/// How long the daemon may take to show a window's drops before we give up waiting.
const CATCH_UP: Duration = Duration::from_secs(3);
/// The daemon's drain interval (its `--drain-interval-ms` default) plus a margin: after this,
/// a window's drops have been drained once more.
const DRAIN_SETTLE: Duration = Duration::from_millis(1300);
/// Packets in each latency burst, and bursts per daemon session.
const BURST: u64 = 1000;
const BURSTS: usize = 4;
/// Extra pause before each further burst: with the bursts' own durations this spreads them
/// over the daemon's drain cycle, so the worst case is sampled, not only a lucky phase.
const BURST_STEP: Duration = Duration::from_millis(250);
/// How long the daemon's fixed (no-flood) CPU cost is measured at the start of a session.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Polling step and idle threshold (share of one core) for [`settle_cpu`].
const SETTLE_STEP: Duration = Duration::from_millis(100);
const IDLE_SHARE: f64 = 0.02;
/// Length of each scenario's flood with `kernel.bpf_stats_enabled` on.
const STATS_WINDOW: Duration = Duration::from_secs(1);
/// Batch of messages per `sendmmsg`.
const BATCH: usize = 64;

/// `cargo xtask bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A short run for a check (finishes in under 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Also write the results to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sender threads, one per core asked for (default 1: the observer's userspace then has a
    /// core, as on a node where the flood comes from one pod).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Rounds of interleaved configurations (default 3 with --quick, else 5).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Configurations to run, comma separated: limit, deny-observer, bpftrace, log-tail.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "limit,deny-observer,bpftrace,log-tail"
    )]
    pub configs: Vec<String>,
    /// Use this daemon binary instead of building target/release/deny-observer.
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// Only the interleaved flood rounds: no overflow, port-scan or inventory phases (their
    /// targets are then not checked). For comparing changes to the kernel program quickly.
    #[arg(long)]
    pub floods_only: bool,
}

/// A configuration under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    /// No observer: the limit.
    Limit,
    /// The deny-observer daemon with full attribution and metrics.
    Daemon,
    /// The bpftrace one-liner.
    Bpftrace,
    /// An nft `log` statement on the drop rule and a process tailing the kernel log
    /// (kube-iptables-tailer style).
    LogTail,
}

impl Config {
    /// Name in tables, JSON and `--configs`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::Daemon => "deny-observer",
            Self::Bpftrace => "bpftrace",
            Self::LogTail => "log-tail",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        [Self::Limit, Self::Daemon, Self::Bpftrace, Self::LogTail]
            .into_iter()
            .find(|c| c.name() == s.trim())
            .with_context(|| {
                format!("unknown configuration {s:?} (limit, deny-observer, bpftrace, log-tail)")
            })
    }
}

/// A traffic pattern measured in every session.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Name in tables and JSON.
    pub name: &'static str,
    /// Packet kind.
    pub kind: FloodKind,
    /// Distinct flows (destination ports from [`FIRST_PORT`]).
    pub flows: u16,
}

/// One measured flood window.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Drops nftables counted (the truth).
    pub actual: u64,
    /// Packets the sender got out.
    pub sent: u64,
    /// Sending time.
    pub elapsed: Duration,
    /// What the observer counted for this window, when it can say per window (the daemon).
    pub counted: Option<u64>,
    /// Packets the daemon reported lost to flow-map eviction meanwhile (whole node).
    pub lost: Option<u64>,
    /// Observer CPU time over the window (including the catch-up).
    pub cpu: Option<Duration>,
}

impl Window {
    /// Drops per second.
    pub fn rate(&self) -> f64 {
        self.actual as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One configuration in one round.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// One window per scenario, in scenario order.
    pub windows: Vec<Window>,
    /// eBPF run time per program run in each scenario (scenario order; `None` where the
    /// programs did not run), from the stats windows.
    pub ns_per_drop: Vec<Option<f64>>,
    /// deny-observer's and the bpftrace one-liner's eBPF run time per program run in each
    /// scenario, measured on the same floods with both attached (daemon sessions, when bpftrace
    /// is a configuration of the run too): one machine state for both, where the separate
    /// sessions' figures are minutes apart.
    pub paired_ns: Vec<Option<(f64, f64)>>,
    /// The same with the one-liner attached before the daemon, so that its program runs first
    /// on each drop. Whichever runs first pays for the cache misses on the skb, the packet and
    /// the device that the second then finds warm (the same build attached twice costs 12 to
    /// 16 % less in second place), so the figure that decides averages both orders.
    pub paired_ns_reversed: Vec<Option<(f64, f64)>>,
    /// Drop → counter latency of small bursts: `None` where /metrics never showed the burst.
    pub latencies: Vec<Option<Duration>>,
    /// Observer CPU per second of wall time with no flood (its fixed cost).
    pub idle_cpu: Option<f64>,
    /// Peak RSS of the observer.
    pub peak_rss: Option<u64>,
    /// Session-wide `(counted, actual)` when the observer can only say at the end (bpftrace,
    /// log-tail).
    pub session_count: Option<(u64, u64)>,
    /// What the log tailer lost on the way, when it ran.
    pub log_loss: Option<LogLoss>,
    /// The connection-rate window (no observer and the daemon only).
    pub conn: Option<connections::ConnWindow>,
}

/// What the kernel-log path lost in one log-tail session, as the tailer could see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLoss {
    /// Kernel log records (any source) overwritten before the tailer read them: gaps in the
    /// `/dev/kmsg` sequence numbers.
    pub lost_records: u64,
    /// Reads that failed with EPIPE (the ring buffer had overtaken the reader).
    pub overruns: u64,
    /// Sum of "N callbacks suppressed" lines.
    pub suppressed: u64,
    /// Prefixed lines the tailer could not parse.
    pub unparsed: u64,
}

/// The flood beyond a small flow map.
#[derive(Clone, Debug, Default)]
pub struct Overflow {
    /// `--flow-map-entries`.
    pub map_entries: u32,
    /// Distinct flows sent.
    pub flows: u16,
    /// nft count.
    pub actual: u64,
    /// Attributed by the daemon.
    pub counted: u64,
    /// `deny_observer_events_lost_total{stage="flow_map_evicted"}`.
    pub lost: u64,
    /// Netfilter drops elsewhere on the node in the same time (other people's traffic), from
    /// the daemon's per-reason kernel totals.
    pub foreign: i64,
    /// Attributed by the daemon on the whole node, every reason: the eviction loss is counted
    /// node-wide, so this is what it adds up with.
    pub counted_all: u64,
    /// The kernel program's exact per-reason totals on the whole node, every reason.
    pub kernel_all: u64,
}

/// The 50,000-port scan.
#[derive(Clone, Debug, Default)]
pub struct PortScan {
    /// Distinct destination ports (one SYN each).
    pub ports: u16,
    /// nft count.
    pub actual: u64,
    /// Counted by the daemon for the scanned workload.
    pub counted: u64,
    /// Series of `deny_observer_drops_total` (whole node).
    pub series_total: usize,
    /// Of which for the scanned destination.
    pub series_dst: usize,
    /// Size of the /metrics body in bytes.
    pub metrics_bytes: usize,
    /// Peak RSS of the daemon after the scan.
    pub peak_rss: u64,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Machine description.
    pub machine: String,
    /// Sender threads.
    pub threads: usize,
    /// Window length.
    pub window: Duration,
    /// The scenarios.
    pub scenarios: Vec<Scenario>,
    /// Configurations run, in [`Config`] order.
    pub configs: Vec<Config>,
    /// `sessions[round]` holds `(config, session)` in the order they ran.
    pub rounds: Vec<Vec<(Config, Session)>>,
    /// The overflow phase, when the daemon ran.
    pub overflow: Option<Overflow>,
    /// The port scan phase, when the daemon ran.
    pub port_scan: Option<PortScan>,
    /// Number of NETFILTER_DROP on this kernel.
    pub netfilter_drop: u64,
    /// Wall time of the whole benchmark.
    pub wall: Duration,
}

/// Everything the sessions share.
struct Bench {
    node: SimNode,
    src: PodId,
    dst: PodId,
    dst_ip: IpAddr,
    /// The connection scenario's server.
    conn: PodId,
    inventory: tempfile::TempDir,
    logs: tempfile::TempDir,
    bin: PathBuf,
    threads: usize,
    window: Duration,
    netfilter_drop: u64,
    /// Measure the daemon's eBPF cost paired with the bpftrace one-liner's (both configurations
    /// are in the run).
    paired: bool,
}

/// Runs the benchmark (needs root) and prints the report.
pub fn run(args: &BenchArgs, bin: &Path) -> anyhow::Result<()> {
    if !crate::cmd::is_root() {
        bail!("cargo xtask bench needs root (network namespaces, nftables, BPF); run it as root");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let started = Instant::now();
    let mut configs: Vec<Config> = args
        .configs
        .iter()
        .map(|c| Config::parse(c))
        .collect::<anyhow::Result<_>>()?;
    configs.sort();
    configs.dedup();
    if configs.is_empty() {
        bail!("--configs names no configuration");
    }
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let (window, many) = if args.quick {
        (Duration::from_millis(1500), 4096)
    } else {
        (Duration::from_secs(5), 16_384)
    };
    let scenarios = vec![
        Scenario {
            name: "udp-few",
            kind: FloodKind::Udp,
            flows: FEW_FLOWS,
        },
        Scenario {
            name: "syn-few",
            kind: FloodKind::TcpSyn,
            flows: FEW_FLOWS,
        },
        Scenario {
            name: "udp-many",
            kind: FloodKind::Udp,
            flows: many,
        },
    ];

    sys::ensure_tracefs()?;
    let netfilter_drop = sys::drop_reason_number("NETFILTER_DROP")?;
    if let Ok(removed) = crate::simnode::cleanup_stale()
        && !removed.is_empty()
    {
        eprintln!(
            "bench: removed leftovers of dead runs: {}",
            removed.join(", ")
        );
    }
    let mut bench = Bench::new(bin, args.threads, window, netfilter_drop)?;
    bench.paired = configs.contains(&Config::Daemon) && configs.contains(&Config::Bpftrace);
    eprintln!(
        "bench: {} rounds of {} ({} s windows, {} sender thread(s)); sender {} -> {} {}",
        rounds,
        configs
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        window.as_secs_f64(),
        args.threads,
        bench.node.pod(bench.src)?.ipv4,
        bench.dst_ip,
        if configs.contains(&Config::Daemon) {
            format!("(daemon {})", bin.display())
        } else {
            String::new()
        }
    );

    let mut results = Results {
        machine: sys::machine(),
        threads: args.threads,
        window,
        scenarios: scenarios.clone(),
        configs: configs.clone(),
        netfilter_drop,
        ..Results::default()
    };
    // Distinct flow keys one daemon session creates: the UDP ports of every scenario (few ⊂
    // many) plus the TCP ones. The daemon's map gets exactly that size: "flows up to the map
    // size".
    let session_keys = u32::from(many) + u32::from(FEW_FLOWS);
    for round in 0..rounds {
        let mut order = configs.clone();
        let shift = round % order.len();
        order.rotate_left(shift);
        let mut sessions = Vec::new();
        for config in order {
            eprintln!("bench: round {}/{rounds}: {}", round + 1, config.name());
            let session = bench
                .session(config, &scenarios, session_keys, round)
                .with_context(|| format!("round {}, {}", round + 1, config.name()))?;
            sessions.push((config, session));
        }
        results.rounds.push(sessions);
    }
    if configs.contains(&Config::Daemon) && !args.floods_only {
        eprintln!(
            "bench: overflow: {OVERFLOW_FLOWS} flows into a {OVERFLOW_MAP_ENTRIES}-entry flow map"
        );
        results.overflow = Some(bench.overflow().context("overflow phase")?);
        eprintln!("bench: port scan of {SCAN_PORTS} ports");
        results.port_scan = Some(bench.port_scan().context("port scan phase")?);
    }
    results.wall = started.elapsed();
    let report = report::Report::new(&results);
    println!("{}", report.text());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json_string()?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    let failed: Vec<&str> = report
        .targets
        .iter()
        .filter(|t| t.pass == Some(false))
        .map(|t| t.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("{} target(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

impl Bench {
    fn new(
        bin: &Path,
        threads: usize,
        window: Duration,
        netfilter_drop: u64,
    ) -> anyhow::Result<Self> {
        let mut node = SimNode::new()?;
        let src = node.add_pod(SRC_NAMESPACE, "flood-source-7c9d8-abcde")?;
        let dst = node.add_pod(DST_NAMESPACE, "flood-target-5f6b7-vwxyz")?;
        let mut policy = Enforcement::default();
        policy.ingress_isolated.insert(dst);
        node.enforce(&policy)?;
        let dst_ip = node.pod(dst)?.ip(false);
        let conn = node.add_pod(DST_NAMESPACE, "conn-target-6d7e8-fghij")?;

        let inventory = tempfile::Builder::new()
            .prefix("deny-observer-bench-inv-")
            .tempdir()
            .context("creating the inventory directory")?;
        let mut objects = vec![
            manifests::namespace_manifest(SRC_NAMESPACE),
            manifests::namespace_manifest(DST_NAMESPACE),
        ];
        for (id, workload, hash) in [
            (src, SRC_WORKLOAD, "7c9d8"),
            (dst, DST_WORKLOAD, "5f6b7"),
            (conn, CONN_WORKLOAD, "6d7e8"),
        ] {
            let meta = PodMeta::app(
                workload,
                Owner::Deployment {
                    name: workload.to_owned(),
                    hash: hash.to_owned(),
                },
            );
            objects.push(manifests::pod_manifest(node.pod(id)?, &meta, "bench-node"));
        }
        manifests::write_list(inventory.path(), "bench.json", objects)
            .context("writing the inventory")?;
        let logs = tempfile::Builder::new()
            .prefix("deny-observer-bench-logs-")
            .tempdir()
            .context("creating the log directory")?;
        Ok(Self {
            node,
            src,
            dst,
            dst_ip,
            conn,
            inventory,
            logs,
            bin: bin.to_owned(),
            threads,
            window,
            netfilter_drop,
            paired: false,
        })
    }

    /// The stats window again with the bpftrace one-liner attached next to (after) the daemon's
    /// programs: each drop runs both, so the two costs are measured on the same packets in the
    /// same machine state. A one-liner that fails to start or to stop loses only this figure.
    fn paired_stats(
        &self,
        scenarios: &[Scenario],
        daemon: &Daemon,
        round: usize,
    ) -> anyhow::Result<Vec<Option<(f64, f64)>>> {
        let bpftrace = match Bpftrace::start(self.log(&format!("bpftrace-paired-{round}"))) {
            Ok(b) => b,
            Err(err) => {
                eprintln!("bench:   no paired eBPF figures this round: {err:#}");
                return Ok(Vec::new());
            }
        };
        self.paired_window(
            scenarios,
            daemon,
            bpftrace,
            "eBPF ns/drop paired, daemon attached first, deny-observer / bpftrace",
        )
    }

    /// [`Bench::paired_stats`] in the other order: the one-liner attaches first, then a daemon
    /// of its own (same sizes), so that on each drop the one-liner's program runs before the
    /// daemon's. A tracepoint calls its probes in the order they were attached.
    fn paired_stats_reversed(
        &self,
        scenarios: &[Scenario],
        sizes: MapSizes,
        round: usize,
    ) -> anyhow::Result<Vec<Option<(f64, f64)>>> {
        let started = Bpftrace::start(self.log(&format!("bpftrace-first-{round}"))).and_then(|b| {
            let daemon = Daemon::start(
                &self.bin,
                self.inventory.path(),
                sizes,
                self.log(&format!("daemon-second-{round}")),
            )?;
            Ok((b, daemon))
        });
        let (bpftrace, daemon) = match started {
            Ok(both) => both,
            Err(err) => {
                eprintln!(
                    "bench:   no paired eBPF figures with the one-liner first this round: {err:#}"
                );
                return Ok(Vec::new());
            }
        };
        self.paired_window(
            scenarios,
            &daemon,
            bpftrace,
            "eBPF ns/drop paired, one-liner attached first, deny-observer / bpftrace",
        )
    }

    /// The stats windows with both programs attached, then the one-liner stopped: per
    /// scenario `(deny-observer, one-liner)` ns per run, `None` where either did not run.
    fn paired_window(
        &self,
        scenarios: &[Scenario],
        daemon: &Daemon,
        bpftrace: Bpftrace,
        what: &str,
    ) -> anyhow::Result<Vec<Option<(f64, f64)>>> {
        let both =
            self.stats_windows(scenarios, &[&daemon.proc.progs, &bpftrace.proc.progs], what)?;
        if let Err(err) = bpftrace.finish() {
            eprintln!("bench:   the paired one-liner did not stop cleanly: {err:#}");
        }
        Ok(match both.as_slice() {
            [ours, theirs] => ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| Some(((*a)?, (*b)?)))
                .collect(),
            _ => Vec::new(),
        })
    }

    fn flood_config(
        &self,
        kind: FloodKind,
        flows: u16,
        first_port: u16,
    ) -> anyhow::Result<FloodConfig> {
        Ok(FloodConfig {
            netns: Some(self.node.pod(self.src)?.netns.clone()),
            kind,
            dst: self.dst_ip,
            first_port,
            flows,
            threads: self.threads,
            batch: BATCH,
        })
    }

    fn dropped(&self) -> anyhow::Result<u64> {
        Ok(self.node.counter(self.dst, INGRESS_DROP_COUNTER)?.packets)
    }

    fn log(&self, what: &str) -> PathBuf {
        self.logs.path().join(format!("{what}.log"))
    }

    fn session(
        &self,
        config: Config,
        scenarios: &[Scenario],
        map_entries: u32,
        round: usize,
    ) -> anyhow::Result<Session> {
        let mut session = Session::default();
        match config {
            Config::Limit => {
                for s in scenarios {
                    session.windows.push(self.window(s, None, None, false)?);
                }
                session.conn = Some(self.conn_window(None)?);
            }
            Config::Daemon => {
                let sizes = MapSizes {
                    flow_map_entries: Some(map_entries),
                    ringbuf_bytes: None,
                    drop_log_records: None,
                };
                let mut daemon = Daemon::start(
                    &self.bin,
                    self.inventory.path(),
                    sizes,
                    self.log(&format!("daemon-{round}")),
                )?;
                let pid = daemon.proc.pid();
                let cpu0 = sys::CpuSnapshot::take(pid)?;
                let idle = Instant::now();
                std::thread::sleep(IDLE_WINDOW);
                session.idle_cpu = Some(
                    sys::CpuSnapshot::take(pid)?
                        .since(&cpu0)
                        .total
                        .as_secs_f64()
                        / idle.elapsed().as_secs_f64(),
                );
                for s in scenarios {
                    session
                        .windows
                        .push(self.window(s, Some(pid), Some(&mut daemon), false)?);
                }
                session.conn = Some(self.conn_window(Some(&mut daemon))?);
                for i in 0..BURSTS {
                    // Bursts at different phases of the drain cycle.
                    std::thread::sleep(BURST_STEP * i as u32);
                    session.latencies.push(self.burst_latency(&mut daemon)?);
                }
                session.ns_per_drop = self.stats_window(scenarios, &daemon.proc.progs)?;
                if self.paired {
                    session.paired_ns = self.paired_stats(scenarios, &daemon, round)?;
                }
                if let Ok((m, _)) = daemon.scrape() {
                    let full = m.sum(
                        "deny_observer_events_lost_total",
                        &[("stage", "drop_log_full")],
                    ) as u64;
                    eprintln!(
                        "bench:   drop-log full (whole session, counted in the flow map): {full}"
                    );
                }
                session.peak_rss = sys::peak_rss(daemon.proc.pid()).ok();
                // Stopped before the reversed window starts a daemon of its own.
                drop(daemon);
                if self.paired {
                    session.paired_ns_reversed =
                        self.paired_stats_reversed(scenarios, sizes, round)?;
                }
            }
            Config::Bpftrace => {
                let bpftrace = Bpftrace::start(self.log(&format!("bpftrace-{round}")))?;
                let pid = bpftrace.proc.pid();
                for s in scenarios {
                    session
                        .windows
                        .push(self.window(s, Some(pid), None, false)?);
                }
                let before = self.dropped()?;
                session.ns_per_drop = self.stats_window(scenarios, &bpftrace.proc.progs)?;
                let stats_actual = self.dropped()? - before;
                session.peak_rss = sys::peak_rss(pid).ok();
                // bpftrace's own count is a cross-check, not a target: a round whose one-liner
                // hangs on exit keeps its throughput and eBPF figures, loses only the count, and
                // says so, rather than ending the whole run before its summary.
                match bpftrace.finish() {
                    Ok(counts) => {
                        let actual: u64 =
                            session.windows.iter().map(|w| w.actual).sum::<u64>() + stats_actual;
                        let counted = counts.get(&self.netfilter_drop).copied().unwrap_or(0);
                        session.session_count = Some((counted, actual));
                    }
                    Err(err) => eprintln!(
                        "bench:   bpftrace round {round}: no count from the one-liner (left out of its accuracy): {err:#}"
                    ),
                }
            }
            Config::LogTail => {
                // Guards in this order come off in reverse, panics included: the tailer stops,
                // then the LOG statement leaves the rule, then the sysctl is restored.
                let _all_netns = logtail::nf_log_all_netns()?;
                let _log_rule = logtail::LogRule::install(&self.node, self.dst)?;
                let tailer = LogTailer::start(self.log(&format!("log-tail-{round}")))?;
                let pid = tailer.proc.pid();
                for s in scenarios {
                    session.windows.push(self.window(s, Some(pid), None, true)?);
                }
                session.peak_rss = sys::peak_rss(pid).ok();
                let tally = tailer.finish()?;
                let actual: u64 = session.windows.iter().map(|w| w.actual).sum();
                let counted = tally.between(self.node.pod(self.src)?.ip(false), self.dst_ip);
                session.session_count = Some((counted, actual));
                session.log_loss = Some(LogLoss {
                    lost_records: tally.lost_records,
                    overruns: tally.overruns,
                    suppressed: tally.suppressed,
                    unparsed: tally.unparsed,
                });
                eprintln!(
                    "bench:   log-tail: counted {counted} of {actual} drops; {} kernel log records overwritten unread ({} overruns), {} callbacks suppressed",
                    tally.lost_records, tally.overruns, tally.suppressed
                );
            }
        }
        Ok(session)
    }

    /// One flood of `scenario` for the window length. With a daemon, waits until its
    /// /metrics shows every drop (or [`CATCH_UP`] passes) and records what it counted. With
    /// `settle`, waits until the observer has gone idle (it works through a backlog after the
    /// flood, the tailer through the kernel log) so that work is billed to this window.
    fn window(
        &self,
        scenario: &Scenario,
        observer_pid: Option<u32>,
        mut daemon: Option<&mut Daemon>,
        settle: bool,
    ) -> anyhow::Result<Window> {
        let cfg = self.flood_config(scenario.kind, scenario.flows, FIRST_PORT)?;
        let base_counted = match daemon.as_deref_mut() {
            Some(d) => {
                let m = d.scrape()?.0;
                Some((counted(&m), lost_evicted(&m)))
            }
            None => None,
        };
        let cpu0 = observer_pid.map(sys::CpuSnapshot::take).transpose()?;
        let before = self.dropped()?;
        let stats = flood::flood(&cfg, Until::Elapsed(self.window))
            .with_context(|| format!("flood {}", scenario.name))?;
        let flood_end = Instant::now();
        let actual = self.dropped()? - before;
        if let (true, Some(pid)) = (settle, observer_pid) {
            settle_cpu(pid)?;
        }
        let mut w = Window {
            actual,
            sent: stats.sent,
            elapsed: stats.elapsed,
            ..Window::default()
        };
        if let (Some(d), Some(base)) = (daemon, base_counted) {
            // No polling during the drain: scrapes cost the daemon CPU, which would be billed
            // to the drops. Wait for a drain, then look; poll only if it is not all there yet.
            std::thread::sleep(DRAIN_SETTLE);
            loop {
                let m = d.scrape()?.0;
                w.counted = Some(counted(&m).saturating_sub(base.0));
                w.lost = Some(lost_evicted(&m).saturating_sub(base.1));
                if w.counted >= Some(actual) || flood_end.elapsed() > CATCH_UP {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let (Some(pid), Some(c0)) = (observer_pid, cpu0) {
            let d = sys::CpuSnapshot::take(pid)?.since(&c0);
            let threads: Vec<String> = d
                .by_name
                .iter()
                .filter(|(_, t)| !t.is_zero())
                .map(|(n, t)| format!("{n} {:.2} ms", t.as_secs_f64() * 1e3))
                .collect();
            eprintln!(
                "bench:   {}: {} drops, observer CPU {:.2} ms ({}){}",
                scenario.name,
                actual,
                d.total.as_secs_f64() * 1e3,
                threads.join(", "),
                if d.vanished > 0 {
                    format!(
                        "; {} thread(s) ended meanwhile, their last stretch is missing",
                        d.vanished
                    )
                } else {
                    String::new()
                }
            );
            w.cpu = Some(d.total);
        }
        Ok(w)
    }

    /// The connection-rate scenario: TCP connect/accept from the sender pod to the (allowed)
    /// connection server for the window length. With a daemon, waits until its /metrics shows
    /// every connection on the edge (or [`CATCH_UP`] passes) and records what it counted.
    fn conn_window(
        &self,
        mut daemon: Option<&mut Daemon>,
    ) -> anyhow::Result<connections::ConnWindow> {
        let server = connections::Server::start(&self.node.pod(self.conn)?.netns)?;
        let to = std::net::SocketAddr::new(self.node.pod(self.conn)?.ip(false), connections::PORT);
        let base = match daemon.as_deref_mut() {
            Some(d) => Some(conn_counted(&d.scrape()?.0)),
            None => None,
        };
        let (made, elapsed) =
            connections::connect_loop(&self.node.pod(self.src)?.netns, to, self.window)
                .context("connect loop")?;
        let end = Instant::now();
        let mut w = connections::ConnWindow {
            connections: made,
            elapsed,
            ..connections::ConnWindow::default()
        };
        if let (Some(d), Some(base)) = (daemon, base) {
            std::thread::sleep(DRAIN_SETTLE);
            loop {
                let counted = conn_counted(&d.scrape()?.0).saturating_sub(base);
                w.counted = Some(counted);
                if counted >= made || end.elapsed() > CATCH_UP {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        w.accepted = server.accepted();
        eprintln!(
            "bench:   tcp-connect: {} connections in {:.2} s ({:.0}/s){}",
            made,
            elapsed.as_secs_f64(),
            w.rate(),
            w.counted
                .map(|c| format!(", counted {c}"))
                .unwrap_or_default()
        );
        Ok(w)
    }

    /// Sends [`BURST`] datagrams and polls /metrics until they all show: the time from the
    /// last one sent until then. Uses the few-flows ports, whose keys are already in the map.
    fn burst_latency(&self, daemon: &mut Daemon) -> anyhow::Result<Option<Duration>> {
        let cfg = self.flood_config(FloodKind::Udp, FEW_FLOWS, FIRST_PORT)?;
        let base = counted(&daemon.scrape()?.0);
        let before = self.dropped()?;
        flood::send_exact(&cfg, BURST)?;
        let sent = Instant::now();
        let actual = self.dropped()? - before;
        while sent.elapsed() < CATCH_UP {
            if counted(&daemon.scrape()?.0).saturating_sub(base) >= actual {
                return Ok(Some(sent.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(None)
    }

    /// A short flood of each scenario with `bpf_stats_enabled` on: run time per program run,
    /// per scenario. Every scenario, not only the few-flows one: the per-drop cost grows with
    /// the number of keys (hash buckets and entries that no longer fit the caches), so each is
    /// compared with the peer's in the same scenario.
    fn stats_window(
        &self,
        scenarios: &[Scenario],
        progs: &BTreeSet<u64>,
    ) -> anyhow::Result<Vec<Option<f64>>> {
        let mut each = self.stats_windows(scenarios, &[progs], "eBPF ns/drop")?;
        Ok(each.pop().unwrap_or_default())
    }

    /// [`Bench::stats_window`] for several sets of programs attached at once, all measured on
    /// the same floods: one `Vec` per set, in `sets` order.
    fn stats_windows(
        &self,
        scenarios: &[Scenario],
        sets: &[&BTreeSet<u64>],
        what: &str,
    ) -> anyhow::Result<Vec<Vec<Option<f64>>>> {
        let _on = sys::SysctlGuard::bpf_stats()?;
        let mut out = vec![Vec::new(); sets.len()];
        let mut each = Vec::new();
        for s in scenarios {
            let cfg = self.flood_config(s.kind, s.flows, FIRST_PORT)?;
            let before = sets
                .iter()
                .map(|p| sys::run_stats(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            flood::flood(&cfg, Until::Elapsed(STATS_WINDOW))?;
            let mut shown = Vec::new();
            for ((set, (t0, c0)), out) in sets.iter().zip(before).zip(&mut out) {
                let (t1, c1) = sys::run_stats(set)?;
                let ns = (c1 > c0).then(|| (t1 - t0) as f64 / (c1 - c0) as f64);
                shown.push(ns.map_or("-".into(), |ns| format!("{ns:.1}")));
                out.push(ns);
            }
            each.push(format!("{} {}", s.name, shown.join(" / ")));
        }
        eprintln!("bench:   {what}: {}", each.join(", "));
        Ok(out)
    }

    fn overflow(&self) -> anyhow::Result<Overflow> {
        // The drop cache off: with it, the flood's flows would reach the flow map only when a
        // flush log is full, and the phase would not measure the map's overflow accounting.
        let sizes = MapSizes {
            flow_map_entries: Some(OVERFLOW_MAP_ENTRIES),
            ringbuf_bytes: Some(TINY_RINGBUF),
            drop_log_records: Some(0),
        };
        let mut daemon = Daemon::start(
            &self.bin,
            self.inventory.path(),
            sizes,
            self.log("daemon-overflow"),
        )?;
        let cfg = self.flood_config(FloodKind::Udp, OVERFLOW_FLOWS, FIRST_PORT)?;
        let (m0, _) = daemon.scrape()?;
        let before = self.dropped()?;
        flood::flood(&cfg, Until::Elapsed(self.window))?;
        let actual = self.dropped()? - before;
        let end = Instant::now();
        let mut o = Overflow {
            map_entries: OVERFLOW_MAP_ENTRIES,
            flows: OVERFLOW_FLOWS,
            actual,
            ..Overflow::default()
        };
        // Losses show up at the drain after the one that sees the survivors: wait until the
        // sum reaches the truth and holds still for more than one drain, or give up.
        let mut stable_since = Instant::now();
        let mut last_sum = 0;
        loop {
            let (m, _) = daemon.scrape()?;
            o.counted = counted(&m).saturating_sub(counted(&m0));
            o.lost = lost_evicted(&m).saturating_sub(lost_evicted(&m0));
            let kernel_nf = kernel_netfilter(&m).saturating_sub(kernel_netfilter(&m0));
            o.foreign = kernel_nf as i64 - actual as i64;
            o.counted_all = counted_all(&m).saturating_sub(counted_all(&m0));
            o.kernel_all = kernel_all(&m).saturating_sub(kernel_all(&m0));
            let sum = o.counted_all + o.lost;
            if sum != last_sum {
                last_sum = sum;
                stable_since = Instant::now();
            }
            let settled = sum >= o.kernel_all
                && o.counted + o.lost >= actual
                && stable_since.elapsed() > Duration::from_millis(1300);
            if settled || end.elapsed() > CATCH_UP + Duration::from_secs(3) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(o)
    }

    fn port_scan(&self) -> anyhow::Result<PortScan> {
        let mut daemon = Daemon::start(
            &self.bin,
            self.inventory.path(),
            MapSizes::default(),
            self.log("daemon-scan"),
        )?;
        let cfg = self.flood_config(FloodKind::TcpSyn, SCAN_PORTS, 1)?;
        let (m0, _) = daemon.scrape()?;
        let before = self.dropped()?;
        flood::send_exact(&cfg, u64::from(SCAN_PORTS))?;
        let actual = self.dropped()? - before;
        let end = Instant::now();
        let mut scan = PortScan {
            ports: SCAN_PORTS,
            actual,
            ..PortScan::default()
        };
        loop {
            let (m, bytes) = daemon.scrape()?;
            scan.counted = counted(&m).saturating_sub(counted(&m0));
            scan.series_total = m.select("deny_observer_drops_total", &[]).count();
            scan.series_dst = m
                .select(
                    "deny_observer_drops_total",
                    &[
                        ("destination_namespace", DST_NAMESPACE),
                        ("destination_workload", DST_WORKLOAD),
                    ],
                )
                .count();
            scan.metrics_bytes = bytes;
            if scan.counted >= actual || end.elapsed() > CATCH_UP {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        scan.peak_rss = sys::peak_rss(daemon.proc.pid())?;
        Ok(scan)
    }
}

/// Waits until process `pid` uses under [`IDLE_SHARE`] of a core over a [`SETTLE_STEP`], or
/// [`CATCH_UP`] passes.
/// Connections the daemon counted from the sender to the connection server.
fn conn_counted(m: &Metrics) -> u64 {
    m.sum(
        "deny_observer_connections_total",
        &[
            ("source_namespace", SRC_NAMESPACE),
            ("source_workload", SRC_WORKLOAD),
            ("destination_namespace", DST_NAMESPACE),
            ("destination_workload", CONN_WORKLOAD),
            ("protocol", "tcp"),
        ],
    ) as u64
}

fn settle_cpu(pid: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = sys::CpuSnapshot::take(pid)?;
    while start.elapsed() < CATCH_UP {
        std::thread::sleep(SETTLE_STEP);
        let now = sys::CpuSnapshot::take(pid)?;
        let used = now.since(&last).total;
        if used.as_secs_f64() < SETTLE_STEP.as_secs_f64() * IDLE_SHARE {
            break;
        }
        last = now;
    }
    Ok(())
}

/// Drops the daemon attributed to the bench flow: netfilter drops from the sender workload to
/// the destination workload. Requiring both workloads makes this "full attribution", not
/// merely "seen".
fn counted(m: &Metrics) -> u64 {
    m.sum(
        "deny_observer_drops_total",
        &[
            ("reason", "netfilter_drop"),
            ("source_namespace", SRC_NAMESPACE),
            ("source_workload", SRC_WORKLOAD),
            ("destination_namespace", DST_NAMESPACE),
            ("destination_workload", DST_WORKLOAD),
        ],
    ) as u64
}

fn counted_all(m: &Metrics) -> u64 {
    m.sum("deny_observer_drops_total", &[]) as u64
}

fn kernel_all(m: &Metrics) -> u64 {
    m.sum("deny_observer_kernel_drops_total", &[]) as u64
}

fn lost_evicted(m: &Metrics) -> u64 {
    m.sum(
        "deny_observer_events_lost_total",
        &[("stage", "flow_map_evicted")],
    ) as u64
}

fn kernel_netfilter(m: &Metrics) -> u64 {
    m.sum(
        "deny_observer_kernel_drops_total",
        &[("reason", "netfilter_drop")],
    ) as u64
}
