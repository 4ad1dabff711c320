//! Privileged end-to-end tests of the capture stage on the real kernel.
//!
//! Each test builds its own pair of network namespaces joined by a veth pair, puts an nftables
//! table in the destination namespace that drops known ports with named counters, sends an exact
//! number of packets from the source namespace, and checks the drained counts against both the
//! number sent and the nft counters. They need root; they fail unless
//! `DENY_OBSERVER_SKIP_PRIVILEGED=1` is set, in which case they say they were skipped.
#![allow(
    clippy::unwrap_used,
    reason = "tests panic with context, keeping the stack trace"
)]
use std::collections::BTreeMap;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use observer::capture::{
    AttachKind, AttachMode, Capture, CaptureConfig, CaptureError, DrainReport, FlowDrop,
    ReasonFilter, ReasonSource,
};
use observer::flow::Protocol;

const SRC4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const DST4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Second destination address, dropped on every UDP port (many-keys test).
const WIDE4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// IPv6 twin of [`WIDE4`]: its flows' flush records take two slots of the drop-cache log.
const WIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3);
const DST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
const UDP_DROP: u16 = 5353;
const TCP_DROP: u16 = 8443;
const UDP_ALLOW: u16 = 7000;
const UDP_EXT_DROP: u16 = 5354;
const FLOOD_LO: u16 = 20000;
const FLOOD_HI: u16 = 29999;

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_stdin(args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}\ninput:\n{stdin}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, deleted on drop (also after a panic).
struct NetPair {
    src: String,
    dst: String,
    /// Inode of the destination namespace.
    dst_inode: u32,
}

impl NetPair {
    fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let pair = NetPair {
            src: format!("dobs-cap-{id}-s"),
            dst: format!("dobs-cap-{id}-d"),
            dst_inode: 0,
        };
        remove_stale_namespaces();
        run(&["ip", "netns", "add", &pair.src]);
        let mut pair = pair;
        run(&["ip", "netns", "add", &pair.dst]);
        let (s, d) = (pair.src.clone(), pair.dst.clone());
        let (mac_s, mac_d) = ("02:00:0a:c8:00:01", "02:00:0a:c8:00:02");
        run(&[
            "ip", "link", "add", "vs", "netns", &s, "address", mac_s, "type", "veth", "peer",
            "name", "vd", "netns", &d, "address", mac_d,
        ]);
        for (ns, dev, v4, v6, peer4, peer6, peer_mac) in [
            (&s, "vs", SRC4, SRC6, DST4, DST6, mac_d),
            (&d, "vd", DST4, DST6, SRC4, SRC6, mac_s),
        ] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            // Static neighbours: no ARP/ND queueing, so every packet sent reaches the peer.
            for peer in [peer4.to_string(), peer6.to_string()] {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    peer_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
        run(&[
            "ip",
            "-n",
            &d,
            "addr",
            "add",
            &format!("{WIDE4}/32"),
            "dev",
            "vd",
        ]);
        run(&[
            "ip",
            "-n",
            &d,
            "addr",
            "add",
            &format!("{WIDE6}/128"),
            "dev",
            "vd",
            "nodad",
        ]);
        for wide in [WIDE4.to_string(), WIDE6.to_string()] {
            run(&[
                "ip",
                "-n",
                &s,
                "neigh",
                "replace",
                &wide,
                "lladdr",
                mac_d,
                "dev",
                "vs",
                "nud",
                "permanent",
            ]);
        }
        let meta = std::fs::metadata(format!("/run/netns/{d}")).unwrap();
        pair.dst_inode = u32::try_from(meta.ino()).unwrap();
        let rules = format!(
            "table inet dobs {{
  counter udp_drop {{}}
  counter tcp_drop {{}}
  counter allowed {{}}
  counter flood {{}}
  counter udp_ext {{}}
  counter icmp_drop {{}}
  counter icmp6_drop {{}}
  counter wide {{}}
  counter wide6 {{}}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip daddr {WIDE4} udp dport 1-65535 counter name wide drop
    ip6 daddr {WIDE6} udp dport 1-65535 counter name wide6 drop
    udp dport {UDP_DROP} counter name udp_drop drop
    tcp dport {TCP_DROP} counter name tcp_drop drop
    udp dport {UDP_ALLOW} counter name allowed accept
    udp dport {UDP_EXT_DROP} counter name udp_ext drop
    icmp type echo-request counter name icmp_drop drop
    icmpv6 type echo-request counter name icmp6_drop drop
    udp dport {FLOOD_LO}-{FLOOD_HI} counter name flood drop
  }}
}}
"
        );
        run_stdin(&["ip", "netns", "exec", &d, "nft", "-f", "-"], &rules);
        pair
    }

    /// `(packets, bytes)` of a named nft counter in the destination namespace.
    fn counter(&self, name: &str) -> (u64, u64) {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.dst, "nft", "list", "counter", "inet", "dobs", name,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut words = text.split_whitespace();
        let mut packets = None;
        let mut bytes = None;
        while let Some(w) = words.next() {
            match w {
                "packets" => packets = words.next().and_then(|v| v.parse().ok()),
                "bytes" => bytes = words.next().and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        (packets.unwrap(), bytes.unwrap())
    }

    /// Runs `f` on a thread that has joined namespace `ns`.
    fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).unwrap();
                    // SAFETY: valid fd of a netns file; only this thread changes namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }
}

