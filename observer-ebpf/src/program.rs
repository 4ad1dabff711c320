//! `skb:kfree_skb`: counts every dropped packet per flow key, exactly.
//!
//! Two entry points share one hot path ([`count_drop`]): `kfree_skb_btf`, a BTF-enabled raw
//! tracepoint (`tp_btf/kfree_skb`) that gets the tracepoint's arguments directly and loads the
//! `sk_buff` fields with plain loads, and `kfree_skb`, the classic tracepoint, which reads them
//! from the perf trace record the kernel fills first and copies the `sk_buff` with helper calls.
//! Userspace attaches the first where the kernel allows it and the second otherwise.
//!
//! Accounting order is part of the contract with userspace (`capture::drain`): the flow entry
//! (drop cache line, flush record or `FLOWS` entry) is updated first, then the per-reason total. Userspace reads the totals first and the flows
//! second, so `totals - flows` never over-estimates the packets lost to eviction.
//!
//! All struct offsets come from [`CONFIG`], which userspace fills from BTF and from the
//! tracepoint's format file (Rust eBPF has no CO-RE).
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_MMAPABLE,
    bindings::BPF_NOEXIST,
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use observer_ebpf::{
    BTF_ARGS_MAX, BtfArgs, CACHE_ONE_SHOT_TAG, CACHE_TAG_LINE_BITS, CACHE_WAYS, CacheConfig,
    CacheEntry, Counter, CpuState, FlowKey, FlowValue, KernelLayout, LOCATION_RANGES_MAX,
    LocationRange, LocationTable, MAX_REASONS, NO_ARG, ProgramConfig, SAMPLE_FILTER_SLOTS,
    SKB_SPAN_MAX, SampleEvent, THRASH_ENTER, THRASH_HIT_WEIGHT, THRASH_MAX, THRASH_PROBE_EVERY,
    family, loss,
};

/// Set by userspace with `EbpfLoader::override_global("CONFIG", ..)`; this value is only the
/// placeholder compiled into the object.
#[unsafe(no_mangle)]
static CONFIG: ProgramConfig = ProgramConfig {
    layout: KernelLayout {
        tp_skbaddr: 0,
        tp_location: 0,
        tp_protocol: 0,
        tp_reason: u32::MAX,
        skb_head: 0,
        skb_network_header: 0,
        skb_transport_header: 0,
        skb_len: 0,
        skb_dev: 0,
        dev_ifindex: 0,
        dev_nd_net: 0,
        net_ns_inum: 0,
        skb_tail: 0,
        skb_data_len: 0,
    },
    all_reasons: 1,
    netns_filter: 0,
    skb_span_start: 0,
    skb_span_len: 0,
    btf_args: BtfArgs::NONE,
    reason_mask: [0; (MAX_REASONS / 64) as usize],
    total_slots: MAX_REASONS,
    reserved: 0,
};

/// Kernels without drop reasons: the reason of each caller of `kfree_skb`, by address. Set by
/// userspace with `EbpfLoader::override_global("LOCATIONS", ..)` from `/proc/kallsyms`.
#[unsafe(no_mangle)]
static LOCATIONS: LocationTable = LocationTable::EMPTY;

/// Drop cache switch and flush-log size; set by userspace with
/// `EbpfLoader::override_global("CACHE_CONFIG", ..)`. Disabled in the placeholder.
#[unsafe(no_mangle)]
static CACHE_CONFIG: CacheConfig = CacheConfig {
    enabled: 0,
    log_mask: 0,
    line_bits: 1,
    reserved: 0,
};

/// The per-CPU drop cache: CPU `c` owns lines `c << line_bits ..` (see [`CacheConfig`]).
/// Userspace mmaps it and reads live lines (see `capture::cache`); only the owning CPU writes.
/// The size (possible CPUs times lines per CPU) is set at load time.
#[map]
static DROP_CACHE: Array<CacheEntry> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The per-CPU flush logs of evicted cache lines: CPU `c` owns records
/// `c * (log_mask + 1) ..`. The size is set at load time.
#[map]
static DROP_LOG: Array<CacheEntry> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per-CPU sequence number and log positions, one entry per possible CPU (set at load time).
#[map]
static DROP_CPU: Array<CpuState> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Wakes the flush-log reader: the number of a CPU whose log has just filled to a quarter. The
/// reader sleeps on this ring instead of polling, so an idle node costs it nothing and a busy
/// one one wake-up per quarter log.
#[map]
static DROP_LOG_WAKE: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Fingerprints of the keys this CPU sent a sample for, by slot (see [`SAMPLE_FILTER_SLOTS`]).
#[map]
static SAMPLED: PerCpuArray<SampleFilter> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct SampleFilter {
    fingerprints: [u32; SAMPLE_FILTER_SLOTS as usize],
}

/// Per-flow counters: the drop cache's fallback, and the only flow store when the cache is
/// disabled. The size is set by userspace at load time.
///
/// One shared value per key, added to atomically, rather than a per-CPU value: with thousands
/// of keys the per-drop cost is dominated by cache and TLB misses, and a per-CPU value is one
/// more line on pages of its own, reached through a pointer in the entry. A shared value sits
/// in the entry next to the key, and the verifier inlines the lookup of a (non-per-CPU) LRU
/// hash. Drops of one flow mostly arrive on one CPU, so the atomic adds rarely contend.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(65536, 0);

/// Exact per-reason totals (reasons at or above the last slot in use, `ProgramConfig::total_slots`,
/// share it); never evicted.
#[map]
static TOTALS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_REASONS, 0);

/// Loss counters, indexed by `loss::*`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// One [`SampleEvent`] per key a CPU inserts. The size is set by userspace at load time.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU scratch space for the copies of the `sk_buff` span and of the packet headers, which
/// together would not fit the 512-byte BPF stack next to the key and value. A per-CPU array
/// lookup is inlined by the verifier, so this costs a few instructions.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    skb: [u64; SKB_SPAN_WORDS],
    packet: [u64; PACKET_WORDS],
}

/// Reads one field of [`CONFIG`] through a volatile load: the compiler must not fold the
/// placeholder value into the code, since the loader replaces it.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a plain, always-initialised static; the pointer is valid.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$($field)+) }
    };
}

/// Reads one field of [`CACHE_CONFIG`], volatile for the same reason as [`config!`].
macro_rules! config_cache {
    ($field:ident) => {
        // SAFETY: CACHE_CONFIG is a plain, always-initialised static; the pointer is valid.
        unsafe { core::ptr::read_volatile(&raw const CACHE_CONFIG.$field) }
    };
}

/// Reads one field of [`LOCATIONS`], volatile for the same reason as [`config!`].
macro_rules! locations {
    ($($field:tt)+) => {
        // SAFETY: LOCATIONS is a plain, always-initialised static; the pointer is valid.
        unsafe { core::ptr::read_volatile(&raw const LOCATIONS.$($field)+) }
    };
}

