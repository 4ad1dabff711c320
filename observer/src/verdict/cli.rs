//! `deny-observer explain` and `deny-observer audit`: the SRE workflows over the engine.
//!
//! The binary loads the inventory (`--inventory <dir>`) and calls [`explain`] or [`audit`],
//! which return the process exit status.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::edges::{BoundedLine, MAX_LINE_BYTES, read_line_bounded};
use super::{Engine, FlowQuery, MissKind, NamespaceAudit, Peer, SideReport, Verdict, VerdictError};
use crate::flow::{Direction, IpFamily, Protocol};
use crate::inventory::validate::{InvalidObject, printable};
use crate::inventory::{Inventory, Pod, PodPhase, Service, ServicePort, TargetPort};

/// Exit status of `explain` when the flow (or one of the explained ports) is denied.
pub const EXIT_DENY: u8 = 1;
/// Exit status of `explain` on bad input: an unknown endpoint, port or protocol, or (in batch
/// mode) at least one invalid input line, every other line still being answered.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status of `explain --flows` when at least one input line was invalid (every other
/// line is still answered).
pub const EXIT_BAD_FLOW_LINES: u8 = EXIT_BAD_INPUT;
/// Exit status of `audit` when the inventory cannot be loaded (missing directory, a file that
/// does not parse) or holds no Namespace, Pod or NetworkPolicy: an audit of nothing would
/// otherwise pass every gate.
pub const EXIT_NO_INVENTORY: u8 = 2;
/// Exit status of `audit --fail-on-open` when some namespace has no NetworkPolicy.
pub const EXIT_OPEN_NAMESPACE: u8 = 3;
/// Exit status of `audit --fail-on-invalid` when some object would be refused by the API
/// server (it takes precedence over [`EXIT_OPEN_NAMESPACE`]: the rest of the audit is then
/// about an inventory without those objects).
pub const EXIT_INVALID_OBJECTS: u8 = 5;
/// Version of the `audit --output json` schema.
pub const AUDIT_SCHEMA_VERSION: u32 = 1;

/// Arguments of `deny-observer explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// Directory of Kubernetes manifests (namespaces, pods, NetworkPolicies).
    #[arg(long)]
    pub inventory: PathBuf,
    /// Source: `<namespace>/<pod>`, `<namespace>/<workload>` (as in the metrics'
    /// `source_workload`), an IP address, or an outside peer as the metrics label it (`world`,
    /// `private`, `host`, `node`).
    #[arg(long, required_unless_present = "flows", conflicts_with = "flows")]
    pub from: Option<String>,
    /// Destination: `<namespace>/<pod>`, `<namespace>/<workload>`, `<namespace>/svc/<name>`,
    /// `<namespace>/service/<name>` (the metrics' label) or
    /// `<name>.<namespace>.svc[.<cluster domain>]` (a Service: the pods it selects), an IP
    /// address (a Service's ClusterIP is that Service), or an outside peer (`world`,
    /// `private`, `host`, `node`).
    #[arg(long, required_unless_present = "flows", conflicts_with = "flows")]
    pub to: Option<String>,
    /// Destination port: a number, or a container port name of the destination; for a
    /// Service, a port of the Service (number or name), judged at its `targetPort`. Without
    /// it, every container port the destination declares (every port of a Service) is
    /// explained.
    #[arg(long, conflicts_with = "flows")]
    pub port: Option<String>,
    /// Protocol: TCP, UDP, SCTP, ICMP or ICMPv6, in any case (`tcp` as in the metrics; ICMP
    /// takes no `--port`). Default: TCP with `--port` (for a Service, the only protocol it
    /// serves that port number over, if not TCP); without `--port`, the protocols of the
    /// declared ports.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Batch mode: JSON lines `{"from":"x/a","to":"y/b","port":80,"protocol":"TCP"}` from a
    /// file, or `-` for standard input; one JSON verdict per line on standard output.
    #[arg(long)]
    pub flows: Option<String>,
}

/// Output format of `audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuditOutput {
    /// Aligned text table.
    #[default]
    Table,
    /// One JSON document (schema in the README).
    Json,
}

/// Arguments of `deny-observer audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Directory of Kubernetes manifests (namespaces, pods, NetworkPolicies).
    #[arg(long)]
    pub inventory: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = AuditOutput::Table)]
    pub output: AuditOutput,
    /// Exit with status 3 when a namespace has no NetworkPolicy at all.
    #[arg(long)]
    pub fail_on_open: bool,
    /// Exit with status 5 when an object is invalid (the API server would refuse it, so it
    /// was left out of the audit).
    #[arg(long)]
    pub fail_on_invalid: bool,
}

fn io_err(context: &str) -> impl FnOnce(std::io::Error) -> VerdictError + '_ {
    move |source| VerdictError::Io {
        context: context.to_owned(),
        source,
    }
}

/// A protocol as `--protocol` and the metrics name it. ICMP and ICMPv6 have no ports: policies
/// cannot name them, so only rules that allow every port allow them (the daemon's
/// `protocol="icmp"` denies are explained that way).
fn parse_protocol(s: &str) -> Result<Protocol, VerdictError> {
    match s.parse::<Protocol>() {
        Ok(
            p
            @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::Icmp | Protocol::Icmpv6),
        ) => Ok(p),
        _ => Err(VerdictError::BadProtocol(s.to_owned())),
    }
}

/// The addresses an outside peer (the metrics' `world`, `private`, `node`, `host`) is judged
/// with: `world` a public address, the others an RFC 1918 one. An `ipBlock` that contains it
/// matches; a narrower one (a single partner's range) cannot be judged from workload-level
/// labels and does not match. `node` is also the pod's own node (see [`Endpoint::own_node`]).
pub const OUTSIDE_REPRESENTATIVES: &[(&str, IpAddr)] = &[
    ("world", IpAddr::V4(std::net::Ipv4Addr::new(8, 8, 8, 8))),
    (
        "private",
        IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 255, 254)),
    ),
    (
        "node",
        IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 255, 253)),
    ),
    (
        "host",
        IpAddr::V4(std::net::Ipv4Addr::new(10, 255, 255, 252)),
    ),
];

/// The endpoint of an outside class as the metrics label it (`world`, or `/world` as
/// `<namespace>/<workload>` with an empty namespace); `None` for anything else.
pub fn outside_endpoint(s: &str) -> Option<Endpoint> {
    let class = s.strip_prefix('/').unwrap_or(s);
    let &(name, ip) = OUTSIDE_REPRESENTATIVES.iter().find(|(n, _)| *n == class)?;
    Some(Endpoint {
        given: name.to_owned(),
        workload: None,
        peers: vec![Peer::External(ip)],
        service: None,
        // The daemon labels `node` only this node's own addresses, and counts a flow only
        // where its pod end runs: `node` is always the pod's own node.
        own_node: name == "node",
    })
}