/// Deletes namespaces left by test processes that died without running their guards (SIGKILL).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("dobs-cap-")
            .and_then(|rest| rest.split('x').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl std::ops::Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn send_udp(dst: IpAddr, port: u16, count: usize) {
    let bind: SocketAddr = match dst {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let sock = UdpSocket::bind(bind).unwrap();
    for _ in 0..count {
        let sent = sock
            .send_to(&[0x5a; 32], SocketAddr::new(dst, port))
            .unwrap();
        assert_eq!(sent, 32);
    }
}

/// UDP over IPv6 with an 8-byte hop-by-hop options header (one PadN option) in front of UDP,
/// so the kernel program has to walk an extension header to find the port.
fn send_udp6_hopopts(dst: Ipv6Addr, port: u16, count: usize) {
    let sock = UdpSocket::bind("[::]:0").unwrap();
    // Next header and length are filled by the kernel; PadN with 4 bytes of padding.
    let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: valid fd and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_HOPOPTS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IPV6_HOPOPTS: {}", std::io::Error::last_os_error());
    for _ in 0..count {
        sock.send_to(&[0x5a; 32], SocketAddr::new(IpAddr::V6(dst), port))
            .unwrap();
    }
}

/// Echo requests through raw sockets (root), `count` of them.
fn send_pings(dst: IpAddr, count: usize) {
    let (domain, proto, ty) = match dst {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    let (_, storage, len) = sockaddr(SocketAddr::new(dst, 0));
    // SAFETY: plain socket calls on a fresh fd with valid buffers.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_RAW, proto);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        for seq in 0..count as u16 {
            let mut msg = [ty, 0, 0, 0, 0x12, 0x34, (seq >> 8) as u8, seq as u8];
            if domain == libc::AF_INET {
                // ICMPv4 needs our checksum (the kernel fills ICMPv6's).
                let sum: u32 = msg
                    .chunks(2)
                    .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                    .sum();
                let folded = !(((sum & 0xffff) + (sum >> 16)) as u16);
                msg[2..4].copy_from_slice(&folded.to_be_bytes());
            }
            let rc = libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const storage).cast(),
                len,
            );
            assert_eq!(
                rc,
                msg.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}

/// A non-blocking connect sends exactly one SYN; closing in SYN_SENT sends nothing more and
/// stops retransmission.
fn send_syns(dst: IpAddr, port: u16, count: usize) {
    for _ in 0..count {
        let addr = SocketAddr::new(dst, port);
        let (domain, storage, len) = sockaddr(addr);
        // SAFETY: plain socket/connect/close on a fresh fd with a valid sockaddr buffer.
        unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let rc = libc::connect(fd, (&raw const storage).cast(), len);
            let err = std::io::Error::last_os_error();
            assert!(
                rc == -1 && err.raw_os_error() == Some(libc::EINPROGRESS),
                "connect: rc {rc} {err}"
            );
            libc::close(fd);
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (
                libc::AF_INET,
                storage,
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (
                libc::AF_INET6,
                storage,
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Drains until two consecutive drains add nothing, and returns everything drained.
fn drain_settled(capture: &mut Capture) -> Vec<DrainReport> {
    let mut reports = Vec::new();
    let mut quiet = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(150));
        let r = capture.drain().unwrap();
        let empty = r.drops.is_empty() && r.reason_totals.is_empty();
        reports.push(r);
        if empty {
            quiet += 1;
            if quiet == 2 {
                return reports;
            }
        } else {
            quiet = 0;
        }
    }
    panic!("drops kept arriving for 7.5 s");
}

type FlowId = (Option<IpAddr>, Option<IpAddr>, Protocol, u16, String);

fn totals(reports: &[DrainReport]) -> BTreeMap<FlowId, (u64, u64)> {
    let mut out = BTreeMap::new();
    for d in reports.iter().flat_map(|r| &r.drops) {
        let FlowDrop {
            src,
            dst,
            protocol,
            dst_port,
            reason,
            packets,
            bytes,
            ..
        } = d;
        let e = out
            .entry((*src, *dst, *protocol, *dst_port, reason.to_string()))
            .or_insert((0, 0));
        e.0 += packets;
        e.1 += bytes;
    }
    out
}

#[test]
fn counts_nft_drops_exactly() {
    if !testkit::privileged("counts_nft_drops_exactly") {
        return;
    }
    exact_counts(AttachMode::Auto);
}

/// Whether this kernel takes the program on `tp_btf/kfree_skb` when that hook is forced (its BTF
/// describes the arguments the program needs).
fn kernel_has_kfree_skb_btf() -> bool {
    Capture::load(&CaptureConfig {
        attach: AttachMode::BtfTracepoint,
        ..CaptureConfig::default()
    })
    .is_ok()
}

/// The default prefers the BTF-enabled raw tracepoint wherever the kernel describes it (6.18
/// does), so the cheaper hook is the one under test in every other test here.
#[test]
fn auto_attaches_tp_btf_where_available() {
    if !testkit::privileged("auto_attaches_tp_btf_where_available") {
        return;
    }
    let has_btf = kernel_has_kfree_skb_btf();
    let capture = Capture::load(&CaptureConfig::default()).unwrap();
    let want = if has_btf {
        AttachKind::BtfTracepoint
    } else {
        AttachKind::Tracepoint
    };
    assert_eq!(capture.attach_kind(), want);
    // The platform this project targets (Linux 6.18, BTF) must get tp_btf; a fallback there
    // is a regression even if counts stay right.
    assert!(
        has_btf,
        "this kernel's BTF has no usable btf_trace_kfree_skb"
    );
}

/// The classic tracepoint stays a tested fallback: forced, it counts exactly too.
#[test]
fn classic_tracepoint_counts_exactly() {
    if !testkit::privileged("classic_tracepoint_counts_exactly") {
        return;
    }
    assert_eq!(exact_counts(AttachMode::Tracepoint), AttachKind::Tracepoint);
}

/// Forced tp_btf (no fallback can hide a failure) counts exactly.
#[test]
fn btf_tracepoint_counts_exactly() {
    if !testkit::privileged("btf_tracepoint_counts_exactly") {
        return;
    }
    assert_eq!(
        exact_counts(AttachMode::BtfTracepoint),
        AttachKind::BtfTracepoint
    );
}

/// Sends known packets of every kind into the nft drops and checks the drained counts, bytes,
/// namespaces and samples against what was sent and the nft counters. Returns the hook used.
fn exact_counts(attach: AttachMode) -> AttachKind {
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        attach,
        ..CaptureConfig::default()
    })
    .unwrap();

    const UDP4: usize = 37;
    const UDP6: usize = 23;
    const SYN4: usize = 11;
    const SYN6: usize = 7;
    const ALLOWED: usize = 19;
    const EXT6: usize = 13;
    const PING4: usize = 5;
    const PING6: usize = 6;
    // Listeners on the allowed port: accepted datagrams are delivered, not dropped.
    let (l4, l6) = net.in_ns(&net.dst, || {
        let l4 = UdpSocket::bind((DST4, UDP_ALLOW)).unwrap();
        let l6 = UdpSocket::bind((DST6, UDP_ALLOW)).unwrap();
        (l4, l6)
    });
    net.in_ns(&net.src, || {
        send_udp(IpAddr::V4(DST4), UDP_DROP, UDP4);
        send_udp(IpAddr::V6(DST6), UDP_DROP, UDP6);
        send_syns(IpAddr::V4(DST4), TCP_DROP, SYN4);
        send_syns(IpAddr::V6(DST6), TCP_DROP, SYN6);
        send_udp(IpAddr::V4(DST4), UDP_ALLOW, ALLOWED);
        send_udp(IpAddr::V6(DST6), UDP_ALLOW, ALLOWED);
        send_udp6_hopopts(DST6, UDP_EXT_DROP, EXT6);
        send_pings(IpAddr::V4(DST4), PING4);
        send_pings(IpAddr::V6(DST6), PING6);
    });
    let reports = drain_settled(&mut capture);
    drop((l4, l6));

    // The nft counters confirm what the kernel saw, independently of us.
    let (udp_pk, udp_bytes) = net.counter("udp_drop");
    let (tcp_pk, tcp_bytes) = net.counter("tcp_drop");
    assert_eq!(udp_pk, (UDP4 + UDP6) as u64, "nft udp_drop counter");
    assert_eq!(
        tcp_pk,
        (SYN4 + SYN6) as u64,
        "nft tcp_drop counter: one SYN per connect"
    );
    assert_eq!(net.counter("allowed").0, 2 * ALLOWED as u64);
    assert_eq!(net.counter("udp_ext").0, EXT6 as u64);
    assert_eq!(net.counter("icmp_drop").0, PING4 as u64);
    assert_eq!(net.counter("icmp6_drop").0, PING6 as u64);

    let got = totals(&reports);
    let nf = "netfilter_drop".to_string();
    let v4 = |a| Some(IpAddr::V4(a));
    let v6 = |a| Some(IpAddr::V6(a));
    let udp4 = got[&(v4(SRC4), v4(DST4), Protocol::Udp, UDP_DROP, nf.clone())];
    let udp6 = got[&(v6(SRC6), v6(DST6), Protocol::Udp, UDP_DROP, nf.clone())];
    let tcp4 = got[&(v4(SRC4), v4(DST4), Protocol::Tcp, TCP_DROP, nf.clone())];
    let tcp6 = got[&(v6(SRC6), v6(DST6), Protocol::Tcp, TCP_DROP, nf.clone())];
    assert_eq!(udp4.0, UDP4 as u64, "{got:#?}");
    assert_eq!(udp6.0, UDP6 as u64, "{got:#?}");
    assert_eq!(tcp4.0, SYN4 as u64, "{got:#?}");
    assert_eq!(tcp6.0, SYN6 as u64, "{got:#?}");
    // skb->len at the nft input hook is the IP packet: 20 + 8 + 32 and 40 + 8 + 32.
    assert_eq!(udp4.1, UDP4 as u64 * 60);
    assert_eq!(udp6.1, UDP6 as u64 * 80);
    assert_eq!(udp4.1 + udp6.1, udp_bytes, "bytes agree with nft");
    assert_eq!(tcp4.1 + tcp6.1, tcp_bytes, "bytes agree with nft");
    assert!(
        !got.keys()
            .any(|(_, _, p, port, _)| *p == Protocol::Udp && *port == UDP_ALLOW),
        "allowed traffic was counted: {got:#?}"
    );

    // Per-reason totals agree with the flows (the map did not overflow).
    let nf_total: u64 = reports
        .iter()
        .flat_map(|r| &r.reason_totals)
        .filter(|(l, _, _)| &**l == "netfilter_drop")
        .map(|(_, p, _)| p)
        .sum();
    assert_eq!(
        nf_total,
        (UDP4 + UDP6 + SYN4 + SYN6 + EXT6 + PING4 + PING6) as u64
    );
    let lost: u64 = reports.iter().map(|r| r.losses.evicted_packets).sum();
    assert_eq!(lost, 0);
    let kernel_size = observer::capture::lru_entries(65536, aya::util::nr_cpus().unwrap());
    assert!(
        reports
            .iter()
            .all(|r| r.flow_map_capacity == u64::from(kernel_size))
    );
    assert!(
        reports
            .iter()
            .all(|r| r.drops.iter().all(|d| d.netns == net.dst_inode))
    );

    // One sample per new key per CPU, with the detail the key leaves out.
    let samples = capture.samples();
    let syn = samples
        .iter()
        .find(|s| s.drop.protocol == Protocol::Tcp && s.drop.dst == v4(DST4))
        .unwrap_or_else(|| panic!("no TCP sample in {samples:#?}"));
    assert_eq!(syn.tcp_flags & 0x02, 0x02, "SYN flag");
    assert_ne!(syn.src_port, 0);
    assert_ne!(syn.ifindex, 0);
    assert_ne!(syn.location, 0);
    assert!(
        samples
            .iter()
            .any(|s| s.drop.dst == v6(DST6) && s.drop.dst_port == UDP_DROP)
    );
    capture.attach_kind()
}

/// A direct-action cls_bpf program that drops every packet (`TC_ACT_SHOT`), the way an eBPF
/// dataplane (Cilium, Calico eBPF) enforces a policy. Loaded with a raw `bpf()` call: two
/// instructions need no object file.
struct ShotProgram {
    pin: String,
}

impl ShotProgram {
    fn load() -> Self {
        #[repr(C)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
        }
        #[repr(C)]
        struct ObjPin {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_OBJ_PIN: libc::c_long = 6;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        // r0 = 2 (TC_ACT_SHOT); exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"dobs_shot");
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        // SAFETY: bpf(BPF_PROG_LOAD) with an attr whose pointers outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const attr,
                size_of::<ProgLoad>(),
            )
        };
        assert!(
            fd >= 0,
            "loading the TC_ACT_SHOT program: {}",
            std::io::Error::last_os_error()
        );
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pin = format!(
            "/sys/fs/bpf/dobs-cap-{}-shot{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::ffi::CString::new(pin.clone()).unwrap();
        let attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: u32::try_from(fd).unwrap(),
            file_flags: 0,
        };
        // SAFETY: bpf(BPF_OBJ_PIN) with a valid path and fd.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_PIN,
                &raw const attr,
                size_of::<ObjPin>(),
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: our own fd; the pin keeps the program.
        unsafe { libc::close(fd as libc::c_int) };
        assert_eq!(rc, 0, "pinning the TC_ACT_SHOT program at {pin}: {err}");
        Self { pin }
    }

    /// Attaches it to `dev`'s `direction` (`ingress`/`egress`) in namespace `ns` of `net`.
    fn attach(&self, net: &NetPair, ns: &str, dev: &str, direction: &str) {
        // Forked from a thread inside the namespace, tc works there and still sees this
        // mount namespace's bpffs (`ip netns exec` would remount /sys).
        net.in_ns(ns, || {
            let qdisc = Command::new("tc")
                .args(["qdisc", "replace", "dev", dev, "clsact"])
                .output()
                .unwrap();
            assert!(
                qdisc.status.success(),
                "tc qdisc add clsact: {}",
                String::from_utf8_lossy(&qdisc.stderr)
            );
            run(&[
                "tc", "filter", "add", "dev", dev, direction, "bpf", "da", "pinned", &self.pin,
            ]);
        });
    }
}

