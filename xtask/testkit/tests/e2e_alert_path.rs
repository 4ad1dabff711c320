//! The real alert path, end to end: a real Prometheus scrapes, evaluates the shipped rules and
//! pages a real Alertmanager, which calls a webhook served by the test.
//!
//! - [`deny_flood_pages_through_prometheus_and_alertmanager`] (privileged): the daemon from
//!   `DENY_OBSERVER_BIN` on a simulated node, scraped by Prometheus with the shipped
//!   `deploy/prometheus/rules.yaml` (every `for:` shortened, see [`render_rules`]). A steady low
//!   deny background must not page; a sudden flood must reach the webhook as
//!   `DenyObserverDenySpike` for the right workload within a bounded time.
//! - `harness_*`: the Prometheus/Alertmanager harness itself (no root needed), with a metric the
//!   test sets and a static rule file. When the end-to-end test fails and these pass, the fault
//!   is in the daemon or the shipped rules, not in the harness.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::flood;
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics;
use testkit::promstack::{self, PromStack, StackConfig, render_rules};
use testkit::simnode::{Enforcement, INGRESS_DROP_COUNTER, Proto, SimNode};
use testkit::webhook::{ReceivedAlert, Webhook};
use testkit::workspace_root;

/// Rules of the harness self-test: one alert that always fires, one that follows a metric the
/// test serves.
const HARNESS_RULES: &str = r#"groups:
  - name: harness
    rules:
      - alert: HarnessAlwaysFiring
        expr: vector(1)
        labels:
          severity: test
      - alert: HarnessProbeHigh
        expr: harness_probe{job="harness"} > 0
        for: 1s
        labels:
          severity: test
        annotations:
          summary: "probe is {{ $value }}"
"#;

/// Scrape → rule → Alertmanager → webhook, and back to resolved, driven by a metric the test
/// serves. Proves the harness before the daemon is involved: when the end-to-end test fails and
/// this passes, the fault is in the daemon or the shipped rules.
#[test]
fn harness_alerts_reach_the_webhook_and_resolve() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("harness-rules.yaml");
    std::fs::write(&rules, HARNESS_RULES).unwrap();

    let webhook_metrics = "# TYPE harness_probe gauge\nharness_probe 0\n";
    // The webhook serves the probe on its /metrics, and Prometheus scrapes it there.
    let webhook = Webhook::start().unwrap();
    webhook.set_metrics(webhook_metrics);
    let config = StackConfig {
        job: "harness".into(),
        targets: vec![webhook.addr()],
        rule_files: vec![rules],
    };
    let mut stack = PromStack::start(&config, webhook);

    let always = stack
        .webhook()
        .wait_for(Duration::from_secs(30), |a| {
            a.name() == "HarnessAlwaysFiring" && a.status == "firing"
        })
        .unwrap_or_else(|| {
            panic!(
                "HarnessAlwaysFiring never reached the webhook\n{}",
                stack.report()
            )
        });
    assert_eq!(
        always.labels.get("severity").map(String::as_str),
        Some("test")
    );

    // The probe is scraped at 0: HarnessProbeHigh must stay quiet.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = stack.query(r#"harness_probe{job="harness"}"#).unwrap();
        if r[0]["value"][1] == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "harness_probe was never scraped\n{}",
            stack.report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !stack
            .webhook()
            .alerts()
            .iter()
            .any(|a| a.name() == "HarnessProbeHigh"),
        "HarnessProbeHigh paged while the probe was 0\n{}",
        stack.report()
    );

    stack
        .webhook()
        .set_metrics("# TYPE harness_probe gauge\nharness_probe 7\n");
    let high = stack
        .webhook()
        .wait_for(Duration::from_secs(30), |a| {
            a.name() == "HarnessProbeHigh" && a.status == "firing"
        })
        .unwrap_or_else(|| {
            panic!(
                "HarnessProbeHigh never reached the webhook\n{}",
                stack.report()
            )
        });
    assert_eq!(high.labels.get("job").map(String::as_str), Some("harness"));
    assert_eq!(
        high.annotations.get("summary").map(String::as_str),
        Some("probe is 7")
    );

    stack.webhook().set_metrics(webhook_metrics);
    stack
        .webhook()
        .wait_for(Duration::from_secs(30), |a| {
            a.name() == "HarnessProbeHigh" && a.status == "resolved"
        })
        .unwrap_or_else(|| {
            panic!(
                "HarnessProbeHigh never resolved at the webhook\n{}",
                stack.report()
            )
        });
    stack.check_alive();
    eprintln!("harness self-test took {:?}", t0.elapsed());
}