const EEXIST: i32 = 17;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
/// IPv6 extension headers followed at most. Real traffic carries two or three; more are cut off
/// and counted as `loss::IPV6_EXT_HEADERS_EXCEEDED`. Each one costs a few dozen instructions
/// of the unrolled loop, so the limit stays small for older verifiers.
const MAX_EXT_HEADERS: usize = 8;

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    match try_kfree_skb(&ctx) {
        Ok(ret) => ret,
        Err(_) => 0,
    }
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
    match try_kfree_skb_btf(&ctx) {
        Ok(ret) => ret,
        Err(_) => 0,
    }
}

/// What the shared hot path needs from the attach point: the two programs differ only in how
/// they reach the `sk_buff` and the tracepoint's arguments.
trait DropSource {
    /// `len`, `dev`, `head`, `network_header`, `tail` and `data_len` of the dropped skb; `None`
    /// when there is no skb or it could not be read.
    fn skb_fields(&self, scratch: &mut [u64; SKB_SPAN_WORDS]) -> Option<SkbFields>;
    /// Network-namespace inode of the device `dev` (non-zero).
    fn netns(&self, dev: u64) -> Result<u32, i64>;
    /// ifindex of the device `dev` (non-zero), 0 if unreadable.
    fn ifindex(&self, dev: u64) -> u32;
    /// Kernel code address that freed the skb, 0 if unknown.
    fn location(&self) -> u64;
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copies with fault handling; a bad address is an error, never
    // a crash.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.map_err(i64::from)
}

#[inline(always)]
fn count_loss(slot: u32) {
    if let Some(p) = LOSSES.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU.
        unsafe { *p += 1 };
    }
}

/// What the header parser found beyond the flow key (only sent in samples).
#[derive(Default)]
struct Extra {
    src_port: u16,
    tcp_flags: u8,
}

/// 4-byte words of the tracepoint record loaded up front, from byte 8 on (the verifier forbids
/// the first 8 bytes). The fields the program needs sit in the first few dozen bytes on every
/// kernel so far (6.18: reason ends at byte 40); fields beyond are read with a helper call.
const RECORD_WORDS: usize = 8;

/// Of those, the words every kfree_skb record has: since its first version it starts with
/// skbaddr and location, bytes 8..24. Nothing past the last field may be loaded, not even
/// padding: attaching fails with EACCES when the program may read beyond the end of the last
/// field (5.10's record ends with protocol at byte 26).
const RECORD_WORDS_ALWAYS: usize = 4;

/// The start of the tracepoint record, loaded from the context with plain loads.
///
/// The record offsets come from userspace, but the verifier only accepts context loads at
/// constant offsets. So the program loads [`RECORD_WORDS`] words at constant offsets (cheap, no
/// helper call) and picks fields out of this stack copy; a field beyond it is read with a helper
/// call. The words are 4 bytes wide so that a 4-byte field comes out of a single
/// zero-extending load: the verifier then tracks the bounds checked on it (`reason` indexes the
/// reason mask).
struct Record<'a> {
    ctx: &'a TracePointContext,
    /// `words[i]` holds record bytes `8 + 4 * i..12 + 4 * i`.
    words: [u32; RECORD_WORDS],
}

impl<'a> Record<'a> {
    #[inline(always)]
    fn load(ctx: &'a TracePointContext) -> Self {
        // Attaching fails (EACCES) if the program may read past the end of the record, so only
        // words up to the last field the program uses are loaded. CONFIG is read-only and frozen,
        // so the verifier knows `end` and prunes the loads beyond it.
        let reason_end = match config!(layout.tp_reason) {
            u32::MAX => 0,
            off => off.saturating_add(4),
        };
        let end = reason_end
            .max(config!(layout.tp_skbaddr).saturating_add(8))
            .max(config!(layout.tp_location).saturating_add(8));
        let base = ctx.as_ptr() as *const u32;
        let mut words = [0u32; RECORD_WORDS];
        let mut i = 0;
        while i < RECORD_WORDS {
            if i < RECORD_WORDS_ALWAYS || (12 + 4 * i) as u32 <= end {
                // SAFETY: the context is the record in the per-CPU trace buffer, which the
                // verifier lets a tracepoint program read at aligned constant offsets from 8 up
                // to the record's end. Volatile keeps each load at its own constant offset (a
                // merged load with a computed offset would be rejected).
                words[i] = unsafe { core::ptr::read_volatile(base.add(i + 2)) };
            }
            i += 1;
        }
        Self { ctx, words }
    }

    /// The loaded word at record byte `off` (a multiple of 4), if loaded.
    #[inline(always)]
    fn word(&self, off: u32) -> Option<u32> {
        if off % 4 != 0 {
            return None;
        }
        let i = (off as usize / 4).checked_sub(2)?;
        self.words.get(i).copied()
    }

    /// The naturally aligned `u64` at `off`.
    #[inline(always)]
    fn u64_at(&self, off: u32) -> Result<u64, i64> {
        if off % 8 == 0
            && let (Some(lo), Some(hi)) = (self.word(off), self.word(off + 4))
        {
            // Little-endian (bpfel).
            return Ok(u64::from(hi) << 32 | u64::from(lo));
        }
        // SAFETY: offset of an 8-byte field of the record, from the format file.
        unsafe { self.ctx.read_at::<u64>(off as usize) }.map_err(i64::from)
    }

    /// The naturally aligned `u32` at `off`.
    #[inline(always)]
    fn u32_at(&self, off: u32) -> Result<u32, i64> {
        match self.word(off) {
            Some(w) => Ok(w),
            // SAFETY: offset of a 4-byte field of the record, from the format file.
            None => unsafe { self.ctx.read_at::<u32>(off as usize) }.map_err(i64::from),
        }
    }
}

/// The `sk_buff` fields of the hot path.
struct SkbFields {
    len: u32,
    dev: u64,
    head: u64,
    network_header: u16,
    /// End of the linear data, as an offset from `head`.
    tail: u32,
    /// Bytes in page fragments (0: the packet is all linear).
    data_len: u32,
}

/// Number of 8-byte words of the `sk_buff` span buffer.
const SKB_SPAN_WORDS: usize = (SKB_SPAN_MAX / 8) as usize;

