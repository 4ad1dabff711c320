//! `skb:kfree_skb` tracepoint: counts every dropped packet per flow key, exactly.
//!
//! Accounting order is part of the contract with userspace (`capture::drain`): the flow entry is
//! updated first, then the per-reason total. Userspace reads the totals first and the flows
//! second, so `totals - flows` never over-estimates the packets lost to eviction.
//!
//! All struct offsets come from [`CONFIG`], which userspace fills from BTF and from the
//! tracepoint's format file (Rust eBPF has no CO-RE).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use observer_ebpf::{
    Counter, FlowKey, FlowValue, KernelLayout, MAX_REASONS, ProgramConfig, SampleEvent, family,
    loss,
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
    },
    all_reasons: 1,
    netns_filter: 0,
    reason_mask: [0; (MAX_REASONS / 64) as usize],
};

/// Per-flow counters. The size is set by userspace at load time.
#[map]
static FLOWS: LruPerCpuHashMap<FlowKey, FlowValue> = LruPerCpuHashMap::with_max_entries(65536, 0);

/// Exact per-reason totals (reasons at or above `MAX_REASONS` share the last slot); never evicted.
#[map]
static TOTALS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_REASONS, 0);

/// Loss counters, indexed by `loss::*`.
#[map]
static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(loss::COUNT, 0);

/// One [`SampleEvent`] per key a CPU inserts. The size is set by userspace at load time.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Reads one field of [`CONFIG`] through a volatile load: the compiler must not fold the
/// placeholder value into the code, since the loader replaces it.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: CONFIG is a plain, always-initialised static; the pointer is valid.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$($field)+) }
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
/// IPv6 extension headers followed at most; more than this is unusual enough to stop parsing.
const MAX_EXT_HEADERS: usize = 6;

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    match try_kfree_skb(&ctx) {
        Ok(ret) => ret,
        Err(_) => 0,
    }
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

