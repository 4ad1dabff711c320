//! `KubeInventory` against a fake API server (tower-test): the initial list and watch of each
//! resource, and watch errors (500 on a list, 410 Gone during a watch) that are counted and
//! recovered from while the last inventory stays usable. Each request's method and path is
//! asserted.

#![allow(
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use observer::inventory::Inventory;
use observer::inventory::kube::{
    KubeInventory, KubeInventoryConfig, ListStrategy, WatchErrorCounter,
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

pub(crate) type MockHandle = Handle<Request<Body>, Response<Body>>;

/// A scripted answer.
pub(crate) enum Reply {
    /// Status code and JSON body.
    Json(u16, Value),
    /// Newline-delimited watch events, then the end of the stream.
    Events(Vec<Value>),
}

/// What the fake API server answers, per (path, is-watch), in order. Once a script runs out,
/// the request is held open (a quiet watch).
#[derive(Default)]
pub(crate) struct Script {
    replies: HashMap<(String, bool), VecDeque<Reply>>,
}

impl Script {
    pub(crate) fn on(mut self, path: &str, watch: bool, reply: Reply) -> Self {
        self.replies
            .entry((path.to_owned(), watch))
            .or_default()
            .push_back(reply);
        self
    }
}

/// One request as seen by the fake server.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    method: Method,
    path: String,
    query: String,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

pub(crate) fn serve(handle: MockHandle, mut script: Script) -> Arc<Mutex<Vec<Seen>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut held: Vec<SendResponse<Response<Body>>> = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let s = Seen {
                method: request.method().clone(),
                path: request.uri().path().to_owned(),
                query: request.uri().query().unwrap_or("").to_owned(),
            };
            seen.lock().expect("log").push(s.clone());
            let reply = script
                .replies
                .get_mut(&(s.path.clone(), s.is_watch()))
                .and_then(VecDeque::pop_front);
            match reply {
                Some(Reply::Json(status, body)) => send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&body).expect("encode")))
                        .expect("response"),
                ),
                Some(Reply::Events(events)) => {
                    let mut bytes = Vec::new();
                    for e in events {
                        bytes.extend(serde_json::to_vec(&e).expect("encode"));
                        bytes.push(b'\n');
                    }
                    send.send_response(Response::new(Body::from(bytes)));
                }
                None => held.push(send),
            }
        }
    });
    log
}

pub(crate) fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Reply {
    Reply::Json(
        200,
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

pub(crate) fn ns(name: &str, team: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": "1",
                        "labels": {"kubernetes.io/metadata.name": name, "team": team}}})
}

pub(crate) fn pod(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv,
                        "labels": {"app": name},
                        "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
           "spec": {"containers": [{"name": "c", "image": "i"}]},
           "status": {"phase": "Running", "podIP": ip}})
}

pub(crate) fn policy(name: &str, app: &str, rv: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv,
                        "annotations": {"deny-observer.io/owner": "team-a", "noise": "x"}},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}]}})
}

pub(crate) fn event(type_: &str, object: Value) -> Value {
    json!({"type": type_, "object": object})
}

pub(crate) const PODS: &str = "/api/v1/pods";
pub(crate) const NAMESPACES: &str = "/api/v1/namespaces";
pub(crate) const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
pub(crate) const SERVICES: &str = "/api/v1/services";

/// A Service in prod; one with ClusterIPs selects `app: <name>` and maps port 80 to the pods'
/// port `http`; a headless one has no selector either (nothing to attribute or name).
fn svc(name: &str, cluster_ips: &[&str], rv: &str) -> Value {
    let mut spec = json!({"clusterIP": cluster_ips.first().copied().unwrap_or("None"),
                          "clusterIPs": cluster_ips, "ports": [{"port": 80}]});
    if !cluster_ips.is_empty() {
        spec["selector"] = json!({"app": name});
        spec["ports"] = json!([{"name": "web", "port": 80, "targetPort": "http"}]);
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv},
           "spec": spec})
}

