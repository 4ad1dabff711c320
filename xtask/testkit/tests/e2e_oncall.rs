//! The on-call path on real parts: the daemon from `DENY_OBSERVER_BIN` on a simulated node, a
//! real Prometheus with the shipped rules (every `for:` shortened) and Alertmanager, then:
//!
//! 1. **Warm-up**: a deny flood that starts while the daemon's detector is warming up makes the
//!    spike rule's cluster-wide condition (rate > 1/s and > 4x the summed baseline) true in
//!    Prometheus, yet `DenyObserverDenySpike` is never pending or firing before
//!    `deny_observer_deny_baseline_ready` says the warm-up is over. A bigger flood after it pages.
//! 2. **Annotations**: every alert that fires on this traffic (spike, new denied edge,
//!    unexplained drops, namespace without policy) has its templates rendered by Prometheus with
//!    the fired alert's labels; none falls back to "unknown"/"no baseline"/`<no value>`, the
//!    spike names its top port, and every `dashboard_url`/`runbook_url` points where it should.
//!    `DenyObserverEventsLost` cannot fire on healthy traffic; its templates are covered by
//!    deploy/prometheus/tests/health_and_audit.yaml (promtool).
//! 3. **Dashboard**: every panel query and variable query of deploy/grafana/deny-observer.json
//!    is evaluated through Prometheus' HTTP API with the variables substituted, once with "All"
//!    and once narrowed to the flooded workload on this node. A query that returns nothing
//!    fails the test unless [`EXPECTED_EMPTY`] lists it with the reason; narrowed results must
//!    only hold the selected namespace/workload/node.
//! 4. **explain**: the page's workload, peer and top port, given to `deny-observer explain`,
//!    give DENY (exit 1) by the policy the alert named.
//! 5. **Logs**: with `--log-format json` (as the DaemonSet runs) and stderr not a terminal,
//!    every line of the daemon's log is a JSON object without ANSI colour codes.
//! 6. **Down**: the daemon is killed (as a crash or an OOM kill would); `DenyObserverDown`
//!    reaches Alertmanager's receiver naming the target, with its rendered annotations.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::flood;
use testkit::manifests::{self, Owner, PodMeta};
use testkit::promstack::{self, PromStack, StackConfig, render_rules};
use testkit::simnode::{Enforcement, Proto, SimNode};
use testkit::webhook::Webhook;
use testkit::workspace_root;

const APP_NS: &str = "oncall-app";
/// A namespace without any NetworkPolicy whose pod the simulated CNI still drops: its drops
/// are "unexplained", and it is an open namespace.
const OPEN_NS: &str = "oncall-open";
const NODE: &str = "oncall-node";
const FLOODED: &str = "api";
const POLICY: &str = "default-deny-ingress";
/// The flood goes to the port api declares; the background to another one, so the top port
/// has to move to the flood's.
const FLOOD_PORT: u16 = 8080;
const BACKGROUND_PORT: u16 = 9000;
const CACHE_PORT: u16 = 6379;
const WARMUP_SECS: u64 = 45;
/// The daemon's detector settings: seconds instead of minutes.
const DAEMON_ARGS: &[&str] = &[
    "--spike-warmup",
    "45",
    "--spike-for",
    "3",
    "--spike-rate-window",
    "2",
    "--spike-floor",
    "5",
    "--spike-cool-down",
    "5",
    "--baseline-half-life",
    "60",
    "--node-name",
    NODE,
    // As the DaemonSet runs it: every log line is one JSON object, without colour codes.
    "--log-format",
    "json",
];
/// Short enough that the ungated cluster-wide path, true for several seconds during the
/// warm-up, would have fired.
const RULES_FOR: &str = "2s";
const BACKGROUND_PPS: u64 = 2;
/// The first flood, during the warm-up, a third of the way before its end.
const EARLY_FLOOD_PPS: u64 = 300;
const EARLY_FLOOD_AT: Duration = Duration::from_secs(30);
/// The flood after the warm-up that must page.
const FLOOD_PPS: u64 = 2000;
const CACHE_PPS: u64 = 5;
const ALERT_BOUND: Duration = Duration::from_secs(60);

