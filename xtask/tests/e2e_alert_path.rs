//! The real alert path, end to end: a real Prometheus scrapes, evaluates the shipped rules and
//! pages a real Alertmanager, which calls a webhook served by the test.
//!
//! - `harness_*`: the Prometheus/Alertmanager harness itself (no root needed), with a metric the
//!   test sets and a static rule file.

#[allow(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::promstack::{PromStack, StackConfig, render_rules};
use common::webhook::Webhook;

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

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