pub(crate) fn no_services() -> Reply {
    list("Service", "v1", "1", vec![])
}

fn error_counter() -> (WatchErrorCounter, Arc<Mutex<HashMap<String, u64>>>) {
    let counts = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let c = Arc::clone(&counts);
    let counter: WatchErrorCounter = Arc::new(move |resource: &str| {
        *c.lock()
            .expect("counts")
            .entry(resource.to_owned())
            .or_default() += 1;
    });
    (counter, counts)
}

fn config() -> KubeInventoryConfig {
    KubeInventoryConfig {
        node_name: Some("node-a".into()),
        debounce: Duration::from_millis(20),
        list: ListStrategy::default(),
    }
}

async fn wait_for(
    inv: &KubeInventory,
    what: &str,
    pred: impl FnMut(&Arc<Inventory>) -> bool,
) -> Arc<Inventory> {
    let mut rx = inv.subscribe();
    let got = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("snapshot channel closed");
    Arc::clone(&got)
}

fn requests_for(log: &Arc<Mutex<Vec<Seen>>>, path: &str) -> Vec<Seen> {
    log.lock()
        .expect("log")
        .iter()
        .filter(|s| s.path == path)
        .cloned()
        .collect()
}

#[tokio::test]
async fn initial_list_then_watch_for_each_resource() {
    let script = Script::default()
        .on(
            NAMESPACES,
            false,
            list("Namespace", "v1", "100", vec![ns("prod", "a")]),
        )
        .on(
            NAMESPACES,
            true,
            Reply::Events(vec![event("MODIFIED", ns("prod", "b"))]),
        )
        .on(
            PODS,
            false,
            list("Pod", "v1", "200", vec![pod("web", "10.0.0.1", "200")]),
        )
        .on(
            PODS,
            true,
            Reply::Events(vec![
                event("ADDED", pod("db", "10.0.0.2", "201")),
                event("DELETED", pod("web", "10.0.0.1", "202")),
            ]),
        )
        .on(
            POLICIES,
            false,
            list(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "300",
                vec![policy("allow-web", "web", "300")],
            ),
        )
        .on(
            POLICIES,
            true,
            Reply::Events(vec![event("MODIFIED", policy("allow-web", "api", "301"))]),
        )
        .on(
            SERVICES,
            false,
            list(
                "Service",
                "v1",
                "400",
                vec![svc("web", &["10.96.0.10"], "400"), svc("db", &[], "400")],
            ),
        )
        .on(
            SERVICES,
            true,
            Reply::Events(vec![event(
                "ADDED",
                svc("api", &["10.96.0.11", "fd00:96::11"], "401"),
            )]),
        );
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = serve(handle, script);
    let (counter, errors) = error_counter();
    let inv = KubeInventory::start(kube::Client::new(service, "default"), counter, config());
    tokio::time::timeout(Duration::from_secs(20), inv.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    assert!(inv.is_ready());

    let snap =
        wait_for(&inv, "watch events applied", |s| {
            s.pods.len() == 1
                && s.pods[0].name == "db"
                && s.namespaces.get("prod").and_then(|n| n.labels.get("team")) == Some("b")
                && s.policies.len() == 1
                && serde_json::to_value(&s.policies[0].spec).expect("json")["ingress"][0]["from"][0]
                    ["podSelector"]["matchLabels"]["app"]
                    == "api"
                && s.services.len() == 2
        })
        .await;
    // Services keep their ClusterIPs (both families); the headless one has none and is left out.
    let services: Vec<(&str, Vec<String>)> = snap
        .services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.cluster_ips.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        services,
        [
            (
                "api",
                vec!["10.96.0.11".to_owned(), "fd00:96::11".to_owned()]
            ),
            ("web", vec!["10.96.0.10".to_owned()]),
        ]
    );
    // Selector and ports come through the API path too (`explain --to prod/svc/api`).
    let api = &snap.services[0];
    assert_eq!(
        api.selector.as_ref().and_then(|s| s.get("app")),
        Some("api")
    );
    assert_eq!(
        api.ports
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.target.clone()))
            .collect::<Vec<_>>(),
        [(
            Some("web"),
            80,
            observer::inventory::TargetPort::Name("http".into())
        )]
    );
    // Trimmed on the way into the store: only deny-observer's annotation is left.
    let ann = snap.policies[0]
        .metadata
        .annotations
        .as_ref()
        .expect("annotations");
    assert_eq!(
        ann.keys().collect::<Vec<_>>(),
        vec!["deny-observer.io/owner"]
    );
    // The store keeps the converted pod, the very `Arc` the snapshot holds.
    let stored = inv.stores().pods.state();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].namespace(), stored[0].name()),
        (Some("prod"), "db")
    );
    let model = stored[0].model.as_ref().expect("valid pod");
    assert!(Arc::ptr_eq(model, &snap.pods[0]));

    for (path, rv) in [
        (PODS, "200"),
        (NAMESPACES, "100"),
        (POLICIES, "300"),
        (SERVICES, "400"),
    ] {
        let seen = requests_for(&log, path);
        assert!(seen.len() >= 2, "{path}: {seen:?}");
        assert!(seen.iter().all(|s| s.method == Method::GET), "{seen:?}");
        assert!(!seen[0].is_watch(), "first request lists: {seen:?}");
        assert!(seen[1].is_watch(), "then watches: {seen:?}");
        assert!(
            seen[1].query.contains(&format!("resourceVersion={rv}")),
            "watch resumes from the list's resourceVersion: {seen:?}"
        );
    }
    assert!(errors.lock().expect("errors").is_empty());
}

