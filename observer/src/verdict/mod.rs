//! The NetworkPolicy engine: given the inventory and a flow, decides `allow` or `deny` with
//! `networking.k8s.io/v1` semantics, and names the policies behind a deny.
//!
//! NetworkPolicies only allow. A pod becomes *isolated* for a direction as soon as one policy
//! selects it for that direction; an isolated pod then only accepts (ingress) or sends (egress)
//! what at least one of those policies allows, and policies combine as a union. A flow passes
//! when the egress side at the source and the ingress side at the destination both allow it.
//! Egress is checked first, so it is the deciding direction when both would deny, except for
//! a drop seen on the destination's node of a packet from a pod on another node
//! ([`FlowQuery::src_remote`]): there only ingress can have dropped it.
//!
//! The engine is pure: no I/O. [`Engine::new`] compiles the policies once and indexes them so
//! that evaluating a flow only looks at policies whose pod selector can select the endpoint.
//! [`VerdictCache`] memoizes verdicts per flow key for one engine generation.

mod cache;
pub mod cli;
mod compile;
pub mod edges;
pub mod preflight;
mod selector;
pub mod suggest;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use self::cache::{EndpointKey, VerdictCache, VerdictKey};
pub use self::cli::{AuditArgs, ExplainArgs, audit, explain};
use self::compile::{CompiledPolicy, PeerView, Rule, compile_policy};
pub use self::views::{Update, Views, update_views};
pub use crate::flow::{Direction, IpFamily, Protocol};
use crate::inventory::{Inventory, Labels, Pod};

/// Errors of the verdict commands.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// `--from`/`--to` named a pod or workload the inventory does not have.
    #[error(
        "unknown pod or workload {0:?} (expected <namespace>/<pod> or <namespace>/<workload> present in the inventory, or an IP address)"
    )]
    UnknownPod(String),
    /// `<ns>/svc/<name>` named a Service the inventory does not have.
    #[error(
        "unknown Service {0:?} (expected <namespace>/svc/<name> or <name>.<namespace>.svc of a Service in the inventory)"
    )]
    UnknownService(String),
    /// `--from`/`--to` was neither `<ns>/<pod>` nor an IP address.
    #[error(
        "invalid endpoint {0:?} (expected <namespace>/<pod>, <namespace>/<workload>, <namespace>/svc/<name> or an IP address)"
    )]
    BadEndpoint(String),
    /// `--port` was neither a number nor a port name of the destination pod.
    #[error("invalid port {port:?}: {reason}")]
    BadPort {
        /// The port as given.
        port: String,
        /// Why it does not resolve.
        reason: String,
    },
    /// A protocol name was not TCP, UDP, SCTP, ICMP or ICMPv6.
    #[error("invalid protocol {0:?} (expected TCP, UDP, SCTP, ICMP or ICMPv6)")]
    BadProtocol(String),
    /// Missing arguments.
    #[error("{0}")]
    Usage(String),
    /// Reading flows or writing the output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// JSON output could not be encoded.
    #[error("encoding JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

/// One end of a flow.
#[derive(Clone, Debug)]
pub enum Peer {
    /// A pod of the inventory.
    Pod(Arc<Pod>),
    /// An address that belongs to no pod (outside the cluster, a node, a load balancer...).
    External(IpAddr),
}

impl Peer {
    /// `"ns/pod"` or the IP address.
    pub fn display_name(&self) -> String {
        match self {
            Peer::Pod(p) => format!("{}/{}", p.namespace, p.name),
            Peer::External(ip) => ip.to_string(),
        }
    }
}

/// The flow to judge. For protocols without ports (ICMP...), `port` is ignored and only rules
/// that allow every port can allow the flow.
#[derive(Clone, Debug)]
pub struct FlowQuery {
    /// Source endpoint.
    pub src: Peer,
    /// Destination endpoint.
    pub dst: Peer,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// The packet's address family, when known (the daemon always knows it; `explain` when an
    /// address is given). It matters only for a dual-stack pod matched against an ipBlock.
    pub family: Option<IpFamily>,
    /// The end that is not a pod is an address of the node the pod end runs on (the daemon
    /// knows its own addresses). Kubernetes always allows traffic between a pod and its node,
    /// whatever policies say (see [`SideReport::node_exempt`]).
    pub own_node: bool,
    /// The source is a pod on another node than the one that saw the packet dropped (the
    /// daemon knows its node). That node enforced the source's egress before the packet left
    /// it; here, only the destination's ingress can have dropped it. So ingress decides when
    /// both sides deny. False when unknown (`explain`): egress, checked first on the path,
    /// decides.
    pub src_remote: bool,
}

