//! Turns `networking.k8s.io/v1` NetworkPolicies into a form that is cheap to evaluate, with the
//! API's defaulting applied once.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::selector::Selector;
use crate::flow::{IpFamily, Protocol};
use crate::inventory::Pod;
use crate::inventory::validate::parse_cidr;

/// A compiled policy.
#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// `"<namespace>/<name>"`.
    pub(crate) id: String,
    /// Namespace of the policy (pod selectors of the policy and of its peers apply there).
    pub(crate) namespace: String,
    /// `spec.podSelector`.
    pub(crate) pod_selector: Selector,
    /// Ingress rules when the policy isolates for ingress, `None` otherwise.
    pub(crate) ingress: Option<Vec<Rule>>,
    /// Egress rules when the policy isolates for egress, `None` otherwise.
    pub(crate) egress: Option<Vec<Rule>>,
}

/// One ingress or egress rule.
#[derive(Debug)]
pub(crate) struct Rule {
    /// `from`/`to`; `None` when absent or empty, which matches every peer.
    pub(crate) peers: Option<Vec<PeerMatcher>>,
    /// `ports`; `None` when absent or empty, which matches every port and protocol.
    pub(crate) ports: Option<Vec<PortMatcher>>,
}

/// Which namespaces a pod peer comes from.
#[derive(Debug)]
pub(crate) enum NamespaceMatcher {
    /// No `namespaceSelector`: the policy's own namespace.
    PolicyNamespace,
    /// `namespaceSelector` (empty: every namespace).
    Selector(Selector),
}

/// One entry of `from`/`to`.
#[derive(Debug)]
pub(crate) enum PeerMatcher {
    /// `podSelector` and/or `namespaceSelector`.
    Pods {
        /// Namespaces the pods must be in.
        namespaces: NamespaceMatcher,
        /// `podSelector`; `None` (absent) selects all pods of the namespaces.
        pods: Option<Selector>,
    },
    /// `ipBlock`.
    IpBlock {
        /// `cidr`.
        cidr: IpNet,
        /// `except`.
        except: Vec<IpNet>,
    },
    /// A peer the engine could not compile (no selector at all, bad CIDR): matches nothing.
    Invalid(String),
}

/// The port part of one `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortSpec {
    /// No `port`: every port of the protocol.
    Any,
    /// `port: N` (with `endPort: M`, the range N..=M).
    Range(u16, u16),
    /// `port: name`, resolved against the destination pod's container ports.
    Named(String),
    /// A port the engine could not compile: matches nothing.
    Invalid(String),
}

/// One `ports` entry.
#[derive(Debug, Clone)]
pub(crate) struct PortMatcher {
    /// `protocol` (TCP when absent).
    pub(crate) protocol: Protocol,
    /// `port`/`endPort`.
    pub(crate) port: PortSpec,
}

/// Applies `policyTypes` defaulting: when absent, Ingress always, and Egress when the policy
/// has at least one egress rule (as the API server's defaulting does).
fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    }
}

/// Compiles a policy; problems are reported through `warn` with the policy's id.
pub(crate) fn compile_policy(policy: &NetworkPolicy, warn: &mut Vec<String>) -> CompiledPolicy {
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = policy.metadata.name.clone().unwrap_or_default();
    let id = format!("{namespace}/{name}");
    let mut w = |msg: String| warn.push(format!("NetworkPolicy {id}: {msg}"));
    let spec = policy.spec.clone().unwrap_or_default();
    let pod_selector = Selector::compile(&spec.pod_selector.unwrap_or_default(), &mut w);
    let (isolates_ingress, isolates_egress) = policy_types(policy);
    let ingress = isolates_ingress.then(|| {
        spec.ingress
            .unwrap_or_default()
            .iter()
            .map(|r| compile_rule(r.from.as_deref(), r.ports.as_deref(), &mut w))
            .collect()
    });
    let egress = isolates_egress.then(|| {
        spec.egress
            .unwrap_or_default()
            .iter()
            .map(|r| compile_rule(r.to.as_deref(), r.ports.as_deref(), &mut w))
            .collect()
    });
    CompiledPolicy {
        id,
        namespace,
        pod_selector,
        ingress,
        egress,
    }
}

fn compile_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    w: &mut impl FnMut(String),
) -> Rule {
    let peers = peers
        .filter(|p| !p.is_empty())
        .map(|p| p.iter().map(|peer| compile_peer(peer, w)).collect());
    let ports = ports
        .filter(|p| !p.is_empty())
        .map(|p| p.iter().map(|port| compile_port(port, w)).collect());
    Rule { peers, ports }
}

