//! The API-server inventory with reflector stores filled directly (no API server):
//! IP reuse, host networking, workload resolution, namespace label changes, and new snapshots
//! when a policy changes (what invalidates the verdict cache).

#![allow(
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::net::IpAddr;
use std::sync::Arc;

use crate::inventory::kube::{
    SnapshotBuilder, Stores, Writers, stores, trim_namespace, trim_pod, trim_policy,
};
use crate::inventory::{Attributor, Endpoint, Inventory, NodeAddrs, Workload};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use serde_json::json;

const NODE_IP: &str = "192.168.10.1";

struct Cluster {
    stores: Stores,
    writers: Writers,
    builder: SnapshotBuilder,
}

impl Cluster {
    /// Stores after an initial list of `namespaces`, `pods` and `policies` (Init, InitApply
    /// for each object, InitDone: what the watcher emits on its first list).
    fn listed(namespaces: Vec<Namespace>, pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> Self {
        let (stores, mut writers) = stores();
        writers.namespaces.apply_watcher_event(&Event::Init);
        for mut ns in namespaces {
            trim_namespace(&mut ns);
            writers
                .namespaces
                .apply_watcher_event(&Event::InitApply(ns));
        }
        writers.namespaces.apply_watcher_event(&Event::InitDone);
        writers.pods.apply_watcher_event(&Event::Init);
        for mut p in pods {
            trim_pod(&mut p);
            writers.pods.apply_watcher_event(&Event::InitApply(p));
        }
        writers.pods.apply_watcher_event(&Event::InitDone);
        writers.policies.apply_watcher_event(&Event::Init);
        for mut np in policies {
            trim_policy(&mut np);
            writers.policies.apply_watcher_event(&Event::InitApply(np));
        }
        writers.policies.apply_watcher_event(&Event::InitDone);
        Self {
            stores,
            writers,
            builder: SnapshotBuilder::new(),
        }
    }

    fn apply_pod(&mut self, mut p: Pod) {
        trim_pod(&mut p);
        self.writers.pods.apply_watcher_event(&Event::Apply(p));
    }

    fn build(&mut self) -> (Arc<Inventory>, bool) {
        let b = self.builder.build(&self.stores);
        assert!(b.inventory.invalid.is_empty(), "{:?}", b.inventory.invalid);
        (b.inventory, b.changed)
    }

    fn attributor(&mut self) -> Attributor {
        let (inv, _) = self.build();
        Attributor::new(&inv, NodeAddrs::new([ip(NODE_IP)]))
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn ns(name: &str, labels: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "resourceVersion": "1",
                     "managedFields": [{"manager": "kubectl"}]}
    }))
    .expect("namespace")
}

#[allow(clippy::too_many_arguments)]
fn pod(namespace: &str, name: &str, phase: &str, pod_ip: &str, created: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "creationTimestamp": created, "labels": {"app": name}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
    }))
    .expect("pod")
}

fn owned_pod(
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    owner: (&str, &str, &str),
) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "creationTimestamp": "2025-01-01T00:00:00Z",
                     "ownerReferences": [{"apiVersion": owner.0, "kind": owner.1, "name": owner.2,
                                          "uid": "x", "controller": true}]},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.0.5.1"}
    }))
    .expect("pod")
}

fn policy(namespace: &str, name: &str, app: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "7",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}]}
    }))
    .expect("policy")
}

fn pod_name(e: &Endpoint) -> String {
    match e {
        Endpoint::Pod(p) => format!("{}/{}", p.namespace, p.name),
        other => format!("{other:?}"),
    }
}

