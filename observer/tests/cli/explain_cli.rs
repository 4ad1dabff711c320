//! `explain` as scripts and on-call SREs use it: workloads as endpoints (the names alerts
//! carry), every declared port, exit statuses, and the hostile-input fixes (non-UTF-8 lines,
//! IPv4-mapped addresses, out-of-range ports, a missing inventory), through the library and
//! through the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::io::Cursor;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use clap::Parser;
use observer::inventory::manifest::load_dir;
use observer::verdict::cli::{EXIT_BAD_FLOW_LINES, EXIT_BAD_INPUT, EXIT_DENY, ExplainArgs};
use observer::verdict::{Engine, VerdictError, explain};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/netpol")
        .join(name)
}

#[derive(Parser)]
struct ExplainCli {
    #[command(flatten)]
    args: ExplainArgs,
}

fn run(dir: &str, argv: &[&str]) -> (Result<u8, VerdictError>, String) {
    let d = fixture(dir);
    let mut full = vec!["explain", "--inventory", d.to_str().unwrap()];
    full.extend_from_slice(argv);
    let args = ExplainCli::try_parse_from(full).unwrap().args;
    let mut out = Vec::new();
    let r = explain(&args, Arc::new(load_dir(&d).unwrap()), &mut out);
    (r, String::from_utf8(out).unwrap())
}

fn batch(dir: &str, input: &[u8]) -> (u8, Vec<Value>) {
    let engine = Engine::new(Arc::new(load_dir(&fixture(dir)).unwrap()));
    let mut out = Vec::new();
    let code =
        observer::verdict::cli::explain_batch(&engine, &mut Cursor::new(input), &mut out).unwrap();
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (code, lines)
}

