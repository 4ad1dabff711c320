//! Attribution: which pod (or which kind of non-pod) an address belongs to.
//!
//! Non-pod addresses get one of four fixed values, never one per IP, so metric series stay
//! bounded: `node` (this node, including loopback), `host` (another node, known from host-network
//! pods), `world` (public) and `private` (every other non-public range). A drop's address that
//! is a Service's ClusterIP, external IP or LoadBalancer IP is that Service (one label per
//! Service, never per IP).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};

use super::model::{Inventory, Pod, PodPhase, Service};
use crate::flow::{FastMap, FastSet};

/// What an address is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A pod's address.
    Pod(Arc<Pod>),
    /// This node: one of its interface addresses, or loopback.
    Node,
    /// Another node: an address host-network pods use that is not this node's.
    Host,
    /// A public address.
    World,
    /// A non-public address that is no pod's or node's (RFC 1918, CGNAT, ULA, link-local, ...).
    Private,
    /// A Service's ClusterIP that was never translated to a backend: what kube-proxy's
    /// reject rule drops when a Service has no ready endpoint. Only [`Attributor::drop_endpoint`]
    /// gives it.
    Service(Arc<ServiceAddr>),
}

/// A Service as the end of a drop, with its workload label made once per Service.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The Service.
    pub service: Arc<Service>,
    /// `service/<name>`. A pod's workload name never holds a `/`, so the value cannot collide
    /// with one.
    workload: String,
}

impl ServiceAddr {
    fn new(service: &Arc<Service>) -> Self {
        Self {
            workload: format!("{SERVICE_WORKLOAD_PREFIX}{}", service.name),
            service: Arc::clone(service),
        }
    }
}

/// Prefix of the `*_workload` label of a Service's ClusterIP.
pub const SERVICE_WORKLOAD_PREFIX: &str = "service/";

impl Endpoint {
    /// The `*_namespace` metric label: the pod's or Service's namespace, `""` for other
    /// addresses.
    pub fn namespace_label(&self) -> &str {
        match self {
            Self::Pod(p) => &p.namespace,
            Self::Service(s) => &s.service.namespace,
            _ => "",
        }
    }

    /// The `*_workload` metric label: the pod's workload name, `service/<name>` for a
    /// ClusterIP, or `node`, `host`, `world`, `private`.
    pub fn workload_label(&self) -> &str {
        match self {
            Self::Pod(p) => &p.workload.name,
            Self::Service(s) => &s.workload,
            Self::Node => "node",
            Self::Host => "host",
            Self::World => "world",
            Self::Private => "private",
        }
    }

    /// The workload kind (`Deployment`, `Pod`, ..., `Service` for a ClusterIP), `""` for other
    /// addresses.
    pub fn workload_kind(&self) -> &str {
        match self {
            Self::Pod(p) => &p.workload.kind,
            Self::Service(_) => "Service",
            _ => "",
        }
    }

    /// The pod, when this is one.
    pub fn pod(&self) -> Option<&Arc<Pod>> {
        match self {
            Self::Pod(p) => Some(p),
            _ => None,
        }
    }
}

/// The addresses of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    addrs: FastSet<IpAddr>,
    node_name: Option<String>,
}

