//! Accepted connections: attaching the connection programs and draining their map.
//!
//! The kernel side (observer-ebpf `connections.rs`) counts each end of a TCP connection or UDP
//! flow it sees, per (source, destination, protocol, destination port, [`Side`]). This module
//! turns the cumulative per-CPU counts into deltas, like the drop path does, and says which
//! hooks are attached: a hook the kernel lacks is a logged, exported degradation
//! (`deny_observer_connection_hooks{hook}` = 0), never a failed start.
//!
//! Which end of a connection is counted is decided after attribution, by
//! [`crate::export::connections::counted_here`].
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::Path;

use aya::maps::{IterableMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf};
use observer_ebpf::{ConnConfig, ConnKey, conn_loss, conn_side};

use super::batch::Batch;
use super::btf::KernelBtf;
use super::tracefs::{self, TracepointFormat};
use super::{AttachMode, CaptureError};
use crate::flow::{FastMap, Protocol};

/// Format file of the TCP state-change tracepoint, relative to the tracefs root.
pub const INET_SOCK_SET_STATE_FORMAT: &str = "events/sock/inet_sock_set_state/format";

/// Which transport protocols to count connections of.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ConnectionsConfig {
    /// Count TCP connections (`sock:inet_sock_set_state`).
    pub tcp: bool,
    /// Count UDP flows (`tp_btf/sk_data_ready`, once a socket queued a datagram; 6.6+).
    pub udp: bool,
    /// Distinct edges (source, destination, protocol, port, side) the kernel map holds.
    pub map_entries: u32,
    /// UDP 4-tuples the flow tracker remembers.
    pub udp_track_entries: u32,
    /// Silence after which a UDP 4-tuple's next datagram starts a new flow.
    pub udp_idle_secs: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            tcp: true,
            udp: true,
            map_entries: 16384,
            udp_track_entries: 65536,
            udp_idle_secs: 30,
        }
    }
}

impl ConnectionsConfig {
    /// Nothing to count: no program is attached.
    pub fn disabled() -> Self {
        Self {
            tcp: false,
            udp: false,
            ..Self::default()
        }
    }

    /// Whether any protocol is counted.
    pub fn enabled(&self) -> bool {
        self.tcp || self.udp
    }
}

/// Which end of a connection the kernel saw.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// A local socket opened it (TCP client, first datagram sent): the source is local.
    Connect,
    /// A local socket accepted it (TCP server, first datagram received): the destination is
    /// local.
    Accept,
}

/// New connections of one edge since the previous drain, as seen from one [`Side`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The end that opened the connection.
    pub src: IpAddr,
    /// The end that accepted it.
    pub dst: IpAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Destination port.
    pub dst_port: u16,
    /// Where this kernel saw it.
    pub side: Side,
    /// Connections (TCP) or flows (UDP) since the previous drain.
    pub count: u64,
}

/// One kernel hook of the connection programs and whether it is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Short name, the `hook` label: `tcp`, `udp_receive`.
    pub name: &'static str,
    /// `None`: attached. `Some(why)`: not attached on this kernel or configuration.
    pub error: Option<String>,
    /// The kernel hook it is attached at (`tp_btf/inet_sock_set_state`,
    /// `sock:inet_sock_set_state`, `tp_btf/sk_data_ready`); `None` when not attached.
    pub attached_at: Option<&'static str>,
}

/// Result of one [`ConnectionCapture::drain`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionReport {
    /// Edges with new connections.
    pub connections: Vec<Connection>,
    /// New edges the kernel map had no room for (their connections are not counted).
    pub map_full: u64,
    /// Connections the programs could not read (record, socket address or header).
    pub read_errors: u64,
    /// Edges in the kernel map.
    pub map_entries: u64,
}

/// Program names in the object: TCP through `tp_btf/inet_sock_set_state` (preferred) or the
/// classic `sock:inet_sock_set_state`, UDP through `tp_btf/sk_data_ready`.
const TCP_BTF_PROGRAM: &str = "inet_sock_set_state_btf";
const TCP_CLASSIC_PROGRAM: &str = "inet_sock_set_state";
const UDP_PROGRAM: &str = "udp_recv";

