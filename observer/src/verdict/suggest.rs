//! `deny-observer suggest`: least-privilege NetworkPolicies for one namespace from the
//! traffic seen allowed.
//!
//! The output is a default deny for the namespace plus, per workload, one policy that allows
//! exactly the peers and ports seen allowed into it (and with `--egress`, out of it), and with
//! `--egress` a policy that keeps DNS open. Pods are selected by the labels every pod of their
//! workload shares, minus the labels controllers stamp per revision or per pod
//! ([`UNSTABLE_LABELS`]), so a rollout does not fall out of the policy. Peers in the cluster
//! are selected by `kubernetes.io/metadata.name` and the same stable labels; outside peers by
//! `ipBlock`s of their class (`world`: everything public, `private`/`node`/`host`: the
//! private ranges).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cli::resolve_endpoints;
use super::edges::{Edge, EdgeSourceArgs, Observed};
use super::preflight::{PreflightError, load_inventory};
use super::{Engine, Peer, VerdictError};
use crate::flow::Protocol;
use crate::inventory::{Labels, Pod};

/// Label keys controllers set per revision, per pod or per run; selecting on them would lose
/// the workload's pods at the next rollout.
pub const UNSTABLE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "job-name",
    "controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/job-index",
];

/// The namespace label the API server sets on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Prefix of every suggested policy's name, so that applying a suggestion never replaces a
/// policy someone wrote.
pub const NAME_PREFIX: &str = "deny-observer-";

const PUBLIC_V4_EXCEPT: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];
const PUBLIC_V6_EXCEPT: &[&str] = &["fc00::/7", "fe80::/10"];
const PRIVATE_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// Arguments of `deny-observer suggest`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuggestArgs {
    /// The inventory: a directory of manifests, or `kube`.
    #[arg(long)]
    pub inventory: String,
    /// The namespace to write policies for.
    #[arg(long)]
    pub namespace: String,
    /// Where the observed edges come from.
    #[command(flatten)]
    pub source: EdgeSourceArgs,
    /// Also restrict egress (with DNS kept open); without it only ingress is restricted.
    #[arg(long)]
    pub egress: bool,
}

/// The suggested policies and what could not be expressed.
#[derive(Debug, Default)]
pub struct Suggestion {
    /// Policies, default deny first.
    pub policies: Vec<NetworkPolicy>,
    /// Edges or workloads left out, and approximations made, for the operator.
    pub notes: Vec<String>,
}

/// The labels all `pods` share, minus [`UNSTABLE_LABELS`].
pub fn stable_labels(pods: &[&Pod]) -> Labels {
    let mut iter = pods.iter();
    let Some(first) = iter.next() else {
        return Labels::new();
    };
    let mut common: Labels = first
        .labels
        .iter()
        .filter(|(k, _)| !UNSTABLE_LABELS.contains(k))
        .collect();
    for pod in iter {
        common.retain(|k, v| pod.labels.get(k) == Some(v));
    }
    common
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Pods { namespace: String, workload: String },
    Outside(String),
}

/// Peer → set of (protocol, port); `None` port: every port.
type Rules = BTreeMap<PeerKey, BTreeSet<(String, Option<u16>)>>;

#[derive(Default)]
struct WorkloadRules {
    ingress: Rules,
    egress: Rules,
}

fn pods_of(engine: &Engine, ns: &str, workload: &str) -> Result<Vec<Arc<Pod>>, String> {
    let endpoint =
        resolve_endpoints(engine, &format!("{ns}/{workload}")).map_err(|e| e.to_string())?;
    Ok(endpoint
        .peers
        .into_iter()
        .filter_map(|p| match p {
            Peer::Pod(p) => Some(p),
            Peer::External(_) => None,
        })
        .collect())
}

fn selector(labels: Labels) -> LabelSelector {
    LabelSelector {
        match_labels: (!labels.is_empty()).then(|| labels.to_btree_map()),
        match_expressions: None,
    }
}

