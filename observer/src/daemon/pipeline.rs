//! The pipeline thread: drains the capture, attributes each drain, hands the outcomes to the
//! sinks, and keeps the inventory views and the per-second stages current.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntGaugeVec;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::alert::{AlertSink, AlertStage, SpikeTransition};
use crate::attribute::{Attribution, Sink, Views};
use crate::capture::Capture;
use crate::export::connections::ConnectionMetrics;
use crate::export::events::{EventSink, SpikeNotice, SpikePhase};
use crate::export::{HttpState, Metrics, MetricsSink, OVERFLOW, RefreshRequest};
use crate::inventory::{Inventory, NodeAddrs, ReloadStats, SERVICE_WORKLOAD_PREFIX};

/// The synchronous heart of the daemon: drains the capture, attributes, and hands the
/// outcomes to the sinks.
pub(super) struct Pipeline {
    capture: Capture,
    views: Views,
    core: Attribution,
    metrics_sink: MetricsSink,
    alert: AlertSink,
    /// `None` when Events are off.
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
    http: Arc<HttpState>,
    inventory_rx: watch::Receiver<Arc<Inventory>>,
    open_namespaces: IntGaugeVec,
    reload_stats: Option<Arc<ReloadStats>>,
    reloads_seen: (u64, u64),
    /// Staleness of the inventory source (manifest directory or API-server watches).
    inventory_health: Option<Arc<ReloadStats>>,
    series_limit: usize,
    last_retain: Instant,
    last_drain: Instant,
    /// `deny_observer_connections_total`.
    connections: ConnectionMetrics,
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

/// The Event of a spike transition, on the workload whose policy denied.
fn spike_notice(views: &Views, t: &SpikeTransition) -> SpikeNotice {
    SpikeNotice {
        namespace: t.key.workload_namespace.to_string(),
        kind: views
            .workload_kind(&t.key.workload_namespace, &t.key.workload)
            .unwrap_or_default()
            .to_owned(),
        name: t.key.workload.to_string(),
        phase: if t.started {
            SpikePhase::Started
        } else {
            SpikePhase::Ended
        },
        denied_per_minute: t.rate * 60.0,
        baseline_per_minute: t.baseline * 60.0,
        detail: Some(format!("{} denies", t.key.direction)),
    }
}

/// A scrape's refresh request drains only if the last drain is at least this old: scrapes in
/// quick succession (or a dashboard polling) cost one drain per this period at most, and the
/// counters a scrape sees are never older than this plus the drain itself.
const REFRESH_MIN_AGE: Duration = Duration::from_millis(100);
/// How often series of vanished workloads are looked for.
const RETAIN_EVERY: Duration = Duration::from_secs(30);

/// The stages [`Pipeline::new`] wires together.
pub(super) struct Stages {
    pub(super) capture: Capture,
    pub(super) metrics: Arc<Metrics>,
    pub(super) http: Arc<HttpState>,
    pub(super) inventory_rx: watch::Receiver<Arc<Inventory>>,
    pub(super) node: NodeAddrs,
    pub(super) alert: AlertStage,
    pub(super) open_namespaces: IntGaugeVec,
    pub(super) reload_stats: Option<Arc<ReloadStats>>,
    pub(super) inventory_health: Option<Arc<ReloadStats>>,
    pub(super) events: Option<EventSink>,
    pub(super) connections: ConnectionMetrics,
}

impl Pipeline {
    pub(super) fn new(stages: Stages) -> Self {
        let series_limit = stages.metrics.config().series_limit;
        let now = SystemTime::now();
        let mut pipeline = Self {
            capture: stages.capture,
            views: Views::new(Arc::new(Inventory::default()), stages.node),
            core: Attribution::new(stages.events.is_some(), now),
            metrics_sink: MetricsSink::new(Arc::clone(&stages.metrics)),
            alert: AlertSink::new(stages.alert),
            events: stages.events,
            metrics: stages.metrics,
            http: stages.http,
            inventory_rx: stages.inventory_rx,
            open_namespaces: stages.open_namespaces,
            reload_stats: stages.reload_stats,
            reloads_seen: (0, 0),
            inventory_health: stages.inventory_health,
            series_limit,
            last_retain: Instant::now(),
            last_drain: Instant::now(),
            connections: stages.connections,
        };
        pipeline.refresh_inventory(true);
        pipeline
    }

