//! Kubernetes Events for denied traffic: a Warning `PolicyDenied` Event on the pod whose policy
//! denied (the destination for ingress, the source for egress), so `kubectl describe pod` tells
//! the on-call SRE what was denied, from whom, how much and why.
//!
//! Input is a plain [`DeniedTraffic`] summary, so this module does not depend on the verdict
//! engine's types. Events are written as kube-rs's `Recorder` writes them (see `recorder`, which
//! also keeps the names of Events about long-named pods valid):
//!
//! - **Deduplication**: one Event per (pod, peer workload, protocol/port, direction) per window
//!   (default 5 minutes). The first summary of a key is published at once; summaries that arrive
//!   within the window accumulate and are published when the window ends (the recorder turns that
//!   repeat into a PATCH that bumps the Event's `series.count`, which `kubectl describe` shows as
//!   `(xN over T)`). The recorder keeps the first message of a series, so the message names the
//!   first window's figures.
//! - **Rate limit**: a global token bucket; what it holds back stays pending and is retried by
//!   [`PolicyDeniedEvents::flush`]. At most 4,096 keys are held: the summary of a new key
//!   beyond that (a port scan) is dropped and counted as rate limited.
//! - Errors from the API server are counted (`deny_observer_k8s_events_total{result="failed"}`)
//!   and logged, never fatal.
//!
//! The alert stage also publishes deny-spike start/end Events on a workload through
//! [`PolicyDeniedEvents::spike`].
//!
//! The daemon reaches the publisher through [`EventSink`], the non-blocking front that
//! [`PolicyDeniedEvents::spawn`] returns: it turns each drain's notices into summaries and
//! queues them, and counts what does not fit in the queue as
//! `deny_observer_events_lost_total{stage="event_queue_full"}`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::attribute::{DenyNotice, FirstPacket, Outcomes, Sink, endpoint_labels};
use crate::flow::{Direction, Protocol};

mod recorder;
use recorder::Recorder;

/// Reason of the Event published for denied traffic.
pub const REASON_POLICY_DENIED: &str = "PolicyDenied";
/// Reason of the Event published when a workload's deny spike starts.
pub const REASON_SPIKE_STARTED: &str = "DenySpikeStarted";
/// Reason of the Event published when a workload's deny spike ends.
pub const REASON_SPIKE_ENDED: &str = "DenySpikeEnded";
/// Name of the reporting controller on every Event.
pub const REPORTING_CONTROLLER: &str = "deny-observer";

/// The API server rejects notes over 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

/// Most dedup keys held at once (pending or published within the window). A scan makes a key
/// per port, and at the default 10 Events a minute only about 70 go out per window: without a
/// bound the held-back summaries of a scan would grow without end. Far above what the rate
/// limit lets through, so only a flood meets it.
const MAX_KEYS: usize = 4096;

/// The pod an Event is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID, when known (binds the Event to this incarnation of the pod).
    pub uid: Option<String>,
}

/// The other end of the denied traffic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerRef {
    /// Namespace; empty for addresses that are no pod's (`world`, `private`, `node`...).
    pub namespace: String,
    /// Workload name (or the bounded address class for non-pod peers).
    pub workload: String,
    /// Workload kind (`Deployment`, `Pod`, ...); empty for non-pod peers.
    pub kind: String,
}

/// A summary of denied traffic over a short interval, as the verdict stage produces it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeniedTraffic {
    /// The pod whose policy denied (destination for ingress, source for egress).
    pub pod: PodRef,
    /// Which side's policy denied.
    pub direction: Direction,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port (`None` for ICMP and unparsed protocols).
    pub port: Option<u16>,
    /// The peer: the source for ingress, the destination for egress.
    pub peer: PeerRef,
    /// Denied packets in `window`.
    pub packets: u64,
    /// How long `packets` were counted over.
    pub window: Duration,
    /// Policies that isolate the pod in this direction, as `namespace/name`.
    pub isolating_policies: Vec<String>,
    /// Nearest misses, e.g. `prod/allow-web-to-db (allows app=web only)`.
    pub nearest_misses: Vec<String>,
    /// Where the first packet was seen, when the kernel's sample of it arrived: the source
    /// port and interface tell which client connection and which veth to look at.
    pub first_packet: Option<FirstPacket>,
}

