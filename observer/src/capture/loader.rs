//! Loading and attaching the kernel program.

use std::os::fd::AsFd;

use aya::maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use observer_ebpf::{
    BtfArgs, CACHE_LINES_MAX, CACHE_WAYS, CacheConfig, CacheEntry, Counter, CpuState, FlowKey,
    FlowValue, KernelLayout, LocationTable, MAX_REASONS, ProgramConfig, SKB_SPAN_MAX, loss,
};

use super::batch::Batch;
use super::btf::KernelBtf;
use super::cache::{CacheHandle, CacheReader, Mmap, Regions};
use super::drain::DrainState;
use super::location::{self, ReasonSource};
use super::recursion::RecursionMisses;
use super::startup::{self, Refused};
use super::tracefs::{self, KfreeSkbFields, ReasonTable, reason_label};
use super::{
    AttachKind, AttachMode, CaptureConfig, CaptureError, DrainReport, FlowDrop, ReasonFilter,
    Sample, decode,
};

/// Name of the classic tracepoint program in the object.
const TRACEPOINT_PROGRAM: &str = "kfree_skb";
/// Name of the BTF-enabled raw tracepoint program in the object.
const BTF_PROGRAM: &str = "kfree_skb_btf";

/// The object built by `observer/build.rs` (aya-build) from `observer-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/deny-observer-ebpf"));

/// The attached `skb:kfree_skb` program and its maps. Dropping it detaches the program.
pub struct Capture {
    // Owns the program (and with it the attachment); maps are taken out of it below.
    _ebpf: Ebpf,
    pub(super) flows: HashMap<MapData, FlowKey, FlowValue>,
    pub(super) totals: PerCpuArray<MapData, Counter>,
    pub(super) losses: PerCpuArray<MapData, u64>,
    samples: RingBuf<MapData>,
    pub(super) reasons: ReasonTable,
    pub(super) state: DrainState,
    pub(super) capacity: u32,
    pub(super) idle_drains: u32,
    /// Batch lookups work on this kernel (cleared on the first failure).
    pub(super) use_batch: bool,
    pub(super) flow_batch: Batch,
    pub(super) totals_batch: Batch,
    pub(super) losses_batch: Batch,
    /// Reused buffer of flow entries.
    pub(super) scratch: Vec<(FlowKey, FlowValue)>,
    /// Forwards the kernel program's aya-log records to `log` (and so to tracing); `None` when
    /// the object has no log map.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Ring-buffer records of the wrong size, since the last [`Capture::take_bad_samples`].
    bad_samples: u64,
    /// The hook the program is attached to.
    attach_kind: AttachKind,
    /// Where the drop reasons come from.
    reason_source: ReasonSource,
    /// Configured reasons this kernel does not have (see [`ReasonSelection::unavailable`]).
    unavailable_reasons: Vec<String>,
    /// The attached program's recursion misses; `None` if its descriptor could not be
    /// duplicated.
    pub(super) recursion: Option<RecursionMisses>,
    /// Accepted-connection counting; `None` when disabled.
    connections: Option<super::connections::ConnectionCapture>,
    /// The drop cache's reader; `None` when the cache is disabled.
    pub(super) cache: Option<CacheHandle>,
    /// Reused buffer of drop-cache deltas.
    pub(super) cache_scratch: Vec<(FlowKey, Counter)>,
    /// The last drain's `drops` buffer, empty, for the next drain (see [`Capture::recycle`]).
    pub(super) drops_scratch: Vec<FlowDrop>,
    /// The last drain's samples buffer, empty (see [`Capture::recycle`]).
    samples_scratch: Vec<Sample>,
    /// [`super::cache::ReaderStats::sample_skips`] at the last drain, added to the `LOSSES`
    /// slot of `sample_budget` (the cache counts its skips on its own per-CPU line).
    pub(super) cache_sample_skips: u64,
    /// Drop-cache lines per CPU and flush records read so far (see [`DropCacheStats`]).
    pub(super) cache_stats: DropCacheStats,
    /// `DROP_LOG_FULL` summed over CPUs when the drain last asked whether to walk `FLOWS`.
    pub(super) log_full_walked: u64,
}

/// The drop cache's size and traffic, for tests and debugging.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCacheStats {
    /// Lines of each CPU's cache after the memory cap (see [`super::CaptureConfig`]).
    pub lines_per_cpu: u32,
    /// Flush records read from the logs since the program was loaded, one per eviction of a
    /// flow from its line: with a cache large enough for the flows, far fewer than the drops.
    pub flush_records: u64,
    /// Of those, records of one drop each, written past the cache while a CPU's cache thrashed
    /// (every probe missing: more flows per CPU than it has lines).
    pub one_shot_records: u64,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("capacity", &self.capacity)
            .field("reasons", &self.reasons.len())
            .field("attach_kind", &self.attach_kind)
            .finish_non_exhaustive()
    }
}

