//! `deny-observer run`: wires capture → inventory → verdict → attribute → export, alert and
//! Kubernetes Events.
//!
//! The `pipeline` (drain, attribute, hand outcomes to the sinks) runs on one OS thread: every
//! step is synchronous (map syscalls, hash lookups, counters) and must never wait on the
//! network. The tokio runtime serves HTTP, follows the inventory and publishes Kubernetes
//! Events; the pipeline hands Events over through a bounded queue and counts what does not fit.

mod pipeline;
mod process;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use prometheus::{IntGaugeVec, Opts};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::alert::{self, AlertStage};
use crate::capture::{AttachMode, Capture, CaptureConfig, ConnectionsConfig, ReasonFilter};
use crate::export::connections::ConnectionMetrics;
use crate::export::events::{EventMetrics, EventsConfig, PolicyDeniedEvents};
use crate::export::{self, HttpLimits, HttpState, Metrics, MetricsConfig, ReadyCondition};
use crate::inventory::kube::{KubeInventory, KubeInventoryConfig, ListStrategy};
use crate::inventory::{self, NodeAddrs};

use self::pipeline::{Pipeline, Stages};
use self::process::{
    Signal, Signals, init_tracing, kernel_release, raise_memlock_limit, raise_nofile_limit,
};

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
    /// How `--inventory kube` lists pods, namespaces and NetworkPolicies at start and after a
    /// watch expires: `paged` (consistent lists of 500 objects a page; flat memory, pages read
    /// from etcd before Kubernetes 1.31) or `cache` (one unpaginated list from the API
    /// server's watch cache; memory grows with the cluster).
    #[arg(
        long,
        value_enum,
        default_value_t = ListStrategy::Paged,
        env = "DENY_OBSERVER_INVENTORY_LIST"
    )]
    pub inventory_list: ListStrategy,
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
    /// Records of each CPU's drop-cache flush log (a power of two, 64 bytes each; capped so
    /// that all CPUs' logs together take at most 16 MiB). The kernel
    /// counts drops in a small per-CPU cache of flows and hands evicted entries to userspace
    /// through this log; when it is full, drops go to the flow map. 0 counts every drop in the
    /// flow map (always the case on other architectures than x86-64).
    #[arg(long, default_value_t = 1 << 14)]
    pub drop_log_records: u32,
    /// Lines of each CPU's drop cache (a power of two from 2 to 4096, 64 bytes each; capped
    /// so that all CPUs' caches together take at most 16 MiB). Two-way set associative: up to
    /// about half as many flows per CPU are counted in place; each drop of a flow beyond that
    /// sends the reader a flush record. More lines hold more flows (less daemon CPU) but cost
    /// the kernel program more per drop once they outgrow the CPU's caches.
    #[arg(long, default_value_t = 256)]
    pub drop_cache_lines: u32,
    /// How often the flow map is drained, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub drain_interval_ms: u64,
    /// Kernel hook: `auto` (the BTF raw tracepoint `tp_btf/kfree_skb` where the kernel has it,
    /// else the classic tracepoint), `tracepoint` (always the classic `skb:kfree_skb`, an escape
    /// hatch should a kernel misbehave with the other), or `tp_btf` (fail rather than fall back).
    /// The TCP connection hook follows: `tp_btf/inet_sock_set_state` unless `tracepoint`, with
    /// the classic `sock:inet_sock_set_state` as its fallback either way.
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