#[tokio::test]
async fn watch_errors_are_counted_and_recovered() {
    let status = |code: u16, reason: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    };
    let script = Script::default()
        .on(
            NAMESPACES,
            false,
            list("Namespace", "v1", "100", vec![ns("prod", "a")]),
        )
        // Pods: the first list fails with a 500, the second succeeds.
        .on(PODS, false, Reply::Json(500, status(500, "InternalError")))
        .on(
            PODS,
            false,
            list("Pod", "v1", "200", vec![pod("web", "10.0.0.1", "200")]),
        )
        // Policies: listed, then the watch says 410 Gone, then a relist sees the edit.
        .on(
            POLICIES,
            false,
            list(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "300",
                vec![policy("allow-web", "web", "300")],
            ),
        )
        .on(
            POLICIES,
            true,
            Reply::Events(vec![event("ERROR", status(410, "Expired"))]),
        )
        .on(
            POLICIES,
            false,
            list(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "400",
                vec![policy("allow-web", "api", "400")],
            ),
        )
        .on(SERVICES, false, no_services());
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = serve(handle, script);
    let (counter, errors) = error_counter();
    let inv = KubeInventory::start(kube::Client::new(service, "default"), counter, config());
    tokio::time::timeout(Duration::from_secs(20), inv.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let before = inv.current();
    assert_eq!(
        before.pods.len(),
        1,
        "inventory usable after the failed list"
    );

    let after =
        wait_for(&inv, "relisted policy", |s| {
            s.policies.len() == 1
                && serde_json::to_value(&s.policies[0].spec).expect("json")["ingress"][0]["from"][0]
                    ["podSelector"]["matchLabels"]["app"]
                    == "api"
        })
        .await;
    // The pods survived the policy watch's failure and relist.
    assert_eq!(after.pods.len(), 1);
    // Every watch delivered an event after its error: the source is current again.
    let health = inv.health();
    assert!(!health.failing(), "{:?}", health.last_error());
    assert!(health.last_success_unix() > 0);
    assert!(Arc::ptr_eq(&before.pods[0], &after.pods[0]));

    let counts = errors.lock().expect("errors").clone();
    assert_eq!(counts.get("pods"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("networkpolicies"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("namespaces"), None, "{counts:?}");

    let pods: Vec<Seen> = requests_for(&log, PODS);
    assert!(
        !pods[0].is_watch() && !pods[1].is_watch(),
        "list, relist: {pods:?}"
    );
    let policies: Vec<Seen> = requests_for(&log, POLICIES);
    let kinds: Vec<bool> = policies.iter().take(4).map(Seen::is_watch).collect();
    assert_eq!(kinds, vec![false, true, false, true], "{policies:?}");
    assert!(
        policies[3].query.contains("resourceVersion=400"),
        "{policies:?}"
    );
}

#[tokio::test]
async fn not_ready_while_the_api_server_fails() {
    let script = Script::default()
        .on(NAMESPACES, false, list("Namespace", "v1", "1", vec![]))
        .on(SERVICES, false, no_services())
        .on(
            POLICIES,
            false,
            list("NetworkPolicy", "networking.k8s.io/v1", "1", vec![]),
        )
        .on(
            PODS,
            false,
            Reply::Json(
                403,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "reason": "Forbidden", "code": 403, "message": "forbidden"}),
            ),
        );
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let _log = serve(handle, script);
    let (counter, errors) = error_counter();
    let inv = KubeInventory::start(kube::Client::new(service, "default"), counter, config());
    let waited = tokio::time::timeout(Duration::from_millis(600), inv.wait_until_ready()).await;
    assert!(waited.is_err(), "must not be ready without pods");
    assert!(!inv.is_ready());
    assert_eq!(errors.lock().expect("errors").get("pods"), Some(&1));
    // Staleness: not successful while the pods watch has only failed.
    let health = inv.health();
    assert!(health.failing());
    assert!(
        health.last_error().is_some_and(|e| e.contains("pods")),
        "{:?}",
        health.last_error()
    );
}

