//! Types shared between the kernel programs and userspace.
//!
//! Everything here is `#[repr(C)]`, has no implicit padding (a hash key with padding bytes would
//! hash garbage), and is `Copy`. With the `user` feature each type implements `aya::Pod` so
//! userspace can read it straight out of maps and the ring buffer.
#![no_std]

/// Address family tags stored in [`FlowKey::family`].
pub mod family {
    /// The drop could not be parsed down to an IP header (no network header, ARP, ...).
    pub const UNKNOWN: u8 = 0;
    /// IPv4; addresses are stored IPv4-mapped (`::ffff:a.b.c.d`).
    pub const INET: u8 = 4;
    /// IPv6.
    pub const INET6: u8 = 6;
}

/// Indexes into the per-CPU `LOSSES` array: each slot counts events the kernel side could not
/// deliver in full. Userspace exports them as `deny_observer_events_lost_total{stage}`.
pub mod loss {
    /// `bpf_ringbuf_reserve` failed, so a sample event was not sent (counts stay exact).
    pub const RINGBUF_FULL: u32 = 0;
    /// A new flow key could not be inserted into the flow map (its packets are still in the
    /// per-reason totals, so userspace sees them as unattributed loss).
    pub const FLOW_INSERT: u32 = 1;
    /// Reading the skb or its headers failed (odd packet, unexpected kernel layout).
    pub const SKB_READ: u32 = 2;
    /// The packet ends before a header it needs for the flow key, or a header declares an
    /// impossible length (IPv4 IHL < 5, IP total length shorter than the headers, TCP data
    /// offset < 5 or beyond the packet, UDP/SCTP/ICMP header cut short). The drop is still
    /// counted, with port 0 and whatever addresses and protocol were read before the cut.
    pub const TRUNCATED_HEADER: u32 = 3;
    /// An IPv6 packet has more extension headers than the program follows: counted with its
    /// addresses, the extension header where parsing stopped as protocol, and port 0.
    pub const IPV6_EXT_HEADERS_EXCEEDED: u32 = 4;
    /// A header the packet holds lies beyond the skb's linear data (in page fragments), which
    /// the program does not read: counted like [`TRUNCATED_HEADER`].
    pub const HEADER_NOT_LINEAR: u32 = 5;
    /// The CPU's flush log of the drop cache was full (userspace had not consumed it), so a
    /// cache line could not be evicted: the drop was counted in the flow map instead, with its
    /// full key. Counts stay exact; it says the reader is falling behind. Also counted, before
    /// the same fallback, if a CPU has no cache slot (never seen: the maps are sized for every
    /// possible CPU); with the cache on, userspace walks the flow map only when this moves.
    pub const DROP_LOG_FULL: u32 = 6;
    /// Samples not sent because a CPU had spent the sample budget userspace grants (about
    /// 3,200 a second; counts stay exact). The drop cache counts these in
    /// [`CpuState::sample_skips`] instead, on the line it has just written: one per install
    /// that found the budget spent, whether or not that key had been sampled before.
    pub const SAMPLE_BUDGET: u32 = 7;
    /// Number of slots.
    pub const COUNT: u32 = 8;
}

/// Highest drop-reason number the kernel side can account per reason. Reasons at or above this
/// fold into the last slot; 6.18 has ~130 reasons, so 512 leaves room for future kernels.
pub const MAX_REASONS: u32 = 512;

/// Largest span of `struct sk_buff` the program copies with a single read (see
/// [`ProgramConfig::skb_span_len`]); the buffer lives on the 512-byte BPF stack, so it stays small.
pub const SKB_SPAN_MAX: u32 = 256;

/// [`BtfArgs`] value of an argument the tracepoint does not have.
pub const NO_ARG: u32 = u32::MAX;

/// Arguments of a BTF-enabled tracepoint the program can load: it loads them at constant
/// context offsets (the verifier rejects computed ones), one code path per possible index,
/// so indices at or above this make userspace use the classic tracepoint instead.
pub const BTF_ARGS_MAX: u32 = 8;