/// How long the exit waits for blocking tasks still running (an inventory reload, a start-up
/// step a stop interrupted).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Most Kubernetes Event summaries queued between the pipeline and the publisher.
const EVENT_QUEUE: usize = 1024;
/// How often the Event publisher looks for summaries whose deduplication window ended.
const EVENT_FLUSH: Duration = Duration::from_secs(10);

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
///
/// With `--log-format json` a failure is logged here, as one JSON object at level ERROR, and
/// the result is a plain failure status: the error is the line an SRE searches the logs for,
/// and a collector that parses JSON lines would keep a plain-text line only as an unparsed
/// blob, outside any `level` or `message` query. With `human` the error is returned for the
/// caller to print.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let format = args.log_format;
    init_tracing(format);
    raise_memlock_limit();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("deny-observer")
        .build()
        .context("starting the tokio runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(run(args));
            // Dropping the runtime would wait for every blocking task, a start-up step that a
            // stop left behind included (a program load stuck in the kernel): give them a
            // moment, then exit without them.
            runtime.shutdown_timeout(SHUTDOWN_WAIT);
            result
        });
    match result {
        Err(err) if format == LogFormat::Json => {
            error!(error = %error_line(&err), "deny-observer stopped");
            Ok(ExitCode::FAILURE)
        }
        other => other,
    }
}

