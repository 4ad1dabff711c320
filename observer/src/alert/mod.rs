//! Deny-spike baselines, new-denied-edge detection, and expected denies.
//!
//! - [`spike::SpikeDetector`]: per (direction, workload namespace, workload) deny-rate baseline
//!   and spike state machine with hysteresis.
//! - [`edges::EdgeTracker`]: first deny of an edge within a retention window, persisted.
//! - [`expected::ExpectedDenies`]: annotated policies and configured edges that never page.
//! - [`metrics::AlertMetrics`]: the Prometheus side.
//! - [`AlertStage`]: all of the above behind two calls, [`AlertStage::record_deny`] per
//!   denied edge of a drain and [`AlertStage::tick`] once per second.
//! - [`AlertSink`]: the stage as a sink of the attribution core's outcomes.
//!
//! Time is always passed in; nothing here reads the clock, so tests use synthetic series.

pub mod config;
pub mod edges;
pub mod expected;
pub mod metrics;
pub mod sink;
pub mod spike;

use std::sync::Arc;
use std::time::SystemTime;

pub use config::{AlertArgs, AlertConfig};
pub use edges::{
    DeniedEdge, EdgeConfig, EdgeStateError, EdgeTracker, LoadOutcome, StateLock, StateLockError,
};
pub use expected::{EXPECTED_DENIES_ANNOTATION, ExpectedDenies, ExpectedEdge};
pub use metrics::{AlertMetrics, metric_names};
pub use sink::AlertSink;
pub use spike::{SpikeConfig, SpikeDetector, SpikeKey, SpikeTransition};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::flow::{Direction, Protocol};

/// Errors of the alert stage.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A setting is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Which setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A duration flag did not parse.
    #[error("invalid duration {value:?}: {reason}")]
    InvalidDuration {
        /// The text given.
        value: String,
        /// Why.
        reason: String,
    },
    /// An `--expected-edge` did not parse.
    #[error(
        "invalid expected edge {value:?}: {reason} \
         (syntax: SRC_NS/SRC_WORKLOAD->DST_NS/DST_WORKLOAD[:PROTO[/PORT]], '*' matches any)"
    )]
    InvalidExpectedEdge {
        /// The text given.
        value: String,
        /// Why.
        reason: String,
    },
    /// A metric could not be created or registered.
    #[error("cannot register metric {name}: {source}")]
    Metrics {
        /// Metric name.
        name: &'static str,
        /// Cause.
        source: prometheus::Error,
    },
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] EdgeStateError),
}

/// What [`AlertStage::record_deny`] concluded about one deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyOutcome {
    /// The deny is expected (annotated policy or configured edge).
    pub expected: bool,
    /// First deny of this edge within the retention window. The daemon logs it; alerting on it
    /// is Prometheus' job (`deny_observer_new_denied_edges_total`).
    pub new_edge: bool,
    /// First deny of this edge during the learning period: recorded as known, not reported.
    pub learned: bool,
    /// The edge was recorded with `port="other"` (its pair is over the per-edge port budget).
    pub port_folded: bool,
}

/// The spike key a deny counts towards: the workload whose policy denied, which is the
/// destination for ingress and the source for egress (and the destination when unknown).
pub fn spike_key(edge: &DeniedEdge, expected: bool) -> SpikeKey {
    let (workload_namespace, workload) = spike_workload(edge);
    SpikeKey {
        direction: edge.direction,
        workload_namespace: workload_namespace.clone(),
        workload: workload.clone(),
        expected,
    }
}

/// Namespace and workload of the side whose policy denied `edge` (see [`spike_key`]).
fn spike_workload(edge: &DeniedEdge) -> (&Arc<str>, &Arc<str>) {
    match edge.direction {
        Direction::Egress => (&edge.source_namespace, &edge.source_workload),
        Direction::Ingress | Direction::Unknown => {
            (&edge.destination_namespace, &edge.destination_workload)
        }
    }
}

/// The whole alert stage, as the daemon drives it.
#[derive(Debug)]
pub struct AlertStage {
    detector: SpikeDetector,
    edges: EdgeTracker,
    expected: ExpectedDenies,
    metrics: AlertMetrics,
    last_prune_ms: Option<u64>,
    /// The spike key of the last deny recorded: a scan's edges share it, so reusing it spares
    /// two `Arc` clones per edge.
    last_spike_key: Option<SpikeKey>,
}

/// Forgetting expired edges scans the whole table; once per this often is plenty for a
/// retention measured in days.
const PRUNE_EVERY_MS: u64 = 10_000;

