//! Packet flood sender for `cargo xtask bench`: UDP datagrams and TCP SYNs through `sendmmsg`,
//! one thread per requested core, each thread inside the sender's network namespace.
//!
//! The destinations are always a simulated pod in a namespace the benchmark created; nothing here
//! picks an address on its own.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::simnode::{PodId, SimNode};

/// What to send.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FloodKind {
    /// UDP datagrams with a small payload.
    Udp,
    /// Bare TCP SYNs from a raw socket (no handshake state in the sender).
    TcpSyn,
}

impl FloodKind {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::TcpSyn => "tcp-syn",
        }
    }
}

/// One flood.
#[derive(Clone, Debug)]
pub struct FloodConfig {
    /// Network namespace to send from (a name under /run/netns), or the caller's.
    pub netns: Option<String>,
    /// Packet kind.
    pub kind: FloodKind,
    /// Destination address (a simulated pod).
    pub dst: IpAddr,
    /// First destination port; flows cycle over `flows` consecutive ports.
    pub first_port: u16,
    /// Number of distinct flows (destination ports).
    pub flows: u16,
    /// Sender threads.
    pub threads: usize,
    /// Messages per `sendmmsg` call.
    pub batch: usize,
}

/// What a flood sent.
#[derive(Copy, Clone, Debug, Default)]
pub struct FloodStats {
    /// Packets the kernel accepted from `sendmmsg`.
    pub sent: u64,
    /// Failed `sendmmsg` calls (ENOBUFS and the like; the packet was not sent).
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// When a flood ends.
#[derive(Clone, Debug)]
pub enum Until {
    /// After this long (measured from the moment every thread is ready to send).
    Elapsed(Duration),
    /// When each thread has sent this many packets.
    PacketsPerThread(u64),
    /// When the flag is set.
    Flag(Arc<AtomicBool>),
}

/// Floods until `until` and returns the totals. Threads build their packets and sockets first,
/// then start together, so [`FloodStats::elapsed`] covers sending only.
pub fn flood(cfg: &FloodConfig, until: Until) -> anyhow::Result<FloodStats> {
    if cfg.flows == 0 || cfg.threads == 0 || cfg.batch == 0 {
        bail!("flood needs at least one flow, thread and message per batch: {cfg:?}");
    }
    if cfg.first_port == 0 || u32::from(cfg.first_port) + u32::from(cfg.flows) - 1 > 65_535 {
        bail!(
            "ports {}..{} are not all valid destination ports",
            cfg.first_port,
            u32::from(cfg.first_port) + u32::from(cfg.flows)
        );
    }
    let start_line = Arc::new(Barrier::new(cfg.threads + 1));
    let stop = match &until {
        Until::Flag(flag) => flag.clone(),
        _ => Arc::new(AtomicBool::new(false)),
    };
    let limit = match until {
        Until::PacketsPerThread(n) => Some(n),
        _ => None,
    };
    let handles: Vec<_> = (0..cfg.threads)
        .map(|thread| {
            let cfg = cfg.clone();
            let stop = stop.clone();
            let start_line = start_line.clone();
            std::thread::spawn(move || {
                // Every thread reaches the start line, ready or not, so nobody waits forever.
                let ready = prepare(&cfg, thread);
                start_line.wait();
                let result = ready.and_then(|sender| sender.run(&cfg, &stop, limit));
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    start_line.wait();
    let start = Instant::now();
    if let Until::Elapsed(d) = until {
        while start.elapsed() < d && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5).min(d));
        }
        stop.store(true, Ordering::Relaxed);
    }
    let mut total = FloodStats::default();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(stats)) => {
                total.sent += stats.sent;
                total.errors += stats.errors;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a flood sender thread panicked"));
            }
        }
    }
    total.elapsed = start.elapsed();
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Sends exactly `count` packets (cycling over the flows) from one thread, for accuracy checks.
pub fn send_exact(cfg: &FloodConfig, count: u64) -> anyhow::Result<FloodStats> {
    let one = FloodConfig {
        threads: 1,
        ..cfg.clone()
    };
    let stats = flood(&one, Until::PacketsPerThread(count))?;
    if stats.sent != count {
        bail!("sent {} of {count} packets", stats.sent);
    }
    Ok(stats)
}

