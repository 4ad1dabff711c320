//! Hostile packets on the real kernel (privileged): a pod writes crafted Ethernet frames with
//! AF_PACKET, the kernel drops them (its own header checks, or nftables in the destination pod),
//! and the daemon from `DENY_OBSERVER_BIN` must count every drop, label only what the packets
//! really hold, and count each header it could not read under its loss stage.
//!
//! The frames are those of issue 11: a SYN with a bad IHL to port 7301 and right after it TCP
//! packets whose TCP header is 2 bytes long (the kernel reuses the freed buffer, so a parser that
//! reads past the packet finds port 7301 there), a UDP packet cut inside its header, IPv4 options
//! of every size the fields can say (IHL 6 and 15), and IPv6 with extension headers up to and
//! beyond what the kernel program follows.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.
#![allow(
    clippy::unwrap_used,
    reason = "tests panic with context, keeping the stack trace"
)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics};
use testkit::simnode::{Enforcement, INGRESS_DROP_COUNTER, PodId, SimNode};

const DROPS: &str = "deny_observer_drops_total";
const EDGES: &str = "deny_observer_new_denied_edges_total";
const LOST: &str = "deny_observer_events_lost_total";
const APP_NS: &str = "mal-app";
const TOOLS_NS: &str = "mal-tools";

/// The port of the bad-IHL SYN: it must never show up anywhere.
const BAD_IHL_PORT: u16 = 7301;
/// Ports of the packets whose headers are complete: each must show up exactly as sent.
const IHL6_PORT: u16 = 7306;
const IHL15_PORT: u16 = 7315;
const IHL15_UDP_PORT: u16 = 7316;
const V6_EXT_PORT: u16 = 7360;
/// Destination port written into the packets that are cut off: never reachable by the parser.
const CUT_PORT: u16 = 7399;
/// IPv6 extension headers the kernel program follows (`MAX_EXT_HEADERS` in program.rs).
const MAX_EXT_HEADERS: usize = 8;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DSTOPTS: u8 = 60;