/// Reads the [`SkbFields`] of `skb`: with one helper call over the
/// span userspace computed (each `bpf_probe_read_kernel` costs far more than the copy), or one
/// call per field when the layout does not allow a span.
#[inline(always)]
fn read_skb(skb: u64, buf: &mut [u64; SKB_SPAN_WORDS]) -> Result<SkbFields, i64> {
    let span_len = config!(skb_span_len);
    if span_len == 0 || span_len > SKB_SPAN_MAX {
        return Ok(SkbFields {
            len: read(skb, config!(layout.skb_len))?,
            dev: read(skb, config!(layout.skb_dev))?,
            head: read(skb, config!(layout.skb_head))?,
            network_header: read(skb, config!(layout.skb_network_header))?,
            tail: read(skb, config!(layout.skb_tail))?,
            data_len: read(skb, config!(layout.skb_data_len))?,
        });
    }
    let start = config!(skb_span_start);
    // SAFETY: copies `span_len <= SKB_SPAN_MAX` bytes (the size of `buf`) with fault handling.
    let ret = unsafe {
        generated::bpf_probe_read_kernel(
            buf.as_mut_ptr().cast(),
            span_len,
            (skb + u64::from(start)) as *const core::ffi::c_void,
        )
    };
    if ret != 0 {
        return Err(ret);
    }
    // Userspace made `start` 8-byte aligned and checked that every field is naturally aligned,
    // so each field lies inside one word of the copy.
    let word = |off: u32| -> Result<u64, i64> {
        let rel = off.wrapping_sub(start);
        let w = buf.get(rel as usize / 8).ok_or(-1i64)?;
        Ok(*w >> ((rel % 8) * 8))
    };
    Ok(SkbFields {
        len: word(config!(layout.skb_len))? as u32,
        dev: word(config!(layout.skb_dev))?,
        head: word(config!(layout.skb_head))?,
        network_header: word(config!(layout.skb_network_header))? as u16,
        tail: word(config!(layout.skb_tail))? as u32,
        data_len: word(config!(layout.skb_data_len))? as u32,
    })
}

/// The classic tracepoint's view of a drop: the trace record and the skb address in it.
struct TpSource<'a> {
    record: Record<'a>,
    skb: u64,
}

impl DropSource for TpSource<'_> {
    #[inline(always)]
    fn skb_fields(&self, scratch: &mut [u64; SKB_SPAN_WORDS]) -> Option<SkbFields> {
        if self.skb == 0 {
            return None;
        }
        read_skb(self.skb, scratch).ok()
    }

    #[inline(always)]
    fn netns(&self, dev: u64) -> Result<u32, i64> {
        let net: u64 = read(dev, config!(layout.dev_nd_net))?;
        if net == 0 {
            return Ok(0);
        }
        read(net, config!(layout.net_ns_inum))
    }

    #[inline(always)]
    fn ifindex(&self, dev: u64) -> u32 {
        read::<u32>(dev, config!(layout.dev_ifindex)).unwrap_or(0)
    }

    #[inline(always)]
    fn location(&self) -> u64 {
        self.record.u64_at(config!(layout.tp_location)).unwrap_or(0)
    }
}

fn try_kfree_skb(ctx: &TracePointContext) -> Result<u32, i64> {
    let record = Record::load(ctx);
    let tp_reason = config!(layout.tp_reason);
    let reason: u32 = if tp_reason == u32::MAX {
        reason_at(record.u64_at(config!(layout.tp_location)).unwrap_or(0))
    } else {
        match record.u32_at(tp_reason) {
            Ok(r) => r,
            Err(_) => {
                count_loss(loss::SKB_READ);
                return Ok(0);
            }
        }
    };
    if !reason_wanted(reason) {
        return Ok(0);
    }
    let skb = record.u64_at(config!(layout.tp_skbaddr)).unwrap_or(0);
    count_drop(ctx, &TpSource { record, skb }, reason)
}

/// The BTF tracepoint's arguments, loaded from the context with plain loads.
///
/// The verifier accepts context loads only at constant offsets, and a `match` on the index
/// with one load per arm does not survive LLVM (it sinks the loads into one at a computed
/// offset). So every argument below the count is loaded at its constant offset, as
/// [`Record::load`] does for the classic record, and fields are picked from the copy. CONFIG is
/// frozen read-only data, so the verifier knows the count and prunes the loads beyond it: no
/// index the function does not have is ever loaded.
struct BtfCtxArgs {
    args: [u64; BTF_ARGS_MAX as usize],
}

impl BtfCtxArgs {
    #[inline(always)]
    fn load(ctx: &BtfTracePointContext) -> Self {
        let nr_args = config!(btf_args.nr_args);
        let base = ctx.as_ptr() as *const u64;
        let mut args = [0u64; BTF_ARGS_MAX as usize];
        let mut i = 0;
        while i < BTF_ARGS_MAX as usize {
            if (i as u32) < nr_args {
                // SAFETY: the context of a BTF tracepoint is an array of one u64 per argument,
                // and `i` is below the argument count. Volatile keeps each load at its own
                // constant offset.
                args[i] = unsafe { core::ptr::read_volatile(base.add(i)) };
            }
            i += 1;
        }
        Self { args }
    }

    /// Argument `idx`, 0 if the tracepoint has no such argument ([`NO_ARG`] included).
    #[inline(always)]
    fn get(&self, idx: u32) -> u64 {
        self.args.get(idx as usize).copied().unwrap_or(0)
    }
}

/// A field of a kernel struct at `ptr`, loaded directly (here `struct sk_buff`, `struct
/// net_device`, `struct net`; in `connections`, `struct sock` and `struct sk_buff`).
///
/// `ptr` is a BTF pointer (a tp_btf argument, or a pointer loaded from one), and `off` a
/// known constant (frozen `.rodata`), so the verifier adds it to the pointer's offset, checks
/// that a field of that size sits there in the kernel's BTF, and turns the load into one that
/// reads 0 instead of faulting: no helper call.
#[inline(always)]
pub(crate) fn load<T>(ptr: u64, off: u32) -> T {
    // SAFETY: see above; the verifier checks the access against BTF and handles faults.
    unsafe { core::ptr::read_volatile((ptr as *const u8).add(off as usize).cast::<T>()) }
}

/// The BTF tracepoint's view of a drop: the `sk_buff` pointer and the location argument.
struct BtfSource {
    skb: u64,
    location: u64,
}

impl DropSource for BtfSource {
    #[inline(always)]
    fn skb_fields(&self, _scratch: &mut [u64; SKB_SPAN_WORDS]) -> Option<SkbFields> {
        let skb = self.skb;
        if skb == 0 {
            return None;
        }
        Some(SkbFields {
            len: load(skb, config!(layout.skb_len)),
            dev: load(skb, config!(layout.skb_dev)),
            head: load(skb, config!(layout.skb_head)),
            network_header: load(skb, config!(layout.skb_network_header)),
            tail: load(skb, config!(layout.skb_tail)),
            data_len: load(skb, config!(layout.skb_data_len)),
        })
    }

    #[inline(always)]
    fn netns(&self, dev: u64) -> Result<u32, i64> {
        let net: u64 = load(dev, config!(layout.dev_nd_net));
        if net == 0 {
            return Ok(0);
        }
        Ok(load(net, config!(layout.net_ns_inum)))
    }

    #[inline(always)]
    fn ifindex(&self, dev: u64) -> u32 {
        load(dev, config!(layout.dev_ifindex))
    }

