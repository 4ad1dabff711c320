//! Deny-spike detection per (direction, workload namespace, workload).
//!
//! The detector is pure logic: the caller passes the time into every call, so tests drive it
//! with synthetic series and the daemon with the wall clock.
//!
//! # Model
//! - **Rate**: denied packets in the last `rate_window` (1-second buckets) ÷ the window.
//! - **Baseline**: an exponentially weighted mean and variance of that rate, updated once per
//!   [`SpikeDetector::tick`] with a weight derived from the elapsed time and `half_life`, so
//!   irregular ticks stay correct. The weighted sums are normalised by their total weight since
//!   the detector started, so the baseline is unbiased from the first minutes on.
//! - **Threshold** (upper): `max(mean × factor, mean + sigma × deviation, floor)`. A rate must be
//!   above it for `for_duration` before a spike starts.
//! - **Hysteresis**: a spike ends once the rate stays below
//!   `mean + hysteresis × (upper − mean)` for `cool_down`; a rate that wobbles around the upper
//!   threshold therefore never flaps.
//! - **Not poisoning the baseline**: while a key is pending or in a spike, the variance is frozen
//!   and the mean moves with a half-life `spike_damping` times longer (100 × 1 h ≈ 4 days). A
//!   one-hour flood moves the mean by 0.7 % of the flood rate, so the next flood still
//!   fires; a permanent level shift is still absorbed eventually (its spike ends after roughly
//!   one damped half-life) instead of paging forever. Marking such denies expected ends it now.
//! - **Warm-up**: counted from the detector's first call, not per key. A key first seen after
//!   the warm-up has a true baseline of zero (no denies were observed for it), so a brand-new
//!   deny flood in a quiet workload fires after `for_duration` rather than after another warm-up.
//! - **Baseline ready**: [`SpikeStatus::baseline_ready`] says the warm-up is over, so the
//!   baseline is worth comparing with. It is exported per key
//!   (`deny_observer_deny_baseline_ready`) so that Prometheus' cluster-wide spike path waits for
//!   it too, instead of comparing a flood with a baseline a few seconds old.
//! - **Top port**: per key, the destination ports of recent denies are counted in a few
//!   decaying heavy-hitter slots (half-life: the rate window), so a spike names the port to
//!   take to `explain` without a series per port.
//! - **Expected denies** are their own keys (`expected = true`): detected and exported like the
//!   others, but [`SpikeDetector::tick`] never returns their transitions, so they never page.
//! - **Bounded**: a key with no denies for `idle_timeout` and no spike is dropped (the caller
//!   removes its series via [`SpikeDetector::take_dropped`]); at most `max_keys` keys are kept.
//!
//! Time-of-day seasonality is not modelled. With a 1 h half-life the mean follows diurnal ramps
//! closely: the lag ratio rate ÷ mean for an exponential ramp `e^(kt)` is `1 + k·τ` with
//! `τ = half_life / ln 2`; a 10× rise over 6 h gives 1.55, far under the factor 3 (see the
//! `diurnal_swing_never_fires` test). A per-hour seasonal baseline would need days of history
//! per key before it could be trusted, which a DaemonSet restart would throw away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::AlertError;
use crate::flow::{Direction, FastMap, Protocol};

/// Heavy-hitter slots per key for the top port. A port carrying more than 1/8 of a key's
/// recent denies always holds a slot (space-saving), which is all a "top port" needs.
const PORT_SLOTS: usize = 8;