/// Why a rule of an isolating policy did not allow the flow, although it came close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissKind {
    /// The peer matched; the port or protocol did not.
    Port,
    /// The port matched; the peer did not.
    Peer,
}

/// A rule that would have allowed the flow but for the port, or but for the peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NearMiss {
    /// `"ns/name"` of the policy.
    pub policy: String,
    /// Index of the rule in the policy's `ingress`/`egress` list.
    pub rule: usize,
    /// What did not match.
    pub miss: MissKind,
    /// The rule in words, e.g. `prod/allow-web-to-db allows TCP/5432 only from pods with
    /// app=web in namespace prod`.
    pub description: String,
}

/// The verdict of one side (egress at the source, or ingress at the destination).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SideReport {
    /// Whether any policy selects the endpoint for this direction. External endpoints and
    /// host-network pods are never isolated.
    pub isolated: bool,
    /// Every policy that selects the endpoint for this direction, `"ns/name"`, sorted.
    pub isolating_policies: Vec<String>,
    /// Isolating policies with a rule that allows the flow, sorted.
    pub allowed_by: Vec<String>,
    /// When denied: rules that would have matched but for the port, or but for the peer.
    pub nearest_misses: Vec<NearMiss>,
    /// The peer is the pod's own node (a host-network pod on the same node, or an address of
    /// that node: [`FlowQuery::own_node`]). Kubernetes always allows traffic between a pod and
    /// its node (kubelet probes), whatever policies say.
    pub node_exempt: bool,
    /// A rule of a selecting policy names ports, so this report may differ for another port
    /// of the same endpoints and protocol. False: it holds for every port.
    #[serde(skip)]
    pub port_sensitive: bool,
}

impl SideReport {
    /// Whether this side lets the flow through.
    pub fn allows(&self) -> bool {
        !self.isolated || self.node_exempt || !self.allowed_by.is_empty()
    }
}

/// Maximum number of policies [`Verdict::policy_label`] names before summarizing.
pub const POLICY_LABEL_MAX: usize = 5;

/// The engine's answer for a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether NetworkPolicy lets the flow through.
    pub allowed: bool,
    /// For a deny, the deciding direction (egress when the source already denies, unless
    /// [`FlowQuery::src_remote`] and the destination denies too).
    pub direction: Option<Direction>,
    /// Egress at the source.
    pub egress: SideReport,
    /// Ingress at the destination.
    pub ingress: SideReport,
    /// The isolating policies of the deciding direction, sorted and comma-joined, bounded to
    /// [`POLICY_LABEL_MAX`] names followed by `,+N more`. Empty for an allowed flow. This is
    /// the `policy` label of `deny_observer_policy_denies_total`, made once per verdict: the
    /// daemon labels every drop of the flow with it, at every drain.
    #[serde(skip)]
    pub policy: Arc<str>,
}

impl Verdict {
    /// Whether the verdict is the same for every port of its endpoints and protocol: no rule
    /// of a policy selecting either side names ports.
    pub fn port_independent(&self) -> bool {
        !self.egress.port_sensitive && !self.ingress.port_sensitive
    }

    /// The report of the deciding direction, if the flow is denied.
    pub fn deciding_side(&self) -> Option<&SideReport> {
        match self.direction {
            Some(Direction::Egress) => Some(&self.egress),
            Some(Direction::Ingress) => Some(&self.ingress),
            _ => None,
        }
    }

    /// [`Verdict::policy`] as a string slice.
    pub fn policy_label(&self) -> &str {
        &self.policy
    }
}

