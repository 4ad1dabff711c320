//! `deny-observer run`: wires capture → inventory → verdict → export → alert.
//!
//! The pipeline (drain, attribute, judge, record) runs on one OS thread: every step is
//! synchronous (map syscalls, hash lookups, counters) and must never wait on the network. The
//! tokio runtime serves HTTP, follows the inventory and sends Kubernetes Events; the pipeline
//! hands Events over through a bounded channel and counts what does not fit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use prometheus::{IntGaugeVec, Opts};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::alert::{self, AlertStage, DeniedEdge, SpikeTransition};
use crate::capture::{self, AttachMode, Capture, CaptureConfig, ConnectionsConfig, ReasonFilter};
use crate::export::connections::ConnectionMetrics;
use crate::export::events::{
    DeniedTraffic, EventMetrics, EventsConfig, PeerRef, PodRef, PolicyDeniedEvents, SpikeNotice,
    SpikePhase,
};
use crate::export::{
    self, DrainBatch, HttpLimits, HttpState, Metrics, MetricsConfig, OVERFLOW, PolicyMatch,
    ReadyCondition, RefreshRequest, endpoint_labels,
};
use crate::flow::{Direction, Protocol};
use crate::inventory::kube::{KubeInventory, KubeInventoryConfig};
use crate::inventory::{self, Attributor, Endpoint, Inventory, NodeAddrs, ReloadStats};
use crate::verdict::{Engine, FlowQuery, Peer, Verdict, VerdictCache};

/// Log output format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Arguments of `deny-observer run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Inventory source: a directory of Kubernetes manifests (YAML or JSON, reloaded when it
    /// changes), or `kube` for the API server. Defaults to `kube` inside a pod.
    #[arg(long, env = "DENY_OBSERVER_INVENTORY")]
    pub inventory: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9965")]
    pub metrics_addr: SocketAddr,
    /// Drop reasons to capture: `all`, or a comma-separated list of kernel names
    /// (`netfilter_drop,tc_ingress`; case and the `SKB_DROP_REASON_` prefix are optional).
    #[arg(long, default_value = "all")]
    pub reasons: String,
    /// Entries of the in-kernel flow map (distinct flows counted exactly between drains).
    #[arg(long, default_value_t = 65536)]
    pub flow_map_entries: u32,
    /// Size of the sample ring buffer in bytes (a power of two, a multiple of the page size).
    #[arg(long, default_value_t = 256 * 1024)]
    pub ringbuf_bytes: u32,
    /// How often the flow map is drained, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub drain_interval_ms: u64,
    /// Kernel hook: `auto` (the BTF raw tracepoint `tp_btf/kfree_skb` where the kernel has it,
    /// else the classic tracepoint), `tracepoint` (always the classic `skb:kfree_skb`, an escape
    /// hatch should a kernel misbehave with the other), or `tp_btf` (fail rather than fall back).
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    pub attach: AttachArg,
    /// Only count drops in the network namespace with this inode (`stat -L -c %i
    /// /run/netns/<name>`). For exact tests on a shared machine, and for debugging one pod.
    #[arg(long, hide = true)]
    pub netns_inode: Option<u32>,
    /// Most label sets per attributed metric; the rest go to one `__overflow__` series.
    #[arg(long, default_value_t = 2_000)]
    pub series_limit: usize,
    /// Seconds a workload must be gone from the inventory before its series are removed.
    #[arg(long, default_value_t = 600)]
    pub series_expiry_secs: u64,
    /// How often the manifest directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub inventory_poll_ms: u64,
    /// `/readyz` fails once the inventory source has not succeeded for this long (a manifest
    /// directory that fails to load or cannot be read, API-server watches that keep failing):
    /// the drops are still counted, but attributed to an inventory that may be out of date.
    #[arg(long, default_value = "10m", value_parser = alert::config::parse_duration)]
    pub inventory_max_age: Duration,
    /// Most open connections to the metrics port; a new connection beyond it closes the
    /// oldest. Also kept below the file-descriptor limit minus a reserve for the daemon's own
    /// files.
    #[arg(long, default_value_t = 256)]
    pub metrics_max_connections: usize,
    /// Publish Kubernetes Events (PolicyDenied, deny spikes); only with `--inventory kube`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,
    /// This node's IP addresses (comma-separated; downward API `status.hostIP`), in addition to
    /// the addresses of the network namespace the daemon runs in.
    #[arg(long, env = "NODE_IP", value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,
    /// Accepted connections to count on `deny_observer_connections_total`: `tcp`, `udp`
    /// (comma-separated), or `none`.
    #[arg(long, default_value = "tcp,udp", value_parser = parse_connection_protocols)]
    pub count_connections: ConnectionsConfig,
    /// Distinct edges (source, destination, protocol, port) the kernel connection map holds;
    /// connections of edges beyond it are counted as lost (`stage="connection_map_full"`).
    #[arg(long, default_value_t = 16384)]
    pub connection_map_entries: u32,
    /// Node name (downward API), for logs and deny_observer_build_info.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "human",
        env = "DENY_OBSERVER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Spike detection, new-denied-edge and expected-deny settings.
    #[command(flatten)]
    pub alert: alert::AlertArgs,
}