/// `--from`/`--to` resolved: one pod or address, or every pod of a workload.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The text given.
    pub given: String,
    /// `Deployment frontend` when a workload name (not a pod name) was given.
    pub workload: Option<String>,
    /// What to judge: the pods of the workload, liveliest and newest first, or the one pod
    /// or address. Never empty.
    pub peers: Vec<Peer>,
    /// The Service, when one with a ClusterIP was given: `peers` are the pods it selects, and
    /// a port is one of the Service's, which NetworkPolicies see as its `targetPort`
    /// (kube-proxy translates before the policies apply). `None` for a headless Service, whose
    /// pods are dialled directly.
    pub service: Option<Arc<Service>>,
    /// The endpoint is the node the pod at the other end runs on (the metrics' `node`):
    /// Kubernetes always allows that traffic, as the daemon judges it.
    pub own_node: bool,
}

impl Endpoint {
    /// The address family of an endpoint given as an address: a dual-stack pod named by one of
    /// its addresses is judged as the packets from or to that address are.
    pub fn family(&self) -> Option<IpFamily> {
        self.given.parse::<IpAddr>().ok().map(IpFamily::of)
    }
}

/// Resolves `<ns>/<pod>` or an IP. An IP of a known pod is that pod; the address of a node
/// that host-network pods use is one of those pods, which stands for the node (selectors never
/// match it, ipBlocks see its address, and its own node's pods are always allowed to and from
/// it). IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are their IPv4 form, as the daemon sees
/// them.
pub fn resolve_endpoint(engine: &Engine, s: &str) -> Result<Peer, VerdictError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return Ok(
            match engine.pod_by_ip(ip).or_else(|| engine.node_by_ip(ip)) {
                Some(pod) => Peer::Pod(Arc::clone(pod)),
                None => Peer::External(ip),
            },
        );
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => engine
            .find_pod(ns, name)
            .map(|p| Peer::Pod(Arc::clone(p)))
            .ok_or_else(|| VerdictError::UnknownPod(s.to_owned())),
        _ => Err(VerdictError::BadEndpoint(s.to_owned())),
    }
}