impl AlertStage {
    /// Builds the stage: registers metrics into `registry`, loads the edge state (a bad state
    /// file is logged and ignored). Fails only on invalid settings or duplicate metrics.
    pub fn new(
        config: AlertConfig,
        registry: &prometheus::Registry,
        now: SystemTime,
    ) -> Result<Self, AlertError> {
        config.edges.validate()?;
        let detector = SpikeDetector::new(config.spike)?;
        let metrics = AlertMetrics::register(registry)?;
        let edges = EdgeTracker::open(config.edges, now);
        // Right away, not at the first tick: a scrape may come first.
        metrics.set_edge_table(edges.len(), edges.known_len(), edges.is_learning(now));
        Ok(Self {
            detector,
            edges,
            expected: ExpectedDenies::new(config.expected_edges),
            metrics,
            last_prune_ms: None,
            last_spike_key: None,
        })
    }

    /// Re-reads which policies carry the expected-denies annotation (call on inventory change).
    pub fn set_policies<'a>(&mut self, policies: impl IntoIterator<Item = &'a NetworkPolicy>) {
        self.expected.set_policies(policies);
    }

    /// Records `packets` policy-denied packets of `edge` drained at `now`.
    /// `isolating_policies` are `(namespace, name)` of the policies that denied it.
    pub fn record_deny<'p>(
        &mut self,
        now: SystemTime,
        edge: &DeniedEdge,
        packets: u64,
        isolating_policies: impl IntoIterator<Item = (&'p str, &'p str)>,
    ) -> DenyOutcome {
        let expected = self.expected.is_expected(edge, isolating_policies);
        let (workload_namespace, workload) = spike_workload(edge);
        let same_key = self.last_spike_key.as_ref().is_some_and(|k| {
            k.direction == edge.direction
                && k.expected == expected
                && Arc::ptr_eq(&k.workload_namespace, workload_namespace)
                && Arc::ptr_eq(&k.workload, workload)
        });
        let key = match &mut self.last_spike_key {
            Some(key) if same_key => key,
            slot => slot.insert(spike_key(edge, expected)),
        };
        let port = matches!(
            edge.protocol,
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp
        )
        .then_some((edge.protocol, edge.port));
        self.detector.observe_deny(now, key, packets, port);
        let observed = self.edges.record(now, edge, expected);
        if observed.new {
            if observed.folded && !edge.ports_folded {
                self.metrics.record_new_edge(&edge.folded(), expected);
            } else {
                self.metrics.record_new_edge(edge, expected);
            }
        }
        if observed.learned {
            self.metrics.record_learned_edge();
        }
        DenyOutcome {
            expected,
            new_edge: observed.new,
            learned: observed.learned,
            port_folded: observed.folded,
        }
    }

    /// Makes `deny_observer_new_denied_edges_total` hold at most `limit` series; edges beyond
    /// it are counted on one overflow series per (direction, protocol, expected), and on
    /// `overflow` (`deny_observer_series_overflow_total{metric}`); `series` tracks how many
    /// are held (`deny_observer_series{metric}`).
    pub fn bound_new_edge_series(
        &mut self,
        limit: usize,
        overflow: prometheus::IntCounter,
        series: prometheus::IntGauge,
    ) {
        self.metrics.bound_new_edges(limit, overflow, series);
    }

    /// Once per second: advances the detector, updates gauges, forgets expired edges, saves the
    /// edge state when due (a failed save is logged and counted, and retried later).
    /// Returns the spike starts/ends to turn into Events and log lines.
    pub fn tick(&mut self, now: SystemTime) -> Vec<SpikeTransition> {
        // The detector may forget idle keys now; so does the stage, and their names can go.
        self.last_spike_key = None;
        let transitions = self.detector.tick(now);
        self.metrics.update_spikes(&mut self.detector);
        let now_ms = spike::unix_ms(now);
        if self
            .last_prune_ms
            .is_none_or(|last| now_ms.saturating_sub(last) >= PRUNE_EVERY_MS)
        {
            self.last_prune_ms = Some(now_ms);
            let forgotten = self.edges.prune_report(now);
            self.metrics.forget_edges(&forgotten.edges);
            self.metrics
                .record_evictions(forgotten.evicted_to_known, forgotten.evicted_from_known);
        }
        self.metrics.set_edge_table(
            self.edges.len(),
            self.edges.known_len(),
            self.edges.is_learning(now),
        );
        if let Err(err) = self.edges.maybe_save(now) {
            self.metrics.record_save_error();
            tracing::warn!(error = %err, "saving denied-edge state failed; will retry");
        }
        transitions
    }

    /// Saves the edge state; call at shutdown.
    pub fn shutdown(&mut self, now: SystemTime) -> Result<(), AlertError> {
        self.edges.save(now).map_err(|e| {
            self.metrics.record_save_error();
            AlertError::from(e)
        })
    }

    /// The spike detector (read-only, e.g. for `/debug` or tests).
    pub fn detector(&self) -> &SpikeDetector {
        &self.detector
    }

    /// The edge tracker (read-only).
    pub fn edges(&self) -> &EdgeTracker {
        &self.edges
    }

    /// The expected-deny rules.
    pub fn expected(&self) -> &ExpectedDenies {
        &self.expected
    }
}