/// Kernel drop reasons that mean "a packet filter decided": the ones NetworkPolicy
/// enforcement produces (iptables/nftables CNIs, tc-based eBPF datapaths, cgroup programs).
const POLICY_REASONS: &[&str] = &[
    "netfilter_drop",
    "tc_ingress",
    "tc_egress",
    "bpf_cgroup_egress",
    "bpf_cgroup_ingress",
];

/// Most Kubernetes Event summaries queued between the pipeline and the publisher.
const EVENT_QUEUE: usize = 1024;

/// File descriptors kept out of reach of HTTP connections: BPF maps and links, the inventory
/// reload's directory and files, the state file, the API-server connections.
const FD_RESERVE: u64 = 128;

/// `--attach` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachArg {
    /// `tp_btf/kfree_skb` where available, else `skb:kfree_skb`.
    Auto,
    /// Always the classic tracepoint `skb:kfree_skb`.
    Tracepoint,
    /// Only `tp_btf/kfree_skb`.
    #[value(name = "tp_btf")]
    TpBtf,
}

impl From<AttachArg> for AttachMode {
    fn from(a: AttachArg) -> Self {
        match a {
            AttachArg::Auto => AttachMode::Auto,
            AttachArg::Tracepoint => AttachMode::Tracepoint,
            AttachArg::TpBtf => AttachMode::BtfTracepoint,
        }
    }
}

/// Entry point of `deny-observer run`.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format);
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("deny-observer")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

/// Raises the soft file-descriptor limit to the hard one (as Go and systemd services do) and
/// returns the soft limit now in force.
fn raise_nofile_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads a valid, initialised rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(limit.rlim_cur)
}

/// The connection cap: the flag, kept [`FD_RESERVE`] descriptors below the limit.
fn connection_cap(flag: usize, nofile: Option<u64>) -> usize {
    let by_fds = nofile
        .map(|n| usize::try_from(n.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX);
    flag.min(by_fds).max(8)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are noise in `kubectl logs` and log collectors: only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests calling main twice) is harmless; ignore its error.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large flow maps load.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)"
        );
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// `--count-connections`: `tcp`, `udp`, both, or `none`.
fn parse_connection_protocols(s: &str) -> Result<ConnectionsConfig, String> {
    let mut c = ConnectionsConfig::disabled();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.to_ascii_lowercase().as_str() {
            "tcp" => c.tcp = true,
            "udp" => c.udp = true,
            "none" => {}
            other => {
                return Err(format!(
                    "unknown protocol {other:?} (expected tcp, udp or none)"
                ));
            }
        }
    }
    Ok(c)
}