/// Resolves `<ns>/<pod>`, `<ns>/<workload>`, `<ns>/svc/<name>`, an IP, or an outside class
/// as the metrics label it (`world`, `private`, `node`, `host`, with or without a leading `/`:
/// an empty namespace). A pod name wins over a workload of the same name; a pod's IP wins over
/// a ClusterIP. A workload's (or Service's) terminated pods are only used when it has no other
/// pods.
pub fn resolve_endpoints(engine: &Engine, s: &str) -> Result<Endpoint, VerdictError> {
    if let Some(outside) = outside_endpoint(s) {
        return Ok(outside);
    }
    if let Some(peer) = find_pod_by_dns(engine, s)? {
        return Ok(Endpoint {
            given: s.to_owned(),
            workload: None,
            peers: vec![peer],
            service: None,
            own_node: false,
        });
    }
    if let Some(svc) = find_service(engine, s)? {
        return service_endpoint(engine, s, svc);
    }
    match resolve_endpoint(engine, s) {
        Ok(peer) => {
            return Ok(Endpoint {
                given: s.to_owned(),
                workload: None,
                peers: vec![peer],
                service: None,
                own_node: false,
            });
        }
        Err(VerdictError::UnknownPod(_)) => {}
        Err(err) => return Err(err),
    }
    let Some((ns, name)) = s.split_once('/') else {
        return Err(VerdictError::BadEndpoint(s.to_owned()));
    };
    let pods = live_first(
        engine
            .inventory()
            .pods
            .iter()
            .filter(|p| p.namespace == ns && p.workload.name == name)
            .collect(),
    );
    if pods.is_empty() {
        return Err(VerdictError::UnknownPod(s.to_owned()));
    }
    let mut kinds: Vec<&str> = pods.iter().map(|p| p.workload.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    Ok(Endpoint {
        given: s.to_owned(),
        workload: Some(format!("{} {name}", kinds.join("/"))),
        peers: pods.into_iter().map(|p| Peer::Pod(Arc::clone(p))).collect(),
        service: None,
        own_node: false,
    })
}

/// Only the pods that are not terminated, unless there are no others; liveliest and newest
/// first.
fn live_first(mut pods: Vec<&Arc<Pod>>) -> Vec<&Arc<Pod>> {
    if pods.iter().any(|p| p.phase != PodPhase::Terminated) {
        pods.retain(|p| p.phase != PodPhase::Terminated);
    }
    pods.sort_by(|a, b| {
        (b.phase, b.created_unix)
            .cmp(&(a.phase, a.created_unix))
            .then_with(|| a.name.cmp(&b.name))
    });
    pods
}

/// The labels before `svc` of a Service DNS name (`<name>.<ns>.svc`, or a pod under it,
/// `<host>.<name>.<ns>.svc`, with or without the cluster domain and a trailing dot), when
/// `s` is one and none of them is empty.
fn svc_dns_labels(s: &str) -> Option<Vec<&str>> {
    if s.contains('/') {
        return None;
    }
    let labels: Vec<&str> = s.trim_end_matches('.').split('.').collect();
    let at = labels.iter().position(|l| *l == "svc")?;
    let before = &labels[..at];
    (before.len() >= 2 && before.iter().all(|l| !l.is_empty())).then(|| before.to_vec())
}

/// The Service `<ns>/<name>`, or [`VerdictError::UnknownService`] naming `given`.
fn service_named(
    engine: &Engine,
    ns: &str,
    name: &str,
    given: &str,
) -> Result<Arc<Service>, VerdictError> {
    engine
        .inventory()
        .services
        .iter()
        .find(|svc| svc.namespace == ns && svc.name == name)
        .cloned()
        .ok_or_else(|| VerdictError::UnknownService(given.to_owned()))
}

/// The Service `s` names: `<ns>/svc/<name>` (or `service`, `services`), its DNS name
/// (`<name>.<ns>.svc`, with or without the cluster domain after it, as a client's error
/// message has it), or a ClusterIP that is no pod's address. `None` when `s` names no
/// Service that way.
fn find_service(engine: &Engine, s: &str) -> Result<Option<Arc<Service>>, VerdictError> {
    if let Some(labels) = svc_dns_labels(s)
        && let [name, ns] = labels[..]
    {
        return service_named(engine, ns, name, s).map(Some);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        if engine.pod_by_ip(ip).is_some() {
            return Ok(None);
        }
        return Ok(engine
            .inventory()
            .services
            .iter()
            .find(|svc| svc.cluster_ips.contains(&ip))
            .cloned());
    }
    let mut parts = s.split('/');
    let (Some(ns), Some(kind), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    if !matches!(kind, "svc" | "service" | "services") || ns.is_empty() || name.is_empty() {
        return Ok(None);
    }
    service_named(engine, ns, name, s).map(Some)
}

/// The pods a Service selects, as an endpoint.
fn service_endpoint(
    engine: &Engine,
    given: &str,
    svc: Arc<Service>,
) -> Result<Endpoint, VerdictError> {
    let Some(selector) = &svc.selector else {
        return Err(VerdictError::Usage(format!(
            "Service {}/{} has no selector: its endpoints are managed by hand, so name the pod \
             or address it sends to instead",
            svc.namespace, svc.name
        )));
    };
    let pods = live_first(
        engine
            .inventory()
            .pods
            .iter()
            .filter(|p| svc.selects(p))
            .collect(),
    );
    if pods.is_empty() {
        let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(VerdictError::Usage(format!(
            "Service {}/{} selects no pod (selector {}): its traffic has nowhere to go, \
             whatever the NetworkPolicies say",
            svc.namespace,
            svc.name,
            labels.join(",")
        )));
    }
    // A headless Service's name resolves to the pods' own addresses: nothing translates the
    // port, so it is judged as dialled, as for a workload.
    let headless = svc.cluster_ips.is_empty();
    Ok(Endpoint {
        given: given.to_owned(),
        workload: Some(format!(
            "{}Service {}",
            if headless { "headless " } else { "" },
            svc.name
        )),
        peers: pods.into_iter().map(|p| Peer::Pod(Arc::clone(p))).collect(),
        service: (!headless).then_some(svc),
        own_node: false,
    })
}

/// A pod by its DNS name under a (headless) Service, `<hostname>.<service>.<ns>.svc[...]`, as
/// StatefulSet clients dial it: the pod of that name the Service selects. `None` when `s`
/// has another form.
fn find_pod_by_dns(engine: &Engine, s: &str) -> Result<Option<Peer>, VerdictError> {
    let Some(labels) = svc_dns_labels(s) else {
        return Ok(None);
    };
    let [host, service, ns] = labels[..] else {
        return Ok(None);
    };
    let svc = service_named(engine, ns, service, s)?;
    engine
        .find_pod(ns, host)
        .filter(|pod| svc.selects(pod))
        .map(|pod| Some(Peer::Pod(Arc::clone(pod))))
        .ok_or_else(|| VerdictError::UnknownPod(s.to_owned()))
}

/// `port` of a Service, as the destination port NetworkPolicies see: its `targetPort`, and
/// the label `explain` prints (`service port 80 "http"`). `protocol` narrows the match when
/// given (a Service may serve one port number over TCP and UDP, as kube-dns serves 53). Without
/// it, a number served over TCP is the TCP port, as everywhere else in `explain`; a number the
/// Service serves over one other protocol only is that port (`--port 53` to a UDP-only DNS
/// Service needs no `--protocol`). A port name is unique within a Service.
pub fn service_port(
    svc: &Service,
    port: &PortRef,
    protocol: Option<Protocol>,
) -> Result<(Protocol, PortRef, String), VerdictError> {
    let matches = |sp: &&ServicePort| {
        protocol.is_none_or(|p| p == sp.protocol)
            && match port {
                PortRef::Number(n) => sp.port == *n,
                PortRef::Name(name) => sp.name.as_deref() == Some(name.as_str()),
            }
    };
    let found = svc
        .ports
        .iter()
        .filter(matches)
        .find(|sp| sp.protocol == Protocol::Tcp)
        .or_else(|| svc.ports.iter().find(matches));
    match found {
        Some(sp) => Ok(service_target(sp)),
        None => {
            let given = match port {
                PortRef::Number(n) => n.to_string(),
                PortRef::Name(name) => name.clone(),
            };
            let has: Vec<String> = svc.ports.iter().map(describe_service_port).collect();
            Err(VerdictError::BadPort {
                port: given,
                reason: format!(
                    "Service {}/{} has no such {}port; its ports: {} (to judge a pod port \
                     directly, name the workload or pod instead of the Service)",
                    svc.namespace,
                    svc.name,
                    protocol.map(|p| format!("{p} ")).unwrap_or_default(),
                    if has.is_empty() {
                        "none".to_owned()
                    } else {
                        has.join(", ")
                    }
                ),
            })
        }
    }
}

/// ` "http"` for a named Service port, else nothing.
fn quoted_name(sp: &ServicePort) -> String {
    sp.name
        .as_deref()
        .map(|n| format!(" {n:?}"))
        .unwrap_or_default()
}

/// The destination port, protocol and label of one Service port.
fn service_target(sp: &ServicePort) -> (Protocol, PortRef, String) {
    let target = match &sp.target {
        TargetPort::Number(n) => PortRef::Number(*n),
        TargetPort::Name(name) => PortRef::Name(name.clone()),
    };
    let name = quoted_name(sp);
    let to_name = match &sp.target {
        TargetPort::Name(n) => format!(", pod port {n:?}"),
        TargetPort::Number(_) => String::new(),
    };
    (
        sp.protocol,
        target,
        format!("service port {}{name}{to_name}", sp.port),
    )
}

/// `80/TCP "http" -> 8080`.
fn describe_service_port(sp: &ServicePort) -> String {
    let name = quoted_name(sp);
    let target = match &sp.target {
        TargetPort::Number(n) => n.to_string(),
        TargetPort::Name(n) => format!("{n:?}"),
    };
    format!("{}/{}{name} -> {target}", sp.port, sp.protocol)
}

/// A destination port as given: a number, or a container port name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A container port name, resolved on each destination pod.
    Name(String),
}

/// Parses `--port` (or a string `port` of `--flows`): digits are a number, which must fit a
/// port; anything else is a name.
pub fn parse_port(s: &str) -> Result<PortRef, VerdictError> {
    let bad = |reason: &str| VerdictError::BadPort {
        port: s.to_owned(),
        reason: reason.to_owned(),
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u16>()
            .map(PortRef::Number)
            .map_err(|_| bad("out of range (a port is 0 to 65535)"));
    }
    Ok(PortRef::Name(s.to_owned()))
}

/// Resolves `--port`: a number, or a port name declared by the destination pod for
/// `protocol`.
pub fn resolve_port(dst: &Peer, port: &str, protocol: Protocol) -> Result<u16, VerdictError> {
    match parse_port(port)? {
        PortRef::Number(n) => Ok(n),
        PortRef::Name(name) => resolve_port_name(dst, &name, protocol),
    }
}

fn resolve_port_name(dst: &Peer, port: &str, protocol: Protocol) -> Result<u16, VerdictError> {
    let bad = |reason: String| VerdictError::BadPort {
        port: port.to_owned(),
        reason,
    };
    match dst {
        Peer::External(ip) => Err(bad(format!(
            "a port name needs a destination pod, and {ip} is outside the cluster's pods"
        ))),
        Peer::Pod(pod) => pod
            .ports
            .iter()
            .find(|cp| cp.protocol == protocol && cp.name.as_deref() == Some(port))
            .map(|cp| cp.port)
            .ok_or_else(|| {
                bad(format!(
                    "{}/{} declares no {protocol} container port with that name",
                    pod.namespace, pod.name
                ))
            }),
    }
}

/// One port judged over every (source pod, destination pod) pair of two endpoints.
#[derive(Debug)]
pub struct Judgement {
    /// The pair shown: the first denied pair, else the first pair.
    pub flow: FlowQuery,
    /// Its verdict.
    pub verdict: Verdict,
    /// Pairs judged.
    pub pairs: usize,
    /// Pairs denied.
    pub denied: usize,
    /// Each pair's verdict, in the order judged (destination pods, then source pods, as
    /// resolved): the same endpoints judged against two policy sets line up pair by pair.
    pub pair_allowed: Vec<bool>,
}

/// Judges `port` between every pod of `from` and every pod of `to`. A named port is resolved
/// on each destination pod; pods that do not declare it are skipped (an error when none does).
pub fn judge(
    engine: &Engine,
    from: &Endpoint,
    to: &Endpoint,
    protocol: Protocol,
    port: &PortRef,
) -> Result<Judgement, VerdictError> {
    let given_family = match (from.family(), to.family()) {
        (Some(a), Some(b)) if a != b => {
            return Err(VerdictError::Usage(format!(
                "{} and {} are addresses of different IP families: no packet has both",
                from.given, to.given
            )));
        }
        (a, b) => a.or(b),
    };
    let own_node = from.own_node || to.own_node;
    let mut shown: Option<(FlowQuery, Verdict)> = None;
    let (mut pairs, mut denied) = (0usize, 0usize);
    let mut pair_allowed = Vec::new();
    let mut first_err = None;
    for dst in &to.peers {
        let number = match port {
            PortRef::Number(n) => *n,
            PortRef::Name(name) => match resolve_port_name(dst, name, protocol) {
                Ok(n) => n,
                Err(err) => {
                    first_err.get_or_insert(err);
                    continue;
                }
            },
        };
        for src in &from.peers {
            // Named by pods, a dual-stack pair sends over both families, which an ipBlock
            // may judge apart: the pair is allowed only if both are, and a denied one is shown.
            let families = match given_family {
                Some(f) => vec![Some(f)],
                None => shared_families(src, dst),
            };
            let mut judged_pair: Option<(FlowQuery, Verdict)> = None;
            for family in families {
                let flow = FlowQuery {
                    src: src.clone(),
                    dst: dst.clone(),
                    protocol,
                    port: number,
                    family,
                    own_node,
                    // explain judges the policies, not one node's view of them.
                    src_remote: false,
                };
                let verdict = engine.evaluate(&flow);
                if judged_pair
                    .as_ref()
                    .is_none_or(|(_, v)| v.allowed && !verdict.allowed)
                {
                    judged_pair = Some((flow, verdict));
                }
            }
            let Some((flow, verdict)) = judged_pair else {
                continue;
            };
            pairs += 1;
            pair_allowed.push(verdict.allowed);
            if !verdict.allowed {
                denied += 1;
            }
            // A deny is what the reader has to act on, so the first denied pair is shown.
            let replace = shown
                .as_ref()
                .is_none_or(|(_, v)| v.allowed && !verdict.allowed);
            if replace {
                shown = Some((flow, verdict));
            }
        }
    }
    match shown {
        Some((flow, verdict)) => Ok(Judgement {
            flow,
            verdict,
            pairs,
            denied,
            pair_allowed,
        }),
        None => Err(first_err
            .unwrap_or_else(|| VerdictError::Usage(format!("{} has no pod to judge", to.given)))),
    }
}

/// The address families both ends of a pair have (a pod's addresses, an outside address's own
/// family), each to be judged: one for single-stack pairs, both for dual-stack ones, and
/// `[None]` (any address) when an end has no address to say.
fn shared_families(src: &Peer, dst: &Peer) -> Vec<Option<IpFamily>> {
    let families = |peer: &Peer| -> [bool; 2] {
        let ips: &[IpAddr] = match peer {
            Peer::Pod(p) => &p.ips,
            Peer::External(ip) => std::slice::from_ref(ip),
        };
        [
            ips.iter().any(|ip| IpFamily::of(*ip) == IpFamily::V4),
            ips.iter().any(|ip| IpFamily::of(*ip) == IpFamily::V6),
        ]
    };
    let ([s4, s6], [d4, d6]) = (families(src), families(dst));
    let shared: Vec<Option<IpFamily>> = [(s4 && d4, IpFamily::V4), (s6 && d6, IpFamily::V6)]
        .into_iter()
        .filter_map(|(both, f)| both.then_some(Some(f)))
        .collect();
    if shared.is_empty() {
        vec![None]
    } else {
        shared
    }
}

/// Container ports the destination's pods declare, `(protocol, port, name)`, sorted by port,
/// only those of `protocol` when given. The name is given only when every pod that declares
/// the port calls it the same (pods of a rollout may name it differently, or not at all).
pub(crate) fn declared_ports(
    to: &Endpoint,
    protocol: Option<Protocol>,
) -> Vec<(Protocol, u16, Option<String>)> {
    let mut out: Vec<(Protocol, u16, Option<String>)> = Vec::new();
    for peer in &to.peers {
        let Peer::Pod(pod) = peer else { continue };
        for cp in &pod.ports {
            if protocol.is_some_and(|p| p != cp.protocol) {
                continue;
            }
            match out
                .iter_mut()
                .find(|(p, n, _)| *p == cp.protocol && *n == cp.port)
            {
                Some((_, _, name)) if *name != cp.name => *name = None,
                Some(_) => {}
                None => out.push((cp.protocol, cp.port, cp.name.clone())),
            }
        }
    }
    out.sort_by(|a, b| (a.1, a.0.label()).cmp(&(b.1, b.0.label())));
    out
}

/// Runs `explain`: the single-flow human form, or the `--flows` batch form. Returns the exit
/// status: in the human form 0 when allowed and [`EXIT_DENY`] when denied (for any pod pair
/// of a workload, or any port explained); in batch mode 0, or [`EXIT_BAD_FLOW_LINES`] when
/// some lines were invalid.
pub fn explain(
    args: &ExplainArgs,
    inv: Arc<Inventory>,
    out: &mut dyn Write,
) -> Result<u8, VerdictError> {
    let engine = Engine::new(inv);
    if let Some(flows) = &args.flows {
        if flows == "-" {
            let stdin = std::io::stdin();
            let mut lock = stdin.lock();
            return explain_batch(&engine, &mut lock, out);
        }
        let file = File::open(flows).map_err(io_err(flows))?;
        return explain_batch(&engine, &mut BufReader::new(file), out);
    }
    let (Some(from), Some(to)) = (&args.from, &args.to) else {
        return Err(VerdictError::Usage(
            "explain needs --from and --to (and optionally --port), or --flows".to_owned(),
        ));
    };
    let protocol = args.protocol.as_deref().map(parse_protocol).transpose()?;
    let from = resolve_endpoints(&engine, from)?;
    let to = resolve_endpoints(&engine, to)?;
    if let Some(svc) = &from.service {
        return Err(VerdictError::Usage(format!(
            "--from {} is Service {}/{}: a Service only receives traffic; name the client pod, \
             workload or address",
            from.given, svc.namespace, svc.name
        )));
    }
    let ports: Vec<(Protocol, PortRef, Option<String>)> = match (&to.service, &args.port) {
        // ICMP has no ports: one verdict, from the rules that allow every port.
        (_, None) if protocol.is_some_and(|p| !p.has_ports()) => {
            vec![(protocol.unwrap_or(Protocol::Icmp), PortRef::Number(0), None)]
        }
        (_, Some(_)) if protocol.is_some_and(|p| !p.has_ports()) => {
            return Err(VerdictError::Usage(format!(
                "{} has no ports: leave out --port",
                protocol.unwrap_or(Protocol::Icmp)
            )));
        }
        (Some(svc), Some(port)) => {
            let (protocol, target, label) = service_port(svc, &parse_port(port)?, protocol)?;
            vec![(protocol, target, Some(label))]
        }
        (Some(svc), None) => {
            let ports: Vec<_> = svc
                .ports
                .iter()
                .filter(|sp| protocol.is_none_or(|p| p == sp.protocol))
                .map(service_target)
                .map(|(p, target, label)| (p, target, Some(label)))
                .collect();
            if ports.is_empty() {
                return Err(VerdictError::Usage(format!(
                    "Service {}/{} has no {}port to explain",
                    svc.namespace,
                    svc.name,
                    protocol.map(|p| format!("{p} ")).unwrap_or_default()
                )));
            }
            ports
        }
        (None, Some(port)) => {
            let port = parse_port(port)?;
            let name = match &port {
                PortRef::Name(name) => Some(name.clone()),
                PortRef::Number(_) => None,
            };
            vec![(protocol.unwrap_or(Protocol::Tcp), port, name)]
        }
        (None, None) => {
            let declared = declared_ports(&to, protocol);
            if declared.is_empty() {
                return Err(VerdictError::Usage(format!(
                    "{} declares no {}container port to explain: pass --port",
                    to.given,
                    protocol.map(|p| format!("{p} ")).unwrap_or_default()
                )));
            }
            declared
                .into_iter()
                .map(|(p, n, name)| (p, PortRef::Number(n), name))
                .collect()
        }
    };
    let mut denied_ports = Vec::new();
    for (i, (protocol, port, name)) in ports.iter().enumerate() {
        let judged = judge(&engine, &from, &to, *protocol, port)?;
        if i > 0 {
            writeln!(out).map_err(io_err("writing output"))?;
        }
        write_human(&judged, &from, &to, name.as_deref(), out).map_err(io_err("writing output"))?;
        if judged.denied > 0 {
            denied_ports.push(format!("{}/{}", judged.flow.protocol, judged.flow.port));
        }
    }
    if ports.len() > 1 {
        writeln!(
            out,
            "\nsummary: {} of {} {} ports denied{}",
            denied_ports.len(),
            ports.len(),
            if to.service.is_some() {
                "Service"
            } else {
                "declared"
            },
            if denied_ports.is_empty() {
                String::new()
            } else {
                format!(": {}", denied_ports.join(", "))
            }
        )
        .map_err(io_err("writing output"))?;
    }
    Ok(if denied_ports.is_empty() {
        0
    } else {
        EXIT_DENY
    })
}

fn side_line(name: &str, who: &str, side: &SideReport) -> String {
    if !side.isolated {
        format!("{name} at {who}: not isolated (no NetworkPolicy selects it for {name})")
    } else {
        let allowed = if side.node_exempt {
            "the peer is its own node, which is always allowed".to_owned()
        } else if side.allowed_by.is_empty() {
            "allowed by none of them".to_owned()
        } else {
            format!("allowed by {}", side.allowed_by.join(", "))
        };
        format!(
            "{name} at {who}: isolated by {}; {allowed}",
            side.isolating_policies.join(", ")
        )
    }
}

/// `from shop/frontend: Deployment frontend, 3 pods; judged with the labels of ...`.
fn workload_line(role: &str, endpoint: &Endpoint, shown: &Peer) -> Option<String> {
    let workload = endpoint.workload.as_ref()?;
    let Peer::Pod(pod) = shown else {
        return None;
    };
    let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Some(format!(
        "{role} {}: {workload}, {} pod(s); judged with the labels of {}/{} ({})",
        endpoint.given,
        endpoint.peers.len(),
        pod.namespace,
        pod.name,
        if labels.is_empty() {
            "no labels".to_owned()
        } else {
            labels.join(", ")
        }
    ))
}

/// Writes a [`Judgement`] as `explain` prints it (verdict, deciding side, both sides, nearest
/// misses); `port_name` is the container port name, when the port was given by name.
pub fn write_judgement(
    judged: &Judgement,
    from: &Endpoint,
    to: &Endpoint,
    port_name: Option<&str>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    write_human(judged, from, to, port_name, out)
}

/// How `explain` names a side: a node's address stays the address given, with its node (the
/// host-network pod it resolved to only stands for the node).
fn shown_name(given: &Endpoint, peer: &Peer) -> String {
    if given.own_node {
        return "node (the pod's own node)".to_owned();
    }
    if let Peer::External(ip) = peer
        && OUTSIDE_REPRESENTATIVES
            .iter()
            .any(|(n, _)| *n == given.given)
    {
        return format!("{} ({ip} stands for it)", given.given);
    }
    match peer {
        Peer::Pod(p) if p.host_network && given.family().is_some() => format!(
            "{} (node {})",
            given.given,
            p.node_name.as_deref().unwrap_or("unknown")
        ),
        _ => peer.display_name(),
    }
}

fn write_human(
    judged: &Judgement,
    from: &Endpoint,
    to: &Endpoint,
    port_name: Option<&str>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let (flow, v) = (&judged.flow, &judged.verdict);
    let src = shown_name(from, &flow.src);
    let dst = shown_name(to, &flow.dst);
    let name = port_name.map(|n| format!(" ({n})")).unwrap_or_default();
    let port = match flow.protocol.has_ports() {
        true => format!("/{}", flow.port),
        false => String::new(),
    };
    // Which family, when a dual-stack pod's two could be judged apart.
    let over = match flow.family {
        Some(f) if shared_families(&flow.src, &flow.dst).len() == 2 => match f {
            IpFamily::V4 => " over IPv4",
            IpFamily::V6 => " over IPv6",
        },
        _ => "",
    };
    let what = format!("{src} -> {dst} {}{port}{name}{over}", flow.protocol);
    match v.direction {
        None => writeln!(out, "verdict: ALLOW  {what}")?,
        Some(_) => writeln!(out, "verdict: DENY  {what}")?,
    }
    for line in [
        workload_line("from", from, &flow.src),
        workload_line("to", to, &flow.dst),
    ]
    .into_iter()
    .flatten()
    {
        writeln!(out, "{line}")?;
    }
    if judged.pairs > 1 {
        if judged.denied == 0 || judged.denied == judged.pairs {
            writeln!(out, "every pod pair agrees ({} pairs judged)", judged.pairs)?;
        } else {
            writeln!(
                out,
                "pods disagree: {} of {} pod pairs are denied (their labels, or the numbers of a named port, differ); a denied pair is shown",
                judged.denied, judged.pairs
            )?;
        }
    }
    if let Some(d) = v.direction {
        let at = if d == Direction::Egress { &src } else { &dst };
        writeln!(out, "decided by: {d} at {at}")?;
    }
    match &flow.src {
        Peer::Pod(p) if p.host_network => writeln!(
            out,
            "egress at {src}: not subject to NetworkPolicy (hostNetwork pod)"
        )?,
        Peer::Pod(_) => writeln!(out, "{}", side_line("egress", &src, &v.egress))?,
        Peer::External(_) => writeln!(
            out,
            "egress at {src}: outside the cluster's pods, no NetworkPolicy applies"
        )?,
    }
    match &flow.dst {
        Peer::Pod(p) if p.host_network => writeln!(
            out,
            "ingress at {dst}: not subject to NetworkPolicy (hostNetwork pod)"
        )?,
        Peer::Pod(_) => writeln!(out, "{}", side_line("ingress", &dst, &v.ingress))?,
        Peer::External(_) => writeln!(
            out,
            "ingress at {dst}: outside the cluster's pods, no NetworkPolicy applies"
        )?,
    }
    if let Some(side) = v.deciding_side() {
        if side.nearest_misses.is_empty() {
            writeln!(
                out,
                "nearest misses: none (no rule of {} matches this peer or this port)",
                side.isolating_policies.join(", ")
            )?;
        } else {
            writeln!(out, "nearest misses:")?;
            for m in &side.nearest_misses {
                let why = match m.miss {
                    MissKind::Port => {
                        format!(
                            "the peer matches, but the flow is {}/{}",
                            flow.protocol, flow.port
                        )
                    }
                    MissKind::Peer => {
                        let peer = if v.direction == Some(Direction::Egress) {
                            &dst
                        } else {
                            &src
                        };
                        format!("the port matches, but {peer} is not such a peer")
                    }
                };
                writeln!(out, "  - {} ({why})", m.description)?;
            }
        }
    }
    Ok(())
}

/// One line of `explain --flows` input. `port` is read as any JSON value so that a number
/// out of range or a wrong type gets a message naming the port, not serde's enum internals.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowLine {
    from: String,
    to: String,
    /// Absent for ICMP (no ports); for other protocols a missing port is the line's error.
    #[serde(default)]
    port: serde_json::Value,
    #[serde(default)]
    protocol: Option<String>,
}