/// Where the `tp_btf/kfree_skb` program finds its arguments in its context (an array of
/// 8-byte slots, one per argument of the tracepoint after the hidden `void *__data`).
///
/// The tracepoint's arguments have no names in BTF, so userspace finds them by type in the
/// `btf_trace_kfree_skb` prototype; the order differs between kernels.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BtfArgs {
    /// Index of the `struct sk_buff *` argument, [`NO_ARG`] when the BTF program is not used.
    pub skb: u32,
    /// Index of the `enum skb_drop_reason` argument, [`NO_ARG`] if the kernel has none.
    pub reason: u32,
    /// Index of the `void *location` argument, [`NO_ARG`] if absent.
    pub location: u32,
    /// Number of arguments (after `__data`): no index at or above it is ever loaded.
    pub nr_args: u32,
}

impl BtfArgs {
    /// No usable BTF prototype: the BTF program must not run.
    pub const NONE: Self = Self {
        skb: NO_ARG,
        reason: NO_ARG,
        location: NO_ARG,
        nr_args: 0,
    };
}

impl Default for BtfArgs {
    fn default() -> Self {
        Self::NONE
    }
}

/// Most kernel functions [`LocationTable`] can map to a reason.
pub const LOCATION_RANGES_MAX: usize = 16;

/// One kernel function, by address range, whose calls to `kfree_skb` mean one drop reason.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct LocationRange {
    /// First address of the function.
    pub start: u64,
    /// First address after it.
    pub end: u64,
    /// Reason number (in userspace's table for this kernel) of drops freed from here.
    pub reason: u32,
    /// Padding, always zero.
    pub _pad: u32,
}

/// Where kernels without drop reasons (before 5.17) get one: the tracepoint's `location` (the
/// caller of `kfree_skb`) looked up in these ranges, which userspace resolves from
/// `/proc/kallsyms` at load time. A location in no range gets `unmapped`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LocationTable {
    /// The ranges; only the first `len` are used.
    pub ranges: [LocationRange; LOCATION_RANGES_MAX],
    /// Ranges in use.
    pub len: u32,
    /// Reason number of a location in no range (`not_specified`).
    pub unmapped: u32,
}

impl LocationTable {
    /// No ranges: every drop gets reason 0.
    pub const EMPTY: Self = Self {
        ranges: [LocationRange {
            start: 0,
            end: 0,
            reason: 0,
            _pad: 0,
        }; LOCATION_RANGES_MAX],
        len: 0,
        unmapped: 0,
    };
}

impl Default for LocationTable {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Key of the LRU flow map: one entry per distinct dropped flow.
///
/// The key deliberately leaves out the source port so that a SYN flood from random ports stays
/// one key. For ICMP/ICMPv6, `dst_port` holds `type << 8 | code`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct FlowKey {
    /// Source address; IPv4 is stored IPv4-mapped.
    pub src_addr: [u8; 16],
    /// Destination address; IPv4 is stored IPv4-mapped.
    pub dst_addr: [u8; 16],
    /// Inode of the network namespace of the device the skb was on (0 if unknown).
    pub netns: u32,
    /// Kernel `skb_drop_reason` number (kernel-specific; userspace maps it to a name).
    pub reason: u32,
    /// Destination port (host order) or ICMP `type << 8 | code`; 0 when not applicable.
    pub dst_port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6), 0 if unknown.
    pub protocol: u8,
    /// One of [`family`].
    pub family: u8,
}