impl NodeAddrs {
    /// A fixed set of addresses (tests, or addresses given on the command line).
    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            addrs: addrs.into_iter().map(|ip| ip.to_canonical()).collect(),
            node_name: None,
        }
    }

    /// Names this node (`NODE_NAME` from the downward API): the addresses of host-network pods
    /// scheduled here (`spec.nodeName`) then count as this node's, even when the interface
    /// list missed them.
    pub fn with_node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self
    }

    /// The node name, if set.
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    /// The addresses on this host's interfaces (`getifaddrs`). Run in the host network
    /// namespace (a `hostNetwork` DaemonSet) for these to be the node's addresses.
    pub fn from_host() -> io::Result<Self> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs writes a list head into `head` and reports failure with -1.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(io::Error::last_os_error());
        }
        /// Frees the list on every path out, including a panic.
        struct Free(*mut libc::ifaddrs);
        impl Drop for Free {
            fn drop(&mut self) {
                // SAFETY: the pointer came from a successful getifaddrs and is freed once.
                unsafe { libc::freeifaddrs(self.0) }
            }
        }
        let _free = Free(head);
        let mut addrs = FastSet::default();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned, alive until `_free` drops.
            let ifa = unsafe { &*cur };
            if let Some(ip) = sockaddr_ip(ifa.ifa_addr) {
                addrs.insert(ip.to_canonical());
            }
            cur = ifa.ifa_next;
        }
        Ok(Self {
            addrs,
            node_name: None,
        })
    }

    /// Adds an address (for example the node IP from the downward API).
    pub fn insert(&mut self, ip: IpAddr) {
        self.addrs.insert(ip.to_canonical());
    }

    /// True for one of this node's addresses or a loopback address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.addrs.contains(&ip)
    }

    /// The interface addresses (loopback is implied, whether listed or not).
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs.iter().copied()
    }
}

/// Reads an IPv4 or IPv6 address out of a `sockaddr`, `None` for other families or null.
fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null, and every sockaddr starts with its family.
    let family = i32::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in; read_unaligned avoids assuming
            // the allocator aligned it for the larger type.
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Maps addresses to [`Endpoint`]s for an inventory. Lookups are hash lookups plus a short
/// fixed list of ranges; nothing scans the pods. Pod changes are applied in place
/// ([`Attributor::apply`]), touching only the addresses of the pods that changed.
#[derive(Clone, Debug, Default)]
pub struct Attributor {
    /// Pod addresses. Several pods may claim one (a finished pod's status keeps an address a
    /// new pod already has); the owner is the best ranked ([`claim_rank`]).
    pods: FastMap<IpAddr, Claims>,
    /// Addresses of host-network pods, with how many such pods use each.
    hosts: FastMap<IpAddr, u32>,
    /// Addresses of host-network pods scheduled on this node: this node's too, even when the
    /// interface list missed them.
    local: FastMap<IpAddr, u32>,
    /// Service ClusterIPs: virtual addresses a connection's opening end may name, translated
    /// to a backend before any pod sees the connection.
    services: FastMap<IpAddr, Arc<ServiceAddr>>,
    /// Services' external and load-balancer IPs. Kept apart from the ClusterIPs because such
    /// an address may also be a node's own (`externalIPs` set to node addresses is common on
    /// bare metal): kube-proxy translates only the Service's ports there, so the node keeps
    /// its address and only other addresses are taken to be the Service.
    external: FastMap<IpAddr, Arc<ServiceAddr>>,
    node: NodeAddrs,
}

/// The pods claiming one address.
#[derive(Clone, Debug)]
struct Claims {
    owner: Arc<Pod>,
    /// The other claimants, kept so that the next best takes over when the owner goes.
    others: Vec<Arc<Pod>>,
}

/// Rank of a pod claiming an IP: live phases first, then the newest. The name breaks the last
/// tie so that the winner does not depend on the order of the inventory.
fn claim_rank(p: &Pod) -> (PodPhase, i64, std::cmp::Reverse<(&str, &str)>) {
    (
        p.phase,
        p.created_unix,
        std::cmp::Reverse((p.namespace.as_str(), p.name.as_str())),
    )
}

fn count_up(map: &mut FastMap<IpAddr, u32>, ip: IpAddr) {
    *map.entry(ip).or_default() += 1;
}

fn count_down(map: &mut FastMap<IpAddr, u32>, ip: IpAddr) {
    if let Some(n) = map.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            map.remove(&ip);
        }
    }
}

