//! Per-key sums of drop-cache flush records, at one record per drop.
//!
//! With more flows than cache lines (a scan, many clients), every drop ends an incarnation and
//! sends one record, so adding a record to its key's sum is the reader's whole cost. In a
//! general hash map that addition waits on a cache miss per record: the keys of a few thousand
//! records are spread over the whole table. This table is built so that the misses overlap:
//! the slot of every record is known from its hash before it is touched, so the slots of the
//! records a few places ahead are prefetched while the current one is added. Each slot is one
//! cache line holding the key, a tag from the hash and the sums, so a probe touches one line:
//! a separate tag array would be a second miss per record (measured: the tag load then took a
//! sixth of the reader's time, the slot load half).

use std::hash::BuildHasher;

use observer_ebpf::{CacheEntry, Counter, FlowKey};

/// A key and its sums, one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Slot {
    key: FlowKey,
    /// 0 for an empty slot, else the hash's top 32 bits with the lowest bit set.
    tag: u32,
    packets: u64,
    bytes: u64,
}

/// Records added this far ahead of the one being added have their slots prefetched: enough
/// for a few cache misses in flight, not so many that the early ones are evicted again. With
/// 4,096 flows and the next slot prefetched too, 16 cost the reader 70 to 79 ns per record
/// against 74 to 84 for 8 without the next slot (`cargo xtask bench --quick`, udp-many).
const AHEAD: usize = 16;

/// Smallest table: 1,024 slots (64 KiB).
const MIN_SLOTS: usize = 1024;

/// Sums per flow key, handed out and reset by [`Tally::take`].
pub(super) struct Tally {
    /// Per-table random seeds of [`Tally::hash`].
    seeds: [u64; 6],
    slots: Vec<Slot>,
    /// Occupied slots, in the order their keys arrived.
    used: Vec<u32>,
    /// At most this many keys between two takes; see [`Tally::refused`].
    max_keys: usize,
    /// Records whose key was new when the table already held `max_keys` keys.
    refused: u64,
    /// Hashes of the records being added (reused buffer).
    hashes: Vec<u64>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("keys", &self.used.len())
            .field("slots", &self.slots.len())
            .field("max_keys", &self.max_keys)
            .field("refused", &self.refused)
            .finish()
    }
}

impl Tally {
    /// An empty tally holding at most `max_keys` keys (at least 1) between two takes.
    ///
    /// The bound keeps a flood of distinct keys (spoofed sources) from growing the daemon: the
    /// kernel's flow map bounds its keys the same way. Records refused for it are not counted
    /// per flow; the per-reason totals still count them, so they show up in the drain's
    /// eviction check like the flow map's own evictions.
    pub(super) fn new(max_keys: usize) -> Self {
        Self {
            seeds: {
                let random = foldhash::fast::RandomState::default();
                std::array::from_fn(|i| random.hash_one(i))
            },
            slots: vec![Slot::default(); MIN_SLOTS],
            used: Vec::new(),
            max_keys: max_keys.max(1),
            refused: 0,
            hashes: Vec::new(),
        }
    }

    /// Records refused so far because the table held `max_keys` keys (cumulative).
    pub(super) fn refused(&self) -> u64 {
        self.refused
    }

