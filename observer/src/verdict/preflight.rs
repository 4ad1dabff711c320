//! `deny-observer preflight`: judges every observed edge with today's policies and with the
//! candidate change, and reports the edges whose verdict flips.
//!
//! - **breaks**: seen allowed, and a pod pair of the edge allowed by today's policies is denied
//!   after the change. Only these fail the run (exit [`EXIT_BREAKS`]): traffic that is dropped
//!   today cannot break.
//! - **newly allowed**: a pod pair denied by today's policies is allowed after the change.
//!
//! Edges are by workload; a workload edge is judged over every (source pod, destination pod)
//! pair, as `explain ns/workload` does: `allow` when every pair is allowed, `deny` when none
//! is, `partial` in between. Outside peers (`world`,
//! `private`, `node`, `host`) have no address in the metrics, so they are judged with
//! representative addresses ([`OUTSIDE_REPRESENTATIVES`]) that only `ipBlock` rules match.
//! Denied edges read from the drop metrics have no port: they are judged on every container
//! port the destination declares for the protocol (an entry per port that flips), and on no
//! port at all (only rules that allow every port match) when it declares none.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;

use super::cli::{
    AuditOutput, Endpoint, PortRef, declared_ports, judge, outside_endpoint, resolve_endpoints,
    service_port,
};
use super::edges::{Edge, EdgeError, EdgeSourceArgs, Observed};
use super::{Engine, Peer, Verdict, VerdictError};
use crate::inventory::{Inventory, LoadError, Namespace};

/// Exit status when at least one observed allowed edge would be denied.
pub const EXIT_BREAKS: u8 = 4;
/// Exit status on bad input (inventory, change, edges, arguments).
pub const EXIT_BAD_INPUT: u8 = 2;

pub use super::cli::OUTSIDE_REPRESENTATIVES;

/// Errors of `preflight` and `suggest`; all of them are bad input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The inventory or a change file could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The edges could not be read or fetched.
    #[error(transparent)]
    Edges(#[from] EdgeError),
    /// Bad arguments or output failure.
    #[error(transparent)]
    Verdict(#[from] VerdictError),
    /// The inventory from the API server could not be read.
    #[error("reading the inventory from the API server: {0}")]
    Kube(String),
    /// The change is not usable.
    #[error("{0}")]
    Change(String),
}

/// Arguments of `deny-observer preflight`.
#[derive(Debug, Clone, clap::Args)]
pub struct PreflightArgs {
    /// Today's inventory: a directory of manifests, or `kube` for the API server (kubeconfig or
    /// in-cluster config).
    #[arg(long)]
    pub inventory: String,
    /// NetworkPolicy manifests (files or directories) to create or replace (same namespace
    /// and name); a Namespace among them replaces that namespace's labels.
    #[arg(long, num_args = 1..)]
    pub apply: Vec<PathBuf>,
    /// A NetworkPolicy to delete, `<namespace>/<name>`; repeatable.
    #[arg(long)]
    pub delete: Vec<String>,
    /// Where the observed edges come from.
    #[command(flatten)]
    pub source: EdgeSourceArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = AuditOutput::Table)]
    pub output: AuditOutput,
}

/// Loads `--inventory`: a manifest directory, or `kube`.
pub fn load_inventory(spec: &str) -> Result<Arc<Inventory>, PreflightError> {
    if spec == "kube" {
        return load_kube().map(Arc::new);
    }
    Ok(Arc::new(crate::inventory::load_dir(Path::new(spec))?))
}

/// The daemon's API-server path, run once: watch, wait for the first full sync, snapshot.
fn load_kube() -> Result<Inventory, PreflightError> {
    use crate::inventory::kube::{KubeInventory, KubeInventoryConfig, default_client};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PreflightError::Kube(format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        let client = default_client()
            .await
            .map_err(|e| PreflightError::Kube(e.to_string()))?;
        let inv = KubeInventory::start(
            client,
            Arc::new(|_: &str| {}),
            KubeInventoryConfig::default(),
        );
        tokio::time::timeout(std::time::Duration::from_secs(60), inv.wait_until_ready())
            .await
            .map_err(|_| {
                PreflightError::Kube(format!(
                    "no full sync within 60s (last: {})",
                    inv.health()
                        .last_error()
                        .unwrap_or_else(|| "no answer".to_owned())
                ))
            })?
            .map_err(|e| PreflightError::Kube(e.to_string()))?;
        Ok(inv.current().as_ref().clone())
    })
}