#[test]
fn ip_reuse_running_pod_wins_over_terminated_one() {
    // The finished Job pod is newer than the running pod: phase must win over age.
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![
            pod(
                "prod",
                "old-job",
                "Succeeded",
                "10.0.0.7",
                "2025-01-02T00:00:00Z",
            ),
            pod("prod", "web", "Running", "10.0.0.7", "2025-01-01T00:00:00Z"),
        ],
        vec![],
    );
    assert_eq!(pod_name(&c.attributor().lookup(ip("10.0.0.7"))), "prod/web");

    // The Running pod goes; a Pending one takes the IP: Pending beats the terminated pod.
    c.writers.pods.apply_watcher_event(&Event::Delete(pod(
        "prod",
        "web",
        "Running",
        "10.0.0.7",
        "2025-01-01T00:00:00Z",
    )));
    c.apply_pod(pod(
        "prod",
        "new",
        "Pending",
        "10.0.0.7",
        "2024-12-01T00:00:00Z",
    ));
    assert_eq!(pod_name(&c.attributor().lookup(ip("10.0.0.7"))), "prod/new");

    // Two Running claimants: the newest wins.
    c.apply_pod(pod(
        "prod",
        "newer",
        "Running",
        "10.0.0.7",
        "2025-02-01T00:00:00Z",
    ));
    c.apply_pod(pod(
        "prod",
        "new",
        "Running",
        "10.0.0.7",
        "2024-12-01T00:00:00Z",
    ));
    assert_eq!(
        pod_name(&c.attributor().lookup(ip("10.0.0.7"))),
        "prod/newer"
    );
}

#[test]
fn host_network_pods_never_own_an_ip() {
    let mut hostnet = pod(
        "kube-system",
        "kube-proxy-x",
        "Running",
        "192.168.10.2",
        "2025-01-01T00:00:00Z",
    );
    hostnet.spec.as_mut().expect("spec").host_network = Some(true);
    let mut local = pod(
        "kube-system",
        "node-exporter",
        "Running",
        NODE_IP,
        "2025-01-01T00:00:00Z",
    );
    local.spec.as_mut().expect("spec").host_network = Some(true);
    let mut c = Cluster::listed(
        vec![ns("kube-system", json!({}))],
        vec![hostnet, local],
        vec![],
    );
    let a = c.attributor();
    assert_eq!(a.lookup(ip("192.168.10.2")), Endpoint::Host);
    assert_eq!(a.lookup(ip(NODE_IP)), Endpoint::Node);
    assert_eq!(a.pod_ips(), 0);
}

#[test]
fn workloads_are_resolved_from_owners() {
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![
            owned_pod(
                "prod",
                "web-7d4b9c8f6-xk2lp",
                json!({"pod-template-hash": "7d4b9c8f6"}),
                ("apps/v1", "ReplicaSet", "web-7d4b9c8f6"),
            ),
            owned_pod("prod", "db-0", json!({}), ("apps/v1", "StatefulSet", "db")),
            owned_pod(
                "prod",
                "agent-abcde",
                json!({}),
                ("apps/v1", "DaemonSet", "agent"),
            ),
            owned_pod(
                "prod",
                "backup-29012345-x7k2p",
                json!({}),
                ("batch/v1", "Job", "backup-29012345"),
            ),
            owned_pod(
                "prod",
                "migrate-abcde",
                json!({}),
                ("batch/v1", "Job", "migrate"),
            ),
        ],
        vec![],
    );
    let (inv, _) = c.build();
    let workloads: Vec<(String, Workload)> = inv
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.workload.clone()))
        .collect();
    let w = |kind: &str, name: &str| Workload {
        kind: kind.into(),
        name: name.into(),
    };
    assert_eq!(
        workloads,
        vec![
            ("agent-abcde".into(), w("DaemonSet", "agent")),
            ("backup-29012345-x7k2p".into(), w("CronJob", "backup")),
            ("db-0".into(), w("StatefulSet", "db")),
            ("migrate-abcde".into(), w("Job", "migrate")),
            ("web-7d4b9c8f6-xk2lp".into(), w("Deployment", "web")),
        ]
    );
}

