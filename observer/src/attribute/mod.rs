//! Attribution: turns one drain of the kernel maps into typed [`Outcomes`] — drop series,
//! policy denies (`default_deny`, `unexplained`), denied edges (which the alert stage turns
//! into spike observations and new-edge alerts) and Kubernetes Event notices.
//!
//! A pure stage: no I/O, no clock, no Prometheus, no channels. It reads the inventory through
//! [`Views`] and the drain through [`DrainReport`]; the daemon hands the [`Outcomes`] to each
//! [`Sink`] (Prometheus export, the alert stage, Kubernetes Events). Every branch is therefore a
//! unit test that runs without root.
//!
//! Outcomes are summed per label identity within one drain: a scan or a wide flood makes
//! thousands of flows that differ only in their ports and land on a handful of series, and
//! looking each record's label strings up in the series maps was about a quarter of the
//! daemon's CPU in such a flood (`cargo xtask bench`, udp-many). Identities are pointers and
//! small integers, so grouping allocates nothing once the maps have grown to a drain's size.

#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::mem::Discriminant;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::capture::{DrainReport, FlowDrop, Losses, Sample};
use crate::flow::{Direction, FastMap, Protocol, trim_map, trim_vec};
use crate::inventory::{Attributor, Endpoint, Inventory, NodeAddrs, Pod, Service};
use crate::verdict::{
    EndpointKey, Engine, FlowQuery, IpFamily, Peer, Verdict, VerdictCache, VerdictKey,
};

/// Kernel drop reasons that mean "a packet filter decided": the ones NetworkPolicy
/// enforcement produces (iptables/nftables CNIs, tc-based eBPF datapaths, cgroup programs).
pub const POLICY_REASONS: &[&str] = &[
    "netfilter_drop",
    "tc_ingress",
    "tc_egress",
    "bpf_cgroup_egress",
    "bpf_cgroup_ingress",
];

/// Verdict cache size: distinct (source, destination, protocol, port) flows remembered.
pub const VERDICT_CACHE: usize = 65_536;

/// The inventory as attribution reads it: address → endpoint, the policy engine, and the
/// verdicts already computed with that engine. Replaced or updated as a whole when the
/// inventory changes, so that the three never disagree.
pub struct Views {
    attributor: Attributor,
    engine: Engine,
    cache: VerdictCache,
}

impl Views {
    /// Views of `inventory`; `node` are this node's addresses.
    pub fn new(inventory: Arc<Inventory>, node: NodeAddrs) -> Self {
        Self {
            attributor: Attributor::new(&inventory, node),
            engine: Engine::new(inventory),
            cache: VerdictCache::new(VERDICT_CACHE),
        }
    }

    /// Moves the views to `inventory`: in place when only pods changed (the verdicts of the
    /// changed pods are forgotten, the rest kept), else rebuilt with every verdict forgotten.
    pub fn update(&mut self, inventory: Arc<Inventory>) -> crate::verdict::Update {
        crate::verdict::update_views(
            &mut self.attributor,
            &mut self.engine,
            &self.cache,
            inventory,
        )
    }

    /// The policy engine (and through it the inventory).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The inventory these views were built from.
    pub fn inventory(&self) -> &Arc<Inventory> {
        self.engine.inventory()
    }

    /// The endpoint an address belongs to.
    pub fn endpoint(&self, ip: IpAddr) -> Endpoint {
        self.attributor.lookup(ip)
    }

    /// The endpoint a drop's address belongs to: a ClusterIP is its Service (see
    /// [`Attributor::drop_endpoint`]).
    pub fn drop_endpoint(&self, ip: IpAddr) -> Endpoint {
        self.attributor.drop_endpoint(ip)
    }

    /// The Service at `ip`: its ClusterIP, or an external or load-balancer IP that is no node's
    /// address.
    pub fn service(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.attributor.service(ip)
    }