fn policy_id(np: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        np.metadata.namespace.as_deref().unwrap_or("default"),
        np.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Loads the NetworkPolicies of `--apply` paths, refusing Namespaces (see [`load_change`]).
pub fn load_policies(paths: &[PathBuf]) -> Result<Vec<Arc<NetworkPolicy>>, PreflightError> {
    let (policies, namespaces) = load_change(paths)?;
    match namespaces.first() {
        None => Ok(policies),
        Some(ns) => Err(PreflightError::Change(format!(
            "the change relabels Namespace {}: load it with load_change",
            ns.name
        ))),
    }
}

/// Loads the NetworkPolicies and Namespaces of `--apply` paths. A change often labels a
/// namespace for the policies that select it, so Namespaces are part of it (see
/// [`apply_namespaces`]); pods are refused, so that a pod manifest given by mistake is not
/// taken for a change of the inventory.
pub fn load_change(
    paths: &[PathBuf],
) -> Result<(Vec<Arc<NetworkPolicy>>, Vec<Namespace>), PreflightError> {
    let mut out = Vec::new();
    let mut namespaces = Vec::new();
    for path in paths {
        let (mut inv, summary) = if path.is_dir() {
            crate::inventory::manifest::load_dir_with_summary(path)?
        } else {
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?;
            crate::inventory::manifest::load_str_with_summary(path, &text)?
        };
        // Only Namespace objects of the change relabel; a policy's namespace alone does not.
        for implied in &summary.implied_namespaces {
            inv.namespaces.remove(implied);
        }
        if !inv.invalid.is_empty() {
            let list: Vec<String> = inv.invalid.iter().map(ToString::to_string).collect();
            return Err(PreflightError::Change(format!(
                "{}: the API server would refuse this change: {}",
                path.display(),
                list.join("; ")
            )));
        }
        if !inv.pods.is_empty() {
            return Err(PreflightError::Change(format!(
                "{}: --apply takes NetworkPolicies, not pods",
                path.display()
            )));
        }
        if inv.policies.is_empty() && inv.namespaces.is_empty() {
            return Err(PreflightError::Change(format!(
                "{}: no NetworkPolicy or Namespace to apply",
                path.display()
            )));
        }
        out.extend(inv.policies);
        namespaces.extend(inv.namespaces.into_values());
    }
    Ok((out, namespaces))
}

/// Creates or replaces `namespaces` in `inventory`: a Namespace of the change carries the
/// labels the namespace will have, so it replaces today's labels whole (a label the change
/// leaves out is removed, as applying the manifest with `kubectl replace` would).
pub fn apply_namespaces(inventory: &mut Inventory, namespaces: &[Namespace]) {
    for ns in namespaces {
        inventory.namespaces.insert(ns.name.clone(), ns.clone());
    }
}

/// Today's inventory with `apply` created or replaced (by namespace and name) and `delete`
/// removed. Deleting a policy that does not exist is an error: the change was written
/// against another cluster state.
pub fn apply_change(
    base: &Inventory,
    apply: &[Arc<NetworkPolicy>],
    delete: &[String],
) -> Result<Inventory, PreflightError> {
    let mut next = base.clone();
    for id in delete {
        if id.split('/').count() != 2 {
            return Err(PreflightError::Change(format!(
                "invalid --delete {id:?} (expected <namespace>/<name>)"
            )));
        }
        let before = next.policies.len();
        next.policies.retain(|p| policy_id(p) != *id);
        if next.policies.len() == before {
            return Err(PreflightError::Change(format!(
                "--delete {id}: no such NetworkPolicy in the inventory"
            )));
        }
    }
    for np in apply {
        let id = policy_id(np);
        next.policies.retain(|p| policy_id(p) != id);
        next.policies.push(Arc::clone(np));
        // A policy may land in a namespace the inventory only knew implicitly.
        if let Some(ns) = &np.metadata.namespace {
            next.namespaces
                .entry(ns.clone())
                .or_insert_with(|| crate::inventory::Namespace {
                    name: ns.clone(),
                    labels: [("kubernetes.io/metadata.name".to_owned(), ns.clone())].into(),
                });
        }
    }
    Ok(next)
}

/// Resolves one side of an edge: the pods of `ns/workload`, or an outside representative.
pub fn resolve_side(engine: &Engine, ns: &str, workload: &str) -> Result<Endpoint, String> {
    if ns.is_empty() {
        // `/node` too: an edge between a pod and its own node (kubelet probes) is always
        // allowed, before and after any change, as the daemon judges it.
        return outside_endpoint(workload).ok_or_else(|| {
            format!("{workload:?} has no namespace and is not world, private, node or host")
        });
    }
    let given = format!("{ns}/{workload}");
    let endpoint = resolve_endpoints(engine, &given).map_err(|e| e.to_string())?;
    if endpoint.workload.is_none() {
        // A pod name that happens to equal the label: the metric names a workload.
        if let Some(Peer::Pod(p)) = endpoint.peers.first()
            && p.workload.name != workload
        {
            return Err(format!("{given} is a pod of workload {}", p.workload.name));
        }
    }
    Ok(endpoint)
}

/// One edge's verdict on one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// The port judged; `None` when the edge had none and the destination declares none.
    pub port: Option<u16>,
    /// Each pod pair's verdict ([`super::cli::Judgement::pair_allowed`]).
    pub pairs: Vec<bool>,
    /// The policies that decide: the isolating policies of the denying side, or the policies
    /// that allow it.
    pub policies: Vec<String>,
}