/// RFC 1071 checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet: the 20-byte header with `options` after it, whose IHL field says `ihl`
/// (normally `5 + options.len() / 4`; other values make a malformed header), then `payload`.
/// Total length and header checksum are right, so only what the test means to break is broken.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ihl: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let total = u16::try_from(header_len + payload.len()).unwrap();
    let mut p = vec![0x40 | ihl, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    let sum = checksum(&p[..header_len]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet whose payload starts with `next`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A 20-byte TCP SYN header (checksum left 0: nftables drops it before TCP would look).
fn tcp_syn(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&src_port.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// A UDP header and payload (checksum 0: dropped before UDP would look).
fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// `n` destination-options headers (8 bytes each, one PadN option) followed by `last`, which
/// starts with protocol `last_proto`.
fn dstopts_chain(n: usize, last_proto: u8, last: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n {
            last_proto
        } else {
            IPPROTO_DSTOPTS
        };
        p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    p.extend_from_slice(last);
    p
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// Sends each `(ethertype, packet)` as one Ethernet frame from pod `from`'s eth0 to pod `to`,
/// with an AF_PACKET raw socket: the kernel takes the bytes as they are. Returns the frames
/// the socket accepted.
fn send_frames(node: &SimNode, from: PodId, to: PodId, packets: &[(u16, Vec<u8>)]) -> usize {
    let src_mac = parse_mac(&node.pod(from).unwrap().mac);
    let dst_mac = parse_mac(&node.pod(to).unwrap().mac);
    node.in_pod(from, || {
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a NUL-terminated interface name.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert_ne!(ifindex, 0, "no eth0 in the pod");
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(ifindex).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst_mac);
        let mut sent = 0;
        for (ethertype, packet) in packets {
            let mut frame = Vec::with_capacity(14 + packet.len());
            frame.extend_from_slice(&dst_mac);
            frame.extend_from_slice(&src_mac);
            frame.extend_from_slice(&ethertype.to_be_bytes());
            frame.extend_from_slice(packet);
            addr.sll_protocol = ethertype.to_be();
            // SAFETY: the buffer and the address are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
                )
            };
            assert_eq!(
                usize::try_from(n).ok(),
                Some(frame.len()),
                "sending a {}-byte frame: {}",
                frame.len(),
                std::io::Error::last_os_error()
            );
            sent += 1;
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        sent
    })
    .unwrap()
}

/// `Ip: InHdrErrors` of pod `id`'s network namespace, or of the node's (`None`): the kernel's
/// own count of IPv4 packets dropped for a bad header.
fn ip_in_hdr_errors(node: &SimNode, id: Option<PodId>) -> u64 {
    let out = match id {
        Some(id) => node.pod_command(id, "cat").unwrap(),
        None => std::process::Command::new("cat"),
    }
    .arg("/proc/net/snmp")
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InHdrErrors")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// What is checked, the metric, its label selector, and the exact value it must have.
type Expect = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    u64,
);

fn dump(m: &Metrics, daemon: &Daemon) -> String {
    let mut s = String::new();
    for name in [DROPS, EDGES, LOST] {
        for sample in m.select(name, &[]) {
            s.push_str(&format!("  {name} {:?} {}\n", sample.labels, sample.value));
        }
    }
    s.push_str(&format!(
        "daemon log ({}):\n{}",
        daemon.log().display(),
        daemon.log_tail()
    ));
    s
}

/// Both attach points share the parser; each gets a fresh daemon (and so fresh edges and loss
/// counters) over the same pods, one after the other.
/// True when the daemon's log, with colour codes removed, contains `needle`.
fn daemon_log_says(daemon: &Daemon, needle: &str) -> bool {
    let log = std::fs::read_to_string(daemon.log()).unwrap();
    strip_ansi(&log).contains(needle)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn crafted_frames_are_counted_with_only_the_ports_they_hold() {
    if !testkit::privileged("crafted_frames_are_counted_with_only_the_ports_they_hold") {
        return;
    }
    let _ = testkit::simnode::cleanup_stale();

    let mut node = SimNode::new().expect("simulated node");
    let server = node.add_pod(APP_NS, "server-0").unwrap();
    let attacker = node.add_pod(TOOLS_NS, "attacker").unwrap();
    let metas = vec![
        PodMeta::app("server", Owner::StatefulSet("server".into())),
        PodMeta::app("attacker", Owner::None),
    ];
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(server);
    node.enforce(&policy).unwrap();
    let policies = vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-default-deny", "namespace": APP_NS},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
    })];
    let inventory_dir = tempfile::tempdir().unwrap();
    let inventory = inventory_dir.path().join("inventory");
    manifests::write_inventory(&inventory, node.pods(), &metas, "mal-node", policies).unwrap();
    for attach in ["tp_btf", "tracepoint"] {
        crafted_frames_through(&node, server, attacker, &inventory, attach);
    }
}