fn ip_block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: cidr.to_owned(),
            except: (!except.is_empty()).then(|| except.iter().map(|s| (*s).to_owned()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn outside_peers(class: &str) -> Vec<NetworkPolicyPeer> {
    if class == "world" {
        vec![
            ip_block("0.0.0.0/0", PUBLIC_V4_EXCEPT),
            ip_block("::/0", PUBLIC_V6_EXCEPT),
        ]
    } else {
        PRIVATE_BLOCKS.iter().map(|c| ip_block(c, &[])).collect()
    }
}

/// The container port name every destination pod gives `port`, if they agree on one.
fn port_name(dst: &[Arc<Pod>], protocol: Protocol, port: u16) -> Option<String> {
    let mut names = dst.iter().map(|p| {
        p.ports
            .iter()
            .find(|cp| cp.protocol == protocol && cp.port == port)
            .and_then(|cp| cp.name.clone())
    });
    let first = names.next()??;
    names
        .all(|n| n.as_deref() == Some(first.as_str()))
        .then_some(first)
}

fn policy_ports(
    set: &BTreeSet<(String, Option<u16>)>,
    dst: &[Arc<Pod>],
) -> Option<Vec<NetworkPolicyPort>> {
    if set.iter().any(|(_, p)| p.is_none()) {
        return None;
    }
    Some(
        set.iter()
            .filter_map(|(proto, port)| {
                let port = (*port)?;
                let protocol = proto.parse::<Protocol>().ok()?;
                let value = match port_name(dst, protocol, port) {
                    Some(name) => IntOrString::String(name),
                    None => IntOrString::Int(i32::from(port)),
                };
                Some(NetworkPolicyPort {
                    port: Some(value),
                    protocol: Some(protocol.k8s_name().to_owned()),
                    end_port: None,
                })
            })
            .collect(),
    )
}

fn meta(ns: &str, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_owned()),
        ..ObjectMeta::default()
    }
}

/// Builds the suggestion for `namespace` from the edges seen allowed.
pub fn suggest(engine: &Engine, namespace: &str, edges: &[Edge], egress: bool) -> Suggestion {
    let mut out = Suggestion::default();
    let mut by_workload: BTreeMap<String, WorkloadRules> = BTreeMap::new();
    let key = |ns: &str, workload: &str| {
        if ns.is_empty() {
            PeerKey::Outside(workload.to_owned())
        } else {
            PeerKey::Pods {
                namespace: ns.to_owned(),
                workload: workload.to_owned(),
            }
        }
    };
    for edge in edges.iter().filter(|e| e.verdict == Observed::Allow) {
        let entry = (edge.protocol.clone(), edge.port);
        if edge.destination_namespace == namespace {
            by_workload
                .entry(edge.destination_workload.clone())
                .or_default()
                .ingress
                .entry(key(&edge.source_namespace, &edge.source_workload))
                .or_default()
                .insert(entry.clone());
        }
        if egress && edge.source_namespace == namespace {
            by_workload
                .entry(edge.source_workload.clone())
                .or_default()
                .egress
                .entry(key(&edge.destination_namespace, &edge.destination_workload))
                .or_default()
                .insert(entry);
        }
    }

    let mut types = vec!["Ingress".to_owned()];
    if egress {
        types.push("Egress".to_owned());
    }
    out.policies.push(NetworkPolicy {
        metadata: meta(namespace, format!("{NAME_PREFIX}default-deny")),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(types),
            ..NetworkPolicySpec::default()
        }),
    });
    if egress {
        let dns = ["UDP", "TCP"]
            .into_iter()
            .map(|p| NetworkPolicyPort {
                port: Some(IntOrString::Int(53)),
                protocol: Some(p.to_owned()),
                end_port: None,
            })
            .collect();
        out.policies.push(NetworkPolicy {
            metadata: meta(namespace, format!("{NAME_PREFIX}allow-dns")),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Egress".to_owned()]),
                // Any destination on port 53: cluster DNS, node-local caches and upstream
                // resolvers differ per cluster.
                egress: Some(vec![NetworkPolicyEgressRule {
                    ports: Some(dns),
                    to: None,
                }]),
                ..NetworkPolicySpec::default()
            }),
        });
    }

    // Peer pods are looked up once each.
    let mut peer_cache: BTreeMap<PeerKey, Result<Vec<Arc<Pod>>, String>> = BTreeMap::new();
    let mut peer_pods = |k: &PeerKey| -> Result<Vec<Arc<Pod>>, String> {
        peer_cache
            .entry(k.clone())
            .or_insert_with(|| match k {
                PeerKey::Pods {
                    namespace,
                    workload,
                } => pods_of(engine, namespace, workload),
                PeerKey::Outside(_) => Ok(Vec::new()),
            })
            .clone()
    };

    for (workload, rules) in by_workload {
        let pods = match pods_of(engine, namespace, &workload) {
            Ok(p) if p.iter().all(|p| p.host_network) => {
                out.notes.push(format!(
                    "{namespace}/{workload}: hostNetwork pods, which NetworkPolicy does not apply to; skipped"
                ));
                continue;
            }
            Ok(p) => p,
            Err(e) => {
                out.notes
                    .push(format!("{namespace}/{workload}: {e}; skipped"));
                continue;
            }
        };
        let refs: Vec<&Pod> = pods.iter().map(Arc::as_ref).collect();
        let labels = stable_labels(&refs);
        if labels.is_empty() {
            out.notes.push(format!(
                "{namespace}/{workload}: its pods share no stable label to select them by; skipped (its observed traffic will be denied by the default deny)"
            ));
            continue;
        }
        let mut peer_of = |k: &PeerKey,
                           out: &mut Suggestion|
         -> Option<(Vec<NetworkPolicyPeer>, Vec<Arc<Pod>>)> {
            match k {
                PeerKey::Outside(class) => {
                    if ["world", "private", "node", "host"].contains(&class.as_str()) {
                        Some((outside_peers(class), Vec::new()))
                    } else {
                        out.notes
                            .push(format!("peer {class:?}: not an outside class; skipped"));
                        None
                    }
                }
                PeerKey::Pods {
                    namespace: ns,
                    workload: w,
                } => match peer_pods(k) {
                    Ok(peer) => {
                        let refs: Vec<&Pod> = peer.iter().map(Arc::as_ref).collect();
                        let peer_labels = stable_labels(&refs);
                        if peer_labels.is_empty() {
                            out.notes.push(format!(
                                "peer {ns}/{w}: no stable label; the whole namespace {ns} is allowed instead"
                            ));
                        }
                        Some((
                            vec![NetworkPolicyPeer {
                                ip_block: None,
                                namespace_selector: Some(selector(
                                    [(NAMESPACE_NAME_LABEL.to_owned(), ns.clone())].into(),
                                )),
                                pod_selector: Some(selector(peer_labels)),
                            }],
                            peer,
                        ))
                    }
                    Err(e) => {
                        out.notes.push(format!("peer {ns}/{w}: {e}; skipped"));
                        None
                    }
                },
            }
        };
        let mut ingress = Vec::new();
        for (peer, ports) in &rules.ingress {
            if let Some((from, _)) = peer_of(peer, &mut out) {
                ingress.push(NetworkPolicyIngressRule {
                    from: Some(from),
                    ports: policy_ports(ports, &pods),
                });
            }
        }
        let mut egress_rules = Vec::new();
        for (peer, ports) in &rules.egress {
            if let Some((to, dst)) = peer_of(peer, &mut out) {
                egress_rules.push(NetworkPolicyEgressRule {
                    to: Some(to),
                    ports: policy_ports(ports, &dst),
                });
            }
        }
        if ingress.is_empty() && egress_rules.is_empty() {
            continue;
        }
        let mut types = Vec::new();
        if !ingress.is_empty() {
            types.push("Ingress".to_owned());
        }
        if !egress_rules.is_empty() {
            types.push("Egress".to_owned());
        }
        out.policies.push(NetworkPolicy {
            metadata: meta(namespace, allow_policy_name(&workload)),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector(labels)),
                policy_types: Some(types),
                ingress: (!ingress.is_empty()).then_some(ingress),
                egress: (!egress_rules.is_empty()).then_some(egress_rules),
            }),
        });
    }
    out
}