/// Moves the calling thread into the named network namespace.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let c_path = CString::new(path.clone())?;
    // SAFETY: plain open(2) of a NUL-terminated path; the fd is owned below.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("open {path}"));
    }
    // SAFETY: fd was just returned by open and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: setns only affects the calling thread's namespace membership.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

/// A thread's socket and packets, ready to send.
struct Sender {
    fd: OwnedFd,
    packets: Vec<Packet>,
}

fn prepare(cfg: &FloodConfig, thread: usize) -> anyhow::Result<Sender> {
    if let Some(ns) = &cfg.netns {
        enter_netns(ns)?;
    }
    let src = source_address_for(cfg.dst)?;
    let packets = build_packets(cfg, src, thread)?;
    let fd = open_socket(cfg)?;
    Ok(Sender { fd, packets })
}

impl Sender {
    fn run(
        &self,
        cfg: &FloodConfig,
        stop: &AtomicBool,
        limit: Option<u64>,
    ) -> anyhow::Result<FloodStats> {
        let packets = &self.packets;
        let mut stats = FloodStats::default();
        let mut next = 0usize;
        let mut storage: Vec<libc::sockaddr_storage> = Vec::with_capacity(cfg.batch);
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(cfg.batch);
        let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(cfg.batch);
        while !stop.load(Ordering::Relaxed) {
            let want = match limit {
                Some(limit) if stats.sent >= limit => break,
                Some(limit) => usize::try_from(limit - stats.sent)
                    .unwrap_or(usize::MAX)
                    .min(cfg.batch),
                None => cfg.batch,
            };
            // The three vectors never grow past `batch`, so the pointers taken below stay
            // valid: nothing reallocates between filling them and the system call.
            storage.clear();
            iovecs.clear();
            headers.clear();
            for i in 0..want {
                let packet = &packets[(next + i) % packets.len()];
                storage.push(packet.addr);
                iovecs.push(libc::iovec {
                    iov_base: packet.bytes.as_ptr() as *mut libc::c_void,
                    iov_len: packet.bytes.len(),
                });
            }
            for i in 0..want {
                // SAFETY: mmsghdr is plain data; zero is a valid empty header.
                let mut header: libc::mmsghdr = unsafe { zeroed() };
                header.msg_hdr.msg_name = (&mut storage[i] as *mut libc::sockaddr_storage).cast();
                header.msg_hdr.msg_namelen = packets[(next + i) % packets.len()].addr_len;
                header.msg_hdr.msg_iov = &mut iovecs[i];
                header.msg_hdr.msg_iovlen = 1;
                headers.push(header);
            }
            // SAFETY: every header points into `storage`/`iovecs`/`packets`, which outlive the
            // call and are not moved while it runs.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    headers.as_mut_ptr(),
                    u32::try_from(want).unwrap_or(u32::MAX),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    // Transient: queues full, or a signal. Try again; count it.
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                        stats.errors += 1;
                        continue;
                    }
                    // Anything else (EPERM from an egress rule, EINVAL, no route) repeats on
                    // every call: looping would spin forever, so report it.
                    _ => {
                        return Err(err).with_context(|| {
                            format!("sendmmsg of {} to {}", cfg.kind.name(), cfg.dst)
                        });
                    }
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            stats.sent += n as u64;
            next = (next + n) % packets.len();
        }
        Ok(stats)
    }
}

struct Packet {
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    bytes: Vec<u8>,
}

fn open_socket(cfg: &FloodConfig) -> anyhow::Result<OwnedFd> {
    let domain = if cfg.dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (ty, proto) = match cfg.kind {
        FloodKind::Udp => (libc::SOCK_DGRAM, 0),
        FloodKind::TcpSyn => (libc::SOCK_RAW, libc::IPPROTO_TCP),
    };
    // SAFETY: socket(2) with constant arguments.
    let fd: RawFd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket for the flood sender");
    }
    // SAFETY: fd is fresh and owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if cfg.kind == FloodKind::TcpSyn && cfg.dst.is_ipv6() {
        // IPv6 raw sockets compute the checksum in the kernel when told where it lives
        // (RFC 3542 IPV6_CHECKSUM); the TCP checksum is at offset 16.
        let offset: libc::c_int = 16;
        // SAFETY: setsockopt with a valid pointer to a c_int of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                (&offset as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("setsockopt IPV6_CHECKSUM");
        }
    }
    Ok(fd)
}