/// The layout the connection programs need, and why each hook cannot use it where it cannot.
#[derive(Clone, Debug)]
pub(crate) struct ConnLayout {
    /// What the programs read.
    pub config: ConnConfig,
    /// Why the classic TCP tracepoint cannot be used (its format file).
    pub tcp_classic: Option<String>,
    /// Why the BTF TCP hook cannot be used (`struct sock` in BTF).
    pub tcp_btf: Option<String>,
    /// Why the UDP hook cannot be used.
    pub udp: Option<String>,
}

/// Where the kernel's ephemeral port range is, and its default.
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const DEFAULT_EPHEMERAL: (u32, u32) = (32768, 60999);

/// The ephemeral port range from `ip_local_port_range`'s text (`"32768\t60999"`).
pub fn parse_port_range(text: &str) -> Option<(u32, u32)> {
    let mut it = text.split_whitespace().map(str::parse::<u32>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi && hi <= 65535).then_some((lo, hi))
}

/// The layout the connection programs need, from the tracepoint's format file and BTF. Parts
/// that cannot be found are reported per hook, so that one missing piece disables only the
/// hooks that need it.
pub(crate) fn conn_config(
    tracefs_root: &Path,
    btf: &KernelBtf,
    config: &ConnectionsConfig,
) -> ConnLayout {
    let mut out = ConnConfig {
        udp_idle_secs: config.udp_idle_secs,
        ..ConnConfig::default()
    };
    let tcp_classic = read_format(tracefs_root)
        .and_then(|fmt| tcp_offsets(&fmt, &mut out))
        .err();
    let tcp_btf = tcp_btf_offsets(btf, &mut out).err().map(|e| e.to_string());
    let (lo, hi) = std::fs::read_to_string(PORT_RANGE)
        .ok()
        .and_then(|t| parse_port_range(&t))
        .unwrap_or(DEFAULT_EPHEMERAL);
    out.ephemeral_lo = lo;
    out.ephemeral_hi = hi;
    let udp = match udp_offsets(btf, &mut out) {
        Ok(()) => None,
        Err(e) => Some(e.to_string()),
    };
    ConnLayout {
        config: out,
        tcp_classic,
        tcp_btf,
        udp,
    }
}

fn read_format(root: &Path) -> Result<TracepointFormat, String> {
    let path = root.join(INET_SOCK_SET_STATE_FORMAT);
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    tracefs::parse_format(&text).map_err(|e| e.to_string())
}

/// Fills the tracepoint offsets from its format file, checking each field's size.
pub(crate) fn tcp_offsets(fmt: &TracepointFormat, out: &mut ConnConfig) -> Result<(), String> {
    let field = |name: &str, size: u32| -> Result<u32, String> {
        let f = fmt
            .field(name)
            .ok_or_else(|| format!("inet_sock_set_state has no field {name}"))?;
        if f.size != size {
            return Err(format!(
                "inet_sock_set_state field {name} has size {}, expected {size}",
                f.size
            ));
        }
        Ok(f.offset)
    };
    out.tp_oldstate = field("oldstate", 4)?;
    out.tp_newstate = field("newstate", 4)?;
    out.tp_sport = field("sport", 2)?;
    out.tp_dport = field("dport", 2)?;
    out.tp_family = field("family", 2)?;
    out.tp_protocol = field("protocol", 2)?;
    out.tp_saddr = field("saddr", 4)?;
    out.tp_daddr = field("daddr", 4)?;
    out.tp_saddr_v6 = field("saddr_v6", 16)?;
    out.tp_daddr_v6 = field("daddr_v6", 16)?;
    Ok(())
}