#[test]
fn workload_endpoint_judges_every_pod_and_names_the_deciding_one() {
    let (r, out) = run(
        "workloads",
        &[
            "--from",
            "shop/frontend",
            "--to",
            "shop/api",
            "--port",
            "8080",
        ],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    // The canary's labels are not allowed; the stable pod's are. The denied pair is shown.
    assert!(
        out.starts_with(
            "verdict: DENY  shop/frontend-8f2b1-fghij -> shop/api-6b7c8-klmno TCP/8080\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "from shop/frontend: Deployment frontend, 2 pod(s); judged with the labels of shop/frontend-8f2b1-fghij (app=frontend, pod-template-hash=8f2b1, track=canary)"
        ),
        "terminated pods are left out: {out}"
    );
    assert!(
        out.contains(
            "to shop/api: Deployment api, 1 pod(s); judged with the labels of shop/api-6b7c8-klmno"
        ),
        "{out}"
    );
    assert!(
        out.contains("pods disagree: 1 of 2 pod pairs are denied"),
        "{out}"
    );
    assert!(
        out.contains("decided by: ingress at shop/api-6b7c8-klmno"),
        "{out}"
    );

    // One pod of the workload, by its pod name: allowed, exit 0, named port resolved.
    let (r, out) = run(
        "workloads",
        &[
            "--from",
            "shop/frontend-7d9c5-abcde",
            "--to",
            "shop/api",
            "--port",
            "http",
            "--protocol",
            "tcp",
        ],
    );
    assert_eq!(r.unwrap(), 0, "{out}");
    assert!(
        out.starts_with(
            "verdict: ALLOW  shop/frontend-7d9c5-abcde -> shop/api-6b7c8-klmno TCP/8080 (http)"
        ),
        "{out}"
    );
    assert!(
        !out.contains("from shop/frontend"),
        "a pod is not a workload: {out}"
    );

    let (r, _) = run(
        "workloads",
        &["--from", "shop/nothing", "--to", "shop/api", "--port", "1"],
    );
    let err = r.unwrap_err();
    assert!(
        matches!(&err, VerdictError::UnknownPod(p) if p == "shop/nothing"),
        "{err}"
    );
    assert!(err.to_string().contains("<namespace>/<workload>"), "{err}");
}

#[test]
fn without_port_every_declared_port_is_explained() {
    let (r, out) = run(
        "workloads",
        &["--from", "shop/frontend", "--to", "shop/api"],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    let verdicts: Vec<&str> = out.lines().filter(|l| l.starts_with("verdict:")).collect();
    assert_eq!(
        verdicts,
        vec![
            "verdict: DENY  shop/frontend-8f2b1-fghij -> shop/api-6b7c8-klmno UDP/7946 (gossip)",
            "verdict: DENY  shop/frontend-8f2b1-fghij -> shop/api-6b7c8-klmno TCP/8080 (http)",
            "verdict: DENY  shop/frontend-8f2b1-fghij -> shop/api-6b7c8-klmno TCP/9090 (metrics)",
        ],
        "{out}"
    );
    assert!(
        out.ends_with("summary: 3 of 3 declared ports denied: UDP/7946, TCP/8080, TCP/9090\n"),
        "{out}"
    );

    // --protocol narrows the declared ports; the stable pod alone is allowed on 8080 only.
    let (r, out) = run(
        "workloads",
        &[
            "--from",
            "10.3.0.10",
            "--to",
            "shop/api",
            "--protocol",
            "TCP",
        ],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    assert!(
        out.contains(
            "verdict: ALLOW  shop/frontend-7d9c5-abcde -> shop/api-6b7c8-klmno TCP/8080 (http)"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "verdict: DENY  shop/frontend-7d9c5-abcde -> shop/api-6b7c8-klmno TCP/9090 (metrics)"
        ),
        "{out}"
    );
    assert!(
        out.contains("summary: 1 of 2 declared ports denied: TCP/9090"),
        "{out}"
    );
    assert!(!out.contains("UDP"), "{out}");

    // An address outside the cluster declares nothing.
    let (r, _) = run(
        "workloads",
        &["--from", "shop/frontend", "--to", "192.0.2.1"],
    );
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("declares no container port") && msg.contains("--port"),
        "{msg}"
    );
}

#[test]
fn ipv4_mapped_ipv6_is_the_ipv4_address() {
    for (from, verdict) in [
        ("10.2.0.5", "DENY"),
        ("::ffff:10.2.0.5", "DENY"),
        ("10.1.0.10", "ALLOW"),
        ("::ffff:10.1.0.10", "ALLOW"),
    ] {
        let (_, out) = run(
            "cli",
            &["--from", from, "--to", "prod/db", "--port", "5432"],
        );
        assert!(
            out.starts_with(&format!("verdict: {verdict} ")),
            "{from}: {out}"
        );
    }
    let (_, out) = run(
        "cli",
        &[
            "--from",
            "::ffff:203.0.113.9",
            "--to",
            "prod/db",
            "--port",
            "5432",
        ],
    );
    assert!(
        out.starts_with("verdict: DENY  203.0.113.9 -> prod/db"),
        "{out}"
    );
}

#[test]
fn out_of_range_ports_say_so() {
    let (r, _) = run(
        "cli",
        &["--from", "prod/web", "--to", "prod/db", "--port", "70000"],
    );
    let msg = r.unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid port \"70000\": out of range (a port is 0 to 65535)"
    );

    let (code, lines) = batch(
        "cli",
        br#"{"from":"prod/web","to":"prod/db","port":70000}
{"from":"prod/web","to":"prod/db","port":"70000"}
{"from":"prod/web","to":"prod/db","port":-1}
{"from":"prod/web","to":"prod/db","port":true}
{"from":"prod/web","to":"prod/db","port":5432}
"#,
    );
    assert_eq!(code, EXIT_BAD_FLOW_LINES);
    assert_eq!(lines.len(), 5);
    for line in &lines[..4] {
        let err = line["error"].as_str().unwrap();
        assert!(err.starts_with("invalid port"), "{err}");
        assert!(!err.contains("untagged"), "{err}");
    }
    assert!(lines[0]["error"].as_str().unwrap().contains("out of range"));
    assert_eq!(lines[4]["verdict"], "allow");
}

#[test]
fn batch_survives_non_utf8_lines_and_takes_workloads() {
    let mut input = Vec::new();
    input
        .extend_from_slice(b"{\"from\":\"shop/frontend\",\"to\":\"shop/api\",\"port\":\"http\"}\n");
    input.extend_from_slice(b"{\"from\":\"shop/\xff\xfe\",\"to\":\"shop/api\",\"port\":80}\n");
    input.extend_from_slice(
        b"{\"from\":\"::ffff:10.3.0.10\",\"to\":\"shop/api\",\"port\":8080,\"protocol\":\"tcp\"}\n",
    );
    let (code, lines) = batch("workloads", &input);
    assert_eq!(code, EXIT_BAD_FLOW_LINES);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["verdict"], "deny");
    assert_eq!(lines[0]["port"], 8080);
    assert_eq!(lines[0]["from_pod"], "shop/frontend-8f2b1-fghij");
    assert_eq!(lines[0]["pod_pairs"], 2);
    assert_eq!(lines[0]["pod_pairs_denied"], 1);
    assert_eq!(lines[1]["line"], 2);
    assert!(
        lines[1]["error"].as_str().unwrap().contains("not UTF-8"),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["line"], 3);
    assert_eq!(lines[2]["verdict"], "allow");
    assert_eq!(lines[2]["from_pod"], "shop/frontend-7d9c5-abcde");
    assert_eq!(lines[2]["protocol"], "TCP");
}