fn parse_reasons(s: &str) -> ReasonFilter {
    if s.trim().eq_ignore_ascii_case("all") {
        return ReasonFilter::All;
    }
    ReasonFilter::Names(
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// Where the inventory comes from.
enum Source {
    Dir(PathBuf),
    Kube,
}

fn source(arg: Option<&str>) -> anyhow::Result<Source> {
    match arg {
        Some("kube") => Ok(Source::Kube),
        Some(dir) => Ok(Source::Dir(PathBuf::from(dir))),
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Ok(Source::Kube),
        None => bail!("--inventory is required outside a cluster: a manifest directory or `kube`"),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let source = source(args.inventory.as_deref())?;
    // First: a second daemon on the same state directory stops here, before it attaches a
    // second program or binds anything.
    let _state_lock = alert::StateLock::acquire(&args.alert.state_dir)?;
    // Now, not at the end of start-up: SIGHUP's default action would kill the daemon.
    let mut signals = Signals::register();
    let nofile = raise_nofile_limit();
    let limits = HttpLimits {
        max_connections: connection_cap(args.metrics_max_connections, nofile),
        ..HttpLimits::default()
    };
    let DaemonMetrics {
        metrics,
        open_namespaces,
        events: event_metrics,
        mut alert,
        connections: connection_metrics,
    } = DaemonMetrics::build(
        MetricsConfig {
            series_limit: args.series_limit,
            expiry_grace: Duration::from_secs(args.series_expiry_secs),
        },
        args.alert.to_config()?,
    )?;
    let release = kernel_release();
    metrics.set_build_info(env!("CARGO_PKG_VERSION"), &release, &args.node_name);
    let (edge_overflow, edge_series) = metrics.series_accounting(alert::metrics::NEW_DENIED_EDGES);
    alert.bound_new_edge_series(args.series_limit, edge_overflow, edge_series);
    match alert.edges().learning_until() {
        Some(until) if alert.edges().is_learning(SystemTime::now()) => info!(
            until_unix = until
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "learning denied edges: edges first denied before then are recorded as known and not reported as new"
        ),
        _ => debug!("edge learning over or off"),
    }

    let http = Arc::new(
        HttpState::new(Arc::clone(&metrics)).with_inventory_max_age(args.inventory_max_age),
    );
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_task = {
        let http = Arc::clone(&http);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(err) = export::serve_with(listener, http, limits, shutdown).await {
                error!(error = %err, "HTTP server stopped");
            }
        })
    };
    info!(
        addr = %args.metrics_addr,
        node = %args.node_name,
        kernel = %release,
        max_connections = limits.max_connections,
        "serving /metrics, /healthz, /readyz"
    );

    let mut node = NodeAddrs::from_host().unwrap_or_else(|err| {
        warn!(error = %err, "cannot list this node's addresses; only loopback counts as node");
        NodeAddrs::new(std::iter::empty())
    });
    for ip in &args.node_ip {
        node.insert(*ip);
    }
    if !args.node_name.is_empty() {
        node = node.with_node_name(args.node_name.clone());
    }

    // Inventory first: in a cluster its sync takes a while, during which the capture program
    // is already counting (unattributed drops are still per-reason exact).
    let mut _kube_inventory = None;
    let mut _dir_watch = None;
    let mut reload_stats = None;
    let inventory_health;
    let mut events = PolicyDeniedEvents::disabled(event_metrics.clone());
    let mut events_enabled = false;
    let inventory_rx = match &source {
        Source::Dir(dir) => {
            let watch =
                inventory::watch_dir(dir.clone(), Duration::from_millis(args.inventory_poll_ms))
                    .await
                    .with_context(|| format!("loading the inventory from {}", dir.display()))?;
            http.set_ready(ReadyCondition::InventoryLoaded, true);
            reload_stats = Some(watch.stats());
            inventory_health = Some(watch.stats());
            let rx = watch.subscribe();
            _dir_watch = Some(watch);
            rx
        }
        Source::Kube => {
            let client = inventory::kube::default_client().await?;
            let counter_metrics = Arc::clone(&metrics);
            let kube = KubeInventory::start(
                client.clone(),
                Arc::new(move |resource: &str| counter_metrics.record_watch_error(resource)),
                KubeInventoryConfig {
                    node_name: (!args.node_name.is_empty()).then(|| args.node_name.clone()),
                    ..KubeInventoryConfig::default()
                },
            );
            let rx = kube.subscribe();
            inventory_health = Some(kube.health());
            {
                // Connected watches deliver every change: while none is failing, the
                // inventory is current, so its success time keeps up with the clock.
                let health = kube.health();
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tokio::select! {
                            _ = every.tick() => health.confirm_current(),
                            _ = stop.changed() => return,
                        }
                    }
                });
            }
            {
                let http = Arc::clone(&http);
                let mut ready = kube.subscribe();
                let kube_ready = kube.is_ready();
                // Ready once the first full sync has produced a snapshot.
                tokio::spawn(async move {
                    if kube_ready || ready.changed().await.is_ok() {
                        http.set_ready(ReadyCondition::InventoryLoaded, true);
                    }
                });
            }
            if args.events {
                events_enabled = true;
                events = PolicyDeniedEvents::new(
                    client,
                    EventsConfig {
                        instance: (!args.node_name.is_empty()).then(|| args.node_name.clone()),
                        ..EventsConfig::default()
                    },
                    event_metrics.clone(),
                );
            }
            _kube_inventory = Some(kube);
            rx
        }
    };

    let capture_config = CaptureConfig {
        reasons: parse_reasons(&args.reasons),
        flow_map_entries: args.flow_map_entries,
        ringbuf_bytes: args.ringbuf_bytes,
        netns: args.netns_inode,
        attach: args.attach.into(),
        connections: ConnectionsConfig {
            map_entries: args.connection_map_entries,
            ..args.count_connections
        },
        ..CaptureConfig::default()
    };
    let capture = tokio::task::spawn_blocking(move || Capture::load(&capture_config))
        .await
        .context("capture loader task")?
        .context("loading the kfree_skb capture program")?;
    release_startup_memory();
    info!(
        reasons = capture.reasons().len(),
        flow_map_entries = args.flow_map_entries,
        netns_filter = ?args.netns_inode,
        attach = %capture.attach_kind(),
        reason_source = capture.reason_source().as_str(),
        "capture program attached to kfree_skb"
    );
    if capture.recursion_misses_reported() {
        // The series exists from the start, so "no loss" reads as 0 rather than absent.
        metrics.record_loss("recursion_miss", 0);
    }

    if let Some(health) = &inventory_health {
        http.set_inventory_stats(Arc::clone(health));
    }
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    // Without an API server (or with --events=false) the pipeline does not even build the
    // summaries: nothing would publish them.
    let event_tx = events_enabled.then_some(event_tx);
    let events_task = tokio::spawn(publish_events(events, event_rx, stop_rx.clone()));

    let stopping = Arc::new(AtomicBool::new(false));
    connection_metrics.set_hooks(capture.connection_hooks());
    let mut pipeline = Pipeline::new(
        capture,
        Arc::clone(&metrics),
        Arc::clone(&http),
        inventory_rx,
        node,
        alert,
        open_namespaces,
        reload_stats,
        inventory_health,
        event_tx,
    );
    pipeline.connections = Some(connection_metrics);
    // Ready only now: the pipeline has taken in the inventory, so the first scrape after
    // /readyz turns 200 already carries its series (inventory objects, open namespaces).
    http.set_ready(ReadyCondition::ProgramsAttached, true);
    let interval = Duration::from_millis(args.drain_interval_ms.max(10));
    let pipeline_stop = Arc::clone(&stopping);
    // Every pipeline log line carries the node, so logs aggregated from a DaemonSet say where.
    let span = tracing::info_span!("pipeline", node = %args.node_name);
    // Scrapes ask the pipeline for fresh counters; a few may queue, more would only wait for
    // the same drain.
    let (refresh_tx, refresh_rx) = std::sync::mpsc::sync_channel(8);
    http.set_refresher(refresh_tx);
    let pipeline_thread = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || span.in_scope(|| pipeline.run(interval, &pipeline_stop, &refresh_rx)))
        .context("starting the pipeline thread")?;

    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match &_dir_watch {
                Some(watch) => watch.reload_now(),
                None => info!(
                    "SIGHUP: the API-server inventory is watched continuously; nothing to reload"
                ),
            },
        }
    }
    info!("shutting down");
    stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let pipeline_result = tokio::task::spawn_blocking(move || pipeline_thread.join())
        .await
        .context("joining the pipeline")?;
    let _ = http_task.await;
    let _ = events_task.await;
    match pipeline_result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(_) => bail!("the pipeline thread panicked"),
    }
}

