//! Prometheus metrics of the alert stage, registered into a registry the caller owns.

use std::collections::HashMap;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::AlertError;
use super::edges::DeniedEdge;
use super::spike::{SpikeDetector, SpikeKey};
use crate::export::OVERFLOW;
use crate::flow::FastSet;

/// `deny_observer_deny_spike_active`: 1 while a spike is active, else 0.
pub const SPIKE_ACTIVE: &str = "deny_observer_deny_spike_active";
/// `deny_observer_deny_rate_baseline`: baseline deny rate, packets per second.
pub const RATE_BASELINE: &str = "deny_observer_deny_rate_baseline";
/// `deny_observer_deny_rate`: current deny rate, packets per second.
pub const RATE: &str = "deny_observer_deny_rate";
/// `deny_observer_deny_baseline_ready`: 1 once the detector's warm-up is over for the key (its
/// baseline can be compared with), else 0. The spike rule's cluster-wide path waits for it.
pub const BASELINE_READY: &str = "deny_observer_deny_baseline_ready";
/// `deny_observer_deny_top_port`: the destination port with the most recent denies of a key,
/// as labels; the value is its deny rate in packets per second.
pub const TOP_PORT: &str = "deny_observer_deny_top_port";
/// `deny_observer_new_denied_edges_total`: new denied edges seen.
pub const NEW_DENIED_EDGES: &str = "deny_observer_new_denied_edges_total";
/// `deny_observer_spike_keys_overflow_total`: denies not tracked because the detector was full.
pub const SPIKE_KEYS_OVERFLOW: &str = "deny_observer_spike_keys_overflow_total";
/// `deny_observer_alert_state_save_errors_total`: failed writes of the denied-edge state file.
pub const STATE_SAVE_ERRORS: &str = "deny_observer_alert_state_save_errors_total";

/// `deny_observer_denied_edges_evicted_total{table}`: edges the caps pushed out of the edge
/// table (`table="edges"`, still known in the compact set) or out of the compact known-edge set
/// (`table="known"`, may be reported as new again).
pub const EDGES_EVICTED: &str = "deny_observer_denied_edges_evicted_total";
/// `deny_observer_denied_edges{table}`: edges remembered in the table and the compact set.
pub const EDGES_KNOWN: &str = "deny_observer_denied_edges";
/// `deny_observer_denied_edges_learned_total`: edges first denied during learning (recorded as
/// known, not counted as new).
pub const EDGES_LEARNED: &str = "deny_observer_denied_edges_learned_total";
/// `deny_observer_edge_learning_active`: 1 during the learning period, else 0.
pub const EDGE_LEARNING: &str = "deny_observer_edge_learning_active";

/// Label names of the spike gauges, in order.
pub const SPIKE_LABELS: [&str; 4] = ["direction", "workload_namespace", "workload", "expected"];
/// Label names of the top-port gauge, in order: the spike key, then the port.
pub const TOP_PORT_LABELS: [&str; 6] = [
    "direction",
    "workload_namespace",
    "workload",
    "expected",
    "protocol",
    "port",
];
/// Label names of the new-edge counter, in order.
pub const EDGE_LABELS: [&str; 8] = [
    "direction",
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_workload",
    "protocol",
    "port",
    "expected",
];

/// Every metric name the alert stage exports.
pub fn metric_names() -> Vec<&'static str> {
    vec![
        SPIKE_ACTIVE,
        RATE_BASELINE,
        RATE,
        BASELINE_READY,
        TOP_PORT,
        NEW_DENIED_EDGES,
        SPIKE_KEYS_OVERFLOW,
        STATE_SAVE_ERRORS,
        EDGES_EVICTED,
        EDGES_KNOWN,
        EDGES_LEARNED,
        EDGE_LEARNING,
    ]
}