    /// The kind of a workload (`Deployment`, ...) from any of its pods; `None` once it has no
    /// pod left. A scan, so for rare callers (spike transitions), never per flow.
    pub fn workload_kind(&self, namespace: &str, workload: &str) -> Option<&str> {
        self.inventory()
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.workload.name == workload)
            .map(|p| p.workload.kind.as_str())
    }

    /// The verdict on a drained flow between two attributed endpoints; `None` when
    /// NetworkPolicy has nothing to say about it (an end unknown, no pod at either end, a
    /// protocol policies cannot name, an ICMP error or reply).
    fn verdict(
        &self,
        drop: &FlowDrop,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
    ) -> Option<Arc<Verdict>> {
        let (src, dst) = (src?, dst?);
        if src.pod().is_none() && dst.pod().is_none() {
            return None;
        }
        // Policies are enforced after a ClusterIP is translated to a backend: a packet dropped
        // while still addressed to one was not denied by a NetworkPolicy.
        if matches!(src, Endpoint::Service(_)) || matches!(dst, Endpoint::Service(_)) {
            return None;
        }
        let protocol = match drop.protocol {
            Protocol::Other => return None,
            p => p,
        };
        // An ICMP error or reply answers a packet of another flow and passes as part of it
        // (conntrack: RELATED or ESTABLISHED); judged as a flow of its own, it would blame the
        // policies of the pod it answers, which never decided on it.
        if drop.icmp.is_some_and(|(t, _)| icmp_answers(protocol, t)) {
            return None;
        }
        // An end is a pod of the inventory or, for NetworkPolicy, its address: canonical, as
        // attribution read it (`::ffff:a.b.c.d` is IPv4 to an ipBlock too).
        fn end(ep: &Endpoint, ip: Option<IpAddr>) -> Option<Result<&Arc<Pod>, IpAddr>> {
            match ep {
                Endpoint::Pod(pod) => Some(Ok(pod)),
                _ => ip.map(|ip| Err(ip.to_canonical())),
            }
        }
        // An end that is this node, with a pod of this node at the other: always allowed.
        let node = self.attributor.node().node_name();
        let on_this_node = |ep: &Endpoint| match ep {
            Endpoint::Pod(pod) => node.is_none_or(|n| pod.node_name.as_deref() == Some(n)),
            _ => false,
        };
        let own_node = (matches!(src, Endpoint::Node) && on_this_node(dst))
            || (matches!(dst, Endpoint::Node) && on_this_node(src));
        // A source pod known to run elsewhere: its node enforced its egress, this one only the
        // destination's ingress. It follows from the source pod, which the cache key names.
        let src_remote = match (src, node) {
            (Endpoint::Pod(pod), Some(n)) => pod.node_name.as_deref().is_some_and(|p| p != n),
            _ => false,
        };
        let (src, dst) = (end(src, drop.src)?, end(dst, drop.dst)?);
        let key = |e: Result<&Arc<Pod>, IpAddr>| e.map_or_else(EndpointKey::Ip, EndpointKey::pod);
        // A dual-stack pod is judged by the address the packet carries (see `IpFamily`).
        let family = drop.src.or(drop.dst).map(IpFamily::of);
        let flow_key = VerdictKey::new(
            key(src),
            key(dst),
            protocol,
            drop.dst_port,
            family,
            own_node,
        );
        // The pods are cloned only to evaluate a verdict not cached yet.
        let peer = |e: Result<&Arc<Pod>, IpAddr>| {
            e.map_or_else(Peer::External, |pod| Peer::Pod(Arc::clone(pod)))
        };
        Some(
            self.cache
                .get_or_evaluate_key(&self.engine, flow_key, || FlowQuery {
                    src: peer(src),
                    dst: peer(dst),
                    protocol,
                    port: drop.dst_port,
                    family,
                    own_node,
                    src_remote,
                }),
        )
    }
}

/// Whether an ICMP message of `icmp_type` answers another packet rather than opening a flow:
/// an error, which quotes the packet it is about (ICMPv4 destination unreachable, source
/// quench, redirect, time exceeded, parameter problem; every ICMPv6 type below 128), or a
/// reply (echo, timestamp, information, address mask; ICMPv6 echo and node information).
/// Conntrack opens no connection with any of them.
fn icmp_answers(protocol: Protocol, icmp_type: u8) -> bool {
    match protocol {
        Protocol::Icmp => matches!(icmp_type, 0 | 3 | 4 | 5 | 11 | 12 | 14 | 16 | 18),
        Protocol::Icmpv6 => icmp_type < 128 || matches!(icmp_type, 129 | 140),
        _ => false,
    }
}

/// `match` label of `deny_observer_policy_denies_total`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PolicyMatch {
    /// Isolated, and no rule allows the flow.
    DefaultDeny,
    /// Dropped for a policy-type reason although the policies allow it.
    Unexplained,
}

