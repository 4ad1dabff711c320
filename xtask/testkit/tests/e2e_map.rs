//! The traffic map on real parts: the daemon from `DENY_OBSERVER_BIN` on a simulated node drops
//! real traffic, a real Prometheus scrapes it, `deny-observer map` draws it, and headless
//! Chromium (Debian's package) loads the page:
//!
//! 1. `map --output`: every expected workload and edge is in the page's list with the right
//!    `data-*` attributes (verdict, protocol, port, deciding policy, `unexplained` for a drop
//!    the policies allow; the allowed edge with its protocol and port from the daemon's
//!    `deny_observer_connections_total`), open-field namespaces are marked, the graph draws them, and
//!    selecting an edge shows its `explain` answer. A second page from an `--edges` file adds
//!    real allowed traffic; its screenshot is the README's.
//! 2. `map --listen`: a page left open sees a new denied edge appear after its refresh, and
//!    `/healthz` answers like the daemon's.
//! 3. Without a cluster (no root): the page's script survives hostile data and links:
//!    namespaces named like `Object.prototype`'s members, a `#edge=` link that is not valid
//!    percent-encoding, a refresh beyond what a browser timer holds; and `map --listen`'s page
//!    works under the server's own Content-Security-Policy header, and both pages under their
//!    strict policies (no `'unsafe-inline'`) without a single `securitypolicyviolation`.
//!
//! Run through `cargo xtask test`, which builds the release daemon and sets the variable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::chromium::{self, Browser};
use testkit::cmd::run;
use testkit::daemon::{Daemon, free_loopback_addr};
use testkit::manifests::{self, Owner, PodMeta};
use testkit::promstack::{self, PromStack, StackConfig, http_get};
use testkit::simnode::{Enforcement, PodId, Proto, Rule, SimNode};
use testkit::webhook::Webhook;

const SHOP: &str = "mp-shop";
const DEV: &str = "mp-dev";
const NODE: &str = "mp-node";
const API_PORT: u16 = 8080;
const WEB_PORT: u16 = 80;
const OTHER_PORT: u16 = 7000;

/// Both tests build a node and run a daemon; one at a time keeps each daemon's drops its own.
static SERIAL: Mutex<()> = Mutex::new(());

/// The node: `mp-shop` with `web` and `api` (api isolated for ingress, only web may reach
/// it on UDP 8080), `mp-dev` with `tool` and no policy (an open field). `web` is also dropped
/// by the node's firewall although no policy selects it: its denies are `unexplained`.
struct Cluster {
    node: SimNode,
    inventory: PathBuf,
    web: PodId,
    api: PodId,
    tool: PodId,
    daemon: Daemon,
    stack: PromStack,
    bin: PathBuf,
}

