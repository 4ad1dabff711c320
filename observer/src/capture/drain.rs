//! Draining the kernel maps into deltas.
//!
//! The kernel keeps cumulative per-CPU counters. Each drain sums the CPUs, compares with what the
//! previous drain saw, and emits the difference. Evictions are measured, not guessed: the exact
//! per-reason totals are read *before* the flow map (the kernel updates them *after* the flow
//! entry), so `totals - emitted flow deltas` is a lower bound of what eviction cost.
use std::collections::HashMap;
use std::sync::Arc;

use aya::maps::MapError;
use observer_ebpf::{Counter, FlowKey, FlowValue, MAX_REASONS, loss};

use super::loader::Capture;
use super::tracefs::ReasonTable;
use super::{CaptureError, DrainReport, Losses, decode};

/// What the previous drains saw of one flow key.
#[derive(Copy, Clone, Debug)]
struct Seen {
    created_ns: u64,
    packets: u64,
    bytes: u64,
    /// Consecutive drains without change.
    idle: u32,
    /// Drain generation that last saw the key in the map.
    generation: u64,
}

/// Userspace accounting state kept between drains.
#[derive(Debug)]
pub(super) struct DrainState {
    labels: Vec<Arc<str>>,
    other_labels: HashMap<u32, Arc<str>>,
    seen: HashMap<FlowKey, Seen>,
    generation: u64,
    /// Cumulative per-reason totals at the previous drain.
    totals: Vec<Counter>,
    /// Cumulative flow deltas emitted, per reason slot.
    emitted: Vec<Counter>,
    /// Cumulative eviction loss per reason slot (monotonic).
    evicted: Vec<Counter>,
    losses: [u64; loss::COUNT as usize],
}

/// Result of accounting one flow entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct FlowDelta {
    pub packets: u64,
    pub bytes: u64,
    /// The entry has been idle long enough to be deleted.
    pub delete: bool,
}

fn slot(reason: u32) -> usize {
    reason.min(MAX_REASONS - 1) as usize
}

impl DrainState {
    pub(super) fn new(reasons: &ReasonTable) -> Self {
        let labels = (0..MAX_REASONS).map(|r| reasons.label(r)).collect();
        Self {
            labels,
            other_labels: HashMap::new(),
            seen: HashMap::new(),
            generation: 0,
            totals: vec![Counter::default(); MAX_REASONS as usize],
            emitted: vec![Counter::default(); MAX_REASONS as usize],
            evicted: vec![Counter::default(); MAX_REASONS as usize],
            losses: [0; loss::COUNT as usize],
        }
    }

    /// Label of a reason number, without allocating for known reasons.
    pub(super) fn label(&mut self, reasons: &ReasonTable, reason: u32) -> Arc<str> {
        match self.labels.get(reason as usize) {
            Some(l) => l.clone(),
            None => self
                .other_labels
                .entry(reason)
                .or_insert_with(|| reasons.label(reason))
                .clone(),
        }
    }

    /// Starts a drain.
    pub(super) fn begin(&mut self) {
        self.generation += 1;
    }

    /// Records the cumulative total of one reason slot; returns the delta.
    pub(super) fn account_total(&mut self, slot: usize, now: Counter) -> Counter {
        let Some(prev) = self.totals.get_mut(slot) else {
            return Counter::default();
        };
        // Totals are never evicted, so they only grow; saturate anyway against a reload.
        let delta = Counter {
            packets: now.packets.saturating_sub(prev.packets),
            bytes: now.bytes.saturating_sub(prev.bytes),
        };
        *prev = now;
        delta
    }