/// The real binary: exit statuses scripts rely on, and errors printed once.
#[test]
fn binary_exit_statuses_and_errors() {
    let bin = env!("CARGO_BIN_EXE_deny-observer");
    let inv = fixture("cli");
    let explain = |args: &[&str]| {
        let out = Command::new(bin)
            .arg("explain")
            .arg("--inventory")
            .arg(&inv)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = explain(&["--from", "prod/web", "--to", "prod/db", "--port", "5432"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out, _) = explain(&["--from", "dev/tool", "--to", "prod/db", "--port", "5432"]);
    assert_eq!(code, Some(i32::from(EXIT_DENY)), "{out}");
    let (code, _, err) = explain(&["--from", "prod/web", "--to", "prod/db", "--port", "70000"]);
    assert_eq!(code, Some(i32::from(EXIT_BAD_INPUT)), "{err}");
    assert!(err.contains("out of range"), "{err}");
    let (code, _, err) = explain(&["--from", "prod/nope", "--to", "prod/db", "--port", "1"]);
    assert_eq!(code, Some(i32::from(EXIT_BAD_INPUT)), "{err}");

    // Non-UTF-8 on standard input: an error object for that line, the next line answered.
    let mut child = Command::new(bin)
        .args(["explain", "--inventory"])
        .arg(&inv)
        .args(["--flows", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"\xc3\x28 not utf-8\n").unwrap();
        stdin
            .write_all(b"{\"from\":\"prod/web\",\"to\":\"prod/db\",\"port\":5432}\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(i32::from(EXIT_BAD_FLOW_LINES)));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0]["error"].as_str().unwrap().contains("not UTF-8"));
    assert_eq!(lines[1]["verdict"], "allow");

    // A missing inventory: one error line naming the path once, exit 2.
    let out = Command::new(bin)
        .args([
            "explain",
            "--inventory",
            "/nonexistent/inv",
            "--from",
            "a/b",
            "--to",
            "c/d",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(i32::from(EXIT_BAD_INPUT)));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.matches("/nonexistent/inv").count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A Service as the destination: the SRE pastes what the client dials (a Service name or its
/// ClusterIP, and the Service's port), and the verdict is judged where NetworkPolicies look:
/// at the selected pods, on the `targetPort`.
#[test]
fn a_service_is_judged_at_its_pods_on_its_target_port() {
    for to in [
        "shop/svc/api",
        "shop/service/api",
        "api.shop.svc",
        "api.shop.svc.cluster.local",
        "api.shop.svc.cluster.local.",
        "10.96.0.20",
        "::ffff:10.96.0.20",
    ] {
        for port in ["80", "http"] {
            let (r, out) = run(
                "services",
                &["--from", "shop/frontend", "--to", to, "--port", port],
            );
            assert_eq!(r.unwrap(), EXIT_DENY, "{to} {port}: {out}");
            // Port 80 of the Service is the pod's named port http, 8080: the canary is denied
            // there (the stable frontend is allowed), exactly as for the workload.
            assert!(
                out.starts_with(
                    "verdict: DENY  shop/frontend-8f2b1-fghij -> shop/api-6b7c8-klmno TCP/8080 \
                     (service port 80 \"http\", pod port \"http\")\n"
                ),
                "{to} {port}: {out}"
            );
            assert!(
                out.contains(&format!("to {to}: Service api, 1 pod(s)")),
                "{out}"
            );
        }
    }
    // The pod's own address is the pod, not a Service.
    let (r, out) = run(
        "services",
        &[
            "--from",
            "shop/frontend",
            "--to",
            "10.3.0.20",
            "--port",
            "80",
        ],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    assert!(out.contains("TCP/80\n"), "{out}");
}

#[test]
fn a_service_without_a_port_explains_every_port_of_the_service() {
    let (r, out) = run(
        "services",
        &["--from", "shop/frontend", "--to", "shop/svc/api"],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    assert!(
        out.contains("TCP/8080 (service port 80 \"http\", pod port \"http\")"),
        "{out}"
    );
    assert!(
        out.contains("TCP/9090 (service port 9090 \"metrics\")"),
        "{out}"
    );
    assert!(
        out.contains("summary: 2 of 2 Service ports denied: TCP/8080, TCP/9090"),
        "{out}"
    );
    // A UDP-only Service: its protocol comes from the Service, not the TCP default.
    let (r, out) = run(
        "services",
        &[
            "--from",
            "shop/frontend",
            "--to",
            "shop/svc/api-udp",
            "--port",
            "7946",
        ],
    );
    assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
    assert!(out.contains("UDP/7946 (service port 7946)"), "{out}");
    // A headless Service has no ClusterIP: its name names its pods, which clients dial
    // directly, so the port is judged as given (no translation) and, without one, every port
    // the pods declare.
    for to in [
        "shop/svc/api-headless",
        "api-headless.shop.svc.cluster.local",
    ] {
        let (r, out) = run(
            "services",
            &["--from", "shop/frontend", "--to", to, "--port", "8080"],
        );
        assert_eq!(r.unwrap(), EXIT_DENY, "{out}");
        assert!(out.contains("shop/api-6b7c8-klmno TCP/8080\n"), "{out}");
        assert!(
            out.contains(&format!("to {to}: headless Service api-headless, 1 pod(s)")),
            "{out}"
        );
    }
    let (_, out) = run(
        "services",
        &["--from", "shop/frontend", "--to", "shop/svc/api-headless"],
    );
    assert!(
        out.contains("summary: 3 of 3 declared ports denied"),
        "{out}"
    );
    // One pod by its DNS name under the Service, as StatefulSet clients dial it.
    let (r, out) = run(
        "services",
        &[
            "--from",
            "shop/frontend-7d9c5-abcde",
            "--to",
            "api-6b7c8-klmno.api-headless.shop.svc.cluster.local",
            "--port",
            "8080",
        ],
    );
    assert_eq!(r.unwrap(), 0, "{out}");
    assert!(
        out.starts_with(
            "verdict: ALLOW  shop/frontend-7d9c5-abcde -> shop/api-6b7c8-klmno TCP/8080\n"
        ),
        "{out}"
    );
    // A pod the Service does not select is no pod of that name.
    let (r, out) = run(
        "services",
        &[
            "--from",
            "shop/frontend",
            "--to",
            "frontend-7d9c5-abcde.api-headless.shop.svc",
            "--port",
            "8080",
        ],
    );
    assert!(matches!(r, Err(VerdictError::UnknownPod(_))), "{r:?} {out}");
}

#[test]
fn services_that_cannot_be_judged_say_why() {
    let err = |argv: &[&str]| {
        let (r, out) = run("services", argv);
        match r {
            Err(e) => e.to_string(),
            Ok(code) => panic!("{argv:?}: exit {code}, expected an error: {out}"),
        }
    };
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "shop/svc/api",
        "--port",
        "8080",
    ]);
    assert!(
        e.contains("Service shop/api has no such port; its ports: 80/TCP \"http\" -> \"http\", 9090/TCP \"metrics\" -> 9090"),
        "{e}"
    );
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "shop/svc/api",
        "--port",
        "80",
        "--protocol",
        "udp",
    ]);
    assert!(e.contains("has no such UDP port"), "{e}");
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "10.96.0.21",
        "--port",
        "80",
    ]);
    assert!(e.contains("Service shop/legacy has no selector"), "{e}");
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "shop/svc/ghost",
        "--port",
        "80",
    ]);
    assert!(
        e.contains("Service shop/ghost selects no pod (selector app=ghost)"),
        "{e}"
    );
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "shop/svc/nope",
        "--port",
        "80",
    ]);
    assert!(e.contains("unknown Service \"shop/svc/nope\""), "{e}");
    let e = err(&[
        "--from",
        "shop/frontend",
        "--to",
        "nope.shop.svc.cluster.local",
        "--port",
        "80",
    ]);
    assert!(
        e.contains("unknown Service \"nope.shop.svc.cluster.local\""),
        "{e}"
    );
    let e = err(&["--from", "10.96.0.20", "--to", "shop/api", "--port", "8080"]);
    assert!(e.contains("a Service only receives traffic"), "{e}");
}

