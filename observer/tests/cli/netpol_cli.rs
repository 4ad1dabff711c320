//! `explain` and `audit` over a real manifest directory, through the shared loader.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use observer::inventory::Inventory;
use observer::inventory::manifest::load_dir;
use observer::verdict::cli::{
    AuditArgs, AuditOutput, EXIT_BAD_FLOW_LINES, EXIT_OPEN_NAMESPACE, ExplainArgs, explain_batch,
};
use observer::verdict::{Engine, VerdictError, audit, explain};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/netpol/cli")
}

fn inventory() -> Arc<Inventory> {
    Arc::new(load_dir(&dir()).unwrap())
}

#[derive(Parser)]
struct ExplainCli {
    #[command(flatten)]
    args: ExplainArgs,
}

#[derive(Parser)]
struct AuditCli {
    #[command(flatten)]
    args: AuditArgs,
}

fn explain_args(argv: &[&str]) -> ExplainArgs {
    let d = dir();
    let mut full = vec!["explain", "--inventory", d.to_str().unwrap()];
    full.extend_from_slice(argv);
    ExplainCli::try_parse_from(full).unwrap().args
}

fn run_explain(argv: &[&str]) -> (Result<u8, VerdictError>, String) {
    let args = explain_args(argv);
    let mut out = Vec::new();
    let r = explain(&args, inventory(), &mut out);
    (r, String::from_utf8(out).unwrap())
}

#[test]
fn explain_deny_names_direction_policies_and_nearest_miss() {
    let (r, out) = run_explain(&["--from", "dev/tool", "--to", "prod/db", "--port", "pg"]);
    assert_eq!(
        r.unwrap(),
        observer::verdict::cli::EXIT_DENY,
        "DENY exits 1 for scripts"
    );
    assert!(
        out.contains("verdict: DENY  dev/tool -> prod/db TCP/5432"),
        "{out}"
    );
    assert!(out.contains("decided by: ingress at prod/db"), "{out}");
    assert!(
        out.contains("egress at dev/tool: not isolated (no NetworkPolicy selects it for egress)"),
        "{out}"
    );
    assert!(
        out.contains(
            "ingress at prod/db: isolated by prod/allow-web-to-db, prod/default-deny; allowed by none of them"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "  - prod/allow-web-to-db allows TCP/5432 only from pods with app=web in namespace prod (the port matches, but dev/tool is not such a peer)"
        ),
        "{out}"
    );
}

#[test]
fn explain_allow_and_ip_endpoints() {
    let (r, out) = run_explain(&["--from", "prod/web", "--to", "prod/db", "--port", "5432"]);
    assert_eq!(r.unwrap(), 0);
    assert!(
        out.starts_with("verdict: ALLOW  prod/web -> prod/db TCP/5432"),
        "{out}"
    );
    assert!(out.contains("allowed by prod/allow-web-to-db"), "{out}");
    assert!(!out.contains("nearest misses"), "{out}");

    // A pod's IP is that pod; an unknown IP is outside the cluster.
    let (_, out) = run_explain(&["--from", "10.1.0.10", "--to", "10.1.0.20", "--port", "5432"]);
    assert!(
        out.starts_with("verdict: ALLOW  prod/web -> prod/db"),
        "{out}"
    );
    let (_, out) = run_explain(&["--from", "203.0.113.9", "--to", "prod/db", "--port", "5432"]);
    assert!(
        out.starts_with("verdict: DENY  203.0.113.9 -> prod/db"),
        "{out}"
    );
    assert!(
        out.contains("egress at 203.0.113.9: outside the cluster's pods"),
        "{out}"
    );
    // UDP to a TCP-only allow: a port miss.
    let (_, out) = run_explain(&[
        "--from",
        "prod/web",
        "--to",
        "prod/db",
        "--port",
        "5432",
        "--protocol",
        "UDP",
    ]);
    assert!(
        out.contains("the peer matches, but the flow is UDP/5432"),
        "{out}"
    );
}

#[test]
fn explain_rejects_bad_endpoints_and_ports() {
    let (r, _) = run_explain(&["--from", "prod/nope", "--to", "prod/db", "--port", "1"]);
    assert!(matches!(r, Err(VerdictError::UnknownPod(p)) if p == "prod/nope"));
    let (r, _) = run_explain(&["--from", "prod/web", "--to", "prod/db", "--port", "http"]);
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("prod/db declares no TCP container port"),
        "{msg}"
    );
    let (r, _) = run_explain(&["--from", "prod/web", "--to", "prod", "--port", "1"]);
    assert!(matches!(r, Err(VerdictError::BadEndpoint(_))));
    let (r, _) = run_explain(&[
        "--from",
        "prod/web",
        "--to",
        "prod/db",
        "--port",
        "1",
        "--protocol",
        "GRE",
    ]);
    assert!(matches!(r, Err(VerdictError::BadProtocol(_))));
    // --flows excludes --from.
    let full = vec![
        "explain",
        "--inventory",
        "d",
        "--flows",
        "-",
        "--from",
        "prod/web",
    ];
    assert!(ExplainCli::try_parse_from(full).is_err());
    assert!(ExplainCli::try_parse_from(["explain", "--inventory", "d", "--from", "a/b"]).is_err());
}