fn bool_label(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

fn spike_labels(key: &SpikeKey) -> [&str; 4] {
    [
        key.direction.label(),
        &key.workload_namespace,
        &key.workload,
        bool_label(key.expected),
    ]
}

/// The alert stage's metric handles.
#[derive(Clone, Debug)]
pub struct AlertMetrics {
    spike_active: GaugeVec,
    rate_baseline: GaugeVec,
    rate: GaugeVec,
    baseline_ready: GaugeVec,
    top_port: GaugeVec,
    /// The (protocol, port) labels exported per key, to remove the series when the top moves.
    top_port_shown: HashMap<SpikeKey, (&'static str, String)>,
    new_edges: IntCounterVec,
    overflow: prometheus::IntCounter,
    save_errors: prometheus::IntCounter,
    overflow_seen: u64,
    edges_evicted: IntCounterVec,
    edges_known: IntGaugeVec,
    edges_learned: IntCounter,
    edge_learning: IntGauge,
    new_edge_bound: NewEdgeBound,
}

/// The series limit of `deny_observer_new_denied_edges_total`.
#[derive(Clone, Debug, Default)]
struct NewEdgeBound {
    /// `None`: unbounded (no limit bound yet).
    limit: Option<usize>,
    /// Label sets held below the limit.
    held: FastSet<(DeniedEdge, bool)>,
    overflow: Option<IntCounter>,
    series: Option<IntGauge>,
}

impl AlertMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self, AlertError> {
        let reg = |name: &'static str| move |source| AlertError::Metrics { name, source };
        let spike_active = GaugeVec::new(
            Opts::new(
                SPIKE_ACTIVE,
                "1 while the policy-deny rate of a workload is in a spike above its baseline, else 0.",
            ),
            &SPIKE_LABELS,
        )
        .map_err(reg(SPIKE_ACTIVE))?;
        let rate_baseline = GaugeVec::new(
            Opts::new(
                RATE_BASELINE,
                "Exponentially weighted baseline of the policy-deny rate, packets per second.",
            ),
            &SPIKE_LABELS,
        )
        .map_err(reg(RATE_BASELINE))?;
        let rate = GaugeVec::new(
            Opts::new(
                RATE,
                "Policy-deny rate over the detector's short window, packets per second.",
            ),
            &SPIKE_LABELS,
        )
        .map_err(reg(RATE))?;
        let baseline_ready = GaugeVec::new(
            Opts::new(
                BASELINE_READY,
                "1 once the spike detector's warm-up is over and the baseline can be compared with, else 0.",
            ),
            &SPIKE_LABELS,
        )
        .map_err(reg(BASELINE_READY))?;
        let top_port = GaugeVec::new(
            Opts::new(
                TOP_PORT,
                "Destination port with the most recent policy denies of the workload (labels); value: its deny rate, packets per second.",
            ),
            &TOP_PORT_LABELS,
        )
        .map_err(reg(TOP_PORT))?;
        let new_edges = IntCounterVec::new(
            Opts::new(
                NEW_DENIED_EDGES,
                "Denied edges not denied within the retention window before (first deny of a path).",
            ),
            &EDGE_LABELS,
        )
        .map_err(reg(NEW_DENIED_EDGES))?;
        let overflow = prometheus::IntCounter::new(
            SPIKE_KEYS_OVERFLOW,
            "Denies of new workloads not tracked by the spike detector because it was full.",
        )
        .map_err(reg(SPIKE_KEYS_OVERFLOW))?;
        let save_errors = prometheus::IntCounter::new(
            STATE_SAVE_ERRORS,
            "Failed writes of the denied-edge state file.",
        )
        .map_err(reg(STATE_SAVE_ERRORS))?;
        let edges_evicted = IntCounterVec::new(
            Opts::new(
                EDGES_EVICTED,
                "Denied edges pushed out by a cap: table=edges moved to the compact known set \
                 (still known, series removed), table=known forgotten (may be new again).",
            ),
            &["table"],
        )
        .map_err(reg(EDGES_EVICTED))?;
        let edges_known = IntGaugeVec::new(
            Opts::new(
                EDGES_KNOWN,
                "Denied edges remembered: table=edges with labels, table=known as compact hashes.",
            ),
            &["table"],
        )
        .map_err(reg(EDGES_KNOWN))?;
        let edges_learned = IntCounter::new(
            EDGES_LEARNED,
            "Denied edges first seen during the learning period: recorded as known, not new.",
        )
        .map_err(reg(EDGES_LEARNED))?;
        let edge_learning = IntGauge::new(
            EDGE_LEARNING,
            "1 while new denied edges are learned (not reported as new), else 0.",
        )
        .map_err(reg(EDGE_LEARNING))?;
        for table in ["edges", "known"] {
            edges_evicted.with_label_values(&[table]);
            edges_known.with_label_values(&[table]);
        }
        registry
            .register(Box::new(edges_evicted.clone()))
            .map_err(reg(EDGES_EVICTED))?;
        registry
            .register(Box::new(edges_known.clone()))
            .map_err(reg(EDGES_KNOWN))?;
        registry
            .register(Box::new(edges_learned.clone()))
            .map_err(reg(EDGES_LEARNED))?;
        registry
            .register(Box::new(edge_learning.clone()))
            .map_err(reg(EDGE_LEARNING))?;
        registry
            .register(Box::new(spike_active.clone()))
            .map_err(reg(SPIKE_ACTIVE))?;
        registry
            .register(Box::new(rate_baseline.clone()))
            .map_err(reg(RATE_BASELINE))?;
        registry
            .register(Box::new(rate.clone()))
            .map_err(reg(RATE))?;
        registry
            .register(Box::new(baseline_ready.clone()))
            .map_err(reg(BASELINE_READY))?;
        registry
            .register(Box::new(top_port.clone()))
            .map_err(reg(TOP_PORT))?;
        registry
            .register(Box::new(new_edges.clone()))
            .map_err(reg(NEW_DENIED_EDGES))?;
        registry
            .register(Box::new(overflow.clone()))
            .map_err(reg(SPIKE_KEYS_OVERFLOW))?;
        registry
            .register(Box::new(save_errors.clone()))
            .map_err(reg(STATE_SAVE_ERRORS))?;
        Ok(Self {
            spike_active,
            rate_baseline,
            rate,
            baseline_ready,
            top_port,
            top_port_shown: HashMap::new(),
            new_edges,
            overflow,
            save_errors,
            overflow_seen: 0,
            edges_evicted,
            edges_known,
            edges_learned,
            edge_learning,
            new_edge_bound: NewEdgeBound::default(),
        })
    }

    /// Name and label names of every family this stage registers, from the collectors'
    /// descriptors: what `/metrics` can show, whether or not a family has samples yet.
    pub fn descriptors(&self) -> Vec<(String, Vec<String>)> {
        let collectors: [&dyn prometheus::core::Collector; 12] = [
            &self.spike_active,
            &self.rate_baseline,
            &self.rate,
            &self.baseline_ready,
            &self.top_port,
            &self.new_edges,
            &self.overflow,
            &self.save_errors,
            &self.edges_evicted,
            &self.edges_known,
            &self.edges_learned,
            &self.edge_learning,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc())
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect()
    }

    /// Bounds `deny_observer_new_denied_edges_total` to `limit` series (see
    /// [`super::AlertStage::bound_new_edge_series`]).
    pub fn bound_new_edges(&mut self, limit: usize, overflow: IntCounter, series: IntGauge) {
        series.set(i64::try_from(self.new_edge_bound.held.len()).unwrap_or(i64::MAX));
        self.new_edge_bound.limit = Some(limit);
        self.new_edge_bound.overflow = Some(overflow);
        self.new_edge_bound.series = Some(series);
    }

    /// Counts edges evicted by the table's cap (moved to the known set) and by the known
    /// set's cap (forgotten).
    pub fn record_evictions(&self, to_known: u64, from_known: u64) {
        self.edges_evicted
            .with_label_values(&["edges"])
            .inc_by(to_known);
        self.edges_evicted
            .with_label_values(&["known"])
            .inc_by(from_known);
    }

    /// Sets the edge-table gauges and the learning flag.
    pub fn set_edge_table(&self, edges: usize, known: usize, learning: bool) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.edges_known.with_label_values(&["edges"]).set(n(edges));
        self.edges_known.with_label_values(&["known"]).set(n(known));
        self.edge_learning.set(i64::from(learning));
    }

    /// Counts an edge learned during the learning period.
    pub fn record_learned_edge(&self) {
        self.edges_learned.inc();
    }

    /// Mirrors the detector into the gauges (call after each tick): sets every tracked key and
    /// removes the series of keys the detector dropped.
    pub fn update_spikes(&mut self, detector: &mut SpikeDetector) {
        for key in detector.take_dropped() {
            let labels = spike_labels(&key);
            // A key may be dropped before it was ever exported; nothing to remove then.
            let _ = self.spike_active.remove_label_values(&labels);
            let _ = self.rate_baseline.remove_label_values(&labels);
            let _ = self.rate.remove_label_values(&labels);
            let _ = self.baseline_ready.remove_label_values(&labels);
            if let Some((protocol, port)) = self.top_port_shown.remove(&key) {
                let [d, ns, w, e] = labels;
                let _ = self
                    .top_port
                    .remove_label_values(&[d, ns, w, e, protocol, &port]);
            }
        }
        for st in detector.statuses() {
            let labels = spike_labels(st.key);
            self.spike_active
                .with_label_values(&labels)
                .set(if st.active { 1.0 } else { 0.0 });
            self.rate_baseline
                .with_label_values(&labels)
                .set(st.baseline);
            self.rate.with_label_values(&labels).set(st.rate);
            self.baseline_ready
                .with_label_values(&labels)
                .set(if st.baseline_ready { 1.0 } else { 0.0 });
            let [d, ns, w, e] = labels;
            let top = st
                .top_port
                .map(|(protocol, port, rate)| ((protocol.label(), port.to_string()), rate));
            let shown = self.top_port_shown.get(st.key);
            if shown.is_some()
                && shown != top.as_ref().map(|(l, _)| l)
                && let Some((protocol, port)) = self.top_port_shown.remove(st.key)
            {
                let _ = self
                    .top_port
                    .remove_label_values(&[d, ns, w, e, protocol, &port]);
            }
            if let Some(((protocol, port), rate)) = top {
                self.top_port
                    .with_label_values(&[d, ns, w, e, protocol, &port])
                    .set(rate);
                self.top_port_shown
                    .entry(st.key.clone())
                    .or_insert((protocol, port));
            }
        }
        let overflowed = detector.overflowed();
        self.overflow
            .inc_by(overflowed.saturating_sub(self.overflow_seen));
        self.overflow_seen = overflowed;
    }

    /// Counts a new denied edge, on its own series while the series limit allows, else on
    /// the overflow series of its direction, protocol and `expected`.
    pub fn record_new_edge(&mut self, edge: &DeniedEdge, expected: bool) {
        let bound = &mut self.new_edge_bound;
        let key = (edge.clone(), expected);
        let own = bound.held.contains(&key)
            || match bound.limit {
                Some(limit) if bound.held.len() >= limit => false,
                _ => {
                    bound.held.insert(key);
                    if let Some(series) = &bound.series {
                        series.set(i64::try_from(bound.held.len()).unwrap_or(i64::MAX));
                    }
                    true
                }
            };
        if own {
            let port = edge.port_label();
            self.new_edges
                .with_label_values(&edge_labels(edge, &port, expected))
                .inc();
            return;
        }
        self.new_edges
            .with_label_values(&[
                edge.direction.label(),
                OVERFLOW,
                OVERFLOW,
                OVERFLOW,
                OVERFLOW,
                edge.protocol.label(),
                "other",
                bool_label(expected),
            ])
            .inc();
        if let Some(overflow) = &bound.overflow {
            overflow.inc();
        }
    }

    /// Removes the counters of edges the tracker forgot (bounded series).
    pub fn forget_edges(&mut self, edges: &[(DeniedEdge, bool)]) {
        let bound = &mut self.new_edge_bound;
        for (edge, expected) in edges {
            let port = edge.port_label();
            let _ = self
                .new_edges
                .remove_label_values(&edge_labels(edge, &port, *expected));
            bound.held.remove(&(edge.clone(), *expected));
        }
        if let Some(series) = &bound.series {
            series.set(i64::try_from(bound.held.len()).unwrap_or(i64::MAX));
        }
    }

    /// Counts a failed state-file write.
    pub fn record_save_error(&self) {
        self.save_errors.inc();
    }
}

fn edge_labels<'a>(edge: &'a DeniedEdge, port: &'a str, expected: bool) -> [&'a str; 8] {
    [
        edge.direction.label(),
        &edge.source_namespace,
        &edge.source_workload,
        &edge.destination_namespace,
        &edge.destination_workload,
        edge.protocol.label(),
        port,
        bool_label(expected),
    ]
}
