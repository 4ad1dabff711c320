//! `preflight` and `suggest` on a fixture inventory and edges file: the before/after diff, the
//! exit statuses CI gates on, and the suggestion round trip (apply what `suggest` prints, then
//! `preflight` over the same edges breaks nothing and opens nothing that was not seen allowed),
//! through the library and through the real binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::inventory::Inventory;
use observer::inventory::manifest::load_dir;
use observer::verdict::Engine;
use observer::verdict::edges::{Edge, Observed, read_edges};
use observer::verdict::preflight::{
    Report, apply_change, apply_namespaces, compare, load_change, load_policies,
};
use observer::verdict::suggest::{check_yaml, suggest, to_yaml};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/preflight")
        .join(name)
}

fn edges() -> Vec<Edge> {
    read_edges(&fixture("edges.jsonl")).unwrap()
}

fn preflight_lib(change: &str) -> Report {
    let base = Arc::new(load_dir(&fixture("inventory")).unwrap());
    let apply = load_policies(&[fixture(change)]).unwrap();
    let next = apply_change(&base, &apply, &[]).unwrap();
    compare(&Engine::new(base), &Engine::new(Arc::new(next)), &edges())
}

fn short(c: &observer::verdict::preflight::Change) -> String {
    format!(
        "{}/{} -> {}/{} {}/{}",
        c.source_namespace,
        c.source_workload,
        c.destination_namespace,
        c.destination_workload,
        c.protocol,
        c.port.map_or("-".to_owned(), |p| p.to_string())
    )
}

#[test]
fn breaking_change_names_each_broken_edge_and_its_policies() {
    let r = preflight_lib("changes/breaking.yaml");
    let breaks: Vec<String> = r.breaks.iter().map(short).collect();
    assert_eq!(
        breaks,
        [
            "monitoring/prometheus -> shop/api tcp/9090",
            "pay/billing -> shop/api tcp/8080"
        ],
        "{r:#?}"
    );
    let b = &r.breaks[0];
    assert_eq!((b.before, b.after, b.observed), ("allow", "deny", 2016));
    assert_eq!(
        b.policies,
        ["shop/allow-frontend-to-api", "shop/default-deny"]
    );
    assert!(r.newly_allowed.is_empty(), "{r:#?}");
    // 7 edges, one of them to a workload the inventory no longer has.
    assert_eq!(r.edges_evaluated, 6);
    assert_eq!(r.edges_unresolved.len(), 1);
    assert!(r.edges_unresolved[0].edge.contains("shop/gone"));
}

#[test]
fn harmless_change_passes_and_reports_what_it_opens_per_declared_port() {
    let r = preflight_lib("changes/harmless.yaml");
    assert!(r.breaks.is_empty(), "{r:#?}");
    let opened: Vec<String> = r.newly_allowed.iter().map(short).collect();
    // The drop metric has no port: the edge is judged on the port vault/secrets declares.
    assert_eq!(opened, ["shop/api -> vault/secrets tcp/8200"]);
    assert_eq!(r.newly_allowed[0].policies, ["vault/allow-shop-api"]);
    assert_eq!(r.newly_allowed[0].observed, 45);
}

#[test]
fn deleting_the_policy_that_allows_an_edge_breaks_it() {
    let base = load_dir(&fixture("inventory")).unwrap();
    let apply = load_policies(&[fixture("changes/breaking.yaml")]).unwrap();
    let locked = Arc::new(apply_change(&base, &apply, &[]).unwrap());
    let next = apply_change(&locked, &[], &["shop/allow-web".to_owned()]).unwrap();
    let r = compare(
        &Engine::new(Arc::clone(&locked)),
        &Engine::new(Arc::new(next)),
        &edges(),
    );
    let breaks: Vec<String> = r.breaks.iter().map(short).collect();
    assert_eq!(breaks, ["/world -> shop/frontend tcp/80"]);
    assert!(apply_change(&locked, &[], &["shop/nope".to_owned()]).is_err());
    assert!(apply_change(&locked, &[], &["nope".to_owned()]).is_err());
}

#[test]
fn a_change_the_api_server_would_refuse_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(
        &path,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: typo, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Ingres]}\n",
    )
    .unwrap();
    let err = load_policies(&[path])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("Ingres"), "{err}");
}