/// One write of the key's 44 bytes: userspace hashes a key per drop-cache flush record, and
/// the derived impl's nine writes (two with length prefixes) cost more than the table probe.
/// Equal keys have equal bytes (no padding), so this agrees with `Eq`.
impl core::hash::Hash for FlowKey {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 44];
        b[..16].copy_from_slice(&self.src_addr);
        b[16..32].copy_from_slice(&self.dst_addr);
        b[32..36].copy_from_slice(&self.netns.to_ne_bytes());
        b[36..40].copy_from_slice(&self.reason.to_ne_bytes());
        b[40..42].copy_from_slice(&self.dst_port.to_ne_bytes());
        b[42] = self.protocol;
        b[43] = self.family;
        state.write(&b);
    }
}

/// Packets and bytes: the per-CPU value of the per-reason totals array.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Dropped packets.
    pub packets: u64,
    /// Dropped bytes (`skb->len` at the drop point).
    pub bytes: u64,
}

/// Value of the flow map, shared by all CPUs (the kernel adds to it atomically).
///
/// `created_ns` tells userspace that an entry was evicted and re-created between two drains even
/// when the new counts are already larger than the old ones: the CPU that inserts a key stamps
/// it with `bpf_ktime_get_ns()`, which identifies one incarnation of the key.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Dropped packets.
    pub packets: u64,
    /// Dropped bytes (`skb->len` at the drop point).
    pub bytes: u64,
    /// Insertion time of this incarnation of the key.
    pub created_ns: u64,
}

/// Sample event sent through the ring buffer when a flow key is inserted.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SampleEvent {
    /// `bpf_ktime_get_ns()` at the drop.
    pub ts_ns: u64,
    /// Kernel code address that freed the skb (`location` field of the tracepoint).
    pub location: u64,
    /// The flow the sample belongs to.
    pub key: FlowKey,
    /// ifindex of `skb->dev` (0 if none).
    pub ifindex: u32,
    /// `skb->len`.
    pub len: u32,
    /// Source port (host order), 0 when not applicable.
    pub src_port: u16,
    /// TCP flags byte, 0 when not TCP.
    pub tcp_flags: u8,
    /// Padding, always zero.
    pub _pad: u8,
}

/// Ways of the per-CPU drop cache: a key may sit in either line of its set, the two lines at
/// `2 * set` and `2 * set + 1`. A new key takes an empty line of its set, else the one with
/// fewer packets in its incarnation, so a set holds its two busiest keys while others churn
/// through the remaining line: with many flows per CPU (a scan) most of them keep a line,
/// where a direct-mapped table flushed every key whose line it shared.
pub const CACHE_WAYS: u32 = 2;

/// Low bits of [`CacheEntry::tag`] that hold the line index; the 20 bits above count installs
/// into that line, wrapping. The reader tells incarnations of a line apart only among those
/// installed between its reading of the log and its snapshot of the line, a few milliseconds
/// at most: far fewer than 2^20 installs.
pub const CACHE_TAG_LINE_BITS: u32 = 12;

/// Most lines per CPU: a line index must fit in [`CACHE_TAG_LINE_BITS`].
pub const CACHE_LINES_MAX: u32 = 1 << CACHE_TAG_LINE_BITS;

/// Tag of a flush-log record that is one drop counted past the cache (a CPU whose cache
/// thrashes, see [`CpuState::thrash`]): it ends no incarnation. No line ever has this tag: the
/// install count in a tag skips 0, and a line's first install is count 1.
pub const CACHE_ONE_SHOT_TAG: u32 = 0;

/// A CPU counts drops past its cache once [`CpuState::thrash`] reaches this.
pub const THRASH_ENTER: u64 = 64;

/// Most [`CpuState::thrash`] can hold: a thrashing CPU needs a few probes that hit to leave.
pub const THRASH_MAX: u64 = 2 * THRASH_ENTER;

/// What a probe that hits takes off [`CpuState::thrash`] (a miss adds 1): the CPU thrashes
/// while more than 16 of 17 probes miss.
pub const THRASH_HIT_WEIGHT: u64 = 16;

/// A thrashing CPU still probes its cache with one drop in this many (by `head`), so that a
/// change of traffic (a few flows again) ends the thrashing.
pub const THRASH_PROBE_EVERY: u64 = 16;

