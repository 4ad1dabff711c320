//! Draining the kernel maps into deltas.
//!
//! The kernel keeps cumulative per-CPU counters. Each drain sums the CPUs, compares with what the
//! previous drain saw, and emits the difference. Evictions are measured, not guessed: the exact
//! per-reason totals are read *before* the flow map (the kernel updates them *after* the flow
//! entry), so `totals - emitted flow deltas` is a lower bound of what eviction cost.
use std::collections::hash_map::Entry;
use std::sync::Arc;

use std::os::fd::AsFd;

use aya::maps::{IterableMap, MapError};
use observer_ebpf::{Counter, FlowKey, FlowValue, MAX_REASONS, loss};

use super::loader::Capture;
use super::tracefs::ReasonTable;
use super::{CaptureError, DrainReport, Losses, decode};
use crate::flow::FastMap;

/// What the previous drains saw of one flow key.
#[derive(Copy, Clone, Debug)]
struct Seen {
    created_ns: u64,
    packets: u64,
    bytes: u64,
    /// Drain generation at which the key was created or last changed: the key has been idle
    /// for `generation - changed` drains, walked or skipped.
    changed: u64,
    /// Drain generation that last saw the key in the map.
    generation: u64,
}

/// Userspace accounting state kept between drains.
#[derive(Debug)]
pub(super) struct DrainState {
    labels: Vec<Arc<str>>,
    other: Arc<str>,
    other_labels: FastMap<u32, Arc<str>>,
    seen: FastMap<FlowKey, Seen>,
    generation: u64,
    /// Cumulative per-reason totals at the previous drain.
    totals: Vec<Counter>,
    /// The `TOTALS` slot shared by every reason number at or above it (as the kernel program
    /// is configured).
    last_slot: u32,
    /// Cumulative flow deltas emitted, per reason slot.
    emitted: Vec<Counter>,
    /// Cumulative eviction loss per reason slot (monotonic).
    evicted: Vec<Counter>,
    losses: [u64; loss::COUNT as usize],
    /// Drains in a row that skipped the flow-map walk (see [`MAX_SKIPPED_WALKS`]).
    skipped_walks: u32,
    /// First drain generation at which a remembered key becomes idle enough to delete (from
    /// the last walk); `u64::MAX` when none will.
    next_idle_due: u64,
}

/// A drain whose per-reason totals did not move skips walking the flow map, which would cost a
/// syscall-side copy per key and find nothing new: the kernel updates a flow entry before its
/// total, so any flow change shows in the totals by the next drain at the latest. A quiet node
/// still walks at least every this many drains plus one, which keeps idle keys being retired
/// and the entry count fresh.
const MAX_SKIPPED_WALKS: u32 = 9;

/// Result of accounting one flow entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct FlowDelta {
    pub packets: u64,
    pub bytes: u64,
    /// The entry has been idle long enough to be deleted.
    pub delete: bool,
}

/// Slots of `TOTALS` the kernel program writes for this reason table
/// (`ProgramConfig::total_slots`): every reason number the kernel names below the last slot
/// keeps its own, and one slot more is shared by every higher number (subsystem reasons carry
/// high bits). Reading 512 slots per CPU was a third of an idle daemon's pipeline time.
pub(super) fn total_slots(reasons: &ReasonTable) -> u32 {
    reasons
        .iter()
        .map(|(n, _)| n)
        .filter(|&n| n < MAX_REASONS - 1)
        .max()
        .map_or(1, |m| m + 2)
}