/// Hands start-up garbage back to the allocator and the kernel.
///
/// Parsing the kernel's BTF (megabytes) and loading the program free many small blocks, which
/// glibc consolidates lazily, inside whichever later allocation needs a large block: that was
/// 20 to 30 ms of CPU in the first seconds of a drop flood (perf, `cargo xtask bench`). Trimming
/// now moves the cost to start-up, before the daemon reports ready, and lowers its RSS.
fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a signal asks of the daemon.
enum Signal {
    /// SIGTERM or SIGINT: save the state and exit.
    Stop,
    /// SIGHUP: reload the inventory.
    Reload,
}

/// The signal streams, registered once so that no signal falls between two waits.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())
            .map_err(|err| warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the daemon"))
            .ok();
        let hup = signal(SignalKind::hangup())
            .map_err(|err| warn!(error = %err, "cannot listen for SIGHUP"))
            .ok();
        Self { term, hup }
    }

    async fn next(&mut self) -> Signal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            () = recv(&mut self.term) => Signal::Stop,
            () = recv(&mut self.hup) => Signal::Reload,
        }
    }
}

/// Every metric the daemon exports, assembled the one way `run` and the tests both use.
struct DaemonMetrics {
    metrics: Arc<Metrics>,
    open_namespaces: IntGaugeVec,
    events: EventMetrics,
    alert: AlertStage,
    connections: ConnectionMetrics,
}

impl DaemonMetrics {
    fn build(config: MetricsConfig, alert: alert::AlertConfig) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new(config)?);
        let open_namespaces = IntGaugeVec::new(
            Opts::new(
                "deny_observer_audit_open_namespace",
                "1 when the namespace has no NetworkPolicy at all (an open field), else 0.",
            ),
            &["target_namespace"],
        )?;
        metrics.register(Box::new(open_namespaces.clone()))?;
        let events = EventMetrics::new()?;
        events.register(metrics.registry())?;
        let alert = AlertStage::new(alert, metrics.registry(), SystemTime::now())?;
        let connections = ConnectionMetrics::new(&metrics)?;
        Ok(Self {
            metrics,
            open_namespaces,
            events,
            alert,
            connections,
        })
    }
}

/// Names of every metric family the daemon can export, whether or not it has samples yet.
/// Dashboards and alert rules must only read these (checked by a test).
pub fn exported_metric_names() -> anyhow::Result<Vec<String>> {
    let built = DaemonMetrics::build(MetricsConfig::default(), alert::AlertConfig::default())?;
    let mut names = built.metrics.metric_names();
    // Stages that register straight into the registry: their collectors' descriptors.
    names.extend(alert::metric_names().into_iter().map(str::to_owned));
    names.push(crate::export::events::EVENTS_TOTAL.to_owned());
    names.sort();
    names.dedup();
    Ok(names)
}

/// What the pipeline asks the Event publisher to do.
enum EventMsg {
    Denied(DeniedTraffic),
    Spike(SpikeNotice),
}

async fn publish_events(
    events: PolicyDeniedEvents,
    mut rx: mpsc::Receiver<EventMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut flush = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(EventMsg::Denied(d)) => { events.record(d).await; }
                Some(EventMsg::Spike(s)) => { events.spike(&s).await; }
                None => break,
            },
            _ = flush.tick() => { events.flush().await; }
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
        }
    }
    events.flush().await;
}

/// The per-snapshot views: rebuilt together whenever the inventory changes.
struct Views {
    attributor: Attributor,
    engine: Engine,
}

/// The synchronous heart of the daemon.
struct Pipeline {
    capture: Capture,
    metrics: Arc<Metrics>,
    http: Arc<HttpState>,
    inventory_rx: watch::Receiver<Arc<Inventory>>,
    node: NodeAddrs,
    views: Views,
    cache: VerdictCache,
    /// Series increments of the drain being recorded (kept for its capacity).
    batch: DrainBatch,
    /// The empty `policy` label of unexplained denies.
    no_policy: Arc<str>,
    alert: AlertStage,
    open_namespaces: IntGaugeVec,
    reload_stats: Option<Arc<ReloadStats>>,
    reloads_seen: (u64, u64),
    /// Staleness of the inventory source (manifest directory or API-server watches).
    inventory_health: Option<Arc<ReloadStats>>,
    series_limit: usize,
    edge_log: EdgeLogLimit,
    /// `None` when Events are off.
    events: Option<mpsc::Sender<EventMsg>>,
    /// Workload kinds by (namespace, workload), for spike Events.
    kinds: HashMap<(String, String), String>,
    last_retain: Instant,
    last_drain: Instant,
    /// `deny_observer_connections_total`; `None` only before `run` sets it.
    connections: Option<ConnectionMetrics>,
}