/// Fills the `struct sock` offsets the BTF TCP hook loads directly. `sk_protocol` is a `u16`
/// from Linux 5.6; before, it was a bitfield, which the verifier does not let a program load
/// part of: `member_offset` refuses it, and such a kernel counts at the classic tracepoint.
fn tcp_btf_offsets(btf: &KernelBtf, out: &mut ConnConfig) -> Result<(), super::btf::BtfError> {
    let mut o = *out;
    o.sk_protocol = btf.member_offset("sock.sk_protocol")?;
    o.sk_family = btf.member_offset("sock.__sk_common.skc_family")?;
    o.sk_num = btf.member_offset("sock.__sk_common.skc_num")?;
    o.sk_dport = btf.member_offset("sock.__sk_common.skc_dport")?;
    o.sk_rcv_saddr = btf.member_offset("sock.__sk_common.skc_rcv_saddr")?;
    o.sk_daddr = btf.member_offset("sock.__sk_common.skc_daddr")?;
    o.sk_v6_rcv_saddr = btf.member_offset("sock.__sk_common.skc_v6_rcv_saddr")?;
    o.sk_v6_daddr = btf.member_offset("sock.__sk_common.skc_v6_daddr")?;
    *out = o;
    Ok(())
}

fn udp_offsets(btf: &KernelBtf, out: &mut ConnConfig) -> Result<(), super::btf::BtfError> {
    out.skb_head = btf.member_offset("sk_buff.head")?;
    out.skb_network_header = btf.member_offset("sk_buff.network_header")?;
    out.skb_transport_header = btf.member_offset("sk_buff.transport_header")?;
    out.sk_protocol = btf.member_offset("sock.sk_protocol")?;
    let rcvq = btf.member_offset("sock.sk_receive_queue")?;
    out.sk_rcvq_prev = rcvq + btf.member_offset("sk_buff_head.prev")?;
    out.sk_rcvq_qlen = rcvq + btf.member_offset("sk_buff_head.qlen")?;
    Ok(())
}

/// The connection programs' maps and the userspace state of their drains.
pub struct ConnectionCapture {
    map: PerCpuHashMap<MapData, ConnKey, u64>,
    losses: PerCpuArray<MapData, u64>,
    hooks: Vec<Hook>,
    /// Sum over CPUs at the previous drain, and drains in a row it stayed unchanged.
    seen: FastMap<ConnKey, (u64, u32)>,
    loss_seen: [u64; conn_loss::COUNT as usize],
    idle_drains: u32,
    /// Batch lookups of the map; `None` where the kernel lacks them (or the CPU count could
    /// not be read), which walks the map key by key: two syscalls per key, and a scan of every
    /// bucket after the last key at each drain.
    batch: Option<Batch>,
}

impl std::fmt::Debug for ConnectionCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCapture")
            .field("hooks", &self.hooks)
            .field("edges", &self.seen.len())
            .finish_non_exhaustive()
    }
}

/// Attaches the TCP hook: the BTF one where allowed, else (or when it fails) the classic
/// tracepoint. The hook attached at, or why neither could be.
fn attach_tcp(
    ebpf: &mut Ebpf,
    layout: &ConnLayout,
    attach: AttachMode,
    btf: Option<&Btf>,
) -> Result<&'static str, String> {
    let btf_error = if attach == AttachMode::Tracepoint {
        "the configuration asks for the classic tracepoint".to_owned()
    } else if let Some(why) = &layout.tcp_btf {
        why.clone()
    } else {
        match attach_one(ebpf, TCP_BTF_PROGRAM, Some("inet_sock_set_state"), btf) {
            Ok(()) => return Ok("tp_btf/inet_sock_set_state"),
            Err(e) => e,
        }
    };
    let classic = match &layout.tcp_classic {
        Some(why) => Err(why.clone()),
        None => attach_one(ebpf, TCP_CLASSIC_PROGRAM, None, None),
    };
    match classic {
        Ok(()) => {
            tracing::info!(
                why = %btf_error,
                "TCP connections counted at the classic tracepoint (tp_btf/inet_sock_set_state not used)"
            );
            Ok("sock:inet_sock_set_state")
        }
        Err(e) => Err(format!("tp_btf: {btf_error}; classic tracepoint: {e}")),
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    function: Option<&str>,
    btf: Option<&Btf>,
) -> Result<(), String> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("the eBPF object has no program {program}"))?;
    match function {
        None => {
            let tp: &mut TracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
            tp.load().map_err(|e| format!("loading: {e}"))?;
            tp.attach("sock", "inet_sock_set_state")
                .map_err(|e| format!("attaching: {e}"))?;
        }
        Some(function) => {
            let btf = btf.ok_or_else(|| "kernel BTF could not be loaded".to_owned())?;
            let tp: &mut BtfTracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
            tp.load(function, btf)
                .map_err(|e| format!("loading: {e}"))?;
            if let Err(e) = tp.attach() {
                if let Err(unload) = tp.unload() {
                    tracing::debug!(error = %unload, "unloading the unattached {program}");
                }
                return Err(format!("attaching: {e}"));
            }
        }
    }
    Ok(())
}