impl std::ops::Drop for ShotProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// Packets the clsact qdisc of `dev` in `ns` dropped (its filters' TC_ACT_SHOT verdicts).
fn clsact_dropped(net: &NetPair, ns: &str, dev: &str) -> u64 {
    let text = net.in_ns(ns, || {
        let out = Command::new("tc")
            .args(["-s", "qdisc", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    });
    let clsact = text
        .split("qdisc ")
        .find(|q| q.starts_with("clsact"))
        .unwrap_or_else(|| panic!("no clsact qdisc on {dev}:\n{text}"));
    let after = clsact
        .split("dropped ")
        .nth(1)
        .unwrap_or_else(|| panic!("no drop count:\n{text}"));
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `symbol+0xoffset` of a kernel text address, from /proc/kallsyms (root sees addresses).
fn kernel_symbol(addr: u64) -> String {
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let best = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let a = u64::from_str_radix(it.next()?, 16).ok()?;
            let _kind = it.next()?;
            Some((a, it.next()?))
        })
        .filter(|(a, _)| *a <= addr && *a != 0)
        .max_by_key(|(a, _)| *a);
    match best {
        Some((a, name)) => format!("{name}+{:#x}", addr - a),
        None => format!("{addr:#x}"),
    }
}

/// Packets of `reason` in the drained per-reason totals.
fn reason_total(reports: &[DrainReport], reason: &str) -> u64 {
    reports
        .iter()
        .flat_map(|r| &r.reason_totals)
        .filter(|(l, _, _)| &**l == reason)
        .map(|(_, p, _)| p)
        .sum()
}

/// tc drops (cls_bpf `TC_ACT_SHOT`, as eBPF dataplanes enforce policy) on ingress and egress
/// count exactly under `tc_ingress` and `tc_egress`, next to nftables drops under
/// `netfilter_drop`, on kernels with drop reasons and (from the caller of kfree_skb) on
/// kernels without. The reason filter keeps exactly the named reasons, the same way on both.
#[test]
fn counts_tc_drops_exactly() {
    if !testkit::privileged("counts_tc_drops_exactly") {
        return;
    }
    let net = NetPair::new();
    let load = |reasons: ReasonFilter| {
        Capture::load(&CaptureConfig {
            netns: Some(net.dst_inode),
            reasons,
            ..CaptureConfig::default()
        })
        .unwrap()
    };
    let mut all = load(ReasonFilter::All);
    let mut nf_only = load(ReasonFilter::Names(vec!["netfilter_drop".into()]));
    let mut tc_only = load(ReasonFilter::Names(vec![
        "tc_ingress".into(),
        "tc_egress".into(),
    ]));
    eprintln!(
        "counts_tc_drops_exactly: hook {}, reasons from {}, recursion misses reported: {}",
        all.attach_kind(),
        all.reason_source().as_str(),
        all.recursion_misses_reported()
    );
    let shot = ShotProgram::load();

    const NF: usize = 17;
    const EGRESS: usize = 13;
    const INGRESS4: usize = 11;
    const INGRESS6: usize = 7;
    // Phase 1: the destination drops what it sends (tc egress); what it receives still
    // reaches nftables.
    shot.attach(&net, &net.dst, "vd", "egress");
    net.in_ns(&net.src, || send_udp(IpAddr::V4(DST4), UDP_DROP, NF));
    net.in_ns(&net.dst, || send_udp(IpAddr::V4(SRC4), UDP_ALLOW, EGRESS));
    // Phase 2: it drops what it receives too (tc ingress, before nftables).
    shot.attach(&net, &net.dst, "vd", "ingress");
    net.in_ns(&net.src, || {
        send_udp(IpAddr::V4(DST4), UDP_DROP, INGRESS4);
        send_udp(IpAddr::V6(DST6), UDP_DROP, INGRESS6);
    });

    // The namespaces also send packets by themselves (IPv6 router solicitations, MLD
    // reports), which the programs drop too, at any time: drain until the qdisc's count held
    // still across a settled drain, so both saw the same drops.
    let mut reports = Vec::new();
    let qdisc_dropped = loop {
        let before = clsact_dropped(&net, &net.dst, "vd");
        reports.extend(drain_settled(&mut all));
        if clsact_dropped(&net, &net.dst, "vd") == before {
            break before;
        }
    };
    let nf_reports = drain_settled(&mut nf_only);
    let tc_reports = drain_settled(&mut tc_only);

    // Independent counts: nftables' counter and the clsact qdisc's drops (ours and the
    // namespace's own packets: compared with the per-reason totals; ours with the flows).
    assert_eq!(net.counter("udp_drop").0, NF as u64, "nft udp_drop counter");
    let tc_total = reason_total(&reports, "tc_ingress") + reason_total(&reports, "tc_egress");
    assert_eq!(
        tc_total, qdisc_dropped,
        "tc totals against the clsact qdisc"
    );
    assert!(qdisc_dropped >= (EGRESS + INGRESS4 + INGRESS6) as u64);

    let got = totals(&reports);
    let v4 = |a| Some(IpAddr::V4(a));
    let v6 = |a| Some(IpAddr::V6(a));
    let flow = |src, dst, port: u16, reason: &str| {
        got.get(&(src, dst, Protocol::Udp, port, reason.to_owned()))
            .map_or(0, |c| c.0)
    };
    assert_eq!(
        flow(v4(SRC4), v4(DST4), UDP_DROP, "netfilter_drop"),
        NF as u64,
        "{got:#?}"
    );
    assert_eq!(
        flow(v4(DST4), v4(SRC4), UDP_ALLOW, "tc_egress"),
        EGRESS as u64,
        "{got:#?}"
    );
    assert_eq!(
        flow(v4(SRC4), v4(DST4), UDP_DROP, "tc_ingress"),
        INGRESS4 as u64,
        "{got:#?}"
    );
    assert_eq!(
        flow(v6(SRC6), v6(DST6), UDP_DROP, "tc_ingress"),
        INGRESS6 as u64,
        "{got:#?}"
    );
    // skb->len: the IP packet on ingress (tc runs after the MAC header is pulled) and the
    // whole frame on egress.
    let bytes =
        |src, dst, port, reason: &str| got[&(src, dst, Protocol::Udp, port, reason.to_owned())].1;
    assert_eq!(
        bytes(v4(SRC4), v4(DST4), UDP_DROP, "tc_ingress"),
        INGRESS4 as u64 * 60
    );
    assert_eq!(
        bytes(v4(DST4), v4(SRC4), UDP_ALLOW, "tc_egress"),
        EGRESS as u64 * (14 + 60)
    );
    // The totals may hold the namespaces' own packets too (see above): ours are the flows.
    assert_eq!(reason_total(&reports, "netfilter_drop"), NF as u64);
    assert!(reason_total(&reports, "tc_ingress") >= (INGRESS4 + INGRESS6) as u64);

    // The filters: exactly the named reasons, nothing else.
    let nf_got: BTreeMap<String, u64> =
        ["netfilter_drop", "tc_ingress", "tc_egress", "not_specified"]
            .iter()
            .map(|r| (r.to_string(), reason_total(&nf_reports, r)))
            .collect();
    assert_eq!(
        nf_got.values().sum::<u64>(),
        NF as u64,
        "netfilter_drop filter: {nf_got:?}"
    );
    assert_eq!(nf_got["netfilter_drop"], NF as u64, "{nf_got:?}");
    let tc_got = totals(&tc_reports);
    let tc_packets: u64 = tc_got.values().map(|c| c.0).sum();
    // Drained after the others: it may hold a later packet of the namespace's own.
    assert!(
        tc_packets >= (EGRESS + INGRESS4 + INGRESS6) as u64 && tc_packets >= tc_total,
        "tc filter: {tc_got:#?}"
    );
    assert!(
        tc_got
            .keys()
            .all(|(_, _, _, _, r)| r == "tc_ingress" || r == "tc_egress"),
        "{tc_got:#?}"
    );
    // Where each kind of drop was freed from (the `location` the pre-5.17 mapping relies on).
    for s in all.samples() {
        eprintln!(
            "counts_tc_drops_exactly: {} drop freed from {}",
            s.drop.reason,
            kernel_symbol(s.location)
        );
    }
    if all.recursion_misses_reported() {
        assert!(reports.iter().all(|r| r.losses.recursion_miss.is_some()));
    }
    for r in [&reports, &nf_reports, &tc_reports] {
        let lost: u64 = r.iter().map(|r| r.losses.evicted_packets).sum();
        assert_eq!(lost, 0);
        let misses: u64 = r.iter().filter_map(|r| r.losses.recursion_miss).sum();
        assert_eq!(misses, 0, "recursion misses");
    }
}

/// Drops CAP_SYSLOG from the calling thread's effective set (capabilities are per thread; files
/// opened by this thread then carry its reduced credentials).
fn drop_cap_syslog_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_SYSLOG: usize = 34;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and the two data words v3 expects.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()),
            0,
            "capget: {}",
            std::io::Error::last_os_error()
        );
        data[CAP_SYSLOG / 32].effective &= !(1 << (CAP_SYSLOG % 32));
        assert_eq!(
            libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Without CAP_SYSLOG (the DaemonSet's CAP_BPF and CAP_PERFMON alone) /proc/kallsyms shows
/// zero addresses. A kernel with drop reasons does not need them; one without (before 5.17)
/// cannot map callers to reasons then, and must still count every drop exactly, as
/// `not_specified`, saying so instead of failing.
#[test]
fn without_cap_syslog_drops_still_count() {
    if !testkit::privileged("without_cap_syslog_drops_still_count") {
        return;
    }
    let net = NetPair::new();
    let sysctl = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    // kallsyms shows addresses without CAP_SYSLOG only in this configuration.
    let open_kallsyms = sysctl("kptr_restrict") == 0 && sysctl("perf_event_paranoid") <= 1;
    const SENT: usize = 9;
    let (source, got) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                drop_cap_syslog_in_this_thread();
                let mut capture = Capture::load(&CaptureConfig {
                    netns: Some(net.dst_inode),
                    ..CaptureConfig::default()
                })
                .unwrap();
                net.in_ns(&net.src, || send_udp(IpAddr::V4(DST4), UDP_DROP, SENT));
                let reports = drain_settled(&mut capture);
                (capture.reason_source(), totals(&reports))
            })
            .join()
            .unwrap()
    });
    eprintln!(
        "without_cap_syslog_drops_still_count: reasons from {}",
        source.as_str()
    );
    let expected = match source {
        ReasonSource::Kernel => "netfilter_drop",
        ReasonSource::CallSite { .. } => {
            assert!(open_kallsyms, "kallsyms was readable without CAP_SYSLOG");
            "netfilter_drop"
        }
        ReasonSource::Unavailable => {
            assert!(!open_kallsyms);
            "not_specified"
        }
    };
    let key = (
        Some(IpAddr::V4(SRC4)),
        Some(IpAddr::V4(DST4)),
        Protocol::Udp,
        UDP_DROP,
        expected.to_owned(),
    );
    assert_eq!(got.get(&key).map(|c| c.0), Some(SENT as u64), "{got:#?}");
    assert_eq!(net.counter("udp_drop").0, SENT as u64);
}

