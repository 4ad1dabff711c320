//! Memory of the whole daemon with a 10,000-pod / 2,000-policy cluster, through both inventory
//! sources, at start and over 10 reloads. Run by `cargo xtask bench` (root: the daemon loads its
//! eBPF program), or alone: `cargo bench -p observer --bench inventory_rss` with
//! `DENY_OBSERVER_BIN` naming a release build of the daemon.
//!
//! - **Manifest directory**: the cluster as `kubectl get -A -o yaml` writes it (List documents,
//!   objects with managedFields, annotations and full specs and statuses), then 10 SIGHUP
//!   reloads.
//! - **API server**: the same objects served by a stand-in for the API server's list and watch
//!   endpoints (there is no API server here); each of the 10 reloads ends every open watch with
//!   `410 Gone`, as an API server does when a watch falls out of its window, so the daemon lists
//!   all three resources again. Like an API server, the stand-in pages a list that asks for
//!   `limit` (following `continue`), except a `resourceVersion=0` list, which it serves whole
//!   as the watch cache does. Measured with the daemon's default `--inventory-list paged`, and
//!   for reference (not held to the target) with `--inventory-list cache`.
//!
//! The figure is the daemon's VmRSS (from /proc) once the reload is in use, and its peak
//! (VmHWM). The target: at most 64 MiB at every point, for both sources.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark binary: panicking with context is the right failure"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

const PODS: usize = 10_000;
const POLICIES: usize = 2_000;
const NAMESPACES: usize = 50;
const DEPLOYMENTS: usize = 500;
const RELOADS: usize = 10;
/// The issue's target for the whole daemon.
const TARGET_KIB: u64 = 64 * 1024;

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

/// The ClusterIP Service in front of deployment `d`.
fn synthetic_service(d: usize) -> Service {
    let deploy = format!("service-{d}");
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": deploy, "namespace": format!("team-{}", d % NAMESPACES),
                     "uid": format!("{:08x}-0000-4000-9000-{:012x}", d, d),
                     "resourceVersion": format!("{}", 500 + d),
                     "labels": {"app": deploy}, "managedFields": managed_fields("kubectl")},
        "spec": {"type": "ClusterIP", "selector": {"app": deploy},
                 "clusterIP": format!("10.96.{}.{}", d / 256, d % 256),
                 "clusterIPs": [format!("10.96.{}.{}", d / 256, d % 256)],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
        "status": {"loadBalancer": {}}
    }))
    .expect("service")
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

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// The release daemon: `DENY_OBSERVER_BIN`, else the workspace's `target/release`.
fn daemon_bin() -> PathBuf {
    let bin = std::env::var_os("DENY_OBSERVER_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/deny-observer"),
        PathBuf::from,
    );
    assert!(
        bin.is_file(),
        "no daemon binary at {} (build it with `cargo build --release -p observer`, or set \
         DENY_OBSERVER_BIN; `cargo xtask bench` does both)",
        bin.display()
    );
    bin
}