/// A list page that the API server continues with `continue=<token>`.
fn page(kind: &str, api_version: &str, rv: &str, token: &str, items: Vec<Value>) -> Reply {
    Reply::Json(
        200,
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": {"resourceVersion": rv, "continue": token}, "items": items}),
    )
}

fn query_param<'a>(seen: &'a Seen, key: &str) -> Option<&'a str> {
    seen.query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Starts an inventory with `strategy` against a server whose pods come in two pages (`web` then
/// `db`) and whose namespaces and policies come in one; returns the requests once it is ready.
async fn two_page_pods(strategy: ListStrategy) -> (KubeInventory, Vec<Seen>) {
    let script = Script::default()
        .on(
            NAMESPACES,
            false,
            list_reply("Namespace", "v1", vec![ns("prod", "a")]),
        )
        .on(
            PODS,
            false,
            page(
                "Pod",
                "v1",
                "200",
                "page-2-token",
                vec![pod("web", "10.0.0.1", "199")],
            ),
        )
        .on(
            PODS,
            false,
            list("Pod", "v1", "200", vec![pod("db", "10.0.0.2", "200")]),
        )
        .on(
            POLICIES,
            false,
            list_reply(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                vec![policy("allow-web", "web", "300")],
            ),
        )
        .on(SERVICES, false, no_services());
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = serve(handle, script);
    let (counter, errors) = error_counter();
    let inv = KubeInventory::start(
        kube::Client::new(service, "default"),
        counter,
        KubeInventoryConfig {
            list: strategy,
            ..config()
        },
    );
    tokio::time::timeout(Duration::from_secs(20), inv.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let snap = wait_for(&inv, "both pages applied", |s| s.pods.len() == 2).await;
    let mut names: Vec<&str> = snap.pods.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["db", "web"]);
    assert!(errors.lock().expect("errors").is_empty());
    let seen = requests_for(&log, PODS);
    (inv, seen)
}

fn list_reply(kind: &str, api_version: &str, items: Vec<Value>) -> Reply {
    list(kind, api_version, "100", items)
}

#[tokio::test]
async fn paged_lists_follow_continue_tokens_then_watch() {
    let (_inv, seen) = two_page_pods(ListStrategy::Paged).await;
    assert!(seen.len() >= 3, "two pages, then a watch: {seen:?}");
    let (first, second, watch) = (&seen[0], &seen[1], &seen[2]);
    assert!(!first.is_watch() && !second.is_watch(), "{seen:?}");
    // A consistent list (no resourceVersion), a page at a time.
    assert_eq!(query_param(first, "resourceVersion"), None, "{first:?}");
    assert_eq!(query_param(first, "limit"), Some("500"), "{first:?}");
    assert_eq!(query_param(first, "continue"), None, "{first:?}");
    assert_eq!(query_param(second, "limit"), Some("500"), "{second:?}");
    assert_eq!(
        query_param(second, "continue"),
        Some("page-2-token"),
        "{second:?}"
    );
    assert!(watch.is_watch(), "{seen:?}");
    assert_eq!(
        query_param(watch, "resourceVersion"),
        Some("200"),
        "the watch resumes from the last page's resourceVersion: {watch:?}"
    );
}

#[tokio::test]
async fn cache_lists_ask_for_the_watch_cache() {
    let (_inv, seen) = two_page_pods(ListStrategy::Cache).await;
    let first = &seen[0];
    assert!(!first.is_watch(), "{seen:?}");
    assert_eq!(
        query_param(first, "resourceVersion"),
        Some("0"),
        "{first:?}"
    );
    assert_eq!(query_param(first, "limit"), None, "{first:?}");
    assert_eq!(
        query_param(first, "resourceVersionMatch"),
        Some("NotOlderThan"),
        "{first:?}"
    );
    // A server that does paginate it is still followed to the end.
    assert_eq!(
        query_param(&seen[1], "continue"),
        Some("page-2-token"),
        "{seen:?}"
    );
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).expect("seconds"))
        .expect("clock")
}