/// Fingerprints in the per-CPU sample filter: a key installed into the drop cache sends a
/// [`SampleEvent`] only when its fingerprint is not already in its filter slot.
pub const SAMPLE_FILTER_SLOTS: u32 = 4096;

/// One line of the per-CPU drop cache, and one record of the per-CPU flush log (a record is a
/// verbatim copy of the evicted line).
///
/// Counts are cumulative over one *incarnation* of the line, named by `(cpu, tag)`: userspace
/// emits the difference between what it read last of an incarnation and what it reads now
/// (a snapshot of the live line, or its flush record, which holds the final counts).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct CacheEntry {
    /// The flow.
    pub key: FlowKey,
    /// `line | installs_into_line << CACHE_TAG_LINE_BITS` (wrapping, skipping a count of 0):
    /// tells two incarnations of a line apart without a clock read. In the log,
    /// [`CACHE_ONE_SHOT_TAG`] marks a record of one drop that went past the cache.
    pub tag: u32,
    /// Dropped packets of this incarnation; 0 marks an empty line.
    pub packets: u64,
    /// Dropped bytes of this incarnation.
    pub bytes: u64,
}

/// Per-CPU state of the drop cache and its flush log, in an mmapable array read by userspace.
///
/// The first 64 bytes are written by the kernel only, the last 64 by userspace only, so the
/// reader's store never bounces the line the program writes on every install.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct CpuState {
    /// Odd while the program installs a key (flush record, `head`, line); even otherwise.
    pub seq: u64,
    /// Flush records ever written by this CPU; record `n` is at `n % log_records`.
    pub head: u64,
    /// Samples this CPU's cache installs have sent (or tried to: a full ring counts too).
    pub samples: u64,
    /// Cache installs that found `samples` at `sample_limit`, so sent no sample and did not
    /// look whether the key had one already (exported as the `sample_budget` loss).
    pub sample_skips: u64,
    /// Drops this CPU counted in its cache (hits and installs), each stored after the line
    /// it changed: a reader that finds it unchanged since its last snapshot of this CPU's
    /// lines need not read them again.
    pub counted: u64,
    /// How much the cache thrashes: probes that miss add 1, probes that hit take off
    /// [`THRASH_HIT_WEIGHT`], between 0 and [`THRASH_MAX`]. From [`THRASH_ENTER`] on, drops go
    /// to the flush log as one-drop records ([`CACHE_ONE_SHOT_TAG`]) without loading a line:
    /// with thousands of flows per CPU every probe misses, and each would cost two line loads
    /// (cache misses once the flows outgrow the CPU's caches) and an eviction record anyway.
    pub thrash: u64,
    /// Padding to the end of the kernel's cache line.
    pub _kernel_pad: [u64; 2],
    /// Flush records consumed by userspace: the program never writes a record at or beyond
    /// `tail + log_records`.
    pub tail: u64,
    /// The program sends no sample from a cache install once `samples` reaches this; userspace
    /// raises it in proportion to the time since it last did, leaving at most a second's worth
    /// unsent (a token bucket), which bounds the samples per second per CPU (a key that finds
    /// the budget spent is sampled at a later install instead).
    pub sample_limit: u64,
    /// Padding to the end of the reader's cache line.
    pub _reader_pad: [u64; 6],
}

/// Load-time configuration of the drop cache, set with
/// `EbpfLoader::override_global("CACHE_CONFIG", ..)`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct CacheConfig {
    /// Non-zero: count in the drop cache, with `FLOWS` as the fallback. Zero: `FLOWS` only
    /// (where the reader cannot rely on the CPU's store order, see docs/perf-notes.md).
    pub enabled: u32,
    /// Flush-log records per CPU minus one (the count is a power of two).
    pub log_mask: u32,
    /// Lines per CPU are `1 << line_bits`, from 1 (one set) to [`CACHE_TAG_LINE_BITS`]
    /// ([`CACHE_LINES_MAX`] lines).
    pub line_bits: u32,
    /// Always zero: keeps the size a multiple of 8 with no hidden padding.
    pub reserved: u32,
}