fn flow_port(value: &serde_json::Value) -> Result<PortRef, String> {
    match value {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(n) => u16::try_from(n)
                .map(PortRef::Number)
                .map_err(|_| format!("invalid port {n}: out of range (a port is 0 to 65535)")),
            None => Err(format!(
                "invalid port {n}: not a whole number from 0 to 65535"
            )),
        },
        serde_json::Value::String(s) => parse_port(s).map_err(|e| e.to_string()),
        other => Err(format!(
            "invalid port {other}: expected a number or a container port name"
        )),
    }
}

/// One line of `explain --flows` output.
#[derive(Debug, Serialize)]
struct FlowAnswer<'a> {
    line: usize,
    from: &'a str,
    to: &'a str,
    from_pod: String,
    to_pod: String,
    pod_pairs: usize,
    pod_pairs_denied: usize,
    protocol: Protocol,
    port: u16,
    verdict: &'static str,
    direction: Option<Direction>,
    policies: Vec<String>,
    policy_label: String,
    egress: &'a SideReport,
    ingress: &'a SideReport,
}

#[derive(Debug, Serialize)]
struct FlowError {
    line: usize,
    error: String,
}

fn answer_line(engine: &Engine, line: &str) -> Result<(FlowLine, Judgement), String> {
    let parsed: FlowLine = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let protocol =
        parse_protocol(parsed.protocol.as_deref().unwrap_or("TCP")).map_err(|e| e.to_string())?;
    // ICMP has no ports (the metrics' edges say 0): whatever the line says is not judged.
    let port = match protocol.has_ports() {
        true => flow_port(&parsed.port)?,
        false => PortRef::Number(0),
    };
    let src = resolve_endpoints(engine, &parsed.from).map_err(|e| format!("from: {e}"))?;
    let dst = resolve_endpoints(engine, &parsed.to).map_err(|e| format!("to: {e}"))?;
    if src.service.is_some() {
        return Err("from: a Service only receives traffic; name the client".to_owned());
    }
    let (protocol, port) = match &dst.service {
        // The line's protocol narrows the Service port only when it was given.
        Some(svc) => service_port(svc, &port, parsed.protocol.as_ref().map(|_| protocol))
            .map(|(p, target, _)| (p, target))
            .map_err(|e| format!("to: {e}"))?,
        None => (protocol, port),
    };
    let judged = judge(engine, &src, &dst, protocol, &port).map_err(|e| e.to_string())?;
    Ok((parsed, judged))
}