/// Drop-reason names of the running kernel: the format file's `__print_symbolic` list, else
/// the BTF enum `skb_drop_reason`; kernels without a `reason` field get the call-site reasons
/// of [`location::reason_table`].
pub fn kernel_reasons(
    fmt: &tracefs::TracepointFormat,
    fields: &KfreeSkbFields,
    btf: &KernelBtf,
) -> Result<ReasonTable, CaptureError> {
    if fields.reason.is_none() {
        return Ok(location::reason_table());
    }
    if let Some(t) = tracefs::parse_reason_symbols(&fmt.print_fmt) {
        return Ok(t);
    }
    let values = btf.enum_values("skb_drop_reason")?;
    Ok(ReasonTable::from_kernel_names(
        values.iter().map(|(n, v)| (*v, n.as_str())),
    ))
}

/// The program's call-site table on a kernel without drop reasons (an empty one otherwise),
/// and where reasons come from. Unreadable symbols are not fatal: the drops still count, as
/// `not_specified`, and the log says what is missing.
fn call_site_reasons(
    fields: &KfreeSkbFields,
    reasons: &ReasonTable,
) -> (LocationTable, ReasonSource) {
    if fields.reason.is_some() {
        return (LocationTable::EMPTY, ReasonSource::Kernel);
    }
    match location::load_location_table(std::path::Path::new(location::KALLSYMS), reasons) {
        Ok((table, left_out)) => {
            if !left_out.is_empty() {
                tracing::warn!(
                    ?left_out,
                    "more kfree_skb callers than the program's table holds; their drops count as not_specified"
                );
            }
            tracing::info!(
                functions = ?location::describe(&table, reasons),
                "this kernel has no drop reasons (< 5.17): reasons come from the caller of kfree_skb"
            );
            (
                table,
                ReasonSource::CallSite {
                    functions: table.len,
                },
            )
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "this kernel has no drop reasons (< 5.17) and its symbols cannot be read: every drop counts as not_specified (add CAP_SYSLOG to attribute netfilter and tc drops)"
            );
            let unmapped = reasons.number(location::UNMAPPED).unwrap_or(0);
            (
                LocationTable {
                    unmapped,
                    ..LocationTable::EMPTY
                },
                ReasonSource::Unavailable,
            )
        }
    }
}

/// What the program filters on, from a [`ReasonFilter`].
#[derive(Debug)]
pub struct ReasonSelection {
    /// 1: count every reason (the mask is unused).
    pub all_reasons: u32,
    /// One bit per reason number to count.
    pub mask: [u64; (MAX_REASONS / 64) as usize],
    /// Listed reasons this kernel does not have but some kernel does (a reason newer than
    /// this kernel, or any kernel reason before 5.17, which has only call-site labels): not
    /// counted here, reported instead of refused, so that one DaemonSet configuration runs on
    /// every node's kernel.
    pub unavailable: Vec<String>,
}

/// Turns a [`ReasonFilter`] into the program's reason filter.
///
/// A name no kernel has is a typo, and an error; so is a list of which this kernel has none
/// (the node would count nothing). Names only other kernels have go to
/// [`ReasonSelection::unavailable`].
pub fn reason_mask(
    filter: &ReasonFilter,
    table: &ReasonTable,
) -> Result<ReasonSelection, CaptureError> {
    let mut mask = [0u64; (MAX_REASONS / 64) as usize];
    let names = match filter {
        ReasonFilter::All => {
            return Ok(ReasonSelection {
                all_reasons: 1,
                mask,
                unavailable: Vec::new(),
            });
        }
        ReasonFilter::Names(names) => names,
    };
    if names.is_empty() {
        return Err(CaptureError::Config(
            "the reason filter lists no reasons; use ReasonFilter::All to count every reason"
                .to_owned(),
        ));
    }
    let mut unknown = Vec::new();
    let mut unavailable = Vec::new();
    for name in names {
        match table.number(name) {
            Some(n) if n < MAX_REASONS => {
                if let Some(w) = mask.get_mut((n / 64) as usize) {
                    *w |= 1u64 << (n % 64);
                }
            }
            Some(n) => {
                return Err(CaptureError::ReasonOutOfRange {
                    name: name.clone(),
                    number: n,
                    max: MAX_REASONS,
                });
            }
            None => {
                let label = reason_label(name);
                if super::known_reasons::is_upstream(&label) {
                    unavailable.push(label);
                } else {
                    unknown.push(name.clone());
                }
            }
        }
    }
    if unknown.is_empty() && mask.iter().all(|w| *w == 0) {
        unknown = unavailable.clone();
    }
    if !unknown.is_empty() {
        let valid = table
            .iter()
            .map(|(_, l)| l.as_ref())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(CaptureError::UnknownReasons { unknown, valid });
    }
    unavailable.sort();
    unavailable.dedup();
    Ok(ReasonSelection {
        all_reasons: 0,
        mask,
        unavailable,
    })
}