    #[inline(always)]
    fn location(&self) -> u64 {
        self.location
    }
}

fn try_kfree_skb_btf(ctx: &BtfTracePointContext) -> Result<u32, i64> {
    // A kernel without the reason argument gets it from the caller, as the classic tracepoint
    // does on such kernels.
    let args = BtfCtxArgs::load(ctx);
    let reason = match config!(btf_args.reason) {
        NO_ARG => reason_at(args.get(config!(btf_args.location))),
        idx => args.get(idx) as u32,
    };
    if !reason_wanted(reason) {
        return Ok(0);
    }
    let skb = args.get(config!(btf_args.skb));
    let location = args.get(config!(btf_args.location));
    count_drop(ctx, &BtfSource { skb, location }, reason)
}

/// The reason of a drop freed from `location` on a kernel without drop reasons: the range in
/// [`LOCATIONS`] that holds it, else the table's `unmapped`.
#[inline(always)]
fn reason_at(location: u64) -> u32 {
    let len = locations!(len) as usize;
    // Raw pointers, not indexing: LLVM does not carry the loop bound into an index check,
    // and a panic path cannot be loaded at all.
    let ranges = (&raw const LOCATIONS.ranges).cast::<LocationRange>();
    let mut i = 0;
    while i < LOCATION_RANGES_MAX && i < len {
        // SAFETY: `i < LOCATION_RANGES_MAX` keeps the pointer inside the array of a plain,
        // always-initialised static. Volatile for the same reason as `config!`.
        let (start, end, reason) = unsafe {
            let r = ranges.add(i);
            (
                core::ptr::read_volatile(&raw const (*r).start),
                core::ptr::read_volatile(&raw const (*r).end),
                core::ptr::read_volatile(&raw const (*r).reason),
            )
        };
        if location >= start && location < end {
            return reason;
        }
        i += 1;
    }
    locations!(unmapped)
}

/// The reason filter; it comes first, so drops of other reasons cost nothing more.
#[inline(always)]
fn reason_wanted(reason: u32) -> bool {
    if config!(all_reasons) != 0 {
        return true;
    }
    if reason >= MAX_REASONS {
        return false;
    }
    let word = config!(reason_mask[(reason / 64) as usize]);
    word & (1u64 << (reason % 64)) != 0
}

/// The hot path shared by both programs, for a drop whose reason passed the filter: builds the
/// flow key, counts it and the per-reason total, and sends a sample for a new key.
#[inline(always)]
fn count_drop<C: EbpfContext, S: DropSource>(ctx: &C, src: &S, reason: u32) -> Result<u32, i64> {
    let mut key_slot = MaybeUninit::<FlowKey>::uninit();
    let key = new_key(&mut key_slot, reason);
    let mut extra = Extra::default();
    // A failed read leaves the key partially filled (family UNKNOWN): the packet still counts,
    // and the SKB_READ loss says its detail is missing.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Ok(0);
    };
    // SAFETY: this CPU's slot of the scratch array; tracing programs do not nest on one CPU, so
    // nothing else uses it meanwhile.
    let scratch = unsafe { &mut *scratch };
    let fields = src.skb_fields(&mut scratch.skb);
    let mut complete = fields.is_some();
    let (len, dev) = fields.as_ref().map_or((0, 0), |f| (f.len, f.dev));
    if dev != 0 {
        match src.netns(dev) {
            Ok(ns) => key.netns = ns,
            Err(_) => complete = false,
        }
    }
    // Filter before parsing headers: other namespaces cost as little as possible.
    let netns_filter = config!(netns_filter);
    if netns_filter != 0 && key.netns != netns_filter {
        return Ok(0);
    }
    // A header the packet does not hold is its own loss stage (the drop still counts, with
    // what was read before the cut); a failed read is SKB_READ.
    if let Some(f) = &fields
        && let Err(cut) = read_headers(f, &mut scratch.packet, key, &mut extra)
    {
        if cut == loss::SKB_READ {
            complete = false;
        } else {
            count_loss(cut);
        }
    }
    if !complete {
        count_loss(loss::SKB_READ);
    }

    let key: &FlowKey = key;
    let bytes = u64::from(len);
    // Flow entry first, then the total: see the module comment.
    if !(config_cache!(enabled) != 0 && count_cached(src, key, &extra, len, dev)) {
        count_in_flows(ctx, src, key, &extra, len, dev);
    }
    let last = config!(total_slots).clamp(1, MAX_REASONS) - 1;
    let slot = if reason < last { reason } else { last };
    if let Some(t) = TOTALS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
    Ok(0)
}

/// Counts a drop in the shared `FLOWS` map, with a sample when the key is new there.
#[inline(always)]
fn count_in_flows<C: EbpfContext, S: DropSource>(
    ctx: &C,
    src: &S,
    key: &FlowKey,
    extra: &Extra,
    len: u32,
    dev: u64,
) {
    let bytes = u64::from(len);
    match FLOWS.get_ptr_mut(key) {
        Some(v) => add(v, bytes),
        None => {
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            let value = FlowValue {
                packets: 1,
                bytes,
                created_ns: now,
            };
            match FLOWS.insert(key, &value, u64::from(BPF_NOEXIST)) {
                Ok(()) => send_sample(src, key, extra, len, dev, Some(now)),
                // Another CPU inserted the key between our lookup and insert: add to its entry.
                Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(key) {
                    Some(v) => add(v, bytes),
                    None => count_loss(loss::FLOW_INSERT),
                },
                Err(e) => {
                    count_loss(loss::FLOW_INSERT);
                    // Rare (an LRU map evicts rather than fails), so a log line per failure is
                    // affordable and says why, next to the counted loss.
                    aya_log_ebpf::warn!(ctx, "flow map insert failed: error {}", e);
                }
            }
        }
    }
}

/// 4-byte words of a [`FlowKey`].
const KEY_WORDS: usize = size_of::<FlowKey>() / 4;

/// 8-byte words of a [`CacheEntry`].
const ENTRY_WORDS: usize = size_of::<CacheEntry>() / 8;

/// A 64-bit hash of the key's words (multiply-xor rounds); never 0.
#[inline(always)]
fn key_hash(key: &FlowKey) -> u64 {
    const { assert!(KEY_WORDS == 11 && align_of::<FlowKey>() == 4) };
    const M: u64 = 0x9E37_79B9_7F4A_7C15;
    let w = (key as *const FlowKey).cast::<u32>();
    let mut h: u64 = 0x2545_F491_4F6C_DD1D;
    let mut i = 0;
    while i + 1 < KEY_WORDS {
        // SAFETY: `i + 1 < KEY_WORDS`: both words are inside the key.
        let x = unsafe { u64::from(*w.add(i)) | u64::from(*w.add(i + 1)) << 32 };
        h = (h ^ x).wrapping_mul(M);
        h ^= h >> 32;
        i += 2;
    }
    // SAFETY: the last word of the 11.
    h = (h ^ u64::from(unsafe { *w.add(KEY_WORDS - 1) })).wrapping_mul(M);
    h ^= h >> 29;
    h | 1
}