/// Detector settings. Defaults: factor 3, sigma 4, floor 1 pkt/s, for 60 s, cool-down 120 s,
/// warm-up 10 min, half-life 1 h, rate window 10 s.
#[derive(Clone, Debug, PartialEq)]
pub struct SpikeConfig {
    /// The rate must exceed `baseline × factor` (default 3).
    pub factor: f64,
    /// ... and `baseline + sigma × deviation` (default 4).
    pub sigma: f64,
    /// ... and this absolute floor in packets per second (default 1).
    pub floor: f64,
    /// ... continuously for this long before a spike starts (default 60 s).
    pub for_duration: Duration,
    /// A spike ends after the rate stayed below the lower threshold this long (default 120 s).
    pub cool_down: Duration,
    /// No spike starts before the detector has seen this much time (default 10 min).
    pub warm_up: Duration,
    /// Half-life of the baseline mean and variance (default 1 h).
    pub half_life: Duration,
    /// Averaging window of the current rate, whole seconds, ≥ 1 s (default 10 s).
    pub rate_window: Duration,
    /// Where the lower threshold sits between the baseline (0) and the upper threshold (1)
    /// (default 0.5).
    pub hysteresis: f64,
    /// While pending or in a spike, the mean's half-life is multiplied by this (default 100)
    /// and the variance is frozen.
    pub spike_damping: f64,
    /// A key without denies for this long (and not in a spike) is dropped (default 6 h, when its
    /// mean has decayed to under 2 % anyway).
    pub idle_timeout: Duration,
    /// Most keys tracked; denies of further new keys are counted in
    /// [`SpikeDetector::overflowed`] and otherwise ignored (default 10,000).
    pub max_keys: usize,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        Self {
            factor: 3.0,
            sigma: 4.0,
            floor: 1.0,
            for_duration: Duration::from_secs(60),
            cool_down: Duration::from_secs(120),
            warm_up: Duration::from_secs(600),
            half_life: Duration::from_secs(3600),
            rate_window: Duration::from_secs(10),
            hysteresis: 0.5,
            spike_damping: 100.0,
            idle_timeout: Duration::from_secs(6 * 3600),
            max_keys: 10_000,
        }
    }
}

impl SpikeConfig {
    /// Checks the ranges the math relies on.
    pub fn validate(&self) -> Result<(), AlertError> {
        let bad = |field: &'static str, reason: &str| {
            Err(AlertError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return bad("spike factor", "must be a finite number > 0");
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return bad("spike sigma", "must be a finite number ≥ 0");
        }
        if !(self.floor.is_finite() && self.floor >= 0.0) {
            return bad("spike floor", "must be a finite number ≥ 0");
        }
        if self.rate_window < Duration::from_secs(1) {
            return bad("spike rate window", "must be at least 1 s");
        }
        if self.half_life.is_zero() {
            return bad("baseline half-life", "must be greater than 0");
        }
        if !(0.0..=1.0).contains(&self.hysteresis) {
            return bad("spike hysteresis", "must be within 0..=1");
        }
        if !(self.spike_damping.is_finite() && self.spike_damping >= 1.0) {
            return bad("spike damping", "must be a finite number ≥ 1");
        }
        if self.max_keys == 0 {
            return bad("spike max keys", "must be at least 1");
        }
        Ok(())
    }
}

/// What a spike is tracked for. `expected` splits a workload's expected denies from the others.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpikeKey {
    /// Direction whose policy denied.
    pub direction: Direction,
    /// Namespace of the workload whose policy denied.
    pub workload_namespace: Arc<str>,
    /// Workload whose policy denied.
    pub workload: Arc<str>,
    /// True for denies marked expected (they never page).
    pub expected: bool,
}

/// A spike started or ended (never for expected keys).
#[derive(Clone, Debug, PartialEq)]
pub struct SpikeTransition {
    /// Which series.
    pub key: SpikeKey,
    /// True when the spike started, false when it ended.
    pub started: bool,
    /// Current rate (packets/s) at the transition.
    pub rate: f64,
    /// Baseline mean (packets/s) at the transition.
    pub baseline: f64,
    /// Upper threshold (packets/s) the rate was compared with.
    pub threshold: f64,
    /// When (the `now` passed to [`SpikeDetector::tick`]).
    pub at: SystemTime,
}

impl SpikeTransition {
    /// Kubernetes Event reason: `DenySpikeStarted` or `DenySpikeEnded`.
    pub fn reason(&self) -> &'static str {
        if self.started {
            "DenySpikeStarted"
        } else {
            "DenySpikeEnded"
        }
    }
}

impl std::fmt::Display for SpikeTransition {
    /// One line for the Event note and the log, e.g. `deny spike started: ingress denies of
    /// workload db/postgres at 400.0 pkt/s, baseline 3.0 pkt/s, threshold 9.0 pkt/s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deny spike {}: {} denies of workload {}/{} at {:.1} pkt/s, baseline {:.1} pkt/s, \
             threshold {:.1} pkt/s",
            if self.started { "started" } else { "ended" },
            self.key.direction,
            self.key.workload_namespace,
            self.key.workload,
            self.rate,
            self.baseline,
            self.threshold
        )
    }
}