impl PolicyMatch {
    /// Label value (`default_deny`, `unexplained`).
    pub fn label(self) -> &'static str {
        match self {
            Self::DefaultDeny => "default_deny",
            Self::Unexplained => "unexplained",
        }
    }
}

/// The `(namespace, workload)` labels of an endpoint; `("", "unknown")` when the address is
/// unknown.
pub fn endpoint_labels(ep: Option<&Endpoint>) -> (&str, &str) {
    match ep {
        Some(ep) => (ep.namespace_label(), ep.workload_label()),
        None => ("", "unknown"),
    }
}

/// Drops of one label set in one drain (`deny_observer_drops_total`,
/// `deny_observer_drop_bytes_total`).
#[derive(Clone, Debug, PartialEq)]
pub struct DropSeries {
    /// Kernel drop reason label.
    pub reason: Arc<str>,
    /// Deciding direction when NetworkPolicy denies the flow, else unknown.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Source endpoint (`None`: address not parsed).
    pub src: Option<Endpoint>,
    /// Destination endpoint.
    pub dst: Option<Endpoint>,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Policy-attributed denies of one label set in one drain
/// (`deny_observer_policy_denies_total`).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyDeny {
    /// Deciding direction (unknown for `unexplained`).
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Source endpoint.
    pub src: Option<Endpoint>,
    /// Destination endpoint.
    pub dst: Option<Endpoint>,
    /// `policy` label: the isolating policies, bounded (empty for `unexplained`).
    pub policy: Arc<str>,
    /// Why it counts.
    pub policy_match: PolicyMatch,
    /// Packets.
    pub packets: u64,
}

/// Default-denied packets of one edge (workload pair, protocol, destination port) in one
/// drain: what the alert stage observes for spikes and new denied edges.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeDeny {
    /// Deciding direction.
    pub direction: Direction,
    /// Source endpoint.
    pub src: Option<Endpoint>,
    /// Destination endpoint.
    pub dst: Option<Endpoint>,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port; 0 for protocols without ports.
    pub port: u16,
    /// Packets.
    pub packets: u64,
    /// The verdict (isolating policies, nearest misses).
    pub verdict: Arc<Verdict>,
}

impl EdgeDeny {
    /// Isolating policies of the deciding side as `(namespace, name)`.
    pub fn isolating_policies(&self) -> impl Iterator<Item = (&str, &str)> {
        self.verdict
            .deciding_side()
            .into_iter()
            .flat_map(|side| side.isolating_policies.iter())
            .filter_map(|id| id.split_once('/'))
    }
}

/// What the ring buffer said about the first packet of a flow: where a person looks next.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FirstPacket {
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Interface index the packet was on (0: none).
    pub ifindex: u32,
    /// Inode of that interface's network namespace (0: unknown).
    pub netns: u32,
}

/// A `PolicyDenied` Event to publish on the pod whose policy denied.
#[derive(Clone, Debug, PartialEq)]
pub struct DenyNotice {
    /// The pod whose policy denied (destination for ingress, source for egress).
    pub pod: Arc<Pod>,
    /// Deciding direction.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port (`None` for protocols without ports).
    pub port: Option<u16>,
    /// The other end (`None`: address not parsed).
    pub peer: Option<Endpoint>,
    /// Denied packets over `window`.
    pub packets: u64,
    /// The time the packets were counted over: since the previous drain.
    pub window: Duration,
    /// The verdict (isolating policies, nearest misses).
    pub verdict: Arc<Verdict>,
    /// Detail of the first packet of one of the flows, when the ring buffer delivered it in
    /// this drain.
    pub first_packet: Option<FirstPacket>,
}

/// An accepted connection (or UDP/SCTP flow) between two endpoints, for
/// `deny_observer_connections_total`. Filled by the allowed-connection path.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionSeries {
    /// Source endpoint.
    pub src: Option<Endpoint>,
    /// Destination endpoint.
    pub dst: Option<Endpoint>,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// Connections.
    pub connections: u64,
}

/// The node-wide counters of a drain, passed through unchanged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelCounts {
    /// Every counted drop per reason: `(reason label, packets, bytes)`.
    pub reason_totals: Vec<(Arc<str>, u64, u64)>,
    /// What the kernel side could not deliver.
    pub losses: Losses,
    /// Keys in the flow map.
    pub flow_map_entries: u64,
    /// Capacity of the flow map.
    pub flow_map_capacity: u64,
}

