//! Policies as code on real parts: the daemon from `DENY_OBSERVER_BIN` on a simulated node sees
//! real denied traffic, a real Prometheus scrapes it, and then:
//!
//! 1. `deny-observer edges --prometheus` writes the denied edge from Prometheus' HTTP API (and
//!    says that no allowed edge is counted: the kernel side of issue 14 item 1 is not built, so
//!    allowed edges come from a file describing real allowed traffic the test sends).
//! 2. `deny-observer preflight` over those edges exits 4 on a change that denies the observed
//!    allowed traffic and names the policy, and 0 on a harmless change, which it reports as
//!    newly allowing the observed denied edge.
//! 3. `deny-observer suggest` for the namespace, applied by `preflight`, breaks nothing.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::promstack::{self, PromStack, StackConfig};
use testkit::simnode::{Enforcement, Proto, SimNode};
use testkit::webhook::Webhook;

const APP_NS: &str = "pf-app";
const OTHER_NS: &str = "pf-other";
const NODE: &str = "pf-node";
const API_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 9000;

fn run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

#[test]
fn edges_from_prometheus_gate_a_policy_change() {
    if !testkit::privileged("edges_from_prometheus_gate_a_policy_change") {
        return;
    }
    let bin = testkit::daemon_bin();
    promstack::require_binaries();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();

    let mut node = SimNode::new().expect("simulated node");
    let deployment = |name: &str, hash: &str| Owner::Deployment {
        name: name.into(),
        hash: hash.into(),
    };
    let pods = [
        (
            APP_NS,
            "client-5d4f8c7b9-w8xkq",
            PodMeta::app("client", deployment("client", "5d4f8c7b9")).port(
                "ingest",
                CLIENT_PORT,
                Proto::Udp,
            ),
        ),
        (
            APP_NS,
            "api-6c9f8b7d4-k2x9z",
            PodMeta::app("api", deployment("api", "6c9f8b7d4")).port("http", API_PORT, Proto::Udp),
        ),
        (
            OTHER_NS,
            "probe-7b8c9d6f5-q4r7t",
            PodMeta::app("probe", deployment("probe", "7b8c9d6f5")),
        ),
    ];
    let mut metas = Vec::new();
    for (ns, name, meta) in pods {
        node.add_pod(ns, name).unwrap();
        metas.push(meta);
    }
    let (client, api, probe) = (0, 1, 2);
    let mut enforcement = Enforcement::default();
    enforcement.ingress_isolated.insert(api);
    node.enforce(&enforcement).unwrap();
    let inventory = work.path().join("inventory");
    manifests::write_inventory(
        &inventory,
        node.pods(),
        &metas,
        NODE,
        vec![json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "api-deny-ingress", "namespace": APP_NS},
            "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"]},
        })],
    )
    .unwrap();

    let mut daemon = Daemon::start_with_args(
        &bin,
        &inventory,
        free_loopback_addr().unwrap(),
        work.path().join("daemon.log"),
        &["--node-name", NODE],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon
        .wait_ready(Duration::from_secs(60), || false)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stack = PromStack::start(
        &StackConfig {
            job: "deny-observer".into(),
            targets: vec![daemon.addr()],
            rule_files: vec![],
        },
        Webhook::start().unwrap(),
    );

    // Real allowed traffic (probe -> client), which the kernel does not count yet: the edges
    // file below records it with the count the client received.
    let client_addr = SocketAddr::new(node.pod(client).unwrap().ip(false), CLIENT_PORT);
    let listener = node.listen(client, Proto::Udp, CLIENT_PORT).unwrap();
    node.send_udp(probe, client_addr, 50).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.received() < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let received = listener.received();
    assert!(
        received > 0,
        "the allowed probe -> client traffic did not arrive"
    );

    // Real denied traffic (client -> api), in rounds until Prometheus has an increase.
    let api_addr = SocketAddr::new(node.pod(api).unwrap().ip(false), API_PORT);
    let prometheus = format!("http://{}", stack.prometheus_addr());
    let deadline = Instant::now() + Duration::from_secs(90);
    let (edges_text, notes) = loop {
        node.send_udp(client, api_addr, 20).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
        stack.check_alive();
        let (code, out, err) = run(
            &bin,
            &["edges", "--prometheus", &prometheus, "--window", "10m"],
        );
        assert_eq!(code, 0, "edges failed: {err}");
        if out.contains("\"verdict\":\"deny\"") {
            break (out, err);
        }
        assert!(
            Instant::now() < deadline,
            "no denied edge in Prometheus after 90s\n{}\n{}",
            stack.report(),
            daemon.log_tail()
        );
    };
    let denied: Vec<Value> = edges_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let edge = denied
        .iter()
        .find(|e| e["destination_workload"] == "api")
        .unwrap_or_else(|| panic!("no edge to api in {edges_text}"));
    assert_eq!(edge["source_namespace"], APP_NS, "{edge}");
    assert_eq!(edge["source_workload"], "client", "{edge}");
    assert_eq!(edge["protocol"], "udp", "{edge}");
    assert_eq!(
        edge["port"],
        Value::Null,
        "the drop metrics carry no port: {edge}"
    );
    assert!(edge["observed"].as_u64().unwrap_or(0) > 0, "{edge}");
    assert!(
        notes.contains("no allowed edges observed"),
        "edges must say no allowed traffic is counted: {notes}"
    );

    let allowed = json!({
        "source_namespace": OTHER_NS, "source_workload": "probe",
        "destination_namespace": APP_NS, "destination_workload": "client",
        "protocol": "udp", "port": CLIENT_PORT, "observed": received, "verdict": "allow",
    });
    let edges = work.path().join("edges.jsonl");
    write(&edges, &format!("{edges_text}{allowed}\n"));
    let edges = edges.to_str().unwrap();
    let inv = inventory.to_str().unwrap();

    // A lockdown that forgets the probe: exit 4, the probe edge named with the new policy.
    let breaking = work.path().join("breaking.yaml");
    write(
        &breaking,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: lockdown, namespace: {APP_NS}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
        ),
    );
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            breaking.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 4, "breaking change must exit 4\n{out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let breaks = report["breaks"].as_array().unwrap();
    assert_eq!(breaks.len(), 1, "{out}");
    assert_eq!(breaks[0]["source_workload"], "probe", "{out}");
    assert_eq!(breaks[0]["port"], CLIENT_PORT, "{out}");
    assert_eq!(breaks[0]["observed"], received, "{out}");
    assert_eq!(
        breaks[0]["policies"],
        json!([format!("{APP_NS}/lockdown")]),
        "{out}"
    );
    let judged = report["edges_evaluated"].as_u64().unwrap_or(0) as usize
        + report["edges_unresolved"].as_array().map_or(0, Vec::len);
    assert_eq!(
        judged,
        denied.len() + 1,
        "every edge is judged or named: {out}"
    );

    // Opening api to client: nothing breaks, the observed denied edge is newly allowed on
    // the port api declares.
    let harmless = work.path().join("harmless.yaml");
    write(
        &harmless,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: {APP_NS}}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{protocol: UDP, port: http}}]\n"
        ),
    );
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            harmless.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "harmless change must exit 0\n{out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let opened = report["newly_allowed"].as_array().unwrap();
    assert!(
        opened
            .iter()
            .any(|c| c["destination_workload"] == "api" && c["port"] == API_PORT),
        "{out}"
    );

    // The suggestion for the namespace, applied, breaks nothing and keeps client -> api denied.
    let (code, yaml, err) = run(
        &bin,
        &[
            "suggest",
            "--inventory",
            inv,
            "--namespace",
            APP_NS,
            "--edges",
            edges,
            "--egress",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let suggested = work.path().join("suggested.yaml");
    write(&suggested, &yaml);
    let (code, out, err) = run(
        &bin,
        &[
            "preflight",
            "--inventory",
            inv,
            "--edges",
            edges,
            "--apply",
            suggested.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(
        code, 0,
        "the suggestion breaks observed traffic\n{yaml}\n{out}\n{err}"
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["newly_allowed"], json!([]), "{yaml}\n{out}");
    println!("edges:\n{edges_text}{allowed}\nsuggested:\n{yaml}");
    drop(stack);
}