/// Read-only view of one key, for metrics and debugging.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpikeStatus<'a> {
    /// The key.
    pub key: &'a SpikeKey,
    /// Rate at the last tick (packets/s).
    pub rate: f64,
    /// Baseline mean (packets/s).
    pub baseline: f64,
    /// Baseline standard deviation (packets/s).
    pub deviation: f64,
    /// Upper threshold at the last tick (packets/s).
    pub threshold: f64,
    /// True while a spike is active.
    pub active: bool,
    /// The warm-up is over: the baseline can be compared with.
    pub baseline_ready: bool,
    /// The destination port with the most recent denies: protocol, port and its deny rate
    /// (packets/s, decayed over about the rate window). `None` before any deny with a port.
    pub top_port: Option<(Protocol, u16, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Quiet,
    Pending { since_ms: u64 },
    Active { below_since_ms: Option<u64> },
}

#[derive(Debug)]
struct KeyState {
    /// (unix second, packets) buckets within the rate window, oldest first.
    buckets: VecDeque<(u64, u64)>,
    last_observed_ms: u64,
    last_update_ms: u64,
    /// Exponentially decayed sums of weights, rates and squared rates. Dividing by the weight
    /// sum `s0` removes the bias towards zero that a plain EWMA started at 0 has for its first
    /// half-lives, so a steady background's baseline is right once the warm-up ends.
    s0: f64,
    s1: f64,
    s2: f64,
    rate: f64,
    threshold: f64,
    phase: Phase,
    /// (protocol, port, decayed packet count), at most [`PORT_SLOTS`].
    ports: Vec<(Protocol, u16, f64)>,
}

impl KeyState {
    /// A key first seen at `now_ms`. Its rate was zero since the detector started, so it
    /// starts with the weight those zeros carry: a new workload's first flood is compared
    /// with a true baseline of zero instead of becoming its own baseline.
    fn new(now_ms: u64, started_ms: u64, half_life: Duration) -> Self {
        #[expect(
            clippy::cast_precision_loss,
            reason = "millisecond spans far below 2^52"
        )]
        let elapsed = now_ms.saturating_sub(started_ms) as f64 / 1000.0;
        Self {
            buckets: VecDeque::new(),
            last_observed_ms: now_ms,
            last_update_ms: now_ms,
            s0: 1.0 - (-elapsed / half_life.as_secs_f64()).exp2(),
            s1: 0.0,
            s2: 0.0,
            rate: 0.0,
            threshold: 0.0,
            phase: Phase::Quiet,
            ports: Vec::new(),
        }
    }

    /// Adds `packets` denies at `now_ms` to the current second, and to `port`'s slot.
    fn add_deny(&mut self, now_ms: u64, packets: u64, port: Option<(Protocol, u16)>) {
        self.last_observed_ms = self.last_observed_ms.max(now_ms);
        let sec = now_ms / 1000;
        match self.buckets.back_mut() {
            Some((last, count)) if *last >= sec => *count = count.saturating_add(packets),
            _ => self.buckets.push_back((sec, packets)),
        }
        if let Some((protocol, port)) = port {
            self.count_port(protocol, port, packets);
        }
    }

    /// Adds `packets` to a port's slot; when all slots are taken, the smallest is replaced
    /// and the newcomer inherits its count (space-saving: an over-estimate, never an under-).
    fn count_port(&mut self, protocol: Protocol, port: u16, packets: u64) {
        #[expect(
            clippy::cast_precision_loss,
            reason = "packet counts far below 2^52 per drain"
        )]
        let packets = packets as f64;
        if let Some(slot) = self
            .ports
            .iter_mut()
            .find(|(p, n, _)| *p == protocol && *n == port)
        {
            slot.2 += packets;
        } else if self.ports.len() < PORT_SLOTS {
            self.ports.push((protocol, port, packets));
        } else if let Some(min) = self.ports.iter_mut().min_by(|a, b| a.2.total_cmp(&b.2)) {
            *min = (protocol, port, min.2 + packets);
        }
    }

    /// The busiest port, its count turned into packets/s: a steady rate `r` decayed with
    /// half-life `w` sums to `r · w / ln 2`.
    fn top_port(&self, window_secs: u64) -> Option<(Protocol, u16, f64)> {
        #[expect(clippy::cast_precision_loss, reason = "small window")]
        let per_sec = std::f64::consts::LN_2 / window_secs as f64;
        self.ports
            .iter()
            .filter(|(_, _, c)| *c > 0.0)
            .max_by(|a, b| a.2.total_cmp(&b.2).then_with(|| b.1.cmp(&a.1)))
            .map(|(p, n, c)| (*p, *n, c * per_sec))
    }

    fn mean(&self) -> f64 {
        if self.s0 > 0.0 {
            self.s1 / self.s0
        } else {
            0.0
        }
    }

    fn var(&self) -> f64 {
        if self.s0 > 0.0 {
            let m = self.mean();
            (self.s2 / self.s0 - m * m).max(0.0)
        } else {
            0.0
        }
    }
}