/// Layout facts the kernel program cannot know at compile time (Rust eBPF has no CO-RE).
///
/// Userspace computes them at start-up from `/sys/kernel/btf/vmlinux` and from the tracepoint's
/// format file, and passes them in with `EbpfLoader::override_global("CONFIG", ...)`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct KernelLayout {
    /// Offset of `skbaddr` in the kfree_skb tracepoint record.
    pub tp_skbaddr: u32,
    /// Offset of `location` in the tracepoint record.
    pub tp_location: u32,
    /// Offset of `protocol` (u16, big-endian ethertype) in the tracepoint record.
    pub tp_protocol: u32,
    /// Offset of `reason` in the tracepoint record; `u32::MAX` on kernels without it.
    pub tp_reason: u32,
    /// `offsetof(struct sk_buff, head)`.
    pub skb_head: u32,
    /// `offsetof(struct sk_buff, network_header)` (u16).
    pub skb_network_header: u32,
    /// `offsetof(struct sk_buff, transport_header)` (u16).
    pub skb_transport_header: u32,
    /// `offsetof(struct sk_buff, len)` (u32).
    pub skb_len: u32,
    /// `offsetof(struct sk_buff, dev)` (pointer).
    pub skb_dev: u32,
    /// `offsetof(struct net_device, ifindex)` (int).
    pub dev_ifindex: u32,
    /// `offsetof(struct net_device, nd_net)` + offset of the `net` pointer inside it.
    pub dev_nd_net: u32,
    /// `offsetof(struct net, ns) + offsetof(struct ns_common, inum)` (u32).
    pub net_ns_inum: u32,
    /// `offsetof(struct sk_buff, tail)`: the end of the linear data, as an offset from `head`
    /// (`sk_buff_data_t` is a u32 offset on every 64-bit kernel).
    pub skb_tail: u32,
    /// `offsetof(struct sk_buff, data_len)` (u32): bytes in page fragments, 0 when the whole
    /// packet is linear.
    pub skb_data_len: u32,
}

/// Runtime configuration of the kernel program, set once at load time.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProgramConfig {
    /// Kernel layout offsets.
    pub layout: KernelLayout,
    /// Non-zero: count every reason. Zero: only reasons whose bit is set in `reason_mask`.
    pub all_reasons: u32,
    /// Non-zero: only count drops whose `skb->dev` is in the network namespace with this inode
    /// (tests, debugging one namespace). Zero: all namespaces.
    pub netns_filter: u32,
    /// Start (8-byte aligned) of the one span of `struct sk_buff` that covers `len`, `dev`, `head`
    /// and `network_header`, so the program reads them with one helper call instead of four.
    pub skb_span_start: u32,
    /// Length of that span, at most [`SKB_SPAN_MAX`]; 0 makes the program read each field on its
    /// own (a kernel whose fields are too far apart).
    pub skb_span_len: u32,
    /// Argument indices for the `tp_btf/kfree_skb` program (unused by the classic tracepoint).
    pub btf_args: BtfArgs,
    /// Bitmap of reasons to capture when `all_reasons` is zero (bit `r % 64` of word `r / 64`).
    pub reason_mask: [u64; (MAX_REASONS / 64) as usize],
    /// Slots of `TOTALS` the program writes, at most [`MAX_REASONS`]: reason numbers at or
    /// above the last slot share it. Userspace sets it just above the kernel's highest reason
    /// number, so that a drain reads about a hundred slots rather than all of them (the read
    /// costs per slot and per CPU, once a second even on an idle node).
    pub total_slots: u32,
    /// Zero: explicit padding, so that the struct has no hidden bytes.
    pub reserved: u32,
}