impl Attributor {
    /// Indexes the pods of `inv`. Host-network pods never own an IP (they share the node's):
    /// their addresses mark other nodes ([`Endpoint::Host`]) unless they are this node's.
    pub fn new(inv: &Inventory, node: NodeAddrs) -> Self {
        let mut a = Self {
            pods: FastMap::with_capacity_and_hasher(inv.pods.len(), Default::default()),
            hosts: FastMap::default(),
            local: FastMap::default(),
            services: FastMap::default(),
            external: FastMap::default(),
            node,
        };
        for pod in &inv.pods {
            a.insert(pod);
        }
        a.set_services(&inv.services);
        a
    }

    /// Replaces the ClusterIP index with the addresses of `services`: ClusterIPs, then
    /// external and load-balancer IPs. ClusterIPs are unique in a cluster; should two
    /// manifests claim one, the first in inventory order (namespace, name) keeps it. An
    /// external IP several Services share (one port each) is the first's.
    pub fn set_services(&mut self, services: &[Arc<Service>]) {
        let n = services.iter().map(|s| s.cluster_ips.len()).sum();
        let mut index = FastMap::with_capacity_and_hasher(n, Default::default());
        let mut external = FastMap::default();
        let addrs: Vec<_> = services
            .iter()
            .map(|svc| (svc, Arc::new(ServiceAddr::new(svc))))
            .collect();
        // ClusterIPs first: an external IP two Services share (a load balancer's shared IP
        // with one port each) must not take a ClusterIP from its Service.
        for (svc, addr) in &addrs {
            for ip in &svc.cluster_ips {
                index
                    .entry(ip.to_canonical())
                    .or_insert_with(|| Arc::clone(addr));
            }
        }
        for (svc, addr) in &addrs {
            for ip in &svc.external_ips {
                let ip = ip.to_canonical();
                if !index.contains_key(&ip) {
                    external.entry(ip).or_insert_with(|| Arc::clone(addr));
                }
            }
        }
        self.services = index;
        self.external = external;
    }

    /// The Service whose ClusterIP `ip` is, or whose external or load-balancer IP it is when
    /// it is no node's address.
    pub fn service(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_addr(ip, true).map(|s| &s.service)
    }

    /// The Service at `ip`: its ClusterIP, or (`external`) one of its external or load-balancer
    /// IPs that is no node's address.
    fn service_addr(&self, ip: IpAddr, external: bool) -> Option<&Arc<ServiceAddr>> {
        if self.services.is_empty() && self.external.is_empty() {
            return None;
        }
        let ip = ip.to_canonical();
        self.services.get(&ip).or_else(|| {
            if !external || self.is_node_address(ip) {
                return None;
            }
            self.external.get(&ip)
        })
    }

