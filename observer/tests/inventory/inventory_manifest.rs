//! Manifest-directory loading and attribution against a realistic `kubectl get -o yaml` dump,
//! and directory layouts (nested, ConfigMap volume, mixed files, errors).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use observer::flow::Protocol;
use observer::inventory::attribution::{Attributor, Endpoint, NodeAddrs};
use observer::inventory::manifest::{self, LoadError};
use observer::inventory::{Inventory, PodPhase, Workload};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inventory")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn wl(kind: &str, name: &str) -> Workload {
    Workload {
        kind: kind.into(),
        name: name.into(),
    }
}

fn pod<'a>(inv: &'a Inventory, ns: &str, name: &str) -> &'a observer::inventory::Pod {
    inv.pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .unwrap_or_else(|| panic!("pod {ns}/{name} missing"))
}

#[test]
fn kubectl_list_fixture_loads() {
    let inv = manifest::load_dir(&fixture_dir()).unwrap();
    let c = inv.counts();
    assert_eq!((c.namespaces, c.pods, c.policies), (4, 9, 3));
    assert_eq!(
        inv.namespaces.keys().collect::<Vec<_>>(),
        ["default", "dev", "kube-system", "prod"]
    );
    assert_eq!(inv.namespaces["prod"].labels.get("team"), Some("payments"));

    let coredns = pod(&inv, "kube-system", "coredns-5d78c9869d-7qz4p");
    assert_eq!(coredns.workload, wl("Deployment", "coredns"));
    assert_eq!(coredns.ips, vec![ip("10.244.0.3"), ip("fd00:244::3")]);
    let ports: Vec<_> = coredns
        .ports
        .iter()
        .map(|p| (p.name.as_deref(), p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("dns"), 53, Protocol::Udp),
            (Some("dns-tcp"), 53, Protocol::Tcp),
            (Some("metrics"), 9153, Protocol::Tcp)
        ]
    );
    assert_eq!(coredns.node_name.as_deref(), Some("node-a"));

    let proxy = pod(&inv, "kube-system", "kube-proxy-9xk2m");
    assert!(proxy.host_network);
    assert_eq!(proxy.workload, wl("DaemonSet", "kube-proxy"));
    assert_eq!(
        pod(&inv, "prod", "web-6b7f9d8c4-h2v8s").workload,
        wl("Deployment", "web")
    );
    assert_eq!(pod(&inv, "prod", "db-0").workload, wl("StatefulSet", "db"));
    let report = pod(&inv, "prod", "nightly-report-29019720-x8d2k");
    assert_eq!(report.workload, wl("CronJob", "nightly-report"));
    assert_eq!(report.phase, PodPhase::Terminated);
    assert_eq!(pod(&inv, "dev", "debug").workload, wl("Pod", "debug"));
    let pending = pod(&inv, "prod", "web-6b7f9d8c4-zz9rr");
    assert_eq!(pending.phase, PodPhase::Pending);
    assert!(pending.ips.is_empty());

    let deny = inv
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("default-deny-ingress"))
        .unwrap();
    let ann = deny.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        ann.keys().collect::<Vec<_>>(),
        ["deny-observer.io/description"]
    );
    assert!(deny.metadata.uid.is_none() && deny.metadata.resource_version.is_none());
    let allow = inv
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("allow-web-to-db"))
        .unwrap();
    assert!(allow.metadata.annotations.is_none());
    assert_eq!(
        allow.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0]
            .ports
            .as_ref()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn fixture_attribution() {
    let inv = manifest::load_dir(&fixture_dir()).unwrap();
    // Seen from node-a.
    let a = Attributor::new(
        &inv,
        NodeAddrs::new([ip("192.168.10.11"), ip("fd00:10::11")]),
    );
    let at = |s: &str| a.lookup(ip(s));
    let labels = |e: Endpoint| {
        (
            e.namespace_label().to_owned(),
            e.workload_label().to_owned(),
        )
    };
    let l = |ns: &str, w: &str| (ns.to_owned(), w.to_owned());
    assert_eq!(labels(at("10.244.0.10")), l("prod", "web"));
    assert_eq!(labels(at("fd00:244::a")), l("prod", "web"));
    assert_eq!(labels(at("10.244.1.10")), l("prod", "web"));
    assert_eq!(labels(at("fd00:244::14")), l("prod", "db"));
    assert_eq!(labels(at("10.244.0.3")), l("kube-system", "coredns"));
    // The Succeeded CronJob pod's IP now belongs to the running client.
    assert_eq!(labels(at("10.244.0.30")), l("dev", "client"));
    assert_eq!(labels(at("10.244.1.40")), l("dev", "debug"));
    assert_eq!(at("10.244.1.40").workload_kind(), "Pod");
    assert_eq!(at("192.168.10.11"), Endpoint::Node);
    assert_eq!(at("127.0.0.1"), Endpoint::Node);
    assert_eq!(at("192.168.10.12"), Endpoint::Host);
    assert_eq!(at("10.244.0.99"), Endpoint::Private);
    assert_eq!(at("140.82.112.3"), Endpoint::World);
}