impl Default for ProgramConfig {
    fn default() -> Self {
        Self {
            layout: KernelLayout::default(),
            all_reasons: 1,
            netns_filter: 0,
            skb_span_start: 0,
            skb_span_len: 0,
            btf_args: BtfArgs::NONE,
            reason_mask: [0; (MAX_REASONS / 64) as usize],
            total_slots: MAX_REASONS,
            reserved: 0,
        }
    }
}

/// Which end of a connection the kernel saw it on (`ConnKey::side`).
pub mod conn_side {
    /// The local socket opened it: TCP `SYN_SENT -> ESTABLISHED`, or the first UDP datagram a
    /// local socket sends to a peer. The source is the local address.
    pub const CONNECT: u8 = 1;
    /// The local socket accepted it: TCP `SYN_RECV -> ESTABLISHED`, or the first UDP datagram
    /// a local socket receives from a peer it has not sent to. The destination is local.
    pub const ACCEPT: u8 = 2;
}

/// Indexes into the per-CPU `CONN_LOSSES` array of the connection programs; userspace exports
/// them as `deny_observer_events_lost_total{stage}`.
pub mod conn_loss {
    /// A new connection key could not be inserted into the connection map (it is full): the
    /// connection is not counted.
    pub const MAP_FULL: u32 = 0;
    /// A tracepoint record, socket address or packet header could not be read.
    pub const READ: u32 = 1;
    /// Number of slots.
    pub const COUNT: u32 = 4;
}

/// Key of the connection map: accepted connections (TCP) and flows (UDP) per edge.
///
/// The source port is left out, so every connection of one client to one service is one key.
/// Addresses are IPv4-mapped for IPv4, as in [`FlowKey`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ConnKey {
    /// The side that opened the connection.
    pub src_addr: [u8; 16],
    /// The side that accepted it.
    pub dst_addr: [u8; 16],
    /// Destination port (host order).
    pub dst_port: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// One of [`conn_side`].
    pub side: u8,
}

/// Key of the UDP flow tracker, from the local socket's point of view; a datagram in either
/// direction between the same two sockets has the same key, so replies are not new flows.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct UdpTuple {
    /// Address of the local socket (IPv4-mapped for IPv4).
    pub local_addr: [u8; 16],
    /// Address of the peer.
    pub remote_addr: [u8; 16],
    /// Local port (host order).
    pub local_port: u16,
    /// Peer port (host order).
    pub remote_port: u16,
}