impl Cluster {
    fn start(work: &Path) -> Self {
        let bin = testkit::daemon_bin();
        promstack::require_binaries();
        assert!(
            chromium::binary().is_some(),
            "chromium is not installed: `cargo xtask setup` installs Debian's chromium"
        );
        let _ = testkit::simnode::cleanup_stale();
        let mut node = SimNode::new().expect("simulated node");
        let deployment = |name: &str, hash: &str| Owner::Deployment {
            name: name.into(),
            hash: hash.into(),
        };
        let pods = [
            (
                SHOP,
                "web-5d4f8c7b9-w8xkq",
                PodMeta::app("web", deployment("web", "5d4f8c7b9")).port(
                    "http",
                    WEB_PORT,
                    Proto::Udp,
                ),
            ),
            (
                SHOP,
                "api-6c9f8b7d4-k2x9z",
                PodMeta::app("api", deployment("api", "6c9f8b7d4")).port(
                    "http",
                    API_PORT,
                    Proto::Udp,
                ),
            ),
            (
                DEV,
                "tool-7b8c9d6f5-q4r7t",
                PodMeta::app("tool", deployment("tool", "7b8c9d6f5")),
            ),
        ];
        let mut metas = Vec::new();
        for (ns, name, meta) in pods {
            node.add_pod(ns, name).unwrap();
            metas.push(meta);
        }
        let (web, api, tool) = (0, 1, 2);
        let mut enforcement = Enforcement::default();
        enforcement.ingress_isolated.insert(api);
        enforcement.ingress_isolated.insert(web);
        enforcement.ingress_allow.insert(Rule {
            from: web,
            to: api,
            protocol: Proto::Udp,
            port: API_PORT,
        });
        node.enforce(&enforcement).unwrap();
        let inventory = work.join("inventory");
        manifests::write_inventory(
            &inventory,
            node.pods(),
            &metas,
            NODE,
            vec![json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "api-allow-web", "namespace": SHOP},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "api"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                 "ports": [{"protocol": "UDP", "port": API_PORT}]}],
                },
            })],
        )
        .unwrap();
        let mut daemon = Daemon::start_with_args(
            &bin,
            &inventory,
            free_loopback_addr().unwrap(),
            work.join("daemon.log"),
            &["--node-name", NODE],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        daemon
            .wait_ready(Duration::from_secs(60), || false)
            .unwrap_or_else(|e| panic!("{e}"));
        let stack = PromStack::start(
            &StackConfig {
                job: "deny-observer".into(),
                targets: vec![daemon.addr()],
                rule_files: vec![],
            },
            Webhook::start().unwrap(),
        );
        Self {
            node,
            inventory,
            web,
            api,
            tool,
            daemon,
            stack,
            bin,
        }
    }

    fn prometheus(&self) -> String {
        format!("http://{}", self.stack.prometheus_addr())
    }

    fn addr(&self, pod: PodId, port: u16) -> SocketAddr {
        SocketAddr::new(self.node.pod(pod).unwrap().ip(false), port)
    }

    /// Sends `n` datagrams from `from` to `to:port`.
    fn send(&self, from: PodId, to: PodId, port: u16, n: u64) {
        self.node.send_udp(from, self.addr(to, port), n).unwrap();
    }

    /// Sends the traffic in rounds (a new UDP flow each time) until `deny-observer edges`
    /// reads every edge `(source, destination, verdict)` of `want` from Prometheus.
    fn until_in_prometheus(&mut self, rounds: &[(PodId, PodId, u16)], want: &[(&str, &str, &str)]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let prometheus = self.prometheus();
        loop {
            for &(from, to, port) in rounds {
                self.send(from, to, port, 20);
            }
            std::thread::sleep(Duration::from_secs(2));
            self.daemon.check_alive().unwrap_or_else(|e| panic!("{e}"));
            self.stack.check_alive();
            let (code, out, err) = run(
                &self.bin,
                &["edges", "--prometheus", &prometheus, "--window", "10m"],
            );
            assert_eq!(code, 0, "edges failed: {err}");
            let seen = |(src, dst, verdict): &(&str, &str, &str)| {
                out.lines().any(|l| {
                    let e: Value = serde_json::from_str(l).unwrap_or_default();
                    e["verdict"] == *verdict
                        && format!(
                            "{}/{}",
                            e["source_namespace"].as_str().unwrap_or(""),
                            e["source_workload"].as_str().unwrap_or("")
                        ) == *src
                        && format!(
                            "{}/{}",
                            e["destination_namespace"].as_str().unwrap_or(""),
                            e["destination_workload"].as_str().unwrap_or("")
                        ) == *dst
                })
            };
            if want.iter().all(seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "edges {want:?} not all in Prometheus after 120s:\n{out}\n{}\n{}",
                self.stack.report(),
                self.daemon.log_tail()
            );
        }
    }
}

