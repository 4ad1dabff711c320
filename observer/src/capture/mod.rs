//! Capture: loads the `skb:kfree_skb` program and turns its maps into exact drop deltas.
//!
//! ```no_run
//! # fn main() -> Result<(), observer::capture::CaptureError> {
//! use observer::capture::{Capture, CaptureConfig};
//! let mut capture = Capture::load(&CaptureConfig::default())?;
//! loop {
//!     std::thread::sleep(std::time::Duration::from_secs(1));
//!     let report = capture.drain()?;
//!     for drop in &report.drops { /* attribute, export */ }
//! #   break;
//! }
//! # Ok(()) }
//! ```
//!
//! The kernel counts per flow key in an LRU map and, separately, an exact total per reason.
//! [`Capture::drain`] emits per-key deltas, and reports what eviction cost as
//! [`Losses::evicted_packets`], so `sum(drops) + evicted == kernel drops` for each reason.
use std::net::IpAddr;
use std::sync::Arc;

use crate::flow::Protocol;

mod batch;
pub(crate) mod btf;
mod cache;
pub mod connections;
mod decode;
mod drain;
mod known_reasons;
mod loader;
pub mod location;
pub mod recursion;
pub mod startup;
mod tally;
pub(crate) mod tracefs;

pub use connections::{ConnectionCapture, ConnectionReport, ConnectionsConfig};
pub(crate) use decode::decode;
pub use loader::{Capture, DropCacheStats, lru_entries};
pub use location::ReasonSource;
pub use tracefs::ReasonTable;

/// Which drop reasons the kernel program counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReasonFilter {
    /// Every reason (the default).
    #[default]
    All,
    /// Only these reasons, by label or kernel name (`netfilter_drop`, `NETFILTER_DROP`,
    /// `SKB_DROP_REASON_NETFILTER_DROP`).
    Names(Vec<String>),
}

/// Which kernel hook [`Capture::load`] may attach to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// The BTF-enabled raw tracepoint `tp_btf/kfree_skb` where the kernel supports it (cheaper
    /// per drop), else the classic tracepoint `skb:kfree_skb`. The default.
    #[default]
    Auto,
    /// Only the classic tracepoint `skb:kfree_skb`.
    Tracepoint,
    /// Only `tp_btf/kfree_skb`; loading fails where the kernel does not support it.
    BtfTracepoint,
}

/// The hook a [`Capture`] is attached to (see [`Capture::attach_kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    /// The classic tracepoint `skb:kfree_skb`: the kernel fills a trace record per drop, and
    /// the program copies the `sk_buff` fields with helper calls.
    Tracepoint,
    /// The BTF-enabled raw tracepoint `tp_btf/kfree_skb`: the program gets the tracepoint's
    /// arguments directly and loads the `sk_buff` fields with plain loads.
    BtfTracepoint,
}

impl AttachKind {
    /// Short name for logs and metrics: `tracepoint` or `tp_btf`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::BtfTracepoint => "tp_btf",
        }
    }
}

impl std::fmt::Display for AttachKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to load the capture program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Drop reasons to count.
    pub reasons: ReasonFilter,
    /// Capacity of the LRU flow map (distinct flow keys held between drains).
    pub flow_map_entries: u32,
    /// Size of the sample ring buffer in bytes: a power of two, a multiple of the page size.
    pub ringbuf_bytes: u32,
    /// A flow entry unchanged for this many drains is deleted from the map, so dead keys do
    /// not push live ones out. 0 never deletes.
    pub idle_drains: u32,
    /// Only count drops on devices in the network namespace with this inode (tests and
    /// debugging); `None` counts every namespace.
    pub netns: Option<u32>,
    /// Which hook to attach to; [`AttachMode::Auto`] prefers `tp_btf` and falls back.
    pub attach: AttachMode,
    /// Accepted connections to count (see [`connections`]).
    pub connections: ConnectionsConfig,
    /// Records of each CPU's drop-cache flush log (a power of two, 64 bytes each; capped so
    /// that all CPUs' logs together take at most 16 MiB); 0 disables the drop cache and counts
    /// every drop in the flow map. The cache is only used on x86-64
    /// (see docs/perf-notes.md, "Design C").
    pub drop_log_records: u32,
    /// Lines of each CPU's drop cache (a power of two from 2 to 4,096, 64 bytes each; capped
    /// so that all CPUs' caches together take at most 16 MiB). Two-way set associative: up
    /// to about half as many flows per CPU keep their lines, and their drops cost the reader
    /// nothing; each drop of a flow beyond that sends the reader a flush record. A larger
    /// cache holds more flows but costs the program a cache miss per drop once the flows'
    /// lines outgrow the CPU's caches (docs/perf-notes.md, "Seventh round"); 256 lines (16 KiB)
    /// cost no more per drop than the 64 direct-mapped lines before them at any flow count
    /// measured.
    pub drop_cache_lines: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            reasons: ReasonFilter::All,
            flow_map_entries: 65536,
            ringbuf_bytes: 256 * 1024,
            idle_drains: 30,
            netns: None,
            attach: AttachMode::Auto,
            connections: ConnectionsConfig::default(),
            drop_log_records: 1 << 14,
            drop_cache_lines: 256,
        }
    }
}

