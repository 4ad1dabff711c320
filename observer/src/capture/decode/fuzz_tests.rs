//! Bounded fuzzing of the ring-buffer record decoding: arbitrary bytes go through the same
//! functions `Capture::samples` uses (`decode::parse_sample`, then `decode::to_sample`, which
//! calls `decode::decode`). Records of the wrong size are rejected (the daemon counts them);
//! any 72-byte pattern decodes without panicking; addresses round-trip, IPv4 through its
//! IPv4-mapped form.
//!
//! Seeds: `tests/fuzz_corpus/events/*.bin` (records as the kernel program writes them).
//! Failures are kept in `tests/fuzz_corpus/regressions/fuzz_events.txt`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code panics with context"
)]

use testkit::mutate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{self as capture, SampleSizeError};
use crate::flow::Protocol;
use observer_ebpf::{FlowKey, SampleEvent, family};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const SIZE: usize = std::mem::size_of::<SampleEvent>();

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/events")
}

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_corpus/regressions/fuzz_events.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// Serializes an event field by field in native order (as the kernel's `#[repr(C)]` store
/// lays it out), independently of the decoder's pointer cast.
fn to_bytes(ev: &SampleEvent) -> Vec<u8> {
    let mut b = Vec::with_capacity(SIZE);
    b.extend_from_slice(&ev.ts_ns.to_ne_bytes());
    b.extend_from_slice(&ev.location.to_ne_bytes());
    b.extend_from_slice(&ev.key.src_addr);
    b.extend_from_slice(&ev.key.dst_addr);
    b.extend_from_slice(&ev.key.netns.to_ne_bytes());
    b.extend_from_slice(&ev.key.reason.to_ne_bytes());
    b.extend_from_slice(&ev.key.dst_port.to_ne_bytes());
    b.push(ev.key.protocol);
    b.push(ev.key.family);
    b.extend_from_slice(&ev.ifindex.to_ne_bytes());
    b.extend_from_slice(&ev.len.to_ne_bytes());
    b.extend_from_slice(&ev.src_port.to_ne_bytes());
    b.push(ev.tcp_flags);
    b.push(ev._pad);
    assert_eq!(b.len(), SIZE);
    b
}

fn seed_events() -> Vec<(&'static str, SampleEvent)> {
    let v4 = |a: [u8; 4]| Ipv4Addr::from(a).to_ipv6_mapped().octets();
    vec![
        (
            "udp-v4-netfilter.bin",
            SampleEvent {
                ts_ns: 1_234_567_890,
                location: 0xffff_ffff_8123_4567,
                key: FlowKey {
                    src_addr: v4([10, 0, 0, 1]),
                    dst_addr: v4([10, 0, 0, 2]),
                    netns: 4_026_531_840,
                    reason: 12,
                    dst_port: 5353,
                    protocol: 17,
                    family: family::INET,
                },
                ifindex: 3,
                len: 128,
                src_port: 40000,
                tcp_flags: 0,
                _pad: 0,
            },
        ),
        (
            "tcp-syn-v6.bin",
            SampleEvent {
                ts_ns: 42,
                location: 0xffff_ffff_8100_0000,
                key: FlowKey {
                    src_addr: "fd00::1".parse::<Ipv6Addr>().unwrap().octets(),
                    dst_addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
                    netns: 4_026_532_000,
                    reason: 3,
                    dst_port: 443,
                    protocol: 6,
                    family: family::INET6,
                },
                ifindex: 7,
                len: 80,
                src_port: 51000,
                tcp_flags: 0x02,
                _pad: 0,
            },
        ),
        (
            "icmp-v4.bin",
            SampleEvent {
                key: FlowKey {
                    src_addr: v4([192, 0, 2, 1]),
                    dst_addr: v4([192, 0, 2, 2]),
                    reason: 12,
                    dst_port: 8 << 8,
                    protocol: 1,
                    family: family::INET,
                    ..FlowKey::default()
                },
                len: 84,
                ..SampleEvent::default()
            },
        ),
        (
            "unknown-family.bin",
            SampleEvent {
                key: FlowKey {
                    reason: 2,
                    family: family::UNKNOWN,
                    ..FlowKey::default()
                },
                len: 60,
                ..SampleEvent::default()
            },
        ),
    ]
}