fn validate(config: &CaptureConfig) -> Result<(), CaptureError> {
    if config.flow_map_entries == 0 {
        return Err(CaptureError::Config(
            "flow_map_entries must be at least 1".to_owned(),
        ));
    }
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let rb = config.ringbuf_bytes;
    if !rb.is_power_of_two() || !rb.is_multiple_of(page) {
        return Err(CaptureError::Config(format!(
            "ringbuf_bytes {rb} must be a power of two and a multiple of the page size {page}"
        )));
    }
    let lr = config.drop_log_records;
    if lr != 0 && (!lr.is_power_of_two() || lr > 1 << 20) {
        return Err(CaptureError::Config(format!(
            "drop_log_records {lr} must be 0 or a power of two up to 1048576"
        )));
    }
    let cl = config.drop_cache_lines;
    if !cl.is_power_of_two() || !(CACHE_WAYS..=CACHE_LINES_MAX).contains(&cl) {
        return Err(CaptureError::Config(format!(
            "drop_cache_lines {cl} must be a power of two from {CACHE_WAYS} to {CACHE_LINES_MAX}"
        )));
    }
    Ok(())
}

/// All CPUs' flush logs together stay within this, and so do all CPUs' caches: both are
/// mapped into the daemon, and on a node with many CPUs the configured per-CPU sizes would
/// otherwise dominate its memory. A smaller log only sends more drops to the flow map when
/// the reader falls behind; a smaller cache sends the reader more flush records.
const DROP_CACHE_TOTAL_BYTES: u64 = 16 << 20;

/// Entries of 64 bytes per CPU: `wanted`, capped by [`DROP_CACHE_TOTAL_BYTES`] over the CPUs
/// (a power of two, at least `floor`).
fn per_cpu_entries(wanted: u32, nr_cpus: u32, floor: u32) -> u32 {
    let entry = std::mem::size_of::<CacheEntry>() as u64;
    let per_cpu = DROP_CACHE_TOTAL_BYTES / entry / u64::from(nr_cpus.max(1));
    // Round down to a power of two.
    let cap = u32::try_from(per_cpu)
        .unwrap_or(u32::MAX)
        .checked_ilog2()
        .map_or(1, |b| 1u32 << b)
        .max(floor);
    wanted.min(cap)
}

/// Flush-log records per CPU (at least 1,024, or `wanted` if fewer).
fn drop_log_records(wanted: u32, nr_cpus: u32) -> u32 {
    per_cpu_entries(wanted, nr_cpus, 1024)
}

/// Drop-cache lines per CPU (at least 64, or `wanted` if fewer).
fn drop_cache_lines(wanted: u32, nr_cpus: u32) -> u32 {
    per_cpu_entries(wanted, nr_cpus, 64)
}

/// Maps the drop cache's arrays and starts their reader, which sums at most `max_keys` keys
/// per drain plus as many as all CPUs' cache lines hold: flows that stay in their lines reach
/// the reader only through the snapshot at the end of a drain, after the flush records, so
/// without that margin a few other keys earlier in the drain (other traffic on the node)
/// would crowd them out of a bound the flow map alone would have met.
fn map_cache(
    ebpf: &mut Ebpf,
    cpus: u32,
    lines: u32,
    log_records: u32,
    max_keys: u32,
) -> Result<CacheHandle, CaptureError> {
    fn mapped<T: aya::Pod>(
        ebpf: &mut Ebpf,
        name: &'static str,
        entries: u32,
        writable: bool,
    ) -> Result<Mmap, CaptureError> {
        let array: Array<MapData, T> = Array::try_from(
            ebpf.take_map(name)
                .ok_or(CaptureError::Missing("drop cache map"))?,
        )
        .map_err(|source| CaptureError::Map { map: name, source })?;
        let len = entries as usize * std::mem::size_of::<T>();
        Mmap::map(IterableMap::map(&array).fd().as_fd(), len, writable).map_err(|e| {
            CaptureError::Refused {
                problem: format!("mmap of the eBPF map {name} ({len} bytes) failed: {e}"),
                fix: "the kernel must support BPF_F_MMAPABLE arrays (Linux 5.5 or later); \
                      set drop_log_records to 0 to count in the flow map only"
                    .to_owned(),
            }
        })
    }
    let cache = mapped::<CacheEntry>(ebpf, "DROP_CACHE", cpus * lines, false)?;
    let log = mapped::<CacheEntry>(ebpf, "DROP_LOG", cpus * log_records, false)?;
    let cpu_states = mapped::<CpuState>(ebpf, "DROP_CPU", cpus, true)?;
    let regions = Regions {
        cache: cache.as_ptr().cast(),
        log: log.as_ptr().cast(),
        cpus: cpu_states.as_ptr().cast(),
        nr_cpus: cpus,
        lines,
        log_records,
        _owner: Box::new((cache, log, cpu_states)),
    };
    let wake = RingBuf::try_from(
        ebpf.take_map("DROP_LOG_WAKE")
            .ok_or(CaptureError::Missing("map DROP_LOG_WAKE"))?,
    )
    .map_err(|source| CaptureError::Map {
        map: "DROP_LOG_WAKE",
        source,
    })?;
    let max_keys = max_keys as usize + cpus as usize * lines as usize;
    CacheHandle::start(CacheReader::new(regions, max_keys), wake)
        .map_err(|e| CaptureError::Config(format!("starting the drop-log reader thread: {e}")))
}