#[test]
fn namespace_label_changes_are_reflected() {
    let mut c = Cluster::listed(vec![ns("dev", json!({"team": "a"}))], vec![], vec![]);
    let (first, _) = c.build();
    assert_eq!(first.namespaces["dev"].labels.get("team"), Some("a"));
    // The API server's own label survives trimming.
    let mut relabelled = ns(
        "dev",
        json!({"team": "b", "kubernetes.io/metadata.name": "dev"}),
    );
    trim_namespace(&mut relabelled);
    c.writers
        .namespaces
        .apply_watcher_event(&Event::Apply(relabelled));
    let (second, changed) = c.build();
    assert!(changed);
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(second.namespaces["dev"].labels.get("team"), Some("b"));
    assert_eq!(
        second.namespaces["dev"]
            .labels
            .get("kubernetes.io/metadata.name"),
        Some("dev")
    );
}

#[test]
fn policy_change_gives_a_new_snapshot_and_no_change_keeps_it() {
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![pod(
            "prod",
            "db",
            "Running",
            "10.0.0.9",
            "2025-01-01T00:00:00Z",
        )],
        vec![policy("prod", "allow-web-to-db", "web")],
    );
    let (first, changed) = c.build();
    assert!(changed);
    assert_eq!(first.policies.len(), 1);
    assert!(first.policies[0].metadata.annotations.is_none());
    assert!(first.policies[0].metadata.resource_version.is_none());

    // A re-delivered but identical object (e.g. after a relist) keeps the snapshot, so the
    // verdict cache is not flushed for nothing.
    let mut same = policy("prod", "allow-web-to-db", "web");
    trim_policy(&mut same);
    c.writers.policies.apply_watcher_event(&Event::Apply(same));
    let (again, changed) = c.build();
    assert!(!changed);
    assert!(Arc::ptr_eq(&first, &again));

    // The rule changes: a new snapshot with the new rule.
    let mut edited = policy("prod", "allow-web-to-db", "api");
    trim_policy(&mut edited);
    c.writers
        .policies
        .apply_watcher_event(&Event::Apply(edited));
    let (second, changed) = c.build();
    assert!(changed);
    assert!(!Arc::ptr_eq(&first, &second));
    let from = serde_json::to_value(&second.policies[0].spec).expect("json");
    assert_eq!(
        from["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"],
        "api"
    );
    // Unchanged pods are shared between snapshots, not converted again.
    assert!(Arc::ptr_eq(&first.pods[0], &second.pods[0]));

    // Deleted: gone from the next snapshot.
    c.writers
        .policies
        .apply_watcher_event(&Event::Delete(policy("prod", "allow-web-to-db", "api")));
    let (third, changed) = c.build();
    assert!(changed);
    assert!(third.policies.is_empty());
}

#[test]
fn relist_replaces_the_store_atomically() {
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![
            pod("prod", "a", "Running", "10.0.0.1", "2025-01-01T00:00:00Z"),
            pod("prod", "b", "Running", "10.0.0.2", "2025-01-01T00:00:00Z"),
        ],
        vec![],
    );
    assert_eq!(c.build().0.pods.len(), 2);
    // A relist after a 410 Gone: "b" was deleted while the watch was down.
    c.writers.pods.apply_watcher_event(&Event::Init);
    let mut a = pod("prod", "a", "Running", "10.0.0.1", "2025-01-01T00:00:00Z");
    trim_pod(&mut a);
    c.writers.pods.apply_watcher_event(&Event::InitApply(a));
    // Until InitDone the last full inventory stays in use.
    assert_eq!(c.build().0.pods.len(), 2);
    c.writers.pods.apply_watcher_event(&Event::InitDone);
    let (inv, changed) = c.build();
    assert!(changed);
    let names: Vec<&str> = inv.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["a"]);
}