/// The corpus files are the seed events, byte for byte (regenerate with
/// `FUZZ_CORPUS_WRITE=1`); a layout change of `SampleEvent` shows up here first.
#[test]
fn corpus_matches_seed_events() {
    let write = std::env::var_os("FUZZ_CORPUS_WRITE").is_some();
    for (name, ev) in seed_events() {
        let path = corpus_dir().join(name);
        if write {
            std::fs::create_dir_all(corpus_dir()).unwrap();
            std::fs::write(&path, to_bytes(&ev)).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes, to_bytes(&ev), "{name}");
        assert_eq!(capture::parse_sample(&bytes), Ok(ev), "{name}");
    }
}

/// Decoded seeds mean what the kernel meant.
#[test]
fn seed_events_decode() {
    let seeds = seed_events();
    let s = capture::to_sample(&seeds[0].1, Arc::from("netfilter_drop"));
    assert_eq!(s.drop.src, Some(IpAddr::from([10, 0, 0, 1])));
    assert_eq!(s.drop.dst, Some(IpAddr::from([10, 0, 0, 2])));
    assert_eq!(
        (
            s.drop.protocol,
            s.drop.dst_port,
            s.drop.packets,
            s.drop.bytes
        ),
        (Protocol::Udp, 5353, 1, 128)
    );
    assert_eq!((s.ifindex, s.src_port, s.ts_ns), (3, 40000, 1_234_567_890));
    let s = capture::to_sample(&seeds[1].1, Arc::from("no_socket"));
    assert_eq!((s.drop.protocol, s.tcp_flags), (Protocol::Tcp, 0x02));
    assert_eq!(s.drop.dst, Some("fd00::2".parse().unwrap()));
    let s = capture::to_sample(&seeds[2].1, Arc::from("x"));
    assert_eq!(
        (s.drop.protocol, s.drop.dst_port, s.drop.icmp),
        (Protocol::Icmp, 0, Some((8, 0)))
    );
    let s = capture::to_sample(&seeds[3].1, Arc::from("x"));
    assert_eq!(
        (s.drop.src, s.drop.dst, s.drop.protocol),
        (None, None, Protocol::Other)
    );
}

fn corpus_bytes() -> Vec<Vec<u8>> {
    seed_events().iter().map(|(_, ev)| to_bytes(ev)).collect()
}

fn arb_event() -> impl Strategy<Value = SampleEvent> {
    let key = (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        prop_oneof![
            Just(1u8),
            Just(6),
            Just(17),
            Just(58),
            Just(132),
            any::<u8>()
        ],
        prop_oneof![
            Just(family::UNKNOWN),
            Just(family::INET),
            Just(family::INET6),
            any::<u8>()
        ],
    )
        .prop_map(
            |(src_addr, dst_addr, netns, reason, dst_port, protocol, family)| FlowKey {
                src_addr,
                dst_addr,
                netns,
                reason,
                dst_port,
                protocol,
                family,
            },
        );
    (key, any::<(u64, u64, u32, u32, u16, u8, u8)>()).prop_map(
        |(key, (ts_ns, location, ifindex, len, src_port, tcp_flags, _pad))| SampleEvent {
            ts_ns,
            location,
            key,
            ifindex,
            len,
            src_port,
            tcp_flags,
            _pad,
        },
    )
}