    /// Whether `ip` is this node's or, through its host-network pods, another node's.
    fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node.contains(ip) || self.local.contains_key(&ip) || self.hosts.contains_key(&ip)
    }

    /// What the end of a *drop* at `ip` is: as [`Attributor::lookup`], except that a Service's
    /// ClusterIP is that Service rather than `private` or `world`. A packet still addressed to a
    /// ClusterIP when it is dropped was never translated to a backend, which is how kube-proxy
    /// rejects traffic to a Service without ready endpoints; NetworkPolicy, enforced after the
    /// translation, has no say in it. A ClusterIP on one of this node's interfaces is still
    /// the Service: kube-proxy in IPVS mode binds every ClusterIP to its `kube-ipvs0` dummy
    /// interface, and NodeLocal DNSCache binds the DNS Service's. Pod and other nodes'
    /// addresses keep precedence (a ClusterIP range overlapping them would be a cluster
    /// misconfiguration).
    pub fn drop_endpoint(&self, ip: IpAddr) -> Endpoint {
        match self.lookup(ip) {
            ep @ (Endpoint::Private | Endpoint::World | Endpoint::Node) => {
                // On a node address only a ClusterIP (bound there by kube-proxy IPVS or
                // NodeLocal DNSCache) is the Service; an external IP there is the node's.
                let external = !matches!(ep, Endpoint::Node);
                match self.service_addr(ip, external) {
                    Some(s) => Endpoint::Service(Arc::clone(s)),
                    None => ep,
                }
            }
            ep => ep,
        }
    }

    /// Applies a change of pods: `removed` are pods of the inventory this attributor was built
    /// from (or last updated with), `added` their replacements and new pods. A changed pod is
    /// one removal and one addition. Only the addresses of these pods are touched.
    pub fn apply(&mut self, removed: &[Arc<Pod>], added: &[Arc<Pod>]) {
        for pod in removed {
            self.remove(pod);
        }
        for pod in added {
            self.insert(pod);
        }
    }

    fn is_local(&self, pod: &Pod) -> bool {
        self.node.node_name.is_some() && pod.node_name == self.node.node_name
    }

    fn insert(&mut self, pod: &Arc<Pod>) {
        let local = pod.host_network && self.is_local(pod);
        for ip in ips_of(pod) {
            if pod.host_network {
                count_up(&mut self.hosts, ip);
                if local {
                    count_up(&mut self.local, ip);
                }
                continue;
            }
            match self.pods.get_mut(&ip) {
                None => {
                    self.pods.insert(
                        ip,
                        Claims {
                            owner: Arc::clone(pod),
                            others: Vec::new(),
                        },
                    );
                }
                Some(c) if claim_rank(pod) > claim_rank(&c.owner) => {
                    let old = std::mem::replace(&mut c.owner, Arc::clone(pod));
                    c.others.push(old);
                }
                Some(c) => c.others.push(Arc::clone(pod)),
            }
        }
    }

    fn remove(&mut self, pod: &Arc<Pod>) {
        let local = pod.host_network && self.is_local(pod);
        for ip in ips_of(pod) {
            if pod.host_network {
                count_down(&mut self.hosts, ip);
                if local {
                    count_down(&mut self.local, ip);
                }
                continue;
            }
            let Some(c) = self.pods.get_mut(&ip) else {
                continue;
            };
            if Arc::ptr_eq(&c.owner, pod) {
                let next = c
                    .others
                    .iter()
                    .enumerate()
                    .max_by(|(_, a), (_, b)| claim_rank(a).cmp(&claim_rank(b)))
                    .map(|(i, _)| i);
                match next {
                    Some(i) => c.owner = c.others.swap_remove(i),
                    None => {
                        self.pods.remove(&ip);
                    }
                }
            } else if let Some(i) = c.others.iter().position(|o| Arc::ptr_eq(o, pod)) {
                c.others.swap_remove(i);
            }
        }
    }

    /// What `ip` is.
    pub fn lookup(&self, ip: IpAddr) -> Endpoint {
        let ip = ip.to_canonical();
        if self.node.contains(ip) || self.local.contains_key(&ip) {
            return Endpoint::Node;
        }
        let host = self.hosts.contains_key(&ip);
        if let Some(c) = self.pods.get(&ip) {
            // A finished pod's status keeps its old IP; when a node now uses that address,
            // the node is the live owner.
            if !(host && c.owner.phase == PodPhase::Terminated) {
                return Endpoint::Pod(Arc::clone(&c.owner));
            }
        }
        if host {
            return Endpoint::Host;
        }
        classify(ip)
    }

    /// Number of pod addresses indexed.
    pub fn pod_ips(&self) -> usize {
        self.pods.len()
    }

    /// This node's addresses.
    pub fn node(&self) -> &NodeAddrs {
        &self.node
    }
}

/// A pod's addresses, canonical, each once.
fn ips_of(pod: &Pod) -> impl Iterator<Item = IpAddr> + '_ {
    pod.ips
        .iter()
        .enumerate()
        .filter(|(i, ip)| {
            let ip = ip.to_canonical();
            !pod.ips[..*i].iter().any(|p| p.to_canonical() == ip)
        })
        .map(|(_, ip)| ip.to_canonical())
}

