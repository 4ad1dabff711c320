//! `deny-observer map --listen` with the inventory from the API server (faked with tower-test,
//! as in `kube_api`): open fields and explain answers come from the watched objects; an API
//! server that refuses the lists gives a page that says what the map waits for while the
//! server keeps answering; a watch that fails later leaves the last inventory in use, noted.

use std::future::Future;
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use observer::map::EdgeSource;
use observer::map::serve::{InventoryInput, serve_listener};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower_test::mock;

use crate::kube_api::{
    NAMESPACES, PODS, POLICIES, Reply, SERVICES, Script, list, no_services, ns, pod, policy, serve,
};

/// One HTTP/1.1 request on a fresh connection: status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    // A loopback name: the server listens on 127.0.0.1 and answers no other (DNS rebinding).
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("writing to {addr}: {e}"));
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, body.to_owned())
}

/// Polls `path` until `pred` holds on its answer (20 s at most).
async fn until(
    addr: std::net::SocketAddr,
    path: &str,
    what: &str,
    mut pred: impl FnMut(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(addr, path).await;
        if pred(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {status} {body} after 20s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn explain(data: &Value, edge: &Value) -> String {
    let lines = data["explain_lines"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    edge["explain"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|i| lines.get(usize::try_from(i.as_u64()?).ok()?)?.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Starts `map --listen` on a free loopback port against the fake API server of `script`,
/// the edges from `edges` (JSON lines); returns the address and the server task's stop.
async fn start_map(
    script: Script,
    edges: &str,
    dir: &std::path::Path,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    impl Future<Output = ()>,
) {
    let file = dir.join("edges.jsonl");
    std::fs::write(&file, edges).unwrap_or_else(|e| panic!("writing the edges: {e}"));
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let _log = serve(handle, script);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("binding: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_listener(
        listener,
        InventoryInput::Kube(kube::Client::new(service, "default")),
        EdgeSource::File(file),
        Duration::from_millis(500),
        observer::map::DEFAULT_MAX_EDGES,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let done = async move {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("map --listen failed: {e}"),
            Err(e) => panic!("map --listen task: {e}"),
        }
    };
    (addr, stop_tx, done)
}

const EDGES: &str = concat!(
    r#"{"source_namespace":"dev","source_workload":"tool","destination_namespace":"prod","destination_workload":"web","protocol":"tcp","port":80,"observed":5,"verdict":"deny"}"#,
    "\n",
    r#"{"source_namespace":"prod","source_workload":"api","destination_namespace":"prod","destination_workload":"web","protocol":"tcp","port":80,"observed":9,"verdict":"allow"}"#,
    "\n"
);

fn tool_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "tool", "namespace": "dev", "resourceVersion": "5",
                        "labels": {"app": "tool"}},
           "spec": {"containers": [{"name": "c", "image": "i"}]},
           "status": {"phase": "Running", "podIP": "10.0.1.9"}})
}

/// The first lists of both sync tests: prod has a policy (web and api take ingress only from
/// app=api), dev has none.
fn cluster() -> Script {
    Script::default()
        .on(
            NAMESPACES,
            false,
            list(
                "Namespace",
                "v1",
                "1",
                vec![ns("prod", "a"), ns("dev", "b")],
            ),
        )
        .on(
            PODS,
            false,
            list(
                "Pod",
                "v1",
                "2",
                vec![
                    pod("web", "10.0.0.1", "2"),
                    pod("api", "10.0.0.2", "2"),
                    tool_pod(),
                ],
            ),
        )
        .on(
            POLICIES,
            false,
            list(
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "3",
                vec![policy("only-api", "api", "3")],
            ),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_with_the_api_server_inventory_marks_open_fields_and_explains() {
    let script = cluster().on(SERVICES, false, no_services());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (addr, stop, done) = start_map(script, EDGES, dir.path()).await;
    until(addr, "/readyz", "ready", |s, _| s == 200).await;
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (_, body) = get(addr, "/data.json").await;
    let data: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(data["error"], Value::Null, "{data:#}");
    let open: Vec<(String, bool, bool)> = data["namespaces"]
        .as_array()
        .map(|n| {
            n.iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("").to_owned(),
                        n["open"] == true,
                        n["known"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        open,
        [
            ("dev".to_owned(), true, true),
            ("prod".to_owned(), false, true)
        ],
        "open fields from the API server's objects"
    );
    let edges = data["edges"].as_array().cloned().unwrap_or_default();
    let denied = edges
        .iter()
        .find(|e| e["verdict"] == "denied")
        .unwrap_or_else(|| panic!("no denied edge: {data:#}"));
    assert_eq!(denied["source"], "dev/tool");
    assert_eq!(denied["judged"], "deny");
    assert_eq!(denied["policy"], "prod/only-api");
    let text = explain(&data, denied);
    assert!(text.contains("verdict: DENY"), "{text}");
    assert!(text.contains("decided by: ingress at prod/web"), "{text}");
    assert!(text.contains("prod/only-api"), "{text}");
    let allowed = edges
        .iter()
        .find(|e| e["verdict"] == "allowed")
        .unwrap_or_else(|| panic!("no allowed edge: {data:#}"));
    assert_eq!(allowed["judged"], "allow", "{allowed}");
    assert_eq!(allowed["policy"], "prod/only-api", "{allowed}");
    let (status, page) = get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("\"source\":\"dev/tool\""),
        "the page embeds the map"
    );
    let _ = stop.send(());
    done.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_with_a_failing_api_server_serves_a_page_that_says_so() {
    let forbidden = || {
        Reply::Json(
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                   "code": 403, "message": "pods is forbidden: User \"system:serviceaccount:x:map\" cannot list resource \"pods\""}),
        )
    };
    let mut script = Script::default()
        .on(
            NAMESPACES,
            false,
            list("Namespace", "v1", "1", vec![ns("prod", "a")]),
        )
        .on(
            POLICIES,
            false,
            list("NetworkPolicy", "networking.k8s.io/v1", "1", vec![]),
        )
        .on(SERVICES, false, no_services());
    // Refused at every retry within the test.
    for _ in 0..50 {
        script = script.on(PODS, false, forbidden());
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (addr, stop, done) = start_map(script, EDGES, dir.path()).await;
    let (_, body) = until(
        addr,
        "/data.json",
        "the API server's refusal in the map",
        |_, b| b.contains("cannot list resource"),
    )
    .await;
    let data: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let error = data["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("waiting for the inventory: no full list from the API server yet"),
        "{error}"
    );
    assert!(error.contains("pods"), "{error}");
    assert_eq!(
        data["edges"],
        json!([]),
        "nothing judged without an inventory"
    );
    // The server answers: not ready, but alive, and the page carries the error.
    let (status, ready) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, page) = get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("cannot list resource"), "the page says why");
    let _ = stop.send(());
    done.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_keeps_the_last_inventory_and_says_so_when_a_watch_fails() {
    let status = |code: u16, reason: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    };
    // Listed once, then the policies' watch expires and every relist fails.
    let mut script = cluster()
        .on(
            POLICIES,
            true,
            Reply::Events(vec![
                json!({"type": "ERROR", "object": status(410, "Expired")}),
            ]),
        )
        .on(SERVICES, false, no_services());
    for _ in 0..50 {
        script = script.on(
            POLICIES,
            false,
            Reply::Json(500, status(500, "etcdserver: request timed out")),
        );
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (addr, stop, done) = start_map(script, EDGES, dir.path()).await;
    until(addr, "/readyz", "ready", |s, _| s == 200).await;
    // First the expired watch, then the failing relists.
    let (_, body) = until(addr, "/data.json", "the stale-inventory note", |_, b| {
        b.contains("inventory: reading the API server fails") && b.contains("etcdserver")
    })
    .await;
    let data: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let notes = data["notes"].to_string();
    assert!(
        notes.contains("explain answers are from the inventory of")
            && notes.contains("networkpolicies"),
        "{notes}"
    );
    // The last good inventory still judges: the policy listed before the failure.
    let denied = data["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["verdict"] == "denied").cloned())
        .unwrap_or_else(|| panic!("no denied edge: {data:#}"));
    assert_eq!(denied["policy"], "prod/only-api", "{denied}");
    assert_eq!(data["error"], Value::Null, "{data:#}");
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let _ = stop.send(());
    done.await;
}