impl DeniedTraffic {
    /// The summary of a notice.
    pub fn of(notice: &DenyNotice) -> Self {
        let (peer_namespace, peer_workload) = endpoint_labels(notice.peer.as_ref());
        let side = notice.verdict.deciding_side();
        Self {
            pod: PodRef {
                namespace: notice.pod.namespace.clone(),
                name: notice.pod.name.clone(),
                uid: notice.pod.uid.as_deref().map(str::to_owned),
            },
            direction: notice.direction,
            protocol: notice.protocol,
            port: notice.port,
            peer: PeerRef {
                namespace: peer_namespace.to_owned(),
                workload: peer_workload.to_owned(),
                kind: notice
                    .peer
                    .as_ref()
                    .map(|p| p.workload_kind().to_owned())
                    .unwrap_or_default(),
            },
            packets: notice.packets,
            window: notice.window,
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
            first_packet: notice.first_packet,
        }
    }
}

/// Whether a deny spike starts or ends.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpikePhase {
    /// The deny rate rose above the baseline (Warning Event).
    Started,
    /// The deny rate went back to normal (Normal Event).
    Ended,
}

/// A deny spike of a workload, as the alert stage detects it.
#[derive(Clone, Debug, PartialEq)]
pub struct SpikeNotice {
    /// Namespace of the workload.
    pub namespace: String,
    /// Workload kind (`Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `Pod`...).
    pub kind: String,
    /// Workload name.
    pub name: String,
    /// Start or end.
    pub phase: SpikePhase,
    /// Current denied packets per minute.
    pub denied_per_minute: f64,
    /// Baseline denied packets per minute.
    pub baseline_per_minute: f64,
    /// Extra detail appended to the message (top peers, reasons...), if any.
    pub detail: Option<String>,
}

/// Settings of the Event publisher.
#[derive(Clone, Debug, PartialEq)]
pub struct EventsConfig {
    /// When false nothing is published (every input is counted as `disabled`).
    pub enabled: bool,
    /// Deduplication window per (pod, peer workload, port, direction).
    pub dedup_window: Duration,
    /// Token-bucket size: how many Events may go out in a burst.
    pub burst: u32,
    /// Token refill rate, Events per minute.
    pub per_minute: u32,
    /// `reportingInstance` of the Events (the node name); the controller name is used when unset.
    pub instance: Option<String>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dedup_window: Duration::from_secs(300),
            burst: 20,
            per_minute: 10,
            instance: None,
        }
    }
}

/// What happened to one input.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// An Event was created or patched.
    Published,
    /// Accumulated into the key's pending summary; published when its window ends.
    Deduplicated,
    /// Held back by the rate limit; stays pending and is retried on the next flush (dropped
    /// instead when it is a new key and 4,096 keys are held already).
    RateLimited,
    /// The API server rejected the Event (counted and logged).
    Failed,
    /// Events are switched off.
    Disabled,
}

impl Outcome {
    /// Value of the `result` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Deduplicated => "deduplicated",
            Self::RateLimited => "rate_limited",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
        }
    }
}

/// Name of the Event publisher's counter.
pub const EVENTS_TOTAL: &str = "deny_observer_k8s_events_total";

/// Counters of the Event publisher: `deny_observer_k8s_events_total{result}`, where result is
/// `published`, `deduplicated`, `rate_limited`, `failed` or `disabled`. Summaries that never
/// reach the publisher (its queue was full) are losses, counted by [`EventSink`].
#[derive(Clone, Debug)]
pub struct EventMetrics {
    total: IntCounterVec,
}