/// The address the routing table picks to reach `dst` (a connected UDP socket sends nothing).
fn source_address_for(dst: IpAddr) -> anyhow::Result<IpAddr> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("bind probe socket")?;
    socket
        .connect(SocketAddr::new(dst, 9))
        .with_context(|| format!("no route to {dst}"))?;
    Ok(socket.local_addr()?.ip())
}

fn build_packets(cfg: &FloodConfig, src: IpAddr, thread: usize) -> anyhow::Result<Vec<Packet>> {
    let mut packets = Vec::with_capacity(usize::from(cfg.flows));
    for flow in 0..cfg.flows {
        let dst_port = cfg.first_port.wrapping_add(flow);
        // Distinct source ports per thread keep threads' SYNs apart, like a real flood.
        let src_port = 20_000u16
            .wrapping_add(u16::try_from(thread % 64).unwrap_or(0) * 512)
            .wrapping_add(flow % 512);
        let (addr, addr_len) = sockaddr(
            cfg.dst,
            if cfg.kind == FloodKind::Udp {
                dst_port
            } else {
                0
            },
        );
        let bytes = match cfg.kind {
            FloodKind::Udp => vec![0x5a; 32],
            FloodKind::TcpSyn => tcp_syn(src, cfg.dst, src_port, dst_port)?,
        };
        packets.push(Packet {
            addr,
            addr_len,
            bytes,
        });
    }
    Ok(packets)
}

fn sockaddr(ip: IpAddr, port: u16) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    match ip {
        IpAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = port.to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            (storage, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        IpAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = port.to_be();
            sin6.sin6_addr.s6_addr = v6.octets();
            (storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// A 20-byte TCP SYN header. IPv4 needs the checksum here (pseudo-header included); for IPv6
/// the kernel fills it in (IPV6_CHECKSUM).
fn tcp_syn(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16) -> anyhow::Result<Vec<u8>> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        let mut pseudo = Vec::with_capacity(12 + tcp.len());
        pseudo.extend_from_slice(&s.octets());
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&tcp);
        let sum = internet_checksum(&pseudo);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    } else if src.is_ipv4() != dst.is_ipv4() {
        bail!("source {src} and destination {dst} are of different families");
    }
    Ok(tcp)
}

/// RFC 1071 one's-complement checksum.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends 32-byte UDP datagrams from pod `from` to `to` at `pps` per second (read every 20 ms, so
/// a caller changes the rate on the fly) until `stop`; returns the datagrams sent. The credit is
/// capped at `max_pps`, so a stalled thread does not burst. A send that fails with EPERM counts
/// as sent: the sender's own output hook (an egress deny) dropped it after the kernel freed it.
pub fn paced_udp(
    node: &SimNode,
    from: PodId,
    to: SocketAddr,
    pps: &AtomicU64,
    max_pps: u64,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    node.in_pod(from, || -> anyhow::Result<u64> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket in the pod")?;
        let (mut credit, mut sent, mut last) = (0.0f64, 0u64, Instant::now());
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            credit = (credit + pps.load(Ordering::SeqCst) as f64 * (now - last).as_secs_f64())
                .min(max_pps as f64);
            last = now;
            while credit >= 1.0 {
                if let Err(e) = sock.send_to(&[0x5a; 32], to)
                    && e.kind() != io::ErrorKind::PermissionDenied
                {
                    return Err(e).with_context(|| format!("sending a datagram to {to}"));
                }
                sent += 1;
                credit -= 1.0;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sent)
    })
    .context("entering the sending pod")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }

    #[test]
    fn syn_header_verifies() {
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: IpAddr = "10.0.0.2".parse().unwrap();
        let tcp = tcp_syn(src, dst, 1234, 80).unwrap();
        assert_eq!(tcp[13], 0x02);
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6, 0, 20];
        pseudo.extend_from_slice(&tcp);
        // A correct checksum makes the whole sum fold to zero.
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
