//! Accepted connections: TCP connections and UDP flows per (source, destination, protocol,
//! destination port), counted where they are set up rather than per packet.
//!
//! - TCP: the `sock:inet_sock_set_state` tracepoint, which fires a handful of times per
//!   connection. `SYN_SENT -> ESTABLISHED` is the client's end, `SYN_RECV -> ESTABLISHED` the
//!   server's. A SYN dropped by a firewall never gets there, so a denied connection is never
//!   counted as allowed. The record carries addresses and ports, so no kernel struct is read.
//! - UDP has no connection state, so it is seen per datagram when a socket has queued it:
//!   `tp_btf/sk_data_ready` (Linux 6.6 and later; no kprobe or fentry, which some kernels, this
//!   project's CI among them, refuse). A datagram a firewall or a closed port dropped never
//!   gets there, and a sender pays nothing. A datagram to an ephemeral port from a non-ephemeral
//!   one is a reply and is skipped. A tracker keyed by the 4-tuple counts a flow on its first
//!   datagram, or its first after `udp_idle_secs` of silence; the rest cost one map lookup.
//!
//! Each end of a connection that this kernel sees is counted, tagged with its side
//! ([`conn_side`]); userspace keeps one side per connection (see `capture::connections`).
//! Loopback traffic is not counted: it never leaves one pod or one host.
use crate::program::load;
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};
use observer_ebpf::{ConnConfig, ConnKey, UdpTuple, conn_loss, conn_side};

/// Set by userspace with `EbpfLoader::override_global("CONN_CONFIG", ..)`.
#[unsafe(no_mangle)]
static CONN_CONFIG: ConnConfig = ConnConfig {
    tp_oldstate: 0,
    tp_newstate: 0,
    tp_sport: 0,
    tp_dport: 0,
    tp_family: 0,
    tp_protocol: 0,
    tp_saddr: 0,
    tp_daddr: 0,
    tp_saddr_v6: 0,
    tp_daddr_v6: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    sk_protocol: 0,
    sk_rcvq_prev: 0,
    sk_rcvq_qlen: 0,
    sk_family: 0,
    sk_num: 0,
    sk_dport: 0,
    sk_rcv_saddr: 0,
    sk_daddr: 0,
    sk_v6_rcv_saddr: 0,
    sk_v6_daddr: 0,
    ephemeral_lo: 32768,
    ephemeral_hi: 60999,
    udp_idle_secs: 30,
};

/// Connections per edge and side. A plain (non-LRU) hash: an established edge is never pushed
/// out by a burst of new ones; when it is full, new edges are counted as `conn_loss::MAP_FULL`.
/// The size is set by userspace at load time.
#[map]
static CONNECTIONS: PerCpuHashMap<ConnKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

/// Last datagram time (`bpf_ktime_get_ns`) per local UDP socket 4-tuple. LRU: an evicted
/// tuple only means its next datagram counts as a new flow. Sized by userspace.
#[map]
static UDP_TRACK: LruHashMap<UdpTuple, u64> = LruHashMap::with_max_entries(65536, 0);

/// Loss counters, indexed by `conn_loss::*`.
#[map]
static CONN_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(conn_loss::COUNT, 0);

macro_rules! conn_config {
    ($field:ident) => {
        // SAFETY: CONN_CONFIG is a plain, always-initialised static. Volatile: the loader
        // replaces the placeholder, so the compiler must not fold it.
        unsafe { core::ptr::read_volatile(&raw const CONN_CONFIG.$field) }
    };
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
/// Refresh a tracker entry at most this often, so a stream of datagrams does not write the
/// shared map on every one of them.
const UDP_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn count_loss(slot: u32) {
    if let Some(p) = CONN_LOSSES.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU.
        unsafe { *p += 1 };
    }
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copies with fault handling; a bad address is an error.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.map_err(i64::from)
}

#[inline(always)]
fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// 127.0.0.0/8 (plain or IPv4-mapped) and ::1.
#[inline(always)]
fn is_loopback(a: &[u8; 16]) -> bool {
    let v4_mapped = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
    if v4_mapped {
        return a[12] == 127;
    }
    a[..15].iter().all(|b| *b == 0) && a[15] == 1
}

#[inline(always)]
fn count(key: &ConnKey) {
    if is_loopback(&key.src_addr) || is_loopback(&key.dst_addr) {
        return;
    }
    if let Some(p) = CONNECTIONS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value; tracing programs do not nest on a CPU.
        unsafe { *p += 1 };
        return;
    }
    match CONNECTIONS.insert(key, 1u64, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(e) if e == -17 => {
            // Another CPU inserted it meanwhile: its slot is separate from ours.
            if let Some(p) = CONNECTIONS.get_ptr_mut(key) {
                // SAFETY: as above.
                unsafe { *p += 1 };
            }
        }
        Err(_) => count_loss(conn_loss::MAP_FULL),
    }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        count_loss(conn_loss::READ);
    }
    0
}