/// The shipped rules render into a test copy that promtool accepts, with every `for:` shortened.
#[test]
fn harness_renders_the_shipped_rules() {
    let shipped = workspace_root().join("deploy/prometheus/rules.yaml");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rules.yaml");
    let replaced = render_rules(&shipped, &out, "3s");
    assert!(replaced > 0, "no `for:` in {}", shipped.display());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("alert: DenyObserverDenySpike"));
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with("for:"))
            .count(),
        replaced
    );
    assert!(
        text.lines()
            .filter(|l| l.trim_start().starts_with("for:"))
            .all(|l| l.trim_end().ends_with("for: 3s"))
    );
}

// ---------------------------------------------------------------------------------------------
// The daemon's real alert path.

const APP_NS: &str = "e2e-alert-app";
/// The workload whose ingress is flooded.
const FLOODED: &str = "api";
/// A workload with the same steady background in both phases: it must never page.
const STEADY: &str = "db";
const SPIKE_ALERT: &str = "DenyObserverDenySpike";
const DENY_PORT: u16 = 8080;

/// Daemon alert settings, shrunk from minutes to seconds.
const DAEMON_ALERT_ARGS: &[&str] = &[
    "--spike-warmup",
    "5",
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
];
/// Replaces every `for:` of the shipped rules (2m for the spike alert).
const RULES_FOR: &str = "5s";
/// Steady background per denied workload, packets per second.
const BACKGROUND_PPS: u64 = 2;
/// How long the quiet phase lasts.
const QUIET_PHASE: Duration = Duration::from_secs(20);
/// The flood, packets per second.
const FLOOD_PPS: u64 = 1000;
/// Bound on flood start → spike alert at the webhook. Expected path: rate window 2 s + daemon
/// `--spike-for` 3 s + scrape 1 s + rule `for:` 5 s + evaluation 1 s + group_wait 1 s ≈ 13 s.
const ALERT_BOUND: Duration = Duration::from_secs(60);

/// What happened, second by second, for the failure message.
struct Timeline {
    t0: Instant,
    lines: Vec<String>,
    webhook_seen: usize,
}