impl EventMetrics {
    /// Creates unregistered counters.
    pub fn new() -> Result<Self, prometheus::Error> {
        let total = IntCounterVec::new(
            Opts::new(
                EVENTS_TOTAL,
                "Kubernetes Events for denied traffic and deny spikes, by what happened to them.",
            ),
            &["result"],
        )?;
        Ok(Self { total })
    }

    /// Registers the counters.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.total.clone()))
    }

    /// Name and label names of the family, from the collector's descriptor.
    pub fn descriptors(&self) -> Vec<(String, Vec<String>)> {
        prometheus::core::Collector::desc(&self.total)
            .iter()
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect()
    }

    /// Current value for one `result` label value.
    pub fn get(&self, result: &str) -> u64 {
        self.total.with_label_values(&[result]).get()
    }

    fn count(&self, result: &str) {
        self.total.with_label_values(&[result]).inc();
    }
}

/// Global token bucket.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(burst: u32, per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        Self {
            capacity,
            per_sec: f64::from(per_minute) / 60.0,
            tokens: capacity,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DedupKey {
    pod: (String, String),
    peer: PeerRef,
    protocol: Protocol,
    port: Option<u16>,
    direction: Direction,
}

/// Per-key state: what accumulated since the last publish.
#[derive(Debug)]
struct Slot {
    last_published: Option<Instant>,
    /// Accumulated summary not yet published (packets and window summed; latest pod/policies).
    pending: Option<DeniedTraffic>,
}

#[derive(Debug)]
struct State {
    slots: HashMap<DedupKey, Slot>,
    bucket: TokenBucket,
}

/// Publishes `PolicyDenied` and deny-spike Events. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct PolicyDeniedEvents {
    recorder: Option<Arc<Recorder>>,
    config: Arc<EventsConfig>,
    metrics: EventMetrics,
    state: Arc<Mutex<State>>,
}

