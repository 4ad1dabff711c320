//! Per-key sums of drop-cache flush records, at one record per drop.
//!
//! With more flows than cache lines (a scan, many clients), every drop ends an incarnation and
//! sends one record, so adding a record to its key's sum is the reader's whole cost. In a
//! general hash map that addition waits on a cache miss per record: the keys of a few thousand
//! records are spread over the whole table. This table is built so that the misses overlap:
//! the slot of every record is known from its hash before it is touched, so the slots of the
//! records a few places ahead are prefetched while the current one is added. A slot holds the
//! key, a tag from the hash and the sums in one line (half a line for an IPv4 key), so a probe
//! touches one line: a separate tag array would be a second miss per record (measured: the tag
//! load then took a sixth of the reader's time, the slot load half).

use std::hash::BuildHasher;

use observer_ebpf::{CacheEntry, Counter, FlowKey, family};

/// A slot of one of the tally's tables: a key, a tag from its hash (0 marks an empty slot) and
/// the key's sums.
trait Slot: Copy + Default {
    /// The key as the table stores it.
    type Key: Copy;
    /// The tag a slot keeps of a key's hash: never 0.
    fn tag(hash: u64) -> u32;
    fn is_empty(&self) -> bool;
    fn holds(&self, key: &Self::Key, tag: u32) -> bool;
    fn new(key: &Self::Key, tag: u32) -> Self;
    /// Adds to the sums; false, leaving them as they were, if they cannot hold the result.
    fn add(&mut self, packets: u64, bytes: u64) -> bool;
    fn take(&mut self) -> (FlowKey, Counter);
}

/// A key and its sums, one cache line: any flow key.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct WideSlot {
    key: FlowKey,
    /// 0 for an empty slot, else the hash's top 32 bits with the lowest bit set.
    tag: u32,
    packets: u64,
    bytes: u64,
}

impl Slot for WideSlot {
    type Key = FlowKey;
    fn tag(hash: u64) -> u32 {
        ((hash >> 32) as u32) | 1
    }
    fn is_empty(&self) -> bool {
        self.tag == 0
    }
    fn holds(&self, key: &FlowKey, tag: u32) -> bool {
        self.tag == tag && self.key == *key
    }
    fn new(key: &FlowKey, tag: u32) -> Self {
        Self {
            key: *key,
            tag,
            packets: 0,
            bytes: 0,
        }
    }
    fn add(&mut self, packets: u64, bytes: u64) -> bool {
        self.packets += packets;
        self.bytes += bytes;
        true
    }
    fn take(&mut self) -> (FlowKey, Counter) {
        self.tag = 0;
        let c = Counter {
            packets: self.packets,
            bytes: self.bytes,
        };
        (self.key, c)
    }
}

/// The 20 bytes that tell IPv4 flow keys apart: source and destination address, netns,
/// reason, and port with protocol (`dst_port | protocol << 16`).
type Key4 = [u32; 5];

/// An IPv4 key (stored IPv4-mapped, the only way the program stores one) in the 20 bytes
/// that differ; `None` for any other key.
fn narrow(key: &FlowKey) -> Option<Key4> {
    // Bytes 0 to 11 of the address are bits 32 and up of its big-endian value.
    const MAPPED: u128 = 0xffff << 32;
    const PREFIX: u128 = !0 << 32;
    let v4 = |a: &[u8; 16]| {
        // The address as stored: its first 12 bytes, read big-endian, are `::ffff:`.
        let w = u128::from_be_bytes(*a);
        (w & PREFIX == MAPPED).then_some(u32::from_ne_bytes([a[12], a[13], a[14], a[15]]))
    };
    if key.family != family::INET {
        return None;
    }
    Some([
        v4(&key.src_addr)?,
        v4(&key.dst_addr)?,
        key.netns,
        key.reason,
        u32::from(key.dst_port) | u32::from(key.protocol) << 16,
    ])
}

/// The flow key of `k`, the inverse of [`narrow`].
fn widen(k: &Key4) -> FlowKey {
    let mapped = |w: u32| {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&w.to_ne_bytes());
        a
    };
    FlowKey {
        src_addr: mapped(k[0]),
        dst_addr: mapped(k[1]),
        netns: k[2],
        reason: k[3],
        dst_port: k[4] as u16,
        protocol: (k[4] >> 16) as u8,
        family: family::INET,
    }
}

/// An IPv4 key and its sums in half a cache line: the table of a scan's or a flood's keys
/// takes half the cache the general one would, and most flows are IPv4.
#[repr(C, align(32))]
#[derive(Clone, Copy, Default)]
struct NarrowSlot {
    /// The [`Key4`], with the tag (never 0 in a used slot) in the top byte of the last word.
    key: Key4,
    packets: u32,
    bytes: u64,
}