    /// Records the current per-CPU-summed value of one flow entry; returns the delta since the
    /// previous drain and whether the entry should be deleted as idle.
    pub(super) fn account_flow(
        &mut self,
        key: &FlowKey,
        value: FlowValue,
        idle_drains: u32,
    ) -> FlowDelta {
        let generation = self.generation;
        let (packets, bytes) = match self.seen.get_mut(key) {
            Some(s) if s.generation == generation => {
                // Already visited in this drain (iteration restarted): nothing new to add unless
                // it grew, which the same comparison handles.
                delta_against(s, value)
            }
            Some(s) => delta_against(s, value),
            None => {
                self.seen.insert(
                    *key,
                    Seen {
                        created_ns: value.created_ns,
                        packets: value.packets,
                        bytes: value.bytes,
                        idle: 0,
                        generation,
                    },
                );
                (value.packets, value.bytes)
            }
        };
        let mut delete = false;
        if let Some(s) = self.seen.get_mut(key) {
            s.created_ns = value.created_ns;
            s.packets = value.packets;
            s.bytes = value.bytes;
            if packets == 0 && bytes == 0 {
                if s.generation != generation {
                    s.idle = s.idle.saturating_add(1);
                }
            } else {
                s.idle = 0;
            }
            s.generation = generation;
            delete = idle_drains > 0 && s.idle >= idle_drains;
        }
        if let Some(e) = self.emitted.get_mut(slot(key.reason)) {
            e.packets += packets;
            e.bytes += bytes;
        }
        FlowDelta {
            packets,
            bytes,
            delete,
        }
    }