/// The page's list, restricted to this test's namespaces (other tests' daemons on the machine
/// may add drops of their own to the kernel's view).
const LIST_JS: &str = r#"(() => {
  const mine = (s) => s.includes('mp-shop/') || s.includes('mp-dev/');
  return {
    edges: Array.from(document.querySelectorAll('[data-edge]')).filter(e => mine(e.dataset.edge)).map(e => ({
      edge: e.dataset.edge, verdict: e.dataset.verdict, protocol: e.dataset.protocol,
      port: e.dataset.port, countPorts: e.dataset.countPorts || '', policy: e.dataset.policy, match: e.dataset.match,
      observed: Number(e.dataset.observed), hidden: e.hidden })),
    nodes: Array.from(document.querySelectorAll('[data-workload]')).filter(n => mine(n.dataset.workload + '/')).map(n => ({
      workload: n.dataset.workload, open: n.dataset.open, kind: n.dataset.kind })),
    drawn: window.trafficMap.drawn(),
    banner: document.getElementById('banner').hidden ? '' : document.getElementById('banner').textContent,
  };
})()"#;

fn edge<'a>(list: &'a Value, name: &str, verdict: &str) -> &'a Value {
    list["edges"]
        .as_array()
        .and_then(|edges| {
            edges
                .iter()
                .find(|e| e["edge"] == name && e["verdict"] == verdict)
        })
        .unwrap_or_else(|| panic!("no {verdict} edge {name} in the page: {list:#}"))
}

fn screenshot_path() -> PathBuf {
    let dir = testkit::workspace_root().join("target/e2e-map");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("traffic-map.png")
}

/// The page has drawn its data (map.js sets it last).
const READY: &str = "document.body.dataset.ready === 'true'";