/// Everything one drain produced. Reused from drain to drain, so its vectors keep their
/// capacity.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Node-wide counters.
    pub kernel: KernelCounts,
    /// Drop series.
    pub drops: Vec<DropSeries>,
    /// Policy denies.
    pub denies: Vec<PolicyDeny>,
    /// Denied edges.
    pub edges: Vec<EdgeDeny>,
    /// Event notices (empty when Events are off).
    pub notices: Vec<DenyNotice>,
    /// Accepted connections.
    pub connections: Vec<ConnectionSeries>,
    /// Ring-buffer samples that could not be decoded.
    pub bad_samples: u64,
}

impl Outcomes {
    /// Empties the outcomes for the next drain; capacity well beyond the last drain's need
    /// is released.
    fn clear(&mut self) {
        trim_vec(&mut self.drops);
        trim_vec(&mut self.denies);
        trim_vec(&mut self.edges);
        trim_vec(&mut self.notices);
        trim_vec(&mut self.connections);
        self.kernel.reason_totals.clear();
        self.kernel.losses = Losses::default();
        self.drops.clear();
        self.denies.clear();
        self.edges.clear();
        self.notices.clear();
        self.connections.clear();
        self.bad_samples = 0;
    }
}

/// A consumer of outcomes: Prometheus export, the alert stage, Kubernetes Events.
pub trait Sink {
    /// Takes the outcomes of one drain made at `now`.
    fn record(&mut self, outcomes: &Outcomes, now: SystemTime);
}

/// Identity of an endpoint within one drain: its kind, and for a pod the address of its `Arc`
/// (the outcomes hold a clone, so the address stays unique until the next drain). Two pods of
/// one workload are two identities that share a series: the series map sums them, so grouping
/// only ever merges equal label sets.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
struct EndpointId(Option<(Discriminant<Endpoint>, usize)>);

impl EndpointId {
    fn of(ep: Option<&Endpoint>) -> Self {
        Self(ep.map(|e| {
            let ptr = match e {
                Endpoint::Pod(p) => Arc::as_ptr(p) as usize,
                Endpoint::Service(s) => Arc::as_ptr(s) as usize,
                _ => 0,
            };
            (std::mem::discriminant(e), ptr)
        }))
    }
}

fn ptr_id<T: ?Sized>(arc: &Arc<T>) -> usize {
    Arc::as_ptr(arc).cast::<u8>() as usize
}

#[derive(Copy, Clone, PartialEq, Eq, Hash)]
struct DropKey {
    /// The reason label's `Arc<str>` (one per reason in the capture stage).
    reason: usize,
    direction: Direction,
    protocol: Protocol,
    src: EndpointId,
    dst: EndpointId,
}

#[derive(Copy, Clone, PartialEq, Eq, Hash)]
struct DenyKey {
    direction: Direction,
    protocol: Protocol,
    src: EndpointId,
    dst: EndpointId,
    /// The policy label's `Arc<str>` (one per verdict).
    policy: usize,
    policy_match: PolicyMatch,
}

/// Edges and notices: one pair of endpoints on one port, in one deciding direction. The
/// isolating policies depend only on the pod whose side decides, so they are those of every
/// flow summed here; a notice keeps the first flow's nearest misses.
#[derive(PartialEq, Eq, Hash)]
struct EdgeKey {
    direction: Direction,
    protocol: Protocol,
    port: u16,
    src: EndpointId,
    dst: EndpointId,
}

/// Flow identity of a ring-buffer sample, to find the first packet of a notice's flows.
#[derive(PartialEq, Eq, Hash)]
struct SampleKey {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Protocol,
    port: u16,
}

/// The attribution stage's state between drains: grouping maps kept for their capacity, the
/// time of the previous drain.
pub struct Attribution {
    events: bool,
    last_drain: SystemTime,
    no_policy: Arc<str>,
    out: Outcomes,
    drop_index: FastMap<DropKey, usize>,
    deny_index: FastMap<DenyKey, usize>,
    /// Index of the edge in `out.edges`, and of its notice in `out.notices` if one was made.
    edge_index: FastMap<EdgeKey, (usize, Option<usize>)>,
    samples: FastMap<SampleKey, FirstPacket>,
    /// The endpoints of the previous flow's addresses, within one drain.
    last_src: LastEndpoint,
    last_dst: LastEndpoint,
    /// The drop and deny series of the previous flow and their index, within one drain: the
    /// flows of a scan add to the same two, and skip two map lookups each.
    last_drop: Option<(DropKey, usize)>,
    last_deny: Option<(DenyKey, usize)>,
}