impl PolicyDeniedEvents {
    /// A publisher that uses `client` (ignored when `config.enabled` is false).
    pub fn new(client: kube::Client, config: EventsConfig, metrics: EventMetrics) -> Self {
        let recorder = config.enabled.then(|| {
            // A repeat published at the end of its window still patches the first Event.
            let ttl = config.dedup_window.saturating_add(Duration::from_secs(60));
            Arc::new(Recorder::new(
                client,
                REPORTING_CONTROLLER,
                config.instance.as_deref(),
                ttl,
            ))
        });
        let state = State {
            slots: HashMap::new(),
            bucket: TokenBucket::new(config.burst, config.per_minute, Instant::now()),
        };
        Self {
            recorder,
            config: Arc::new(config),
            metrics,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A publisher that publishes nothing (`--events=false`, or no API server).
    pub fn disabled(metrics: EventMetrics) -> Self {
        let config = EventsConfig {
            enabled: false,
            ..EventsConfig::default()
        };
        let state = State {
            slots: HashMap::new(),
            bucket: TokenBucket::new(config.burst, config.per_minute, Instant::now()),
        };
        Self {
            recorder: None,
            config: Arc::new(config),
            metrics,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }

    /// Records one summary: publishes it now when its key has no Event in the current window,
    /// otherwise accumulates it for [`flush`](Self::flush).
    pub async fn record(&self, denied: DeniedTraffic) -> Outcome {
        let Some(recorder) = &self.recorder else {
            self.metrics.count(Outcome::Disabled.label());
            return Outcome::Disabled;
        };
        let now = Instant::now();
        let key = DedupKey {
            pod: (denied.pod.namespace.clone(), denied.pod.name.clone()),
            peer: denied.peer.clone(),
            protocol: denied.protocol,
            port: denied.port,
            direction: denied.direction,
        };
        let mut state = self.state.lock().await;
        if state.slots.len() >= MAX_KEYS && !state.slots.contains_key(&key) {
            // Nothing could publish it before the held keys anyway; keep memory bounded.
            self.metrics.count(Outcome::RateLimited.label());
            return Outcome::RateLimited;
        }
        let window = self.config.dedup_window;
        let slot = state.slots.entry(key.clone()).or_insert(Slot {
            last_published: None,
            pending: None,
        });
        slot.pending = Some(match slot.pending.take() {
            Some(acc) => accumulate(acc, denied),
            None => denied,
        });
        let due = slot
            .last_published
            .is_none_or(|t| now.saturating_duration_since(t) >= window);
        let outcome = if due {
            publish_slot(recorder, &mut state, &key, now).await
        } else {
            Outcome::Deduplicated
        };
        self.metrics.count(outcome.label());
        outcome
    }

    /// Publishes pending summaries whose window has ended (or that the rate limit held back),
    /// and forgets keys that stayed quiet for a whole window. Call it periodically.
    pub async fn flush(&self) -> Vec<Outcome> {
        let Some(recorder) = &self.recorder else {
            return Vec::new();
        };
        let now = Instant::now();
        let window = self.config.dedup_window;
        let mut state = self.state.lock().await;
        state.slots.retain(|_, slot| {
            slot.pending.is_some()
                || slot
                    .last_published
                    .is_some_and(|t| now.saturating_duration_since(t) < window)
        });
        let mut due: Vec<DedupKey> = state
            .slots
            .iter()
            .filter(|(_, slot)| {
                slot.pending.is_some()
                    && slot
                        .last_published
                        .is_none_or(|t| now.saturating_duration_since(t) >= window)
            })
            .map(|(k, _)| k.clone())
            .collect();
        // Oldest publication first, so a rate limit starves no key for ever.
        due.sort_by_key(|k| state.slots.get(k).and_then(|s| s.last_published));
        let mut outcomes = Vec::with_capacity(due.len());
        for key in due {
            let outcome = publish_slot(recorder, &mut state, &key, now).await;
            self.metrics.count(outcome.label());
            outcomes.push(outcome);
            if outcome == Outcome::RateLimited {
                // The bucket is empty, so no other key could go out either: they stay pending
                // for the next flush rather than being tried, and counted, one by one.
                break;
            }
        }
        outcomes
    }

    /// Publishes a deny-spike start (Warning) or end (Normal) Event on the workload.
    pub async fn spike(&self, notice: &SpikeNotice) -> Outcome {
        let Some(recorder) = &self.recorder else {
            self.metrics.count(Outcome::Disabled.label());
            return Outcome::Disabled;
        };
        let allowed = self.state.lock().await.bucket.take(Instant::now());
        let outcome = if allowed {
            let (type_, reason) = match notice.phase {
                SpikePhase::Started => (EventType::Warning, REASON_SPIKE_STARTED),
                SpikePhase::Ended => (EventType::Normal, REASON_SPIKE_ENDED),
            };
            let event = Event {
                type_,
                reason: reason.to_owned(),
                note: Some(truncate_note(spike_message(notice))),
                action: "DenySpike".to_owned(),
                secondary: None,
            };
            let reference = workload_reference(&notice.namespace, &notice.kind, &notice.name);
            match recorder.publish(&event, &reference).await {
                Ok(()) => Outcome::Published,
                Err(error) => {
                    tracing::warn!(
                        %error,
                        workload = %format!("{}/{}", notice.namespace, notice.name),
                        "publishing deny-spike Event failed"
                    );
                    Outcome::Failed
                }
            }
        } else {
            Outcome::RateLimited
        };
        self.metrics.count(outcome.label());
        outcome
    }

    /// Starts a background task that records what is sent to the returned [`EventSink`] and
    /// flushes every `flush_every` (and once more when every sink is gone; the task then
    /// ends, which the returned handle tells). The queue holds `capacity` summaries; beyond
    /// that they are dropped and counted on `queue_full`, so the caller never waits on the API
    /// server.
    pub fn spawn(
        self,
        capacity: usize,
        flush_every: Duration,
        queue_full: IntCounter,
    ) -> (EventSink, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Input>(capacity.max(1));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(flush_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    input = rx.recv() => match input {
                        Some(Input::Denied(d)) => { self.record(d).await; }
                        Some(Input::Spike(s)) => { self.spike(&s).await; }
                        None => break,
                    },
                    _ = tick.tick() => { self.flush().await; }
                }
            }
            self.flush().await;
        });
        (EventSink { tx, queue_full }, task)
    }
}