    /// Keys the current drain did not see.
    pub(super) fn unseen(&self) -> Vec<FlowKey> {
        let generation = self.generation;
        self.seen
            .iter()
            .filter(|(_, s)| s.generation != generation)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Forgets a key (gone from the map, or deleted by us).
    pub(super) fn forget(&mut self, key: &FlowKey) {
        self.seen.remove(key);
    }

    /// Number of keys remembered.
    pub(super) fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// Updates the per-reason eviction estimate; returns the delta (packets, bytes) over all
    /// reasons since the previous drain.
    pub(super) fn account_evictions(&mut self) -> (u64, u64) {
        let mut delta = Counter::default();
        for ((total, emitted), evicted) in self
            .totals
            .iter()
            .zip(self.emitted.iter())
            .zip(self.evicted.iter_mut())
        {
            let lost_p = total.packets.saturating_sub(emitted.packets);
            let lost_b = total.bytes.saturating_sub(emitted.bytes);
            // Flows read after totals may be ahead; the loss never shrinks, so keep the max.
            if lost_p > evicted.packets {
                delta.packets += lost_p - evicted.packets;
                evicted.packets = lost_p;
            }
            if lost_b > evicted.bytes {
                delta.bytes += lost_b - evicted.bytes;
                evicted.bytes = lost_b;
            }
        }
        (delta.packets, delta.bytes)
    }

    /// Records a cumulative loss counter; returns its delta.
    pub(super) fn account_loss(&mut self, index: u32, now: u64) -> u64 {
        match self.losses.get_mut(index as usize) {
            Some(prev) => {
                let d = now.saturating_sub(*prev);
                *prev = now;
                d
            }
            None => 0,
        }
    }
}

/// Delta of `value` against what was seen; a new incarnation of the key (evicted and re-created,
/// detected by its creation stamp or by a counter going down) counts from zero.
fn delta_against(s: &Seen, value: FlowValue) -> (u64, u64) {
    if s.created_ns != value.created_ns || value.packets < s.packets || value.bytes < s.bytes {
        (value.packets, value.bytes)
    } else {
        (value.packets - s.packets, value.bytes - s.bytes)
    }
}

fn sum_flow(values: &[FlowValue]) -> FlowValue {
    values
        .iter()
        .fold(FlowValue::default(), |acc, v| FlowValue {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            created_ns: acc.created_ns.max(v.created_ns),
        })
}

impl Capture {
    /// Reads the kernel maps and returns what changed since the previous call. Call it about
    /// once a second; the first call returns everything counted since load.
    pub fn drain(&mut self) -> Result<DrainReport, CaptureError> {
        let map_err = |map: &'static str| move |source| CaptureError::Map { map, source };
        self.state.begin();
        let mut report = DrainReport {
            flow_map_capacity: u64::from(self.capacity),
            ..DrainReport::default()
        };

        // 1. Totals first (see the module comment).
        for r in 0..MAX_REASONS {
            let values = self.totals.get(&r, 0).map_err(map_err("TOTALS"))?;
            let now = values.iter().fold(Counter::default(), |acc, v| Counter {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            });
            let d = self.state.account_total(r as usize, now);
            if d.packets != 0 || d.bytes != 0 {
                let label = self.state.label(&self.reasons, r);
                report.reason_totals.push((label, d.packets, d.bytes));
            }
        }

        // 2. Flows. Concurrent evictions can make get_next_key restart from the first key, so
        // the walk is bounded; a key it misses is looked up directly below.
        let mut to_delete = Vec::new();
        let max_visits = u64::from(self.capacity) * 2 + 1024;
        let mut visits = 0u64;
        for item in self.flows.iter() {
            let (key, values) = match item {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(CaptureError::Map {
                        map: "FLOWS",
                        source,
                    });
                }
            };
            visits += 1;
            let value = sum_flow(&values);
            let d = self.state.account_flow(&key, value, self.idle_drains);
            if d.packets != 0 || d.bytes != 0 {
                let label = self.state.label(&self.reasons, key.reason);
                report.drops.push(decode(&key, label, d.packets, d.bytes));
            }
            if d.delete {
                to_delete.push(key);
            }
            if visits >= max_visits {
                break;
            }
        }
        for key in self.state.unseen() {
            match self.flows.get(&key, 0) {
                Ok(values) => {
                    let value = sum_flow(&values);
                    let d = self.state.account_flow(&key, value, self.idle_drains);
                    if d.packets != 0 || d.bytes != 0 {
                        let label = self.state.label(&self.reasons, key.reason);
                        report.drops.push(decode(&key, label, d.packets, d.bytes));
                    }
                    if d.delete {
                        to_delete.push(key);
                    }
                }
                Err(MapError::KeyNotFound) => self.state.forget(&key),
                Err(source) => {
                    return Err(CaptureError::Map {
                        map: "FLOWS",
                        source,
                    });
                }
            }
        }
        for key in &to_delete {
            // A packet counted between our read and this delete is lost from the flow map but
            // not from the totals, so it shows up as an eviction loss, never silently.
            match self.flows.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(CaptureError::Map {
                        map: "FLOWS",
                        source,
                    });
                }
            }
            self.state.forget(key);
        }
        // Every remembered key was found in the map by this drain (the others were forgotten).
        report.flow_map_entries = self.state.remembered() as u64;

        // 3. Losses.
        let (ep, eb) = self.state.account_evictions();
        let mut cum = [0u64; loss::COUNT as usize];
        for (i, c) in cum.iter_mut().enumerate() {
            let values = self.losses.get(&(i as u32), 0).map_err(map_err("LOSSES"))?;
            *c = values.iter().sum();
        }
        report.losses = Losses {
            ringbuf_full: self
                .state
                .account_loss(loss::RINGBUF_FULL, cum[loss::RINGBUF_FULL as usize]),
            flow_insert: self
                .state
                .account_loss(loss::FLOW_INSERT, cum[loss::FLOW_INSERT as usize]),
            skb_read: self
                .state
                .account_loss(loss::SKB_READ, cum[loss::SKB_READ as usize]),
            evicted_packets: ep,
            evicted_bytes: eb,
        };
        tracing::trace!(
            drops = report.drops.len(),
            remembered = self.state.remembered(),
            "drained flow map"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            reason: 12,
            dst_port: port,
            protocol: 17,
            family: observer_ebpf::family::INET,
            ..FlowKey::default()
        }
    }

    fn v(packets: u64, created_ns: u64) -> FlowValue {
        FlowValue {
            packets,
            bytes: packets * 100,
            created_ns,
        }
    }

    fn state() -> DrainState {
        DrainState::new(&ReasonTable::from_kernel_names([(12, "NETFILTER_DROP")]))
    }

    #[test]
    fn emits_deltas() {
        let mut s = state();
        s.begin();
        assert_eq!(s.account_flow(&key(1), v(5, 1), 0).packets, 5);
        s.begin();
        let d = s.account_flow(&key(1), v(8, 1), 0);
        assert_eq!((d.packets, d.bytes), (3, 300));
        s.begin();
        assert_eq!(s.account_flow(&key(1), v(8, 1), 0).packets, 0);
    }

    #[test]
    fn recreated_key_counts_from_zero() {
        let mut s = state();
        s.begin();
        s.account_flow(&key(1), v(5, 1), 0);
        s.begin();
        // Evicted and re-created, already past the old value: the stamp tells.
        assert_eq!(s.account_flow(&key(1), v(7, 2), 0).packets, 7);
        s.begin();
        // Re-created without a newer stamp but smaller: counter went down.
        assert_eq!(s.account_flow(&key(1), v(2, 2), 0).packets, 2);
    }

    #[test]
    fn revisit_in_same_drain_adds_nothing() {
        let mut s = state();
        s.begin();
        assert_eq!(s.account_flow(&key(1), v(5, 1), 0).packets, 5);
        assert_eq!(s.account_flow(&key(1), v(5, 1), 0).packets, 0);
        assert_eq!(s.account_flow(&key(1), v(6, 1), 0).packets, 1);
    }

    #[test]
    fn idle_entries_are_marked_for_deletion() {
        let mut s = state();
        s.begin();
        assert!(!s.account_flow(&key(1), v(5, 1), 2).delete);
        s.begin();
        assert!(!s.account_flow(&key(1), v(5, 1), 2).delete);
        s.begin();
        assert!(s.account_flow(&key(1), v(5, 1), 2).delete);
        // idle_drains 0 never deletes.
        let mut s = state();
        for _ in 0..10 {
            s.begin();
            assert!(!s.account_flow(&key(1), v(5, 1), 0).delete);
        }
    }

    #[test]
    fn unseen_keys_are_listed_and_forgotten() {
        let mut s = state();
        s.begin();
        s.account_flow(&key(1), v(1, 1), 0);
        s.account_flow(&key(2), v(1, 1), 0);
        s.begin();
        s.account_flow(&key(1), v(1, 1), 0);
        assert_eq!(s.unseen(), vec![key(2)]);
        s.forget(&key(2));
        assert_eq!(s.remembered(), 1);
    }

    #[test]
    fn evictions_are_totals_minus_emitted_and_monotonic() {
        let mut s = state();
        s.begin();
        s.account_total(
            12,
            Counter {
                packets: 10,
                bytes: 1000,
            },
        );
        s.account_flow(&key(1), v(4, 1), 0);
        assert_eq!(s.account_evictions(), (6, 600));
        s.begin();
        // Flows read after totals ran ahead: no negative loss, no change.
        s.account_total(
            12,
            Counter {
                packets: 12,
                bytes: 1200,
            },
        );
        s.account_flow(&key(1), v(11, 1), 0);
        assert_eq!(s.account_evictions(), (0, 0));
        s.begin();
        s.account_total(
            12,
            Counter {
                packets: 20,
                bytes: 2000,
            },
        );
        s.account_flow(&key(1), v(13, 1), 0);
        assert_eq!(s.account_evictions(), (1, 100));
    }

    #[test]
    fn totals_and_losses_are_deltas() {
        let mut s = state();
        assert_eq!(
            s.account_total(
                3,
                Counter {
                    packets: 4,
                    bytes: 40
                }
            )
            .packets,
            4
        );
        assert_eq!(
            s.account_total(
                3,
                Counter {
                    packets: 9,
                    bytes: 90
                }
            )
            .packets,
            5
        );
        assert_eq!(s.account_loss(loss::RINGBUF_FULL, 3), 3);
        assert_eq!(s.account_loss(loss::RINGBUF_FULL, 7), 4);
        assert_eq!(&*s.label(&ReasonTable::default(), 12), "netfilter_drop");
    }
}