/// The endpoint of the address looked up last. Flows arrive in the order the kernel first
/// counted them, so a scan or a flood from one peer is a long run of flows with the same
/// addresses and other ports; those skip the attributor's lookups. Reset at every drain: the
/// views may change between drains.
#[derive(Default)]
struct LastEndpoint(Option<(IpAddr, Endpoint)>);

impl LastEndpoint {
    fn get(&mut self, views: &Views, ip: IpAddr) -> Endpoint {
        match &self.0 {
            Some((last, ep)) if *last == ip => ep.clone(),
            _ => {
                let ep = views.drop_endpoint(ip);
                self.0 = Some((ip, ep.clone()));
                ep
            }
        }
    }
}

impl Attribution {
    /// A stage started at `now`. With `events` false no notices are made (nothing would
    /// publish them).
    pub fn new(events: bool, now: SystemTime) -> Self {
        Self {
            events,
            last_drain: now,
            no_policy: Arc::from(""),
            out: Outcomes::default(),
            drop_index: FastMap::default(),
            deny_index: FastMap::default(),
            edge_index: FastMap::default(),
            samples: FastMap::default(),
            last_src: LastEndpoint::default(),
            last_dst: LastEndpoint::default(),
            last_drop: None,
            last_deny: None,
        }
    }

    /// Attributes one drain made at `now`; `samples` are the ring-buffer samples read with it.
    pub fn attribute(
        &mut self,
        views: &Views,
        report: &DrainReport,
        samples: &[Sample],
        now: SystemTime,
    ) -> &Outcomes {
        self.out.clear();
        trim_map(&mut self.drop_index);
        trim_map(&mut self.deny_index);
        trim_map(&mut self.edge_index);
        trim_map(&mut self.samples);
        self.drop_index.clear();
        self.deny_index.clear();
        self.edge_index.clear();
        self.samples.clear();
        self.last_src = LastEndpoint::default();
        self.last_dst = LastEndpoint::default();
        self.last_drop = None;
        self.last_deny = None;
        let window = now.duration_since(self.last_drain).unwrap_or_default();
        self.last_drain = now;

        self.out
            .kernel
            .reason_totals
            .extend(report.reason_totals.iter().cloned());
        self.out.kernel.losses = report.losses;
        self.out.kernel.flow_map_entries = report.flow_map_entries;
        self.out.kernel.flow_map_capacity = report.flow_map_capacity;
        if self.events {
            for sample in samples {
                let d = &sample.drop;
                self.samples
                    .entry(SampleKey {
                        src: d.src,
                        dst: d.dst,
                        protocol: d.protocol,
                        port: d.dst_port,
                    })
                    .or_insert(FirstPacket {
                        src_port: sample.src_port,
                        ifindex: sample.ifindex,
                        netns: d.netns,
                    });
            }
        }
        for drop in &report.drops {
            self.flow(views, drop, window);
        }
        &self.out
    }

    /// The outcomes of the last drain.
    pub fn outcomes(&self) -> &Outcomes {
        &self.out
    }

    /// Mutable outcomes of the last drain, for counts read with the drain but outside the
    /// report (undecodable samples).
    pub fn outcomes_mut(&mut self) -> &mut Outcomes {
        &mut self.out
    }

    fn flow(&mut self, views: &Views, drop: &FlowDrop, window: Duration) {
        let src = drop.src.map(|ip| self.last_src.get(views, ip));
        let dst = drop.dst.map(|ip| self.last_dst.get(views, ip));
        let verdict = views.verdict(drop, src.as_ref(), dst.as_ref());
        let denied = verdict.as_ref().filter(|v| !v.allowed);
        let direction = denied
            .and_then(|v| v.direction)
            .unwrap_or(Direction::Unknown);
        self.add_drop(drop, direction, src.as_ref(), dst.as_ref());
        let Some(verdict) = verdict else {
            return;
        };
        if !POLICY_REASONS.contains(&drop.reason.as_ref()) {
            return;
        }
        if verdict.allowed {
            let policy = Arc::clone(&self.no_policy);
            self.add_deny(
                Direction::Unknown,
                drop,
                src.as_ref(),
                dst.as_ref(),
                &policy,
                PolicyMatch::Unexplained,
            );
            return;
        }
        self.add_deny(
            direction,
            drop,
            src.as_ref(),
            dst.as_ref(),
            &verdict.policy,
            PolicyMatch::DefaultDeny,
        );
        self.add_edge(drop, direction, src, dst, verdict, window);
    }