#[test]
fn a_namespace_in_the_change_relabels_it_for_the_policies_that_select_it() {
    // The lock-down plus a policy for namespaces labelled trusted, and pay labelled so: billing
    // keeps its path to api. Without the Namespace, the same policies break it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trusted.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: pay, labels: {trusted: \"yes\"}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-trusted, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {trusted: \"yes\"}}}]}]\n",
    )
    .unwrap();
    let base = Arc::new(load_dir(&fixture("inventory")).unwrap());
    let judge = |paths: &[PathBuf]| {
        let (policies, namespaces) = load_change(paths).unwrap();
        let mut next = apply_change(&base, &policies, &[]).unwrap();
        apply_namespaces(&mut next, &namespaces);
        let r = compare(
            &Engine::new(Arc::clone(&base)),
            &Engine::new(Arc::new(next)),
            &edges(),
        );
        r.breaks.iter().map(short).collect::<Vec<_>>()
    };
    let with_ns = judge(&[fixture("changes/breaking.yaml"), path.clone()]);
    assert_eq!(with_ns, ["monitoring/prometheus -> shop/api tcp/9090"]);
    // load_policies is for policies only: it refuses what it would otherwise drop.
    assert!(load_policies(&[path]).is_err());
}

/// A namespace with a rollout half done (web's old ReplicaSet and its new one, told apart by a
/// `version` label) and a kube-dns-like Service (53 over UDP and TCP, to other pod ports).
const ROLLOUT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-111-aaaaa
  namespace: a
  labels: {app: web, version: v1, pod-template-hash: "111"}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-111, uid: u1, controller: true}]
spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-222-bbbbb
  namespace: a
  labels: {app: web, version: v2, pod-template-hash: "222"}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-222, uid: u2, controller: true}]
spec: {containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: a, labels: {app: dns}}
spec:
  containers:
  - {name: c, image: x, ports: [{containerPort: 5353, protocol: UDP}, {containerPort: 5354}]}
status: {phase: Running, podIP: 10.0.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: a}
spec:
  selector: {app: dns}
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5354}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: a}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-v1, namespace: a}
spec:
  podSelector: {matchLabels: {app: web, version: v1}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]
"#;

/// Writes `text` to a file `name` and reads it back with `read` (the loaders take paths).
fn from_file<T>(name: &str, text: &str, read: impl FnOnce(PathBuf) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    read(path)
}

/// The NetworkPolicies of a change written as `text`.
fn policies(text: &str) -> Vec<Arc<NetworkPolicy>> {
    from_file("change.yaml", text, |path| load_policies(&[path]).unwrap())
}

/// `edges` judged with `before`'s and `after`'s policies.
fn diff(before: &Arc<Inventory>, after: Inventory, edges: &[Edge]) -> Report {
    compare(
        &Engine::new(Arc::clone(before)),
        &Engine::new(Arc::new(after)),
        edges,
    )
}

fn rollout_edges() -> Vec<Edge> {
    from_file(
        "edges.jsonl",
        concat!(
            r#"{"source_namespace":"a","source_workload":"client","destination_namespace":"a","destination_workload":"web","protocol":"tcp","port":80,"observed":10,"verdict":"allow"}"#,
            "\n",
            // A drop to the ClusterIP: the drop metrics carry no port.
            r#"{"source_namespace":"a","source_workload":"client","destination_namespace":"a","destination_workload":"service/dns","protocol":"udp","port":null,"observed":5,"verdict":"deny"}"#,
            "\n"
        ),
        |path| read_edges(&path).unwrap(),
    )
}

fn rollout_inventory() -> Inventory {
    from_file("a.yaml", ROLLOUT, |path| {
        load_dir(path.parent().unwrap()).unwrap()
    })
}

#[test]
fn an_edge_partly_allowed_today_breaks_when_its_allowed_pairs_are_denied() {
    // client reaches web's v1 pods; v2's are denied already. Deleting allow-v1 denies the
    // pairs that carry today's traffic: a break, though the edge was never wholly allowed.
    let base = Arc::new(rollout_inventory());
    let next = apply_change(&base, &[], &["a/allow-v1".to_owned()]).unwrap();
    let r = diff(&base, next, &rollout_edges());
    let breaks: Vec<String> = r.breaks.iter().map(short).collect();
    assert_eq!(breaks, ["a/client -> a/web tcp/80"], "{r:#?}");
    assert_eq!((r.breaks[0].before, r.breaks[0].after), ("partial", "deny"));
    // Allowing v2 as well opens the denied pairs: newly allowed, nothing breaks.
    let apply = policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-v1, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n",
    );
    let next = apply_change(&base, &apply, &[]).unwrap();
    let r = diff(&base, next, &rollout_edges());
    assert!(r.breaks.is_empty(), "{r:#?}");
    let opened: Vec<String> = r.newly_allowed.iter().map(short).collect();
    assert_eq!(opened, ["a/client -> a/web tcp/80"], "{r:#?}");
    assert_eq!(
        (r.newly_allowed[0].before, r.newly_allowed[0].after),
        ("partial", "allow")
    );
}