fn compile_peer(peer: &NetworkPolicyPeer, w: &mut impl FnMut(String)) -> PeerMatcher {
    if let Some(block) = &peer.ip_block {
        // The inventory's validation parses CIDRs the same way, so what it accepts matches.
        let cidr = match parse_cidr(&block.cidr) {
            Some(c) => c,
            None => {
                let msg = format!("ipBlock cidr {:?}: not a CIDR", block.cidr);
                w(msg.clone());
                return PeerMatcher::Invalid(msg);
            }
        };
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            match parse_cidr(e) {
                Some(n) => except.push(n),
                None => {
                    // Dropping a bad `except` would widen the rule; refuse the whole peer.
                    let msg = format!("ipBlock except {e:?}: not a CIDR");
                    w(msg.clone());
                    return PeerMatcher::Invalid(msg);
                }
            }
        }
        return PeerMatcher::IpBlock { cidr, except };
    }
    if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        let msg = "peer has neither podSelector, namespaceSelector nor ipBlock".to_owned();
        w(msg.clone());
        return PeerMatcher::Invalid(msg);
    }
    PeerMatcher::Pods {
        namespaces: match &peer.namespace_selector {
            None => NamespaceMatcher::PolicyNamespace,
            Some(s) => NamespaceMatcher::Selector(Selector::compile(s, &mut *w)),
        },
        pods: peer
            .pod_selector
            .as_ref()
            .map(|s| Selector::compile(s, &mut *w)),
    }
}

fn compile_port(port: &NetworkPolicyPort, w: &mut impl FnMut(String)) -> PortMatcher {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => match p.parse::<Protocol>() {
            Ok(proto @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) => proto,
            _ => {
                let msg = format!("unsupported protocol {p:?}");
                w(msg.clone());
                return PortMatcher {
                    protocol: Protocol::Other,
                    port: PortSpec::Invalid(msg),
                };
            }
        },
    };
    let spec = match &port.port {
        None => PortSpec::Any,
        Some(IntOrString::Int(n)) => match u16::try_from(*n) {
            Ok(start) if start > 0 => match port.end_port {
                None => PortSpec::Range(start, start),
                Some(end) => match u16::try_from(end) {
                    Ok(end) if end >= start => PortSpec::Range(start, end),
                    _ => {
                        let msg = format!("endPort {end} is not a port at or above {start}");
                        w(msg.clone());
                        PortSpec::Invalid(msg)
                    }
                },
            },
            _ => {
                let msg = format!("port {n} is out of range");
                w(msg.clone());
                PortSpec::Invalid(msg)
            }
        },
        Some(IntOrString::String(name)) => match name.parse::<u16>() {
            // The API accepts "80" as a string only through sloppy clients; treat it as a number.
            Ok(n) if n > 0 => PortSpec::Range(n, n),
            _ => PortSpec::Named(name.clone()),
        },
    };
    PortMatcher {
        protocol,
        port: spec,
    }
}

impl PortMatcher {
    /// Whether this entry matches `protocol`/`port` towards `dst` (the destination pod, whose
    /// container ports resolve named ports; `None` for destinations outside the cluster).
    pub(crate) fn matches(&self, protocol: Protocol, port: u16, dst: Option<&Pod>) -> bool {
        if self.protocol != protocol {
            return false;
        }
        match &self.port {
            PortSpec::Any => true,
            PortSpec::Range(a, b) => (*a..=*b).contains(&port),
            PortSpec::Named(name) => dst.is_some_and(|pod| {
                pod.ports.iter().any(|cp| {
                    cp.port == port && cp.protocol == protocol && cp.name.as_deref() == Some(name)
                })
            }),
            PortSpec::Invalid(_) => false,
        }
    }

    /// Words for this entry, e.g. `TCP/5432`, `TCP/8000-8080`, `TCP/http (8080 on y/b)`.
    pub(crate) fn describe(&self, dst: Option<&Pod>) -> String {
        let proto = self.protocol.k8s_name();
        match &self.port {
            PortSpec::Any => format!("any {proto} port"),
            PortSpec::Range(a, b) if a == b => format!("{proto}/{a}"),
            PortSpec::Range(a, b) => format!("{proto}/{a}-{b}"),
            PortSpec::Named(name) => {
                let resolved = dst.and_then(|pod| {
                    pod.ports
                        .iter()
                        .find(|cp| cp.protocol == self.protocol && cp.name.as_deref() == Some(name))
                        .map(|cp| (pod, cp.port))
                });
                match (dst, resolved) {
                    (_, Some((pod, n))) => {
                        format!(
                            "{proto}/{name} (port {n} on {}/{})",
                            pod.namespace, pod.name
                        )
                    }
                    (Some(pod), None) => {
                        // The name over another protocol is the usual slip (`dns` is UDP).
                        let other = pod
                            .ports
                            .iter()
                            .find(|cp| cp.name.as_deref() == Some(name))
                            .map(|cp| cp.protocol);
                        match other {
                            Some(p) => format!(
                                "{proto}/{name} (on {}/{} the port {name} is {p}, not {proto})",
                                pod.namespace, pod.name
                            ),
                            None => format!(
                                "{proto}/{name} (a port name {}/{} does not declare)",
                                pod.namespace, pod.name
                            ),
                        }
                    }
                    (None, None) => format!("{proto}/{name} (a named port: pods only)"),
                }
            }
            PortSpec::Invalid(why) => format!("nothing (invalid port: {why})"),
        }
    }
}