    fn add_drop(
        &mut self,
        drop: &FlowDrop,
        direction: Direction,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
    ) {
        let key = DropKey {
            reason: ptr_id(&drop.reason),
            direction,
            protocol: drop.protocol,
            src: EndpointId::of(src),
            dst: EndpointId::of(dst),
        };
        let drops = &mut self.out.drops;
        let i = match self.last_drop {
            Some((last, i)) if last == key => i,
            _ => *self.drop_index.entry(key).or_insert_with(|| {
                drops.push(DropSeries {
                    reason: Arc::clone(&drop.reason),
                    direction,
                    protocol: drop.protocol,
                    src: src.cloned(),
                    dst: dst.cloned(),
                    packets: 0,
                    bytes: 0,
                });
                drops.len() - 1
            }),
        };
        self.last_drop = Some((key, i));
        if let Some(series) = drops.get_mut(i) {
            series.packets += drop.packets;
            series.bytes += drop.bytes;
        }
    }

    fn add_deny(
        &mut self,
        direction: Direction,
        drop: &FlowDrop,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
        policy: &Arc<str>,
        policy_match: PolicyMatch,
    ) {
        let key = DenyKey {
            direction,
            protocol: drop.protocol,
            src: EndpointId::of(src),
            dst: EndpointId::of(dst),
            policy: ptr_id(policy),
            policy_match,
        };
        let denies = &mut self.out.denies;
        let i = match self.last_deny {
            Some((last, i)) if last == key => i,
            _ => *self.deny_index.entry(key).or_insert_with(|| {
                denies.push(PolicyDeny {
                    direction,
                    protocol: drop.protocol,
                    src: src.cloned(),
                    dst: dst.cloned(),
                    policy: Arc::clone(policy),
                    policy_match,
                    packets: 0,
                });
                denies.len() - 1
            }),
        };
        self.last_deny = Some((key, i));
        if let Some(deny) = denies.get_mut(i) {
            deny.packets += drop.packets;
        }
    }

    fn add_edge(
        &mut self,
        drop: &FlowDrop,
        direction: Direction,
        src: Option<Endpoint>,
        dst: Option<Endpoint>,
        verdict: Arc<Verdict>,
        window: Duration,
    ) {
        let port = if drop.protocol.has_ports() {
            drop.dst_port
        } else {
            0
        };
        let key = EdgeKey {
            direction,
            protocol: drop.protocol,
            port,
            src: EndpointId::of(src.as_ref()),
            dst: EndpointId::of(dst.as_ref()),
        };
        let sample = SampleKey {
            src: drop.src,
            dst: drop.dst,
            protocol: drop.protocol,
            port: drop.dst_port,
        };
        // One hash of the key whether the edge is new (every port of a scan) or known.
        let slot = match self.edge_index.entry(key) {
            Entry::Occupied(known) => {
                let &(i, notice) = known.get();
                if let Some(edge) = self.out.edges.get_mut(i) {
                    edge.packets += drop.packets;
                }
                if let Some(notice) = notice.and_then(|n| self.out.notices.get_mut(n)) {
                    notice.packets += drop.packets;
                    if notice.first_packet.is_none() {
                        notice.first_packet = self.samples.get(&sample).copied();
                    }
                }
                return;
            }
            Entry::Vacant(slot) => slot,
        };
        let i = self.out.edges.len();
        let (denied_side, peer) = match direction {
            Direction::Egress => (src.as_ref(), dst.as_ref()),
            _ => (dst.as_ref(), src.as_ref()),
        };
        let mut notice = None;
        if self.events
            && let Some(Endpoint::Pod(pod)) = denied_side
        {
            notice = Some(self.out.notices.len());
            self.out.notices.push(DenyNotice {
                pod: Arc::clone(pod),
                direction,
                protocol: drop.protocol,
                port: drop.protocol.has_ports().then_some(drop.dst_port),
                peer: peer.cloned(),
                packets: drop.packets,
                window,
                verdict: Arc::clone(&verdict),
                first_packet: self.samples.get(&sample).copied(),
            });
        }
        slot.insert((i, notice));
        self.out.edges.push(EdgeDeny {
            direction,
            src,
            dst,
            protocol: drop.protocol,
            port,
            packets: drop.packets,
            verdict,
        });
    }
}