#[test]
fn tiny_flow_map_reports_evictions() {
    if !testkit::privileged("tiny_flow_map_reports_evictions") {
        return;
    }
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        flow_map_entries: 16,
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into()]),
        // The flow map alone: its eviction accounting is under test.
        drop_log_records: 0,
        ..CaptureConfig::default()
    })
    .unwrap();
    let mut reports = Vec::new();
    // Twice what the kernel map holds (its size has headroom over the 16 asked for).
    let nr_cpus = aya::util::nr_cpus().unwrap();
    let ports = u16::try_from(observer::capture::lru_entries(16, nr_cpus) * 2).unwrap();
    assert!(
        ports <= FLOOD_HI - FLOOD_LO + 1,
        "{ports} flows do not fit the nft flood range"
    );
    // All flows before one drain: evicting a key that a drain already read loses nothing, so
    // only keys evicted before any drain saw them show up as loss.
    net.in_ns(&net.src, || {
        for p in 0..ports {
            send_udp(IpAddr::V4(DST4), FLOOD_LO + p, 3);
        }
    });
    reports.push(capture.drain().unwrap());
    reports.extend(drain_settled(&mut capture));
    let (nft_packets, nft_bytes) = net.counter("flood");
    assert_eq!(nft_packets, u64::from(ports) * 3);
    let counted: u64 = reports
        .iter()
        .flat_map(|r| &r.drops)
        .map(|d| d.packets)
        .sum();
    let counted_bytes: u64 = reports.iter().flat_map(|r| &r.drops).map(|d| d.bytes).sum();
    let evicted: u64 = reports.iter().map(|r| r.losses.evicted_packets).sum();
    let evicted_bytes: u64 = reports.iter().map(|r| r.losses.evicted_bytes).sum();
    eprintln!("counted {counted}, evicted {evicted}, nft {nft_packets}");
    assert!(evicted > 0, "a 16-entry map cannot hold {ports} flows");
    assert_eq!(counted + evicted, nft_packets);
    assert_eq!(counted_bytes + evicted_bytes, nft_bytes);
    let kernel_total: u64 = reports
        .iter()
        .flat_map(|r| &r.reason_totals)
        .map(|(_, p, _)| p)
        .sum();
    assert_eq!(kernel_total, nft_packets, "per-reason totals are exact");
    let kernel_size = u64::from(observer::capture::lru_entries(16, nr_cpus));
    assert!(reports.iter().all(|r| r.flow_map_entries <= kernel_size));
}

