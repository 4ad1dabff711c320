//! Memory of the API-server inventory: a synthetic 10,000-pod / 2,000-policy cluster fed through
//! the reflector stores exactly as the watchers feed them (trim, then `apply_watcher_event`),
//! then converted into an `Inventory` snapshot and an attribution index.
//!
//! Run: `cargo bench -p observer --bench inventory_rss`. It prints the resident set size
//! (VmRSS, from /proc/self/status) before and after, the peak (VmHWM), and, for comparison, the
//! same cluster stored untrimmed (measured in a child process so the two do not share a heap).
//!
//! Objects are generated one at a time and dropped after they enter the store, like objects
//! arriving from a watch, so the figure is what the daemon keeps, not what the generator held.

#![allow(
    clippy::expect_used,
    reason = "a benchmark binary: panicking with context is the right failure"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::Event;
use observer::inventory::kube::{SnapshotBuilder, stores, trim_namespace, trim_pod, trim_policy};
use observer::inventory::{Attributor, NodeAddrs};
use serde_json::json;

/// Counts live heap bytes, so the figure can be split into what is kept and what the allocator
/// holds on to (fragmentation left by the full objects that were trimmed).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_kib() -> usize {
    LIVE.load(Ordering::Relaxed) / 1024
}

const PODS: usize = 10_000;
const POLICIES: usize = 2_000;
const NAMESPACES: usize = 50;
const DEPLOYMENTS: usize = 500;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

fn managed_fields(manager: &str) -> serde_json::Value {
    // Shaped like what kubelet and kube-controller-manager write: the bulk of a real object.
    json!([
        {"manager": manager, "operation": "Update", "apiVersion": "v1",
         "time": "2025-03-01T10:00:00Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {},
            "f:pod-template-hash": {}, "f:team": {}, "f:version": {}},
            "f:ownerReferences": {".": {}, "k:{\"uid\":\"abc\"}": {}}},
            "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {},
            "f:imagePullPolicy": {}, "f:name": {}, "f:ports": {}, "f:resources": {}}},
            "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
         "time": "2025-03-01T10:00:05Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {},
            "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
            "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {},
            "f:podIPs": {".": {}, "k:{\"ip\":\"10.0.0.1\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}}}
    ])
}

fn synthetic_pod(i: usize) -> Pod {
    let ns = format!("team-{}", i % NAMESPACES);
    let deploy = format!("service-{}", i % DEPLOYMENTS);
    let hash = format!("{:010x}", (i % DEPLOYMENTS) * 7919);
    let name = format!("{deploy}-{hash}-{:05x}", i);
    let ip = format!("10.{}.{}.{}", 1 + i / 65_536, (i / 256) % 256, i % 256);
    let env: Vec<_> = (0..8)
        .map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}-{i}")}))
        .collect();
    let container = |cname: &str, port: i32| {
        json!({"name": cname, "image": format!("registry.example.com/{deploy}:{}", i % 17),
               "imagePullPolicy": "IfNotPresent", "args": ["--config", "/etc/app/config.yaml"],
               "env": env, "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
               "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                             "limits": {"cpu": "1", "memory": "512Mi"}},
               "volumeMounts": [{"name": "config", "mountPath": "/etc/app"},
                                {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
               "readinessProbe": {"httpGet": {"path": "/ready", "port": port}, "periodSeconds": 10},
               "terminationMessagePath": "/dev/termination-log"})
    };
    let conditions: Vec<_> = ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": "2025-03-01T10:00:03Z"}))
        .collect();
    let container_statuses: Vec<_> = ["app", "metrics"]
        .iter()
        .map(|c| {
            json!({
                "name": c, "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.example.com/{deploy}:1"),
                "imageID": format!("registry.example.com/{deploy}@sha256:{:064x}", i),
                "containerID": format!("containerd://{:064x}", i + 1),
                "state": {"running": {"startedAt": "2025-03-01T10:00:02Z"}}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, i),
            "generateName": format!("{deploy}-{hash}-"), "resourceVersion": format!("{}", 1000 + i),
            "creationTimestamp": "2025-03-01T10:00:00Z",
            "labels": {"app": deploy, "pod-template-hash": hash, "team": format!("team-{}", i % NAMESPACES),
                       "version": format!("v{}", i % 5), "app.kubernetes.io/part-of": "shop"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                            "kubectl.kubernetes.io/restartedAt": "2025-03-01T09:59:00Z",
                            "cni.projectcalico.org/podIP": format!("{ip}/32"),
                            "cni.projectcalico.org/containerID": format!("{:064x}", i)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{deploy}-{hash}"), "uid": "abc",
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kube-controller-manager")
        },
        "spec": {
            "nodeName": format!("node-{}", i % 100), "serviceAccountName": deploy,
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "containers": [container("app", 8080), container("metrics", 9090)],
            "volumes": [{"name": "config", "configMap": {"name": format!("{deploy}-config")}},
                        {"name": "kube-api-access", "projected": {"sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.10",
            "startTime": "2025-03-01T10:00:01Z", "qosClass": "Burstable",
            "conditions": conditions,
            "containerStatuses": container_statuses
        }
    }))
    .expect("synthetic pod")
}

fn synthetic_policy(i: usize) -> NetworkPolicy {
    let ns = format!("team-{}", i % NAMESPACES);
    let spec = json!({
        "podSelector": {"matchLabels": {"app": format!("service-{}", i % DEPLOYMENTS)}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"app": format!("service-{}", (i + 1) % DEPLOYMENTS)}}},
            {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", (i + 3) % NAMESPACES)}},
             "podSelector": {"matchExpressions": [{"key": "version", "operator": "In", "values": ["v1", "v2"]}]}}],
            "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": "http"}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.255.0.0/16"]}}],
                    "ports": [{"protocol": "UDP", "port": 53}]}]
    });
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": ns, "uid": format!("p-{i}"),
                     "resourceVersion": format!("{}", 50_000 + i), "generation": 1,
                     "creationTimestamp": "2025-03-01T10:00:00Z",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": spec.to_string(),
                                     "deny-observer.io/owner": format!("team-{}", i % NAMESPACES)},
                     "managedFields": managed_fields("kubectl-client-side-apply")},
        "spec": spec
    }))
    .expect("synthetic policy")
}