    /// Drains every `interval` and at each refresh request until `stop` is set. The thread
    /// sleeps in between: whoever sets `stop` also sends a request (one nobody waits for) to
    /// wake it. Ten timed wake-ups a second to look at `stop` were a third of an idle
    /// daemon's pipeline time.
    pub(super) fn run(
        mut self,
        interval: Duration,
        stop: &AtomicBool,
        refreshes: &std::sync::mpsc::Receiver<RefreshRequest>,
    ) {
        let mut next = Instant::now() + interval;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                match refreshes.recv_timeout(next - now) {
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
        if let Err(err) = self.alert.stage_mut().shutdown(SystemTime::now()) {
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
            .set_inventory_objects("services", counts.services);
        self.metrics
            .set_inventory_invalid_objects(&inv.invalid_counts());
        self.alert
            .stage_mut()
            .set_policies(inv.policies.iter().map(|p| p.as_ref()));
        self.http.set_inventory_empty(inv.is_empty());
        let update = self.views.update(inv);
        debug!(?update, "inventory views updated");
        let engine = self.views.engine();
        export_open_namespaces(
            &self.open_namespaces,
            engine.audit().iter().map(|ns| (ns.name.as_str(), ns.open)),
            self.series_limit,
        );
        for warning in engine.warnings() {
            warn!(warning = %warning, "NetworkPolicy the engine cannot fully honour");
        }
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
        self.alert.flush_log(Instant::now());
        for transition in self.alert.stage_mut().tick(now) {
            if transition.started {
                warn!(spike = %transition, "deny spike started");
            } else {
                info!(spike = %transition, "deny spike ended");
            }
            if let Some(events) = &self.events {
                events.spike(spike_notice(&self.views, &transition));
            }
        }
        if self.last_retain.elapsed() >= RETAIN_EVERY {
            self.last_retain = Instant::now();
            let live: std::collections::HashSet<(&str, &str)> = self
                .views
                .inventory()
                .pods
                .iter()
                .map(|p| (p.namespace.as_str(), p.workload.name.as_str()))
                .collect();
            let services: std::collections::HashSet<(&str, &str)> = self
                .views
                .inventory()
                .services
                .iter()
                .map(|s| (s.namespace.as_str(), s.name.as_str()))
                .collect();
            // A ClusterIP's drop series (`service/<name>`) lives as long as its Service.
            let live_drop_end = |ns: &str, workload: &str| {
                live.contains(&(ns, workload))
                    || workload
                        .strip_prefix(SERVICE_WORKLOAD_PREFIX)
                        .is_some_and(|name| services.contains(&(ns, name)))
            };
            let removed = self.metrics.retain_workloads(&live_drop_end)
                + self.connections.retain_workloads_at(
                    Instant::now(),
                    self.metrics.config().expiry_grace,
                    &|ns, workload| live.contains(&(ns, workload)),
                );
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

    /// Drains the kernel maps, attributes the drain and hands the outcomes to every sink.
    fn drain(&mut self, now: SystemTime) {
        self.refresh_inventory(false);
        self.export_reload_stats();
        self.last_drain = Instant::now();
        // Samples first: each is of a flow whose first packet the drain then counts.
        let samples = self.capture.samples();
        let bad_samples = self.capture.take_bad_samples();
        match self.capture.drain() {
            Ok(report) => {
                self.core.attribute(&self.views, &report, &samples, now);
                self.core.outcomes_mut().bad_samples = bad_samples;
                let out = self.core.outcomes();
                let mut sinks: [Option<&mut dyn Sink>; 3] = [
                    Some(&mut self.metrics_sink),
                    Some(&mut self.alert),
                    self.events.as_mut().map(|e| e as &mut dyn Sink),
                ];
                for sink in sinks.iter_mut().flatten() {
                    sink.record(out, now);
                }
                self.capture.recycle(report, samples);
            }
            Err(err) => {
                // A failed drain loses nothing: the kernel keeps counting and the next drain
                // takes the whole delta. Say so loudly anyway.
                error!(error = %err, "draining the flow map failed");
                if bad_samples > 0 {
                    self.metrics.record_loss("sample_malformed", bad_samples);
                }
            }
        }
        self.drain_connections();
        self.http.counters_refreshed();
        self.capture.flush_logs();
    }

    /// Drains the connection map into `deny_observer_connections_total`.
    fn drain_connections(&mut self) {
        let Some(capture) = self.capture.connections() else {
            return;
        };
        match capture.drain() {
            Ok(report) => {
                let views = &self.views;
                self.connections.record_drain(
                    &self.metrics,
                    &report,
                    |ip| views.endpoint(ip),
                    |ip| views.service(ip),
                );
            }
            Err(err) => error!(error = %err, "draining the connection map failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

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
}