/// 50,000 distinct flows: every packet is accounted (counted or reported lost), and a drain of a
/// map that full stays well inside the one-second drain period.
#[test]
fn fifty_thousand_flows() {
    if !testkit::privileged("fifty_thousand_flows") {
        return;
    }
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into()]),
        ..CaptureConfig::default()
    })
    .unwrap();
    const KEYS: u16 = 50_000;
    net.in_ns(&net.src, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for port in 1..=KEYS {
            sock.send_to(&[0x5a; 32], SocketAddr::new(IpAddr::V4(WIDE4), port))
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let first = capture.drain().unwrap();
    let first_time = start.elapsed();
    let start = std::time::Instant::now();
    let second = capture.drain().unwrap();
    let second_time = start.elapsed();
    let mut reports = vec![first, second];
    reports.extend(drain_settled(&mut capture));
    let (nft_packets, _) = net.counter("wide");
    assert_eq!(nft_packets, u64::from(KEYS));
    let counted: u64 = reports
        .iter()
        .flat_map(|r| &r.drops)
        .map(|d| d.packets)
        .sum();
    let evicted: u64 = reports.iter().map(|r| r.losses.evicted_packets).sum();
    eprintln!(
        "50k flows: first drain {first_time:?} ({} keys), idle drain {second_time:?}; counted {counted}, evicted {evicted}",
        reports[0].flow_map_entries
    );
    assert_eq!(counted + evicted, nft_packets);
    assert!(
        counted >= u64::from(KEYS) * 9 / 10,
        "a 65536-entry map lost {evicted} of {KEYS} keys"
    );
    assert!(
        first_time < Duration::from_secs(5) && second_time < Duration::from_secs(5),
        "drain too slow: {first_time:?} / {second_time:?}"
    );
}

/// Many flows through the drop cache: each key's packets are counted exactly, whether a
/// drain reads them from a live line, from a flush record, or both; with a cache so small
/// that nearly every packet evicts another flow, with a flush log so small that most
/// evictions are refused and go to the flow map instead, and with a cache large enough for
/// the flows, where they keep their lines and flush records are rare.
#[test]
fn drop_cache_counts_many_flows_exactly() {
    if !testkit::privileged("drop_cache_counts_many_flows_exactly") {
        return;
    }
    for (lines, log_records, expect_log_full) in
        [(64, 1 << 14, false), (64, 4, true), (4096, 1 << 14, false)]
    {
        let net = NetPair::new();
        let mut capture = Capture::load(&CaptureConfig {
            netns: Some(net.dst_inode),
            reasons: ReasonFilter::Names(vec!["netfilter_drop".into()]),
            drop_log_records: log_records,
            drop_cache_lines: lines,
            ..CaptureConfig::default()
        })
        .unwrap();
        let stats = capture.drop_cache_stats().expect("the drop cache is on");
        // With the small cache, far more flows than lines. With the large one, two flows (one
        // per family) per port and a sixteenth as many flows as lines (the memory cap may have
        // shrunk the cache on a machine with many CPUs): nearly every flow keeps a line.
        let flows_count: u16 = if lines == 64 {
            1000
        } else {
            u16::try_from(stats.lines_per_cpu / 32)
                .unwrap_or(u16::MAX)
                .clamp(1, 1000)
        };
        const ROUNDS: usize = 3;
        let mut reports = Vec::new();
        // Round robin over the ports (with the small cache each packet evicts another key's
        // line), IPv4 and IPv6 flows interleaved (flush records of one and two slots), with drains between rounds
        // so that live lines are read and later flushed.
        for _ in 0..ROUNDS {
            net.in_ns(&net.src, || {
                let sock = UdpSocket::bind("[::]:0").unwrap();
                for port in 1..=flows_count {
                    for dst in [IpAddr::V6(WIDE4.to_ipv6_mapped()), IpAddr::V6(WIDE6)] {
                        sock.send_to(&[0x5a; 32], SocketAddr::new(dst, port))
                            .unwrap();
                    }
                }
            });
            reports.push(capture.drain().unwrap());
        }
        reports.extend(drain_settled(&mut capture));
        let (nft_packets, nft_bytes) = net.counter("wide");
        let (nft6_packets, nft6_bytes) = net.counter("wide6");
        assert_eq!(nft_packets, u64::from(flows_count) * ROUNDS as u64);
        assert_eq!(nft6_packets, u64::from(flows_count) * ROUNDS as u64);
        let per_flow = totals(&reports);
        assert_eq!(
            per_flow.len(),
            2 * usize::from(flows_count),
            "one key per port and family"
        );
        for (id, (packets, bytes)) in &per_flow {
            let per_packet = if id.1 == Some(IpAddr::V4(WIDE4)) {
                nft_bytes / nft_packets
            } else {
                nft6_bytes / nft6_packets
            };
            assert_eq!(*packets, ROUNDS as u64, "{id:?}");
            assert_eq!(*bytes, per_packet * ROUNDS as u64, "{id:?}");
        }
        let evicted: u64 = reports.iter().map(|r| r.losses.evicted_packets).sum();
        assert_eq!(evicted, 0);
        let log_full: u64 = reports.iter().map(|r| r.losses.drop_log_full).sum();
        let records = capture.drop_cache_stats().map_or(0, |s| s.flush_records);
        eprintln!(
            "{} lines per CPU, log of {log_records}: {log_full} evictions refused, \
             {records} flush records for {} packets",
            stats.lines_per_cpu,
            nft_packets + nft6_packets
        );
        if lines == 64 {
            // 2,000 flows round robin through 64 lines: nearly every packet but the first
            // of a line evicts (or, with the tiny log, is refused).
            assert!(
                records + log_full >= (nft_packets + nft6_packets) * 9 / 10,
                "{records} records, {log_full} refused"
            );
            // Every probe misses, so the CPU soon counts past its cache.
            let one_shot = capture.drop_cache_stats().map_or(0, |s| s.one_shot_records);
            assert!(
                expect_log_full || one_shot > records / 2,
                "{one_shot} of {records} records were one drop past the cache"
            );
        } else {
            // An eighth of a flow per set of two lines on average: about one set in 2,500
            // holds a third flow, which evicts. Far below a tenth of the packets.
            assert!(
                records * 10 < nft_packets + nft6_packets,
                "{records} flush records for {} packets",
                nft_packets + nft6_packets
            );
        }
        assert_eq!(
            log_full > 0,
            expect_log_full,
            "log of {log_records} records"
        );
        // With room in the log every drop went through the cache; with refused evictions
        // some went to the flow map.
        let in_flow_map = reports.iter().map(|r| r.flow_map_entries).max();
        assert_eq!(in_flow_map > Some(0), expect_log_full, "{in_flow_map:?}");
        let kernel_total: u64 = reports
            .iter()
            .flat_map(|r| &r.reason_totals)
            .map(|(_, p, _)| p)
            .sum();
        assert_eq!(kernel_total, nft_packets + nft6_packets);
    }
}

/// A CPU whose drop cache thrashes (a scan: every probe misses) counts drops past it, as
/// one-drop records; when the traffic turns to a few flows again it counts in its lines again.
/// Counts stay exact through both changes.
#[test]
fn a_thrashing_drop_cache_counts_past_itself_and_recovers() {
    if !testkit::privileged("a_thrashing_drop_cache_counts_past_itself_and_recovers") {
        return;
    }
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into()]),
        drop_cache_lines: 64,
        ..CaptureConfig::default()
    })
    .unwrap();
    let one_shot = |c: &Capture| c.drop_cache_stats().map_or(0, |s| s.one_shot_records);
    let send = |ports: std::ops::RangeInclusive<u16>, times: usize| {
        net.in_ns(&net.src, || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..times {
                for port in ports.clone() {
                    sock.send_to(&[0x5a; 32], SocketAddr::from((WIDE4, port)))
                        .unwrap();
                }
            }
        });
    };
    let mut reports = Vec::new();
    // The scan: 1,000 flows round robin through 64 lines.
    send(1..=1000, 3);
    reports.extend(drain_settled(&mut capture));
    let after_scan = one_shot(&capture);
    assert!(
        after_scan > 2000,
        "{after_scan} one-drop records for 3,000 drops of 1,000 flows in 64 lines"
    );
    // Then two flows: the probes a thrashing CPU still makes hit, and it caches again.
    send(2001..=2002, 2000);
    reports.extend(drain_settled(&mut capture));
    let during_two = one_shot(&capture) - after_scan;
    assert!(
        during_two < 400,
        "{during_two} of 4,000 drops of two flows went past the cache"
    );
    let (nft_packets, _) = net.counter("wide");
    assert_eq!(nft_packets, 3000 + 4000);
    let per_flow = totals(&reports);
    assert_eq!(per_flow.len(), 1002, "one key per port");
    for (id, (packets, _)) in &per_flow {
        let expected = if id.3 > 2000 { 2000 } else { 3 };
        assert_eq!(*packets, expected, "{id:?}");
    }
    let kernel_total: u64 = reports
        .iter()
        .flat_map(|r| &r.reason_totals)
        .map(|(_, p, _)| p)
        .sum();
    assert_eq!(kernel_total, nft_packets);
    let evicted: u64 = reports.iter().map(|r| r.losses.evicted_packets).sum();
    let log_full: u64 = reports.iter().map(|r| r.losses.drop_log_full).sum();
    assert_eq!((evicted, log_full), (0, 0));
}