/// Most "new denied edge" log lines per [`EDGE_LOG_WINDOW`]; the rest are counted and summed
/// up in one line (a port scan would otherwise write a line per port).
const EDGE_LOG_BURST: u32 = 20;
const EDGE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Rate limit of the "new denied edge" log line.
#[derive(Debug)]
struct EdgeLogLimit {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for EdgeLogLimit {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }
}

impl EdgeLogLimit {
    /// True when one more line may be written now; otherwise counts it as suppressed.
    fn allow(&mut self, now: Instant) -> bool {
        self.flush(now);
        if self.logged < EDGE_LOG_BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// At the end of a window, says how many lines were left out, and starts a new one.
    fn flush(&mut self, now: Instant) {
        if now.saturating_duration_since(self.window_start) < EDGE_LOG_WINDOW {
            return;
        }
        if self.suppressed > 0 {
            warn!(
                suppressed = self.suppressed,
                window_secs = EDGE_LOG_WINDOW.as_secs(),
                "new denied edge log lines suppressed (at most {EDGE_LOG_BURST} per window); \
                 every edge is still counted on deny_observer_new_denied_edges_total"
            );
        }
        *self = Self {
            window_start: now,
            logged: 0,
            suppressed: 0,
        };
    }
}

/// Sets `deny_observer_audit_open_namespace` within `limit` series: open namespaces first
/// (sorted), then closed ones (0) while room is left. Open namespaces beyond the limit are
/// summed up by one `target_namespace="__overflow__"` series set to 1, so the alert still
/// fires and `deny-observer audit` lists them all.
fn export_open_namespaces<'a>(
    gauge: &IntGaugeVec,
    namespaces: impl Iterator<Item = (&'a str, bool)>,
    limit: usize,
) {
    let (mut open, mut closed): (Vec<_>, Vec<_>) = namespaces.partition(|(_, open)| *open);
    open.sort_unstable();
    closed.sort_unstable();
    gauge.reset();
    let room = limit.max(1);
    let listed_open = open.len().min(room);
    for (name, _) in &open[..listed_open] {
        gauge.with_label_values(&[*name]).set(1);
    }
    if open.len() > listed_open {
        gauge.with_label_values(&[OVERFLOW]).set(1);
    }
    for (name, _) in closed.iter().take(room.saturating_sub(listed_open)) {
        gauge.with_label_values(&[*name]).set(0);
    }
}

/// Verdict cache size: distinct (source, destination, protocol, port) flows remembered.
const VERDICT_CACHE: usize = 65_536;
/// A scrape's refresh request drains only if the last drain is at least this old: scrapes in
/// quick succession (or a dashboard polling) cost one drain per this period at most, and the
/// counters a scrape sees are never older than this plus the drain itself.
const REFRESH_MIN_AGE: Duration = Duration::from_millis(100);
/// How often series of vanished workloads are looked for.
const RETAIN_EVERY: Duration = Duration::from_secs(30);

impl Pipeline {
    #[allow(clippy::too_many_arguments, reason = "one-time wiring of the stages")]
    fn new(
        capture: Capture,
        metrics: Arc<Metrics>,
        http: Arc<HttpState>,
        inventory_rx: watch::Receiver<Arc<Inventory>>,
        node: NodeAddrs,
        alert: AlertStage,
        open_namespaces: IntGaugeVec,
        reload_stats: Option<Arc<ReloadStats>>,
        inventory_health: Option<Arc<ReloadStats>>,
        events: Option<mpsc::Sender<EventMsg>>,
    ) -> Self {
        let series_limit = metrics.config().series_limit;
        let empty = Arc::new(Inventory::default());
        let mut pipeline = Self {
            capture,
            metrics,
            http,
            inventory_rx,
            views: Views {
                attributor: Attributor::new(&empty, node.clone()),
                engine: Engine::new(empty),
            },
            node,
            cache: VerdictCache::new(VERDICT_CACHE),
            batch: DrainBatch::default(),
            no_policy: Arc::from(""),
            alert,
            open_namespaces,
            reload_stats,
            reloads_seen: (0, 0),
            inventory_health,
            series_limit,
            edge_log: EdgeLogLimit::default(),
            events,
            kinds: HashMap::new(),
            last_retain: Instant::now(),
            last_drain: Instant::now(),
            connections: None,
        };
        pipeline.refresh_inventory(true);
        pipeline
    }