enum Input {
    Denied(DeniedTraffic),
    Spike(SpikeNotice),
}

/// Non-blocking front of a spawned [`PolicyDeniedEvents`].
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Input>,
    queue_full: IntCounter,
}

impl EventSink {
    /// Queues a denied-traffic summary; returns false (and counts it) when the queue is full.
    pub fn denied(&self, denied: DeniedTraffic) -> bool {
        self.send(Input::Denied(denied))
    }

    /// Queues a deny-spike notice; returns false (and counts it) when the queue is full.
    pub fn spike(&self, notice: SpikeNotice) -> bool {
        self.send(Input::Spike(notice))
    }

    fn send(&self, input: Input) -> bool {
        let ok = self.tx.try_send(input).is_ok();
        if !ok {
            self.queue_full.inc();
        }
        ok
    }
}

impl Sink for EventSink {
    fn record(&mut self, outcomes: &Outcomes, _now: std::time::SystemTime) {
        for notice in &outcomes.notices {
            if self.tx.capacity() == 0 {
                // Full: count without building a summary that would only be thrown away.
                self.queue_full.inc();
                continue;
            }
            self.denied(DeniedTraffic::of(notice));
        }
    }
}

fn accumulate(mut acc: DeniedTraffic, new: DeniedTraffic) -> DeniedTraffic {
    acc.packets = acc.packets.saturating_add(new.packets);
    acc.window = acc.window.saturating_add(new.window);
    // The newest verdict and pod incarnation describe the current state best.
    acc.pod = new.pod;
    acc.isolating_policies = new.isolating_policies;
    acc.nearest_misses = new.nearest_misses;
    acc.first_packet = acc.first_packet.or(new.first_packet);
    acc
}

async fn publish_slot(
    recorder: &Recorder,
    state: &mut State,
    key: &DedupKey,
    now: Instant,
) -> Outcome {
    if !state.bucket.take(now) {
        return Outcome::RateLimited;
    }
    let Some(slot) = state.slots.get_mut(key) else {
        return Outcome::Deduplicated;
    };
    let Some(denied) = slot.pending.take() else {
        return Outcome::Deduplicated;
    };
    // Whatever the result, the window restarts: a failing API server is retried next window
    // rather than on every summary.
    slot.last_published = Some(now);
    let (event, reference) = denied_event(&denied);
    match recorder.publish(&event, &reference).await {
        Ok(()) => Outcome::Published,
        Err(error) => {
            tracing::warn!(
                %error,
                pod = %format!("{}/{}", denied.pod.namespace, denied.pod.name),
                "publishing PolicyDenied Event failed"
            );
            Outcome::Failed
        }
    }
}

/// The Event and the pod reference for a summary.
pub fn denied_event(denied: &DeniedTraffic) -> (Event, ObjectReference) {
    let reference = ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some(denied.pod.namespace.clone()),
        name: Some(denied.pod.name.clone()),
        uid: denied.pod.uid.clone(),
        ..ObjectReference::default()
    };
    // The recorder deduplicates on (type, reason, action, regarding, related) and ignores the
    // note, so the action and related object must carry the rest of our key: otherwise a second
    // peer would patch the first peer's Event and vanish.
    let mut action = format!(
        "Deny{}{}",
        match denied.direction {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
            Direction::Unknown => "",
        },
        denied.protocol.k8s_name()
    );
    if let Some(port) = denied.port {
        let _ = write!(action, "{port}");
    }
    let secondary = if denied.peer.namespace.is_empty() {
        let _ = write!(action, "Peer{}", pascal(&denied.peer.workload));
        None
    } else {
        Some(workload_reference(
            &denied.peer.namespace,
            &denied.peer.kind,
            &denied.peer.workload,
        ))
    };
    action.truncate(floor_char_boundary(&action, 128));
    let event = Event {
        type_: EventType::Warning,
        reason: REASON_POLICY_DENIED.to_owned(),
        note: Some(truncate_note(denied_message(denied))),
        action,
        secondary,
    };
    (event, reference)
}