/// Whether two keys are equal: two likely-different words first, then word by word without
/// branches (LLVM would call `memcmp`).
#[inline(always)]
fn key_eq(a: *const FlowKey, b: &FlowKey) -> bool {
    let x = a.cast::<u32>();
    let y = (b as *const FlowKey).cast::<u32>();
    // First the words where two flows of one set most often differ: the port's (a scan) and
    // the last of the source address (many clients, an IPv4 source). A miss, which now reads
    // both lines of a set, mostly stops here.
    const { assert!(core::mem::offset_of!(FlowKey, dst_port) == 40) };
    // SAFETY: words 3 and 10 are inside both keys, as in the loop below.
    let quick = unsafe {
        (core::ptr::read_volatile(x.add(10)) ^ *y.add(10))
            | (core::ptr::read_volatile(x.add(3)) ^ *y.add(3))
    };
    if quick != 0 {
        return false;
    }
    let mut d = 0u32;
    let mut i = 0;
    while i < KEY_WORDS {
        // SAFETY: `i < KEY_WORDS`; `a` points into a live map value (read while its own CPU,
        // this one, cannot write it).
        d |= unsafe { core::ptr::read_volatile(x.add(i)) ^ *y.add(i) };
        i += 1;
    }
    d == 0
}

/// Counts a drop in this CPU's drop cache: adds to the key's line of its set, or installs the
/// key in the set's victim line (see [`CACHE_WAYS`]), flushing that line's previous key to the
/// log. Returns false, having changed nothing but the
/// `DROP_LOG_FULL` counter, when the drop must go to `FLOWS`: the log is full, or a map index is
/// out of range (the maps were sized for fewer CPUs). Userspace walks `FLOWS` only when that
/// counter moved, so every way into `FLOWS` counts it, before the `FLOWS` write.
///
/// Every store is volatile so the BPF code keeps program order, which the reader relies on (on
/// x86 the JIT and the CPU keep it too; userspace disables the cache elsewhere).
#[inline(always)]
fn count_cached<S: DropSource>(src: &S, key: &FlowKey, extra: &Extra, len: u32, dev: u64) -> bool {
    let h = key_hash(key);
    // SAFETY: helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // Checked here, not only by the loader, so that the shifts below are always defined.
    let bits = config_cache!(line_bits);
    let bits = if bits == 0 || bits > CACHE_TAG_LINE_BITS {
        1
    } else {
        bits
    };
    // The set from the top bits of the last multiply, the best mixed; its lines are `first`
    // and `first | 1`.
    const { assert!(CACHE_WAYS == 2) };
    let first = (h >> (64 - bits)) as u32 & !(CACHE_WAYS - 1);
    let base = cpu.wrapping_shl(bits);
    let mask = config_cache!(log_mask);
    let Some(st) = DROP_CPU.get_ptr_mut(cpu) else {
        count_loss(loss::DROP_LOG_FULL);
        return false;
    };
    let (Some(a), Some(b)) = (
        DROP_CACHE.get_ptr_mut(base.wrapping_add(first)),
        DROP_CACHE.get_ptr_mut(base.wrapping_add(first | 1)),
    ) else {
        count_loss(loss::DROP_LOG_FULL);
        return false;
    };
    // SAFETY (this block and below): `st`, `a` and `b` belong to this CPU, which is the only
    // writer, and tracing programs do not nest on one CPU. Userspace only reads them (`tail`
    // aside).
    unsafe {
        let thrash = core::ptr::read_volatile(&raw const (*st).thrash);
        if thrash >= THRASH_ENTER {
            let head = core::ptr::read_volatile(&raw const (*st).head);
            if head % THRASH_PROBE_EVERY != 0 {
                if !log_one_shot(st, cpu, mask, key, len) {
                    return false;
                }
                return sample_install(src, st, key, extra, len, dev, h);
            }
        }
        // The second line is read only when the first does not hold the key: a set's first
        // key takes the first line, so at low load most drops touch one line, and with
        // thousands of flows the lines they touch are half as many (each one a cache miss
        // once they outgrow the CPU's caches).
        let pa = core::ptr::read_volatile(&raw const (*a).packets);
        let mut pb = 0;
        let hit = if pa != 0 && key_eq(&raw const (*a).key, key) {
            Some((a, pa))
        } else {
            pb = core::ptr::read_volatile(&raw const (*b).packets);
            if pb != 0 && key_eq(&raw const (*b).key, key) {
                Some((b, pb))
            } else {
                None
            }
        };
        if let Some((e, packets)) = hit {
            if thrash != 0 {
                let t = thrash.saturating_sub(THRASH_HIT_WEIGHT);
                core::ptr::write_volatile(&raw mut (*st).thrash, t);
            }
            // A hit changes neither key nor tag, so it needs no sequence bracket: a reader
            // that sees the new packets but the old bytes reads the bytes next time.
            core::ptr::write_volatile(&raw mut (*e).packets, packets + 1);
            let bytes = core::ptr::read_volatile(&raw const (*e).bytes);
            core::ptr::write_volatile(&raw mut (*e).bytes, bytes + u64::from(len));
            let c = core::ptr::read_volatile(&raw const (*st).counted);
            core::ptr::write_volatile(&raw mut (*st).counted, c + 1);
            return true;
        }
        // An empty line, else the one with fewer packets (the second on a tie): the set keeps
        // its busiest key while a scan churns through the other line. (A long-idle busy key
        // keeps its line too: the set then works as one line, as every line did before.)
        let (e, line, packets) = if pa == 0 {
            (a, first, 0)
        } else if pb == 0 || pb <= pa {
            (b, first | 1, pb)
        } else {
            (a, first, pa)
        };
        let seq = core::ptr::read_volatile(&raw const (*st).seq);
        let mut wake = false;
        if packets != 0 {
            let head = core::ptr::read_volatile(&raw const (*st).head);
            let tail = core::ptr::read_volatile(&raw const (*st).tail);
            if head.wrapping_sub(tail) > u64::from(mask) {
                count_loss(loss::DROP_LOG_FULL);
                return false;
            }
            let idx = cpu
                .wrapping_mul(mask.wrapping_add(1))
                .wrapping_add(head as u32 & mask);
            let Some(r) = DROP_LOG.get_ptr_mut(idx) else {
                count_loss(loss::DROP_LOG_FULL);
                return false;
            };
            core::ptr::write_volatile(&raw mut (*st).seq, seq + 1);
            let from = e.cast::<u64>();
            let to = r.cast::<u64>();
            let mut i = 0;
            while i < ENTRY_WORDS {
                // SAFETY: `i < ENTRY_WORDS`: inside both 64-byte, 8-byte aligned values.
                core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
                i += 1;
            }
            core::ptr::write_volatile(&raw mut (*st).head, head + 1);
            // Once per filling: the count of unread records passes the mark one at a time.
            wake = (head + 1).wrapping_sub(tail) == u64::from((mask >> 2) + 1);
        } else {
            core::ptr::write_volatile(&raw mut (*st).seq, seq + 1);
        }
        let tag = core::ptr::read_volatile(&raw const (*e).tag);
        // The install count skips 0 when it wraps, so that no line is ever tagged
        // CACHE_ONE_SHOT_TAG.
        let installs = (tag >> CACHE_TAG_LINE_BITS).wrapping_add(1) << CACHE_TAG_LINE_BITS;
        let installs = if installs == 0 {
            1 << CACHE_TAG_LINE_BITS
        } else {
            installs
        };
        let next = installs | line;
        let kw = (&raw mut (*e).key).cast::<u32>();
        let src_words = (key as *const FlowKey).cast::<u32>();
        let mut i = 0;
        while i < KEY_WORDS {
            // SAFETY: `i < KEY_WORDS`: inside both keys.
            core::ptr::write_volatile(kw.add(i), *src_words.add(i));
            i += 1;
        }
        core::ptr::write_volatile(&raw mut (*e).tag, next);
        core::ptr::write_volatile(&raw mut (*e).bytes, u64::from(len));
        core::ptr::write_volatile(&raw mut (*e).packets, 1);
        core::ptr::write_volatile(&raw mut (*st).seq, seq + 2);
        let c = core::ptr::read_volatile(&raw const (*st).counted);
        core::ptr::write_volatile(&raw mut (*st).counted, c + 1);
        if thrash < THRASH_MAX {
            core::ptr::write_volatile(&raw mut (*st).thrash, thrash + 1);
        }
        if wake {
            // A full wake ring means the reader has wake-ups pending already.
            let _ = DROP_LOG_WAKE.output::<u32>(cpu, u64::from(BPF_RB_FORCE_WAKEUP));
        }
    }
    sample_install(src, st, key, extra, len, dev, h)
}