/// What `decode` must make of any key: an independent statement of the contract.
fn check_decoded(key: &FlowKey, d: &crate::capture::FlowDrop) -> Result<(), TestCaseError> {
    match key.family {
        family::INET => {
            let want = |a: &[u8; 16]| IpAddr::from([a[12], a[13], a[14], a[15]]);
            prop_assert_eq!(d.src, Some(want(&key.src_addr)));
            prop_assert_eq!(d.dst, Some(want(&key.dst_addr)));
            // Round trip: the V4 address maps back to the key's bytes when they are mapped.
            if let Some(IpAddr::V4(v4)) = d.src
                && key.src_addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
            {
                prop_assert_eq!(v4.to_ipv6_mapped().octets(), key.src_addr);
            }
        }
        family::INET6 => {
            prop_assert_eq!(d.src, Some(IpAddr::V6(Ipv6Addr::from(key.src_addr))));
            prop_assert_eq!(d.dst, Some(IpAddr::V6(Ipv6Addr::from(key.dst_addr))));
        }
        _ => {
            prop_assert_eq!((d.src, d.dst), (None, None));
            prop_assert_eq!(d.protocol, Protocol::Other);
        }
    }
    prop_assert_eq!(d.netns, key.netns);
    match d.protocol {
        Protocol::Icmp | Protocol::Icmpv6 => {
            prop_assert_eq!(d.dst_port, 0);
            prop_assert_eq!(
                d.icmp,
                Some(((key.dst_port >> 8) as u8, key.dst_port as u8))
            );
        }
        Protocol::Tcp | Protocol::Udp | Protocol::Sctp => {
            prop_assert_eq!((d.dst_port, d.icmp), (key.dst_port, None));
        }
        Protocol::Other => prop_assert_eq!((d.dst_port, d.icmp), (0, None)),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Any byte string: exactly `size_of::<SampleEvent>()` bytes parse, anything else is a
    /// size error that says both sizes.
    #[test]
    fn arbitrary_bytes_parse_or_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..3 * SIZE)) {
        match capture::parse_sample(&bytes) {
            Ok(ev) => {
                prop_assert_eq!(bytes.len(), SIZE);
                prop_assert_eq!(to_bytes(&ev), bytes);
                let s = capture::to_sample(&ev, Arc::from("r"));
                check_decoded(&ev.key, &s.drop)?;
            }
            Err(e) => {
                prop_assert_ne!(bytes.len(), SIZE);
                prop_assert_eq!(e, SampleSizeError { len: bytes.len(), expected: SIZE });
                let msg = e.to_string();
                prop_assert!(msg.contains(&bytes.len().to_string()) && msg.contains(&SIZE.to_string()), "{}", msg);
            }
        }
    }

    /// Mutated corpus records (bit flips, cuts, insertions): same contract, and a mutation
    /// that keeps the size decodes every field from the right bytes.
    #[test]
    fn mutated_records(seed in any::<prop::sample::Index>(), muts in mutate::mutations(6)) {
        let seeds = corpus_bytes();
        let bytes = mutate::apply(&seeds[seed.index(seeds.len())], &muts, &[]);
        match capture::parse_sample(&bytes) {
            Ok(ev) => {
                prop_assert_eq!(to_bytes(&ev), bytes);
                check_decoded(&ev.key, &capture::to_sample(&ev, Arc::from("r")).drop)?;
            }
            Err(e) => prop_assert_eq!(e.len, bytes.len()),
        }
    }

    /// Structured events survive the byte round trip, and addresses come back as the kernel
    /// stored them: IPv4 from the mapped form as `V4`, IPv6 unchanged.
    #[test]
    fn events_round_trip(ev in arb_event(), v4 in any::<([u8; 4], [u8; 4])>(), use_v4 in any::<bool>(), unaligned in 0usize..8) {
        let mut ev = ev;
        if use_v4 {
            ev.key.family = family::INET;
            ev.key.src_addr = Ipv4Addr::from(v4.0).to_ipv6_mapped().octets();
            ev.key.dst_addr = Ipv4Addr::from(v4.1).to_ipv6_mapped().octets();
        }
        // The ring buffer gives no alignment guarantee to the slice we read from.
        let mut buf = vec![0u8; unaligned];
        buf.extend(to_bytes(&ev));
        let parsed = capture::parse_sample(&buf[unaligned..]).unwrap();
        prop_assert_eq!(parsed, ev);
        let s = capture::to_sample(&parsed, Arc::from("netfilter_drop"));
        check_decoded(&ev.key, &s.drop)?;
        prop_assert_eq!((s.drop.packets, s.drop.bytes), (1, u64::from(ev.len)));
        prop_assert_eq!((s.ts_ns, s.location, s.ifindex, s.src_port, s.tcp_flags), (ev.ts_ns, ev.location, ev.ifindex, ev.src_port, ev.tcp_flags));
        prop_assert_eq!(&*s.drop.reason, "netfilter_drop");
        if use_v4 {
            prop_assert_eq!(s.drop.src, Some(IpAddr::from(v4.0)));
            prop_assert_eq!(s.drop.dst, Some(IpAddr::from(v4.1)));
            // And back: the decoded V4 maps to the stored bytes.
            let Some(IpAddr::V4(src)) = s.drop.src else { unreachable!() };
            prop_assert_eq!(src.to_ipv6_mapped().octets(), ev.key.src_addr);
        }
    }
}