/// Keys idle for `idle_drains` drains are deleted from the map; when the flow comes back it is
/// counted again from zero, with nothing lost or double counted.
#[test]
fn idle_keys_are_deleted_and_recounted() {
    if !testkit::privileged("idle_keys_are_deleted_and_recounted") {
        return;
    }
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        idle_drains: 2,
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into()]),
        // Idle deletion is a flow-map behaviour; the drop cache keeps lines until replaced.
        drop_log_records: 0,
        ..CaptureConfig::default()
    })
    .unwrap();
    net.in_ns(&net.src, || send_udp(IpAddr::V4(DST4), UDP_DROP, 5));
    let first = capture.drain().unwrap();
    assert_eq!(first.flow_map_entries, 1);
    assert_eq!(first.drops.iter().map(|d| d.packets).sum::<u64>(), 5);
    let idle1 = capture.drain().unwrap();
    assert_eq!(idle1.flow_map_entries, 1);
    let idle2 = capture.drain().unwrap();
    assert_eq!(
        idle2.flow_map_entries, 0,
        "idle key deleted after 2 unchanged drains"
    );
    assert!(idle2.drops.is_empty());
    net.in_ns(&net.src, || send_udp(IpAddr::V4(DST4), UDP_DROP, 7));
    let again = capture.drain().unwrap();
    assert_eq!(again.flow_map_entries, 1);
    assert_eq!(again.drops.iter().map(|d| d.packets).sum::<u64>(), 7);
    let lost: u64 = [&first, &idle1, &idle2, &again]
        .iter()
        .map(|r| r.losses.evicted_packets)
        .sum();
    assert_eq!(lost, 0);
    assert_eq!(net.counter("udp_drop").0, 12);
}