/// Panels (title, query refId) that may return nothing on this traffic, per variable set
/// ("all" or "narrowed"), with the reason. Reviewed: anything else that is empty fails.
const EXPECTED_EMPTY: &[(&str, &str, &str, &str)] = &[
    (
        "Baselines still warming up",
        "A",
        "*",
        "the queries run after every daemon's warm-up has ended",
    ),
    (
        "Inventory reloads and watch errors",
        "B",
        "*",
        "the inventory is a manifest directory: there is no API-server watch to fail",
    ),
    (
        "Unexplained drops",
        "A",
        "narrowed",
        "the unexplained drops are the open namespace's, not the selected workload's",
    ),
    (
        "Namespaces without NetworkPolicy",
        "A",
        "narrowed",
        "the selected namespace has a NetworkPolicy",
    ),
    (
        "Deny rate by denied workload",
        "B",
        "narrowed",
        "the selected workload (api) sends nothing, so it has no egress denies",
    ),
];

fn scalar(result: &Value) -> Option<f64> {
    result[0]["value"][1].as_str().and_then(|v| v.parse().ok())
}

/// Grafana's variables and macros for one evaluation.
struct VarSet {
    name: &'static str,
    vars: Vec<(&'static str, String)>,
}

impl VarSet {
    fn apply(&self, query: &str) -> String {
        let mut q = query
            .replace("$__rate_interval", "15s")
            .replace("$__range", "5m")
            .replace("$__interval", "5s");
        // Longest names first: $namespace must not be cut by a shorter prefix.
        let mut vars: Vec<_> = self.vars.iter().collect();
        vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        for (k, v) in vars {
            q = q
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        q
    }
}

/// Whether one result series stays within what the narrowed variables select.
fn within_selection(metric: &Value) -> Result<(), String> {
    let get = |k: &str| metric[k].as_str();
    if let Some(n) = get("node")
        && n != NODE
    {
        return Err(format!("node {n}"));
    }
    if let Some(ns) = get("workload_namespace")
        && (ns != APP_NS || get("workload").is_some_and(|w| w != FLOODED))
    {
        return Err(format!("workload {ns}/{:?}", get("workload")));
    }
    if let Some(ns) = get("target_namespace")
        && ns != APP_NS
    {
        return Err(format!("target_namespace {ns}"));
    }
    if let (Some(src), Some(dst)) = (get("source_namespace"), get("destination_namespace")) {
        let side = |ns: Option<&str>, wl: Option<&str>| ns == Some(APP_NS) && wl == Some(FLOODED);
        let ok = match get("direction") {
            Some("ingress") => side(Some(dst), get("destination_workload")),
            Some("egress") => side(Some(src), get("source_workload")),
            _ => {
                side(Some(dst), get("destination_workload"))
                    || side(Some(src), get("source_workload"))
            }
        };
        if !ok {
            return Err(format!("edge {src} -> {dst}"));
        }
    }
    Ok(())
}

fn fail(what: String, daemon: &Daemon, stack: &PromStack) -> ! {
    panic!(
        "{what}\n=== Prometheus ===\n{}\n=== daemon log ===\n{}",
        stack.report(),
        daemon.log_tail()
    )
}

#[test]
fn page_to_dashboard_to_explain() {
    if !testkit::privileged("page_to_dashboard_to_explain") {
        return;
    }
    let bin = testkit::daemon_bin();
    promstack::require_binaries();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();
    let root = workspace_root();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/deny-observer.json")).unwrap(),
    )
    .unwrap();