impl DrainState {
    pub(super) fn new(reasons: &ReasonTable) -> Self {
        let labels = (0..MAX_REASONS).map(|r| reasons.label(r)).collect();
        let slots = total_slots(reasons);
        Self {
            last_slot: slots - 1,
            labels,
            other: Arc::from("other"),
            other_labels: FastMap::default(),
            seen: FastMap::default(),
            generation: 0,
            totals: vec![Counter::default(); slots as usize],
            emitted: vec![Counter::default(); slots as usize],
            evicted: vec![Counter::default(); slots as usize],
            losses: [0; loss::COUNT as usize],
            skipped_walks: 0,
            next_idle_due: u64::MAX,
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

    /// Number of `TOTALS` slots in use.
    pub(super) fn total_slots(&self) -> u32 {
        self.last_slot + 1
    }

    /// The `TOTALS` slot a reason number is counted in.
    fn slot(&self, reason: u32) -> usize {
        reason.min(self.last_slot) as usize
    }

    /// Label of a per-reason total slot: the last slot also holds every higher reason number
    /// (see [`total_slots`]), so unless the kernel names it, it is `other`.
    pub(super) fn total_label(&mut self, reasons: &ReasonTable, slot: u32) -> Arc<str> {
        if slot == self.last_slot && reasons.iter().all(|(n, _)| n != slot) {
            return self.other.clone();
        }
        self.label(reasons, slot)
    }

    /// Starts a drain.
    pub(super) fn begin(&mut self) {
        self.generation += 1;
    }

    /// Whether this drain walks the flow map, given whether any per-reason total moved since
    /// the previous drain (see [`MAX_SKIPPED_WALKS`]). A drain at which an idle key is due for
    /// deletion walks too, so deletion is as timely as with a walk every drain.
    pub(super) fn should_walk(&mut self, totals_moved: bool) -> bool {
        if totals_moved
            || self.skipped_walks >= MAX_SKIPPED_WALKS
            || self.generation >= self.next_idle_due
        {
            self.skipped_walks = 0;
            true
        } else {
            self.skipped_walks += 1;
            false
        }
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

    /// Records the current value of one flow entry; returns the delta since the
    /// previous drain and whether the entry should be deleted as idle.
    pub(super) fn account_flow(
        &mut self,
        key: &FlowKey,
        value: FlowValue,
        idle_drains: u32,
    ) -> FlowDelta {
        let generation = self.generation;
        let (packets, bytes, delete) = match self.seen.entry(*key) {
            Entry::Occupied(mut o) => {
                let s = o.get_mut();
                let (packets, bytes) = delta_against(s, value);
                s.created_ns = value.created_ns;
                s.packets = value.packets;
                s.bytes = value.bytes;
                if packets != 0 || bytes != 0 {
                    s.changed = generation;
                }
                s.generation = generation;
                let idle = generation.saturating_sub(s.changed);
                (
                    packets,
                    bytes,
                    idle_drains > 0 && idle >= u64::from(idle_drains),
                )
            }
            Entry::Vacant(v) => {
                v.insert(Seen {
                    created_ns: value.created_ns,
                    packets: value.packets,
                    bytes: value.bytes,
                    changed: generation,
                    generation,
                });
                (value.packets, value.bytes, false)
            }
        };
        let slot = self.slot(key.reason);
        if let Some(e) = self.emitted.get_mut(slot) {
            e.packets += packets;
            e.bytes += bytes;
        }
        FlowDelta {
            packets,
            bytes,
            delete,
        }
    }

    /// Records deltas of a key read from the drop cache (which keeps its own per-incarnation
    /// state), for the eviction check.
    pub(super) fn account_cached(&mut self, key: &FlowKey, packets: u64, bytes: u64) {
        let slot = self.slot(key.reason);
        if let Some(e) = self.emitted.get_mut(slot) {
            e.packets += packets;
            e.bytes += bytes;
        }
    }

    /// After a walk: when the next remembered key becomes idle enough to delete.
    pub(super) fn plan_idle_deletion(&mut self, idle_drains: u32) {
        self.next_idle_due = if idle_drains == 0 {
            u64::MAX
        } else {
            self.seen
                .values()
                .map(|s| s.changed.saturating_add(u64::from(idle_drains)))
                .min()
                .unwrap_or(u64::MAX)
        };
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

impl Capture {
    /// Reads the kernel maps and returns what changed since the previous call. Call it about
    /// once a second; the first call returns everything counted since load.
    pub fn drain(&mut self) -> Result<DrainReport, CaptureError> {
        self.state.begin();
        let mut report = DrainReport {
            drops: std::mem::take(&mut self.drops_scratch),
            flow_map_capacity: u64::from(self.capacity),
            ..DrainReport::default()
        };
        report.drops.clear();

        // 1. Totals first (see the module comment).
        let totals = self.read_totals()?;
        for (r, now) in (0..self.state.total_slots()).zip(totals) {
            let d = self.state.account_total(r as usize, now);
            if d.packets != 0 || d.bytes != 0 {
                let label = self.state.total_label(&self.reasons, r);
                report.reason_totals.push((label, d.packets, d.bytes));
            }
        }

        // 2. Flows, unless nothing can have changed there since the previous drain: nothing
        //    was counted, or (drop cache on) every drop went to the cache. Walking an empty
        //    65,536-entry LRU map still visits every bucket: in an idle daemon, one walk in ten
        //    drains was a fifth of the pipeline thread's time.
        let totals_moved = !report.reason_totals.is_empty();
        let flows_may_move = totals_moved && self.flows_may_have_moved()?;
        let walk = self.state.should_walk(flows_may_move);
        if walk {
            self.drain_flows(&mut report)?;
        }
        // 2b. The drop cache (after the totals too): its lines and flush records.
        self.drain_cache(&mut report);
        // Every remembered key was found in the map by the last walk (the others were
        // forgotten).
        report.flow_map_entries = self.state.remembered() as u64;

        // 3. Losses.
        self.drain_losses(&mut report)?;
        tracing::trace!(
            drops = report.drops.len(),
            keys = report.flow_map_entries,
            walked = walk,
            "drained flow map"
        );
        Ok(report)
    }

    /// Whether `FLOWS` may hold counts not yet read. Always with the drop cache off. With it
    /// on, the kernel goes to `FLOWS` only after counting `DROP_LOG_FULL` (and before adding
    /// to the totals, which this drain has already read), so the flow map can only have moved
    /// if that counter did, or if keys from earlier walks are still there.
    fn flows_may_have_moved(&mut self) -> Result<bool, CaptureError> {
        if self.cache.is_none() || self.state.remembered() > 0 {
            return Ok(true);
        }
        let now: u64 = self
            .losses
            .get(&loss::DROP_LOG_FULL, 0)
            .map_err(|source| CaptureError::Map {
                map: "LOSSES",
                source,
            })?
            .iter()
            .fold(0u64, |a, v| a.wrapping_add(*v));
        let moved = now != self.log_full_walked;
        self.log_full_walked = now;
        Ok(moved)
    }

    /// Walks the flow map: deltas into `report`, idle keys deleted.
    fn drain_flows(&mut self, report: &mut DrainReport) -> Result<(), CaptureError> {
        let mut entries = std::mem::take(&mut self.scratch);
        entries.clear();
        self.read_flows(&mut entries)?;
        let mut to_delete = Vec::new();
        for (key, value) in &entries {
            self.account(key, *value, report, &mut to_delete);
        }
        // A key this walk did not return is either gone (forget it) or was missed by a
        // concurrent change to the map (look it up, so its state is not lost and re-counted).
        for key in self.state.unseen() {
            match self.flows.get(&key, 0) {
                Ok(value) => self.account(&key, value, report, &mut to_delete),
                Err(MapError::KeyNotFound) => self.state.forget(&key),
                Err(source) => {
                    return Err(CaptureError::Map {
                        map: "FLOWS",
                        source,
                    });
                }
            }
        }
        self.scratch = entries;
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
        self.state.plan_idle_deletion(self.idle_drains);
        Ok(())
    }

    /// Deltas of the drop cache into `report`.
    fn drain_cache(&mut self, report: &mut DrainReport) {
        let Some(cache) = &self.cache else {
            return;
        };
        let mut deltas = std::mem::take(&mut self.cache_scratch);
        deltas.clear();
        let stats = cache.collect(&mut deltas);
        for (key, c) in &deltas {
            self.state.account_cached(key, c.packets, c.bytes);
            let label = self.state.label(&self.reasons, key.reason);
            report.drops.push(decode(key, label, c.packets, c.bytes));
        }
        self.cache_scratch = deltas;
        self.cache_sample_skips = stats.sample_skips;
        self.cache_stats.flush_records = stats.records;
        self.cache_stats.one_shot_records = stats.one_shot;
        tracing::trace!(
            records = stats.records,
            one_shot = stats.one_shot,
            busy_lines = stats.busy_lines,
            refused = stats.refused,
            tracked = stats.tracked,
            "drained drop cache"
        );
    }

    fn drain_losses(&mut self, report: &mut DrainReport) -> Result<(), CaptureError> {
        let (ep, eb) = self.state.account_evictions();
        let mut cum = self.read_losses()?;
        // The drop cache counts its budget skips on its own per-CPU line, not in LOSSES.
        if let Some(c) = cum.get_mut(loss::SAMPLE_BUDGET as usize) {
            *c = c.wrapping_add(self.cache_sample_skips);
        }
        let mut loss_delta = |slot: u32| {
            let now = cum.get(slot as usize).copied().unwrap_or(0);
            self.state.account_loss(slot, now)
        };
        report.losses = Losses {
            ringbuf_full: loss_delta(loss::RINGBUF_FULL),
            flow_insert: loss_delta(loss::FLOW_INSERT),
            skb_read: loss_delta(loss::SKB_READ),
            truncated_header: loss_delta(loss::TRUNCATED_HEADER),
            ipv6_ext_headers_exceeded: loss_delta(loss::IPV6_EXT_HEADERS_EXCEEDED),
            header_not_linear: loss_delta(loss::HEADER_NOT_LINEAR),
            drop_log_full: loss_delta(loss::DROP_LOG_FULL),
            sample_budget: loss_delta(loss::SAMPLE_BUDGET),
            evicted_packets: ep,
            evicted_bytes: eb,
            recursion_miss: self.recursion.as_mut().and_then(|r| r.delta()),
        };
        Ok(())
    }

    fn account(
        &mut self,
        key: &FlowKey,
        value: FlowValue,
        report: &mut DrainReport,
        to_delete: &mut Vec<FlowKey>,
    ) {
        let d = self.state.account_flow(key, value, self.idle_drains);
        if d.packets != 0 || d.bytes != 0 {
            let label = self.state.label(&self.reasons, key.reason);
            report.drops.push(decode(key, label, d.packets, d.bytes));
        }
        if d.delete {
            to_delete.push(*key);
        }
    }

    /// Per-reason totals summed over CPUs, by batch lookup when the kernel has it.
    fn read_totals(&mut self) -> Result<Vec<Counter>, CaptureError> {
        let slots = self.state.total_slots();
        let mut out = vec![Counter::default(); slots as usize];
        if self.use_batch {
            let fd = IterableMap::map(&self.totals).fd().as_fd();
            let res = self
                .totals_batch
                .for_first::<u32>(fd, slots as usize, |r, values| {
                    if let Some(slot) = out.get_mut(r as usize) {
                        *slot = values
                            .iter::<Counter>()
                            .fold(Counter::default(), add_counter);
                    }
                });
            match res {
                Ok(()) => return Ok(out),
                Err(e) => self.batch_unsupported("TOTALS", &e),
            }
        }
        for (r, slot) in (0..slots).zip(out.iter_mut()) {
            let values = self.totals.get(&r, 0).map_err(|source| CaptureError::Map {
                map: "TOTALS",
                source,
            })?;
            *slot = values.iter().copied().fold(Counter::default(), add_counter);
        }
        Ok(out)
    }

    /// The loss counters summed over CPUs, by one batch lookup when the kernel has it rather
    /// than a syscall per slot at every drain.
    fn read_losses(&mut self) -> Result<[u64; loss::COUNT as usize], CaptureError> {
        let mut cum = [0u64; loss::COUNT as usize];
        if self.use_batch {
            let fd = IterableMap::map(&self.losses).fd().as_fd();
            let res = self
                .losses_batch
                .for_first::<u32>(fd, cum.len(), |slot, values| {
                    if let Some(c) = cum.get_mut(slot as usize) {
                        *c = values.sum_u64();
                    }
                });
            match res {
                Ok(()) => return Ok(cum),
                Err(e) => {
                    cum = [0; loss::COUNT as usize];
                    self.batch_unsupported("LOSSES", &e);
                }
            }
        }
        for (i, c) in (0u32..).zip(cum.iter_mut()) {
            let values = self.losses.get(&i, 0).map_err(|source| CaptureError::Map {
                map: "LOSSES",
                source,
            })?;
            *c = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(cum)
    }

    /// Every flow entry, by batch lookup when the kernel has it.
    fn read_flows(&mut self, out: &mut Vec<(FlowKey, FlowValue)>) -> Result<(), CaptureError> {
        if self.use_batch {
            let fd = IterableMap::map(&self.flows).fd().as_fd();
            let res = self.flow_batch.for_each::<FlowKey>(fd, |k, values| {
                // A shared value: the batch holds one "CPU".
                if let Some(v) = values.iter::<FlowValue>().next() {
                    out.push((k, v));
                }
            });
            match res {
                Ok(()) => return Ok(()),
                Err(e) => {
                    out.clear();
                    self.batch_unsupported("FLOWS", &e);
                }
            }
        }
        // get_next_key restarts from the first key when the current one is evicted under it,
        // so the walk is bounded; keys it misses are looked up directly by the caller.
        let max_visits = u64::from(self.capacity) * 2 + 1024;
        for (visits, item) in (1u64..).zip(self.flows.iter()) {
            match item {
                Ok((k, value)) => out.push((k, value)),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(CaptureError::Map {
                        map: "FLOWS",
                        source,
                    });
                }
            }
            if visits >= max_visits {
                break;
            }
        }
        Ok(())
    }

    fn batch_unsupported(&mut self, map: &str, e: &std::io::Error) {
        tracing::warn!(map, error = %e, "BPF_MAP_LOOKUP_BATCH failed; using per-key lookups");
        self.use_batch = false;
    }
}

fn add_counter(acc: Counter, v: Counter) -> Counter {
    Counter {
        packets: acc.packets + v.packets,
        bytes: acc.bytes + v.bytes,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A UDP key of the netfilter reason to `port`, for the capture's unit tests.
    pub(in crate::capture) fn key(port: u16) -> FlowKey {
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
    fn totals_use_the_slots_the_kernel_names_plus_one_shared() {
        let t =
            |names: &[(u32, &'static str)]| ReasonTable::from_kernel_names(names.iter().copied());
        let six = t(&[
            (0, "NOT_SPECIFIED"),
            (2, "NO_SOCKET"),
            (5, "NETFILTER_DROP"),
        ]);
        assert_eq!(total_slots(&six), 7);
        let mut s = DrainState::new(&six);
        assert_eq!(s.total_slots(), 7);
        // Every reason at or above the last slot shares it, as the kernel program counts them.
        assert_eq!(s.slot(5), 5);
        assert_eq!(s.slot(6), 6);
        assert_eq!(s.slot(70_000), 6);
        assert_eq!(&*s.total_label(&six, 6), "other");
        assert_eq!(&*s.total_label(&six, 5), "netfilter_drop");
        // Nothing named below the cap: one shared slot; a kernel naming the cap keeps all 512.
        assert_eq!(total_slots(&t(&[(600, "X")])), 1);
        assert_eq!(total_slots(&t(&[(MAX_REASONS - 2, "X")])), MAX_REASONS);
        assert_eq!(total_slots(&t(&[(MAX_REASONS - 1, "X")])), 1);
    }

    #[test]
    fn quiet_drains_skip_the_walk_but_not_forever() {
        let mut s = state();
        assert!(s.should_walk(true));
        // Nothing counted: skip, up to the bound, then walk once and start over.
        for _ in 0..MAX_SKIPPED_WALKS {
            assert!(!s.should_walk(false));
        }
        assert!(s.should_walk(false));
        assert!(!s.should_walk(false));
        // Anything counted walks at once and resets the count.
        assert!(s.should_walk(true));
        for _ in 0..MAX_SKIPPED_WALKS {
            assert!(!s.should_walk(false));
        }
        assert!(s.should_walk(false));
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
        // Drains without a walk count as idle drains too.
        let mut s = state();
        s.begin();
        s.account_flow(&key(1), v(5, 1), 3);
        s.plan_idle_deletion(3);
        for _ in 0..2 {
            s.begin();
            assert!(!s.should_walk(false));
        }
        s.begin();
        assert!(
            s.should_walk(false),
            "deletion due three drains after the change"
        );
        assert!(s.account_flow(&key(1), v(5, 1), 3).delete);
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
        let t = ReasonTable::default();
        assert_eq!(&*s.total_label(&t, s.total_slots() - 1), "other");
        assert_eq!(&*s.total_label(&t, 12), "netfilter_drop");
        assert_eq!(&*s.label(&t, 70000), "reason_70000");
    }
}