    /// A seeded hash of the key's 44 bytes in three folded multiplies: a general hasher took
    /// a sixth of the reader's time here, at one record per drop. Seeded per table, so keys
    /// chosen to collide (sources are spoofable) cannot be chosen in advance.
    fn hash(&self, key: &FlowKey) -> u64 {
        fn fold(a: u64, b: u64) -> u64 {
            let p = u128::from(a) * u128::from(b);
            p as u64 ^ (p >> 64) as u64
        }
        let word = |b: &[u8; 16], half: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[half * 8..half * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        let s = &self.seeds;
        let tail = u64::from(key.netns) | u64::from(key.reason) << 32;
        let last =
            u64::from(key.dst_port) | u64::from(key.protocol) << 16 | u64::from(key.family) << 24;
        let a = fold(word(&key.src_addr, 0) ^ s[0], word(&key.src_addr, 1) ^ s[1]);
        let b = fold(word(&key.dst_addr, 0) ^ s[2], word(&key.dst_addr, 1) ^ s[3]);
        fold(a ^ tail ^ s[4], b ^ last ^ s[5])
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Adds the counts of many records, prefetching the slots of those ahead.
    pub(super) fn add_records(&mut self, records: &[CacheEntry]) {
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        hashes.extend(records.iter().map(|r| self.hash(&r.key)));
        for (i, (rec, &hash)) in records.iter().zip(&hashes).enumerate() {
            if let Some(&ahead) = hashes.get(i + AHEAD) {
                self.prefetch(ahead);
            }
            self.add_hashed(hash, &rec.key, rec.packets, rec.bytes);
        }
        self.hashes = hashes;
    }

    /// Adds one key's counts.
    pub(super) fn add(&mut self, key: &FlowKey, packets: u64, bytes: u64) {
        let hash = self.hash(key);
        self.add_hashed(hash, key, packets, bytes);
    }

    /// Prefetches a hash's slot and the next one, where linear probing goes on a collision
    /// (a third of the keys at half load).
    fn prefetch(&self, hash: u64) {
        let pos = (hash as usize) & self.mask();
        let slots = self.slots.as_ptr();
        prefetch(slots.wrapping_add(pos).cast());
        prefetch(slots.wrapping_add((pos + 1) & self.mask()).cast());
    }

    fn add_hashed(&mut self, hash: u64, key: &FlowKey, packets: u64, bytes: u64) {
        if packets == 0 && bytes == 0 {
            return;
        }
        let tag = ((hash >> 32) as u32) | 1;
        let mask = self.mask();
        let mut pos = (hash as usize) & mask;
        loop {
            let s = &mut self.slots[pos];
            if s.tag == 0 {
                break;
            }
            if s.tag == tag && s.key == *key {
                s.packets += packets;
                s.bytes += bytes;
                return;
            }
            pos = (pos + 1) & mask;
        }
        // A new key.
        if self.used.len() >= self.max_keys {
            self.refused += 1;
            return;
        }
        // Linear probing stays short at most half full.
        if 2 * (self.used.len() + 1) > self.slots.len() {
            self.grow();
            self.add_hashed(hash, key, packets, bytes);
            return;
        }
        self.slots[pos] = Slot {
            key: *key,
            tag,
            packets,
            bytes,
        };
        self.used.push(pos as u32);
    }

    /// Twice the slots, every key moved to its new place.
    fn grow(&mut self) {
        let old_slots = std::mem::take(&mut self.slots);
        let old_used = std::mem::take(&mut self.used);
        let len = 2 * old_slots.len();
        self.slots = vec![Slot::default(); len];
        self.used = Vec::with_capacity(old_used.len() * 2);
        for pos in old_used {
            let s = old_slots[pos as usize];
            let hash = self.hash(&s.key);
            self.add_hashed(hash, &s.key, s.packets, s.bytes);
        }
    }

    /// Hands out every key's sums since the previous take, in the order the keys arrived, and
    /// empties the table. A table grown by a burst shrinks back when far fewer keys came.
    pub(super) fn take(&mut self, out: &mut Vec<(FlowKey, Counter)>) {
        out.reserve(self.used.len());
        for &pos in &self.used {
            let pos = pos as usize;
            let s = &mut self.slots[pos];
            out.push((
                s.key,
                Counter {
                    packets: s.packets,
                    bytes: s.bytes,
                },
            ));
            s.tag = 0;
        }
        let keys = self.used.len();
        self.used.clear();
        let fit = (4 * keys).next_power_of_two().max(MIN_SLOTS);
        if fit < self.slots.len() / 4 {
            self.slots = vec![Slot::default(); fit];
            self.used.shrink_to(fit / 2);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn prefetch(p: *const i8) {
    // SAFETY: a prefetch is a hint: it never faults and has no effect on program semantics,
    // whatever the address.
    unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_: *const i8) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn key(i: u32) -> FlowKey {
        FlowKey {
            dst_port: (i % 60_000) as u16,
            netns: i / 60_000,
            protocol: 17,
            family: 2,
            reason: 12,
            ..FlowKey::default()
        }
    }

    fn record(k: FlowKey, packets: u64, bytes: u64) -> CacheEntry {
        CacheEntry {
            key: k,
            tag: 0,
            packets,
            bytes,
        }
    }

    fn taken(t: &mut Tally) -> HashMap<FlowKey, (u64, u64)> {
        let mut out = Vec::new();
        t.take(&mut out);
        let n = out.len();
        let m: HashMap<_, _> = out
            .into_iter()
            .map(|(k, c)| (k, (c.packets, c.bytes)))
            .collect();
        assert_eq!(m.len(), n, "a key handed out twice");
        m
    }

    #[test]
    fn sums_per_key_across_growth_and_takes() {
        let mut t = Tally::new(1 << 20);
        // 5,000 keys round robin, three rounds: the table grows from 1,024 slots meanwhile.
        let recs: Vec<_> = (0..3)
            .flat_map(|round| (0..5_000).map(move |i| record(key(i), 1 + round, 100 + i as u64)))
            .collect();
        for chunk in recs.chunks(777) {
            t.add_records(chunk);
        }
        t.add(&key(7), 10, 1);
        let m = taken(&mut t);
        assert_eq!(m.len(), 5_000);
        for i in 0..5_000u32 {
            let extra = if i == 7 { (10, 1) } else { (0, 0) };
            assert_eq!(
                m[&key(i)],
                (6 + extra.0, 3 * (100 + u64::from(i)) + extra.1),
                "key {i}"
            );
        }
        // Empty after a take; the next round counts from zero.
        assert!(taken(&mut t).is_empty());
        t.add_records(&[record(key(1), 2, 3), record(key(1), 0, 0)]);
        assert_eq!(taken(&mut t), HashMap::from([(key(1), (2, 3))]));
    }

    #[test]
    fn shrinks_after_a_burst() {
        let mut t = Tally::new(1 << 20);
        let burst: Vec<_> = (0..100_000).map(|i| record(key(i), 1, 1)).collect();
        t.add_records(&burst);
        assert!(t.slots.len() >= 200_000);
        assert_eq!(taken(&mut t).len(), 100_000);
        assert!(t.slots.len() <= MIN_SLOTS.max(4 * 100_000usize.next_power_of_two()));
        t.add_records(&burst[..10]);
        assert_eq!(taken(&mut t).len(), 10);
        assert_eq!(t.slots.len(), MIN_SLOTS);
        t.add_records(&burst[..3]);
        assert_eq!(taken(&mut t).len(), 3);
    }

    #[test]
    fn refuses_new_keys_beyond_the_bound_but_keeps_adding_known_ones() {
        let mut t = Tally::new(3);
        let recs: Vec<_> = (0..5).map(|i| record(key(i), 1, 10)).collect();
        t.add_records(&recs);
        t.add_records(&recs);
        assert_eq!(t.refused(), 4);
        let m = taken(&mut t);
        assert_eq!(m.len(), 3);
        assert!(m.values().all(|&c| c == (2, 20)), "{m:?}");
        // The bound is per take.
        t.add_records(&recs[3..]);
        assert_eq!(taken(&mut t).len(), 2);
        assert_eq!(t.refused(), 4);
    }
}