/// The batch form of `explain` over any reader: one JSON object per non-blank input line,
/// in order; an invalid line (bad JSON, not UTF-8, unknown endpoint...) yields
/// `{"line":N,"error":"..."}` and the run goes on. Lines are numbered from 1; blank lines are
/// skipped.
pub fn explain_batch(
    engine: &Engine,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<u8, VerdictError> {
    let mut bad = false;
    let mut buf = Vec::new();
    let mut n = 0usize;
    loop {
        let read =
            read_line_bounded(input, &mut buf, MAX_LINE_BYTES).map_err(io_err("reading flows"))?;
        if read == BoundedLine::Eof {
            break;
        }
        n += 1;
        if read == BoundedLine::TooLong {
            // Not a flow (a flow line is about 200 bytes): the input is not JSON lines, and
            // skipping to a newline that may never come would spin on it.
            let error = format!(
                "line longer than {MAX_LINE_BYTES} bytes, so not a flow; stopped reading the flows"
            );
            let json = serde_json::to_string(&FlowError { line: n, error })?;
            writeln!(out, "{json}").map_err(io_err("writing output"))?;
            bad = true;
            break;
        }
        let answer = match std::str::from_utf8(&buf) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => answer_line(engine, text.trim()),
            Err(err) => Err(format!("line is not UTF-8: {err}")),
        };
        let json = match answer {
            Ok((parsed, judged)) => {
                let v = &judged.verdict;
                serde_json::to_string(&FlowAnswer {
                    line: n,
                    from: &parsed.from,
                    to: &parsed.to,
                    from_pod: judged.flow.src.display_name(),
                    to_pod: judged.flow.dst.display_name(),
                    pod_pairs: judged.pairs,
                    pod_pairs_denied: judged.denied,
                    protocol: judged.flow.protocol,
                    port: judged.flow.port,
                    verdict: if v.allowed { "allow" } else { "deny" },
                    direction: v.direction,
                    policies: v
                        .deciding_side()
                        .map(|s| s.isolating_policies.clone())
                        .unwrap_or_default(),
                    policy_label: v.policy_label().to_owned(),
                    egress: &v.egress,
                    ingress: &v.ingress,
                })?
            }
            Err(error) => {
                bad = true;
                serde_json::to_string(&FlowError { line: n, error })?
            }
        };
        writeln!(out, "{json}").map_err(io_err("writing output"))?;
    }
    out.flush().map_err(io_err("writing output"))?;
    Ok(if bad { EXIT_BAD_FLOW_LINES } else { 0 })
}