/// Errors of the capture stage.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// tracefs could not be found or mounted, or its format file could not be parsed.
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    /// A BTF lookup failed (the running kernel lacks a field the program needs).
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// The reason filter names reasons no kernel has (a typo), or only reasons this kernel
    /// does not have (nothing would be counted).
    #[error("unknown drop reason(s) {unknown:?}; this kernel's reasons are: {valid}")]
    UnknownReasons {
        /// The names that were not found.
        unknown: Vec<String>,
        /// Every valid label, comma separated.
        valid: String,
    },
    /// The reason filter names a reason the kernel program cannot filter on.
    #[error("drop reason {name:?} has number {number}, beyond the {max} the program can filter")]
    ReasonOutOfRange {
        /// The name.
        name: String,
        /// Its number.
        number: u32,
        /// `MAX_REASONS`.
        max: u32,
    },
    /// A configuration value is invalid.
    #[error("invalid capture config: {0}")]
    Config(String),
    /// Loading the eBPF object failed (verifier rejection, missing privileges, ...).
    #[error("loading the kfree_skb program: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading or attaching the program failed.
    #[error("loading or attaching the kfree_skb program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// The kernel's BTF could not be loaded for the `tp_btf` program (only an error with
    /// [`AttachMode::BtfTracepoint`]; otherwise the classic tracepoint is used).
    #[error("loading kernel BTF for tp_btf/kfree_skb: {0}")]
    KernelBtf(#[from] aya::BtfError),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// The kernel or the container runtime refused a start-up step; says what is missing
    /// (capability, seccomp rule, mount, kernel feature) and the fix (see [`startup`]).
    #[error("{problem}. {fix}")]
    Refused {
        /// The failed step and the kernel's error.
        problem: String,
        /// What is missing and how to fix it.
        fix: String,
    },
    /// A map or program is missing from the object.
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
}

/// Dropped packets of one flow key since the previous drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowDrop {
    /// Drop-reason label (`netfilter_drop`, `no_socket`, ...).
    pub reason: Arc<str>,
    /// Source address; `None` when the packet could not be parsed down to IP.
    pub src: Option<IpAddr>,
    /// Destination address; `None` when unknown.
    pub dst: Option<IpAddr>,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port for TCP/UDP/SCTP, otherwise 0.
    pub dst_port: u16,
    /// ICMP/ICMPv6 `(type, code)`.
    pub icmp: Option<(u8, u8)>,
    /// Inode of the network namespace of the device the packet was on (0 if unknown).
    pub netns: u32,
    /// Packets since the previous drain.
    pub packets: u64,
    /// Bytes since the previous drain.
    pub bytes: u64,
}

/// What the kernel side could not deliver, as deltas since the previous drain.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Sample events dropped because the ring buffer was full (counts stay exact).
    pub ringbuf_full: u64,
    /// Flow keys the kernel could not insert (their packets show up in `evicted_*`).
    pub flow_insert: u64,
    /// Drops whose skb could not be read in full (counted with partial or no addresses).
    pub skb_read: u64,
    /// Drops whose packet ends before a header the flow key needs, or whose header declares
    /// an impossible length: counted with port 0 and what was read before the cut.
    pub truncated_header: u64,
    /// IPv6 drops with more extension headers than the kernel program follows: counted with
    /// port 0 and the last extension header as protocol.
    pub ipv6_ext_headers_exceeded: u64,
    /// Drops whose headers lie past the skb's linear data: counted like `truncated_header`.
    pub header_not_linear: u64,
    /// Evictions from the drop cache refused because the CPU's flush log was full (the reader
    /// fell behind): those drops were counted in the flow map instead (counts stay exact).
    pub drop_log_full: u64,
    /// Samples of keys installed into the drop cache not sent because the CPU had spent its
    /// per-poll sample budget (counts stay exact; only the detail of those keys is missing).
    pub sample_budget: u64,
    /// Packets counted in the per-reason totals but lost from the flow map (evicted before a
    /// drain saw them, or never inserted).
    pub evicted_packets: u64,
    /// Bytes of those packets.
    pub evicted_bytes: u64,
    /// Drops the program never ran for: the kernel skipped it because it would have nested
    /// on one CPU (`bpf_prog_info.recursion_misses`). `None` on kernels that do not report it.
    pub recursion_miss: Option<u64>,
}

/// Result of one [`Capture::drain`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Per-flow deltas (only keys that changed).
    pub drops: Vec<FlowDrop>,
    /// Exact per-reason deltas `(reason label, packets, bytes)`: every counted drop, attributed
    /// to a flow or not. Only reasons that changed.
    pub reason_totals: Vec<(Arc<str>, u64, u64)>,
    /// Losses since the previous drain.
    pub losses: Losses,
    /// Keys in the flow map at this drain.
    pub flow_map_entries: u64,
    /// Capacity of the flow map.
    pub flow_map_capacity: u64,
}

/// Detail of the first packet of a new flow key on one CPU (from the ring buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The flow (its `packets`/`bytes` are those of this one packet).
    pub drop: FlowDrop,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the drop.
    pub ts_ns: u64,
    /// Kernel address of the code that dropped the packet.
    pub location: u64,
    /// ifindex of the device the packet was on, 0 if none.
    pub ifindex: u32,
    /// Source port (TCP/UDP/SCTP), else 0.
    pub src_port: u16,
    /// TCP flags byte, else 0.
    pub tcp_flags: u8,
}