/// After a drop counted by installing its key (or past the cache, see [`log_one_shot`]): sends
/// a sample of it unless the CPU's budget is spent or the key's fingerprint is in its filter
/// slot. Returns true (the drop is counted either way).
#[inline(always)]
fn sample_install<S: DropSource>(
    src: &S,
    st: *mut CpuState,
    key: &FlowKey,
    extra: &Extra,
    len: u32,
    dev: u64,
    h: u64,
) -> bool {
    // The budget before the filter: the filter is a load at a random slot of 16 KiB, a cache
    // miss on nearly every install when thousands of flows churn through the cache (the
    // costliest load of that path in a perf profile), and once the budget is spent no sample
    // would be sent anyway. `samples` and `skips` share the line the install just wrote.
    // SAFETY: this CPU's state; `sample_limit` is userspace's, read only.
    let (sent, limit) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*st).samples),
            core::ptr::read_volatile(&raw const (*st).sample_limit),
        )
    };
    if sent >= limit {
        // SAFETY: this CPU's state, written only by this CPU's program.
        unsafe {
            let skips = core::ptr::read_volatile(&raw const (*st).sample_skips);
            core::ptr::write_volatile(&raw mut (*st).sample_skips, skips + 1);
        }
        return true;
    }
    if let Some(f) = SAMPLED.get_ptr_mut(0) {
        let slot = ((h >> 32) as u32 & (SAMPLE_FILTER_SLOTS - 1)) as usize;
        let fp = h as u32 | 1;
        // SAFETY: this CPU's filter; the mask keeps the index in bounds.
        let known = unsafe { &mut (*f).fingerprints[slot] };
        if *known != fp {
            // SAFETY: this CPU's state, written only by this CPU's program.
            unsafe { core::ptr::write_volatile(&raw mut (*st).samples, sent + 1) };
            // Set whether or not the ring has room: a full ring is a counted loss, and
            // retrying on every install would contend for the ring's lock.
            *known = fp;
            send_sample(src, key, extra, len, dev, None);
        }
    }
    true
}

/// Counts one drop past the cache: a flush-log record of `key` with one packet, tagged
/// [`CACHE_ONE_SHOT_TAG`]. No line changes, so no sequence bracket: the record is complete
/// before `head` moves past it, which is all the reader relies on. False, with
/// `DROP_LOG_FULL` counted, if the log is full (the caller then counts in `FLOWS`).
#[inline(always)]
fn log_one_shot(st: *mut CpuState, cpu: u32, mask: u32, key: &FlowKey, len: u32) -> bool {
    // SAFETY: this CPU's state and log slots (see `count_cached`); the slot at `head` is not
    // the reader's until `head` moves past it.
    unsafe {
        let head = core::ptr::read_volatile(&raw const (*st).head);
        let tail = core::ptr::read_volatile(&raw const (*st).tail);
        if head.wrapping_sub(tail) > u64::from(mask) {
            count_loss(loss::DROP_LOG_FULL);
            return false;
        }
        let idx = cpu
            .wrapping_mul(mask.wrapping_add(1))
            .wrapping_add(head as u32 & mask);
        let Some(r) = DROP_LOG.get_ptr_mut(idx) else {
            count_loss(loss::DROP_LOG_FULL);
            return false;
        };
        let kw = (&raw mut (*r).key).cast::<u32>();
        let src_words = (key as *const FlowKey).cast::<u32>();
        let mut i = 0;
        while i < KEY_WORDS {
            // SAFETY: `i < KEY_WORDS`: inside both keys.
            core::ptr::write_volatile(kw.add(i), *src_words.add(i));
            i += 1;
        }
        core::ptr::write_volatile(&raw mut (*r).tag, CACHE_ONE_SHOT_TAG);
        core::ptr::write_volatile(&raw mut (*r).packets, 1);
        core::ptr::write_volatile(&raw mut (*r).bytes, u64::from(len));
        core::ptr::write_volatile(&raw mut (*st).head, head + 1);
        if (head + 1).wrapping_sub(tail) == u64::from((mask >> 2) + 1) {
            // A full wake ring means the reader has wake-ups pending already.
            let _ = DROP_LOG_WAKE.output::<u32>(cpu, u64::from(BPF_RB_FORCE_WAKEUP));
        }
    }
    true
}

/// A flow key that is all zeroes but `reason`, in `slot`.
///
/// Built with one volatile store per 4-byte word: zeroing the key any other way
/// (`FlowKey::default()`, `mem::zeroed`) becomes a call to a byte-by-byte `memset` in the
/// object, about 180 instructions per drop, and LLVM would merge plain stores back into it.
#[inline(always)]
fn new_key(slot: &mut MaybeUninit<FlowKey>, reason: u32) -> &mut FlowKey {
    const WORDS: usize = size_of::<FlowKey>() / 4;
    const { assert!(size_of::<FlowKey>() % 4 == 0 && align_of::<FlowKey>() == 4) };
    let words = slot.as_mut_ptr().cast::<u32>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: `i < WORDS` keeps the store inside the key, whose 4-byte alignment was
        // checked above.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written above, and all-zero bytes are a valid FlowKey (integers
    // and integer arrays only).
    let key = unsafe { slot.assume_init_mut() };
    key.reason = reason;
    key
}

