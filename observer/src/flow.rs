//! Vocabulary shared by every stage: protocols, traffic directions, and the hash maps of the
//! per-drain hot path.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Hash map for the maps every drain touches once per flow (flow state, series, verdicts,
/// attribution, alert state).
///
/// std's SipHash was a third of the pipeline's CPU in a drop flood (perf, `cargo xtask bench`).
/// foldhash is several times faster on these short keys and still seeded randomly per process,
/// so flows crafted by an attacker cannot aim at collisions the way they could with an unkeyed
/// hash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Hash set counterpart of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Capacity a per-drain buffer keeps without use: a burst's maps and vectors are given back once
/// drains are small again, and a steady drain keeps what it needs.
pub const SPARE_CAPACITY: usize = 4096;

/// Gives back most of `map`'s capacity when it is well beyond [`SPARE_CAPACITY`] and four times
/// what the map holds.
pub fn trim_map<K: Eq + std::hash::Hash, V>(map: &mut FastMap<K, V>) {
    if map.capacity() > SPARE_CAPACITY && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// [`trim_map`] for a vector.
pub fn trim_vec<T>(v: &mut Vec<T>) {
    if v.capacity() > SPARE_CAPACITY && v.len() * 4 < v.capacity() {
        v.shrink_to(v.len() * 2);
    }
}

/// Address family of a flow. A dual-stack pod sends each packet from one of its addresses, and
/// an ipBlock judges that address, not the pod's address in the other family.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4 (IPv4-mapped IPv6 addresses included: they are IPv4 on the wire).
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: std::net::IpAddr) -> Self {
        match ip.to_canonical() {
            std::net::IpAddr::V4(_) => IpFamily::V4,
            std::net::IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// Transport protocol of a flow, as NetworkPolicy and the metrics name it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
    /// ICMP (1).
    Icmp,
    /// ICMPv6 (58).
    Icmpv6,
    /// Anything else, or unparsed.
    Other,
}

impl Protocol {
    /// Maps an IP protocol number.
    pub fn from_ip_proto(proto: u8) -> Self {
        match proto {
            6 => Self::Tcp,
            17 => Self::Udp,
            132 => Self::Sctp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            _ => Self::Other,
        }
    }

    /// Lower-case label value used on metrics (`tcp`, `udp`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Other => "other",
        }
    }

    /// Upper-case name as NetworkPolicy spells it (`TCP`, `UDP`, `SCTP`).
    pub fn k8s_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Icmp => "ICMP",
            Self::Icmpv6 => "ICMPv6",
            Self::Other => "OTHER",
        }
    }

    /// True for the protocols NetworkPolicy ports can name.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s_name())
    }
}

/// Error for an unknown protocol name.
#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?} (expected TCP, UDP, SCTP, ICMP or ICMPv6)")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            "ICMP" => Ok(Self::Icmp),
            "ICMPV6" => Ok(Self::Icmpv6),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

/// Which side's policy decided (or would decide) a flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Egress policy at the source pod.
    Egress,
    /// Ingress policy at the destination pod.
    Ingress,
    /// Not known (no verdict).
    Unknown,
}

impl Direction {
    /// Label value (`ingress`, `egress`, `unknown`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