impl ConnectionCapture {
    /// Attaches the connection programs of an object loaded with `CONN_CONFIG`, and takes
    /// their maps. `layout` says which hooks the kernel's layout allows; TCP goes through
    /// `tp_btf/inet_sock_set_state` where it can (unless `attach` asks for classic
    /// tracepoints), else the classic tracepoint. A hook that fails to load or attach is
    /// logged and reported by [`Self::hooks`]; only a missing map is an error.
    pub(crate) fn attach(
        ebpf: &mut Ebpf,
        config: &ConnectionsConfig,
        layout: &ConnLayout,
        attach: AttachMode,
        idle_drains: u32,
    ) -> Result<Self, CaptureError> {
        let tcp_btf_wanted =
            config.tcp && layout.tcp_btf.is_none() && attach != AttachMode::Tracepoint;
        let udp_wanted = config.udp && layout.udp.is_none();
        let btf = if tcp_btf_wanted || udp_wanted {
            match Btf::from_sys_fs() {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel BTF unavailable for the connection hooks");
                    None
                }
            }
        } else {
            None
        };
        let disabled = || Err("disabled by --count-connections".to_owned());
        let tcp = if !config.tcp {
            disabled()
        } else {
            attach_tcp(ebpf, layout, attach, btf.as_ref())
        };
        let udp = if !config.udp {
            disabled()
        } else if let Some(why) = &layout.udp {
            Err(why.clone())
        } else {
            attach_one(ebpf, UDP_PROGRAM, Some("sk_data_ready"), btf.as_ref())
                .map(|()| "tp_btf/sk_data_ready")
        };
        let mut hooks = Vec::new();
        for (name, attached) in [("tcp", tcp), ("udp_receive", udp)] {
            let (attached_at, error) = match attached {
                Ok(at) => (Some(at), None),
                Err(why) => (None, Some(why)),
            };
            match &error {
                None => tracing::info!(hook = name, at = attached_at, "connection hook attached"),
                Some(why) if why.starts_with("disabled") => {
                    tracing::info!(hook = name, "connection hook disabled")
                }
                Some(why) => tracing::warn!(
                    hook = name,
                    reason = %why,
                    "connection hook not attached: these connections are not counted (deny_observer_connection_hooks{{hook}} is 0)"
                ),
            }
            hooks.push(Hook {
                name,
                error,
                attached_at,
            });
        }
        let map_err = |map: &'static str| move |source| CaptureError::Map { map, source };
        let map = PerCpuHashMap::try_from(
            ebpf.take_map("CONNECTIONS")
                .ok_or(CaptureError::Missing("map CONNECTIONS"))?,
        )
        .map_err(map_err("CONNECTIONS"))?;
        let losses = PerCpuArray::try_from(
            ebpf.take_map("CONN_LOSSES")
                .ok_or(CaptureError::Missing("map CONN_LOSSES"))?,
        )
        .map_err(map_err("CONN_LOSSES"))?;
        Ok(Self {
            map,
            losses,
            hooks,
            seen: FastMap::default(),
            loss_seen: [0; conn_loss::COUNT as usize],
            idle_drains: if idle_drains == 0 {
                u32::MAX
            } else {
                idle_drains
            },
            batch: aya::util::nr_cpus()
                .ok()
                .map(|cpus| Batch::new::<u64>(cpus, 1024)),
        })
    }

    /// Every key of the map with its count summed over CPUs, by batch lookup when the
    /// kernel has it.
    fn read_map(&mut self) -> Result<Vec<(ConnKey, u64)>, CaptureError> {
        let mut entries = Vec::new();
        if let Some(batch) = &mut self.batch {
            let fd = IterableMap::map(&self.map).fd().as_fd();
            let res = batch.for_each::<ConnKey>(fd, |key, values| {
                entries.push((key, values.sum_u64()));
            });
            match res {
                Ok(()) => return Ok(entries),
                Err(e) => {
                    tracing::warn!(
                        map = "CONNECTIONS",
                        error = %e,
                        "BPF_MAP_LOOKUP_BATCH failed; using per-key lookups"
                    );
                    self.batch = None;
                    entries.clear();
                }
            }
        }
        for item in self.map.iter() {
            let (key, values) = item.map_err(|source| CaptureError::Map {
                map: "CONNECTIONS",
                source,
            })?;
            let sum = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
            entries.push((key, sum));
        }
        Ok(entries)
    }

    /// Every hook and whether it is attached.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// New connections per edge since the previous drain. An edge unchanged for the
    /// configured number of drains is deleted from the kernel map, so that edges that are gone
    /// leave room for new ones.
    pub fn drain(&mut self) -> Result<ConnectionReport, CaptureError> {
        let mut report = ConnectionReport::default();
        let entries = self.read_map()?;
        report.map_entries = entries.len() as u64;
        let mut stale = Vec::new();
        let mut present = FastMap::default();
        for (key, sum) in entries {
            present.insert(key, ());
            let (prev, idle) = self.seen.get(&key).copied().unwrap_or((0, 0));
            // A key deleted and re-created starts again from zero.
            let delta = if sum >= prev { sum - prev } else { sum };
            let idle = if delta == 0 { idle + 1 } else { 0 };
            if delta > 0
                && let Some(c) = connection(&key, delta)
            {
                report.connections.push(c);
            }
            if idle >= self.idle_drains {
                stale.push(key);
            }
            self.seen.insert(key, (sum, idle));
        }
        self.seen.retain(|k, _| present.contains_key(k));
        for key in stale {
            // A connection counted between the walk and this delete is lost; the key has been
            // idle for many drains, so that is rare, and the next one re-creates it.
            if self.map.remove(&key).is_ok() {
                self.seen.remove(&key);
            }
        }
        for slot in [conn_loss::MAP_FULL, conn_loss::READ] {
            let now = self
                .losses
                .get(&slot, 0)
                .map(|v| v.iter().fold(0u64, |a, x| a.wrapping_add(*x)))
                .map_err(|source| CaptureError::Map {
                    map: "CONN_LOSSES",
                    source,
                })?;
            let prev = std::mem::replace(&mut self.loss_seen[slot as usize], now);
            let d = now.saturating_sub(prev);
            match slot {
                conn_loss::MAP_FULL => report.map_full = d,
                _ => report.read_errors = d,
            }
        }
        Ok(report)
    }
}