/// `audit --output json` document.
#[derive(Debug, Serialize)]
pub struct AuditReport {
    /// [`AUDIT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Names of the namespaces without any NetworkPolicy, sorted.
    pub open_namespaces: Vec<String>,
    /// Every namespace, sorted by name.
    pub namespaces: Vec<NamespaceAudit>,
    /// Objects left out because the API server would refuse them, sorted by kind, namespace
    /// and name.
    pub invalid_objects: Vec<InvalidObject>,
}

/// Runs `audit` on the manifest directory `args.inventory`: loads it, then [`audit`]s it.
/// A directory that cannot be loaded, or that holds no Namespace, Pod or NetworkPolicy, is
/// reported on `err` with [`EXIT_NO_INVENTORY`].
pub fn audit_dir(
    args: &AuditArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, VerdictError> {
    let inv = match crate::inventory::manifest::load_dir_with_summary(&args.inventory) {
        Ok((inv, summary)) => {
            // Kept objects that are probably mistakes: said on stderr, as `preflight` says its
            // warnings, so the report and the exit status stay what they were.
            for w in summary.warnings() {
                writeln!(err, "deny-observer: warning: {w}").map_err(io_err("writing errors"))?;
            }
            inv
        }
        Err(e) => {
            writeln!(err, "deny-observer: error: cannot load the inventory: {e}")
                .map_err(io_err("writing errors"))?;
            return Ok(EXIT_NO_INVENTORY);
        }
    };
    if inv.is_empty() {
        let mut msg = format!(
            "deny-observer: error: the inventory {} holds no Namespace, Pod or NetworkPolicy",
            args.inventory.display()
        );
        if !inv.invalid.is_empty() {
            msg.push_str(&format!(
                " (every one of its {} object(s) is invalid)",
                inv.invalid.len()
            ));
        }
        writeln!(err, "{msg}").map_err(io_err("writing errors"))?;
        for o in &inv.invalid {
            writeln!(err, "  {o}").map_err(io_err("writing errors"))?;
        }
        return Ok(EXIT_NO_INVENTORY);
    }
    audit(args, Arc::new(inv), out)
}

/// Runs `audit` on a loaded inventory. Returns [`EXIT_INVALID_OBJECTS`] with
/// `--fail-on-invalid` when the inventory left objects out, else [`EXIT_OPEN_NAMESPACE`] with
/// `--fail-on-open` when a namespace has no NetworkPolicy, 0 otherwise.
pub fn audit(
    args: &AuditArgs,
    inv: Arc<Inventory>,
    out: &mut dyn Write,
) -> Result<u8, VerdictError> {
    let invalid_objects = inv.invalid.clone();
    let engine = Engine::new(inv);
    let namespaces = engine.audit();
    let report = AuditReport {
        schema_version: AUDIT_SCHEMA_VERSION,
        open_namespaces: namespaces
            .iter()
            .filter(|n| n.open)
            .map(|n| n.name.clone())
            .collect(),
        namespaces,
        invalid_objects,
    };
    match args.output {
        AuditOutput::Json => {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out).map_err(io_err("writing output"))?;
        }
        AuditOutput::Table => write_table(&report, out).map_err(io_err("writing output"))?,
    }
    Ok(
        if args.fail_on_invalid && !report.invalid_objects.is_empty() {
            EXIT_INVALID_OBJECTS
        } else if args.fail_on_open && !report.open_namespaces.is_empty() {
            EXIT_OPEN_NAMESPACE
        } else {
            0
        },
    )
}