/// The error and its causes on one line. A cause whose text its parent already printed (an
/// error that formats its `source` and also returns it) is not repeated.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The connection cap: the flag, kept [`FD_RESERVE`] descriptors below the limit.
fn connection_cap(flag: usize, nofile: Option<u64>) -> usize {
    let by_fds = nofile
        .map(|n| usize::try_from(n.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX);
    flag.min(by_fds).max(8)
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

/// Runs one start-up step unless `stop` (SIGTERM or SIGINT) comes first, then `None`. A step
/// can take long (a large inventory, a kernel lock the program load waits for, an API server
/// that does not answer); kubelet would otherwise wait out the grace period and kill the
/// container, and a rollout or node drain would wait with it. Nothing is lost by stopping
/// there: the denied-edge state has not changed since it was loaded.
async fn unless_stopped<T>(
    stop: impl std::future::Future<Output = ()>,
    step: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        out = step => Some(out),
        () = stop => None,
    }
}

/// Logs a stop during start-up; the exit status of a requested stop.
fn stopped_during_start_up(step: &str) -> ExitCode {
    info!(step, "stopping during start-up (SIGTERM or SIGINT)");
    ExitCode::SUCCESS
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
    let mut events = None;
    let inventory_rx = match &source {
        Source::Dir(dir) => {
            let load =
                inventory::watch_dir(dir.clone(), Duration::from_millis(args.inventory_poll_ms));
            let Some(watch) = unless_stopped(signals.stop(), load).await else {
                return Ok(stopped_during_start_up("loading the inventory"));
            };
            let watch =
                watch.with_context(|| format!("loading the inventory from {}", dir.display()))?;
            http.set_ready(ReadyCondition::InventoryLoaded, true);
            reload_stats = Some(watch.stats());
            inventory_health = Some(watch.stats());
            let rx = watch.subscribe();
            _dir_watch = Some(watch);
            rx
        }
        Source::Kube => {
            let Some(client) =
                unless_stopped(signals.stop(), inventory::kube::default_client()).await
            else {
                return Ok(stopped_during_start_up("connecting to the API server"));
            };
            let client = client?;
            let counter_metrics = Arc::clone(&metrics);
            let kube = KubeInventory::start(
                client.clone(),
                Arc::new(move |resource: &str| counter_metrics.record_watch_error(resource)),
                KubeInventoryConfig {
                    node_name: (!args.node_name.is_empty()).then(|| args.node_name.clone()),
                    list: args.inventory_list,
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
                events = Some(PolicyDeniedEvents::new(
                    client,
                    EventsConfig {
                        instance: (!args.node_name.is_empty()).then(|| args.node_name.clone()),
                        ..EventsConfig::default()
                    },
                    event_metrics.clone(),
                ));
            }
            _kube_inventory = Some(kube);
            rx
        }
    };

    let capture_config = CaptureConfig {
        reasons: parse_reasons(&args.reasons),
        flow_map_entries: args.flow_map_entries,
        ringbuf_bytes: args.ringbuf_bytes,
        drop_log_records: args.drop_log_records,
        drop_cache_lines: args.drop_cache_lines,
        netns: args.netns_inode,
        attach: args.attach.into(),
        connections: ConnectionsConfig {
            map_entries: args.connection_map_entries,
            ..args.count_connections
        },
        ..CaptureConfig::default()
    };
    let load = tokio::task::spawn_blocking(move || Capture::load(&capture_config));
    let Some(capture) = unless_stopped(signals.stop(), load).await else {
        return Ok(stopped_during_start_up("loading the capture program"));
    };
    let capture = capture
        .context("capture loader task")?
        .context("loading the kfree_skb capture program")?;
    metrics.set_reasons_unavailable(capture.unavailable_reasons());
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
    // Without an API server (or with --events=false) the pipeline does not even build the
    // summaries: nothing would publish them.
    let (events, events_task) = match events {
        Some(events) => {
            let queue_full = metrics.loss_counter("event_queue_full");
            let (sink, task) = events.spawn(EVENT_QUEUE, EVENT_FLUSH, queue_full);
            (Some(sink), Some(task))
        }
        None => (None, None),
    };

    let stopping = Arc::new(AtomicBool::new(false));
    connection_metrics.set_hooks(capture.connection_hooks());
    let pipeline = Pipeline::new(Stages {
        capture,
        metrics: Arc::clone(&metrics),
        http: Arc::clone(&http),
        inventory_rx,
        node,
        alert,
        open_namespaces,
        reload_stats,
        inventory_health,
        events,
        connections: connection_metrics,
    });
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
    // The pipeline sleeps until its next drain or a request; at shutdown a request nobody
    // waits for wakes it to see `stopping`.
    let wake_pipeline = refresh_tx.clone();
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
    // A full queue wakes the pipeline anyway.
    let _ = wake_pipeline.try_send(tokio::sync::oneshot::channel().0);
    let _ = stop_tx.send(true);
    let pipeline_result = tokio::task::spawn_blocking(move || pipeline_thread.join())
        .await
        .context("joining the pipeline")?;
    let _ = http_task.await;
    // The pipeline (and with it the last Event sink) is gone: the publisher flushes and ends.
    if let Some(task) = events_task {
        let _ = task.await;
    }
    match pipeline_result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(_) => bail!("the pipeline thread panicked"),
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

/// Label names of every metric family the daemon can export, by metric name, in the order
/// the values are given (from the collectors' descriptors). The README's metrics table must
/// list the same names and labels (checked by a test).
pub fn exported_metric_labels() -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let built = DaemonMetrics::build(MetricsConfig::default(), alert::AlertConfig::default())?;
    let mut labels = built.metrics.metric_labels();
    // The alert stage registers straight into the registry: ask a fresh set of its collectors.
    let scratch = prometheus::Registry::new();
    labels.extend(alert::AlertMetrics::register(&scratch)?.descriptors());
    labels.extend(built.events.descriptors());
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop that comes while a start-up step still runs ends the wait; a step that finishes
    /// first is returned.
    #[tokio::test]
    async fn a_stop_interrupts_a_start_up_step() {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let waiting = tokio::spawn(unless_stopped(stop, std::future::pending::<u32>()));
        let _ = stop_tx.send(());
        let out = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the stop ended the wait")
            .expect("task");
        assert_eq!(out, None);
        assert_eq!(
            unless_stopped(std::future::pending(), async { 7 }).await,
            Some(7)
        );
    }

    #[test]
    fn exported_labels_cover_exactly_the_exported_names() {
        let labels = exported_metric_labels().unwrap_or_default();
        let names = exported_metric_names().unwrap_or_default();
        assert!(!names.is_empty());
        assert_eq!(labels.keys().cloned().collect::<Vec<_>>(), names);
    }

    #[test]
    fn connection_cap_keeps_a_descriptor_reserve() {
        assert_eq!(connection_cap(256, Some(512)), 256);
        assert_eq!(connection_cap(256, Some(300)), 172);
        assert_eq!(connection_cap(256, Some(100)), 8);
        assert_eq!(connection_cap(256, None), 256);
    }
}
