//! `cargo xtask demo`: a simulated node with a small shop, NetworkPolicies enforced by
//! nftables, the real daemon watching it, and a live table of what is denied.
//!
//! The policies are the files in `deploy/examples/`; the demo asks the daemon's own
//! `explain --flows -` what they allow, so editing a policy changes what the demo enforces.
//! Tool code at the binary's edge: errors are anyhow.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::json;

use crate::daemon::Daemon;
use crate::manifests::{self, Owner, PodMeta};
use crate::metrics::{self, Metrics};
use crate::simnode::{
    self, EGRESS_DROP_COUNTER, Enforcement, INGRESS_DROP_COUNTER, Listener, PodId, Proto, Rule,
    SimNode,
};

/// Options of `cargo xtask demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The daemon binary (`target/release/deny-observer`).
    pub bin: PathBuf,
    /// Workspace root (policies are read from `deploy/examples/`).
    pub root: PathBuf,
    /// Where the daemon serves /metrics.
    pub metrics_addr: SocketAddr,
    /// Stop after this long; `None` runs until Ctrl-C.
    pub duration: Option<Duration>,
}

/// Kubernetes namespace and pod name, and its Kubernetes side, of each demo pod.
pub fn demo_pods() -> Vec<(&'static str, &'static str, PodMeta)> {
    let deploy = |name: &str, hash: &str| Owner::Deployment {
        name: name.to_owned(),
        hash: hash.to_owned(),
    };
    vec![
        (
            "shop",
            "frontend-6c9f8d7b4-x2vqk",
            PodMeta::app("frontend", deploy("frontend", "6c9f8d7b4")).port("http", 80, Proto::Tcp),
        ),
        (
            "shop",
            "frontend-6c9f8d7b4-p8dzm",
            PodMeta::app("frontend", deploy("frontend", "6c9f8d7b4")).port("http", 80, Proto::Tcp),
        ),
        (
            "shop",
            "api-5d8f7c9d6-h4kwt",
            PodMeta::app("api", deploy("api", "5d8f7c9d6"))
                .port("http", 8080, Proto::Tcp)
                .port("gossip", 7946, Proto::Udp),
        ),
        (
            "shop",
            "db-0",
            PodMeta::app("db", Owner::StatefulSet("db".to_owned())).port(
                "postgres",
                5432,
                Proto::Tcp,
            ),
        ),
        (
            "tools",
            "scanner-29xq7",
            PodMeta::app("scanner", Owner::Job("scanner".to_owned())),
        ),
    ]
}

/// A flow the demo drives: every pod to every container port of every other pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Source pod.
    pub from: PodId,
    /// Destination pod.
    pub to: PodId,
    /// Protocol.
    pub protocol: Proto,
    /// Destination port.
    pub port: u16,
}

/// What the policies say about a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied at the source's egress.
    DenyEgress,
    /// Allowed out of the source, denied at the destination's ingress.
    DenyIngress,
}

/// Every flow between the pods of `node`: each pod to each container port of each other pod
/// (`metas` are the pods' Kubernetes sides, indexed like the node's pods).
pub fn flows(node: &SimNode, metas: &[PodMeta]) -> Vec<Flow> {
    let mut out = Vec::new();
    for from in 0..node.pods().len() {
        for (to, meta) in metas.iter().enumerate() {
            if from == to {
                continue;
            }
            for (_, port, protocol) in &meta.ports {
                out.push(Flow {
                    from,
                    to,
                    protocol: *protocol,
                    port: *port,
                });
            }
        }
    }
    out
}

/// The daemon's answer for one flow, from `explain --flows -`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explained {
    /// Allow, or deny and where.
    pub verdict: Verdict,
    /// The isolating policies of the deciding side, as `ns/name` (empty for an allow).
    pub policies: Vec<String>,
    /// The `policy` label value the daemon puts on `deny_observer_policy_denies_total`.
    pub policy_label: String,
}