#[test]
fn an_edge_from_the_pods_own_node_never_breaks() {
    // Kubelet probes show up as `node -> a/web` connections; Kubernetes always allows them,
    // so no policy change can break them (the daemon judges drops of them the same way).
    let edges = from_file(
        "edges.jsonl",
        r#"{"source_namespace":"","source_workload":"node","destination_namespace":"a","destination_workload":"web","protocol":"tcp","port":80,"observed":30,"verdict":"allow"}
{"source_namespace":"","source_workload":"host","destination_namespace":"a","destination_workload":"web","protocol":"tcp","port":80,"observed":3,"verdict":"allow"}
"#,
        |path| read_edges(&path).unwrap(),
    );
    // Today a/web is not isolated; the change is the namespace's default deny.
    let isolated = rollout_inventory();
    let open = apply_change(
        &isolated,
        &[],
        &["a/default-deny".to_owned(), "a/allow-v1".to_owned()],
    )
    .unwrap();
    let r = diff(&Arc::new(open), isolated, &edges);
    assert_eq!(r.edges_evaluated, 2, "{r:#?}");
    // Another node is no exception: the default deny breaks it.
    let breaks: Vec<String> = r.breaks.iter().map(short).collect();
    assert_eq!(breaks, ["/host -> a/web tcp/80"], "{r:#?}");
}

#[test]
fn a_service_edge_without_a_port_is_judged_on_the_service_ports_of_its_protocol() {
    let base = Arc::new(rollout_inventory());
    let apply = policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-dns, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: dns}}\n  ingress: [{ports: [{port: 5353, protocol: UDP}]}]\n",
    );
    let next = apply_change(&base, &apply, &[]).unwrap();
    let r = diff(&base, next, &rollout_edges());
    assert!(r.edges_unresolved.is_empty(), "{r:#?}");
    // Judged at the UDP Service port 53 (targetPort 5353), not at the pod's port numbers.
    let opened: Vec<String> = r.newly_allowed.iter().map(short).collect();
    assert_eq!(opened, ["a/client -> a/service/dns udp/53"], "{r:#?}");
}