fn try_kfree_skb(ctx: &TracePointContext) -> Result<u32, i64> {
    let tp_reason = config!(layout.tp_reason);
    let reason: u32 = if tp_reason == u32::MAX {
        0
    } else {
        // SAFETY: offset of a 4-byte field of the record, from the format file.
        match unsafe { ctx.read_at::<u32>(tp_reason as usize) } {
            Ok(r) => r,
            Err(_) => {
                count_loss(loss::SKB_READ);
                return Ok(0);
            }
        }
    };
    if config!(all_reasons) == 0 {
        if reason >= MAX_REASONS {
            return Ok(0);
        }
        let word = config!(reason_mask[(reason / 64) as usize]);
        if word & (1u64 << (reason % 64)) == 0 {
            return Ok(0);
        }
    }

    let mut key = FlowKey {
        reason,
        ..FlowKey::default()
    };
    let mut extra = Extra::default();
    let mut len: u32 = 0;
    let mut dev: u64 = 0;
    let off = config!(layout.tp_skbaddr) as usize;
    // SAFETY: offset of the 8-byte skbaddr field of the record.
    let skb: u64 = unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0);
    // A failed read leaves the key partially filled (family UNKNOWN): the packet still counts,
    // and the SKB_READ loss says its detail is missing.
    let mut complete = skb != 0;
    if skb != 0 {
        match read::<u32>(skb, config!(layout.skb_len)) {
            Ok(l) => len = l,
            Err(_) => complete = false,
        }
        match read_netns(skb, &mut dev) {
            Ok(ns) => key.netns = ns,
            Err(_) => complete = false,
        }
    }
    // Filter before parsing headers: other namespaces cost as little as possible.
    let netns_filter = config!(netns_filter);
    if netns_filter != 0 && key.netns != netns_filter {
        return Ok(0);
    }
    if skb != 0 && read_headers(skb, &mut key, &mut extra).is_err() {
        complete = false;
    }
    if !complete {
        count_loss(loss::SKB_READ);
    }

    let bytes = u64::from(len);
    // Flow entry first, then the total: see the module comment.
    match FLOWS.get_ptr_mut(&key) {
        Some(v) => add(v, bytes),
        None => {
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            let value = FlowValue {
                packets: 1,
                bytes,
                created_ns: now,
            };
            match FLOWS.insert(&key, &value, u64::from(BPF_NOEXIST)) {
                Ok(()) => send_sample(ctx, &key, &extra, len, dev, now),
                // Another CPU inserted the key between our lookup and insert: add to our slot.
                Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(&key) {
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
    let slot = if reason < MAX_REASONS {
        reason
    } else {
        MAX_REASONS - 1
    };
    if let Some(t) = TOTALS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
    Ok(0)
}

#[inline(always)]
fn add(v: *mut FlowValue, bytes: u64) {
    // SAFETY: pointer to this CPU's slot of a live map entry.
    unsafe {
        (*v).packets += 1;
        (*v).bytes += bytes;
    }
}

/// Network-namespace inode of `skb->dev` (0 without a device); stores the device pointer.
#[inline(always)]
fn read_netns(skb: u64, dev: &mut u64) -> Result<u32, i64> {
    *dev = read::<u64>(skb, config!(layout.skb_dev))?;
    if *dev == 0 {
        return Ok(0);
    }
    let net: u64 = read(*dev, config!(layout.dev_nd_net))?;
    if net == 0 {
        return Ok(0);
    }
    read(net, config!(layout.net_ns_inum))
}

/// Fills addresses, protocol and port from the packet headers; stops at the first failure.
#[inline(always)]
fn read_headers(skb: u64, key: &mut FlowKey, extra: &mut Extra) -> Result<(), i64> {
    let head: u64 = read(skb, config!(layout.skb_head))?;
    let nh: u16 = read(skb, config!(layout.skb_network_header))?;
    // `(typeof(skb->network_header))~0U` marks an unset header: nothing more to learn.
    if head == 0 || nh == u16::MAX {
        return Ok(());
    }
    parse_ip(head + u64::from(nh), key, extra)
}

/// Parses the IPv4/IPv6 header at `l3`, then the transport header.
#[inline(always)]
fn parse_ip(l3: u64, key: &mut FlowKey, extra: &mut Extra) -> Result<(), i64> {
    // One read covers both fixed headers; an IPv4 packet's buffer always extends past 40 bytes
    // (skb_shared_info follows the data), so the extra bytes are readable, merely unused.
    let h: [u8; 40] = read(l3, 0)?;
    let (proto, l4_off) = match h[0] >> 4 {
        4 => {
            let ihl = u32::from(h[0] & 0x0f) * 4;
            if ihl < 20 {
                return Ok(());
            }
            key.src_addr[10] = 0xff;
            key.src_addr[11] = 0xff;
            key.src_addr[12..16].copy_from_slice(&h[12..16]);
            key.dst_addr[10] = 0xff;
            key.dst_addr[11] = 0xff;
            key.dst_addr[12..16].copy_from_slice(&h[16..20]);
            key.family = family::INET;
            key.protocol = h[9];
            // Non-first fragments carry no transport header.
            if (u16::from(h[6] & 0x1f) << 8 | u16::from(h[7])) != 0 {
                return Ok(());
            }
            (h[9], ihl)
        }
        6 => {
            key.src_addr.copy_from_slice(&h[8..24]);
            key.dst_addr.copy_from_slice(&h[24..40]);
            key.family = family::INET6;
            let mut next = h[6];
            let mut off: u32 = 40;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                        let e: [u8; 2] = read(l3, off)?;
                        next = e[0];
                        off += (u32::from(e[1]) + 1) * 8;
                    }
                    IPPROTO_AH => {
                        let e: [u8; 2] = read(l3, off)?;
                        next = e[0];
                        off += (u32::from(e[1]) + 2) * 4;
                    }
                    IPPROTO_FRAGMENT => {
                        let e: [u8; 4] = read(l3, off)?;
                        next = e[0];
                        off += 8;
                        if (u16::from(e[2]) << 8 | u16::from(e[3])) >> 3 != 0 {
                            key.protocol = next;
                            return Ok(());
                        }
                    }
                    _ => break,
                }
            }
            key.protocol = next;
            (next, off)
        }
        _ => return Ok(()),
    };
    match proto {
        IPPROTO_TCP => {
            let t: [u8; 14] = read(l3, l4_off)?;
            extra.src_port = u16::from_be_bytes([t[0], t[1]]);
            key.dst_port = u16::from_be_bytes([t[2], t[3]]);
            extra.tcp_flags = t[13];
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let t: [u8; 4] = read(l3, l4_off)?;
            extra.src_port = u16::from_be_bytes([t[0], t[1]]);
            key.dst_port = u16::from_be_bytes([t[2], t[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let t: [u8; 2] = read(l3, l4_off)?;
            key.dst_port = u16::from(t[0]) << 8 | u16::from(t[1]);
        }
        _ => {}
    }
    Ok(())
}

/// Sends the detail of a newly inserted key; a full ring buffer is a counted loss.
#[inline(always)]
fn send_sample(ctx: &TracePointContext, key: &FlowKey, extra: &Extra, len: u32, dev: u64, ts: u64) {
    let Some(mut entry) = SAMPLES.reserve::<SampleEvent>(0) else {
        count_loss(loss::RINGBUF_FULL);
        return;
    };
    let off = config!(layout.tp_location) as usize;
    // SAFETY: offset of the 8-byte location field of the record.
    let location = unsafe { ctx.read_at::<u64>(off) }.unwrap_or(0);
    let ifindex = if dev == 0 {
        0
    } else {
        read::<u32>(dev, config!(layout.dev_ifindex)).unwrap_or(0)
    };
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