    let mut node = SimNode::new().expect("simulated node");
    let pods = [
        (
            APP_NS,
            "client-5d4f8c7b9-w8xkq",
            PodMeta::app(
                "client",
                Owner::Deployment {
                    name: "client".into(),
                    hash: "5d4f8c7b9".into(),
                },
            ),
        ),
        (
            APP_NS,
            "api-6c9f8b7d4-k2x9z",
            PodMeta::app(
                FLOODED,
                Owner::Deployment {
                    name: FLOODED.into(),
                    hash: "6c9f8b7d4".into(),
                },
            )
            .port("http", FLOOD_PORT, Proto::Udp),
        ),
        (
            APP_NS,
            "batch-7b8c9d6f5-q4r7t",
            PodMeta::app(
                "batch",
                Owner::Deployment {
                    name: "batch".into(),
                    hash: "7b8c9d6f5".into(),
                },
            ),
        ),
        (
            OPEN_NS,
            "cache-0",
            PodMeta::app("cache", Owner::StatefulSet("cache".into())).port(
                "redis",
                CACHE_PORT,
                Proto::Udp,
            ),
        ),
    ];
    let mut metas = Vec::new();
    for (ns, name, meta) in pods {
        node.add_pod(ns, name).unwrap();
        metas.push(meta);
    }
    let (client, api, batch, cache) = (0, 1, 2, 3);
    let mut enforcement = Enforcement::default();
    enforcement.ingress_isolated.insert(api);
    // No NetworkPolicy selects cache: the node drops what the policies allow.
    enforcement.ingress_isolated.insert(cache);
    // batch may send nothing: its egress denies fill the egress side of the dashboard.
    enforcement.egress_isolated.insert(batch);
    node.enforce(&enforcement).unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(
        &inventory,
        node.pods(),
        &metas,
        NODE,
        vec![
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": POLICY, "namespace": APP_NS},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
            }),
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "batch-deny-egress", "namespace": APP_NS},
                "spec": {"podSelector": {"matchLabels": {"app": "batch"}}, "policyTypes": ["Egress"]},
            }),
        ],
    )
    .unwrap();

    let to = |id, port| SocketAddr::new(node.pod(id).unwrap().ip(false), port);
    let background_pps = AtomicU64::new(BACKGROUND_PPS);
    let flood_pps = AtomicU64::new(0);
    let cache_pps = AtomicU64::new(CACHE_PPS);
    let batch_pps = AtomicU64::new(CACHE_PPS);
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        s.spawn(|| {
            flood::paced_udp(
                &node,
                client,
                to(api, BACKGROUND_PORT),
                &background_pps,
                FLOOD_PPS,
                &stop,
            )
            .unwrap_or_else(|e| panic!("{e:#}"))
        });
        s.spawn(|| {
            flood::paced_udp(
                &node,
                client,
                to(api, FLOOD_PORT),
                &flood_pps,
                FLOOD_PPS,
                &stop,
            )
            .unwrap_or_else(|e| panic!("{e:#}"))
        });
        s.spawn(|| {
            flood::paced_udp(
                &node,
                client,
                to(cache, CACHE_PORT),
                &cache_pps,
                FLOOD_PPS,
                &stop,
            )
            .unwrap_or_else(|e| panic!("{e:#}"))
        });
        s.spawn(|| {
            flood::paced_udp(
                &node,
                batch,
                to(cache, CACHE_PORT),
                &batch_pps,
                FLOOD_PPS,
                &stop,
            )
            .unwrap_or_else(|e| panic!("{e:#}"))
        });
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(&stop);

        let mut daemon = Daemon::start_with_args(
            &bin,
            &inventory,
            free_loopback_addr().unwrap(),
            work.path().join("daemon.log"),
            DAEMON_ARGS,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        daemon
            .wait_ready(Duration::from_secs(60), || false)
            .unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let rules = work.path().join("rules.yaml");
        render_rules(
            &root.join("deploy/prometheus/rules.yaml"),
            &rules,
            RULES_FOR,
        );
        let mut stack = PromStack::start(
            &StackConfig {
                job: "deny-observer".into(),
                targets: vec![daemon.addr()],
                rule_files: vec![rules],
            },
            Webhook::start().unwrap(),
        );
        let key =
            format!(r#"direction="ingress",workload_namespace="{APP_NS}",workload="{FLOODED}""#);
        let ungated = format!(
            "(workload:deny_observer_deny_rate:sum{{{key}}} > 1 and workload:deny_observer_deny_rate:sum{{{key}}} > 4 * workload:deny_observer_deny_rate_baseline:sum{{{key}}})"
        );
        let spike_alerts = |stack: &PromStack| -> Vec<Value> {
            stack
                .prometheus_alerts()
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a["labels"]["alertname"] == "DenyObserverDenySpike")
                .collect()
        };

        // Phase 1: the warm-up. The early flood makes the ungated cluster-wide path true.
        let mut ungated_while_warming = 0;
        let mut timeline = Vec::new();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
            stack.check_alive();
            if started.elapsed() >= EARLY_FLOOD_AT && flood_pps.load(Ordering::SeqCst) == 0 {
                flood_pps.store(EARLY_FLOOD_PPS, Ordering::SeqCst);
            }
            let ready = stack
                .query(&format!(
                    "workload:deny_observer_deny_baseline_ready:min{{{key}}}"
                ))
                .ok()
                .and_then(|r| scalar(&r));
            let cond = stack
                .query(&ungated)
                .map(|r| !r[0].is_null())
                .unwrap_or(false);
            let alerts = spike_alerts(&stack);
            timeline.push(format!(
                "{:5.1}s ready={ready:?} ungated={cond} spike_alerts={}",
                started.elapsed().as_secs_f64(),
                alerts.len()
            ));
            if ready == Some(1.0) {
                break;
            }
            if cond {
                ungated_while_warming += 1;
            }
            if !alerts.is_empty() {
                fail(
                    format!(
                        "DenyObserverDenySpike went {} during the daemon's warm-up: {alerts:?}\n{}",
                        alerts[0]["state"],
                        timeline.join("\n")
                    ),
                    &daemon,
                    &stack,
                );
            }
            if started.elapsed() > Duration::from_secs(WARMUP_SECS + 30) {
                fail(
                    format!(
                        "deny_observer_deny_baseline_ready never became 1\n{}",
                        timeline.join("\n")
                    ),
                    &daemon,
                    &stack,
                );
            }
        }
        assert!(
            started.elapsed() >= Duration::from_secs(WARMUP_SECS - 2),
            "baseline ready after {:?}, before the {WARMUP_SECS} s warm-up\n{}",
            started.elapsed(),
            timeline.join("\n")
        );
        // Without this the quiet above proves nothing: the rule's other conditions held.
        assert!(
            ungated_while_warming >= 3,
            "the early flood made the ungated cluster-wide spike condition true in only \
             {ungated_while_warming} samples of the warm-up: this run proves nothing\n{}",
            timeline.join("\n")
        );
        eprintln!("{}", timeline.join("\n"));

        // Phase 2: a flood after the warm-up pages, with every other alert of this traffic.
        flood_pps.store(FLOOD_PPS, Ordering::SeqCst);
        let flood_at = Instant::now();
        let wanted = [
            "DenyObserverDenySpike",
            "DenyObserverNewDeniedEdge",
            "DenyObserverUnexplainedDrops",
            "DenyObserverNamespaceWithoutPolicy",
        ];
        let firing = loop {
            std::thread::sleep(Duration::from_secs(1));
            daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
            stack.check_alive();
            let alerts: Vec<Value> = stack
                .prometheus_alerts()
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a["state"] == "firing")
                .collect();
            let names: BTreeSet<&str> = alerts
                .iter()
                .filter_map(|a| a["labels"]["alertname"].as_str())
                .collect();
            if wanted.iter().all(|w| names.contains(w)) {
                break alerts;
            }
            if flood_at.elapsed() > ALERT_BOUND {
                fail(
                    format!(
                        "within {ALERT_BOUND:?} of the flood only {names:?} fired, wanted {wanted:?}"
                    ),
                    &daemon,
                    &stack,
                );
            }
        };
        eprintln!(
            "all of {wanted:?} firing {:?} after the post-warm-up flood",
            flood_at.elapsed()
        );

        // Annotations, as Prometheus rendered them with each fired alert's labels.
        let mut problems = Vec::new();
        for alert in &firing {
            let name = alert["labels"]["alertname"].as_str().unwrap_or("?");
            let labels = &alert["labels"];
            let ann = &alert["annotations"];
            for key in ["summary", "description", "runbook_url", "dashboard_url"] {
                let text = ann[key].as_str().unwrap_or_default();
                // The templates' fallbacks when a query they run returns nothing.
                if text.is_empty()
                    || text.contains("<no value>")
                    || text.contains("policy unknown")
                    || text.contains("no baseline yet")
                {
                    problems.push(format!("{name} {labels}: {key} = {text:?}"));
                }
            }
            let runbook = ann["runbook_url"].as_str().unwrap_or_default();
            if !runbook.ends_with(&format!("/docs/runbooks/{name}.md"))
                || !root.join(format!("docs/runbooks/{name}.md")).is_file()
            {
                problems.push(format!("{name}: runbook_url {runbook}"));
            }
            let dash = ann["dashboard_url"].as_str().unwrap_or_default();
            let uid = dashboard["uid"].as_str().unwrap_or_default();
            if !dash.contains(&format!("/d/{uid}/")) {
                problems.push(format!(
                    "{name}: dashboard_url {dash} does not open /d/{uid}/"
                ));
            }
            // The denied workload's side: the source for egress, else the destination.
            let edge_side = if labels["direction"] == "egress" {
                labels["source_namespace"].as_str()
            } else {
                labels["destination_namespace"].as_str()
            };
            let want_ns = labels["workload_namespace"]
                .as_str()
                .or(labels["target_namespace"].as_str())
                .or(edge_side);
            if let Some(ns) = want_ns
                && !dash.contains(&format!("var-namespace={ns}"))
            {
                problems.push(format!(
                    "{name}: dashboard_url {dash} lacks var-namespace={ns}"
                ));
            }
        }
        let spike = firing
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "DenyObserverDenySpike"
                    && a["labels"]["workload"] == FLOODED
            })
            .unwrap_or_else(|| {
                fail(
                    format!("no spike alert for {FLOODED}: {firing:?}"),
                    &daemon,
                    &stack,
                )
            });
        let summary = spike["annotations"]["summary"].as_str().unwrap_or_default();
        let description = spike["annotations"]["description"]
            .as_str()
            .unwrap_or_default();
        for want in [
            format!("{APP_NS}/{FLOODED}"),
            format!("{APP_NS}/client"),
            format!("{APP_NS}/{POLICY}"),
            format!("top port UDP/{FLOOD_PORT}"),
        ] {
            if !summary.contains(&want) {
                problems.push(format!("spike summary {summary:?} lacks {want:?}"));
            }
        }
        let command = format!(
            "--from {APP_NS}/client --to {APP_NS}/{FLOODED} --port {FLOOD_PORT} --protocol udp"
        );
        if !description.contains(&command) {
            problems.push(format!(
                "spike description {description:?} lacks {command:?}"
            ));
        }
        for alert in &firing {
            eprintln!(
                "fired: {} {}\n  summary: {}\n  description: {}\n  dashboard_url: {}\n  runbook_url: {}",
                alert["labels"]["alertname"],
                alert["labels"],
                alert["annotations"]["summary"],
                alert["annotations"]["description"],
                alert["annotations"]["dashboard_url"],
                alert["annotations"]["runbook_url"],
            );
        }

        // Every dashboard query, twice.
        let sets = [
            VarSet {
                name: "all",
                vars: vec![
                    ("datasource", "prometheus".into()),
                    ("job", "deny-observer".into()),
                    ("node", ".*".into()),
                    ("namespace", ".*".into()),
                    ("workload", ".*".into()),
                ],
            },
            VarSet {
                name: "narrowed",
                vars: vec![
                    ("datasource", "prometheus".into()),
                    ("job", "deny-observer".into()),
                    ("node", NODE.into()),
                    ("namespace", APP_NS.into()),
                    ("workload", FLOODED.into()),
                ],
            },
        ];
        let mut evaluated = 0;
        for set in &sets {
            for panel in dashboard["panels"].as_array().unwrap() {
                if panel["type"] == "row" {
                    continue;
                }
                let title = panel["title"].as_str().unwrap_or("?");
                for target in panel["targets"].as_array().unwrap() {
                    let refid = target["refId"].as_str().unwrap_or("?");
                    let expr = set.apply(target["expr"].as_str().unwrap_or_default());
                    evaluated += 1;
                    let result = match stack.query(&expr) {
                        Ok(r) => r,
                        Err(e) => {
                            problems
                                .push(format!("[{}] {title}/{refid}: query failed: {e}", set.name));
                            continue;
                        }
                    };
                    let rows = result.as_array().cloned().unwrap_or_default();
                    let allowed = EXPECTED_EMPTY.iter().find(|(t, r, s, _)| {
                        *t == title && *r == refid && (*s == "*" || *s == set.name)
                    });
                    if rows.is_empty() {
                        if allowed.is_none() {
                            problems.push(format!(
                                "[{}] panel {title:?} query {refid} returned nothing:\n{expr}",
                                set.name
                            ));
                        }
                        continue;
                    }
                    if let Some((_, _, _, why)) = allowed {
                        eprintln!(
                            "note: [{}] {title}/{refid} is allow-listed as empty ({why}) but returned {} series",
                            set.name,
                            rows.len()
                        );
                    }
                    if set.name == "narrowed" {
                        for row in &rows {
                            if let Err(what) = within_selection(&row["metric"]) {
                                problems.push(format!(
                                    "[narrowed] panel {title:?} query {refid} shows {what} outside the selection: {}",
                                    row["metric"]
                                ));
                            }
                        }
                    }
                }
            }
            // Variable queries: each must offer the values this traffic has.
            for var in dashboard["templating"]["list"].as_array().unwrap() {
                let Some(def) = var["definition"].as_str() else {
                    continue;
                };
                let def = set.apply(def);
                let (expr, label) = if let Some(inner) = def.strip_prefix("query_result(") {
                    let regex = var["regex"].as_str().unwrap_or_default();
                    let label = regex
                        .trim_start_matches('/')
                        .split("=\"")
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    (inner.trim_end().trim_end_matches(')').to_owned(), label)
                } else if let Some(inner) = def.strip_prefix("label_values(") {
                    let inner = inner.trim_end().trim_end_matches(')');
                    let (metric, label) = inner.rsplit_once(',').unwrap();
                    (metric.trim().to_owned(), label.trim().to_owned())
                } else {
                    continue;
                };
                let values: BTreeSet<String> = stack
                    .query(&expr)
                    .ok()
                    .and_then(|r| r.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| r["metric"][&label].as_str().map(str::to_owned))
                    .collect();
                let name = var["name"].as_str().unwrap_or("?");
                let want: &[&str] = match (name, set.name) {
                    ("job", _) => &["deny-observer"],
                    ("node", _) => &[NODE],
                    ("namespace", _) => &[APP_NS, OPEN_NS],
                    ("workload", "narrowed") => &[FLOODED, "client"],
                    ("workload", _) => &[FLOODED, "client", "cache"],
                    _ => &[],
                };
                for w in want {
                    if !values.contains(*w) {
                        problems.push(format!(
                            "[{}] variable {name} offers {values:?}, not {w}",
                            set.name
                        ));
                    }
                }
            }
        }
        assert!(
            evaluated >= 40,
            "only {evaluated} dashboard queries evaluated"
        );

        // From the page to explain: the alert's workload, peer and top port.
        let out = std::process::Command::new(&bin)
            .args(["explain", "--inventory"])
            .arg(&inventory)
            .args(command.split(' '))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("$ deny-observer explain --inventory <dir> {command}\n{stdout}");
        if out.status.code() != Some(1)
            || !stdout.starts_with("verdict: DENY")
            || !stdout.contains(&format!("{APP_NS}/{POLICY}"))
        {
            problems.push(format!(
                "explain {command}: status {:?}, output:\n{stdout}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }

        // The log as `kubectl logs` would show it.
        let log = std::fs::read_to_string(daemon.log()).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            problems.push("the daemon logged nothing".to_owned());
        }
        for line in &lines {
            if line.contains('\u{1b}') || serde_json::from_str::<Value>(line).is_err() {
                problems.push(format!("daemon log line is not plain JSON: {line:?}"));
                break;
            }
        }
        if !problems.is_empty() {
            fail(
                format!("{} problem(s):\n{}", problems.len(), problems.join("\n")),
                &daemon,
                &stack,
            );
        }

        // Phase 6: the daemon dies without a word; the page for it reaches the receiver.
        let target = daemon.addr().to_string();
        let down = |a: &testkit::webhook::ReceivedAlert| {
            a.name() == "DenyObserverDown"
                && a.status == "firing"
                && a.labels.get("instance") == Some(&target)
        };
        if let Some(early) = stack.webhook().alerts().into_iter().find(|a| down(a)) {
            fail(
                format!("DenyObserverDown fired while the daemon ran: {early:?}"),
                &daemon,
                &stack,
            );
        }
        daemon.signal(libc::SIGKILL).unwrap();
        assert!(daemon.wait_exit(Duration::from_secs(10)).is_some());
        let killed = Instant::now();
        let Some(page) = stack.webhook().wait_for(Duration::from_secs(60), down) else {
            fail(
                "DenyObserverDown did not reach the receiver within 60 s of the kill".into(),
                &daemon,
                &stack,
            );
        };
        eprintln!(
            "DenyObserverDown reached the receiver {:.1} s after the kill: {:?}",
            killed.elapsed().as_secs_f64(),
            page.annotations
        );
        assert_eq!(
            page.annotations.get("summary").map(String::as_str),
            Some(format!("deny-observer target {target} is down").as_str())
        );
        assert_eq!(
            page.annotations.get("runbook_url").map(String::as_str),
            Some(
                "https://github.com/deny-observer/deny-observer/blob/main/docs/runbooks/DenyObserverDown.md"
            )
        );
        stop.store(true, Ordering::SeqCst);
    });
}