fn write_table(report: &AuditReport, out: &mut dyn Write) -> std::io::Result<()> {
    let header = [
        "NAMESPACE",
        "POLICIES",
        "PODS",
        "NOT-ISOLATED-INGRESS",
        "NOT-ISOLATED-EGRESS",
        "POLICIES-SELECTING-NO-POD",
    ];
    let rows: Vec<[String; 6]> = report
        .namespaces
        .iter()
        .map(|n| {
            [
                if n.open {
                    format!("{} (open field)", n.name)
                } else {
                    n.name.clone()
                },
                n.policies.to_string(),
                n.pods.to_string(),
                n.pods_not_isolated_ingress.to_string(),
                n.pods_not_isolated_egress.to_string(),
                if n.policies_selecting_no_pod.is_empty() {
                    "-".to_owned()
                } else {
                    n.policies_selecting_no_pod.join(",")
                },
            ]
        })
        .collect();
    write_columns(out, "", &header, &rows)?;
    let open = report.open_namespaces.len();
    writeln!(
        out,
        "\n{} namespace(s), {open} open field (no NetworkPolicy): {}",
        report.namespaces.len(),
        if open == 0 {
            "-".to_owned()
        } else {
            report.open_namespaces.join(", ")
        }
    )?;
    if !report.invalid_objects.is_empty() {
        writeln!(
            out,
            "\n{} invalid object(s), left out as the API server would refuse them:",
            report.invalid_objects.len()
        )?;
        for o in &report.invalid_objects {
            match &o.source {
                Some(src) => writeln!(out, "  {} {} ({src}):", printable(&o.kind), o.id())?,
                None => writeln!(out, "  {} {}:", printable(&o.kind), o.id())?,
            }
            for e in &o.errors {
                writeln!(out, "    {e}")?;
            }
        }
    }
    Ok(())
}