/// The human message, e.g. `Denied 37 TCP/5432 packets from dev/client (Deployment) in 1m:
/// isolated by prod/default-deny-ingress; nearest miss prod/allow-web-to-db (allows app=web only)`.
pub fn denied_message(d: &DeniedTraffic) -> String {
    let mut msg = format!("Denied {} {}", d.packets, d.protocol.k8s_name());
    if let Some(port) = d.port {
        let _ = write!(msg, "/{port}");
    }
    msg.push_str(if d.packets == 1 {
        " packet "
    } else {
        " packets "
    });
    msg.push_str(match d.direction {
        Direction::Egress => "to ",
        Direction::Ingress | Direction::Unknown => "from ",
    });
    if d.peer.namespace.is_empty() {
        msg.push_str(&d.peer.workload);
    } else {
        let _ = write!(msg, "{}/{}", d.peer.namespace, d.peer.workload);
    }
    if !d.peer.kind.is_empty() {
        let _ = write!(msg, " ({})", d.peer.kind);
    }
    let _ = write!(msg, " in {}", human_duration(d.window));
    if let Some(first) = &d.first_packet {
        msg.push_str(" (first packet");
        if first.src_port != 0 {
            let _ = write!(msg, " from port {}", first.src_port);
        }
        if first.ifindex != 0 {
            let _ = write!(msg, " on ifindex {}", first.ifindex);
            if first.netns != 0 {
                let _ = write!(msg, " of netns {}", first.netns);
            }
        }
        msg.push(')');
    }
    if d.isolating_policies.is_empty() {
        msg.push_str(": no NetworkPolicy verdict available");
    } else {
        let _ = write!(msg, ": isolated by {}", d.isolating_policies.join(", "));
        if !d.nearest_misses.is_empty() {
            let label = if d.nearest_misses.len() == 1 {
                "nearest miss"
            } else {
                "nearest misses"
            };
            let _ = write!(msg, "; {label} {}", d.nearest_misses.join(", "));
        }
    }
    msg
}

fn spike_message(n: &SpikeNotice) -> String {
    let mut msg = match n.phase {
        SpikePhase::Started => format!(
            "Deny spike started on {}/{} ({}): {:.0} denied packets/min (baseline {:.0}/min)",
            n.namespace, n.name, n.kind, n.denied_per_minute, n.baseline_per_minute
        ),
        SpikePhase::Ended => format!(
            "Deny spike ended on {}/{} ({}): {:.0} denied packets/min (baseline {:.0}/min)",
            n.namespace, n.name, n.kind, n.denied_per_minute, n.baseline_per_minute
        ),
    };
    if let Some(detail) = &n.detail {
        let _ = write!(msg, "; {detail}");
    }
    msg
}

/// `1m`, `30s`, `1m30s`, `2h5m`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if m > 0 {
        let _ = write!(out, "{m}m");
    }
    if s > 0 && h == 0 {
        let _ = write!(out, "{s}s");
    }
    out
}

