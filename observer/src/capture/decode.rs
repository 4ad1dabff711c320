//! Pure decoding of kernel flow keys and ring-buffer sample records.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use observer_ebpf::{FlowKey, SampleEvent, family};

use super::{FlowDrop, Sample};
use crate::flow::Protocol;

/// A ring-buffer record that is not exactly one [`SampleEvent`].
///
/// The kernel program reserves exactly `size_of::<SampleEvent>()` bytes per record, so any
/// other length means the userspace and kernel builds disagree on the layout; reading a
/// prefix of a longer record would decode garbage, so both directions are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("sample record of {len} bytes, expected {expected} (kernel and userspace layouts differ)")]
pub struct SampleSizeError {
    /// Length of the record.
    pub len: usize,
    /// `size_of::<SampleEvent>()`.
    pub expected: usize,
}

/// Reads one ring-buffer record as a [`SampleEvent`]; any other length is an error (the
/// caller counts it as a loss).
pub fn parse_sample(bytes: &[u8]) -> Result<SampleEvent, SampleSizeError> {
    let expected = std::mem::size_of::<SampleEvent>();
    if bytes.len() != expected {
        return Err(SampleSizeError {
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: SampleEvent is a #[repr(C)] Pod (integers only, no padding, so any bit pattern is
    // valid) and the buffer holds exactly size_of::<SampleEvent>() bytes; read_unaligned copes
    // with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SampleEvent>()) })
}

/// Turns a parsed [`SampleEvent`] into a [`Sample`] of one packet, with the given reason label.
pub fn to_sample(ev: &SampleEvent, reason: Arc<str>) -> Sample {
    Sample {
        drop: decode(&ev.key, reason, 1, u64::from(ev.len)),
        ts_ns: ev.ts_ns,
        location: ev.location,
        ifindex: ev.ifindex,
        src_port: ev.src_port,
        tcp_flags: ev.tcp_flags,
    }
}

/// Turns a kernel [`FlowKey`] into a [`FlowDrop`] with the given reason label and counts.
///
/// IPv4 addresses (stored IPv4-mapped) come back as `IpAddr::V4`; an `UNKNOWN` family gives
/// `None` addresses. For ICMP/ICMPv6 the kernel's `type << 8 | code` becomes `icmp` and
/// `dst_port` is 0.
pub fn decode(key: &FlowKey, reason: Arc<str>, packets: u64, bytes: u64) -> FlowDrop {
    let (src, dst) = match key.family {
        family::INET => (Some(v4(&key.src_addr)), Some(v4(&key.dst_addr))),
        family::INET6 => (
            Some(IpAddr::V6(Ipv6Addr::from(key.src_addr))),
            Some(IpAddr::V6(Ipv6Addr::from(key.dst_addr))),
        ),
        _ => (None, None),
    };
    let protocol = if src.is_some() {
        Protocol::from_ip_proto(key.protocol)
    } else {
        Protocol::Other
    };
    let (dst_port, icmp) = match protocol {
        Protocol::Icmp | Protocol::Icmpv6 => {
            let [t, c] = key.dst_port.to_be_bytes();
            (0, Some((t, c)))
        }
        Protocol::Tcp | Protocol::Udp | Protocol::Sctp => (key.dst_port, None),
        Protocol::Other => (0, None),
    };
    FlowDrop {
        reason,
        src,
        dst,
        protocol,
        dst_port,
        icmp,
        netns: key.netns,
        packets,
        bytes,
    }
}

fn v4(addr: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&a);
        m
    }

    #[test]
    fn v4_udp() {
        let key = FlowKey {
            src_addr: mapped([10, 0, 0, 1]),
            dst_addr: mapped([10, 0, 0, 2]),
            netns: 4026531840,
            reason: 12,
            dst_port: 5353,
            protocol: 17,
            family: family::INET,
        };
        let d = decode(&key, Arc::from("netfilter_drop"), 3, 300);
        assert_eq!(d.src, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(d.dst, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(d.protocol, Protocol::Udp);
        assert_eq!((d.dst_port, d.icmp), (5353, None));
        assert_eq!((d.netns, d.packets, d.bytes), (4026531840, 3, 300));
        assert_eq!(&*d.reason, "netfilter_drop");
    }

    #[test]
    fn v6_tcp() {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let key = FlowKey {
            src_addr: src.octets(),
            dst_addr: dst.octets(),
            dst_port: 443,
            protocol: 6,
            family: family::INET6,
            ..FlowKey::default()
        };
        let d = decode(&key, Arc::from("x"), 1, 60);
        assert_eq!(d.src, Some(IpAddr::V6(src)));
        assert_eq!(d.dst, Some(IpAddr::V6(dst)));
        assert_eq!((d.protocol, d.dst_port), (Protocol::Tcp, 443));
    }

    #[test]
    fn icmp_type_code() {
        let key = FlowKey {
            src_addr: mapped([192, 0, 2, 1]),
            dst_addr: mapped([192, 0, 2, 2]),
            dst_port: 3 << 8 | 13,
            protocol: 1,
            family: family::INET,
            ..FlowKey::default()
        };
        let d = decode(&key, Arc::from("x"), 1, 1);
        assert_eq!(
            (d.protocol, d.dst_port, d.icmp),
            (Protocol::Icmp, 0, Some((3, 13)))
        );
        let key6 = FlowKey {
            dst_port: 128 << 8,
            protocol: 58,
            family: family::INET6,
            ..FlowKey::default()
        };
        let d = decode(&key6, Arc::from("x"), 1, 1);
        assert_eq!((d.protocol, d.icmp), (Protocol::Icmpv6, Some((128, 0))));
    }

    #[test]
    fn unknown_family_has_no_addresses() {
        let key = FlowKey {
            reason: 2,
            protocol: 17,
            dst_port: 53,
            family: family::UNKNOWN,
            ..FlowKey::default()
        };
        let d = decode(&key, Arc::from("not_specified"), 5, 500);
        assert_eq!((d.src, d.dst), (None, None));
        assert_eq!((d.protocol, d.dst_port, d.icmp), (Protocol::Other, 0, None));
        assert_eq!(d.packets, 5);
    }

    #[test]
    fn other_protocol_has_no_port() {
        let key = FlowKey {
            src_addr: mapped([10, 0, 0, 1]),
            dst_addr: mapped([10, 0, 0, 2]),
            dst_port: 7,
            protocol: 47,
            family: family::INET,
            ..FlowKey::default()
        };
        let d = decode(&key, Arc::from("x"), 1, 1);
        assert_eq!((d.protocol, d.dst_port), (Protocol::Other, 0));
    }
}

#[cfg(test)]
mod fuzz_tests;
