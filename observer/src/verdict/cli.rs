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

use super::{Engine, FlowQuery, MissKind, NamespaceAudit, Peer, SideReport, Verdict, VerdictError};
use crate::flow::{Direction, Protocol};
use crate::inventory::Inventory;
use crate::inventory::validate::InvalidObject;

/// Exit status of `explain --flows` when at least one input line was invalid (every other
/// line is still answered).
pub const EXIT_BAD_FLOW_LINES: u8 = 2;
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
    /// Source: `<namespace>/<pod>` or an IP address.
    #[arg(long, required_unless_present = "flows", conflicts_with = "flows")]
    pub from: Option<String>,
    /// Destination: `<namespace>/<pod>` or an IP address.
    #[arg(long, required_unless_present = "flows", conflicts_with = "flows")]
    pub to: Option<String>,
    /// Destination port: a number, or a container port name of the destination pod.
    #[arg(long, required_unless_present = "flows", conflicts_with = "flows")]
    pub port: Option<String>,
    /// Protocol: TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
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

fn parse_protocol(s: &str) -> Result<Protocol, VerdictError> {
    match s.parse::<Protocol>() {
        Ok(p @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) => Ok(p),
        _ => Err(VerdictError::BadProtocol(s.to_owned())),
    }
}

/// Resolves `<ns>/<pod>` or an IP. An IP of a known pod is that pod.
pub fn resolve_endpoint(engine: &Engine, s: &str) -> Result<Peer, VerdictError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(match engine.pod_by_ip(ip) {
            Some(pod) => Peer::Pod(Arc::clone(pod)),
            None => Peer::External(ip),
        });
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => engine
            .find_pod(ns, name)
            .map(|p| Peer::Pod(Arc::clone(p)))
            .ok_or_else(|| VerdictError::UnknownPod(s.to_owned())),
        _ => Err(VerdictError::BadEndpoint(s.to_owned())),
    }
}

/// Resolves `--port`: a number, or a port name declared by the destination pod for
/// `protocol`.
pub fn resolve_port(dst: &Peer, port: &str, protocol: Protocol) -> Result<u16, VerdictError> {
    if let Ok(n) = port.parse::<u16>() {
        return Ok(n);
    }
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

/// Runs `explain`: the single-flow human form, or the `--flows` batch form. Returns the exit
/// status (0, or [`EXIT_BAD_FLOW_LINES`] in batch mode when some lines were invalid).
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
    let (Some(from), Some(to), Some(port)) = (&args.from, &args.to, &args.port) else {
        return Err(VerdictError::Usage(
            "explain needs --from, --to and --port, or --flows".to_owned(),
        ));
    };
    let protocol = parse_protocol(&args.protocol)?;
    let src = resolve_endpoint(&engine, from)?;
    let dst = resolve_endpoint(&engine, to)?;
    let port = resolve_port(&dst, port, protocol)?;
    let flow = FlowQuery {
        src,
        dst,
        protocol,
        port,
    };
    let verdict = engine.evaluate(&flow);
    write_human(&flow, &verdict, out).map_err(io_err("writing output"))?;
    Ok(0)
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

fn write_human(flow: &FlowQuery, v: &Verdict, out: &mut dyn Write) -> std::io::Result<()> {
    let src = flow.src.display_name();
    let dst = flow.dst.display_name();
    let what = format!("{src} -> {dst} {}/{}", flow.protocol, flow.port);
    match v.direction {
        None => writeln!(out, "verdict: ALLOW  {what}")?,
        Some(d) => {
            writeln!(out, "verdict: DENY  {what}")?;
            let at = if d == Direction::Egress { &src } else { &dst };
            writeln!(out, "decided by: {d} at {at}")?;
        }
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

/// One line of `explain --flows` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowLine {
    from: String,
    to: String,
    port: PortField,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortField {
    Number(u16),
    Name(String),
}

/// One line of `explain --flows` output.
#[derive(Debug, Serialize)]
struct FlowAnswer<'a> {
    line: usize,
    from: &'a str,
    to: &'a str,
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

fn answer_line(engine: &Engine, line: &str) -> Result<(FlowLine, FlowQuery), String> {
    let parsed: FlowLine = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let protocol =
        parse_protocol(parsed.protocol.as_deref().unwrap_or("TCP")).map_err(|e| e.to_string())?;
    let src = resolve_endpoint(engine, &parsed.from).map_err(|e| format!("from: {e}"))?;
    let dst = resolve_endpoint(engine, &parsed.to).map_err(|e| format!("to: {e}"))?;
    let port = match &parsed.port {
        PortField::Number(n) => *n,
        PortField::Name(name) => resolve_port(&dst, name, protocol).map_err(|e| e.to_string())?,
    };
    Ok((
        parsed,
        FlowQuery {
            src,
            dst,
            protocol,
            port,
        },
    ))
}

/// The batch form of `explain` over any reader: one JSON object per non-blank input line,
/// in order; an invalid line yields `{"line":N,"error":"..."}` and the run goes on. Lines are
/// numbered from 1; blank lines are skipped.
pub fn explain_batch(
    engine: &Engine,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<u8, VerdictError> {
    let mut bad = false;
    let mut buf = String::new();
    let mut n = 0usize;
    loop {
        buf.clear();
        let read = input.read_line(&mut buf).map_err(io_err("reading flows"))?;
        if read == 0 {
            break;
        }
        n += 1;
        let line = buf.trim();
        if line.is_empty() {
            continue;
        }
        let json = match answer_line(engine, line) {
            Ok((parsed, flow)) => {
                let v = engine.evaluate(&flow);
                serde_json::to_string(&FlowAnswer {
                    line: n,
                    from: &parsed.from,
                    to: &parsed.to,
                    protocol: flow.protocol,
                    port: flow.port,
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
    let inv = match crate::inventory::load_dir(&args.inventory) {
        Ok(inv) => inv,
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
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in &rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
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
                Some(src) => writeln!(out, "  {} {} ({src}):", o.kind, o.id())?,
                None => writeln!(out, "  {} {}:", o.kind, o.id())?,
            }
            for e in &o.errors {
                writeln!(out, "    {e}")?;
            }
        }
    }
    Ok(())
}