/// A plain HTTP GET on loopback: status code and body.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// The value of the first sample of `name` whose labels contain `labels`.
fn metric(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let (_, body) = get(addr, "/metrics")?;
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// From spawn to ready with every pod: the first load's time.
    ready_after: Duration,
    _state: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let state = tempfile::tempdir().expect("state dir");
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("run")
            .args(args)
            .args(["--metrics-addr", &addr.to_string(), "--events", "false"])
            .arg("--state-dir")
            .arg(state.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let child = cmd.spawn().expect("start the daemon");
        let mut d = Daemon {
            child,
            addr,
            ready_after: Duration::ZERO,
            _state: state,
        };
        d.wait(Duration::from_secs(180), "ready with every pod", |d| {
            get(d.addr, "/readyz").is_some_and(|(c, _)| c == 200)
                && metric(d.addr, "deny_observer_inventory_objects", "kind=\"pods\"")
                    == Some(PODS as f64)
                && metric(
                    d.addr,
                    "deny_observer_inventory_objects",
                    "kind=\"services\"",
                ) == Some(DEPLOYMENTS as f64)
        });
        d.ready_after = spawned.elapsed();
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(&mut self, timeout: Duration, what: &str, mut cond: impl FnMut(&Daemon) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited ({status}) while waiting: {what}");
            }
            assert!(start.elapsed() < timeout, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// VmRSS once the pipeline has taken in the latest snapshot (it checks at every drain,
    /// once a second, and frees the replaced one then).
    fn settled_rss(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(2500));
        status_kib(self.pid(), "VmRSS:")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// RSS after start and after each reload, and the peak.
struct Series {
    source: &'static str,
    rss: Vec<u64>,
    peak: u64,
    /// VmRSS's anonymous and file-backed (the binary's code) parts at the end, KiB.
    anon_file: (u64, u64),
    ready_after: Duration,
    /// Held to the target (the reference series is only reported).
    held: bool,
}

fn manifest_path(dir: &Path) -> Series {
    let mut d = Daemon::start(
        // No polling: the reloads are the SIGHUPs.
        &[
            "--inventory",
            dir.to_str().expect("utf-8 path"),
            "--inventory-poll-ms",
            "3600000",
        ],
        &[],
    );
    let mut rss = vec![d.settled_rss()];
    for i in 1..=RELOADS {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
        let want = (i + 1) as f64;
        d.wait(Duration::from_secs(120), "reload counted", |d| {
            metric(
                d.addr,
                "deny_observer_inventory_reloads_total",
                "result=\"ok\"",
            )
            .is_some_and(|n| n >= want)
        });
        rss.push(d.settled_rss());
    }
    let peak = status_kib(d.pid(), "VmHWM:");
    Series {
        source: "manifest directory",
        rss,
        peak,
        anon_file: (
            status_kib(d.pid(), "RssAnon:"),
            status_kib(d.pid(), "RssFile:"),
        ),
        ready_after: d.ready_after,
        held: true,
    }
}

fn api_path(server: &FakeApiServer, list: &'static str) -> Series {
    let kubeconfig = tempfile::NamedTempFile::new().expect("kubeconfig");
    std::fs::write(
        kubeconfig.path(),
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: bench\nclusters:\n- name: bench\n  cluster: {{server: \"http://{}\"}}\ncontexts:\n- name: bench\n  context: {{cluster: bench, user: bench}}\nusers:\n- name: bench\n  user: {{token: bench}}\n",
            server.addr
        ),
    )
    .expect("write kubeconfig");
    let mut d = Daemon::start(
        &["--inventory", "kube", "--inventory-list", list],
        &[("KUBECONFIG", kubeconfig.path())],
    );
    let mut rss = vec![d.settled_rss()];
    for _ in 1..=RELOADS {
        let lists = server.pod_lists.load(Ordering::SeqCst);
        server.expire_watches();
        d.wait(Duration::from_secs(120), "pods listed again", |_| {
            server.pod_lists.load(Ordering::SeqCst) > lists
        });
        // The list is served; the daemon converts it and its snapshot task settles.
        std::thread::sleep(Duration::from_secs(2));
        rss.push(d.settled_rss());
    }
    let peak = status_kib(d.pid(), "VmHWM:");
    Series {
        source: if list == "paged" {
            "API server, --inventory-list paged"
        } else {
            "API server, --inventory-list cache (reference)"
        },
        rss,
        peak,
        anon_file: (
            status_kib(d.pid(), "RssAnon:"),
            status_kib(d.pid(), "RssFile:"),
        ),
        ready_after: d.ready_after,
        held: list == "paged",
    }
}

/// Serves `GET` lists and watches of pods, namespaces and NetworkPolicies, the way the API
/// server answers a reflector: a list, then a watch that stays open until
/// [`expire_watches`](Self::expire_watches) ends it with `410 Gone`.
struct FakeApiServer {
    addr: SocketAddr,
    /// Bumped to end every open watch.
    epoch: Arc<AtomicU64>,
    /// Pod lists served to their last page so far.
    pod_lists: Arc<AtomicU64>,
}

/// One resource's list: its kinds and its objects, each already encoded.
struct ListBody {
    kind: &'static str,
    api_version: &'static str,
    items: Vec<Vec<u8>>,
}

impl ListBody {
    fn new(kind: &'static str, api_version: &'static str, items: &[serde_json::Value]) -> Self {
        Self {
            kind,
            api_version,
            items: items
                .iter()
                .map(|i| serde_json::to_vec(i).expect("encode item"))
                .collect(),
        }
    }

    /// The JSON of the page at `offset` of at most `limit` objects, and whether it is the
    /// last. The continue token is the next page's offset.
    fn page(&self, offset: usize, limit: Option<usize>) -> (Vec<u8>, bool) {
        let offset = offset.min(self.items.len());
        let end = limit.map_or(self.items.len(), |l| {
            offset.saturating_add(l.max(1)).min(self.items.len())
        });
        let last = end == self.items.len();
        let meta = if last {
            r#"{"resourceVersion":"1000000"}"#.to_owned()
        } else {
            format!(r#"{{"resourceVersion":"1000000","continue":"{end}"}}"#)
        };
        let mut out = format!(
            r#"{{"kind":"{}","apiVersion":"{}","metadata":{meta},"items":["#,
            self.kind, self.api_version
        )
        .into_bytes();
        for (i, item) in self.items[offset..end].iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(item);
        }
        out.extend_from_slice(b"]}");
        (out, last)
    }
}

impl FakeApiServer {
    fn start(pods: ListBody, namespaces: ListBody, policies: ListBody, services: ListBody) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the API stand-in");
        let addr = listener.local_addr().expect("addr");
        let epoch = Arc::new(AtomicU64::new(0));
        let pod_lists = Arc::new(AtomicU64::new(0));
        let lists = Arc::new([pods, namespaces, policies, services]);
        let (e, pl) = (Arc::clone(&epoch), Arc::clone(&pod_lists));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (lists, e, pl) = (Arc::clone(&lists), Arc::clone(&e), Arc::clone(&pl));
                std::thread::spawn(move || serve_conn(conn, &lists, &e, &pl));
            }
        });
        Self {
            addr,
            epoch,
            pod_lists,
        }
    }

    fn expire_watches(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

fn serve_conn(conn: TcpStream, lists: &[ListBody; 4], epoch: &AtomicU64, pod_lists: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    let mut out = conn;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the blank line (GETs have no body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
        }
        let target = request.split(' ').nth(1).unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let which = match path {
            "/api/v1/pods" => 0,
            "/api/v1/namespaces" => 1,
            "/apis/networking.k8s.io/v1/networkpolicies" => 2,
            "/api/v1/services" => 3,
            _ => {
                let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#;
                let head = format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if out
                    .write_all(head.as_bytes())
                    .and_then(|()| out.write_all(body))
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let ok = if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            let start = epoch.load(Ordering::SeqCst);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            if out
                .write_all(head.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
            while epoch.load(Ordering::SeqCst) == start {
                std::thread::sleep(Duration::from_millis(50));
            }
            let gone = concat!(
                r#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"#,
                r#""status":"Failure","message":"too old resource version","reason":"Expired","code":410}}"#,
                "\n"
            );
            let chunk = format!("{:x}\r\n{gone}\r\n0\r\n\r\n", gone.len());
            out.write_all(chunk.as_bytes()).and_then(|()| out.flush())
        } else {
            let param = |key: &str| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            // The watch cache serves `resourceVersion=0` whole, whatever the limit.
            let limit = match param("resourceVersion") {
                Some("0") => None,
                _ => param("limit").and_then(|l| l.parse::<usize>().ok()),
            };
            let offset = param("continue")
                .and_then(|c| c.parse::<usize>().ok())
                .unwrap_or(0);
            let (body, last) = lists[which].page(offset, limit);
            if which == 0 && last {
                pod_lists.fetch_add(1, Ordering::SeqCst);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            out.write_all(head.as_bytes())
                .and_then(|()| out.write_all(&body))
                .and_then(|()| out.flush())
        };
        if ok.is_err() {
            return;
        }
    }
}

fn yaml_list(path: &Path, items: Vec<serde_json::Value>) {
    let text = serde_yaml::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("encode YAML");
    std::fs::write(path, text).expect("write manifest");
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument keeps only the series whose name
    // contains it (`manifest`, `paged`, `cache`).
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let started = Instant::now();
    let namespaces: Vec<serde_json::Value> = (0..NAMESPACES)
        .map(|i| serde_json::to_value(synthetic_namespace(i)).expect("ns"))
        .collect();
    let pods: Vec<serde_json::Value> = (0..PODS)
        .map(|i| serde_json::to_value(synthetic_pod(i)).expect("pod"))
        .collect();
    let policies: Vec<serde_json::Value> = (0..POLICIES)
        .map(|i| serde_json::to_value(synthetic_policy(i)).expect("policy"))
        .collect();

    let services: Vec<serde_json::Value> = (0..DEPLOYMENTS)
        .map(|d| serde_json::to_value(synthetic_service(d)).expect("service"))
        .collect();

    let dir = tempfile::tempdir().expect("manifest dir");
    yaml_list(&dir.path().join("namespaces.yaml"), namespaces.clone());
    yaml_list(&dir.path().join("pods.yaml"), pods.clone());
    yaml_list(&dir.path().join("networkpolicies.yaml"), policies.clone());
    yaml_list(&dir.path().join("services.yaml"), services.clone());
    let bytes: u64 = [
        "namespaces.yaml",
        "pods.yaml",
        "networkpolicies.yaml",
        "services.yaml",
    ]
    .iter()
    .map(|f| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len()))
    .sum();
    let pod_list = ListBody::new("PodList", "v1", &pods);
    let pod_bytes = pod_list.page(0, None).0.len();
    println!(
        "inventory memory: the pod list is {:.1} MiB of JSON ({} B per pod)",
        pod_bytes as f64 / 1048576.0,
        pod_bytes / PODS
    );
    let server = FakeApiServer::start(
        pod_list,
        ListBody::new("NamespaceList", "v1", &namespaces),
        ListBody::new("NetworkPolicyList", "networking.k8s.io/v1", &policies),
        ListBody::new("ServiceList", "v1", &services),
    );
    println!(
        "inventory memory: {PODS} pods, {POLICIES} policies, {NAMESPACES} namespaces, {DEPLOYMENTS} services ({:.1} MiB of YAML); generated in {:.1?}",
        bytes as f64 / 1048576.0,
        started.elapsed()
    );

    let mut results = Vec::new();
    if wanted("manifest directory") {
        results.push(manifest_path(dir.path()));
    }
    for list in ["paged", "cache"] {
        if wanted(list) {
            results.push(api_path(&server, list));
        }
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut pass = true;
    for s in &results {
        let worst = s.rss.iter().copied().max().unwrap_or(0);
        let ok = worst <= TARGET_KIB;
        pass &= ok || !s.held;
        let series: Vec<String> = s.rss.iter().map(|k| format!("{:.1}", mib(*k))).collect();
        println!(
            "inventory memory [{}]: ready after {:.1?}; RSS after start {:.1} MiB, after {RELOADS} reloads {:.1} MiB, max {:.1} MiB, peak (VmHWM) {:.1} MiB; target ≤ {} MiB: {}",
            s.source,
            s.ready_after,
            mib(s.rss[0]),
            mib(*s.rss.last().unwrap_or(&0)),
            mib(worst),
            mib(s.peak),
            TARGET_KIB / 1024,
            match (ok, s.held) {
                (true, _) => "PASS",
                (false, true) => "FAIL",
                (false, false) => "over (reference only)",
            }
        );
        println!(
            "inventory memory [{}]: RSS per reload (MiB): {}; at the end {:.1} MiB anonymous, {:.1} MiB file-backed",
            s.source,
            series.join(" "),
            mib(s.anon_file.0),
            mib(s.anon_file.1)
        );
    }
    if !pass {
        eprintln!(
            "inventory memory: FAIL (RSS above {} MiB)",
            TARGET_KIB / 1024
        );
        std::process::exit(1);
    }
}