    fn run(
        mut self,
        interval: Duration,
        stop: &AtomicBool,
        refreshes: &std::sync::mpsc::Receiver<RefreshRequest>,
    ) {
        let mut next = Instant::now() + interval;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                // Wake for the next turn, a scrape's refresh request, or a look at `stop`.
                match refreshes.recv_timeout((next - now).min(Duration::from_millis(100))) {
                    Ok(done) => self.refresh(done),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    }
                }
                continue;
            }
            next += interval;
            if next < now {
                next = now + interval;
            }
            self.tick();
        }
        // A last drain so that drops right before shutdown are not lost from the counters.
        self.tick();
        if let Err(err) = self.alert.shutdown(SystemTime::now()) {
            warn!(error = %err, "could not save the denied-edge state");
        }
    }

    fn refresh_inventory(&mut self, force: bool) {
        if !force && !self.inventory_rx.has_changed().unwrap_or(false) {
            return;
        }
        let inv = Arc::clone(&self.inventory_rx.borrow_and_update());
        let counts = inv.counts();
        self.metrics
            .set_inventory_objects("namespaces", counts.namespaces);
        self.metrics.set_inventory_objects("pods", counts.pods);
        self.metrics
            .set_inventory_objects("networkpolicies", counts.policies);
        self.metrics
            .set_inventory_invalid_objects(&inv.invalid_counts());
        self.alert
            .set_policies(inv.policies.iter().map(|p| p.as_ref()));
        let engine = Engine::new(Arc::clone(&inv));
        self.http
            .set_inventory_empty(counts == inventory::ObjectCounts::default());
        export_open_namespaces(
            &self.open_namespaces,
            engine.audit().iter().map(|ns| (ns.name.as_str(), ns.open)),
            self.series_limit,
        );
        for warning in engine.warnings() {
            warn!(warning = %warning, "NetworkPolicy the engine cannot fully honour");
        }
        self.views = Views {
            attributor: Attributor::new(&inv, self.node.clone()),
            engine,
        };
        self.cache.clear();
        debug!(
            pods = counts.pods,
            policies = counts.policies,
            namespaces = counts.namespaces,
            "inventory snapshot in use"
        );
    }

    fn export_reload_stats(&mut self) {
        if let Some(health) = &self.inventory_health {
            self.metrics
                .set_inventory_reload_status(!health.failing(), health.last_success_unix());
        }
        let Some(stats) = &self.reload_stats else {
            return;
        };
        let (ok, failed) = (stats.reloads_ok(), stats.reloads_failed());
        for _ in self.reloads_seen.0..ok {
            self.metrics.record_reload(true);
        }
        for _ in self.reloads_seen.1..failed {
            self.metrics.record_reload(false);
        }
        self.reloads_seen = (ok, failed);
    }

    /// The periodic turn: a drain, then the stages that work per second (alerts, expiry).
    fn tick(&mut self) {
        let now = SystemTime::now();
        self.drain(now);
        self.edge_log.flush(Instant::now());
        for transition in self.alert.tick(now) {
            self.on_spike(&transition);
        }
        if self.last_retain.elapsed() >= RETAIN_EVERY {
            self.last_retain = Instant::now();
            let engine = &self.views.engine;
            let inv = engine.inventory();
            let live: std::collections::HashSet<(&str, &str)> = inv
                .pods
                .iter()
                .map(|p| (p.namespace.as_str(), p.workload.name.as_str()))
                .collect();
            let removed = self
                .metrics
                .retain_workloads(&|ns, workload| live.contains(&(ns, workload)));
            let removed = removed
                + self.connections.as_ref().map_or(0, |c| {
                    c.retain_workloads_at(
                        Instant::now(),
                        self.metrics.config().expiry_grace,
                        &|ns, workload| live.contains(&(ns, workload)),
                    )
                });
            if removed > 0 {
                debug!(
                    removed,
                    "removed series of workloads gone from the inventory"
                );
            }
        }
        self.http.heartbeat();
    }

    /// Answers a `/metrics` refresh request: drains unless the last drain is fresh enough.
    fn refresh(&mut self, done: RefreshRequest) {
        if self.last_drain.elapsed() >= REFRESH_MIN_AGE {
            self.drain(SystemTime::now());
        }
        // The caller may have given up waiting; nothing to do then.
        let _ = done.send(());
    }

    /// Drains the kernel maps into the metrics (and the alert stage's per-edge counts).
    fn drain(&mut self, now: SystemTime) {
        self.refresh_inventory(false);
        self.export_reload_stats();
        self.last_drain = Instant::now();
        match self.capture.drain() {
            Ok(report) => self.record(report, now),
            Err(err) => {
                // A failed drain loses nothing: the kernel keeps counting and the next drain
                // takes the whole delta. Say so loudly anyway.
                error!(error = %err, "draining the flow map failed");
            }
        }
        self.drain_connections();
        self.http.counters_refreshed();
        self.capture.flush_logs();
        for sample in self.capture.samples() {
            debug!(
                reason = %sample.drop.reason,
                src = ?sample.drop.src,
                src_port = sample.src_port,
                dst = ?sample.drop.dst,
                dst_port = sample.drop.dst_port,
                protocol = sample.drop.protocol.label(),
                ifindex = sample.ifindex,
                netns = sample.drop.netns,
                "first drop of a new flow"
            );
        }
        let bad = self.capture.take_bad_samples();
        if bad > 0 {
            self.metrics.record_loss("sample_malformed", bad);
        }
    }

    /// Drains the connection map into `deny_observer_connections_total`.
    fn drain_connections(&mut self) {
        let (Some(metrics), Some(capture)) = (&self.connections, self.capture.connections()) else {
            return;
        };
        match capture.drain() {
            Ok(report) => {
                let attributor = &self.views.attributor;
                metrics.record_drain(&self.metrics, &report, |ip| attributor.lookup(ip));
            }
            Err(err) => error!(error = %err, "draining the connection map failed"),
        }
    }

    fn record(&mut self, report: capture::DrainReport, now: SystemTime) {
        for (reason, packets, bytes) in &report.reason_totals {
            self.metrics.record_kernel_drops(reason, *packets, *bytes);
        }
        let losses = report.losses;
        for (stage, n) in [
            ("ringbuf_full", losses.ringbuf_full),
            ("flow_insert", losses.flow_insert),
            ("skb_read", losses.skb_read),
            ("truncated_header", losses.truncated_header),
            (
                "ipv6_ext_headers_exceeded",
                losses.ipv6_ext_headers_exceeded,
            ),
            ("header_not_linear", losses.header_not_linear),
            ("flow_map_evicted", losses.evicted_packets),
            ("recursion_miss", losses.recursion_miss.unwrap_or(0)),
        ] {
            if n > 0 {
                self.metrics.record_loss(stage, n);
            }
        }
        self.metrics
            .set_flow_map(report.flow_map_entries, report.flow_map_capacity);
        let mut batch = std::mem::take(&mut self.batch);
        for drop in &report.drops {
            self.record_drop(drop, now, &mut batch);
        }
        batch.flush(&self.metrics);
        self.batch = batch;
    }

    fn endpoint(&self, ip: Option<IpAddr>) -> Option<Endpoint> {
        ip.map(|ip| self.views.attributor.lookup(ip))
    }

    fn record_drop(&mut self, drop: &capture::Drop, now: SystemTime, batch: &mut DrainBatch) {
        let src = self.endpoint(drop.src);
        let dst = self.endpoint(drop.dst);
        let verdict = self.verdict(drop, src.as_ref(), dst.as_ref());
        let (src_ns, src_wl) = endpoint_labels(src.as_ref());
        let (dst_ns, dst_wl) = endpoint_labels(dst.as_ref());
        let direction = verdict
            .as_ref()
            .filter(|v| !v.allowed)
            .and_then(|v| v.direction)
            .unwrap_or(Direction::Unknown);
        batch.add_drop(
            &drop.reason,
            direction,
            drop.protocol,
            src.as_ref(),
            dst.as_ref(),
            drop.packets,
            drop.bytes,
        );
        let Some(verdict) = verdict else {
            return;
        };
        if !POLICY_REASONS.contains(&drop.reason.as_ref()) {
            return;
        }
        if verdict.allowed {
            batch.add_policy_deny(
                Direction::Unknown,
                drop.protocol,
                src.as_ref(),
                dst.as_ref(),
                &self.no_policy,
                PolicyMatch::Unexplained,
                drop.packets,
            );
            return;
        }
        batch.add_policy_deny(
            direction,
            drop.protocol,
            src.as_ref(),
            dst.as_ref(),
            &verdict.policy,
            PolicyMatch::DefaultDeny,
            drop.packets,
        );
        let edge = DeniedEdge {
            direction,
            source_namespace: src_ns.to_owned(),
            source_workload: src_wl.to_owned(),
            destination_namespace: dst_ns.to_owned(),
            destination_workload: dst_wl.to_owned(),
            protocol: drop.protocol,
            port: if drop.protocol.has_ports() {
                drop.dst_port
            } else {
                0
            },
            ports_folded: false,
        };
        let isolating: Vec<(&str, &str)> = verdict
            .deciding_side()
            .map(|side| {
                side.isolating_policies
                    .iter()
                    .filter_map(|id| id.split_once('/'))
                    .collect()
            })
            .unwrap_or_default();
        let outcome = self
            .alert
            .record_deny(now, &edge, drop.packets, isolating.iter().copied());
        if outcome.new_edge && self.edge_log.allow(Instant::now()) {
            info!(
                direction = %direction,
                source = %format!("{src_ns}/{src_wl}"),
                destination = %format!("{dst_ns}/{dst_wl}"),
                protocol = drop.protocol.label(),
                port = %if outcome.port_folded { "other".to_owned() } else { edge.port.to_string() },
                policy = %verdict.policy,
                expected = outcome.expected,
                "new denied edge"
            );
        }
        let Some(events) = &self.events else {
            return;
        };
        let denied_side = match direction {
            Direction::Egress => src.as_ref(),
            _ => dst.as_ref(),
        };
        let peer = match direction {
            Direction::Egress => dst.as_ref(),
            _ => src.as_ref(),
        };
        if let Some(Endpoint::Pod(pod)) = denied_side {
            let workload = (pod.namespace.clone(), pod.workload.name.clone());
            self.kinds
                .entry(workload)
                .or_insert_with(|| pod.workload.kind.clone());
            let side = verdict.deciding_side();
            let msg = EventMsg::Denied(DeniedTraffic {
                pod: PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: None,
                },
                direction,
                protocol: drop.protocol,
                port: drop.protocol.has_ports().then_some(drop.dst_port),
                peer: PeerRef {
                    namespace: peer
                        .map(|p| p.namespace_label().to_owned())
                        .unwrap_or_default(),
                    workload: peer
                        .map(|p| p.workload_label().to_owned())
                        .unwrap_or_else(|| "unknown".to_owned()),
                    kind: peer
                        .map(|p| p.workload_kind().to_owned())
                        .unwrap_or_default(),
                },
                packets: drop.packets,
                window: Duration::from_secs(1),
                isolating_policies: side
                    .map(|s| s.isolating_policies.clone())
                    .unwrap_or_default(),
                nearest_misses: side
                    .map(|s| {
                        s.nearest_misses
                            .iter()
                            .map(|m| m.description.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
            });
            if events.try_send(msg).is_err() {
                self.metrics.record_loss("event_queue_full", 1);
            }
        }
    }

    fn verdict(
        &self,
        drop: &capture::Drop,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
    ) -> Option<Arc<Verdict>> {
        let (src, dst) = (src?, dst?);
        // Policies only speak about pods; between two non-pod addresses there is nothing to judge.
        if src.pod().is_none() && dst.pod().is_none() {
            return None;
        }
        let peer = |ep: &Endpoint, ip: Option<IpAddr>| match ep {
            Endpoint::Pod(pod) => Some(Peer::Pod(Arc::clone(pod))),
            _ => ip.map(Peer::External),
        };
        let query = FlowQuery {
            src: peer(src, drop.src)?,
            dst: peer(dst, drop.dst)?,
            protocol: match drop.protocol {
                Protocol::Other => return None,
                p => p,
            },
            port: drop.dst_port,
        };
        Some(self.cache.get_or_evaluate(&self.views.engine, &query))
    }

    fn on_spike(&mut self, t: &SpikeTransition) {
        if t.started {
            warn!(spike = %t, "deny spike started");
        } else {
            info!(spike = %t, "deny spike ended");
        }
        let Some(events) = &self.events else {
            return;
        };
        let kind = self
            .kinds
            .get(&(t.key.workload_namespace.clone(), t.key.workload.clone()))
            .cloned()
            .unwrap_or_default();
        let notice = SpikeNotice {
            namespace: t.key.workload_namespace.clone(),
            kind,
            name: t.key.workload.clone(),
            phase: if t.started {
                SpikePhase::Started
            } else {
                SpikePhase::Ended
            },
            denied_per_minute: t.rate * 60.0,
            baseline_per_minute: t.baseline * 60.0,
            detail: Some(format!("{} denies", t.key.direction)),
        };
        if events.try_send(EventMsg::Spike(notice)).is_err() {
            self.metrics.record_loss("event_queue_full", 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(gauge: &IntGaugeVec) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = prometheus::core::Collector::collect(gauge)
            .iter()
            .flat_map(|mf| mf.get_metric().to_vec())
            .map(|m| {
                (
                    m.get_label()[0].value().to_owned(),
                    m.get_gauge().get_value() as i64,
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn open_namespaces_stay_within_the_limit_open_ones_first() {
        let gauge = IntGaugeVec::new(Opts::new("t", "t"), &["target_namespace"]).unwrap();
        let names: Vec<String> = (0..10).map(|i| format!("ns{i}")).collect();
        // ns0..ns5 closed, ns6..ns9 open.
        let all = || names.iter().enumerate().map(|(i, n)| (n.as_str(), i >= 6));
        export_open_namespaces(&gauge, all(), 3);
        assert_eq!(
            series(&gauge),
            vec![
                ("__overflow__".to_owned(), 1),
                ("ns6".to_owned(), 1),
                ("ns7".to_owned(), 1),
                ("ns8".to_owned(), 1),
            ]
        );
        export_open_namespaces(&gauge, all(), 6);
        let s = series(&gauge);
        assert_eq!(s.len(), 6, "{s:?}");
        assert_eq!(s.iter().filter(|(_, v)| *v == 1).count(), 4);
        assert!(s.iter().all(|(n, _)| n != "__overflow__"));
    }

    #[test]
    fn edge_log_lines_are_rate_limited_per_window() {
        let t0 = Instant::now();
        let mut limit = EdgeLogLimit {
            window_start: t0,
            logged: 0,
            suppressed: 0,
        };
        let allowed = (0..1000).filter(|_| limit.allow(t0)).count();
        assert_eq!(allowed, EDGE_LOG_BURST as usize);
        assert_eq!(limit.suppressed, 1000 - u64::from(EDGE_LOG_BURST));
        let later = t0 + EDGE_LOG_WINDOW;
        assert!(limit.allow(later), "a new window allows lines again");
        assert_eq!(limit.suppressed, 0);
    }

    #[test]
    fn connection_cap_keeps_a_descriptor_reserve() {
        assert_eq!(connection_cap(256, Some(512)), 256);
        assert_eq!(connection_cap(256, Some(300)), 172);
        assert_eq!(connection_cap(256, Some(100)), 8);
        assert_eq!(connection_cap(256, None), 256);
    }
}