fn synthetic_namespace(i: usize) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": format!("team-{i}"), "resourceVersion": "5",
                     "labels": {"kubernetes.io/metadata.name": format!("team-{i}"), "team": format!("team-{i}")},
                     "managedFields": managed_fields("kubectl")},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    }))
    .expect("synthetic namespace")
}

/// Fills the stores, builds the snapshot and the attribution index; returns the RSS after.
fn run(trimmed: bool) {
    let rss_before = status_kib("VmRSS:");
    let live_before = live_kib();
    let (stores, mut writers) = stores();

    let started = Instant::now();
    writers.namespaces.apply_watcher_event(&Event::Init);
    for i in 0..NAMESPACES {
        let mut ns = synthetic_namespace(i);
        if trimmed {
            trim_namespace(&mut ns);
        }
        writers
            .namespaces
            .apply_watcher_event(&Event::InitApply(ns));
    }
    writers.namespaces.apply_watcher_event(&Event::InitDone);
    let live_pods_start = live_kib();
    writers.pods.apply_watcher_event(&Event::Init);
    for i in 0..PODS {
        let mut pod = synthetic_pod(i);
        if trimmed {
            trim_pod(&mut pod);
        }
        writers.pods.apply_watcher_event(&Event::InitApply(pod));
    }
    writers.pods.apply_watcher_event(&Event::InitDone);
    let live_pods = live_kib().saturating_sub(live_pods_start);
    writers.policies.apply_watcher_event(&Event::Init);
    for i in 0..POLICIES {
        let mut np = synthetic_policy(i);
        if trimmed {
            trim_policy(&mut np);
        }
        writers.policies.apply_watcher_event(&Event::InitApply(np));
    }
    writers.policies.apply_watcher_event(&Event::InitDone);
    let fill = started.elapsed();
    let rss_stores = status_kib("VmRSS:");
    let live_stores = live_kib();
    println!(
        "{}: live heap of the pod store {live_pods} KiB ({} B/pod), policy store {} KiB",
        if trimmed { "trimmed" } else { "untrimmed" },
        live_pods * 1024 / PODS,
        live_stores.saturating_sub(live_pods_start + live_pods)
    );

    let mut builder = SnapshotBuilder::new();
    let started = Instant::now();
    let build = builder.build(&stores);
    let first_build = started.elapsed();
    assert!(
        build.inventory.invalid.is_empty(),
        "{:?}",
        build.inventory.invalid.first()
    );
    assert_eq!(build.inventory.pods.len(), PODS);
    assert_eq!(build.inventory.policies.len(), POLICIES);
    let attributor = Attributor::new(&build.inventory, NodeAddrs::new([]));
    assert_eq!(attributor.pod_ips(), PODS);
    let rss_after = status_kib("VmRSS:");
    let live_after = live_kib();

    // One pod changes: the rebuild reuses every other conversion.
    let mut changed = synthetic_pod(7);
    changed.status.as_mut().expect("status").phase = Some("Succeeded".into());
    if trimmed {
        trim_pod(&mut changed);
    }
    writers.pods.apply_watcher_event(&Event::Apply(changed));
    let started = Instant::now();
    let rebuilt = builder.build(&stores);
    let rebuild = started.elapsed();
    assert!(rebuilt.changed);

    let mode = if trimmed { "trimmed" } else { "untrimmed" };
    println!(
        "{mode}: {PODS} pods, {POLICIES} policies, {NAMESPACES} namespaces\n\
         {mode}:   VmRSS before        {:>8} KiB\n\
         {mode}:   VmRSS stores filled {:>8} KiB  (+{} KiB, fill {:?})\n\
         {mode}:   VmRSS + snapshot    {:>8} KiB  (+{} KiB total; snapshot+index +{} KiB, build {:?})\n\
         {mode}:   VmHWM (peak)        {:>8} KiB\n\
         {mode}:   live heap: stores {} KiB ({} B/pod incl. policies), snapshot+index {} KiB\n\
         {mode}:   incremental rebuild after one pod change: {:?}",
        rss_before,
        rss_stores,
        rss_stores.saturating_sub(rss_before),
        fill,
        rss_after,
        rss_after.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_stores),
        first_build,
        status_kib("VmHWM:"),
        live_stores.saturating_sub(live_before),
        live_stores.saturating_sub(live_before) * 1024 / PODS,
        live_after.saturating_sub(live_stores),
        rebuild,
    );
    drop((attributor, rebuilt, build, builder, writers, stores));
}

fn main() {
    if std::env::args().any(|a| a == "--untrimmed-child") {
        run(false);
        return;
    }
    run(true);
    // The untrimmed comparison in a fresh process: freed heap is not returned to the kernel,
    // so measuring it here would be meaningless.
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .arg("--untrimmed-child")
        .output()
        .expect("run untrimmed comparison");
    assert!(
        out.status.success(),
        "untrimmed child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