impl Slot for NarrowSlot {
    type Key = Key4;
    fn tag(hash: u64) -> u32 {
        ((hash >> 56) as u32) | 1
    }
    fn is_empty(&self) -> bool {
        self.key[4] >> 24 == 0
    }
    fn holds(&self, key: &Key4, tag: u32) -> bool {
        self.key[..4] == key[..4] && self.key[4] == key[4] | tag << 24
    }
    fn new(key: &Key4, tag: u32) -> Self {
        let mut k = *key;
        k[4] |= tag << 24;
        Self {
            key: k,
            packets: 0,
            bytes: 0,
        }
    }
    fn add(&mut self, packets: u64, bytes: u64) -> bool {
        let Some(p) = u32::try_from(packets)
            .ok()
            .and_then(|p| self.packets.checked_add(p))
        else {
            return false;
        };
        self.packets = p;
        self.bytes += bytes;
        true
    }
    fn take(&mut self) -> (FlowKey, Counter) {
        let mut k = self.key;
        k[4] &= 0x00ff_ffff;
        self.key[4] = 0;
        let c = Counter {
            packets: u64::from(self.packets),
            bytes: self.bytes,
        };
        (widen(&k), c)
    }
}

/// Smallest table: 1,024 slots.
const MIN_SLOTS: usize = 1024;

/// An open-addressing table of slots, probed linearly, at most half full.
struct Table<S> {
    slots: Vec<S>,
    /// Occupied slots, in the order their keys arrived.
    used: Vec<u32>,
}

/// What [`Table::add`] did with a record.
enum Added {
    Done,
    /// The key is new and the tally holds its maximum of keys.
    Refused,
    /// The key's sums cannot hold the record's counts (a narrow slot's packets past 2^32).
    Overflow,
}