/// Comma-joins sorted policy ids, at most [`POLICY_LABEL_MAX`] then `,+N more`.
pub fn bounded_policy_list(ids: &[String]) -> String {
    let mut out = ids
        .iter()
        .take(POLICY_LABEL_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if ids.len() > POLICY_LABEL_MAX {
        out.push_str(&format!(",+{} more", ids.len() - POLICY_LABEL_MAX));
    }
    out
}

/// Index of the policies of one namespace by what their pod selector requires.
#[derive(Debug, Default)]
struct NamespaceIndex {
    /// Policies whose selector cannot be indexed by one label (empty, or only NotIn/Exists...).
    always: Vec<u32>,
    /// label key → value → policies that require it (each policy appears under one key only,
    /// so a pod, which has one value per key, finds each policy at most once).
    by_label: HashMap<String, HashMap<String, Vec<u32>>>,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Compiled policies plus indexes over one inventory snapshot.
#[derive(Debug)]
pub struct Engine {
    inventory: Arc<Inventory>,
    /// Shared by the engines of snapshots that differ only in pods: no verdict reads another
    /// pod than the two ends of its flow, so the policies need not be compiled again.
    compiled: Arc<Compiled>,
    empty_labels: Labels,
}

/// What [`Engine::new`] derives from the policies.
#[derive(Debug)]
struct Compiled {
    generation: u64,
    policies: Vec<CompiledPolicy>,
    by_namespace: HashMap<String, NamespaceIndex>,
    warnings: Vec<String>,
}

impl Engine {
    /// Compiles the inventory's policies and builds the selector indexes.
    pub fn new(inventory: Arc<Inventory>) -> Engine {
        let mut warnings = Vec::new();
        let mut policies = Vec::with_capacity(inventory.policies.len());
        let mut by_namespace: HashMap<String, NamespaceIndex> = HashMap::new();
        for np in &inventory.policies {
            let compiled = compile_policy(np, &mut warnings);
            let idx = u32::try_from(policies.len()).unwrap_or(u32::MAX);
            let entry = by_namespace.entry(compiled.namespace.clone()).or_default();
            let sel = &compiled.pod_selector;
            if let Some((k, v)) = sel.labels.first() {
                entry
                    .by_label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(idx);
            } else if let Some((k, vs)) = sel.requirements.iter().find_map(|r| match r {
                selector::Requirement::In(k, vs) => Some((k, vs)),
                _ => None,
            }) {
                let mut seen: Vec<&String> = Vec::new();
                for v in vs {
                    if !seen.contains(&v) {
                        seen.push(v);
                        entry
                            .by_label
                            .entry(k.clone())
                            .or_default()
                            .entry(v.clone())
                            .or_default()
                            .push(idx);
                    }
                }
            } else {
                entry.always.push(idx);
            }
            policies.push(compiled);
        }
        Engine {
            inventory,
            compiled: Arc::new(Compiled {
                generation: GENERATION.fetch_add(1, Ordering::Relaxed),
                policies,
                by_namespace,
                warnings,
            }),
            empty_labels: Labels::new(),
        }
    }

    /// This engine for `inventory`, whose namespaces and policies must be this engine's (only
    /// pods differ): the compiled policies and the [`generation`](Self::generation) are kept,
    /// so cached verdicts of unchanged pods stay valid. Returns `None` when namespaces or
    /// policies differ; then only [`Engine::new`] gives a correct engine.
    pub fn with_pods_of(&self, inventory: Arc<Inventory>) -> Option<Engine> {
        same_policies_and_namespaces(&self.inventory, &inventory).then(|| Engine {
            inventory,
            compiled: Arc::clone(&self.compiled),
            empty_labels: Labels::new(),
        })
    }

    /// The inventory this engine judges against.
    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    /// A number unique to this engine; a [`VerdictCache`] drops its entries when it changes.
    pub fn generation(&self) -> u64 {
        self.compiled.generation
    }

    /// Problems met while compiling policies (invalid selectors, CIDRs, ports), each naming
    /// its policy. Such parts match nothing.
    pub fn warnings(&self) -> &[String] {
        &self.compiled.warnings
    }

    /// Labels of a namespace (empty when the inventory does not know it).
    pub fn namespace_labels(&self, ns: &str) -> &Labels {
        self.inventory
            .namespaces
            .get(ns)
            .map(|n| &n.labels)
            .unwrap_or(&self.empty_labels)
    }

    /// Ids (`"ns/name"`, sorted) of the policies that select `pod` for `direction`. Empty for
    /// host-network pods, which policies do not apply to.
    pub fn isolating_policies(&self, pod: &Pod, direction: Direction) -> Vec<String> {
        let mut ids: Vec<String> = self
            .selecting(pod, direction)
            .map(|p| p.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Ids of policies whose pod selector selects no (non-terminated) pod of the inventory,
    /// sorted.
    pub fn policies_selecting_no_pod(&self) -> Vec<String> {
        let mut used = vec![false; self.compiled.policies.len()];
        let live = self
            .inventory
            .pods
            .iter()
            .filter(|p| p.phase != crate::inventory::PodPhase::Terminated);
        for pod in live {
            for idx in self.candidates(pod) {
                if let Some(p) = self.compiled.policies.get(idx as usize)
                    && p.pod_selector.matches(&pod.labels)
                {
                    used[idx as usize] = true;
                }
            }
        }
        let mut ids: Vec<String> = self
            .compiled
            .policies
            .iter()
            .zip(used)
            .filter(|(_, u)| !u)
            .map(|(p, _)| p.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Indexed candidates: policies of the pod's namespace whose selector may select it.
    fn candidates<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = u32> + 'a {
        let index = self.compiled.by_namespace.get(&pod.namespace);
        let always = index.into_iter().flat_map(|i| i.always.iter().copied());
        let labelled = index.into_iter().flat_map(move |i| {
            pod.labels.iter().flat_map(move |(k, v)| {
                i.by_label
                    .get(k)
                    .and_then(|values| values.get(v))
                    .into_iter()
                    .flatten()
                    .copied()
            })
        });
        always.chain(labelled)
    }

    fn selecting<'a>(
        &'a self,
        pod: &'a Pod,
        direction: Direction,
    ) -> impl Iterator<Item = &'a CompiledPolicy> + 'a {
        let host = pod.host_network;
        self.candidates(pod)
            .filter(move |_| !host)
            .filter_map(|i| self.compiled.policies.get(i as usize))
            .filter(move |p| match direction {
                Direction::Ingress => p.ingress.is_some(),
                Direction::Egress => p.egress.is_some(),
                Direction::Unknown => false,
            })
            .filter(|p| p.pod_selector.matches(&pod.labels))
    }

    fn view<'a>(&'a self, peer: &'a Peer, family: Option<IpFamily>) -> PeerView<'a> {
        match peer {
            Peer::Pod(pod) => PeerView::Pod {
                pod,
                ns_labels: self.namespace_labels(&pod.namespace),
                family,
            },
            Peer::External(ip) => PeerView::External(*ip),
        }
    }

    /// Judges one side: `subject` is the endpoint whose policies apply, `other` the peer.
    fn side(&self, flow: &FlowQuery, direction: Direction) -> SideReport {
        let (subject, other) = match direction {
            Direction::Egress => (&flow.src, &flow.dst),
            _ => (&flow.dst, &flow.src),
        };
        let Peer::Pod(subject) = subject else {
            return SideReport::default();
        };
        let dst_pod = match &flow.dst {
            Peer::Pod(p) => Some(p.as_ref()),
            Peer::External(_) => None,
        };
        let node_exempt = match other {
            Peer::Pod(peer) => {
                peer.host_network && peer.node_name.is_some() && peer.node_name == subject.node_name
            }
            Peer::External(_) => flow.own_node,
        };
        let other = self.view(other, flow.family);
        let proto = flow.protocol;
        let mut report = SideReport {
            node_exempt,
            ..SideReport::default()
        };
        let mut misses = Vec::new();
        for policy in self.selecting(subject, direction) {
            report.isolated = true;
            report.isolating_policies.push(policy.id.clone());
            let rules: &[Rule] = match direction {
                Direction::Egress => policy.egress.as_deref().unwrap_or_default(),
                _ => policy.ingress.as_deref().unwrap_or_default(),
            };
            let mut allowed = false;
            for (i, rule) in rules.iter().enumerate() {
                let peer_ok = rule.peer_matches(&policy.namespace, other);
                let port_ok = rule.port_matches(proto, flow.port, dst_pod);
                report.port_sensitive |= rule.ports.is_some();
                if peer_ok && port_ok {
                    allowed = true;
                    break;
                }
                if peer_ok || port_ok {
                    // Worded only if the flow ends up denied: allowed flows are the hot path.
                    misses.push((policy, i, rule, peer_ok));
                }
            }
            if allowed {
                report.allowed_by.push(policy.id.clone());
            }
        }
        report.isolating_policies.sort();
        report.isolating_policies.dedup();
        report.allowed_by.sort();
        report.allowed_by.dedup();
        if report.allows() {
            return report;
        }
        let mut misses: Vec<NearMiss> = misses
            .into_iter()
            .map(|(policy, i, rule, peer_ok)| NearMiss {
                policy: policy.id.clone(),
                rule: i,
                miss: if peer_ok {
                    MissKind::Port
                } else {
                    MissKind::Peer
                },
                description: format!(
                    "{} {}",
                    policy.id,
                    rule.describe(&policy.namespace, direction == Direction::Ingress, dst_pod)
                ),
            })
            .collect();
        misses.sort_by(|a, b| (&a.policy, a.rule).cmp(&(&b.policy, b.rule)));
        report.nearest_misses = misses;
        report
    }

    /// Judges a flow.
    pub fn evaluate(&self, flow: &FlowQuery) -> Verdict {
        let egress = self.side(flow, Direction::Egress);
        let ingress = self.side(flow, Direction::Ingress);
        let direction = match (egress.allows(), ingress.allows()) {
            (true, true) => None,
            (false, false) if flow.src_remote => Some(Direction::Ingress),
            (false, _) => Some(Direction::Egress),
            (true, false) => Some(Direction::Ingress),
        };
        let deciding = match direction {
            Some(Direction::Egress) => egress.isolating_policies.as_slice(),
            Some(Direction::Ingress) => ingress.isolating_policies.as_slice(),
            _ => &[],
        };
        let policy = Arc::from(bounded_policy_list(deciding));
        Verdict {
            allowed: direction.is_none(),
            direction,
            egress,
            ingress,
            policy,
        }
    }

    /// Finds a pod by `namespace/name`.
    pub fn find_pod(&self, ns: &str, name: &str) -> Option<&Arc<Pod>> {
        self.inventory
            .pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
    }

    /// The pod that owns `ip`, preferring the liveliest phase and then the newest pod when
    /// an address was reused; host-network pods are skipped (they share the node's address).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.inventory
            .pods
            .iter()
            .filter(|p| !p.host_network && p.ips.contains(&ip))
            .max_by_key(|p| (p.phase, p.created_unix))
    }

    /// A live host-network pod using `ip`, which is then its node's address: judged as the
    /// node (a scan of the inventory, for the CLI).
    pub fn node_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.inventory
            .pods
            .iter()
            .filter(|p| p.host_network && p.node_name.is_some() && p.ips.contains(&ip))
            .filter(|p| p.phase != crate::inventory::PodPhase::Terminated)
            .max_by_key(|p| p.created_unix)
    }
}

/// True when `a` and `b` have the same namespaces (labels included) and policies.
fn same_policies_and_namespaces(a: &Inventory, b: &Inventory) -> bool {
    a.namespaces == b.namespaces
        && a.policies.len() == b.policies.len()
        && a.policies
            .iter()
            .zip(&b.policies)
            .all(|(p, q)| Arc::ptr_eq(p, q) || p == q)
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.direction {
            None => f.write_str("allow"),
            Some(d) => write!(f, "deny ({d})"),
        }
    }
}

/// Per-namespace summary used by `audit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceAudit {
    /// Namespace name.
    pub name: String,
    /// True when the namespace has no NetworkPolicy at all ("open field").
    pub open: bool,
    /// Number of NetworkPolicies in the namespace.
    pub policies: usize,
    /// Number of pods (terminated pods excluded).
    pub pods: usize,
    /// Pods no policy isolates for ingress (host-network pods included: policies never apply
    /// to them).
    pub pods_not_isolated_ingress: usize,
    /// Pods no policy isolates for egress.
    pub pods_not_isolated_egress: usize,
    /// Host-network pods, which NetworkPolicy never isolates.
    pub host_network_pods: usize,
    /// Policies of this namespace whose pod selector selects no pod, `"ns/name"`, sorted.
    pub policies_selecting_no_pod: Vec<String>,
}