fn crafted_frames_through(
    node: &SimNode,
    server: PodId,
    attacker: PodId,
    inventory: &std::path::Path,
    attach: &str,
) {
    let bin = testkit::daemon_bin();
    let work = tempfile::tempdir().unwrap();
    let addr: SocketAddr = free_loopback_addr().unwrap();
    let mut daemon = Daemon::start_with_args(
        &bin,
        inventory,
        addr,
        work.path().join("daemon.log"),
        &["--attach", attach],
    )
    .unwrap_or_else(|e| panic!("{attach}: {e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{attach}: {e}"));

    let (a4, s4) = (
        node.pod(attacker).unwrap().ipv4,
        node.pod(server).unwrap().ipv4,
    );
    let (a6, s6) = (
        node.pod(attacker).unwrap().ipv6,
        node.pod(server).unwrap().ipv6,
    );
    const V4: u16 = 0x0800;
    const V6: u16 = 0x86dd;

    // Each bad-IHL SYN is followed at once by the 2-byte TCP headers, so that they get its
    // freed buffer: the bytes past their end are the SYN's, port 7301 included.
    let bad_ihl = ipv4(a4, s4, IPPROTO_TCP, 4, &[], &tcp_syn(40001, BAD_IHL_PORT));
    let tcp_2_bytes = ipv4(a4, s4, IPPROTO_TCP, 5, &[], &40002u16.to_be_bytes());
    // Ports present, length and checksum cut off.
    let short_udp = ipv4(a4, s4, IPPROTO_UDP, 5, &[], &udp(40003, CUT_PORT, &[])[..4]);
    // A TCP header whose data offset says 15 words, in a packet that ends after 5.
    let mut long_doff = tcp_syn(40004, CUT_PORT);
    long_doff[12] = 0xf0;
    let tcp_long_doff = ipv4(a4, s4, IPPROTO_TCP, 5, &[], &long_doff);
    let (rounds, tcp2_per_round) = (3usize, 2usize);
    let mut frames = Vec::new();
    for _ in 0..rounds {
        frames.push((V4, bad_ihl.clone()));
        for _ in 0..tcp2_per_round {
            frames.push((V4, tcp_2_bytes.clone()));
        }
    }
    let short_udps = 2;
    frames.extend(std::iter::repeat_n((V4, short_udp), short_udps));
    frames.push((V4, tcp_long_doff));
    // IPv4 options (NOPs) of the smallest and largest size: the ports are right after them.
    let ihl6 = ipv4(a4, s4, IPPROTO_TCP, 6, &[1; 4], &tcp_syn(40006, IHL6_PORT));
    let ihl15 = ipv4(
        a4,
        s4,
        IPPROTO_TCP,
        15,
        &[1; 40],
        &tcp_syn(40015, IHL15_PORT),
    );
    let ihl15_udp = ipv4(
        a4,
        s4,
        IPPROTO_UDP,
        15,
        &[1; 40],
        &udp(40016, IHL15_UDP_PORT, b"x"),
    );
    let (n_ihl6, n_ihl15, n_ihl15_udp) = (2, 3, 1);
    frames.extend(std::iter::repeat_n((V4, ihl6), n_ihl6));
    frames.extend(std::iter::repeat_n((V4, ihl15), n_ihl15));
    frames.extend(std::iter::repeat_n((V4, ihl15_udp), n_ihl15_udp));
    // IPv6: as many extension headers as the program follows, then one more.
    let within = ipv6(
        a6,
        s6,
        IPPROTO_DSTOPTS,
        &dstopts_chain(MAX_EXT_HEADERS, IPPROTO_UDP, &udp(40060, V6_EXT_PORT, b"x")),
    );
    let beyond = ipv6(
        a6,
        s6,
        IPPROTO_DSTOPTS,
        &dstopts_chain(
            MAX_EXT_HEADERS + 1,
            IPPROTO_UDP,
            &udp(40061, CUT_PORT, b"x"),
        ),
    );
    let (n_within, n_beyond) = (2, 3);
    frames.extend(std::iter::repeat_n((V6, within), n_within));
    frames.extend(std::iter::repeat_n((V6, beyond), n_beyond));

    // Where the kernel drops a bad IPv4 header depends on the node: the bridge does (in the
    // node's namespace) when br_netfilter is loaded, else the pod's IP layer.
    let hdr_errors = || ip_in_hdr_errors(node, None) + ip_in_hdr_errors(node, Some(server));
    let hdr_errors_before = hdr_errors();
    let nft_before = node.counter(server, INGRESS_DROP_COUNTER).unwrap().packets;
    assert_eq!(send_frames(node, attacker, server, &frames), frames.len());

    let n_bad_ihl = rounds as u64;
    let n_tcp2 = (rounds * tcp2_per_round) as u64;
    let truncated = n_bad_ihl + n_tcp2 + short_udps as u64 + 1;
    let nft_dropped = n_tcp2
        + short_udps as u64
        + 1
        + (n_ihl6 + n_ihl15 + n_ihl15_udp + n_within + n_beyond) as u64;
    // The harness itself: the kernel dropped every frame, each where it was meant to be.
    assert_eq!(
        hdr_errors() - hdr_errors_before,
        n_bad_ihl,
        "{attach}: the kernel's InHdrErrors"
    );
    assert_eq!(
        node.counter(server, INGRESS_DROP_COUNTER).unwrap().packets - nft_before,
        nft_dropped,
        "{attach}: the nft drop counter"
    );

    let pair = [
        ("source_namespace", TOOLS_NS),
        ("source_workload", "attacker"),
        ("destination_namespace", APP_NS),
        ("destination_workload", "server"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = pair.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let expected: Vec<Expect> = vec![
        (
            "nft drops",
            DROPS,
            with(&[("reason", "netfilter_drop")]),
            nft_dropped,
        ),
        (
            "bad-IHL drops (tcp, no port)",
            DROPS,
            with(&[("reason", "ip_inhdr"), ("protocol", "tcp")]),
            n_bad_ihl,
        ),
        (
            "TCP nft drops",
            DROPS,
            with(&[("reason", "netfilter_drop"), ("protocol", "tcp")]),
            n_tcp2 + 1 + (n_ihl6 + n_ihl15) as u64,
        ),
        (
            "UDP nft drops",
            DROPS,
            with(&[("reason", "netfilter_drop"), ("protocol", "udp")]),
            (short_udps + n_ihl15_udp + n_within) as u64,
        ),
        (
            "IPv6 beyond the extension-header limit",
            DROPS,
            with(&[("reason", "netfilter_drop"), ("protocol", "other")]),
            n_beyond as u64,
        ),
        (
            "truncated_header",
            LOST,
            vec![("stage", "truncated_header")],
            truncated,
        ),
        (
            "ipv6_ext_headers_exceeded",
            LOST,
            vec![("stage", "ipv6_ext_headers_exceeded")],
            n_beyond as u64,
        ),
        ("skb_read", LOST, vec![("stage", "skb_read")], 0),
        (
            "header_not_linear",
            LOST,
            vec![("stage", "header_not_linear")],
            0,
        ),
    ];
    // Edges the daemon must report, and nothing else: every other port would be bytes the
    // packets do not hold.
    let want_edges: BTreeSet<(String, String)> = [
        ("tcp", 0),
        ("udp", 0),
        ("tcp", IHL6_PORT),
        ("tcp", IHL15_PORT),
        ("udp", IHL15_UDP_PORT),
        ("udp", V6_EXT_PORT),
    ]
    .iter()
    .map(|(p, port)| ((*p).to_owned(), port.to_string()))
    .collect();
    let edges = |m: &Metrics| -> BTreeSet<(String, String)> {
        m.select(EDGES, &[])
            .filter(|s| s.matches(&pair) && s.labels.get("protocol").is_some_and(|p| p != "other"))
            .map(|s| (s.labels["protocol"].clone(), s.labels["port"].clone()))
            .collect()
    };

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        if let Ok(m) = metrics::scrape(daemon.addr())
            && expected
                .iter()
                .all(|(_, name, sel, v)| m.sum(name, sel) >= *v as f64)
            && edges(&m).is_superset(&want_edges)
        {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Once more a little later: exact, not just reached.
    std::thread::sleep(Duration::from_millis(2500));
    let m = metrics::scrape(daemon.addr()).unwrap();
    for (what, name, sel, v) in &expected {
        assert_eq!(
            m.sum(name, sel),
            *v as f64,
            "{attach}: {what}: {name} {sel:?}\n{}",
            dump(&m, &daemon)
        );
    }
    assert_eq!(
        edges(&m),
        want_edges,
        "{attach}: new denied edges\n{}",
        dump(&m, &daemon)
    );
    assert!(
        daemon_log_says(&daemon, &format!("attach={attach}")),
        "{attach}: the daemon did not attach as asked\n{}",
        daemon.log_tail()
    );
    let bad = BAD_IHL_PORT.to_string();
    let cut = CUT_PORT.to_string();
    for s in &m.samples {
        for port in [&bad, &cut] {
            assert!(
                s.labels.values().all(|v| v != port),
                "{attach}: port {port} is in no packet's headers, yet {} {:?}\n{}",
                s.name,
                s.labels,
                dump(&m, &daemon)
            );
        }
    }
    for port in [&bad, &cut] {
        assert!(
            !daemon_log_says(&daemon, &format!("port={port}")),
            "{attach}: the daemon logged port {port}:\n{}",
            daemon.log_tail()
        );
    }
}