#[test]
fn unconvertible_pod_is_left_out_and_reported() {
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![
            pod(
                "prod",
                "good",
                "Running",
                "10.0.0.1",
                "2025-01-01T00:00:00Z",
            ),
            pod(
                "prod",
                "bad",
                "Running",
                "10.0.0.300",
                "2025-01-01T00:00:00Z",
            ),
        ],
        vec![],
    );
    let b = c.builder.build(&c.stores);
    assert_eq!(b.inventory.pods.len(), 1);
    assert_eq!(b.inventory.invalid.len(), 1);
    assert_eq!(
        b.inventory.invalid[0].to_string(),
        "Pod prod/bad: status.podIPs[0]: Invalid value: \"10.0.0.300\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    );
    assert_eq!(b.inventory.invalid_counts()["pods"], 1);
    // Reported once: a rebuild with nothing new has nothing newly invalid.
    assert_eq!(b.newly_invalid.len(), 1);
    let b = c.builder.build(&c.stores);
    assert!(b.newly_invalid.is_empty());
    assert_eq!(b.inventory.invalid.len(), 1);
}

/// A policy the API server should have refused (a newer or patched server, version skew) is
/// left out and reported exactly as the manifest loader does, once per change.
#[test]
fn invalid_policy_from_the_api_server_is_left_out_and_reported() {
    let mut bad = policy("prod", "typo", "web");
    if let Some(spec) = bad.spec.as_mut() {
        spec.policy_types = Some(vec!["Ingres".into()]);
    }
    let mut c = Cluster::listed(
        vec![ns("prod", json!({}))],
        vec![],
        vec![policy("prod", "good", "web"), bad],
    );
    let b = c.builder.build(&c.stores);
    let names: Vec<_> = b
        .inventory
        .policies
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(
        b.inventory
            .invalid
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "NetworkPolicy prod/typo: spec.policyTypes[0]: Unsupported value: \"Ingres\": supported values: \"Ingress\", \"Egress\""
        ]
    );
    assert_eq!(b.inventory.invalid_counts()["networkpolicies"], 1);
    assert_eq!(b.newly_invalid.len(), 1);

    // Fixed by an update: it joins the inventory and the invalid list empties.
    let mut fixed = policy("prod", "typo", "web");
    trim_policy(&mut fixed);
    c.writers.policies.apply_watcher_event(&Event::Apply(fixed));
    let b = c.builder.build(&c.stores);
    assert!(b.changed);
    assert_eq!(b.inventory.policies.len(), 2);
    assert!(b.inventory.invalid.is_empty());
    assert!(b.newly_invalid.is_empty());
}

fn service(
    namespace: &str,
    name: &str,
    spec: serde_json::Value,
) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "3",
                     "managedFields": [{"manager": "kube-controller-manager"}]},
        "spec": spec
    }))
    .expect("service")
}