/// Where a peer endpoint is, as rules see it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PeerView<'a> {
    /// A pod; `ns_labels` are its namespace's labels.
    Pod {
        /// The pod.
        pod: &'a Pod,
        /// Labels of the pod's namespace (empty when the namespace is unknown).
        ns_labels: &'a crate::inventory::Labels,
        /// The flow's address family: an ipBlock sees only the pod's address in it. `None`
        /// (a flow named by pods, no address) lets any of the pod's addresses match.
        family: Option<IpFamily>,
    },
    /// An address outside the cluster's pods.
    External(IpAddr),
}

fn in_block(ip: IpAddr, cidr: &IpNet, except: &[IpNet]) -> bool {
    cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
}

impl PeerMatcher {
    /// Whether `peer` matches this entry of a policy in `policy_ns`.
    pub(crate) fn matches(&self, policy_ns: &str, peer: PeerView<'_>) -> bool {
        match (self, peer) {
            (PeerMatcher::IpBlock { cidr, except }, PeerView::External(ip)) => {
                in_block(ip, cidr, except)
            }
            (PeerMatcher::IpBlock { cidr, except }, PeerView::Pod { pod, family, .. }) => pod
                .ips
                .iter()
                .filter(|ip| family.is_none_or(|f| IpFamily::of(**ip) == f))
                .any(|ip| in_block(*ip, cidr, except)),
            (PeerMatcher::Pods { namespaces, pods }, PeerView::Pod { pod, ns_labels, .. }) => {
                // Host-network pods carry the node's address: selectors cannot pick them out
                // (upstream leaves this undefined; only ipBlocks see them, as they see nodes).
                if pod.host_network {
                    return false;
                }
                let ns_ok = match namespaces {
                    NamespaceMatcher::PolicyNamespace => pod.namespace == policy_ns,
                    NamespaceMatcher::Selector(s) => s.matches(ns_labels),
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
            (PeerMatcher::Pods { .. }, PeerView::External(_)) => false,
            (PeerMatcher::Invalid(_), _) => false,
        }
    }

    /// Words for this entry, e.g. `pods with app=web in namespace prod`.
    pub(crate) fn describe(&self, policy_ns: &str) -> String {
        match self {
            PeerMatcher::IpBlock { cidr, except } if except.is_empty() => {
                format!("addresses in {cidr}")
            }
            PeerMatcher::IpBlock { cidr, except } => {
                let ex: Vec<String> = except.iter().map(ToString::to_string).collect();
                format!("addresses in {cidr} except {}", ex.join(", "))
            }
            PeerMatcher::Pods { namespaces, pods } => {
                let who = match pods {
                    Some(s) if !s.is_empty() => format!("pods with {s}"),
                    _ => "all pods".to_owned(),
                };
                let where_ = match namespaces {
                    NamespaceMatcher::PolicyNamespace => format!("in namespace {policy_ns}"),
                    NamespaceMatcher::Selector(s) if s.is_empty() => "in all namespaces".into(),
                    NamespaceMatcher::Selector(s) => match s.single_namespace_name() {
                        Some(n) => format!("in namespace {n}"),
                        None => format!("in namespaces with {s}"),
                    },
                };
                format!("{who} {where_}")
            }
            PeerMatcher::Invalid(why) => format!("nothing (invalid peer: {why})"),
        }
    }
}

impl Rule {
    /// Whether the rule's peers match `peer`.
    pub(crate) fn peer_matches(&self, policy_ns: &str, peer: PeerView<'_>) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(policy_ns, peer)))
    }

    /// Whether the rule's ports match.
    pub(crate) fn port_matches(&self, protocol: Protocol, port: u16, dst: Option<&Pod>) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(protocol, port, dst)))
    }

    /// The rule in words: `allows TCP/5432 only from pods with app=web in namespace prod`.
    pub(crate) fn describe(&self, policy_ns: &str, ingress: bool, dst: Option<&Pod>) -> String {
        let ports = match &self.ports {
            None => "all traffic".to_owned(),
            Some(ps) => ps
                .iter()
                .map(|p| p.describe(dst))
                .collect::<Vec<_>>()
                .join(" or "),
        };
        let dir = if ingress { "from" } else { "to" };
        let peers = match &self.peers {
            None => format!("{dir} any peer"),
            Some(ps) => format!(
                "only {dir} {}",
                ps.iter()
                    .map(|p| p.describe(policy_ns))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        };
        format!("allows {ports} {peers}")
    }
}