/// Gives every CPU its first second of cache-install samples before the program is attached:
/// the reader grants them only once it runs, and a drop in between (any on the node) would
/// otherwise find the budget at zero and count a `sample_budget` loss.
fn grant_first_samples(ebpf: &mut Ebpf, cpus: u32) -> Result<(), CaptureError> {
    let map_err = |source| CaptureError::Map {
        map: "DROP_CPU",
        source,
    };
    let mut states: Array<&mut MapData, CpuState> = Array::try_from(
        ebpf.map_mut("DROP_CPU")
            .ok_or(CaptureError::Missing("map DROP_CPU"))?,
    )
    .map_err(map_err)?;
    let first = CpuState {
        sample_limit: super::cache::SAMPLES_PER_SEC,
        ..CpuState::default()
    };
    for cpu in 0..cpus {
        states.set(cpu, first, 0).map_err(map_err)?;
    }
    Ok(())
}

/// Kernel size of the LRU flow map for `wanted` distinct flows.
///
/// The kernel's common LRU hands free nodes to each CPU in batches and evicts in batches
/// (LOCAL_FREE_TARGET, 128 nodes, in kernel/bpf/bpf_lru_list.c), so a map with exactly `wanted`
/// entries starts evicting before it holds `wanted` keys, and a flood cycling over that many
/// keys then thrashes (measured by `cargo xtask bench`: 14 % accuracy at nominal size). The
/// headroom keeps the promise "exact as long as the distinct flows fit `--flow-map-entries`".
pub fn lru_entries(wanted: u32, nr_cpus: usize) -> u32 {
    let per_cpu = u32::try_from(nr_cpus)
        .unwrap_or(u32::MAX)
        .saturating_mul(2 * 128);
    wanted.saturating_add(wanted / 4).saturating_add(per_cpu)
}

/// The span of `struct sk_buff` the program copies in one read: `(start, len)`, with `start`
/// 8-byte aligned so that every field sits at its natural alignment in the copy (the program
/// extracts a field from one aligned 8-byte word). `(0, 0)` when the fields lie more than
/// [`SKB_SPAN_MAX`] bytes apart or are misaligned: the program then reads them one by one.
pub fn skb_span(layout: &KernelLayout) -> (u32, u32) {
    // (offset, size) of every field the hot path needs.
    let fields = [
        (layout.skb_len, 4),
        (layout.skb_dev, 8),
        (layout.skb_head, 8),
        (layout.skb_network_header, 2),
        (layout.skb_tail, 4),
        (layout.skb_data_len, 4),
    ];
    if fields.iter().any(|&(off, size)| off % size != 0) {
        return (0, 0);
    }
    let first = fields.iter().map(|&(off, _)| off).min().unwrap_or(0);
    let start = first - first % 8;
    let end = fields
        .iter()
        .map(|&(off, size)| off.saturating_add(size))
        .max()
        .unwrap_or(0);
    let len = end - start;
    if len > SKB_SPAN_MAX {
        return (0, 0);
    }
    (start, len)
}

/// A duplicate of the attached program's descriptor, to read its fdinfo.
fn attached_program_fd(ebpf: &Ebpf, kind: AttachKind) -> Option<aya::programs::ProgramFd> {
    let name = match kind {
        AttachKind::Tracepoint => TRACEPOINT_PROGRAM,
        AttachKind::BtfTracepoint => BTF_PROGRAM,
    };
    let fd = ebpf
        .program(name)
        .and_then(|p| p.fd().ok())
        .and_then(|fd| fd.try_clone().ok());
    if fd.is_none() {
        tracing::warn!(
            "cannot duplicate the program's descriptor: recursion misses are not reported"
        );
    }
    fd
}