/// One DaemonSet `--reasons` list on nodes with different kernels: a reason this kernel lacks
/// but a newer one has (`tcp_invalid_sequence`, 6.x; on 5.10 even `netfilter_drop` is only a
/// call-site label) is reported, and the node still loads and counts the others.
#[test]
fn reasons_of_newer_kernels_are_reported_not_refused() {
    if !testkit::privileged("reasons_of_newer_kernels_are_reported_not_refused") {
        return;
    }
    let newer = "tcp_invalid_sequence";
    let capture = Capture::load(&CaptureConfig {
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into(), newer.into()]),
        ..CaptureConfig::default()
    })
    .expect("a reason of another kernel must not stop the node");
    let has_newer = capture.reasons().iter().any(|(_, l)| &**l == newer);
    if has_newer {
        assert!(
            capture.unavailable_reasons().is_empty(),
            "{:?}",
            capture.unavailable_reasons()
        );
    } else {
        assert_eq!(capture.unavailable_reasons(), [newer]);
    }
    drop(capture);
    // Only reasons this kernel lacks would count nothing: refused, where the kernel lacks it.
    let only_newer = Capture::load(&CaptureConfig {
        reasons: ReasonFilter::Names(vec![newer.into()]),
        ..CaptureConfig::default()
    });
    match (has_newer, only_newer) {
        (true, Ok(_)) => {}
        (false, Err(err)) => {
            assert!(matches!(err, CaptureError::UnknownReasons { .. }), "{err}");
        }
        (has, other) => panic!("kernel has {newer}: {has}; load gave {:?}", other.err()),
    }
}