/// A watch that expires (410) and whose every relist then fails: the watcher starts each retry
/// with an `Init` event before its list request, and that must not count as the resource being
/// current again, or the success time would keep up with the clock and staleness
/// (`/readyz`, `DenyObserverInventoryStale`) would never show.
#[tokio::test]
async fn a_relist_that_keeps_failing_is_not_a_success() {
    let status = |code: u16, reason: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    };
    let mut script = Script::default()
        .on(
            NAMESPACES,
            false,
            list("Namespace", "v1", "100", vec![ns("prod", "a")]),
        )
        .on(
            PODS,
            false,
            list("Pod", "v1", "200", vec![pod("web", "10.0.0.1", "200")]),
        )
        .on(
            POLICIES,
            false,
            list(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "300",
                vec![policy("allow-web", "web", "300")],
            ),
        )
        .on(
            POLICIES,
            true,
            Reply::Events(vec![event("ERROR", status(410, "Expired"))]),
        )
        .on(SERVICES, false, no_services());
    for _ in 0..50 {
        script = script.on(
            POLICIES,
            false,
            Reply::Json(500, status(500, "etcdserver: request timed out")),
        );
    }
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let log = serve(handle, script);
    let (counter, errors) = error_counter();
    let inv = KubeInventory::start(kube::Client::new(service, "default"), counter, config());
    tokio::time::timeout(Duration::from_secs(20), inv.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    // Wait for the first failed relist (the 410 is the first error).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while errors
        .lock()
        .expect("errors")
        .get("networkpolicies")
        .copied()
        .unwrap_or(0)
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "no failed relist");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed_at = unix_now();
    // Long enough for more retries (backoff from 0.8 s) over at least two clock seconds.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let relists = requests_for(&log, POLICIES)
        .iter()
        .filter(|s| !s.is_watch())
        .count();
    assert!(relists >= 3, "the relist was retried: {relists}");
    let health = inv.health();
    assert!(health.failing(), "{:?}", health.last_error());
    assert!(
        health.last_success_unix() <= failed_at,
        "success time advanced to {} while every relist failed (since {failed_at})",
        health.last_success_unix()
    );
    assert!(
        health
            .last_error()
            .is_some_and(|e| e.contains("networkpolicies") && e.contains("etcdserver")),
        "{:?}",
        health.last_error()
    );
}