/// Layout facts of the connection programs, set by userspace with
/// `EbpfLoader::override_global("CONN_CONFIG", ..)`: offsets in the `sock:inet_sock_set_state`
/// record (from its format file) and in kernel structs (from BTF).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnConfig {
    /// `oldstate` (int) in the tracepoint record.
    pub tp_oldstate: u32,
    /// `newstate` (int).
    pub tp_newstate: u32,
    /// `sport` (u16, host order).
    pub tp_sport: u32,
    /// `dport` (u16, host order).
    pub tp_dport: u32,
    /// `family` (u16).
    pub tp_family: u32,
    /// `protocol` (u16).
    pub tp_protocol: u32,
    /// `saddr` (4 bytes).
    pub tp_saddr: u32,
    /// `daddr` (4 bytes).
    pub tp_daddr: u32,
    /// `saddr_v6` (16 bytes).
    pub tp_saddr_v6: u32,
    /// `daddr_v6` (16 bytes).
    pub tp_daddr_v6: u32,
    /// `offsetof(struct sk_buff, head)`.
    pub skb_head: u32,
    /// `offsetof(struct sk_buff, network_header)` (u16).
    pub skb_network_header: u32,
    /// `offsetof(struct sk_buff, transport_header)` (u16).
    pub skb_transport_header: u32,
    /// `offsetof(struct sock, sk_protocol)` (u16).
    pub sk_protocol: u32,
    /// `offsetof(struct sock, sk_receive_queue) + offsetof(struct sk_buff_head, prev)`: the
    /// datagram queued last.
    pub sk_rcvq_prev: u32,
    /// `offsetof(struct sock, sk_receive_queue) + offsetof(struct sk_buff_head, qlen)` (u32):
    /// datagrams in the queue.
    pub sk_rcvq_qlen: u32,
    /// `offsetof(struct sock, __sk_common.skc_family)` (u16): the BTF TCP hook reads the
    /// socket itself rather than a tracepoint record. This and the six below are 0 when the
    /// classic tracepoint is used.
    pub sk_family: u32,
    /// `skc_num`: the local port (u16, host order).
    pub sk_num: u32,
    /// `skc_dport`: the peer's port (u16, network order).
    pub sk_dport: u32,
    /// `skc_rcv_saddr`: the local IPv4 address.
    pub sk_rcv_saddr: u32,
    /// `skc_daddr`: the peer's IPv4 address.
    pub sk_daddr: u32,
    /// `skc_v6_rcv_saddr`: the local IPv6 address.
    pub sk_v6_rcv_saddr: u32,
    /// `skc_v6_daddr`: the peer's IPv6 address.
    pub sk_v6_daddr: u32,
    /// First port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
    pub ephemeral_lo: u32,
    /// Last port of the ephemeral range.
    pub ephemeral_hi: u32,
    /// A UDP 4-tuple with no datagram for this many seconds starts a new flow when traffic
    /// resumes (as conntrack's UDP timeout does).
    pub udp_idle_secs: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of them are #[repr(C)], Copy, made only of integers and integer arrays, and have
    // no padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::SampleEvent {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::BtfArgs {}
    unsafe impl aya::Pod for super::ProgramConfig {}
    unsafe impl aya::Pod for super::LocationRange {}
    unsafe impl aya::Pod for super::LocationTable {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::UdpTuple {}
    unsafe impl aya::Pod for super::ConnConfig {}
    unsafe impl aya::Pod for super::CacheEntry {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::CacheConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_no_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<FlowValue>(), 24);
        assert_eq!(
            size_of::<SampleEvent>(),
            8 + 8 + size_of::<FlowKey>() + 4 + 4 + 2 + 1 + 1
        );
        assert_eq!(size_of::<KernelLayout>(), 14 * 4);
        assert_eq!(size_of::<BtfArgs>(), 4 * 4);
        assert_eq!(size_of::<LocationRange>(), 24);
        assert_eq!(size_of::<LocationTable>(), 24 * LOCATION_RANGES_MAX + 8);
        assert_eq!(
            size_of::<ProgramConfig>(),
            14 * 4 + 8 + 8 + 4 * 4 + 8 * 8 + 8
        );
        // The reason mask stays 8-byte aligned right after the u32 fields: no hidden padding.
        assert_eq!(core::mem::offset_of!(ProgramConfig, btf_args), 14 * 4 + 16);
        assert_eq!(
            core::mem::offset_of!(ProgramConfig, reason_mask),
            14 * 4 + 16 + 16
        );
        assert_eq!(size_of::<ConnKey>(), 16 + 16 + 2 + 1 + 1);
        assert_eq!(size_of::<UdpTuple>(), 16 + 16 + 2 + 2);
        assert_eq!(size_of::<ConnConfig>(), 26 * 4);
        assert_eq!(size_of::<CacheEntry>(), size_of::<FlowKey>() + 4 + 8 + 8);
        assert_eq!(size_of::<CacheEntry>(), 64);
        assert_eq!(core::mem::offset_of!(CacheEntry, packets), 48);
        assert_eq!(size_of::<CpuState>(), 128);
        assert_eq!(core::mem::offset_of!(CpuState, tail), 64);
        assert_eq!(core::mem::offset_of!(CpuState, counted), 32);
        assert_eq!(size_of::<CacheConfig>(), 16);
        assert!(CACHE_WAYS.is_power_of_two() && CACHE_LINES_MAX >= CACHE_WAYS);
    }
}