fn deciding_policies(v: &Verdict) -> Vec<String> {
    let mut out: Vec<String> = match v.deciding_side() {
        Some(side) => side.isolating_policies.clone(),
        None => v
            .egress
            .allowed_by
            .iter()
            .chain(&v.ingress.allowed_by)
            .cloned()
            .collect(),
    };
    out.sort();
    out.dedup();
    out
}

/// Judges `edge` on `engine`, with sides already resolved. One result per judged port.
pub fn judge_edge(
    engine: &Engine,
    edge: &Edge,
    from: &Endpoint,
    to: &Endpoint,
) -> Result<Vec<Judged>, String> {
    let protocol = edge.protocol()?;
    let ports: Vec<Option<u16>> = match edge.port {
        Some(p) => vec![Some(p)],
        None if protocol.has_ports() => {
            let declared: Vec<Option<u16>> = match &to.service {
                // Every port the Service serves over the protocol; each is judged at its
                // targetPort below. Its pods' container ports are not Service ports.
                Some(svc) => svc
                    .ports
                    .iter()
                    .filter(|sp| sp.protocol == protocol)
                    .map(|sp| Some(sp.port))
                    .collect(),
                None => declared_ports(to, Some(protocol))
                    .into_iter()
                    .map(|(_, n, _)| Some(n))
                    .collect(),
            };
            if declared.is_empty() {
                vec![None]
            } else {
                declared
            }
        }
        None => vec![None],
    };
    let mut out = Vec::with_capacity(ports.len());
    for port in ports {
        // An edge to a Service's ClusterIP (a drop's `service/<name>`) carries the port the
        // client dialled; the policies see its targetPort.
        let (protocol, target) = match (&to.service, port) {
            (Some(svc), Some(p)) => {
                let (protocol, target, _) = service_port(svc, &PortRef::Number(p), Some(protocol))
                    .map_err(|e| e.to_string())?;
                (protocol, target)
            }
            _ => (protocol, PortRef::Number(port.unwrap_or(0))),
        };
        let judged = judge(engine, from, to, protocol, &target).map_err(|e| e.to_string())?;
        out.push(Judged {
            port,
            pairs: judged.pair_allowed,
            policies: deciding_policies(&judged.verdict),
        });
    }
    Ok(out)
}