/// Non-public IPv4 ranges (IANA special-purpose registry, RFC 6890 and successors).
const PRIVATE_V4: [Ipv4Net; 14] = [
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8), // "this network"
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8), // RFC 1918
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10), // CGNAT, RFC 6598
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8), // loopback (node normally wins)
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16), // link-local
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12), // RFC 1918
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 0), 24), // TEST-NET-1
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16), // RFC 1918
    Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
    Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24), // TEST-NET-2
    Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24), // TEST-NET-3
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4), // reserved and broadcast
];

/// Non-public IPv6 ranges.
const PRIVATE_V6: [Ipv6Net; 7] = [
    Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128),
    Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128),
    Ipv6Net::new_assert(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7), // ULA
    Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8), // multicast
];

/// NAT64 well-known prefix (RFC 6052): the low 32 bits are an IPv4 address.
const NAT64: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// `World` or `Private` for an address that is no pod's or node's.
pub fn classify(ip: IpAddr) -> Endpoint {
    let private = match ip.to_canonical() {
        IpAddr::V4(v4) => PRIVATE_V4.iter().any(|n| n.contains(&v4)),
        IpAddr::V6(v6) if NAT64.contains(&v6) => {
            let [.., a, b, c, d] = v6.octets();
            return classify(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        }
        IpAddr::V6(v6) => PRIVATE_V6.iter().any(|n| n.contains(&v6)),
    };
    if private {
        Endpoint::Private
    } else {
        Endpoint::World
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::Workload;

    fn pod(name: &str, ips: &[&str], phase: PodPhase, created: i64, host: bool) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: "prod".into(),
            name: name.into(),
            labels: Default::default(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            host_network: host,
            node_name: None,
            phase,
            uid: None,
            created_unix: created,
            ports: vec![],
            workload: Workload {
                kind: "Deployment".into(),
                name: format!("{name}-wl"),
            },
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn inv(pods: Vec<Arc<Pod>>) -> Inventory {
        Inventory {
            pods,
            ..Default::default()
        }
    }

    fn name_of(e: Endpoint) -> String {
        match e {
            Endpoint::Pod(p) => p.name.clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn ip_reuse_prefers_live_then_newest_in_any_order() {
        let pods = vec![
            pod("done-new", &["10.1.0.5"], PodPhase::Terminated, 300, false),
            pod("running-old", &["10.1.0.5"], PodPhase::Running, 100, false),
            pod("pending-new", &["10.1.0.5"], PodPhase::Pending, 400, false),
            pod("running-new", &["10.1.0.5"], PodPhase::Running, 200, false),
            pod("unknown", &["10.1.0.6"], PodPhase::Unknown, 1, false),
            pod("failed", &["10.1.0.6"], PodPhase::Terminated, 9, false),
            pod("pending", &["10.1.0.7"], PodPhase::Pending, 1, false),
            pod("unknown2", &["10.1.0.7"], PodPhase::Unknown, 9, false),
        ];
        // Every rotation of the input gives the same winners.
        for r in 0..pods.len() {
            let mut p = pods.clone();
            p.rotate_left(r);
            let a = Attributor::new(&inv(p), NodeAddrs::default());
            assert_eq!(name_of(a.lookup(ip("10.1.0.5"))), "running-new");
            assert_eq!(name_of(a.lookup(ip("10.1.0.6"))), "unknown");
            assert_eq!(name_of(a.lookup(ip("10.1.0.7"))), "pending");
        }
    }

    #[test]
    fn host_network_pods_never_own_ips() {
        let a = Attributor::new(
            &inv(vec![
                pod(
                    "kube-proxy-a",
                    &["192.168.1.10"],
                    PodPhase::Running,
                    9,
                    true,
                ),
                pod(
                    "kube-proxy-b",
                    &["192.168.1.11"],
                    PodPhase::Running,
                    9,
                    true,
                ),
                pod("ghost", &["192.168.1.11"], PodPhase::Terminated, 1, false),
            ]),
            NodeAddrs::new([ip("192.168.1.10")]),
        );
        assert_eq!(a.lookup(ip("192.168.1.10")), Endpoint::Node);
        // A finished pod's stale status does not beat a node using the address now.
        assert_eq!(a.lookup(ip("192.168.1.11")), Endpoint::Host);
        let a = Attributor::new(
            &inv(vec![pod(
                "kube-proxy-b",
                &["192.168.1.11", "fd00::11"],
                PodPhase::Running,
                9,
                true,
            )]),
            NodeAddrs::new([ip("192.168.1.10")]),
        );
        assert_eq!(a.lookup(ip("192.168.1.11")), Endpoint::Host);
        assert_eq!(a.lookup(ip("fd00::11")), Endpoint::Host);
        assert_eq!(a.lookup(ip("192.168.1.12")), Endpoint::Private);
        assert_eq!(a.pod_ips(), 0);
    }

    #[test]
    fn host_network_pods_on_this_node_are_node() {
        let mut a_pod = (*pod("agent-a", &["192.168.1.10"], PodPhase::Running, 1, true)).clone();
        a_pod.node_name = Some("node-a".into());
        let mut b_pod = (*pod("agent-b", &["192.168.1.11"], PodPhase::Running, 1, true)).clone();
        b_pod.node_name = Some("node-b".into());
        let i = inv(vec![Arc::new(a_pod), Arc::new(b_pod)]);
        let a = Attributor::new(&i, NodeAddrs::default().with_node_name("node-a"));
        assert_eq!(a.lookup(ip("192.168.1.10")), Endpoint::Node);
        assert_eq!(a.lookup(ip("192.168.1.11")), Endpoint::Host);
        assert_eq!(a.node().node_name(), Some("node-a"));
        // Without the node name, both are just other hosts.
        let a = Attributor::new(&i, NodeAddrs::default());
        assert_eq!(a.lookup(ip("192.168.1.10")), Endpoint::Host);
    }

    #[test]
    fn loopback_and_node_addresses() {
        let a = Attributor::new(
            &inv(vec![]),
            NodeAddrs::new([ip("203.0.113.9"), ip("2001:db8::9")]),
        );
        for s in [
            "127.0.0.1",
            "127.5.5.5",
            "::1",
            "203.0.113.9",
            "2001:db8::9",
            "::ffff:203.0.113.9",
        ] {
            assert_eq!(a.lookup(ip(s)), Endpoint::Node, "{s}");
        }
        assert_eq!(a.lookup(ip("203.0.113.10")), Endpoint::Private);
    }

    #[test]
    fn v6_pods_and_mapped_addresses() {
        let a = Attributor::new(
            &inv(vec![pod(
                "web",
                &["10.2.0.4", "fd12:3456::4"],
                PodPhase::Running,
                1,
                false,
            )]),
            NodeAddrs::default(),
        );
        assert_eq!(name_of(a.lookup(ip("fd12:3456::4"))), "web");
        assert_eq!(name_of(a.lookup(ip("10.2.0.4"))), "web");
        assert_eq!(name_of(a.lookup(ip("::ffff:10.2.0.4"))), "web");
        assert_eq!(a.lookup(ip("fd12:3456::5")), Endpoint::Private);
        assert_eq!(a.pod_ips(), 2);
    }

    #[test]
    fn world_and_private_ranges() {
        for s in [
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.3.4",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.251",
            "255.255.255.255",
            "0.0.0.0",
            "fc00::1",
            "fdff::1",
            "fe80::1",
            "ff02::1",
            "::",
            "64:ff9b::a00:1",
        ] {
            assert_eq!(classify(ip(s)), Endpoint::Private, "{s}");
        }
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "::ffff:8.8.4.4",
        ] {
            assert_eq!(classify(ip(s)), Endpoint::World, "{s}");
        }
    }

    #[test]
    fn labels() {
        let p = pod("api", &["10.0.0.1"], PodPhase::Running, 1, false);
        let e = Endpoint::Pod(p);
        assert_eq!(e.namespace_label(), "prod");
        assert_eq!(e.workload_label(), "api-wl");
        assert_eq!(e.workload_kind(), "Deployment");
        assert!(e.pod().is_some());
        let labels: Vec<_> = [
            Endpoint::Node,
            Endpoint::Host,
            Endpoint::World,
            Endpoint::Private,
        ]
        .iter()
        .map(|e| (e.namespace_label(), e.workload_label(), e.workload_kind()))
        .collect();
        assert_eq!(
            labels,
            [
                ("", "node", ""),
                ("", "host", ""),
                ("", "world", ""),
                ("", "private", "")
            ]
        );
    }

    /// Every address any of `pods` uses, plus one nobody uses.
    fn all_lookups(a: &Attributor, pods: &[Arc<Pod>]) -> Vec<(IpAddr, String)> {
        let mut ips: Vec<IpAddr> = pods.iter().flat_map(|p| p.ips.clone()).collect();
        ips.push(ip("10.9.9.9"));
        ips.sort();
        ips.dedup();
        ips.into_iter().map(|i| (i, name_of(a.lookup(i)))).collect()
    }

    #[test]
    fn applied_changes_match_a_rebuild() {
        // Pods contend for a few addresses in every phase, host networking and node placement;
        // after each random change the updated attributor answers as a fresh one does.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn random_pod(next: &mut impl FnMut(u64) -> u64, name: u64) -> Arc<Pod> {
            let phases = [
                PodPhase::Terminated,
                PodPhase::Unknown,
                PodPhase::Pending,
                PodPhase::Running,
            ];
            let ips: Vec<String> = (0..1 + next(2))
                .map(|_| format!("10.0.0.{}", next(6)))
                .collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            let mut p = (*pod(
                &format!("p{name}"),
                &ips,
                phases[next(4) as usize],
                next(5) as i64,
                next(4) == 0,
            ))
            .clone();
            p.node_name = Some(format!("node-{}", next(2)));
            Arc::new(p)
        }
        let node = NodeAddrs::new([ip("10.0.0.5")]).with_node_name("node-0");
        let mut pods: Vec<Arc<Pod>> = (0..12).map(|n| random_pod(&mut next, n)).collect();
        let mut a = Attributor::new(&inv(pods.clone()), node.clone());
        for step in 0..400 {
            let i = next(pods.len() as u64) as usize;
            let (removed, added) = match next(3) {
                0 if pods.len() > 1 => (vec![pods.swap_remove(i)], vec![]),
                1 => {
                    let p = random_pod(&mut next, 100 + step);
                    pods.push(Arc::clone(&p));
                    (vec![], vec![p])
                }
                _ => {
                    // A new name: names break rank ties, and two pods never share one.
                    let p = random_pod(&mut next, 1000 + step);
                    let old = std::mem::replace(&mut pods[i], Arc::clone(&p));
                    (vec![old], vec![p])
                }
            };
            a.apply(&removed, &added);
            let fresh = Attributor::new(&inv(pods.clone()), node.clone());
            assert_eq!(
                all_lookups(&a, &pods),
                all_lookups(&fresh, &pods),
                "step {step}"
            );
            assert_eq!(a.pod_ips(), fresh.pod_ips(), "step {step}");
        }
    }

    #[test]
    fn from_host_includes_loopback_interface() {
        // Every Linux network namespace has `lo` with 127.0.0.1.
        let n = NodeAddrs::from_host().unwrap();
        assert!(
            n.iter().any(|ip| ip == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{n:?}"
        );
    }
}