#[test]
fn batch_answers_every_line_in_order_and_survives_bad_lines() {
    let input = r#"{"from":"dev/tool","to":"prod/db","port":5432,"protocol":"TCP"}
not json
{"from":"prod/ghost","to":"prod/db","port":5432}

{"from":"prod/web","to":"prod/db","port":"pg"}
{"from":"prod/web","to":"dev/tool","port":80,"protocol":"udp"}
{"from":"prod/web","to":"prod/db","port":5432,"protocol":"GRE"}
"#;
    let engine = Engine::new(inventory());
    let mut out = Vec::new();
    let code = explain_batch(&engine, &mut Cursor::new(input), &mut out).unwrap();
    assert_eq!(code, EXIT_BAD_FLOW_LINES);
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        6,
        "blank line skipped, every other line answered"
    );

    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["verdict"], "deny");
    assert_eq!(lines[0]["direction"], "ingress");
    assert_eq!(
        lines[0]["policies"],
        serde_json::json!(["prod/allow-web-to-db", "prod/default-deny"])
    );
    assert_eq!(
        lines[0]["policy_label"],
        "prod/allow-web-to-db,prod/default-deny"
    );
    assert_eq!(lines[0]["ingress"]["nearest_misses"][0]["miss"], "peer");

    assert_eq!(lines[1]["line"], 2);
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON")
    );
    assert_eq!(lines[2]["line"], 3);
    assert!(
        lines[2]["error"].as_str().unwrap().contains("prod/ghost"),
        "{}",
        lines[2]
    );

    assert_eq!(lines[3]["line"], 5);
    assert_eq!(lines[3]["verdict"], "allow");
    assert_eq!(
        lines[3]["port"], 5432,
        "named port resolved on the destination"
    );
    assert_eq!(lines[3]["direction"], Value::Null);
    assert_eq!(lines[3]["policies"], serde_json::json!([]));

    assert_eq!(lines[4]["verdict"], "allow");
    assert_eq!(lines[4]["protocol"], "UDP");
    assert!(
        lines[5]["error"].as_str().unwrap().contains("GRE"),
        "{}",
        lines[5]
    );
}

#[test]
fn batch_without_bad_lines_exits_zero_and_reads_files() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tmp.path(),
        "{\"from\":\"prod/web\",\"to\":\"prod/db\",\"port\":5432}\n",
    )
    .unwrap();
    let args = explain_args(&["--flows", tmp.path().to_str().unwrap()]);
    let mut out = Vec::new();
    assert_eq!(explain(&args, inventory(), &mut out).unwrap(), 0);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["verdict"], "allow");
    let args = explain_args(&["--flows", "/nonexistent/flows.jsonl"]);
    let err = explain(&args, inventory(), &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/flows.jsonl"),
        "{err}"
    );
}

fn run_audit(argv: &[&str]) -> (u8, String) {
    let d = dir();
    let mut full = vec!["audit", "--inventory", d.to_str().unwrap()];
    full.extend_from_slice(argv);
    let args = AuditCli::try_parse_from(full).unwrap().args;
    let mut out = Vec::new();
    let code = audit(&args, inventory(), &mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

#[test]
fn audit_json_schema_and_fail_on_open() {
    let (code, out) = run_audit(&["--output", "json"]);
    assert_eq!(code, 0, "open namespaces only fail with --fail-on-open");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["open_namespaces"], serde_json::json!(["dev"]));
    let ns = v["namespaces"].as_array().unwrap();
    let names: Vec<&str> = ns.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["dev", "prod"]);
    let dev = &ns[0];
    assert_eq!(dev["open"], true);
    assert_eq!(dev["policies"], 0);
    assert_eq!(dev["pods"], 1);
    assert_eq!(dev["pods_not_isolated_ingress"], 1);
    assert_eq!(dev["pods_not_isolated_egress"], 1);
    let prod = &ns[1];
    assert_eq!(prod["open"], false);
    assert_eq!(prod["policies"], 3);
    assert_eq!(prod["pods"], 2);
    assert_eq!(prod["pods_not_isolated_ingress"], 0);
    assert_eq!(prod["pods_not_isolated_egress"], 2);
    assert_eq!(prod["host_network_pods"], 0);
    assert_eq!(
        prod["policies_selecting_no_pod"],
        serde_json::json!(["prod/ghost"])
    );

    let (code, _) = run_audit(&["--output", "json", "--fail-on-open"]);
    assert_eq!(code, EXIT_OPEN_NAMESPACE);
}

#[test]
fn audit_table_marks_open_fields() {
    let (code, out) = run_audit(&[]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE"), "{out}");
    assert!(lines[1].starts_with("dev (open field)"), "{out}");
    assert!(
        lines[2].starts_with("prod ") && lines[2].ends_with("prod/ghost"),
        "{out}"
    );
    assert!(
        out.contains("2 namespace(s), 1 open field (no NetworkPolicy): dev"),
        "{out}"
    );
    let (code, _) = run_audit(&["--fail-on-open"]);
    assert_eq!(code, EXIT_OPEN_NAMESPACE);
}

#[test]
fn audit_fail_on_open_passes_when_every_namespace_has_a_policy() {
    let mut inv = (*inventory()).clone();
    inv.namespaces.remove("dev");
    inv.pods.retain(|p| p.namespace != "dev");
    let args = AuditArgs {
        inventory: dir(),
        output: AuditOutput::Json,
        fail_on_open: true,
        fail_on_invalid: false,
    };
    let mut out = Vec::new();
    assert_eq!(audit(&args, Arc::new(inv), &mut out).unwrap(), 0);
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["open_namespaces"], serde_json::json!([]));
}