impl Timeline {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            lines: Vec::new(),
            webhook_seen: 0,
        }
    }

    fn note(&mut self, what: impl std::fmt::Display) {
        let line = format!("{:7.1}s {what}", self.t0.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.lines.push(line);
    }

    /// One sample: the daemon's detector state of both workloads, Prometheus' spike alerts,
    /// and whatever reached the webhook since the last sample.
    fn sample(&mut self, daemon: &Daemon, stack: &PromStack) {
        let detector = match metrics::scrape(daemon.addr()) {
            Ok(m) => [FLOODED, STEADY]
                .iter()
                .map(|w| {
                    let want = [
                        ("direction", "ingress"),
                        ("workload_namespace", APP_NS),
                        ("workload", w),
                    ];
                    format!(
                        "{w}: rate={:.1} baseline={:.2} spike={}",
                        m.sum("deny_observer_deny_rate", &want),
                        m.sum("deny_observer_deny_rate_baseline", &want),
                        m.sum("deny_observer_deny_spike_active", &want),
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => format!("daemon scrape failed: {e}"),
        };
        let alerts: Vec<String> = stack
            .alert_states()
            .into_iter()
            .filter(|a| a.starts_with(SPIKE_ALERT))
            .collect();
        self.note(format_args!(
            "daemon[{detector}] prometheus[{}]",
            if alerts.is_empty() {
                "no spike alert".to_owned()
            } else {
                alerts.join("; ")
            }
        ));
        let received = stack.webhook().alerts();
        for a in &received[self.webhook_seen.min(received.len())..] {
            self.note(format_args!(
                "webhook: {} {} {:?}",
                a.name(),
                a.status,
                a.labels
            ));
        }
        self.webhook_seen = received.len();
    }

    /// The timeline, then the stack's report, then the daemon's deny metrics and log.
    fn failure(&self, daemon: &Daemon, stack: &PromStack) -> String {
        let excerpt = metrics::http_get(daemon.addr(), "/metrics")
            .map(|r| {
                r.body
                    .lines()
                    .filter(|l| {
                        l.starts_with("deny_observer_deny_")
                            || l.starts_with("deny_observer_policy_denies_total")
                            || l.starts_with("deny_observer_events_lost_total")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("scrape failed: {e}"));
        format!(
            "=== timeline ===\n{}\n=== Prometheus stack ===\n{}\
             === daemon /metrics (deny series) ===\n{excerpt}\n\
             === daemon log ({}) ===\n{}",
            self.lines.join("\n"),
            stack.report(),
            daemon.log().display(),
            daemon.log_tail()
        )
    }
}

fn is_spike_for(a: &ReceivedAlert, workload: &str) -> bool {
    a.name() == SPIKE_ALERT && a.labels.get("workload").map(String::as_str) == Some(workload)
}

#[test]
fn deny_flood_pages_through_prometheus_and_alertmanager() {
    if !testkit::privileged("deny_flood_pages_through_prometheus_and_alertmanager") {
        return;
    }
    let bin = testkit::daemon_bin();
    promstack::require_binaries();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();

    // The simulated node: a client, and two servers whose ingress is denied by default.
    let mut node = SimNode::new().expect("simulated node");
    let pods = [
        (
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
            "api-6c9f8b7d4-k2x9z",
            PodMeta::app(
                FLOODED,
                Owner::Deployment {
                    name: FLOODED.into(),
                    hash: "6c9f8b7d4".into(),
                },
            )
            .port("http", DENY_PORT, Proto::Udp),
        ),
        (
            "db-0",
            PodMeta::app(STEADY, Owner::StatefulSet(STEADY.into())).port(
                "sql",
                DENY_PORT,
                Proto::Udp,
            ),
        ),
    ];
    let mut metas = Vec::new();
    for (name, meta) in pods {
        node.add_pod(APP_NS, name).unwrap();
        metas.push(meta);
    }
    let (client, api, db) = (0, 1, 2);
    let mut enforcement = Enforcement::default();
    enforcement.ingress_isolated.insert(api);
    enforcement.ingress_isolated.insert(db);
    node.enforce(&enforcement).unwrap();

    let inventory = work.path().join("inventory");
    manifests::write_inventory(
        &inventory,
        node.pods(),
        &metas,
        "e2e-node",
        vec![json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny-ingress", "namespace": APP_NS},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        })],
    )
    .unwrap();

    let to = |id| SocketAddr::new(node.pod(id).unwrap().ip(false), DENY_PORT);
    let (to_api, to_db) = (to(api), to(db));
    let api_pps = AtomicU64::new(BACKGROUND_PPS);
    let db_pps = AtomicU64::new(BACKGROUND_PPS);
    let stop = AtomicBool::new(false);

    let (mut tl, elapsed, sent_api, sent_db) = std::thread::scope(|s| {
        // The background runs before the daemon starts, as a scanner's or a blocked sidecar's
        // would: the detector sees it from its first tick. (A background that starts later
        // begins with a zero baseline, and the rule's cluster-wide path (rate > 4x baseline)
        // is then pending until the baseline catches up; a slow start-up would make that
        // outlast the shortened `for:`.)
        let api_gen = s.spawn(|| {
            flood::paced_udp(&node, client, to_api, &api_pps, FLOOD_PPS, &stop)
                .unwrap_or_else(|e| panic!("{e:#}"))
        });
        let db_gen = s.spawn(|| {
            flood::paced_udp(&node, client, to_db, &db_pps, FLOOD_PPS, &stop)
                .unwrap_or_else(|e| panic!("{e:#}"))
        });
        // Whatever happens below, the generators stop, so the scope can end.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop_guard = StopOnDrop(&stop);
        // The daemon, with seconds-long alert settings and its own state directory.
        let state_dir = work.path().join("state");
        let mut args: Vec<&str> = DAEMON_ALERT_ARGS.to_vec();
        let state_dir_arg = state_dir.display().to_string();
        args.extend(["--state-dir", &state_dir_arg]);
        let mut daemon = Daemon::start_with_args(
            &bin,
            &inventory,
            free_loopback_addr().unwrap(),
            work.path().join("daemon.log"),
            &args,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        daemon
            .wait_ready(Duration::from_secs(60), || false)
            .unwrap_or_else(|e| panic!("{e}"));

        // Prometheus with the shipped rules (shortened `for:`), paging the test's webhook.
        let rules = work.path().join("rules.yaml");
        let replaced = render_rules(
            &workspace_root().join("deploy/prometheus/rules.yaml"),
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

        let mut tl = Timeline::new();
        tl.note(format_args!(
            "daemon {} ready ({}), Prometheus {} with the shipped rules ({replaced} `for:` set to \
             {RULES_FOR}), Alertmanager {}, webhook {}",
            daemon.addr(),
            DAEMON_ALERT_ARGS.join(" "),
            stack.prometheus_addr(),
            stack.alertmanager_addr(),
            stack.webhook().url()
        ));

        // Phase 1: the steady background must not page.
        tl.note(format_args!(
            "phase 1: {BACKGROUND_PPS} pkt/s denied to each of {FLOODED} and {STEADY} for {QUIET_PHASE:?}"
        ));
        let quiet_end = Instant::now() + QUIET_PHASE;
        while Instant::now() < quiet_end {
            std::thread::sleep(Duration::from_secs(1));
            daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
            stack.check_alive();
            tl.sample(&daemon, &stack);
        }
        let paged: Vec<_> = stack
            .webhook()
            .alerts()
            .into_iter()
            .filter(|a| a.name() == SPIKE_ALERT)
            .collect();
        assert!(
            paged.is_empty(),
            "the steady background paged: {paged:?}\n{}",
            tl.failure(&daemon, &stack)
        );
        // Quiet for the right reason: Prometheus sees the background and evaluates the rule.
        let seen = stack
            .query(&format!(
                r#"workload:deny_observer_deny_rate:sum{{direction="ingress",workload_namespace="{APP_NS}",workload="{FLOODED}"}}"#
            ))
            .unwrap_or_else(|e| panic!("{e}\n{}", tl.failure(&daemon, &stack)));
        let rate: f64 = seen[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "Prometheus has no deny rate for {APP_NS}/{FLOODED} after the quiet phase: \
                     {seen}\n{}",
                    tl.failure(&daemon, &stack)
                )
            });
        assert!(
            (0.5..=4.0).contains(&rate),
            "Prometheus sees a deny rate of {rate}/s for {APP_NS}/{FLOODED}, not the \
             background's {BACKGROUND_PPS}/s\n{}",
            tl.failure(&daemon, &stack)
        );

        // Phase 2: a sudden flood must page, naming the flooded workload.
        tl.note(format_args!(
            "phase 2: flood of {FLOOD_PPS} pkt/s to {FLOODED}; {STEADY} stays at {BACKGROUND_PPS} pkt/s"
        ));
        let flood_start = Instant::now();
        api_pps.store(FLOOD_PPS, Ordering::SeqCst);
        let alert = loop {
            if let Some(a) = stack
                .webhook()
                .alerts()
                .into_iter()
                .find(|a| a.name() == SPIKE_ALERT && a.status == "firing")
            {
                break a;
            }
            assert!(
                flood_start.elapsed() < ALERT_BOUND,
                "no {SPIKE_ALERT} reached the webhook within {ALERT_BOUND:?} of the flood\n{}",
                tl.failure(&daemon, &stack)
            );
            std::thread::sleep(Duration::from_millis(500));
            daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
            stack.check_alive();
            tl.sample(&daemon, &stack);
        };
        let elapsed = flood_start.elapsed();
        tl.sample(&daemon, &stack);
        tl.note(format_args!(
            "{SPIKE_ALERT} reached the webhook {elapsed:?} after the flood started"
        ));
        let label = |k: &str| alert.labels.get(k).map(String::as_str);
        let context = || {
            format!(
                "alert: {:?} {:?}\n{}",
                alert.labels,
                alert.annotations,
                tl.failure(&daemon, &stack)
            )
        };
        assert_eq!(label("workload"), Some(FLOODED), "{}", context());
        assert_eq!(label("workload_namespace"), Some(APP_NS), "{}", context());
        assert_eq!(label("direction"), Some("ingress"), "{}", context());
        assert_eq!(label("severity"), Some("critical"), "{}", context());
        assert_ne!(label("expected"), Some("true"), "{}", context());
        // What the SRE reads: workload, peer and policy in the summary, and a runbook.
        let summary = alert
            .annotations
            .get("summary")
            .cloned()
            .unwrap_or_default();
        for want in [
            format!("{APP_NS}/{FLOODED}"),
            format!("{APP_NS}/client"),
            "default-deny-ingress".to_owned(),
        ] {
            assert!(
                summary.contains(&want),
                "the alert's summary {summary:?} does not name {want:?}\n{}",
                context()
            );
        }
        assert!(
            alert
                .annotations
                .get("runbook_url")
                .is_some_and(|u| u.ends_with("DenyObserverDenySpike.md")),
            "{}",
            context()
        );
        // A few more seconds: the steady workload must still not page.
        std::thread::sleep(Duration::from_secs(3));
        tl.sample(&daemon, &stack);
        let steady_paged: Vec<_> = stack
            .webhook()
            .alerts()
            .into_iter()
            .filter(|a| is_spike_for(a, STEADY))
            .collect();
        assert!(
            steady_paged.is_empty(),
            "{APP_NS}/{STEADY}'s unchanged background paged: {steady_paged:?}\n{}",
            tl.failure(&daemon, &stack)
        );

        stop.store(true, Ordering::SeqCst);
        (
            tl,
            elapsed,
            api_gen.join().expect("api traffic generator"),
            db_gen.join().expect("db traffic generator"),
        )
    });

    // The harness itself: nftables dropped everything that was sent.
    let dropped = |id| node.counter(id, INGRESS_DROP_COUNTER).unwrap().packets;
    assert_eq!(dropped(api), sent_api, "nft drops at {FLOODED}");
    assert_eq!(dropped(db), sent_db, "nft drops at {STEADY}");
    tl.note(format_args!(
        "done: sent {sent_api} to {FLOODED}, {sent_db} to {STEADY}; alert after {elapsed:?}"
    ));
}