impl<S: Slot> Table<S> {
    fn new() -> Self {
        Self {
            slots: vec![S::default(); MIN_SLOTS],
            used: Vec::new(),
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Prefetches a hash's slot and the next one, where linear probing goes on a collision
    /// (a third of the keys at half load).
    fn prefetch(&self, hash: u64) {
        let pos = (hash as usize) & self.mask();
        let slots = self.slots.as_ptr();
        prefetch(slots.wrapping_add(pos).cast());
        prefetch(slots.wrapping_add((pos + 1) & self.mask()).cast());
    }

    /// Adds counts to `key`'s sums; a new key only while `room` (keys in all tables below the
    /// bound). `rehash` hashes a key already in the table when it grows.
    fn add(
        &mut self,
        hash: u64,
        key: &S::Key,
        packets: u64,
        bytes: u64,
        room: bool,
        rehash: &dyn Fn(&S) -> u64,
    ) -> Added {
        let tag = S::tag(hash);
        let mask = self.mask();
        let mut pos = (hash as usize) & mask;
        loop {
            let s = &mut self.slots[pos];
            if s.is_empty() {
                break;
            }
            if s.holds(key, tag) {
                return if s.add(packets, bytes) {
                    Added::Done
                } else {
                    Added::Overflow
                };
            }
            pos = (pos + 1) & mask;
        }
        if !room {
            return Added::Refused;
        }
        // Linear probing stays short at most half full.
        if 2 * (self.used.len() + 1) > self.slots.len() {
            self.grow(rehash);
            return self.add(hash, key, packets, bytes, room, rehash);
        }
        let mut s = S::new(key, tag);
        if !s.add(packets, bytes) {
            return Added::Overflow;
        }
        self.slots[pos] = s;
        self.used.push(pos as u32);
        Added::Done
    }

    /// Twice the slots, every key moved to its new place.
    fn grow(&mut self, rehash: &dyn Fn(&S) -> u64) {
        let old = std::mem::take(&mut self.slots);
        let len = 2 * old.len();
        self.slots = vec![S::default(); len];
        let mask = len - 1;
        for pos in &mut self.used {
            let s = old[*pos as usize];
            let mut p = (rehash(&s) as usize) & mask;
            while !self.slots[p].is_empty() {
                p = (p + 1) & mask;
            }
            self.slots[p] = s;
            *pos = p as u32;
        }
    }

    /// Hands out every key's sums, in the order the keys arrived, and empties the table. A
    /// table grown by a burst shrinks back when far fewer keys came.
    fn take(&mut self, out: &mut Vec<(FlowKey, Counter)>) {
        out.reserve(self.used.len());
        for &pos in &self.used {
            out.push(self.slots[pos as usize].take());
        }
        let keys = self.used.len();
        self.used.clear();
        let fit = (4 * keys).next_power_of_two().max(MIN_SLOTS);
        if fit < self.slots.len() / 4 {
            self.slots = vec![S::default(); fit];
            self.used.shrink_to(fit / 2);
        }
    }
}

/// Records added this far ahead of the one being added have their slots prefetched: enough
/// for a few cache misses in flight, not so many that the early ones are evicted again. With
/// 4,096 flows and the next slot prefetched too, 16 cost the reader 70 to 79 ns per record
/// against 74 to 84 for 8 without the next slot (`cargo xtask bench --quick`, udp-many).
const AHEAD: usize = 16;

/// Sums per flow key, handed out and reset by [`Tally::take`].
///
/// IPv4 keys go to a table of half-line slots, any other to one of whole lines: per record,
/// the cost is the miss on the key's slot, and the table a scan of thousands of IPv4 flows
/// touches is half the size.
pub(super) struct Tally {
    /// Per-table random seeds of the hashes.
    seeds: [u64; 6],
    narrow: Table<NarrowSlot>,
    wide: Table<WideSlot>,
    /// At most this many keys between two takes; see [`Tally::refused`].
    max_keys: usize,
    /// Records whose key was new when the table already held `max_keys` keys.
    refused: u64,
    /// Hashes of the records being added, the lowest bit set for a narrow key (reused buffer).
    hashes: Vec<u64>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("narrow_keys", &self.narrow.used.len())
            .field("wide_keys", &self.wide.used.len())
            .field("max_keys", &self.max_keys)
            .field("refused", &self.refused)
            .finish()
    }
}

/// A 64-bit multiply folded to 64 bits.
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    p as u64 ^ (p >> 64) as u64
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
            narrow: Table::new(),
            wide: Table::new(),
            max_keys: max_keys.max(1),
            refused: 0,
            hashes: Vec::new(),
        }
    }

    /// Records refused so far because the table held `max_keys` keys (cumulative).
    pub(super) fn refused(&self) -> u64 {
        self.refused
    }

    fn room(&self) -> bool {
        self.narrow.used.len() + self.wide.used.len() < self.max_keys
    }

    /// A seeded hash of the key's 44 bytes in three folded multiplies: a general hasher took
    /// a sixth of the reader's time here, at one record per drop. Seeded per table, so keys
    /// chosen to collide (sources are spoofable) cannot be chosen in advance.
    fn hash_wide(seeds: &[u64; 6], key: &FlowKey) -> u64 {
        let word = |b: &[u8; 16], half: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[half * 8..half * 8 + 8]);
            u64::from_ne_bytes(w)
        };
        let s = seeds;
        let tail = u64::from(key.netns) | u64::from(key.reason) << 32;
        let last =
            u64::from(key.dst_port) | u64::from(key.protocol) << 16 | u64::from(key.family) << 24;
        let a = fold(word(&key.src_addr, 0) ^ s[0], word(&key.src_addr, 1) ^ s[1]);
        let b = fold(word(&key.dst_addr, 0) ^ s[2], word(&key.dst_addr, 1) ^ s[3]);
        fold(a ^ tail ^ s[4], b ^ last ^ s[5])
    }

    /// [`Tally::hash_wide`] of a narrow key's 20 bytes, in two folded multiplies.
    fn hash_narrow(seeds: &[u64; 6], k: &Key4) -> u64 {
        let w = |i: usize| u64::from(k[i]) | u64::from(k[i + 1]) << 32;
        let a = fold(w(0) ^ seeds[0], w(2) ^ seeds[1]);
        fold(a ^ seeds[2], u64::from(k[4]) ^ seeds[3])
    }

    /// Adds the counts of many records, prefetching the slots of those ahead.
    pub(super) fn add_records(&mut self, records: &[CacheEntry]) {
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        hashes.extend(records.iter().map(|r| match narrow(&r.key) {
            Some(k) => Self::hash_narrow(&self.seeds, &k) | 1,
            None => Self::hash_wide(&self.seeds, &r.key) & !1,
        }));
        for (i, (rec, &hash)) in records.iter().zip(&hashes).enumerate() {
            if let Some(&ahead) = hashes.get(i + AHEAD) {
                if ahead & 1 == 1 {
                    self.narrow.prefetch(ahead >> 1);
                } else {
                    self.wide.prefetch(ahead >> 1);
                }
            }
            self.add_hashed(hash, &rec.key, rec.packets, rec.bytes);
        }
        self.hashes = hashes;
    }

    /// Adds one key's counts.
    pub(super) fn add(&mut self, key: &FlowKey, packets: u64, bytes: u64) {
        let hash = match narrow(key) {
            Some(k) => Self::hash_narrow(&self.seeds, &k) | 1,
            None => Self::hash_wide(&self.seeds, key) & !1,
        };
        self.add_hashed(hash, key, packets, bytes);
    }

    /// Adds one key's counts given its hash from [`Tally::add_records`] (lowest bit: narrow).
    fn add_hashed(&mut self, hash: u64, key: &FlowKey, packets: u64, bytes: u64) {
        if packets == 0 && bytes == 0 {
            return;
        }
        let room = self.room();
        let seeds = self.seeds;
        let narrow_key = if hash & 1 == 1 { narrow(key) } else { None };
        let added = match narrow_key {
            Some(k) => self.narrow.add(hash >> 1, &k, packets, bytes, room, &|s| {
                let mut k = s.key;
                k[4] &= 0x00ff_ffff;
                Self::hash_narrow(&seeds, &k) >> 1
            }),
            None => {
                let h = if hash & 1 == 1 {
                    Self::hash_wide(&seeds, key)
                } else {
                    hash
                };
                self.wide.add(h >> 1, key, packets, bytes, room, &|s| {
                    Self::hash_wide(&seeds, &s.key) >> 1
                })
            }
        };
        match added {
            Added::Done => {}
            Added::Refused => self.refused += 1,
            Added::Overflow => {
                // More than 2^32 packets of one IPv4 key between two takes: the rest of its
                // sums go to the general table, and the key is handed out twice (whoever
                // takes it adds both). Never seen in practice; kept exact all the same.
                let h = Self::hash_wide(&seeds, key) & !1;
                let room = true;
                if let Added::Refused | Added::Overflow =
                    self.wide.add(h >> 1, key, packets, bytes, room, &|s| {
                        Self::hash_wide(&seeds, &s.key) >> 1
                    })
                {
                    self.refused += 1;
                }
            }
        }
    }

    /// Hands out every key's sums since the previous take, IPv4 keys first, each table's in
    /// the order its keys arrived, and empties the table.
    pub(super) fn take(&mut self, out: &mut Vec<(FlowKey, Counter)>) {
        self.narrow.take(out);
        self.wide.take(out);
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
        assert!(t.wide.slots.len() >= 200_000);
        assert_eq!(taken(&mut t).len(), 100_000);
        assert!(t.wide.slots.len() <= MIN_SLOTS.max(4 * 100_000usize.next_power_of_two()));
        t.add_records(&burst[..10]);
        assert_eq!(taken(&mut t).len(), 10);
        assert_eq!(t.wide.slots.len(), MIN_SLOTS);
        t.add_records(&burst[..3]);
        assert_eq!(taken(&mut t).len(), 3);
    }

    /// An IPv4 key as the program stores it: addresses IPv4-mapped.
    fn key4(i: u32) -> FlowKey {
        let mapped = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets();
        FlowKey {
            src_addr: mapped([10, 0, (i >> 8) as u8, i as u8]),
            dst_addr: mapped([10, 1, 0, 1]),
            family: family::INET,
            ..key(i)
        }
    }

    #[test]
    fn ipv4_keys_take_the_narrow_table_and_come_back_whole() {
        let mut t = Tally::new(1 << 20);
        let mut recs = Vec::new();
        for round in 0..3u64 {
            for i in 0..3_000u32 {
                recs.push(record(key4(i), 1, 10 + round));
                // Every tenth also as a wide key of the same port: told apart by family.
                if i % 10 == 0 {
                    recs.push(record(key(i), 2, 1));
                }
            }
        }
        // IPv4 addresses not mapped the program's way stay wide.
        let odd = FlowKey {
            src_addr: [1; 16],
            ..key4(1)
        };
        recs.push(record(odd, 5, 5));
        for chunk in recs.chunks(1000) {
            t.add_records(chunk);
        }
        assert_eq!(t.narrow.used.len(), 3_000);
        assert_eq!(t.wide.used.len(), 301);
        let m = taken(&mut t);
        assert_eq!(m.len(), 3_301);
        for i in 0..3_000u32 {
            assert_eq!(m[&key4(i)], (3, 33), "key {i}");
            if i % 10 == 0 {
                assert_eq!(m[&key(i)], (6, 3), "key {i}");
            }
        }
        assert_eq!(m[&odd], (5, 5));
        for k in [key4(0), key4(2_999), key(7)] {
            match narrow(&k) {
                Some(n) => assert_eq!(widen(&n), k),
                None => assert_eq!(k.family, 2),
            }
        }
    }

    #[test]
    fn a_narrow_key_past_2_32_packets_is_still_counted_exactly() {
        let mut t = Tally::new(4);
        let big = u64::from(u32::MAX);
        t.add_records(&[
            record(key4(1), big - 1, 1),
            record(key4(1), 5, 2),
            record(key4(2), big + 7, 3),
            record(key4(1), 1, 4),
        ]);
        let mut out = Vec::new();
        t.take(&mut out);
        let mut sums: std::collections::BTreeMap<u16, (u64, u64)> = Default::default();
        for (k, c) in &out {
            let e = sums.entry(k.dst_port).or_default();
            e.0 += c.packets;
            e.1 += c.bytes;
        }
        assert_eq!(sums[&1], (big + 5, 7));
        assert_eq!(sums[&2], (big + 7, 3));
        assert_eq!(t.refused(), 0);
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
