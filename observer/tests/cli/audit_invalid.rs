//! `audit` over real manifest directories: invalid objects are listed with their reason (table
//! and JSON), `--fail-on-invalid` exits 5, and a missing or empty inventory exits 2 with a
//! message instead of passing every gate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::fs;
use std::path::Path;

use clap::Parser;
use observer::verdict::cli::{
    AuditArgs, EXIT_INVALID_OBJECTS, EXIT_NO_INVENTORY, EXIT_OPEN_NAMESPACE, audit_dir,
};
use serde_json::{Value, json};

#[derive(Parser)]
struct AuditCli {
    #[command(flatten)]
    args: AuditArgs,
}

/// Runs `audit --inventory <dir> <argv>`: exit status, stdout, stderr.
fn run(dir: &Path, argv: &[&str]) -> (u8, String, String) {
    let mut full = vec!["audit", "--inventory", dir.to_str().unwrap()];
    full.extend_from_slice(argv);
    let args = AuditCli::try_parse_from(full).unwrap().args;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = audit_dir(&args, &mut out, &mut err).unwrap();
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: prod}
spec: {podSelector: {}}
";

const TYPO: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: dev}
spec: {podSelector: {}, policyTypes: [Ingres]}
";

#[test]
fn invalid_objects_are_listed_and_gate_with_fail_on_invalid() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("cluster.yaml"), CLUSTER).unwrap();
    fs::write(d.path().join("typo.yaml"), TYPO).unwrap();
    let typo_file = d.path().join("typo.yaml");

    let (code, out, err) = run(d.path(), &["--output", "json"]);
    assert_eq!(code, 0, "invalid objects only fail with --fail-on-invalid");
    assert_eq!(err, "");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema_version"], 1);
    // The invalid policy is not counted: dev is still an open field.
    assert_eq!(v["open_namespaces"], json!(["dev"]));
    assert_eq!(
        v["invalid_objects"],
        json!([{
            "kind": "NetworkPolicy",
            "namespace": "dev",
            "name": "typo",
            "source": format!("{}: document 1", typo_file.display()),
            "errors": ["spec.policyTypes[0]: Unsupported value: \"Ingres\": supported values: \"Ingress\", \"Egress\""]
        }])
    );

    let (code, out, _) = run(d.path(), &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!(
            "\n1 invalid object(s), left out as the API server would refuse them:\n  NetworkPolicy dev/typo ({}: document 1):\n    spec.policyTypes[0]: Unsupported value: \"Ingres\"",
            typo_file.display()
        )),
        "{out}"
    );

    assert_eq!(
        run(d.path(), &["--fail-on-invalid"]).0,
        EXIT_INVALID_OBJECTS
    );
    assert_eq!(run(d.path(), &["--fail-on-open"]).0, EXIT_OPEN_NAMESPACE);
    assert_eq!(
        run(
            d.path(),
            &["--fail-on-open", "--fail-on-invalid", "--output", "json"]
        )
        .0,
        EXIT_INVALID_OBJECTS
    );

    // Fixed: the gate passes, and the JSON field is there, empty.
    fs::write(&typo_file, TYPO.replace("Ingres]", "Ingress]")).unwrap();
    let (code, out, _) = run(d.path(), &["--fail-on-invalid", "--output", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["invalid_objects"], json!([]));
    assert_eq!(v["open_namespaces"], json!([]));
}

#[test]
fn empty_or_missing_inventory_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    for flags in [
        &[][..],
        &["--fail-on-open"],
        &["--output", "json", "--fail-on-invalid"],
    ] {
        let (code, out, err) = run(d.path(), flags);
        assert_eq!(code, EXIT_NO_INVENTORY, "{flags:?}");
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!(
                "deny-observer: error: the inventory {} holds no Namespace, Pod or NetworkPolicy\n",
                d.path().display()
            )
        );
    }

    // Only kinds the inventory does not use: as empty.
    fs::write(
        d.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    )
    .unwrap();
    assert_eq!(run(d.path(), &[]).0, EXIT_NO_INVENTORY);

    // Only invalid objects: empty too, and they are named.
    fs::write(d.path().join("typo.yaml"), TYPO).unwrap();
    let (code, _, err) = run(d.path(), &[]);
    assert_eq!(code, EXIT_NO_INVENTORY);
    assert!(
        err.contains("(every one of its 1 object(s) is invalid)"),
        "{err}"
    );
    assert!(
        err.contains("NetworkPolicy dev/typo: spec.policyTypes[0]"),
        "{err}"
    );

    let missing = d.path().join("nope");
    let (code, out, err) = run(&missing, &["--fail-on-open"]);
    assert_eq!(code, EXIT_NO_INVENTORY);
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "deny-observer: error: cannot load the inventory: {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );

    // A file that does not parse: the same status, naming the file.
    fs::write(d.path().join("typo.yaml"), "kind: [oops").unwrap();
    let (code, _, err) = run(d.path(), &[]);
    assert_eq!(code, EXIT_NO_INVENTORY);
    assert!(err.contains("typo.yaml: document 1"), "{err}");
}

/// A pod without containers is kept (the audit counts it) and named in a warning on stderr;
/// the report and the exit status are those of the same inventory with a container.
#[test]
fn pods_without_containers_are_a_warning_not_an_invalid_object() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("cluster.yaml"), CLUSTER).unwrap();
    fs::write(
        d.path().join("pods.json"),
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "prod"},
            "status": {"podIP": "10.0.0.1"}}"#,
    )
    .unwrap();
    let (code, out, err) = run(d.path(), &["--output", "json", "--fail-on-invalid"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("deny-observer: warning: 1 pod(s) without spec.containers"),
        "{err}"
    );
    assert!(err.trim_end().ends_with(": prod/web"), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["invalid_objects"], json!([]));
    let prod = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "prod")
        .unwrap();
    assert_eq!(prod["pods"], 1, "{prod}");
}
