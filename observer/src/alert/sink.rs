//! The alert stage as a sink of attribution outcomes: each drain's denied edges feed the
//! spike detector and the new-edge tracker, and a new edge is logged (rate-limited).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::{AlertStage, DeniedEdge};
use crate::attribute::{EdgeDeny, Outcomes, Sink, endpoint_labels};
use crate::flow::FastSet;

/// Most "new denied edge" log lines per [`EDGE_LOG_WINDOW`]; the rest are counted and summed
/// up in one line (a port scan would otherwise write a line per port).
pub const EDGE_LOG_BURST: u32 = 20;
/// The window of [`EDGE_LOG_BURST`].
pub const EDGE_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Rate limit of the "new denied edge" log line.
#[derive(Debug)]
pub struct EdgeLogLimit {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl EdgeLogLimit {
    /// A limit whose first window starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// True when one more line may be written now; otherwise counts it as suppressed.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.flush(now);
        if self.logged < EDGE_LOG_BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Lines left out in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// At the end of a window, says how many lines were left out, and starts a new one.
    pub fn flush(&mut self, now: Instant) {
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
        *self = Self::new(now);
    }
}

/// Namespace and workload names shared by the edges and spike keys of the alert stage, so
/// that an edge seen at every drain costs no string copies.
#[derive(Debug, Default)]
pub struct Names {
    names: FastSet<Arc<str>>,
}

impl Names {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets names nothing else holds any more (edges and spike keys that expired).
    pub fn prune(&mut self) {
        self.names.retain(|name| Arc::strong_count(name) > 1);
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when no name is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The denied edge an outcome stands for, its names taken from `names`.
pub fn denied_edge(e: &EdgeDeny, names: &mut Names) -> DeniedEdge {
    let (source_namespace, source_workload) = endpoint_labels(e.src.as_ref());
    let (destination_namespace, destination_workload) = endpoint_labels(e.dst.as_ref());
    DeniedEdge {
        direction: e.direction,
        source_namespace: names.get(source_namespace),
        source_workload: names.get(source_workload),
        destination_namespace: names.get(destination_namespace),
        destination_workload: names.get(destination_workload),
        protocol: e.protocol,
        port: e.port,
        ports_folded: false,
    }
}

/// How often names nothing uses any more are forgotten.
const PRUNE_NAMES_EVERY: Duration = Duration::from_secs(60);

/// [`AlertStage`] fed by attribution outcomes.
#[derive(Debug)]
pub struct AlertSink {
    stage: AlertStage,
    edge_log: EdgeLogLimit,
    names: Names,
    last_prune: Instant,
}

impl AlertSink {
    /// Wraps a stage.
    pub fn new(stage: AlertStage) -> Self {
        Self {
            stage,
            edge_log: EdgeLogLimit::new(Instant::now()),
            names: Names::default(),
            last_prune: Instant::now(),
        }
    }

    /// The stage.
    pub fn stage(&self) -> &AlertStage {
        &self.stage
    }

    /// The stage, to re-read policies or tick it.
    pub fn stage_mut(&mut self) -> &mut AlertStage {
        &mut self.stage
    }

    /// Closes the log window if it is over, and now and then forgets names no edge uses any
    /// more (call once per tick).
    pub fn flush_log(&mut self, now: Instant) {
        self.edge_log.flush(now);
        if now.saturating_duration_since(self.last_prune) >= PRUNE_NAMES_EVERY {
            self.last_prune = now;
            self.names.prune();
        }
    }
}

/// Whether `edge` already names the workloads of `e`'s endpoints.
fn same_workloads(edge: &DeniedEdge, e: &EdgeDeny) -> bool {
    let (source_namespace, source_workload) = endpoint_labels(e.src.as_ref());
    let (destination_namespace, destination_workload) = endpoint_labels(e.dst.as_ref());
    *edge.source_workload == *source_workload
        && *edge.destination_workload == *destination_workload
        && *edge.source_namespace == *source_namespace
        && *edge.destination_namespace == *destination_namespace
}

impl Sink for AlertSink {
    fn record(&mut self, outcomes: &Outcomes, now: SystemTime) {
        // A scan or a wide flood is a run of edges between the same two workloads on many
        // ports: one edge value serves the run, its names looked up once, rather than four
        // name lookups and `Arc` clones per edge.
        let mut current: Option<DeniedEdge> = None;
        for e in &outcomes.edges {
            let edge = match &mut current {
                Some(edge) if same_workloads(edge, e) => {
                    edge.direction = e.direction;
                    edge.protocol = e.protocol;
                    edge.port = e.port;
                    edge
                }
                slot => slot.insert(denied_edge(e, &mut self.names)),
            };
            let edge = &*edge;
            let outcome = self
                .stage
                .record_deny(now, edge, e.packets, e.isolating_policies());
            if outcome.new_edge && self.edge_log.allow(Instant::now()) {
                info!(
                    direction = %edge.direction,
                    source = %format!("{}/{}", edge.source_namespace, edge.source_workload),
                    destination = %format!(
                        "{}/{}", edge.destination_namespace, edge.destination_workload
                    ),
                    protocol = edge.protocol.label(),
                    port = %if outcome.port_folded { "other".to_owned() } else { edge.port.to_string() },
                    policy = %e.verdict.policy,
                    expected = outcome.expected,
                    "new denied edge"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shared_and_pruned_once_unused() {
        let mut names = Names::default();
        let a = names.get("prod");
        let b = names.get("prod");
        assert!(Arc::ptr_eq(&a, &b));
        let other = names.get("dev");
        drop(other);
        names.prune();
        assert_eq!(names.len(), 1, "dev is used by nothing");
        drop((a, b));
        names.prune();
        assert!(names.is_empty());
    }

    #[test]
    fn edge_log_lines_are_rate_limited_per_window() {
        let t0 = Instant::now();
        let mut limit = EdgeLogLimit::new(t0);
        let allowed = (0..1000).filter(|_| limit.allow(t0)).count();
        assert_eq!(allowed, EDGE_LOG_BURST as usize);
        assert_eq!(limit.suppressed(), 1000 - u64::from(EDGE_LOG_BURST));
        let later = t0 + EDGE_LOG_WINDOW;
        assert!(limit.allow(later), "a new window allows lines again");
        assert_eq!(limit.suppressed(), 0);
    }
}