fn addr(a: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The userspace view of one map entry; `None` for a side or protocol this version does not
/// know (a newer kernel object), which is skipped.
pub fn connection(key: &ConnKey, count: u64) -> Option<Connection> {
    let side = match key.side {
        conn_side::CONNECT => Side::Connect,
        conn_side::ACCEPT => Side::Accept,
        _ => return None,
    };
    let protocol = match Protocol::from_ip_proto(key.protocol) {
        p @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp) => p,
        _ => return None,
    };
    Some(Connection {
        src: addr(&key.src_addr),
        dst: addr(&key.dst_addr),
        protocol,
        dst_port: key.dst_port,
        side,
        count,
    })
}

/// `::ffff:a.b.c.d` as the kernel programs store IPv4 addresses.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// The BTF TCP hook's offsets on this kernel: `struct sock_common` has kept its first
    /// members where they are since Linux 3.x (the address pair, the hash, the port pair, the
    /// family), so the values are known without reading the kernel's headers.
    #[test]
    fn tcp_btf_offsets_find_sock_common_on_this_kernel() {
        let path = Path::new(super::super::btf::VMLINUX_BTF);
        if !testkit::requires(
            "capture::connections BTF test",
            "the kernel's BTF (/sys/kernel/btf/vmlinux)",
            path.exists(),
        ) {
            return;
        }
        let btf = KernelBtf::vmlinux().unwrap();
        let mut c = ConnConfig::default();
        tcp_btf_offsets(&btf, &mut c).unwrap();
        assert_eq!(
            (
                c.sk_daddr,
                c.sk_rcv_saddr,
                c.sk_dport,
                c.sk_num,
                c.sk_family
            ),
            (0, 4, 12, 14, 16)
        );
        assert!(c.sk_v6_daddr > c.sk_family && c.sk_v6_rcv_saddr == c.sk_v6_daddr + 16);
        assert!(c.sk_protocol > c.sk_v6_rcv_saddr, "{c:?}");
    }

    #[test]
    fn keys_become_connections_with_plain_ipv4() {
        let key = ConnKey {
            src_addr: mapped("10.0.0.1".parse().unwrap()),
            dst_addr: mapped("fd00::2".parse().unwrap()),
            dst_port: 8080,
            protocol: 6,
            side: conn_side::ACCEPT,
        };
        let c = connection(&key, 3).unwrap();
        assert_eq!(c.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.dst, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(
            (c.protocol, c.dst_port, c.side, c.count),
            (Protocol::Tcp, 8080, Side::Accept, 3)
        );
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert_eq!(addr(&mapped(any)), any);
    }

    #[test]
    fn the_ephemeral_range_is_read_from_the_sysctl_text() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("garbage"), None);
    }

    #[test]
    fn unknown_sides_and_protocols_are_skipped() {
        let key = ConnKey {
            side: 9,
            protocol: 6,
            ..ConnKey::default()
        };
        assert!(connection(&key, 1).is_none());
        let key = ConnKey {
            side: conn_side::CONNECT,
            protocol: 1,
            ..ConnKey::default()
        };
        assert!(connection(&key, 1).is_none());
    }

    #[test]
    fn tcp_offsets_come_from_the_format_file_and_sizes_are_checked() {
        let text = "name: inet_sock_set_state\nID: 1\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n\
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n\
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n\
\nprint fmt: \"x\"\n";
        let fmt = tracefs::parse_format(text).unwrap();
        let mut c = ConnConfig::default();
        tcp_offsets(&fmt, &mut c).unwrap();
        assert_eq!(
            (
                c.tp_oldstate,
                c.tp_newstate,
                c.tp_sport,
                c.tp_dport,
                c.tp_family,
                c.tp_protocol
            ),
            (16, 20, 24, 26, 28, 30)
        );
        assert_eq!(
            (c.tp_saddr, c.tp_daddr, c.tp_saddr_v6, c.tp_daddr_v6),
            (32, 36, 40, 56)
        );
        let bad = tracefs::parse_format(&text.replace(
            "size:2;\tsigned:0;\n\tfield:__u16 dport",
            "size:4;\tsigned:0;\n\tfield:__u16 dport",
        ))
        .unwrap();
        let err = tcp_offsets(&bad, &mut ConnConfig::default()).unwrap_err();
        assert!(err.contains("sport"), "{err}");
        let missing = tracefs::parse_format(&text.replace("daddr_v6", "other")).unwrap();
        assert!(
            tcp_offsets(&missing, &mut ConnConfig::default())
                .unwrap_err()
                .contains("daddr_v6")
        );
    }
}