#[test]
fn directory_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("a/b")).unwrap();
    fs::write(
        d.join("a/b/pods.yml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: n1}\nstatus: {podIP: 10.0.0.1}\n",
    )
    .unwrap();
    fs::write(
        d.join("z.json"),
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p2","namespace":"n2"}}"#,
    )
    .unwrap();
    fs::write(
        d.join("policy.YAML"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: n3}\nspec: {podSelector: {}}\n",
    )
    .unwrap();
    // Not manifests: other extensions, hidden files, and a dangling symlink.
    fs::write(d.join("README.md"), "apiVersion: [broken").unwrap();
    fs::write(d.join(".swp.yaml"), "apiVersion: [broken").unwrap();
    std::os::unix::fs::symlink(d.join("gone.yaml"), d.join("dangling.yaml")).unwrap();
    // A ConfigMap volume: visible symlinks into a hidden, atomically swapped directory.
    let cm = d.join("cm");
    fs::create_dir_all(cm.join("..2025_03_04_09_00_00.123")).unwrap();
    fs::write(
        cm.join("..2025_03_04_09_00_00.123/ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n9, labels: {x: y}}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..2025_03_04_09_00_00.123", cm.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/ns.yaml", cm.join("ns.yaml")).unwrap();
    // A symlink loop must not recurse forever.
    std::os::unix::fs::symlink("..", d.join("a/b/up")).unwrap();

    let files = manifest::manifest_files(d).unwrap();
    let rel: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(d).unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(rel, ["a/b/pods.yml", "cm/ns.yaml", "policy.YAML", "z.json"]);

    let (inv, summary) = manifest::load_dir_with_summary(d).unwrap();
    assert_eq!(summary.files, 4);
    let names: Vec<_> = inv.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["p1", "p2"]);
    assert_eq!(inv.policies.len(), 1);
    assert_eq!(
        inv.namespaces.keys().collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n9"]
    );
    assert_eq!(summary.implied_namespaces.len(), 3);
    assert_eq!(inv.namespaces["n9"].labels.get("x"), Some("y"));
}

#[test]
fn ignored_kinds_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("m.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: t}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    )
    .unwrap();
    let (inv, summary) = manifest::load_dir_with_summary(dir.path()).unwrap();
    assert_eq!(inv.counts().pods, 0);
    assert_eq!(summary.ignored.get("v1/ConfigMap"), Some(&2));
    assert_eq!(summary.ignored.get("apps/v1/Deployment"), Some(&1));
}

#[test]
fn services_contribute_their_cluster_ips_only() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:96::a'], ports: [{port: 80}]}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: legacy}\nspec: {clusterIP: 10.96.0.11}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: None}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: pending, namespace: shop}\nspec: {ports: [{port: 1}]}\n\
         ---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {clusterIP: 10.96.0.300}\n",
    )
    .unwrap();
    let (inv, summary) = manifest::load_dir_with_summary(dir.path()).unwrap();
    assert!(summary.ignored.is_empty(), "{:?}", summary.ignored);
    let got: Vec<(String, String, Vec<String>)> = inv
        .services
        .iter()
        .map(|s| {
            (
                s.namespace.clone(),
                s.name.clone(),
                s.cluster_ips.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    // Headless and unallocated Services have no address and are not kept; a Service with no
    // namespace is in `default`.
    assert_eq!(
        got,
        [
            ("default".into(), "legacy".into(), vec!["10.96.0.11".into()]),
            (
                "shop".into(),
                "web".into(),
                vec!["10.96.0.10".into(), "fd00:96::a".into()]
            ),
        ]
    );
    assert_eq!(inv.counts().services, 2);
    // A malformed address is an invalid object, named, and the rest loads.
    assert_eq!(inv.invalid.len(), 1, "{:?}", inv.invalid);
    assert_eq!(inv.invalid[0].id(), "shop/bad");
    assert!(
        inv.invalid[0].to_string().contains("10.96.0.300"),
        "{}",
        inv.invalid[0]
    );
    assert_eq!(inv.invalid_counts()["services"], 1);
}

#[test]
fn errors_name_file_and_object() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ok, namespace: n}\n",
    )
    .unwrap();
    let bad = dir.path().join("b.yaml");
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: n}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 99999}]\n",
    )
    .unwrap();
    // An object the API server would refuse is left out and named; the rest loads.
    let inv = manifest::load_dir(dir.path()).unwrap();
    assert_eq!(inv.counts().pods, 1);
    assert_eq!(inv.invalid.len(), 1);
    assert_eq!(
        inv.invalid[0].to_string(),
        format!(
            "{}: document 2: Pod n/web: spec.containers[0].ports[0].containerPort: Invalid value: 99999: must be between 1 and 65535, inclusive",
            bad.display()
        )
    );

    // A file that is not YAML at all fails the whole load, naming the file.
    fs::write(&bad, "a: [unclosed\n").unwrap();
    let e = manifest::load_dir(dir.path()).unwrap_err();
    assert_eq!(e.path(), bad);

    // Same object in two files.
    fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ok, namespace: n}\n",
    )
    .unwrap();
    let e = manifest::load_dir(dir.path()).unwrap_err();
    assert!(matches!(e, LoadError::Duplicate { .. }), "{e}");
    assert!(e.to_string().contains("a.yaml"), "{e}");

    let e = manifest::load_dir(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e}");
}