/// Loads and attaches the classic tracepoint program to `skb:kfree_skb`.
fn attach_tracepoint(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let program: &mut TracePoint = ebpf
        .program_mut(TRACEPOINT_PROGRAM)
        .ok_or(CaptureError::Missing("program kfree_skb"))?
        .try_into()?;
    program.load()?;
    program.attach("skb", "kfree_skb")?;
    Ok(())
}

/// Loads and attaches the BTF-enabled raw tracepoint program to `kfree_skb`. On failure the
/// program is unloaded again, so that only the fallback stays in the kernel.
fn attach_btf(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let btf = aya::Btf::from_sys_fs()?;
    let program: &mut BtfTracePoint = ebpf
        .program_mut(BTF_PROGRAM)
        .ok_or(CaptureError::Missing("program kfree_skb_btf"))?
        .try_into()?;
    program.load("kfree_skb", &btf)?;
    if let Err(e) = program.attach() {
        if let Err(unload) = program.unload() {
            tracing::debug!(error = %unload, "unloading the unattached tp_btf program");
        }
        return Err(e.into());
    }
    Ok(())
}

impl Capture {
    /// Finds tracefs (mounting it only where permitted; bpffs is never needed), computes the kernel layout, loads the program with
    /// `config`, and attaches it to `kfree_skb`: as `tp_btf/kfree_skb` where the kernel's BTF
    /// allows (see [`AttachMode`]), else as the classic tracepoint `skb:kfree_skb`.
    pub fn load(config: &CaptureConfig) -> Result<Self, CaptureError> {
        validate(config)?;
        if EBPF_OBJECT.is_empty() {
            return Err(CaptureError::Missing(
                "kernel program: this binary was built with AYA_BUILD_SKIP=1 (run `cargo xtask build`)",
            ));
        }
        let tracefs_root = tracefs::ensure_mounted()?;
        let fmt = tracefs::read_kfree_skb_format(&tracefs_root)?;
        let fields = KfreeSkbFields::from_format(&fmt)?;
        startup::require_btf()?;
        let btf = KernelBtf::vmlinux()?;
        let layout = btf.kernel_layout(&fields)?;
        let reasons = kernel_reasons(&fmt, &fields, &btf)?;
        let selection = reason_mask(&config.reasons, &reasons)?;
        if !selection.unavailable.is_empty() {
            tracing::warn!(
                unavailable = ?selection.unavailable,
                "this kernel does not have some of the configured drop reasons: they are not counted on this node (deny_observer_capture_reasons_unavailable)"
            );
        }
        let (locations, reason_source) = call_site_reasons(&fields, &reasons);
        let (skb_span_start, skb_span_len) = skb_span(&layout);
        // Why the BTF program cannot be used here, if it cannot.
        let btf_args = match config.attach {
            AttachMode::Tracepoint => {
                Err("the configuration asks for the classic tracepoint".to_owned())
            }
            AttachMode::Auto | AttachMode::BtfTracepoint => match btf.kfree_skb_btf_args() {
                Ok(args) => Ok(args),
                Err(e) if config.attach == AttachMode::BtfTracepoint => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            },
        };
        let program_config = ProgramConfig {
            layout,
            all_reasons: selection.all_reasons,
            netns_filter: config.netns.unwrap_or(0),
            skb_span_start,
            skb_span_len,
            btf_args: btf_args.clone().unwrap_or(BtfArgs::NONE),
            reason_mask: selection.mask,
            total_slots: super::drain::total_slots(&reasons),
            reserved: 0,
        };
        tracing::debug!(
            ?program_config,
            reasons = reasons.len(),
            "loading kfree_skb program"
        );

        let nr_cpus = aya::util::nr_cpus().map_err(|(path, e)| {
            CaptureError::Config(format!("reading the CPU count from {path}: {e}"))
        })?;
        let conns = &config.connections;
        let conn_layout = super::connections::conn_config(&tracefs_root, &btf, conns);
        // The reader's protocol relies on the CPU keeping the program's stores in order.
        let cache_enabled = cfg!(target_arch = "x86_64") && config.drop_log_records != 0;
        let cpus = u32::try_from(nr_cpus).unwrap_or(u32::MAX);
        let log_records = if cache_enabled {
            drop_log_records(config.drop_log_records, cpus)
        } else {
            1
        };
        let lines = if cache_enabled {
            drop_cache_lines(config.drop_cache_lines, cpus)
        } else {
            CACHE_WAYS
        };
        let cache_config = CacheConfig {
            enabled: u32::from(cache_enabled),
            log_mask: log_records - 1,
            line_bits: lines.trailing_zeros(),
            reserved: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &program_config, true)
            .override_global("CACHE_CONFIG", &cache_config, true)
            .map_max_entries("DROP_CACHE", cpus.saturating_mul(lines))
            .map_max_entries("DROP_LOG", cpus.saturating_mul(log_records))
            .map_max_entries("DROP_CPU", cpus)
            .override_global("LOCATIONS", &locations, true)
            .override_global("CONN_CONFIG", &conn_layout.config, true)
            .map_max_entries("CONNECTIONS", conns.map_entries.max(1))
            .map_max_entries("UDP_TRACK", conns.udp_track_entries.max(1))
            .map_max_entries("FLOWS", lru_entries(config.flow_map_entries, nr_cpus))
            .map_max_entries("SAMPLES", config.ringbuf_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| startup::explain(e.into(), Refused::Bpf))?;
        if cache_enabled {
            grant_first_samples(&mut ebpf, cpus)?;
        }
        let attach_kind = match btf_args {
            Ok(_) => match attach_btf(&mut ebpf) {
                Ok(()) => AttachKind::BtfTracepoint,
                Err(e) if config.attach == AttachMode::BtfTracepoint => {
                    return Err(startup::explain(e, Refused::Bpf));
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "tp_btf/kfree_skb could not be attached; using the classic tracepoint skb:kfree_skb (higher cost per drop)"
                    );
                    attach_tracepoint(&mut ebpf)
                        .map_err(|e| startup::explain(e, Refused::PerfEventOpen))?;
                    AttachKind::Tracepoint
                }
            },
            Err(why) => {
                if config.attach == AttachMode::Auto {
                    tracing::warn!(
                        reason = %why,
                        "tp_btf/kfree_skb not usable on this kernel; using the classic tracepoint skb:kfree_skb (higher cost per drop)"
                    );
                }
                attach_tracepoint(&mut ebpf)
                    .map_err(|e| startup::explain(e, Refused::PerfEventOpen))?;
                AttachKind::Tracepoint
            }
        };
        let recursion = attached_program_fd(&ebpf, attach_kind).map(RecursionMisses::new);
        let recursion_misses_reported = recursion.as_ref().is_some_and(RecursionMisses::supported);
        tracing::info!(
            attach = %attach_kind,
            reasons = reason_source.as_str(),
            recursion_misses_reported,
            "kfree_skb capture program attached"
        );