/// A client pod dials Service ClusterIPs; the backend's accepting end is the edge. The opening
/// end is attributed to the Service, never to `private`, and a Service the stores no longer
/// hold stops claiming its address.
#[test]
fn service_cluster_ips_take_the_opening_end_off_the_edges() {
    use crate::attribute::Views;
    use crate::capture::connections::{Connection, ConnectionReport, Side};
    use crate::export::connections::{ConnectionLabels, ServiceConnectionLabels, attribute};
    use crate::flow::Protocol;

    let mut c = Cluster::listed(
        vec![ns("shop", json!({})), ns("dev", json!({}))],
        vec![
            pod(
                "dev",
                "client",
                "Running",
                "10.0.1.1",
                "2025-01-01T00:00:00Z",
            ),
            pod("shop", "web", "Running", "10.0.2.2", "2025-01-01T00:00:00Z"),
        ],
        vec![],
    );
    c.writers.services.apply_watcher_event(&Event::Init);
    for svc in [
        service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                   "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80, "targetPort": 8080}]}),
        ),
        service("shop", "web-headless", json!({"clusterIP": "None"})),
        service(
            "shop",
            "ext",
            json!({"type": "ExternalName", "externalName": "db.example.com"}),
        ),
    ] {
        c.writers
            .services
            .apply_watcher_event(&Event::InitApply(svc));
    }
    c.writers.services.apply_watcher_event(&Event::InitDone);
    let (inv, _) = c.build();
    assert_eq!(
        inv.services.len(),
        1,
        "headless and ExternalName have no address"
    );
    assert_eq!(inv.counts().services, 1);
    let mut views = Views::new(Arc::clone(&inv), NodeAddrs::new([ip(NODE_IP)]));

    let conn = |src: &str, dst: &str, port, side, count| Connection {
        src: ip(src),
        dst: ip(dst),
        protocol: Protocol::Tcp,
        dst_port: port,
        side,
        count,
    };
    // Both pods on this node: the client's end names the ClusterIP (v4 and v6), the backend's
    // end names the pods. 10.96.0.99 is no Service's: still a private destination.
    let report = ConnectionReport {
        connections: vec![
            conn("10.0.1.1", "10.96.0.20", 80, Side::Connect, 3),
            conn("fd00:1::1", "fd00:96::20", 80, Side::Connect, 2),
            conn("10.0.1.1", "10.0.2.2", 8080, Side::Accept, 3),
            conn("10.0.1.1", "10.96.0.99", 80, Side::Connect, 4),
        ],
        ..ConnectionReport::default()
    };
    let edge = |dn: &str, dw: &str, port| ConnectionLabels {
        source_namespace: "dev".into(),
        source_workload: "client".into(),
        destination_namespace: dn.into(),
        destination_workload: dw.into(),
        protocol: Protocol::Tcp,
        port,
    };
    let got = attribute(&report, |a| views.endpoint(a), |a| views.service(a));
    assert_eq!(got.edges.len(), 2, "{:?}", got.edges);
    assert_eq!(got.edges[&edge("shop", "web", 8080)], 3);
    assert_eq!(got.edges[&edge("", "private", 80)], 4);
    // The v6 client address is no pod's, so only the v4 opening end is pod traffic.
    assert_eq!(
        got.services.iter().collect::<Vec<_>>(),
        [(
            &ServiceConnectionLabels {
                source_namespace: "dev".into(),
                source_workload: "client".into(),
                service_namespace: "shop".into(),
                service: "web".into(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            &3
        )]
    );
    assert_eq!(
        views.service(ip("fd00:96::20")).map(|s| s.name.as_str()),
        Some("web")
    );

    // The Service is deleted: its address is private again once the views take the snapshot.
    c.writers
        .services
        .apply_watcher_event(&Event::Delete(service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.20"}),
        )));
    let (next, changed) = c.build();
    assert!(changed);
    assert!(next.services.is_empty());
    views.update(next);
    let got = attribute(&report, |a| views.endpoint(a), |a| views.service(a));
    assert!(got.services.is_empty(), "{:?}", got.services);
    assert_eq!(got.edges[&edge("", "private", 80)], 7);
}

#[test]
fn relabelled_pods_free_their_old_label_sets() {
    // Unique values: the interner is process-wide and other tests run concurrently.
    let value = |generation: usize| format!("watch-{generation}-5e1d");
    let labelled = |generation: usize| {
        owned_pod(
            "prod",
            "web-abc-1",
            json!({"app": "web", "intern-watch-test": value(generation)}),
            ("apps/v1", "ReplicaSet", "web-abc"),
        )
    };
    let mut c = Cluster::listed(vec![ns("prod", json!({}))], vec![labelled(0)], vec![]);
    let (mut current, _) = c.build();
    for generation in 1..5 {
        c.apply_pod(labelled(generation));
        let (next, changed) = c.build();
        assert!(changed);
        // As the daemon does: the previous snapshot is dropped once the new one is in use.
        current = next;
    }
    assert_eq!(
        current.pods[0].labels.get("intern-watch-test"),
        Some(value(4).as_str())
    );
    assert!(crate::inventory::labels::is_interned(&value(4)));
    // Generation 3 was still in use while generation 4's snapshot was built.
    for generation in 0..=2 {
        assert!(
            !crate::inventory::labels::is_interned(&value(generation)),
            "generation {generation}'s labels outlived two snapshots"
        );
    }
}