/// An edge whose verdict changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Source namespace (`""` outside).
    pub source_namespace: String,
    /// Source workload.
    pub source_workload: String,
    /// Destination namespace (`""` outside).
    pub destination_namespace: String,
    /// Destination workload.
    pub destination_workload: String,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// The port judged (`null`: the edge had none and the destination declares none).
    pub port: Option<u16>,
    /// Connections or dropped packets observed in the window.
    pub observed: u64,
    /// Verdict with today's policies: `allow` (every pod pair), `deny` (none) or `partial`.
    pub before: &'static str,
    /// Verdict after the change.
    pub after: &'static str,
    /// The policies that decide after the change (the isolating policies of a deny, the
    /// allowing policies of an allow).
    pub policies: Vec<String>,
}

/// An edge that could not be judged (its workload is not in the inventory...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unresolved {
    /// `src -> dst proto/port`.
    pub edge: String,
    /// Why.
    pub reason: String,
}

/// The `--output json` document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Seen allowed, and a pod pair allowed today is denied after.
    pub breaks: Vec<Change>,
    /// Denied today, allowed after.
    pub newly_allowed: Vec<Change>,
    /// Edges judged before and after.
    pub edges_evaluated: usize,
    /// Edges that could not be judged, with the reason.
    pub edges_unresolved: Vec<Unresolved>,
}

/// `allow` when every pod pair is allowed, `deny` when none is, `partial` in between (a
/// rollout whose old pods a policy allows and new ones it does not, say).
fn word(pairs: &[bool]) -> &'static str {
    match (pairs.iter().any(|a| *a), pairs.iter().all(|a| *a)) {
        (_, true) => "allow",
        (false, _) => "deny",
        _ => "partial",
    }
}

/// Whether some pod pair goes from `from` to `to` between the two judgements of one edge.
fn some_pair(before: &Judged, after: &Judged, from: bool, to: bool) -> bool {
    before
        .pairs
        .iter()
        .zip(&after.pairs)
        .any(|(b, a)| *b == from && *a == to)
}

fn edge_text(edge: &Edge) -> String {
    format!(
        "{} -> {} {}/{}",
        edge.source(),
        edge.destination(),
        edge.protocol,
        edge.port.map_or_else(|| "-".to_owned(), |p| p.to_string())
    )
}

/// Judges every edge with `before` and `after` (engines over the same pods).
pub fn compare(before: &Engine, after: &Engine, edges: &[Edge]) -> Report {
    let mut report = Report::default();
    for edge in edges {
        let unresolved = |reason: String| Unresolved {
            edge: edge_text(edge),
            reason,
        };
        let sides = resolve_side(before, &edge.source_namespace, &edge.source_workload)
            .map_err(|e| format!("source: {e}"))
            .and_then(|from| {
                resolve_side(
                    before,
                    &edge.destination_namespace,
                    &edge.destination_workload,
                )
                .map(|to| (from, to))
                .map_err(|e| format!("destination: {e}"))
            });
        let (from, to) = match sides {
            Ok(sides) => sides,
            Err(reason) => {
                report.edges_unresolved.push(unresolved(reason));
                continue;
            }
        };
        let judged = judge_edge(before, edge, &from, &to)
            .and_then(|b| judge_edge(after, edge, &from, &to).map(|a| (b, a)));
        let (was, now) = match judged {
            Ok(pair) => pair,
            Err(reason) => {
                report.edges_unresolved.push(unresolved(reason));
                continue;
            }
        };
        report.edges_evaluated += 1;
        for (b, a) in was.iter().zip(&now) {
            let change = Change {
                source_namespace: edge.source_namespace.clone(),
                source_workload: edge.source_workload.clone(),
                destination_namespace: edge.destination_namespace.clone(),
                destination_workload: edge.destination_workload.clone(),
                protocol: edge.protocol.clone(),
                port: a.port,
                observed: edge.observed,
                before: word(&b.pairs),
                after: word(&a.pairs),
                policies: a.policies.clone(),
            };
            // Pair by pair: an edge partly allowed today (a rollout, one policy per version)
            // breaks when a pair that is allowed today is denied after the change.
            if some_pair(b, a, true, false) && edge.verdict == Observed::Allow {
                report.breaks.push(change);
            } else if some_pair(b, a, false, true) {
                report.newly_allowed.push(change);
            }
        }
    }
    let key = |c: &Change| std::cmp::Reverse(c.observed);
    report.breaks.sort_by_key(key);
    report.newly_allowed.sort_by_key(key);
    report
}