/// Writes `header` and `rows` as left-aligned columns two spaces apart, each line prefixed with
/// `indent` and without trailing blanks.
pub(crate) fn write_columns<R: AsRef<[String]>>(
    out: &mut dyn Write,
    indent: &str,
    header: &[&str],
    rows: &[R],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{indent}{}", line(&mut header.iter().copied()))?;
    for row in rows {
        writeln!(
            out,
            "{indent}{}",
            line(&mut row.as_ref().iter().map(String::as_str))
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::edges::Counting;

    fn port(name: &str, protocol: Protocol, port: u16, target: u16) -> ServicePort {
        ServicePort {
            name: Some(name.to_owned()),
            protocol,
            port,
            target: TargetPort::Number(target),
        }
    }

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "kube-system".to_owned(),
            name: "dns".to_owned(),
            cluster_ips: vec![],
            external_ips: vec![],
            selector: None,
            ports,
        }
    }

    /// A pod without containers (kept from a hand-written inventory) has no named port: asking
    /// for one is an error naming the pod, not a panic or another port.
    #[test]
    fn a_port_name_on_a_pod_without_containers_is_an_error() {
        let Peer::Pod(pod) = web_pod("bare", Some("http"), 80) else {
            unreachable!()
        };
        let mut bare = (*pod).clone();
        bare.ports.clear();
        let e = resolve_port(&Peer::Pod(Arc::new(bare)), "http", Protocol::Tcp).unwrap_err();
        assert!(
            e.to_string()
                .contains("a/bare declares no TCP container port with that name"),
            "{e}"
        );
    }

    fn web_pod(name: &str, port_name: Option<&str>, port: u16) -> Peer {
        Peer::Pod(Arc::new(Pod {
            namespace: "a".into(),
            name: name.into(),
            uid: None,
            labels: crate::inventory::Labels::default(),
            ips: vec![],
            host_network: false,
            node_name: None,
            phase: PodPhase::Running,
            created_unix: 0,
            ports: vec![crate::inventory::ContainerPort {
                name: port_name.map(str::to_owned),
                port,
                protocol: Protocol::Tcp,
            }],
            workload: crate::inventory::Workload {
                kind: "Deployment".into(),
                name: "web".into(),
            },
        }))
    }

    /// An engine over namespace `a` with `pods` and `policies` (YAML).
    fn engine(pods: Vec<Pod>, policies: &[&str]) -> Engine {
        let ns = crate::inventory::Namespace {
            name: "a".into(),
            labels: [("kubernetes.io/metadata.name", "a")].into_iter().collect(),
        };
        Engine::new(Arc::new(Inventory {
            namespaces: [("a".to_owned(), ns)].into_iter().collect(),
            pods: pods.into_iter().map(Arc::new).collect(),
            policies: policies
                .iter()
                .map(|y| Arc::new(serde_yaml::from_str(y).unwrap()))
                .collect(),
            ..Inventory::default()
        }))
    }

    fn pod_at(name: &str, app: &str, ips: &[&str]) -> Pod {
        let Peer::Pod(p) = web_pod(name, None, 80) else {
            unreachable!()
        };
        let mut p = Arc::unwrap_or_clone(p);
        p.labels = [("app", app)].into_iter().collect();
        p.ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        p.workload.name = name.into();
        p
    }

    const V6_ONLY: &str = "
metadata: {name: v6-only, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 'fd00::/64'}}]}]";

    #[test]
    fn a_dual_stack_pair_named_by_pods_is_denied_when_one_family_is() {
        let e = engine(
            vec![
                pod_at("client", "client", &["10.0.0.1", "fd00::1"]),
                pod_at("web", "web", &["10.0.0.2", "fd00::2"]),
            ],
            &[V6_ONLY],
        );
        let from = resolve_endpoints(&e, "a/client").unwrap();
        let to = resolve_endpoints(&e, "a/web").unwrap();
        let j = judge(&e, &from, &to, Protocol::Tcp, &PortRef::Number(80)).unwrap();
        assert_eq!((j.pairs, j.denied), (1, 1));
        assert_eq!(
            j.flow.family,
            Some(IpFamily::V4),
            "the denied family is shown"
        );
        // Named by its IPv6 address, the client is judged over IPv6 only: allowed.
        let from = resolve_endpoints(&e, "fd00::1").unwrap();
        let j = judge(&e, &from, &to, Protocol::Tcp, &PortRef::Number(80)).unwrap();
        assert_eq!(j.denied, 0);
        // A single-stack pair is judged over its one family.
        let e = engine(
            vec![
                pod_at("client", "client", &["fd00::1"]),
                pod_at("web", "web", &["10.0.0.2", "fd00::2"]),
            ],
            &[V6_ONLY],
        );
        let from = resolve_endpoints(&e, "a/client").unwrap();
        let to = resolve_endpoints(&e, "a/web").unwrap();
        let j = judge(&e, &from, &to, Protocol::Tcp, &PortRef::Number(80)).unwrap();
        assert_eq!((j.denied, j.flow.family), (0, Some(IpFamily::V6)));
    }

    #[test]
    fn outside_classes_as_the_metrics_label_them_and_the_pods_own_node() {
        let e = engine(
            vec![pod_at("web", "web", &["10.0.0.2"])],
            &["
metadata: {name: deny, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress]}"],
        );
        let to = resolve_endpoints(&e, "a/web").unwrap();
        let judged = |from: &str| {
            let from = resolve_endpoints(&e, from).unwrap();
            judge(&e, &from, &to, Protocol::Tcp, &PortRef::Number(8080))
                .unwrap()
                .denied
        };
        // Kubelet probes: a pod's own node is always allowed, whatever the policies say.
        assert_eq!(judged("node"), 0);
        assert_eq!(judged("/node"), 0);
        // Another node, the world, private ranges: the default deny holds.
        for other in ["host", "/host", "world", "/world", "private"] {
            assert_eq!(judged(other), 1, "{other}");
        }
        assert!(resolve_endpoints(&e, "galaxy").is_err());
    }

    #[test]
    fn icmp_is_a_protocol_explain_takes_without_a_port() {
        assert_eq!(parse_protocol("icmp").unwrap(), Protocol::Icmp);
        assert_eq!(parse_protocol("ICMPv6").unwrap(), Protocol::Icmpv6);
        assert!(parse_protocol("gre").is_err());
        let e = engine(
            vec![
                pod_at("client", "client", &["10.0.0.1"]),
                pod_at("web", "web", &["10.0.0.2"]),
            ],
            &["
metadata: {name: tcp-only, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 80}]}]"],
        );
        // A rule naming ports cannot allow ICMP; --flows lines need no port for it.
        let (_, j) =
            answer_line(&e, r#"{"from":"a/client","to":"a/web","protocol":"icmp"}"#).unwrap();
        assert_eq!(j.denied, 1);
        assert!(answer_line(&e, r#"{"from":"a/client","to":"a/web"}"#).is_err());
    }

    #[test]
    fn a_declared_port_is_named_only_when_every_pod_names_it_alike() {
        let to = Endpoint {
            given: "a/web".into(),
            workload: None,
            peers: vec![
                web_pod("web-1", Some("http"), 8080),
                web_pod("web-2", None, 8080),
                web_pod("web-3", Some("metrics"), 9090),
                web_pod("web-4", Some("metrics"), 9090),
            ],
            service: None,
            own_node: false,
        };
        assert_eq!(
            declared_ports(&to, None),
            [
                (Protocol::Tcp, 8080, None),
                (Protocol::Tcp, 9090, Some("metrics".to_owned()))
            ]
        );
    }

    #[test]
    fn a_service_port_number_without_a_protocol_is_the_tcp_one_when_there_is_one() {
        // kube-dns lists 53/UDP before 53/TCP: the documented TCP default must still hold.
        let svc = service(vec![
            port("dns", Protocol::Udp, 53, 5353),
            port("dns-tcp", Protocol::Tcp, 53, 5354),
        ]);
        let (p, target, _) = service_port(&svc, &PortRef::Number(53), None).unwrap();
        assert_eq!((p, target), (Protocol::Tcp, PortRef::Number(5354)));
        let (p, target, _) = service_port(&svc, &PortRef::Number(53), Some(Protocol::Udp)).unwrap();
        assert_eq!((p, target), (Protocol::Udp, PortRef::Number(5353)));
        // A name is unique in a Service: it decides the protocol.
        let (p, _, _) = service_port(&svc, &PortRef::Name("dns".to_owned()), None).unwrap();
        assert_eq!(p, Protocol::Udp);
        // A number served over UDP only needs no --protocol.
        let udp_only = service(vec![port("dns", Protocol::Udp, 53, 53)]);
        let (p, _, _) = service_port(&udp_only, &PortRef::Number(53), None).unwrap();
        assert_eq!(p, Protocol::Udp);
        assert!(service_port(&udp_only, &PortRef::Number(53), Some(Protocol::Tcp)).is_err());
    }

    #[test]
    fn an_endless_flow_line_is_reported_by_number_and_ends_the_batch() {
        let engine = Engine::new(Arc::new(Inventory::default()));
        // `explain --flows /dev/zero` (4 MiB of it), after one ordinary (bad) line: reading
        // stops at the limit.
        let input = Counting {
            inner: std::io::Read::chain(
                &b"not json\n"[..],
                std::io::Read::take(std::io::repeat(0), 4 << 20),
            ),
            read: 0,
        };
        let mut reader = BufReader::new(input);
        let mut out = Vec::new();
        let code = explain_batch(&engine, &mut reader, &mut out).unwrap_or(0);
        assert_eq!(code, EXIT_BAD_FLOW_LINES);
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_default())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[1]["line"], 2);
        let error = lines[1]["error"].as_str().unwrap_or_default();
        assert!(error.contains("longer than 1048576 bytes"), "{error}");
        let read = reader.get_ref().read;
        assert!(read <= MAX_LINE_BYTES + 64 * 1024, "read {read} bytes");
    }
}