#[test]
fn unknown_reason_name_is_rejected() {
    if !testkit::privileged("unknown_reason_name_is_rejected") {
        return;
    }
    let err = Capture::load(&CaptureConfig {
        reasons: ReasonFilter::Names(vec!["netfilter_drop".into(), "no_such_reason".into()]),
        ..CaptureConfig::default()
    })
    .unwrap_err();
    assert!(matches!(err, CaptureError::UnknownReasons { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("no_such_reason"), "{msg}");
    // The valid names listed: the kernel's own, or the call-site ones before drop reasons.
    assert!(
        msg.contains("netfilter_drop") && msg.contains("tc_ingress"),
        "{msg}"
    );
}

/// Drops per second of a single-threaded UDP flood into an nft drop, for `secs`.
fn flood_rate(net: &NetPair, secs: f64) -> f64 {
    let before = net.counter("udp_drop").0;
    let start = std::time::Instant::now();
    net.in_ns(&net.src, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(SocketAddr::new(IpAddr::V4(DST4), UDP_DROP))
            .unwrap();
        // sendmmsg in batches keeps the sender's own cost small next to the drop path.
        let payload = [0x5au8; 32];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        // SAFETY: all-zero mmsghdr is valid; each points at the same iovec.
        let mut msgs: Vec<libc::mmsghdr> = (0..64)
            .map(|_| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &raw mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        while start.elapsed().as_secs_f64() < secs {
            for _ in 0..100 {
                // SAFETY: connected socket, valid mmsghdr array of the given length.
                unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), 64, 0) };
            }
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    (net.counter("udp_drop").0 - before) as f64 / elapsed
}

/// Rough hot-path cost check (not run by default): interleaves runs with no observer, with this
/// program on each hook, and with a bpftrace count-by-reason one-liner, and prints the rates;
/// then each hook's own cost per drop (`kernel.bpf_stats_enabled`) and its translated size.
/// `cargo test -p observer --test kernel flood_rates -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run explicitly"]
fn flood_rates() {
    if !testkit::privileged("flood_rates") {
        return;
    }
    let net = NetPair::new();
    let hooks = [AttachMode::BtfTracepoint, AttachMode::Tracepoint];
    let mut none = Vec::new();
    let mut ours = vec![Vec::new(); hooks.len()];
    let mut bpftrace = Vec::new();
    for _ in 0..3 {
        none.push(flood_rate(&net, 2.0));
        for (mode, rates) in hooks.iter().zip(&mut ours) {
            let mut capture = Capture::load(&CaptureConfig {
                attach: *mode,
                ..CaptureConfig::default()
            })
            .unwrap();
            rates.push(flood_rate(&net, 2.0));
            let r = capture.drain().unwrap();
            assert!(r.drops.iter().any(|d| d.dst_port == UDP_DROP));
        }
        let mut child = Command::new("bpftrace")
            .args([
                "-e",
                "tracepoint:skb:kfree_skb { @[args->reason] = count(); }",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::BufRead;
            let mut line = String::new();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            out.read_line(&mut line).unwrap();
            assert!(line.contains("Attaching"), "bpftrace: {line}");
            bpftrace.push(flood_rate(&net, 2.0));
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!("none       {none:.0?} mean {:.0}", mean(&none));
    for (mode, rates) in hooks.iter().zip(&ours) {
        eprintln!(
            "{:<10} {rates:.0?} mean {:.0} ({:.3})",
            format!("{mode:?}"),
            mean(rates),
            mean(rates) / mean(&none)
        );
    }
    eprintln!(
        "bpftrace   {bpftrace:.0?} mean {:.0} ({:.3})",
        mean(&bpftrace),
        mean(&bpftrace) / mean(&none)
    );

    // Each hook's own cost, with run-time stats on only for this part (they cost a clock read
    // per run).
    let _stats = BpfStatsOn::enable();
    for mode in hooks {
        let old = prog_ids();
        let capture = Capture::load(&CaptureConfig {
            attach: mode,
            ..CaptureConfig::default()
        })
        .unwrap();
        let name = match capture.attach_kind() {
            AttachKind::BtfTracepoint => "kfree_skb_btf",
            AttachKind::Tracepoint => "kfree_skb",
        };
        let prog = || new_prog(name, &old);
        let before = prog();
        let rate = flood_rate(&net, 2.0);
        let after = prog();
        let runs = after["run_cnt"].as_u64().unwrap() - before["run_cnt"].as_u64().unwrap_or(0);
        let ns =
            after["run_time_ns"].as_u64().unwrap() - before["run_time_ns"].as_u64().unwrap_or(0);
        eprintln!(
            "{mode:?}: {:.1} ns/drop over {runs} runs ({rate:.0} drops/s with stats on), xlated {} B, jited {} B",
            ns as f64 / runs as f64,
            after["bytes_xlated"],
            after["bytes_jited"],
        );
    }
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value comes back on drop, after a
/// panic too.
struct BpfStatsOn(String);

impl BpfStatsOn {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Self {
        let previous = std::fs::read_to_string(Self::SYSCTL).unwrap();
        std::fs::write(Self::SYSCTL, "1").unwrap();
        Self(previous.trim().to_owned())
    }
}

impl std::ops::Drop for BpfStatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, &self.0);
    }
}

fn bpftool_progs() -> Vec<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .unwrap();
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array().unwrap().clone()
}

fn prog_ids() -> Vec<u64> {
    bpftool_progs()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// `bpftool prog show` entry of the program `name` that is not among `old`.
fn new_prog(name: &str, old: &[u64]) -> serde_json::Value {
    let found: Vec<_> = bpftool_progs()
        .into_iter()
        .filter(|p| p["name"] == name && p["id"].as_u64().is_some_and(|id| !old.contains(&id)))
        .collect();
    assert_eq!(found.len(), 1, "new programs named {name}: {found:?}");
    found[0].clone()
}

/// Whether this kernel has the `sock:sk_data_ready` tracepoint (6.6 and later) that the UDP
/// flow counter needs.
fn kernel_has_sk_data_ready() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|root| std::path::Path::new(&format!("{root}/events/sock/sk_data_ready")).exists())
}

/// Accepted TCP connections (IPv4 and IPv6) and UDP flows between two namespaces are counted
/// exactly per edge and side; SYNs that nftables drops are not; the UDP hook is attached
/// exactly where the kernel has its tracepoint, and reported missing elsewhere.
///
/// TCP is checked through both of its hooks: `tp_btf/inet_sock_set_state` (the default where
/// the kernel's BTF allows) and the classic tracepoint (`AttachMode::Tracepoint`).
#[test]
fn counts_accepted_connections_exactly() {
    if !testkit::privileged("counts_accepted_connections_exactly") {
        return;
    }
    connections_counted_exactly(AttachMode::Auto, "tp_btf/inet_sock_set_state");
    connections_counted_exactly(AttachMode::Tracepoint, "sock:inet_sock_set_state");
}

fn connections_counted_exactly(attach: AttachMode, tcp_hook: &str) {
    use observer::capture::connections::Side;
    use std::net::{TcpListener, TcpStream};
    // Ports no other test of this binary uses: the namespaces of parallel tests share the
    // addresses, and the connection programs see every namespace.
    const TCP_PORT: u16 = 7101;
    const UDP_PORT: u16 = 7102;
    const TCP4: u64 = 5;
    const TCP6: u64 = 2;
    const UDP_SOCKETS: u64 = 3;
    const UDP6_SOCKETS: u64 = 2;
    let net = NetPair::new();
    let mut capture = Capture::load(&CaptureConfig {
        netns: Some(net.dst_inode),
        attach,
        ..CaptureConfig::default()
    })
    .unwrap();
    let hooks = capture.connection_hooks().to_vec();
    let hook = |name: &str| {
        hooks
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no hook {name} in {hooks:?}"))
            .clone()
    };
    let attached = |name: &str| hook(name).error.is_none();
    assert_eq!(
        hook("tcp").attached_at,
        Some(tcp_hook),
        "{attach:?}: {hooks:?}"
    );
    let udp = kernel_has_sk_data_ready();
    assert_eq!(attached("udp_receive"), udp, "{hooks:?}");

    let (tcp, udp_sock) = net.in_ns(&net.dst, || {
        let any: SocketAddr = (Ipv6Addr::UNSPECIFIED, 0).into();
        (
            TcpListener::bind(SocketAddr::new(any.ip(), TCP_PORT)).unwrap(),
            UdpSocket::bind(SocketAddr::new(any.ip(), UDP_PORT)).unwrap(),
        )
    });
    tcp.set_nonblocking(true).unwrap();
    let accepted = std::thread::spawn(move || {
        let mut n = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while n < TCP4 + TCP6 && std::time::Instant::now() < deadline {
            match tcp.accept() {
                Ok(_) => n += 1,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        n
    });
    net.in_ns(&net.src, || {
        for i in 0..TCP4 + TCP6 {
            let ip: IpAddr = if i < TCP4 { DST4.into() } else { DST6.into() };
            TcpStream::connect(SocketAddr::new(ip, TCP_PORT)).unwrap();
        }
        // Five datagrams per socket: one flow each, over IPv4 and over IPv6.
        for _ in 0..UDP_SOCKETS {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            for _ in 0..5 {
                s.send_to(b"flow", (DST4, UDP_PORT)).unwrap();
            }
        }
        for _ in 0..UDP6_SOCKETS {
            let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
            for _ in 0..5 {
                s.send_to(b"flow", (DST6, UDP_PORT)).unwrap();
            }
        }
        // Denied: nftables drops these SYNs in the destination.
        for _ in 0..3 {
            let to = SocketAddr::new(DST4.into(), TCP_DROP);
            let r = TcpStream::connect_timeout(&to, std::time::Duration::from_millis(200));
            assert!(r.is_err(), "nftables let a SYN to {to} through");
        }
    });
    assert_eq!(accepted.join().unwrap(), TCP4 + TCP6);
    drop(udp_sock);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let report = capture.connections().unwrap().drain().unwrap();
    let count = |src: IpAddr, dst: IpAddr, port: u16, side: Side| -> u64 {
        report
            .connections
            .iter()
            .filter(|c| c.src == src && c.dst == dst && c.dst_port == port && c.side == side)
            .map(|c| c.count)
            .sum()
    };
    let (s4, d4, s6, d6) = (
        IpAddr::from(SRC4),
        IpAddr::from(DST4),
        IpAddr::from(SRC6),
        IpAddr::from(DST6),
    );
    // Both ends live on this kernel: the client's and the server's.
    for side in [Side::Connect, Side::Accept] {
        assert_eq!(count(s4, d4, TCP_PORT, side), TCP4, "{side:?} {report:?}");
        assert_eq!(count(s6, d6, TCP_PORT, side), TCP6, "{side:?} {report:?}");
    }
    assert_eq!(
        count(s4, d4, UDP_PORT, Side::Accept),
        if udp { UDP_SOCKETS } else { 0 },
        "{report:?}"
    );
    assert_eq!(
        count(s6, d6, UDP_PORT, Side::Accept),
        if udp { UDP6_SOCKETS } else { 0 },
        "{report:?}"
    );
    assert!(
        !report.connections.iter().any(|c| c.dst_port == TCP_DROP),
        "dropped SYNs counted as connections: {report:?}"
    );
    assert_eq!(report.map_full, 0);
    assert_eq!(report.read_errors, 0, "{attach:?}");
}