fn side_name(ns: &str, workload: &str) -> String {
    if ns.is_empty() {
        workload.to_owned()
    } else {
        format!("{ns}/{workload}")
    }
}

fn write_changes(title: &str, changes: &[Change], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{title}: {}", changes.len())?;
    if changes.is_empty() {
        return Ok(());
    }
    let rows: Vec<[String; 6]> = changes
        .iter()
        .map(|c| {
            [
                side_name(&c.source_namespace, &c.source_workload),
                side_name(&c.destination_namespace, &c.destination_workload),
                format!(
                    "{}/{}",
                    c.protocol,
                    c.port.map_or_else(|| "-".to_owned(), |p| p.to_string())
                ),
                c.observed.to_string(),
                format!("{} -> {}", c.before, c.after),
                if c.policies.is_empty() {
                    "-".to_owned()
                } else {
                    c.policies.join(",")
                },
            ]
        })
        .collect();
    let header = [
        "SOURCE",
        "DESTINATION",
        "PORT",
        "OBSERVED",
        "VERDICT",
        "POLICIES",
    ];
    super::cli::write_columns(out, "  ", &header, &rows)
}

/// Writes the report as a table.
pub fn write_table(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    write_changes(
        "BREAKS (seen allowed; pods allowed today, denied after the change)",
        &report.breaks,
        out,
    )?;
    writeln!(out)?;
    write_changes(
        "NEWLY ALLOWED (pods denied today, allowed after the change)",
        &report.newly_allowed,
        out,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{} edge(s) evaluated, {} unresolved",
        report.edges_evaluated,
        report.edges_unresolved.len()
    )?;
    for u in &report.edges_unresolved {
        writeln!(out, "  unresolved: {}: {}", u.edge, u.reason)?;
    }
    Ok(())
}

/// Runs `preflight`; returns 0 or [`EXIT_BREAKS`]. Notes (what the edge source could not see)
/// go to `notes`.
pub fn preflight(
    args: &PreflightArgs,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<u8, PreflightError> {
    if args.apply.is_empty() && args.delete.is_empty() {
        return Err(PreflightError::Change(
            "nothing to check: pass --apply <file|dir> and/or --delete <namespace>/<name>"
                .to_owned(),
        ));
    }
    let base = load_inventory(&args.inventory)?;
    let (apply, namespaces) = load_change(&args.apply)?;
    let mut next = apply_change(&base, &apply, &args.delete)?;
    apply_namespaces(&mut next, &namespaces);
    let fetched = args.source.load()?;
    let io = |source| VerdictError::Io {
        context: "writing output".to_owned(),
        source,
    };
    for note in &fetched.notes {
        writeln!(notes, "deny-observer: note: {note}").map_err(io)?;
    }
    let before = Engine::new(base);
    let after = Engine::new(Arc::new(next));
    for w in after.warnings() {
        writeln!(notes, "deny-observer: warning: {w}").map_err(io)?;
    }
    let report = compare(&before, &after, &fetched.edges);
    match args.output {
        AuditOutput::Json => {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(VerdictError::from)?;
            writeln!(out).map_err(io)?;
        }
        AuditOutput::Table => write_table(&report, out).map_err(io)?,
    }
    Ok(if report.breaks.is_empty() {
        0
    } else {
        EXIT_BREAKS
    })
}