#[inline(always)]
fn tp<T>(ctx: &TracePointContext, off: u32) -> Result<T, i64> {
    // SAFETY: an offset of a field of this tracepoint's record, from its format file; the read
    // is a fault-handled helper copy.
    unsafe { ctx.read_at::<T>(off as usize) }.map_err(i64::from)
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let newstate: i32 = tp(ctx, conn_config!(tp_newstate))?;
    if newstate != TCP_ESTABLISHED {
        return Ok(());
    }
    let Some(side) = established_side(tp(ctx, conn_config!(tp_oldstate))?, newstate) else {
        return Ok(());
    };
    if tp::<u16>(ctx, conn_config!(tp_protocol))? != IPPROTO_TCP {
        return Ok(());
    }
    let (saddr, daddr) = match tp::<u16>(ctx, conn_config!(tp_family))? {
        AF_INET => (
            mapped_v4(tp(ctx, conn_config!(tp_saddr))?),
            mapped_v4(tp(ctx, conn_config!(tp_daddr))?),
        ),
        AF_INET6 => (
            tp(ctx, conn_config!(tp_saddr_v6))?,
            tp(ctx, conn_config!(tp_daddr_v6))?,
        ),
        _ => return Ok(()),
    };
    let sport: u16 = tp(ctx, conn_config!(tp_sport))?;
    let dport: u16 = tp(ctx, conn_config!(tp_dport))?;
    // The record is the local socket's view: s* is this end, d* the peer.
    count_established(side, saddr, daddr, sport, dport);
    Ok(())
}

/// The client's (`CONNECT`) or server's (`ACCEPT`) end of a connection that just reached
/// ESTABLISHED, from the local socket's view of it (`local`, `peer`): the edge always runs
/// from the client to the server's port.
#[inline(always)]
fn count_established(side: u8, local: [u8; 16], peer: [u8; 16], local_port: u16, peer_port: u16) {
    let key = if side == conn_side::CONNECT {
        ConnKey {
            src_addr: local,
            dst_addr: peer,
            dst_port: peer_port,
            protocol: IPPROTO_TCP as u8,
            side,
        }
    } else {
        ConnKey {
            src_addr: peer,
            dst_addr: local,
            dst_port: local_port,
            protocol: IPPROTO_TCP as u8,
            side,
        }
    };
    count(&key);
}

/// The side a state change marks, or `None` when it is not a handshake completing.
#[inline(always)]
fn established_side(oldstate: i32, newstate: i32) -> Option<u8> {
    if newstate != TCP_ESTABLISHED {
        return None;
    }
    match oldstate {
        TCP_SYN_SENT => Some(conn_side::CONNECT),
        TCP_SYN_RECV => Some(conn_side::ACCEPT),
        _ => None,
    }
}

/// `tp_btf/inet_sock_set_state`, preferred over the classic tracepoint where BTF allows: the
/// classic one fills a trace record (addresses, ports, states) on every state change of every
/// TCP socket, about eight per connection, before the program even looks at the states. Here
/// the states are plain arguments, and the socket is read only for the one change that
/// counts.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    // Arguments: `const struct sock *sk, const int oldstate, const int newstate`.
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    let Some(side) = established_side(oldstate, newstate) else {
        return 0;
    };
    let sk: *const u8 = ctx.arg(0);
    established_sock(sk as u64, side);
    0
}

/// Reads the socket with plain loads ([`load`]), as `udp_recv` does: `sk` is the tp_btf
/// argument, `struct sock *` to the verifier. The seven helper reads this made until
/// 2026-12-03 cost about 220 ns on each of the two runs per connection that get here (75 ns
/// averaged over all six; `bpf_stats`, docs/perf-notes.md, thirteenth round). A load that
/// faults reads 0 (the kernel hands over a live socket, so it does not happen in practice): a
/// zero family is not counted, a zero address or port would be counted as such.
///
/// `sk_protocol` is a `u16` from Linux 5.6; the loader does not load this program on a kernel
/// where it is still a bitfield (see its `tcp_btf_offsets`).
#[inline(always)]
fn established_sock(sk: u64, side: u8) {
    if sk == 0 || load::<u16>(sk, conn_config!(sk_protocol)) != IPPROTO_TCP {
        return;
    }
    let (local, peer) = match load::<u16>(sk, conn_config!(sk_family)) {
        AF_INET => (
            mapped_v4(load::<u32>(sk, conn_config!(sk_rcv_saddr)).to_ne_bytes()),
            mapped_v4(load::<u32>(sk, conn_config!(sk_daddr)).to_ne_bytes()),
        ),
        AF_INET6 => (
            load_in6(sk, conn_config!(sk_v6_rcv_saddr)),
            load_in6(sk, conn_config!(sk_v6_daddr)),
        ),
        _ => return,
    };
    let local_port: u16 = load(sk, conn_config!(sk_num));
    let peer_port = u16::from_be(load(sk, conn_config!(sk_dport)));
    count_established(side, local, peer, local_port, peer_port);
}