/// Per-key deny-rate baselines and spike state machines.
#[derive(Debug)]
pub struct SpikeDetector {
    config: SpikeConfig,
    window_secs: u64,
    started_ms: Option<u64>,
    keys: FastMap<SpikeKey, KeyState>,
    dropped: Vec<SpikeKey>,
    overflowed: u64,
    /// The warm-up was over at the last tick.
    warmed: bool,
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SpikeDetector {
    /// A detector with no keys; the warm-up starts at the first `observe` or `tick`.
    pub fn new(config: SpikeConfig) -> Result<Self, AlertError> {
        config.validate()?;
        let window_secs = config.rate_window.as_secs().max(1);
        Ok(Self {
            config,
            window_secs,
            started_ms: None,
            keys: FastMap::default(),
            dropped: Vec::new(),
            overflowed: 0,
            warmed: false,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &SpikeConfig {
        &self.config
    }

    /// Adds `denied_packets` policy-denied packets for `key` at `now` (call as drops are
    /// drained; deltas, not totals). A zero delta still marks the key as seen.
    pub fn observe(&mut self, now: SystemTime, key: &SpikeKey, denied_packets: u64) {
        self.observe_deny(now, key, denied_packets, None);
    }

    /// [`SpikeDetector::observe`], and with a port, counts the destination port of the denies
    /// too (it feeds [`SpikeStatus::top_port`]); one lookup of the key, for every denied edge
    /// of every drain. A key not tracked because the detector is full counts as overflow.
    pub fn observe_deny(
        &mut self,
        now: SystemTime,
        key: &SpikeKey,
        denied_packets: u64,
        port: Option<(Protocol, u16)>,
    ) {
        let now_ms = unix_ms(now);
        let started_ms = *self.started_ms.get_or_insert(now_ms);
        if let Some(state) = self.keys.get_mut(key) {
            state.add_deny(now_ms, denied_packets, port);
            return;
        }
        if self.keys.len() >= self.config.max_keys {
            self.overflowed = self.overflowed.saturating_add(1);
            return;
        }
        let mut state = KeyState::new(now_ms, started_ms, self.config.half_life);
        state.add_deny(now_ms, denied_packets, port);
        self.keys.insert(key.clone(), state);
    }

    /// Recomputes rates, advances baselines and state machines, drops idle keys. Call about
    /// once per second. Returns the spike starts and ends of non-expected keys.
    pub fn tick(&mut self, now: SystemTime) -> Vec<SpikeTransition> {
        let now_ms = unix_ms(now);
        let started_ms = *self.started_ms.get_or_insert(now_ms);
        let warmed = now_ms.saturating_sub(started_ms) >= ms(self.config.warm_up);
        self.warmed = warmed;
        let cfg = &self.config;
        let window_secs = self.window_secs;
        let mut transitions = Vec::new();
        let mut idle = Vec::new();

        for (key, st) in &mut self.keys {
            let now_sec = now_ms / 1000;
            let oldest_kept = now_sec.saturating_sub(window_secs - 1);
            while st.buckets.front().is_some_and(|(s, _)| *s < oldest_kept) {
                st.buckets.pop_front();
            }
            let packets: u64 = st
                .buckets
                .iter()
                .filter(|(s, _)| *s <= now_sec)
                .map(|(_, c)| *c)
                .sum();
            #[expect(
                clippy::cast_precision_loss,
                reason = "packet counts far below 2^52 per window"
            )]
            let rate = packets as f64 / window_secs as f64;
            let mean = st.mean();
            let deviation = st.var().sqrt();
            let upper = (mean * cfg.factor)
                .max(mean + cfg.sigma * deviation)
                .max(cfg.floor);
            let lower = mean + cfg.hysteresis * (upper - mean);
            st.rate = rate;
            st.threshold = upper;

            let above = warmed && rate > upper;
            let next = match st.phase {
                Phase::Quiet | Phase::Pending { .. } if !above => Phase::Quiet,
                Phase::Quiet => Phase::Pending { since_ms: now_ms },
                Phase::Pending { since_ms } => Phase::Pending { since_ms },
                Phase::Active { below_since_ms } => {
                    if rate < lower {
                        Phase::Active {
                            below_since_ms: Some(below_since_ms.unwrap_or(now_ms)),
                        }
                    } else {
                        Phase::Active {
                            below_since_ms: None,
                        }
                    }
                }
            };
            // Resolve the timers in the same tick, so `for 0` fires at once.
            let next = match next {
                Phase::Pending { since_ms }
                    if now_ms.saturating_sub(since_ms) >= ms(cfg.for_duration) =>
                {
                    Phase::Active {
                        below_since_ms: None,
                    }
                }
                Phase::Active {
                    below_since_ms: Some(since),
                } if now_ms.saturating_sub(since) >= ms(cfg.cool_down) => Phase::Quiet,
                other => other,
            };
            let was_active = matches!(st.phase, Phase::Active { .. });
            let is_active = matches!(next, Phase::Active { .. });
            if was_active != is_active && !key.expected {
                transitions.push(SpikeTransition {
                    key: key.clone(),
                    started: is_active,
                    rate,
                    baseline: mean,
                    threshold: upper,
                    at: now,
                });
            }
            // Damp while pending/active before or after this tick: the sample belongs to the
            // spike either way.
            let spiking = !matches!(st.phase, Phase::Quiet) || !matches!(next, Phase::Quiet);
            st.phase = next;
            decay_ports(st, now_ms, window_secs);
            update_baseline(st, now_ms, rate, cfg, spiking);

            if !is_active
                && now_ms.saturating_sub(st.last_observed_ms) >= ms(cfg.idle_timeout)
                && rate == 0.0
            {
                idle.push(key.clone());
            }
        }
        for key in idle {
            self.keys.remove(&key);
            self.dropped.push(key);
        }
        transitions
    }

    /// Keys dropped for idleness since the last call (their metric series should go).
    pub fn take_dropped(&mut self) -> Vec<SpikeKey> {
        std::mem::take(&mut self.dropped)
    }

    /// Status of every tracked key as of the last tick.
    pub fn statuses(&self) -> impl Iterator<Item = SpikeStatus<'_>> {
        self.keys.iter().map(|(key, st)| SpikeStatus {
            key,
            rate: st.rate,
            baseline: st.mean(),
            deviation: st.var().sqrt(),
            threshold: st.threshold,
            active: matches!(st.phase, Phase::Active { .. }),
            baseline_ready: self.warmed,
            top_port: st.top_port(self.window_secs),
        })
    }

    /// Status of one key.
    pub fn status(&self, key: &SpikeKey) -> Option<SpikeStatus<'_>> {
        self.keys.get_key_value(key).map(|(key, st)| SpikeStatus {
            key,
            rate: st.rate,
            baseline: st.mean(),
            deviation: st.var().sqrt(),
            threshold: st.threshold,
            active: matches!(st.phase, Phase::Active { .. }),
            baseline_ready: self.warmed,
            top_port: st.top_port(self.window_secs),
        })
    }