/// Asks `deny-observer explain --inventory <dir> --flows -` about every flow, in order.
pub fn explain(
    bin: &Path,
    inventory: &Path,
    node: &SimNode,
    flows: &[Flow],
) -> anyhow::Result<Vec<Explained>> {
    let mut input = String::new();
    for f in flows {
        let line = json!({
            "from": node.pod(f.from)?.key(),
            "to": node.pod(f.to)?.key(),
            "port": f.port,
            "protocol": f.protocol.k8s(),
        });
        input.push_str(&line.to_string());
        input.push('\n');
    }
    let mut child = Command::new(bin)
        .arg("explain")
        .arg("--inventory")
        .arg(inventory)
        .args(["--flows", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} explain", bin.display()))?;
    // Written from a thread: explain answers as it reads, and a large batch would fill both
    // pipes if we wrote everything before reading.
    let writer = child
        .stdin
        .take()
        .map(|mut stdin| std::thread::spawn(move || stdin.write_all(input.as_bytes())));
    let out = child.wait_with_output()?;
    let written = writer.map(|w| w.join());
    // A binary without `explain --flows` exits before reading: its status and stderr say more
    // than the broken pipe.
    if !out.status.success() {
        bail!(
            "`{} explain --inventory {} --flows -` failed ({}): {}",
            bin.display(),
            inventory.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match written {
        Some(Ok(Ok(()))) | None => {}
        Some(Ok(Err(e))) => return Err(e).context("writing flows to explain"),
        Some(Err(_)) => bail!("the thread writing flows to explain panicked"),
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != flows.len() {
        bail!(
            "explain answered {} lines for {} flows",
            lines.len(),
            flows.len()
        );
    }
    lines
        .iter()
        .zip(flows)
        .map(|(line, f)| {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("explain output {line:?}"))?;
            let verdict = match (v["verdict"].as_str(), v["direction"].as_str()) {
                (Some("allow"), _) => Verdict::Allow,
                (Some("deny"), Some("egress")) => Verdict::DenyEgress,
                (Some("deny"), Some("ingress")) => Verdict::DenyIngress,
                _ => bail!("explain gave {line} for {f:?}"),
            };
            let policies = v["policies"]
                .as_array()
                .ok_or_else(|| anyhow!("explain gave no `policies` array in {line}"))?
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| anyhow!("non-string policy in {line}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let policy_label = v["policy_label"].as_str().unwrap_or_default().to_owned();
            Ok(Explained {
                verdict,
                policies,
                policy_label,
            })
        })
        .collect()
}

/// The verdict of every flow, from [`explain`].
pub fn explain_verdicts(
    bin: &Path,
    inventory: &Path,
    node: &SimNode,
    flows: &[Flow],
) -> anyhow::Result<Vec<Verdict>> {
    Ok(explain(bin, inventory, node, flows)?
        .into_iter()
        .map(|e| e.verdict)
        .collect())
}

/// FALLBACK ONLY, used when the daemon has no working `explain --flows`: what the policies in
/// `deploy/examples/` allow, written by hand. Edits of those files are not reflected here.
pub fn hand_written_verdicts(node: &SimNode, flows: &[Flow]) -> anyhow::Result<Vec<Verdict>> {
    let app = |id: PodId| -> anyhow::Result<String> {
        let pod = node.pod(id)?;
        let name = pod.name.as_str();
        Ok(["frontend", "api", "db", "scanner"]
            .into_iter()
            .find(|a| name.starts_with(a))
            .unwrap_or(name)
            .to_owned())
    };
    flows
        .iter()
        .map(|f| {
            let (src, dst) = (app(f.from)?, app(f.to)?);
            // tools/scanner may only talk to shop/frontend:80 (tools-scanner-egress.yaml).
            if src == "scanner" && !(dst == "frontend" && f.port == 80) {
                return Ok(Verdict::DenyEgress);
            }
            // shop is default-deny for ingress; three policies open it up.
            let allowed = match dst.as_str() {
                "frontend" => f.port == 80 && f.protocol == Proto::Tcp,
                "api" => src == "frontend" && f.port == 8080 && f.protocol == Proto::Tcp,
                "db" => src == "api" && f.port == 5432 && f.protocol == Proto::Tcp,
                _ => true,
            };
            Ok(if allowed {
                Verdict::Allow
            } else {
                Verdict::DenyIngress
            })
        })
        .collect()
}

/// Turns per-flow verdicts into nftables enforcement. A pod is isolated in a direction when a
/// flow is denied there; egress is checked before ingress, so a deny at ingress means the
/// source's egress allowed the flow.
pub fn enforcement(flows: &[Flow], verdicts: &[Verdict]) -> Enforcement {
    let mut e = Enforcement::default();
    for (f, v) in flows.iter().zip(verdicts) {
        let rule = Rule {
            from: f.from,
            to: f.to,
            protocol: f.protocol,
            port: f.port,
        };
        match v {
            Verdict::Allow => {
                e.allow(rule);
            }
            Verdict::DenyIngress => {
                e.ingress_isolated.insert(f.to);
                e.egress_allow.insert(rule);
            }
            Verdict::DenyEgress => {
                e.egress_isolated.insert(f.from);
            }
        }
    }
    e
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Runs the demo until Ctrl-C or the duration ends; everything is removed on the way out.
pub fn run(opts: &DemoOptions) -> anyhow::Result<()> {
    if !crate::cmd::is_root() {
        bail!("the demo creates network namespaces and nftables rules: run it as root");
    }
    install_signal_handlers();
    let removed = simnode::cleanup_stale()?;
    if !removed.is_empty() {
        println!("removed leftovers of an earlier run: {}", removed.join(" "));
    }

    let mut node = SimNode::new()?;
    let specs = demo_pods();
    let mut metas = Vec::new();
    for (ns, name, meta) in specs {
        node.add_pod(ns, name)?;
        metas.push(meta);
    }
    println!(
        "simulated node: bridge {} ({}, {}), {} pods",
        node.bridge(),
        node.subnet_v4(),
        node.subnet_v6(),
        node.pods().len()
    );

    let work = tempfile::Builder::new()
        .prefix("deny-observer-demo-")
        .tempdir()?;
    let inventory = work.path().join("inventory");
    std::fs::create_dir(&inventory)?;
    write_inventory(&opts.root, &inventory, &node, &metas)?;
    println!("inventory: {}", inventory.display());

    let flows = flows(&node, &metas);
    let (explained, fallback) = match explain(&opts.bin, &inventory, &node, &flows) {
        Ok(v) => {
            println!("verdicts: from `deny-observer explain --flows -` on deploy/examples/*.yaml");
            (v, None)
        }
        Err(e) => {
            let warning = format!(
                "WARNING: `deny-observer explain --flows -` failed: {e:#}\n\
                 WARNING: the demo enforces its HAND-WRITTEN allow list instead; it matches \
                 deploy/examples/ as shipped, not your edits, and the daemon's labels may \
                 disagree with what is enforced"
            );
            eprintln!("{warning}");
            let explained = hand_written_verdicts(&node, &flows)?
                .into_iter()
                .map(|verdict| Explained {
                    verdict,
                    policies: Vec::new(),
                    policy_label: String::new(),
                })
                .collect();
            (explained, Some(warning))
        }
    };
    let verdicts: Vec<Verdict> = explained.iter().map(|e| e.verdict.clone()).collect();
    let policy = enforcement(&flows, &verdicts);
    node.enforce(&policy)?;
    let firewalled = outside_firewall(&node, &flows, &verdicts)?;
    for (i, (f, e)) in flows.iter().zip(&explained).enumerate() {
        let why = if Some(i) == firewalled {
            "  + dropped by a firewall outside Kubernetes (expect match=unexplained)".to_owned()
        } else if e.policies.is_empty() {
            String::new()
        } else {
            format!("  by {}", e.policies.join(","))
        };
        println!(
            "  {:<34} -> {:<30} {}/{:<5} {:?}{why}",
            node.pod(f.from)?.key(),
            node.pod(f.to)?.key(),
            f.protocol,
            f.port,
            e.verdict
        );
    }

    let mut listeners: Vec<Listener> = Vec::new();
    for (id, meta) in metas.iter().enumerate() {
        for (_, port, proto) in &meta.ports {
            listeners.push(node.listen(id, *proto, *port)?);
        }
    }

    let mut daemon = Daemon::start(
        &opts.bin,
        &inventory,
        opts.metrics_addr,
        work.path().join("deny-observer.log"),
    )?;
    println!("daemon log: {}", daemon.log().display());
    daemon.wait_ready(Duration::from_secs(60), || STOP.load(Ordering::SeqCst))?;
    println!(
        "deny-observer is ready: http://{}/metrics (also /healthz, /readyz). Ctrl-C stops and \
         cleans up.",
        opts.metrics_addr
    );

    let started = Instant::now();
    let mut tick: u64 = 0;
    let mut sent: BTreeMap<(String, String, Proto), u64> = BTreeMap::new();
    let tty = std::io::stdout().is_terminal();
    while !STOP.load(Ordering::SeqCst) && opts.duration.is_none_or(|d| started.elapsed() < d) {
        daemon.check_alive()?;
        let v6 = tick % 2 == 1;
        for (i, (f, v)) in flows.iter().zip(&verdicts).enumerate() {
            let to = SocketAddr::new(node.pod(f.to)?.ip(v6), f.port);
            let (src, dst) = (
                workload(&node, &metas, f.from)?,
                workload(&node, &metas, f.to)?,
            );
            let v = if Some(i) == firewalled {
                &Verdict::DenyIngress
            } else {
                v
            };
            match (v, f.protocol) {
                (Verdict::Allow, Proto::Tcp) => node.tcp_exchange(f.from, to)?,
                (Verdict::Allow, Proto::Udp) => {
                    node.send_udp(f.from, to, 3)?;
                }
                (_, proto) => {
                    // A few packets per denied flow, varied so the table is not uniform.
                    let n = 1 + (i as u64 + tick) % 3;
                    match proto {
                        Proto::Tcp => node.send_tcp_syns(f.from, to, n)?,
                        Proto::Udp => node.send_udp(f.from, to, n)?,
                    };
                    *sent.entry((src, dst, proto)).or_default() += n;
                }
            }
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(1000));
        if tick.is_multiple_of(2) || STOP.load(Ordering::SeqCst) {
            let m = metrics::scrape(opts.metrics_addr).unwrap_or_default();
            if tty {
                print!("\x1b[2J\x1b[H");
            }
            if let Some(w) = &fallback {
                println!("{w}");
            }
            print_table(
                &m,
                &sent,
                &node,
                &policy,
                opts.metrics_addr,
                started.elapsed(),
            )?;
        }
    }
    println!("stopping: removing the daemon, pods, bridge and nftables rules");
    drop(daemon);
    drop(listeners);
    drop(node);
    Ok(())
}

/// nft table of the demo's firewall outside Kubernetes.
const OUTSIDE_FIREWALL: &str = "demo_node_firewall";

/// Drops one flow the policies allow with a separate nft table in its destination pod, the
/// way a host firewall nobody told Kubernetes about would: the daemon must call those drops
/// `unexplained`. Picks an allowed TCP flow into a pod that another pod of the same workload
/// also serves, so the workload keeps working. Returns the flow's index.
fn outside_firewall(
    node: &SimNode,
    flows: &[Flow],
    verdicts: &[Verdict],
) -> anyhow::Result<Option<usize>> {
    let pick = flows.iter().zip(verdicts).position(|(f, v)| {
        *v == Verdict::Allow
            && f.protocol == Proto::Tcp
            && node.pod(f.from).is_ok_and(|p| p.name.starts_with("db-"))
    });
    let Some(i) = pick else {
        return Ok(None);
    };
    let f = flows[i];
    let src = node.pod(f.from)?;
    node.nft(
        f.to,
        &format!(
            "table inet {OUTSIDE_FIREWALL} {{\n  chain input {{\n    \
             type filter hook input priority -10; policy accept;\n    \
             ip saddr {} tcp dport {port} drop\n    \
             ip6 saddr {} tcp dport {port} drop\n  }}\n}}\n",
            src.ipv4,
            src.ipv6,
            port = f.port
        ),
    )?;
    Ok(Some(i))
}

fn workload(node: &SimNode, metas: &[PodMeta], id: PodId) -> anyhow::Result<String> {
    let pod = node.pod(id)?;
    let meta = metas.get(id).ok_or_else(|| anyhow!("no pod #{id}"))?;
    Ok(format!(
        "{}/{}",
        pod.namespace,
        meta.owner.workload(&pod.name)
    ))
}

fn write_inventory(
    root: &Path,
    dir: &Path,
    node: &SimNode,
    metas: &[PodMeta],
) -> anyhow::Result<()> {
    manifests::write_inventory(dir, node.pods(), metas, "demo-node", Vec::new())?;
    let examples = root.join("deploy/examples");
    let mut copied = 0;
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, dir.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("no NetworkPolicies in {}", examples.display());
    }
    Ok(())
}

fn label<'a>(s: &'a metrics::Sample, k: &str) -> &'a str {
    s.labels.get(k).map(String::as_str).unwrap_or("")
}

fn print_table(
    m: &Metrics,
    sent: &BTreeMap<(String, String, Proto), u64>,
    node: &SimNode,
    policy: &Enforcement,
    addr: SocketAddr,
    elapsed: Duration,
) -> anyhow::Result<()> {
    println!(
        "deny-observer demo — {}s — metrics at http://{addr}/metrics — Ctrl-C to stop",
        elapsed.as_secs()
    );
    println!("\nDENIED BY THE KERNEL  deny_observer_drops_total (reason=netfilter_drop)");
    println!(
        "  {:<22} {:<22} {:<6} {:<9} {:>8} {:>8}",
        "SOURCE", "DESTINATION", "PROTO", "DIRECTION", "OBSERVED", "SENT"
    );
    let mut rows: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for s in m.select("deny_observer_drops_total", &[("reason", "netfilter_drop")]) {
        let src = format!(
            "{}/{}",
            label(s, "source_namespace"),
            label(s, "source_workload")
        );
        let dst = format!(
            "{}/{}",
            label(s, "destination_namespace"),
            label(s, "destination_workload")
        );
        *rows
            .entry((
                src,
                dst,
                label(s, "protocol").to_owned(),
                label(s, "direction").to_owned(),
            ))
            .or_default() += s.value;
    }
    for (src, dst, proto) in sent.keys() {
        let key_match = |k: &(String, String, String, String)| {
            &k.0 == src && &k.1 == dst && k.2 == proto.as_str()
        };
        if !rows.keys().any(key_match) {
            rows.insert(
                (src.clone(), dst.clone(), proto.to_string(), "-".into()),
                0.0,
            );
        }
    }
    for ((src, dst, proto, dir), observed) in &rows {
        let sent_n = [Proto::Tcp, Proto::Udp]
            .into_iter()
            .find(|p| p.as_str() == proto)
            .and_then(|p| sent.get(&(src.clone(), dst.clone(), p)))
            .map_or("-".to_owned(), u64::to_string);
        println!("  {src:<22} {dst:<22} {proto:<6} {dir:<9} {observed:>8} {sent_n:>8}");
    }

    println!("\nBY POLICY  deny_observer_policy_denies_total");
    let mut by_policy: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for s in m.select("deny_observer_policy_denies_total", &[]) {
        let edge = format!(
            "{}/{} -> {}/{} {}",
            label(s, "source_namespace"),
            label(s, "source_workload"),
            label(s, "destination_namespace"),
            label(s, "destination_workload"),
            label(s, "protocol")
        );
        *by_policy
            .entry((
                label(s, "policy").to_owned(),
                label(s, "match").to_owned(),
                label(s, "direction").to_owned(),
                edge,
            ))
            .or_default() += s.value;
    }
    if by_policy.is_empty() {
        println!("  (no series yet)");
    }
    for ((pol, mat, dir, edge), n) in &by_policy {
        let pol = if pol.is_empty() {
            "(no policy denies this: a drop outside Kubernetes)"
        } else {
            pol.as_str()
        };
        println!("  {n:>8}  {edge}  [{mat}, {dir}]  {pol}");
    }

    println!("\nENFORCED (nft drop counters in each pod)");
    for (id, pod) in node.pods().iter().enumerate() {
        let mut parts = Vec::new();
        if policy.ingress_isolated.contains(&id) {
            parts.push(format!(
                "ingress {}",
                node.counter(id, INGRESS_DROP_COUNTER)?.packets
            ));
        }
        if policy.egress_isolated.contains(&id) {
            parts.push(format!(
                "egress {}",
                node.counter(id, EGRESS_DROP_COUNTER)?.packets
            ));
        }
        if !parts.is_empty() {
            println!("  {:<34} {}", pod.key(), parts.join(", "));
        }
    }
    let lost = m.sum("deny_observer_events_lost_total", &[]);
    println!("\nevents lost: {}", lost as u64);
    std::io::stdout().flush()?;
    Ok(())
}