/// Longest object name the API server takes (a DNS subdomain).
const MAX_NAME: usize = 253;

/// `deny-observer-allow-<workload>`, or, when that is longer than a name may be (a bare pod's
/// name can take all 253 characters), the workload's name cut short and a hash of it, so two
/// long names that share their start still get two policies.
fn allow_policy_name(workload: &str) -> String {
    let name = format!("{NAME_PREFIX}allow-{workload}");
    if name.len() <= MAX_NAME {
        return name;
    }
    // FNV-1a: the same workload gets the same name on every run.
    let hash = workload.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let suffix = format!("-{hash:08x}");
    let mut keep = MAX_NAME - suffix.len();
    // Valid names are ASCII; the loop only guards against a panic on anything else.
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    // The cut must not end on a `-` or `.` before the suffix's own `-`.
    let cut = name[..keep].trim_end_matches(['-', '.']);
    format!("{cut}{suffix}")
}

/// The suggestion as a YAML stream.
pub fn to_yaml(policies: &[NetworkPolicy]) -> Result<String, PreflightError> {
    let mut text = String::new();
    for np in policies {
        text.push_str("---\n");
        let doc = serde_yaml::to_string(np)
            .map_err(|e| PreflightError::Change(format!("encoding YAML: {e}")))?;
        text.push_str(&doc);
    }
    Ok(text)
}

/// Checks every policy with the API server's rules (`inventory::validate`), then reads the
/// YAML back the way the inventory loads manifests, so that what is printed is what the
/// cluster and `preflight --apply` accept. Returns the number of policies read back.
pub fn check_yaml(policies: &[NetworkPolicy], text: &str) -> Result<usize, PreflightError> {
    let mut problems = Vec::new();
    for np in policies {
        for e in crate::inventory::validate::network_policy(np) {
            problems.push(format!(
                "{}: {e}",
                np.metadata.name.as_deref().unwrap_or_default()
            ));
        }
    }
    let inv = crate::inventory::manifest::load_str(std::path::Path::new("<suggestion>"), text)?;
    problems.extend(inv.invalid.iter().map(ToString::to_string));
    if !problems.is_empty() {
        return Err(PreflightError::Change(format!(
            "the suggestion does not validate: {}",
            problems.join("; ")
        )));
    }
    Ok(inv.policies.len())
}