/// Adds one packet of `bytes` to a flow entry that other CPUs may be adding to as well.
#[inline(always)]
fn add(v: *mut FlowValue, bytes: u64) {
    // SAFETY: pointer to the value of a live map entry, 8-byte aligned (the kernel aligns map
    // values to 8). The results are unused, so these compile to the plain atomic add every
    // kernel accepts (BPF_XADD), not the fetching form that needs 5.12.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*v).bytes, bytes);
    }
}

/// Bytes of the packet copied with the first read from the network header: the fixed IPv4 or
/// IPv6 header plus the transport fields the key needs, for all but unusual packets (long IPv4
/// options, IPv6 extension headers).
const HEADER_BYTES: usize = 64;

/// 8-byte words of the header copy.
const HEADER_WORDS: usize = HEADER_BYTES / 8;

/// 8-byte words of the header buffer: the copy plus slack for the largest [`Packet::get`]
/// (16 bytes), so that an index masked to the copy plus that read stays inside the buffer.
const PACKET_WORDS: usize = HEADER_WORDS + 2;

/// Why parsing stopped before the flow key was complete: the `loss::*` slot to count.
type Cut = u32;

/// The packet from its network header on: a copy of its first bytes (at most [`HEADER_BYTES`])
/// and helper reads for anything beyond, every read bounded by what this packet holds.
///
/// The copy lives in per-CPU scratch memory that earlier packets used too, so only its first
/// `copied` bytes belong to this packet; nothing at or beyond is ever looked at. That is
/// cheaper than zeroing the buffer on every drop and just as safe.
struct Packet<'a> {
    l3: u64,
    buf: &'a [u64; PACKET_WORDS],
    /// Bytes of `buf` copied from this packet: `min(linear, HEADER_BYTES)`.
    copied: u32,
    /// Bytes from the network header to the end of the linear data (`skb->tail`). Bytes past
    /// it are stale memory of the buffer, or live in page fragments: never read.
    linear: u32,
    /// Bytes the IP header says the packet has from the network header on (total length),
    /// `u32::MAX` until known. Link-layer padding past it is not packet data.
    declared: u32,
    /// The skb has page fragments: a header past `linear` may still be in the packet.
    fragmented: bool,
}

impl<'a> Packet<'a> {
    /// Copies the first bytes of the packet at `l3`, which has `linear` bytes of linear data.
    #[inline(always)]
    fn load(
        l3: u64,
        linear: u32,
        fragmented: bool,
        buf: &'a mut [u64; PACKET_WORDS],
    ) -> Result<Self, Cut> {
        let copied = if linear < HEADER_BYTES as u32 {
            linear
        } else {
            HEADER_BYTES as u32
        };
        // SAFETY: copies `copied <= HEADER_BYTES` bytes (the size of `buf`) with fault
        // handling; the source lies inside the skb's linear data.
        let ret = unsafe {
            generated::bpf_probe_read_kernel(
                buf.as_mut_ptr().cast::<core::ffi::c_void>(),
                copied,
                l3 as *const core::ffi::c_void,
            )
        };
        if ret != 0 {
            return Err(loss::SKB_READ);
        }
        Ok(Self {
            l3,
            buf,
            copied,
            linear,
            declared: u32::MAX,
            fragmented,
        })
    }

    /// Checks that the packet holds its first `end` bytes, and says why not.
    #[inline(always)]
    fn need(&self, end: u32) -> Result<(), Cut> {
        if end > self.declared {
            return Err(loss::TRUNCATED_HEADER);
        }
        if end > self.linear {
            return Err(if self.fragmented {
                loss::HEADER_NOT_LINEAR
            } else {
                loss::TRUNCATED_HEADER
            });
        }
        Ok(())
    }

    /// Word `I` of the copy (bytes `8 * I..8 * I + 8`, little-endian). The caller has checked
    /// with [`Packet::need`] that the packet holds those bytes.
    #[inline(always)]
    fn word<const I: usize>(&self) -> u64 {
        const { assert!(I < HEADER_WORDS) };
        self.buf[I]
    }

    /// `N` bytes at `off` from the network header, if the packet holds them.
    #[inline(always)]
    fn get<const N: usize>(&self, off: u32) -> Result<[u8; N], Cut> {
        // Offsets stay below 64 KiB (the largest extension-header chain the loop can follow is
        // a few KiB), so this cannot overflow.
        let end = off + N as u32;
        self.need(end)?;
        const { assert!(N <= (PACKET_WORDS - HEADER_WORDS) * 8) };
        // SAFETY: [u64; PACKET_WORDS] and [u8; PACKET_WORDS * 8] have the same size, and u8
        // has no alignment or validity requirements.
        let bytes =
            unsafe { &*(self.buf as *const [u64; PACKET_WORDS]).cast::<[u8; PACKET_WORDS * 8]>() };
        if end <= self.copied {
            // `end <= copied <= HEADER_BYTES`, so the mask changes nothing. It is for older
            // verifiers (5.10), which cannot prune a branch that compares a constant with a
            // range: given the bounds check of `off..end` they follow `off <= HEADER_BYTES - N`
            // into paths where `off` is known larger, and reject the contradictory offset.
            // Masked, the index is in bounds with the slack, so no such check is emitted; the
            // volatile read keeps LLVM from proving the mask redundant and dropping it.
            // SAFETY: reads a local.
            let i = unsafe { core::ptr::read_volatile(&off) } as usize & (HEADER_BYTES - 1);
            if let Some(b) = bytes.get(i..i + N)
                && let Ok(a) = <[u8; N]>::try_from(b)
            {
                return Ok(a);
            }
        }
        read(self.l3, off).map_err(|_| loss::SKB_READ)
    }
}

/// Fills addresses, protocol and port from the packet headers; stops at the first cut, leaving
/// what it found so far in the key.
#[inline(always)]
fn read_headers(
    f: &SkbFields,
    buf: &mut [u64; PACKET_WORDS],
    key: &mut FlowKey,
    extra: &mut Extra,
) -> Result<(), Cut> {
    let nh = u32::from(f.network_header);
    // `(typeof(skb->network_header))~0U` marks an unset header: nothing more to learn.
    if f.head == 0 || f.network_header == u16::MAX {
        return Ok(());
    }
    let fragmented = f.data_len != 0;
    // A network header at or past the end of the linear data: no L3 bytes to look at.
    if f.tail <= nh {
        return if fragmented {
            Err(loss::HEADER_NOT_LINEAR)
        } else {
            Ok(())
        };
    }
    let l3 = f.head + u64::from(nh);
    let mut p = Packet::load(l3, f.tail - nh, fragmented, buf)?;
    parse_ip(&mut p, key, extra)
}