    /// Number of tracked keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Denies ignored because `max_keys` keys were already tracked.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

/// Decays the port counts with a half-life of the rate window, so the top port follows what
/// is denied now; slots that decayed to nothing are freed.
fn decay_ports(st: &mut KeyState, now_ms: u64, window_secs: u64) {
    if now_ms <= st.last_update_ms || st.ports.is_empty() {
        return;
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "millisecond spans far below 2^52"
    )]
    let dt = (now_ms - st.last_update_ms) as f64 / 1000.0;
    #[expect(clippy::cast_precision_loss, reason = "small window")]
    let keep = (-dt / window_secs as f64).exp2();
    for slot in &mut st.ports {
        slot.2 *= keep;
    }
    st.ports.retain(|(_, _, c)| *c >= 0.01);
}

/// Decays the sums by the elapsed time and adds the new rate. While `spiking`, the mean moves
/// with the damped half-life and the variance is held where it was.
fn update_baseline(st: &mut KeyState, now_ms: u64, rate: f64, cfg: &SpikeConfig, spiking: bool) {
    if now_ms <= st.last_update_ms {
        // Same instant, or the clock went back: nothing elapsed to weigh.
        return;
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "millisecond spans far below 2^52"
    )]
    let dt = (now_ms - st.last_update_ms) as f64 / 1000.0;
    st.last_update_ms = now_ms;
    let mut half_life = cfg.half_life.as_secs_f64();
    if spiking {
        half_life *= cfg.spike_damping;
    }
    let alpha = 1.0 - (-dt / half_life).exp2();
    if spiking {
        // Move the mean by the damped weight alone (not amplified by a young key's small
        // total weight) and keep the variance.
        let (mean, var) = (st.mean(), st.var());
        let mean = mean + alpha * (rate - mean);
        if st.s0 <= 0.0 {
            st.s0 = alpha;
        }
        st.s1 = st.s0 * mean;
        st.s2 = st.s0 * (var + mean * mean);
    } else {
        st.s0 = (1.0 - alpha) * st.s0 + alpha;
        st.s1 = (1.0 - alpha) * st.s1 + alpha * rate;
        st.s2 = (1.0 - alpha) * st.s2 + alpha * rate * rate;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SpikeKey {
        SpikeKey {
            direction: Direction::Ingress,
            workload_namespace: "shop".into(),
            workload: "cart".into(),
            expected: false,
        }
    }

    #[test]
    fn rate_is_the_window_average() {
        let mut d = SpikeDetector::new(SpikeConfig::default()).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for s in 0..20 {
            d.observe(t0 + Duration::from_secs(s), &key(), 7);
        }
        d.tick(t0 + Duration::from_secs(19));
        let st = d.status(&key()).unwrap();
        assert!((st.rate - 7.0).abs() < 1e-9, "{}", st.rate);
        // Several drains within one second add up.
        d.observe(t0 + Duration::from_millis(20_100), &key(), 5);
        d.observe(t0 + Duration::from_millis(20_900), &key(), 5);
        d.tick(t0 + Duration::from_secs(20));
        let st = d.status(&key()).unwrap();
        assert!((st.rate - 7.3).abs() < 1e-9, "{}", st.rate);
    }

    #[test]
    fn transitions_read_well() {
        let t = SpikeTransition {
            key: SpikeKey {
                workload_namespace: "db".into(),
                workload: "postgres".into(),
                ..key()
            },
            started: true,
            rate: 400.0,
            baseline: 3.04,
            threshold: 9.12,
            at: UNIX_EPOCH,
        };
        assert_eq!(t.reason(), "DenySpikeStarted");
        assert_eq!(
            t.to_string(),
            "deny spike started: ingress denies of workload db/postgres at 400.0 pkt/s, \
             baseline 3.0 pkt/s, threshold 9.1 pkt/s"
        );
        let end = SpikeTransition {
            started: false,
            ..t
        };
        assert_eq!(end.reason(), "DenySpikeEnded");
        assert!(end.to_string().starts_with("deny spike ended: "));
    }

    #[test]
    fn invalid_config_is_rejected() {
        let cfg = SpikeConfig {
            half_life: Duration::ZERO,
            ..SpikeConfig::default()
        };
        let err = SpikeDetector::new(cfg).unwrap_err().to_string();
        assert!(err.contains("half-life"), "{err}");
    }
}