/// Runs `suggest`: YAML on `out`, notes on `notes`.
pub fn run_suggest(
    args: &SuggestArgs,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), PreflightError> {
    let inventory = load_inventory(&args.inventory)?;
    let fetched = args.source.load()?;
    let engine = Engine::new(inventory);
    let suggestion = suggest(&engine, &args.namespace, &fetched.edges, args.egress);
    let text = to_yaml(&suggestion.policies)?;
    let loaded = check_yaml(&suggestion.policies, &text)?;
    if loaded != suggestion.policies.len() {
        return Err(PreflightError::Change(format!(
            "the suggestion reads back as {loaded} policies, not {}",
            suggestion.policies.len()
        )));
    }
    let io = |source| VerdictError::Io {
        context: "writing output".to_owned(),
        source,
    };
    for note in fetched.notes.iter().chain(&suggestion.notes) {
        writeln!(notes, "deny-observer: note: {note}").map_err(io)?;
    }
    let allowed = fetched
        .edges
        .iter()
        .filter(|e| e.verdict == Observed::Allow)
        .count();
    writeln!(
        out,
        "# deny-observer suggest --namespace {}: from {allowed} observed allowed edge(s) of {}",
        args.namespace,
        fetched.edges.len()
    )
    .map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Workload;

    #[test]
    fn a_policy_name_stays_a_valid_name_for_the_longest_workload_names() {
        assert_eq!(allow_policy_name("web"), "deny-observer-allow-web");
        let long_a = format!("{}a", "x".repeat(242));
        let long_b = format!("{}b", "x".repeat(242));
        let (a, b) = (allow_policy_name(&long_a), allow_policy_name(&long_b));
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a}");
        assert_ne!(
            a, b,
            "two long names that share their start get two policies"
        );
        assert_eq!(a, allow_policy_name(&long_a), "stable across calls");
        assert!(a.starts_with("deny-observer-allow-xxx"));
        // Cut where the name had a dash: no `--` before the hash.
        let dashed = format!("{}-{}", "y".repeat(223), "z".repeat(30));
        let d = allow_policy_name(&dashed);
        assert!(!d.contains("--") && d.len() <= MAX_NAME, "{d}");
    }

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "ns".into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ips: Vec::new(),
            host_network: false,
            node_name: None,
            phase: crate::inventory::PodPhase::Running,
            uid: None,
            created_unix: 0,
            ports: Vec::new(),
            workload: Workload {
                kind: "Deployment".into(),
                name: "w".into(),
            },
        }
    }

    #[test]
    fn stable_labels_drop_per_revision_labels_and_keep_what_every_pod_shares() {
        let a = pod(&[
            ("app", "web"),
            ("track", "stable"),
            ("pod-template-hash", "1"),
        ]);
        let b = pod(&[
            ("app", "web"),
            ("track", "canary"),
            ("pod-template-hash", "2"),
        ]);
        let labels = stable_labels(&[&a, &b]);
        assert_eq!(labels, Labels::from([("app", "web")]));
        let sts = pod(&[
            ("app", "db"),
            ("controller-revision-hash", "db-5"),
            ("statefulset.kubernetes.io/pod-name", "db-0"),
            ("apps.kubernetes.io/pod-index", "0"),
        ]);
        assert_eq!(stable_labels(&[&sts]), Labels::from([("app", "db")]));
        assert!(stable_labels(&[]).is_empty());
    }

    #[test]
    fn outside_classes_become_ip_blocks_that_contain_their_representative() {
        let world = outside_peers("world");
        assert_eq!(
            world[0].ip_block.as_ref().map(|b| b.cidr.as_str()),
            Some("0.0.0.0/0")
        );
        for (class, ip) in super::super::preflight::OUTSIDE_REPRESENTATIVES {
            let blocks = outside_peers(class);
            let contains = blocks.iter().filter_map(|p| p.ip_block.as_ref()).any(|b| {
                let net: ipnet::IpNet = b.cidr.parse().unwrap_or_else(|_| panic!("{}", b.cidr));
                let excluded = b.except.iter().flatten().any(|e| {
                    e.parse::<ipnet::IpNet>()
                        .is_ok_and(|e: ipnet::IpNet| e.contains(ip))
                });
                net.contains(ip) && !excluded
            });
            assert!(contains, "{class}: {ip} not in {blocks:?}");
        }
    }
}