/// Opens `url` and waits, 30 s at most, until `ready` holds on the page.
fn open(browser: &mut Browser, url: &str, ready: &str) {
    browser.navigate(url).unwrap_or_else(|e| panic!("{e}"));
    browser
        .wait_for(ready, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
}
#[test]
fn map_output_in_chromium_shows_every_edge_with_its_verdict_and_policy() {
    if !testkit::privileged("map_output_in_chromium_shows_every_edge_with_its_verdict_and_policy") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(work.path());
    let (web, api, tool) = (cluster.web, cluster.api, cluster.tool);

    // Real allowed traffic, web -> api:8080, which the edges file below records with the count
    // api received.
    let listener = cluster.node.listen(api, Proto::Udp, API_PORT).unwrap();
    cluster.send(web, api, API_PORT, 50);
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.received() < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let received = listener.received();
    assert!(
        received > 0,
        "the allowed web -> api traffic did not arrive"
    );

    // The denied traffic, and more allowed flows (web -> api:8080), which the daemon counts
    // on deny_observer_connections_total once api's socket has queued a datagram.
    cluster.until_in_prometheus(
        &[
            (tool, api, API_PORT),
            (tool, web, WEB_PORT),
            (web, api, API_PORT),
        ],
        &[
            ("mp-dev/tool", "mp-shop/api", "deny"),
            ("mp-dev/tool", "mp-shop/web", "deny"),
            ("mp-shop/web", "mp-shop/api", "allow"),
        ],
    );
    let prometheus = cluster.prometheus();
    let inv = cluster.inventory.to_str().unwrap().to_owned();
    let from_prometheus = work.path().join("map-prometheus.html");
    let (code, _, err) = run(
        &cluster.bin,
        &[
            "map",
            "--inventory",
            &inv,
            "--prometheus",
            &prometheus,
            "--window",
            "10m",
            "--output",
            from_prometheus.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "map --prometheus failed: {err}");

    let mut browser = Browser::launch(1400, 900).unwrap_or_else(|e| panic!("{e}"));
    open(
        &mut browser,
        &format!("file://{}", from_prometheus.display()),
        READY,
    );
    let list = browser.eval(LIST_JS).unwrap_or_else(|e| panic!("{e}"));

    let denied = edge(&list, "mp-dev/tool->mp-shop/api", "denied");
    assert_eq!(denied["protocol"], "udp", "{denied}");
    // The drop metrics carry no port: it comes from the daemon's new-denied-edge series.
    assert_eq!(denied["port"], API_PORT.to_string(), "{denied}");
    assert_eq!(denied["countPorts"], API_PORT.to_string(), "{denied}");
    // The daemon names new-edge ports only for the denies its policies explain.
    assert_eq!(
        edge(&list, "mp-dev/tool->mp-shop/web", "denied")["port"],
        "",
        "{list:#}"
    );
    assert_eq!(denied["policy"], "mp-shop/api-allow-web", "{denied}");
    assert_eq!(denied["match"], "default_deny", "{denied}");
    assert!(denied["observed"].as_u64().unwrap_or(0) > 0, "{denied}");
    // Dropped by the node's firewall, yet no policy selects web: unexplained, no policy.
    let unexplained = edge(&list, "mp-dev/tool->mp-shop/web", "denied");
    assert_eq!(unexplained["match"], "unexplained", "{unexplained}");
    assert_eq!(unexplained["policy"], "", "{unexplained}");
    let mut names: Vec<String> = list["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["edge"].as_str().unwrap(),
                e["verdict"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    // web -> api is allowed, from the daemon's count of the flows api received: protocol and
    // port as the kernel saw them, and the policy that allows it.
    let allowed = edge(&list, "mp-shop/web->mp-shop/api", "allowed");
    assert_eq!(allowed["protocol"], "udp", "{allowed}");
    assert_eq!(allowed["port"], API_PORT.to_string(), "{allowed}");
    assert_eq!(allowed["policy"], "mp-shop/api-allow-web", "{allowed}");
    assert_eq!(allowed["match"], "", "{allowed}");
    assert!(allowed["observed"].as_u64().unwrap_or(0) > 0, "{allowed}");
    assert!(
        !list["banner"]
            .as_str()
            .unwrap_or_default()
            .contains("no allowed edges observed"),
        "{list:#}"
    );
    let allowed_names: Vec<&String> = names.iter().filter(|n| n.ends_with(" allowed")).collect();
    assert_eq!(
        allowed_names,
        ["mp-shop/web->mp-shop/api allowed"],
        "only the traffic the test allowed: {list:#}"
    );
    let denied_names: Vec<&String> = names.iter().filter(|n| n.ends_with(" denied")).collect();
    assert_eq!(
        denied_names,
        [
            "mp-dev/tool->mp-shop/api denied",
            "mp-dev/tool->mp-shop/web denied"
        ],
        "{list:#}"
    );
    let nodes: Vec<(String, String)> = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["workload"].as_str().unwrap().to_owned(),
                n["open"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (workload, open) in [
        ("mp-dev/tool", "true"),
        ("mp-shop/api", "false"),
        ("mp-shop/web", "false"),
    ] {
        assert!(
            nodes.contains(&(workload.to_owned(), open.to_owned())),
            "{workload} open={open} missing: {nodes:?}"
        );
    }
    let drawn = &list["drawn"];
    assert!(drawn["workloads"].as_u64().unwrap_or(0) >= 3, "{drawn}");
    assert!(drawn["edges"].as_u64().unwrap_or(0) >= 2, "{drawn}");

    // Selecting the edge shows the engine's explain answer for it.
    let details = browser
        .eval(
            "document.querySelector('[data-edge=\"mp-dev/tool->mp-shop/api\"][data-verdict=\"denied\"] button').click(); \
             document.getElementById('details').textContent",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let details = details.as_str().unwrap_or_default();
    assert!(details.contains("verdict: DENY"), "{details}");
    assert!(
        details.contains("decided by: ingress at mp-shop/api"),
        "{details}"
    );
    assert!(details.contains("mp-shop/api-allow-web"), "{details}");
    // Explained for the port it was denied on, not for every declared port.
    assert!(details.contains("UDP/8080"), "{details}");
    assert!(!details.contains("judged on the udp port(s)"), "{details}");
    assert!(details.contains("edge, all ports"), "{details}");

    // The same map from an edges file: the denied edges as `edges` reads them, plus the real
    // allowed traffic.
    let (code, edges_text, err) = run(
        &cluster.bin,
        &["edges", "--prometheus", &prometheus, "--window", "10m"],
    );
    assert_eq!(code, 0, "{err}");
    // `edges` gives denied edges their ports the same way.
    let denied_ports: Vec<(String, Value)> = edges_text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_default())
        .filter(|e| e["verdict"] == "deny" && e["source_workload"] == "tool")
        .map(|e| {
            (
                e["destination_workload"].as_str().unwrap_or("").to_owned(),
                e["port"].clone(),
            )
        })
        .collect();
    assert_eq!(
        denied_ports,
        [
            ("api".to_owned(), json!(API_PORT)),
            ("web".to_owned(), Value::Null)
        ],
        "{edges_text}"
    );
    let allowed = json!({
        "source_namespace": SHOP, "source_workload": "web",
        "destination_namespace": SHOP, "destination_workload": "api",
        "protocol": "udp", "port": API_PORT, "observed": received, "verdict": "allow",
    });
    // The allowed edge comes from the test's own count here: `edges` also reads the daemon's
    // (flows, not datagrams), which the file must not hold twice.
    let denied_text: String = edges_text
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap_or_default()["verdict"] == "deny")
        .map(|l| format!("{l}\n"))
        .collect();
    let edges_file = work.path().join("edges.jsonl");
    std::fs::write(&edges_file, format!("{denied_text}{allowed}\n")).unwrap();
    let from_file = work.path().join("map-edges.html");
    let (code, _, err) = run(
        &cluster.bin,
        &[
            "map",
            "--inventory",
            &inv,
            "--edges",
            edges_file.to_str().unwrap(),
            "--output",
            from_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "map --edges failed: {err}");
    open(
        &mut browser,
        &format!("file://{}", from_file.display()),
        READY,
    );
    let list = browser.eval(LIST_JS).unwrap_or_else(|e| panic!("{e}"));
    let ok = edge(&list, "mp-shop/web->mp-shop/api", "allowed");
    assert_eq!(ok["protocol"], "udp", "{ok}");
    assert_eq!(ok["port"], API_PORT.to_string(), "{ok}");
    assert_eq!(
        ok["policy"], "mp-shop/api-allow-web",
        "the allowing policy: {ok}"
    );
    assert_eq!(ok["observed"], received, "{ok}");
    let file_denied = edge(&list, "mp-dev/tool->mp-shop/api", "denied");
    assert_eq!(
        file_denied["policy"], "mp-shop/api-allow-web",
        "{file_denied}"
    );
    assert_eq!(file_denied["port"], API_PORT.to_string(), "{file_denied}");
    // "Denied only" hides the allowed edge from the list.
    let hidden = browser
        .eval(
            "(() => { const c = document.getElementById('filter-denied'); c.checked = true; \
             c.dispatchEvent(new Event('change')); \
             return document.querySelector('[data-edge=\"mp-shop/web->mp-shop/api\"][data-verdict=\"allowed\"]').hidden; })()",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        hidden,
        Value::Bool(true),
        "denied only must hide allowed edges"
    );
    drop(browser);

    let png = screenshot_path();
    // The README's picture, with the denied edge selected through the page's `#edge=` link.
    chromium::screenshot(
        &format!(
            "file://{}#edge=mp-dev/tool-%3Emp-shop/api",
            from_file.display()
        ),
        &png,
        1400,
        900,
        3000,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    println!(
        "screenshot: {}\nedges:\n{denied_text}{allowed}",
        png.display()
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn map_listen_page_shows_a_new_denied_edge() {
    if !testkit::privileged("map_listen_page_shows_a_new_denied_edge") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(work.path());
    let (web, api, tool) = (cluster.web, cluster.api, cluster.tool);
    cluster.until_in_prometheus(
        &[(tool, api, API_PORT)],
        &[("mp-dev/tool", "mp-shop/api", "deny")],
    );

    let addr = free_loopback_addr().unwrap();
    let log = std::fs::File::create(work.path().join("map.log")).unwrap();
    let mut server = Server(
        Command::new(&cluster.bin)
            .args([
                "map",
                "--inventory",
                cluster.inventory.to_str().unwrap(),
                "--prometheus",
                &cluster.prometheus(),
                "--window",
                "10m",
                "--listen",
                &addr.to_string(),
                "--refresh",
                "1s",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = http_get(addr, "/readyz") {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "map --listen exited: {}",
            promstack::tail(&work.path().join("map.log"), 20)
        );
        assert!(
            Instant::now() < deadline,
            "map --listen not ready after 30s: {}",
            promstack::tail(&work.path().join("map.log"), 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_get(addr, "/healthz"), Ok((200, "ok\n".to_owned())));

    let mut browser = Browser::launch(1400, 900).unwrap_or_else(|e| panic!("{e}"));
    open(&mut browser, &format!("http://{addr}/"), READY);
    let new_edge = "document.querySelector('[data-edge=\"mp-shop/web->mp-shop/api\"][data-verdict=\"denied\"]')";
    let before = browser.eval(LIST_JS).unwrap_or_else(|e| panic!("{e}"));
    edge(&before, "mp-dev/tool->mp-shop/api", "denied");
    assert_eq!(
        browser.eval(&format!("{new_edge} === null")).ok(),
        Some(Value::Bool(true)),
        "{before:#}"
    );
    let drawn_before = before["drawn"]["edges"].as_u64().unwrap_or(0);

    // web may reach api only on 8080: 7000 is a new denied edge. The page stays open and
    // must pick it up on a refresh.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        cluster.send(web, api, OTHER_PORT, 20);
        if browser
            .wait_for(&format!("{new_edge} !== null"), Duration::from_secs(3))
            .is_ok()
        {
            break;
        }
        cluster
            .daemon
            .check_alive()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "map --listen exited: {}",
            promstack::tail(&work.path().join("map.log"), 20)
        );
        assert!(
            Instant::now() < deadline,
            "the new denied edge did not appear in the open page within 120s\n{}\n{}",
            cluster.stack.report(),
            promstack::tail(&work.path().join("map.log"), 20)
        );
    }
    let after = browser.eval(LIST_JS).unwrap_or_else(|e| panic!("{e}"));
    let new = edge(&after, "mp-shop/web->mp-shop/api", "denied");
    assert_eq!(new["policy"], "mp-shop/api-allow-web", "{new}");
    assert_eq!(new["match"], "default_deny", "{new}");
    assert_eq!(new["port"], OTHER_PORT.to_string(), "{new}");
    assert!(
        after["drawn"]["edges"].as_u64().unwrap_or(0) > drawn_before,
        "the graph must draw the new edge: {after:#}"
    );
    assert!(
        browser
            .eval("document.body.dataset.refreshed")
            .ok()
            .is_some_and(|v| v.is_string()),
        "the page must have refreshed from data.json"
    );
    assert_eq!(http_get(addr, "/healthz"), Ok((200, "ok\n".to_owned())));
}

/// Names JavaScript objects treat specially: `__proto__` never becomes a key of a plain
/// object, the others are keys of every one already.
const HOSTILE_NAMESPACES: [&str; 4] = ["__proto__", "constructor", "toString", "hasOwnProperty"];

/// An inventory with the namespace `shop`, and edges from a workload of each hostile
/// namespace to `shop/api` plus `shop/web -> shop/api`.
fn hostile_map(work: &Path) -> (PathBuf, PathBuf) {
    let inventory = work.join("inventory");
    std::fs::create_dir_all(&inventory).unwrap();
    std::fs::write(
        inventory.join("ns.yaml"),
        "{apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n",
    )
    .unwrap();
    let edge = |ns: &str, workload: &str, verdict: &str| {
        json!({
            "source_namespace": ns, "source_workload": workload,
            "destination_namespace": "shop", "destination_workload": "api",
            "protocol": "tcp", "port": 8080, "observed": 3, "verdict": verdict,
        })
        .to_string()
    };
    let mut lines: Vec<String> = HOSTILE_NAMESPACES
        .iter()
        .map(|ns| edge(ns, "x", "deny"))
        .collect();
    lines.push(edge("shop", "web", "allow"));
    let edges = work.join("edges.jsonl");
    std::fs::write(&edges, lines.join("\n") + "\n").unwrap();
    (inventory, edges)
}

/// Records, before the page's own script runs, the delays it gives `setTimeout` and the
/// fetches it makes.
const RECORD_TIMERS_JS: &str = r#"
  window.__delays = [];
  window.__fetches = 0;
  const setTimeout0 = window.setTimeout;
  window.setTimeout = function (f, ms) { window.__delays.push(Number(ms) || 0); return setTimeout0(f, ms); };
  const fetch0 = window.fetch;
  window.fetch = function () { window.__fetches++; return fetch0.apply(this, arguments); };
"#;

/// Records, from before the page's first byte, every `securitypolicyviolation` the page's
/// Content-Security-Policy (header or `<meta>`) raises.
const RECORD_CSP_JS: &str = r#"
  window.__csp = [];
  document.addEventListener('securitypolicyviolation', function (e) {
    window.__csp.push({ directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample,
      line: e.lineNumber });
  }, true);
"#;

/// Selects the first edge through its list button and flips the "denied only" filter: the
/// details and the list are markup map.js writes, which the policy must allow as well.
const INTERACT_JS: &str = r#"(() => {
  document.querySelector('#edge-list [data-select]').click();
  const d = document.getElementById('filter-denied');
  d.checked = true; d.dispatchEvent(new Event('change'));
  d.checked = false; d.dispatchEvent(new Event('change'));
  return document.querySelector('#details pre') !== null;
})()"#;

/// Fails unless the page raised no `securitypolicyviolation` (see [`RECORD_CSP_JS`]), logged
/// no policy refusal on the console and threw no uncaught exception.
fn assert_no_csp_violation(browser: &mut Browser, what: &str) {
    // Violation events are queued as tasks: let any pending one fire.
    std::thread::sleep(Duration::from_millis(300));
    let violations = browser
        .eval("window.__csp")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        violations,
        json!([]),
        "{what}: the policy refused something"
    );
    let reports = browser.reports();
    let bad: Vec<&Value> = reports
        .iter()
        .filter(|r| {
            let text = r.to_string();
            r["method"] == "Runtime.exceptionThrown"
                || text.contains("Content Security Policy")
                || text.contains("Content-Security-Policy")
                || text.contains("Refused to")
        })
        .collect();
    assert!(bad.is_empty(), "{what}: {bad:#?}");
}

#[test]
fn map_page_survives_hostile_names_links_and_refresh_values() {
    assert!(
        chromium::binary().is_some(),
        "chromium is not installed: `cargo xtask setup` installs Debian's chromium"
    );
    let bin = testkit::daemon_bin();
    let work = tempfile::tempdir().unwrap();
    let (inventory, edges) = hostile_map(work.path());
    let page = work.path().join("map.html");
    let (code, _, err) = run(
        &bin,
        &[
            "map",
            "--inventory",
            inventory.to_str().unwrap(),
            "--edges",
            edges.to_str().unwrap(),
            "--output",
            page.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "map --edges failed: {err}");

    let mut browser = Browser::launch(1400, 900).unwrap_or_else(|e| panic!("{e}"));
    browser
        .call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": RECORD_CSP_JS}),
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    // A namespace `__proto__` threw before the first frame; a link that is not valid
    // percent-encoding threw before the list was done: neither page was ever ready.
    open(
        &mut browser,
        &format!("file://{}#edge=%E0%A4%A", page.display()),
        READY,
    );
    let seen = browser
        .eval(
            "({ edges: Array.from(document.querySelectorAll('[data-edge]')).map(e => e.dataset.edge).sort(), \
                drawn: window.trafficMap.drawn() })",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want: Vec<String> = HOSTILE_NAMESPACES
        .iter()
        .map(|ns| format!("{ns}/x->shop/api"))
        .collect();
    want.push("shop/web->shop/api".to_owned());
    want.sort();
    assert_eq!(seen["edges"], json!(want), "{seen}");
    let drawn = &seen["drawn"];
    assert_eq!(drawn["namespaces"], 5, "a box per namespace: {drawn}");
    assert_eq!(drawn["workloads"], 6, "{drawn}");
    assert_eq!(drawn["edges"], 5, "{drawn}");
    // "Namespaces only": no namespace is expanded, `__proto__` included (in a plain object,
    // `expanded["__proto__"]` is Object.prototype, so it always was).
    let aggregated = browser
        .eval(
            "(() => { const c = document.getElementById('filter-aggregate'); c.checked = true; \
             c.dispatchEvent(new Event('change')); return window.trafficMap.drawn(); })()",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(aggregated["aggregated"], true, "{aggregated}");
    assert_eq!(aggregated["workloads"], 0, "{aggregated}");
    assert_eq!(aggregated["namespaces"], 5, "{aggregated}");
    assert_eq!(browser.eval(INTERACT_JS).ok(), Some(Value::Bool(true)));
    // The file's `<meta>` policy allows the page's own inline code by hash, nothing inline.
    assert_no_csp_violation(&mut browser, "map --output");

    // A page whose data asks for a refresh every 30 days: the delay must stay within what a
    // timer holds (2^31 ms wraps to 0, a poll without pause).
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("\"refresh_seconds\":null"));
    let slow = work.path().join("slow.html");
    std::fs::write(
        &slow,
        html.replace("\"refresh_seconds\":null", "\"refresh_seconds\":2592000"),
    )
    .unwrap();
    browser
        .call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": RECORD_TIMERS_JS}),
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    open(&mut browser, &format!("file://{}", slow.display()), READY);
    std::thread::sleep(Duration::from_secs(1));
    let timers = browser
        .eval("({ delays: window.__delays, fetches: window.__fetches })")
        .unwrap_or_else(|e| panic!("{e}"));
    let max_delay = timers["delays"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .fold(0.0, f64::max);
    let fetches = &timers["fetches"];
    assert_eq!(
        max_delay, 3_600_000.0,
        "the poll waits an hour ({fetches} fetches)"
    );
    assert_eq!(*fetches, 0, "no poll yet");
    drop(browser);

    // Served: the page works under the server's strict CSP header (no 'unsafe-inline':
    // its scripts and styles are allowed by hash), and polls data.json.
    let addr = free_loopback_addr().unwrap();
    let log = std::fs::File::create(work.path().join("map.log")).unwrap();
    let mut server = Server(
        Command::new(&bin)
            .args([
                "map",
                "--inventory",
                inventory.to_str().unwrap(),
                "--edges",
                edges.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
                "--refresh",
                "1s",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr, "/readyz").map(|(code, _)| code) != Ok(200) {
        assert!(
            server.0.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "map --listen not ready: {}",
            promstack::tail(&work.path().join("map.log"), 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut browser = Browser::launch(1400, 900).unwrap_or_else(|e| panic!("{e}"));
    browser
        .call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": RECORD_CSP_JS}),
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    open(
        &mut browser,
        &format!("http://{addr}/"),
        &format!("{READY} && document.body.dataset.refreshed !== undefined"),
    );
    let seen = browser
        .eval(
            "fetch('/', { method: 'HEAD' }).then(r => ({ \
               csp: r.headers.get('content-security-policy'), \
               listed: document.querySelectorAll('[data-edge]').length, \
               drawn: window.trafficMap.drawn() }))",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen["listed"], 5, "{seen}");
    assert_eq!(
        seen["drawn"]["edges"], 5,
        "the graph draws every edge: {seen}"
    );
    let csp = seen["csp"].as_str().unwrap_or_default();
    assert!(
        csp.contains("script-src 'sha256-") && !csp.contains("unsafe"),
        "the header policy is the strict one: {csp}"
    );
    assert_eq!(browser.eval(INTERACT_JS).ok(), Some(Value::Bool(true)));
    assert_no_csp_violation(&mut browser, "map --listen");
}