/// Stores an IPv4 address (its 4 bytes in network order, as loaded) IPv4-mapped.
#[inline(always)]
fn set_v4(addr: &mut [u8; 16], a: u32) {
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..16].copy_from_slice(&a.to_le_bytes());
}

/// Stores an IPv6 address from its two 8-byte words, as loaded.
#[inline(always)]
fn set_v6(addr: &mut [u8; 16], lo: u64, hi: u64) {
    addr[..8].copy_from_slice(&lo.to_le_bytes());
    addr[8..].copy_from_slice(&hi.to_le_bytes());
}

/// The IPv6 extension headers the parser follows to reach the transport header.
#[inline(always)]
fn is_ext_header(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

/// Parses the IPv4/IPv6 header, then the transport header. Every length a header declares is
/// checked against what the packet holds before anything past it is read.
#[inline(always)]
fn parse_ip(p: &mut Packet, key: &mut FlowKey, extra: &mut Extra) -> Result<(), Cut> {
    // The version nibble needs one byte, which `read_headers` made sure of.
    // Byte `i` of the header is byte `i % 8` of word `i / 8` (bpfel: little-endian loads).
    let w0 = p.word::<0>();
    let byte0 = w0 as u8;
    let (proto, l4_off) = match byte0 >> 4 {
        4 => {
            p.need(20)?;
            let w1 = p.word::<1>();
            // Source address: bytes 12..16; destination: bytes 16..20; protocol: byte 9.
            set_v4(&mut key.src_addr, (w1 >> 32) as u32);
            set_v4(&mut key.dst_addr, p.word::<2>() as u32);
            let proto = (w1 >> 8) as u8;
            key.family = family::INET;
            key.protocol = proto;
            // Total length: bytes 2..4. 0 is a GSO packet over 64 KiB (BIG TCP): unknown.
            let total = u32::from((w0 >> 16) as u8) << 8 | u32::from((w0 >> 24) as u8);
            if total != 0 {
                p.declared = total;
            }
            let ihl = u32::from(byte0 & 0x0f) * 4;
            if ihl < 20 {
                return Err(loss::TRUNCATED_HEADER);
            }
            // The options must be in the packet too: the transport header starts after them.
            p.need(ihl)?;
            // Non-first fragments carry no transport header: flags/offset are bytes 6..8.
            let frag = u16::from((w0 >> 48) as u8 & 0x1f) << 8 | u16::from((w0 >> 56) as u8);
            if frag != 0 {
                return Ok(());
            }
            (proto, ihl)
        }
        6 => {
            p.need(40)?;
            // Source address: bytes 8..24; destination: bytes 24..40; next header: byte 6.
            set_v6(&mut key.src_addr, p.word::<1>(), p.word::<2>());
            set_v6(&mut key.dst_addr, p.word::<3>(), p.word::<4>());
            key.family = family::INET6;
            // Payload length: bytes 4..6. 0 is a jumbogram (BIG TCP): unknown.
            let payload = u32::from((w0 >> 32) as u8) << 8 | u32::from((w0 >> 40) as u8);
            if payload != 0 {
                p.declared = 40 + payload;
            }
            let mut next = (w0 >> 48) as u8;
            let mut off: u32 = 40;
            for _ in 0..MAX_EXT_HEADERS {
                if !is_ext_header(next) {
                    break;
                }
                // One read per header: every extension header is at least 8 bytes, and its
                // first 4 hold what is needed (next header, length; fragment offset).
                let e: [u8; 4] = p.get(off)?;
                let this = next;
                next = e[0];
                off += match this {
                    IPPROTO_AH => (u32::from(e[1]) + 2) * 4,
                    IPPROTO_FRAGMENT => {
                        // A non-first fragment carries no transport header.
                        if (u16::from(e[2]) << 8 | u16::from(e[3])) >> 3 != 0 {
                            key.protocol = next;
                            return Ok(());
                        }
                        8
                    }
                    _ => (u32::from(e[1]) + 1) * 8,
                };
            }
            key.protocol = next;
            if is_ext_header(next) {
                return Err(loss::IPV6_EXT_HEADERS_EXCEEDED);
            }
            (next, off)
        }
        _ => return Ok(()),
    };
    match proto {
        IPPROTO_TCP => {
            // Ports, data offset (byte 12) and flags (byte 13) of the fixed header; the header
            // must be as long as its data offset says (5 words at least).
            let t: [u8; 14] = p.get(l4_off)?;
            let doff = u32::from(t[12] >> 4) * 4;
            if doff < 20 {
                return Err(loss::TRUNCATED_HEADER);
            }
            p.need(l4_off + doff)?;
            extra.src_port = u16::from_be_bytes([t[0], t[1]]);
            key.dst_port = u16::from_be_bytes([t[2], t[3]]);
            extra.tcp_flags = t[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            // The whole fixed header: 8 bytes for UDP, 12 for SCTP's common header.
            p.need(l4_off + if proto == IPPROTO_UDP { 8 } else { 12 })?;
            let t: [u8; 4] = p.get(l4_off)?;
            extra.src_port = u16::from_be_bytes([t[0], t[1]]);
            key.dst_port = u16::from_be_bytes([t[2], t[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // Type, code, checksum and the 4 bytes every message has, as the kernel pulls them.
            p.need(l4_off + 8)?;
            let t: [u8; 2] = p.get(l4_off)?;
            key.dst_port = u16::from(t[0]) << 8 | u16::from(t[1]);
        }
        _ => {}
    }
    Ok(())
}

/// Sends the detail of a newly inserted key; a full ring buffer is a counted loss. `ts` is the
/// drop's time if the caller has read the clock, else it is read here, only once the ring has
/// taken the record (a clock read costs about as much as the rest of a cache hit).
#[inline(always)]
fn send_sample<S: DropSource>(
    src: &S,
    key: &FlowKey,
    extra: &Extra,
    len: u32,
    dev: u64,
    ts: Option<u64>,
) {
    let Some(mut entry) = SAMPLES.reserve::<SampleEvent>(0) else {
        count_loss(loss::RINGBUF_FULL);
        return;
    };
    // SAFETY: helper without preconditions.
    let ts = ts.unwrap_or_else(|| unsafe { bpf_ktime_get_ns() });
    let location = src.location();
    let ifindex = if dev == 0 { 0 } else { src.ifindex(dev) };
    entry.write(SampleEvent {
        ts_ns: ts,
        location,
        key: *key,
        ifindex,
        len,
        src_port: extra.src_port,
        tcp_flags: extra.tcp_flags,
        _pad: 0,
    });
    entry.submit(0);
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