        let map_err = |map: &'static str| move |source| CaptureError::Map { map, source };
        let flows = HashMap::try_from(
            ebpf.take_map("FLOWS")
                .ok_or(CaptureError::Missing("map FLOWS"))?,
        )
        .map_err(map_err("FLOWS"))?;
        let totals = PerCpuArray::try_from(
            ebpf.take_map("TOTALS")
                .ok_or(CaptureError::Missing("map TOTALS"))?,
        )
        .map_err(map_err("TOTALS"))?;
        let losses = PerCpuArray::try_from(
            ebpf.take_map("LOSSES")
                .ok_or(CaptureError::Missing("map LOSSES"))?,
        )
        .map_err(map_err("LOSSES"))?;
        let samples = RingBuf::try_from(
            ebpf.take_map("SAMPLES")
                .ok_or(CaptureError::Missing("map SAMPLES"))?,
        )
        .map_err(map_err("SAMPLES"))?;
        let connections = if conns.enabled() {
            Some(super::connections::ConnectionCapture::attach(
                &mut ebpf,
                conns,
                &conn_layout,
                config.attach,
                config.idle_drains,
            )?)
        } else {
            None
        };
        let cache = if cache_enabled {
            Some(map_cache(
                &mut ebpf,
                cpus,
                lines,
                log_records,
                config.flow_map_entries,
            )?)
        } else {
            None
        };
        let state = DrainState::new(&reasons);
        // The log map exists only if the program logs; its absence is not an error.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                tracing::debug!(error = %err, "no aya-log map in the kernel program");
                None
            }
        };
        Ok(Self {
            _ebpf: ebpf,
            flows,
            totals,
            losses,
            samples,
            reasons,
            state,
            capacity: lru_entries(config.flow_map_entries, nr_cpus),
            idle_drains: config.idle_drains,
            use_batch: true,
            // One shared value per key (not per CPU).
            flow_batch: Batch::new::<FlowValue>(1, 4096),
            totals_batch: Batch::new::<Counter>(nr_cpus, MAX_REASONS as usize),
            losses_batch: Batch::new::<u64>(nr_cpus, loss::COUNT as usize),
            scratch: Vec::new(),
            logger,
            bad_samples: 0,
            attach_kind,
            reason_source,
            unavailable_reasons: selection.unavailable,
            recursion,
            connections,
            cache,
            cache_scratch: Vec::new(),
            cache_sample_skips: 0,
            cache_stats: DropCacheStats {
                lines_per_cpu: lines,
                flush_records: 0,
                one_shot_records: 0,
            },
            drops_scratch: Vec::new(),
            samples_scratch: Vec::new(),
            log_full_walked: 0,
        })
    }

    /// The connection hooks and whether each is attached (empty when no protocol is counted).
    pub fn connection_hooks(&self) -> &[super::connections::Hook] {
        self.connections.as_ref().map_or(&[], |c| c.hooks())
    }

    /// The connection counters, `None` when no protocol is counted.
    pub fn connections(&mut self) -> Option<&mut super::connections::ConnectionCapture> {
        self.connections.as_mut()
    }

    /// Whether this kernel reports the program's recursion misses (5.12 and later), so that
    /// [`super::Losses::recursion_miss`] is `Some`.
    pub fn recursion_misses_reported(&self) -> bool {
        self.recursion
            .as_ref()
            .is_some_and(RecursionMisses::supported)
    }

    /// Where the drop reasons come from: the kernel, or (before 5.17) the caller of
    /// `kfree_skb`.
    pub fn reason_source(&self) -> ReasonSource {
        self.reason_source
    }

    /// Configured reasons this kernel does not have and so does not count (labels, sorted).
    pub fn unavailable_reasons(&self) -> &[String] {
        &self.unavailable_reasons
    }

    /// The hook the program is attached to: `tp_btf/kfree_skb` or, as the fallback, the
    /// classic tracepoint `skb:kfree_skb`.
    pub fn attach_kind(&self) -> AttachKind {
        self.attach_kind
    }

    /// The drop cache's size and the flush records read as of the last drain; `None` when
    /// the cache is off (every drop counted in the flow map).
    pub fn drop_cache_stats(&self) -> Option<DropCacheStats> {
        self.cache.as_ref().map(|_| self.cache_stats)
    }

    /// Ring-buffer records of the wrong size for a sample, since the last call (the
    /// daemon counts them as a loss).
    pub fn take_bad_samples(&mut self) -> u64 {
        std::mem::take(&mut self.bad_samples)
    }

    /// Forwards pending kernel log records (aya-log) to the `log` facade, without blocking.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// The running kernel's drop reasons, as this capture labels them.
    pub fn reasons(&self) -> &ReasonTable {
        &self.reasons
    }

    /// Takes every sample waiting in the ring buffer, without blocking. Records of the wrong
    /// size are skipped and counted (see [`Capture::take_bad_samples`]).
    pub fn samples(&mut self) -> Vec<Sample> {
        let mut out = std::mem::take(&mut self.samples_scratch);
        out.clear();
        while let Some(item) = self.samples.next() {
            let ev = match decode::parse_sample(&item) {
                Ok(ev) => ev,
                Err(err) => {
                    // The count is exported; one log line per counting period says why.
                    if self.bad_samples == 0 {
                        tracing::debug!(error = %err, "skipping malformed sample record");
                    }
                    self.bad_samples += 1;
                    continue;
                }
            };
            let reason = self.state.label(&self.reasons, ev.key.reason);
            out.push(decode::to_sample(&ev, reason));
        }
        out
    }

    /// Takes back a drain's report and samples once they are attributed, so the next drain
    /// fills the same buffers. With thousands of flows a drain's report is hundreds of KiB;
    /// allocated afresh each second, the allocator returned its pages to the kernel between
    /// drains and the next drain page-faulted them back in (a fifth of the pipeline thread's
    /// time in a 4,096-flow flood).
    pub fn recycle(&mut self, report: DrainReport, samples: Vec<Sample>) {
        self.drops_scratch = report.drops;
        self.samples_scratch = samples;
        crate::flow::trim_vec(&mut self.drops_scratch);
        crate::flow::trim_vec(&mut self.samples_scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ReasonTable {
        ReasonTable::from_kernel_names([
            (2, "NOT_SPECIFIED"),
            (12, "NETFILTER_DROP"),
            (73, "TC_INGRESS"),
        ])
    }

    #[test]
    fn drop_logs_shrink_with_many_cpus() {
        assert_eq!(drop_log_records(1 << 14, 2), 1 << 14);
        assert_eq!(drop_log_records(1 << 14, 64), 4096);
        assert_eq!(drop_log_records(1 << 14, 96), 2048);
        assert_eq!(drop_log_records(1 << 14, 1024), 1024);
        assert_eq!(drop_log_records(4, 64), 4);
        assert_eq!(drop_cache_lines(4096, 64), 4096);
        assert_eq!(drop_cache_lines(4096, 128), 2048);
        assert_eq!(drop_cache_lines(4096, 1024), 256);
        assert_eq!(drop_cache_lines(256, 16384), 64);
        assert_eq!(drop_cache_lines(8, 2), 8);
    }

    #[test]
    fn all_sets_flag() {
        assert_eq!(
            reason_mask(&ReasonFilter::All, &table())
                .unwrap()
                .all_reasons,
            1
        );
    }

    #[test]
    fn names_set_bits() {
        let f = ReasonFilter::Names(vec!["netfilter_drop".into(), "TC_INGRESS".into()]);
        let sel = reason_mask(&f, &table()).unwrap();
        let (all, mask) = (sel.all_reasons, sel.mask);
        assert_eq!(all, 0);
        assert!(sel.unavailable.is_empty());
        assert_eq!(mask[0], 1 << 12);
        assert_eq!(mask[1], 1 << (73 - 64));
        assert!(mask[2..].iter().all(|w| *w == 0));
    }

    #[test]
    fn unknown_names_list_valid_ones() {
        let f = ReasonFilter::Names(vec!["netfilter_drop".into(), "bogus_reason".into()]);
        let err = reason_mask(&f, &table()).unwrap_err().to_string();
        assert!(err.contains("bogus_reason"), "{err}");
        assert!(err.contains("netfilter_drop, tc_ingress"), "{err}");
    }

    #[test]
    fn reasons_of_other_kernels_are_reported_not_refused() {
        // `tcp_invalid_sequence` exists from 6.x on, not in this (older) table: the node runs,
        // counting the reasons it has, and says which ones it cannot.
        let f = ReasonFilter::Names(vec![
            "NETFILTER_DROP".into(),
            "SKB_DROP_REASON_TCP_INVALID_SEQUENCE".into(),
            "ip_inaddrerrors".into(),
        ]);
        let sel = reason_mask(&f, &table()).unwrap();
        assert_eq!(sel.mask[0], 1 << 12);
        assert_eq!(sel.unavailable, ["ip_inaddrerrors", "tcp_invalid_sequence"]);
        // Only other kernels' reasons: this node would count nothing, which is refused.
        let f = ReasonFilter::Names(vec!["tcp_invalid_sequence".into()]);
        let err = reason_mask(&f, &table()).unwrap_err().to_string();
        assert!(err.contains("tcp_invalid_sequence"), "{err}");
        // A typo next to a reason of another kernel is still refused.
        let f = ReasonFilter::Names(vec![
            "netfilter_drop".into(),
            "tcp_invalid_sequence".into(),
            "netfliter_drop".into(),
        ]);
        let err = reason_mask(&f, &table()).unwrap_err().to_string();
        assert!(err.contains("netfliter_drop"), "{err}");
        assert!(!err.contains("tcp_invalid_sequence\""), "{err}");
    }

    #[test]
    fn empty_list_is_rejected() {
        assert!(reason_mask(&ReasonFilter::Names(vec![]), &table()).is_err());
    }

    #[test]
    fn skb_span_covers_the_fields() {
        // The 6.18 layout: dev 16, len 112, data_len 116, network_header 180, tail 184,
        // head 192.
        let layout = KernelLayout {
            skb_dev: 16,
            skb_len: 112,
            skb_data_len: 116,
            skb_network_header: 180,
            skb_tail: 184,
            skb_head: 192,
            ..KernelLayout::default()
        };
        assert_eq!(skb_span(&layout), (16, 184));
        let odd = KernelLayout {
            skb_dev: 20,
            ..layout
        };
        assert_eq!(skb_span(&odd), (0, 0), "misaligned pointer field");
        let far = KernelLayout {
            skb_head: 16 + SKB_SPAN_MAX,
            ..layout
        };
        assert_eq!(skb_span(&far), (0, 0), "fields too far apart");
        let unaligned_start = KernelLayout {
            skb_dev: 104,
            skb_len: 100,
            ..layout
        };
        assert_eq!(skb_span(&unaligned_start), (96, 104));
    }

    #[test]
    fn ringbuf_size_is_validated() {
        let cfg = CaptureConfig {
            ringbuf_bytes: 1000,
            ..CaptureConfig::default()
        };
        assert!(matches!(validate(&cfg), Err(CaptureError::Config(_))));
        assert!(validate(&CaptureConfig::default()).is_ok());
    }

    #[test]
    fn drop_cache_lines_are_a_power_of_two_within_the_tag() {
        for (lines, ok) in [(0, false), (1, false), (2, true), (96, false), (4096, true)] {
            let cfg = CaptureConfig {
                drop_cache_lines: lines,
                ..CaptureConfig::default()
            };
            assert_eq!(validate(&cfg).is_ok(), ok, "{lines}");
        }
        let cfg = CaptureConfig {
            drop_cache_lines: 8192,
            ..CaptureConfig::default()
        };
        let err = validate(&cfg).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("from 2 to 4096"), "{err}");
    }
}