#[test]
fn batch_lines_take_services_and_their_ports() {
    let (code, lines) = batch(
        "services",
        b"{\"from\":\"shop/frontend\",\"to\":\"shop/svc/api\",\"port\":80}\n\
          {\"from\":\"shop/frontend\",\"to\":\"10.96.0.20\",\"port\":\"metrics\"}\n\
          {\"from\":\"shop/frontend\",\"to\":\"shop/svc/api-udp\",\"port\":7946}\n\
          {\"from\":\"shop/frontend\",\"to\":\"shop/svc/api\",\"port\":8080}\n",
    );
    assert_eq!(code, EXIT_BAD_FLOW_LINES);
    assert_eq!(
        (lines[0]["port"].as_u64(), lines[0]["verdict"].as_str()),
        (Some(8080), Some("deny"))
    );
    assert_eq!(lines[1]["port"].as_u64(), Some(9090));
    assert!(
        lines[2]["protocol"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case("udp"),
        "{:?}",
        lines[2]
    );
    assert!(
        lines[3]["error"]
            .as_str()
            .unwrap()
            .contains("has no such port"),
        "{:?}",
        lines[3]
    );
}

/// A drop at a ClusterIP is labelled `service/<name>` with the port the client dialled;
/// preflight judges such an edge at the Service's pods, on the targetPort.
#[test]
fn preflight_judges_an_edge_to_a_cluster_ip_on_the_target_port() {
    use observer::verdict::edges::{Edge, Observed};
    use observer::verdict::preflight::{judge_edge, resolve_side};
    let engine = Engine::new(Arc::new(load_dir(&fixture("services")).unwrap()));
    let edge = |port| Edge {
        source_namespace: "shop".into(),
        source_workload: "frontend".into(),
        destination_namespace: "shop".into(),
        destination_workload: "service/api".into(),
        protocol: "tcp".into(),
        port: Some(port),
        observed: 10,
        verdict: Observed::Deny,
    };
    let from = resolve_side(&engine, "shop", "frontend").unwrap();
    let to = resolve_side(&engine, "shop", "service/api").unwrap();
    // Port 80 is the pods' 8080, which the canary frontend may not reach: denied, by the
    // policies of the api pod's ingress.
    let judged = judge_edge(&engine, &edge(80), &from, &to).unwrap();
    assert_eq!(judged.len(), 1);
    assert!(judged[0].pairs.iter().any(|a| !a), "{judged:?}");
    assert_eq!(judged[0].port, Some(80));
    assert!(
        judged[0]
            .policies
            .contains(&"shop/allow-frontend-to-api".to_owned()),
        "{judged:?}"
    );
    // The stable pod may reach 8080: allowed at Service port 80 (judged on port 80 itself,
    // no policy would allow it).
    let stable =
        observer::verdict::cli::resolve_endpoints(&engine, "shop/frontend-7d9c5-abcde").unwrap();
    let judged = judge_edge(&engine, &edge(80), &stable, &to).unwrap();
    assert!(judged[0].pairs.iter().all(|a| *a), "{judged:?}");
    // A port the Service does not have is an error, not a verdict on the wrong port.
    let e = judge_edge(&engine, &edge(8080), &from, &to).unwrap_err();
    assert!(e.contains("has no such TCP port"), "{e}");
}