fn workload_reference(namespace: &str, kind: &str, name: &str) -> ObjectReference {
    let api_version = match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "v1",
    };
    ObjectReference {
        api_version: Some(api_version.to_owned()),
        kind: Some(if kind.is_empty() { "Pod" } else { kind }.to_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

fn pascal(s: &str) -> String {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

fn truncate_note(mut note: String) -> String {
    if note.len() > MAX_NOTE_BYTES {
        let cut = floor_char_boundary(&note, MAX_NOTE_BYTES - 3);
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeniedTraffic {
        DeniedTraffic {
            pod: PodRef {
                namespace: "prod".into(),
                name: "db-0".into(),
                uid: Some("u1".into()),
            },
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            port: Some(5432),
            peer: PeerRef {
                namespace: "dev".into(),
                workload: "client".into(),
                kind: "Deployment".into(),
            },
            packets: 37,
            window: Duration::from_secs(60),
            isolating_policies: vec!["prod/default-deny-ingress".into()],
            nearest_misses: vec!["prod/allow-web-to-db (allows app=web only)".into()],
            first_packet: None,
        }
    }

    #[test]
    fn message_matches_issue_example() {
        assert_eq!(
            denied_message(&sample()),
            "Denied 37 TCP/5432 packets from dev/client (Deployment) in 1m: isolated by \
             prod/default-deny-ingress; nearest miss prod/allow-web-to-db (allows app=web only)"
        );
    }

    #[test]
    fn egress_to_world_without_verdict() {
        let mut d = sample();
        d.direction = Direction::Egress;
        d.protocol = Protocol::Udp;
        d.port = Some(53);
        d.packets = 1;
        d.window = Duration::from_secs(90);
        d.peer = PeerRef {
            namespace: String::new(),
            workload: "world".into(),
            kind: String::new(),
        };
        d.isolating_policies.clear();
        d.nearest_misses.clear();
        assert_eq!(
            denied_message(&d),
            "Denied 1 UDP/53 packet to world in 1m30s: no NetworkPolicy verdict available"
        );
        let (event, reference) = denied_event(&d);
        assert_eq!(event.action, "DenyEgressUDP53PeerWorld");
        assert!(event.secondary.is_none());
        assert_eq!(reference.name.as_deref(), Some("db-0"));
    }

    #[test]
    fn distinct_keys_give_distinct_recorder_keys() {
        let a = denied_event(&sample()).0;
        let mut other = sample();
        other.peer.workload = "other".into();
        let b = denied_event(&other).0;
        assert_eq!(a.action, b.action);
        assert_ne!(
            a.secondary.and_then(|r| r.name),
            b.secondary.and_then(|r| r.name)
        );
        let mut port = sample();
        port.port = Some(5433);
        assert_ne!(
            denied_event(&port).0.action,
            denied_event(&sample()).0.action
        );
    }

    #[test]
    fn long_notes_are_truncated_on_a_char_boundary() {
        let mut d = sample();
        d.nearest_misses = vec!["é".repeat(2000)];
        let note = denied_event(&d).0.note.unwrap_or_default();
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.ends_with("..."));
    }

    #[test]
    fn token_bucket_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, 60, start);
        assert!(bucket.take(start));
        assert!(bucket.take(start));
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_secs(1)));
        assert!(!bucket.take(start + Duration::from_secs(1)));
    }

    /// A port scan of a pod makes a summary per port; at 10 Events a minute most of them are
    /// held back. Held-back keys stay pending, so without a bound a scan of a few pods would
    /// hold hundreds of thousands of summaries (and each flush would retry and count them all).
    #[tokio::test]
    async fn a_scan_holds_a_bounded_number_of_summaries() {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let config = EventsConfig {
            burst: 1,
            per_minute: 0,
            ..EventsConfig::default()
        };
        let events = PolicyDeniedEvents::new(client, config, EventMetrics::new().unwrap());
        // Spend the only token: nothing reaches the (silent) API server.
        assert!(events.state.lock().await.bucket.take(Instant::now()));
        let ports = u16::try_from(MAX_KEYS + 1000).unwrap();
        for port in 1..=ports {
            let mut d = sample();
            d.port = Some(port);
            assert_eq!(events.record(d).await, Outcome::RateLimited);
        }
        assert_eq!(events.metrics().get("rate_limited"), u64::from(ports));
        assert_eq!(events.state.lock().await.slots.len(), MAX_KEYS);
        // One refusal empties nothing more: the rest are not retried and counted again.
        assert_eq!(events.flush().await, vec![Outcome::RateLimited]);
        assert_eq!(events.metrics().get("rate_limited"), u64::from(ports) + 1);
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(Duration::from_secs(60)), "1m");
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::from_secs(7500)), "2h5m");
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
    }
}