/// Applies the suggestion for `ns` and checks the round-trip promises over `edges`.
fn round_trip(ns: &str, egress: bool, edges: &[Edge]) -> String {
    let base = Arc::new(load_dir(&fixture("inventory")).unwrap());
    let engine = Engine::new(Arc::clone(&base));
    let s = suggest(&engine, ns, edges, egress);
    let yaml = to_yaml(&s.policies).unwrap();
    // Every object passes the API server's validation, and what is printed reads back as the
    // same policies through the manifest loader.
    for np in &s.policies {
        let errors = observer::inventory::validate::network_policy(np);
        assert!(errors.is_empty(), "{errors:?}\n{yaml}");
    }
    assert_eq!(
        check_yaml(&s.policies, &yaml).unwrap(),
        s.policies.len(),
        "{yaml}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("suggested.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let apply = load_policies(&[path]).unwrap();
    let next = apply_change(&base, &apply, &[]).unwrap();
    let after = Engine::new(Arc::new(next));
    assert!(
        after.warnings().is_empty(),
        "{:?}\n{yaml}",
        after.warnings()
    );
    let r = compare(&engine, &after, edges);
    assert!(
        r.breaks.is_empty(),
        "suggestion for {ns} breaks: {r:#?}\n{yaml}"
    );
    for opened in &r.newly_allowed {
        let seen = edges.iter().any(|e| {
            e.verdict == Observed::Allow
                && e.source_namespace == opened.source_namespace
                && e.source_workload == opened.source_workload
                && e.destination_namespace == opened.destination_namespace
                && e.destination_workload == opened.destination_workload
                && e.protocol == opened.protocol
                && (e.port.is_none() || e.port == opened.port)
        });
        assert!(
            seen,
            "{ns}: opens an edge never seen allowed: {opened:?}\n{yaml}"
        );
    }
    yaml
}

#[test]
fn suggestion_round_trip_breaks_nothing_and_opens_nothing_unseen() {
    let edges = edges();
    for ns in ["shop", "pay", "monitoring", "vault"] {
        for egress in [false, true] {
            round_trip(ns, egress, &edges);
        }
    }
}

#[test]
fn suggestion_selects_by_stable_labels_names_ports_and_blocks_the_outside() {
    let yaml = round_trip("shop", true, &edges());
    let docs: Vec<Value> = yaml
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let by_name = |n: &str| {
        docs.iter()
            .find(|d| d["metadata"]["name"] == n)
            .unwrap_or_else(|| panic!("no {n} in\n{yaml}"))
    };
    let deny = by_name("deny-observer-default-deny");
    assert_eq!(
        deny["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    let dns = by_name("deny-observer-allow-dns");
    assert_eq!(dns["spec"]["egress"][0]["ports"][0]["port"], 53);

    let api = by_name("deny-observer-allow-api");
    assert_eq!(
        api["spec"]["podSelector"]["matchLabels"],
        serde_json::json!({"app": "api", "tier": "backend"}),
        "pod-template-hash must not be selected"
    );
    let rules = api["spec"]["ingress"].as_array().unwrap();
    let prom = rules
        .iter()
        .find(|r| {
            r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                == "monitoring"
        })
        .unwrap();
    assert_eq!(
        prom["from"][0]["podSelector"]["matchLabels"],
        serde_json::json!({"app.kubernetes.io/name": "prometheus"})
    );
    assert_eq!(
        prom["ports"][0]["port"], "metrics",
        "declared port name is used"
    );
    // api's egress to worker: worker declares no port, so the number.
    assert_eq!(api["spec"]["egress"][0]["ports"][0]["port"], 7000);

    let worker = by_name("deny-observer-allow-worker");
    assert_eq!(
        worker["spec"]["podSelector"]["matchLabels"],
        serde_json::json!({"app": "worker", "tier": "backend"})
    );
    let frontend = by_name("deny-observer-allow-frontend");
    let world = &frontend["spec"]["ingress"][0]["from"];
    assert_eq!(world[0]["ipBlock"]["cidr"], "0.0.0.0/0");
    assert!(
        world[0]["ipBlock"]["except"]
            .as_array()
            .unwrap()
            .contains(&Value::from("10.0.0.0/8"))
    );
    assert_eq!(frontend["spec"]["ingress"][0]["ports"][0]["port"], "http");
    // The denied edge api -> vault gets no egress rule.
    assert!(!yaml.contains("vault"), "{yaml}");
}

fn bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deny-observer"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(name: &str) -> String {
    fixture(name).to_str().unwrap().to_owned()
}

#[test]
fn binary_exit_statuses_gate_ci() {
    let (inv, edges) = (p("inventory"), p("edges.jsonl"));
    let common = ["preflight", "--inventory", &inv, "--edges", &edges];

    let breaking = p("changes/breaking.yaml");
    let mut args = common.to_vec();
    args.extend(["--apply", &breaking, "--output", "json"]);
    let (code, out, err) = bin(&args);
    assert_eq!(code, 4, "{out}{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["breaks"].as_array().unwrap().len(), 2);
    assert_eq!(json["edges_evaluated"], 6);
    for key in [
        "source_namespace",
        "source_workload",
        "destination_namespace",
        "destination_workload",
        "protocol",
        "port",
        "observed",
        "before",
        "after",
        "policies",
    ] {
        assert!(json["breaks"][0].get(key).is_some(), "missing {key}: {out}");
    }

    let harmless = p("changes/harmless.yaml");
    let mut args = common.to_vec();
    args.extend(["--apply", &harmless]);
    let (code, out, err) = bin(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("BREAKS (seen allowed; pods allowed today, denied after the change): 0"),
        "{out}"
    );
    assert!(out.contains("vault/secrets"), "{out}");

    // Bad input: 2, with the reason.
    let mut args = common.to_vec();
    args.extend(["--delete", "shop/nope"]);
    let (code, _, err) = bin(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("shop/nope"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"source_namespace\":\"a\"}\n").unwrap();
    let (code, _, err) = bin(&[
        "preflight",
        "--inventory",
        &inv,
        "--edges",
        bad.to_str().unwrap(),
        "--apply",
        &harmless,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 1"), "{err}");

    let (code, _, err) = bin(&[
        "preflight",
        "--inventory",
        &inv,
        "--prometheus",
        "http://127.0.0.1:1",
        "--apply",
        &harmless,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");

    let (code, _, err) = bin(&[
        "edges",
        "--prometheus",
        "http://127.0.0.1:1",
        "--window",
        "7x",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--window"), "{err}");
}

#[test]
fn binary_suggest_then_preflight_round_trip() {
    let (inv, edges) = (p("inventory"), p("edges.jsonl"));
    let (code, yaml, err) = bin(&[
        "suggest",
        "--inventory",
        &inv,
        "--namespace",
        "shop",
        "--edges",
        &edges,
        "--egress",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        yaml.starts_with("# deny-observer suggest --namespace shop"),
        "{yaml}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let (code, out, err) = bin(&[
        "preflight",
        "--inventory",
        &inv,
        "--edges",
        &edges,
        "--apply",
        path.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["breaks"], serde_json::json!([]));
}