impl Engine {
    /// Audits every namespace the inventory knows (from namespaces, pods or policies), sorted
    /// by name.
    pub fn audit(&self) -> Vec<NamespaceAudit> {
        let mut out: BTreeMap<String, NamespaceAudit> = BTreeMap::new();
        let entry = |out: &mut BTreeMap<String, NamespaceAudit>, ns: &str| {
            if !out.contains_key(ns) {
                out.insert(
                    ns.to_owned(),
                    NamespaceAudit {
                        name: ns.to_owned(),
                        open: true,
                        policies: 0,
                        pods: 0,
                        pods_not_isolated_ingress: 0,
                        pods_not_isolated_egress: 0,
                        host_network_pods: 0,
                        policies_selecting_no_pod: Vec::new(),
                    },
                );
            }
        };
        for ns in self.inventory.namespaces.keys() {
            entry(&mut out, ns);
        }
        for p in &self.compiled.policies {
            entry(&mut out, &p.namespace);
            if let Some(a) = out.get_mut(&p.namespace) {
                a.policies += 1;
                a.open = false;
            }
        }
        for pod in &self.inventory.pods {
            if pod.phase == crate::inventory::PodPhase::Terminated {
                continue;
            }
            entry(&mut out, &pod.namespace);
            let ingress = self.selecting(pod, Direction::Ingress).next().is_some();
            let egress = self.selecting(pod, Direction::Egress).next().is_some();
            if let Some(a) = out.get_mut(&pod.namespace) {
                a.pods += 1;
                a.pods_not_isolated_ingress += usize::from(!ingress);
                a.pods_not_isolated_egress += usize::from(!egress);
                a.host_network_pods += usize::from(pod.host_network);
            }
        }
        for id in self.policies_selecting_no_pod() {
            let ns = id.split('/').next().unwrap_or_default().to_owned();
            if let Some(a) = out.get_mut(&ns) {
                a.policies_selecting_no_pod.push(id);
            }
        }
        out.into_values().collect()
    }
}

#[cfg(test)]
mod tests;