/// A `struct in6_addr` at `sk + off`, as four 32-bit loads: its alignment is its `__be32`
/// member's, and a load moves at most 8 bytes.
#[inline(always)]
fn load_in6(sk: u64, off: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = load::<u32>(sk, off + 4 * i as u32).to_ne_bytes();
        a[4 * i..4 * i + 4].copy_from_slice(&w);
        i += 1;
    }
    a
}

/// Counts a UDP flow the first time (or the first time after a silence) a datagram arrives
/// for the local socket from its peer.
#[inline(always)]
fn track_udp(tuple: &UdpTuple, side: u8) {
    if is_loopback(&tuple.local_addr) || is_loopback(&tuple.remote_addr) {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(last) = UDP_TRACK.get_ptr_mut(tuple) {
        // SAFETY: the value of a live LRU entry; a racing update of the same u64 only changes
        // which recent timestamp is kept.
        let prev = unsafe { *last };
        let idle_ns = u64::from(conn_config!(udp_idle_secs)) * 1_000_000_000;
        if now.saturating_sub(prev) < UDP_REFRESH_NS {
            return;
        }
        // SAFETY: as above.
        unsafe { *last = now };
        if now.saturating_sub(prev) < idle_ns {
            return;
        }
    } else if UDP_TRACK.insert(tuple, now, 0).is_err() {
        count_loss(conn_loss::MAP_FULL);
    }
    let key = if side == conn_side::CONNECT {
        ConnKey {
            src_addr: tuple.local_addr,
            dst_addr: tuple.remote_addr,
            dst_port: tuple.remote_port,
            protocol: IPPROTO_UDP,
            side,
        }
    } else {
        ConnKey {
            src_addr: tuple.remote_addr,
            dst_addr: tuple.local_addr,
            dst_port: tuple.local_port,
            protocol: IPPROTO_UDP,
            side,
        }
    };
    count(&key);
}

#[btf_tracepoint(function = "sk_data_ready")]
pub fn udp_recv(ctx: BtfTracePointContext) -> u32 {
    // Argument 0 of sk_data_ready is the `const struct sock *`.
    let sk: *const u8 = ctx.arg(0);
    if try_udp_recv(sk as u64).is_err() {
        count_loss(conn_loss::READ);
    }
    0
}

#[inline(always)]
fn ephemeral(port: u16) -> bool {
    let p = u32::from(port);
    p >= conn_config!(ephemeral_lo) && p <= conn_config!(ephemeral_hi)
}

/// Reads the socket and its last queued buffer with plain loads ([`load`]): this runs for
/// every segment any socket on the node receives, TCP included, and nearly all of those runs
/// stop at the socket's protocol. `sk` is the tp_btf argument, `struct sock *` to the
/// verifier. `sk_data_ready` exists from Linux 6.6, where `sk_protocol` is a plain `u16`.
fn try_udp_recv(sk: u64) -> Result<(), i64> {
    if sk == 0 || load::<u16>(sk, conn_config!(sk_protocol)) != u16::from(IPPROTO_UDP) {
        return Ok(());
    }
    // UDP wakes the reader right after queueing the datagram at the tail of the receive
    // queue. A reader that already took it may have emptied the queue.
    if load::<u32>(sk, conn_config!(sk_rcvq_qlen)) == 0 {
        return Ok(());
    }
    // A `struct sk_buff *` loaded from the socket is BTF-typed too.
    let skb: u64 = load(sk, conn_config!(sk_rcvq_prev));
    if skb == 0 {
        return Ok(());
    }
    // `head` points to bytes, not a struct: the verifier hands it over as a plain number,
    // and the packet is read through the helper.
    let head: u64 = load(skb, conn_config!(skb_head));
    let nh: u16 = load(skb, conn_config!(skb_network_header));
    let th: u16 = load(skb, conn_config!(skb_transport_header));
    let ip = head + u64::from(nh);
    // Version and, at the protocol's offset, the protocol. IPv6 with extension headers before
    // UDP is not counted. Twenty bytes is IPv4's fixed header, addresses included, so IPv4 takes
    // one read.
    let first: [u8; 20] = read(ip, 0)?;
    let (local_addr, remote_addr) = match first[0] >> 4 {
        4 if first[9] == IPPROTO_UDP => (
            mapped_v4([first[16], first[17], first[18], first[19]]),
            mapped_v4([first[12], first[13], first[14], first[15]]),
        ),
        6 if first[6] == IPPROTO_UDP => (read(ip, 24)?, read(ip, 8)?),
        _ => return Ok(()),
    };
    // The UDP header's source and destination ports, network order.
    let ports: [u8; 4] = read(head + u64::from(th), 0)?;
    let remote_port = u16::from_be_bytes([ports[0], ports[1]]);
    let local_port = u16::from_be_bytes([ports[2], ports[3]]);
    // A datagram to an ephemeral port from a service port is a reply to a client socket: its
    // flow was opened by the client, and is counted where the request arrived.
    if ephemeral(local_port) && !ephemeral(remote_port) {
        return Ok(());
    }
    track_udp(
        &UdpTuple {
            local_addr,
            remote_addr,
            local_port,
            remote_port,
        },
        conn_side::ACCEPT,
    );
    Ok(())
}
