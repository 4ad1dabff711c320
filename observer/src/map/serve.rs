//! `deny-observer map --listen`: serves the page and `data.json`, read again from the source
//! every `--refresh`; open pages poll `data.json` and redraw what changed.
//!
//! The server is the metrics server's bounded one ([`crate::export::serve_router`]):
//! the map names every workload and policy, and whoever can reach it should not be able to
//! exhaust it either. `/healthz` answers like the daemon's: 200 while the refresh loop runs,
//! 503 once it has not completed a round for much longer than a refresh and its queries may
//! take. A failing source keeps the last good map on screen, with the error in a banner.
//!
//! Every answer carries headers that keep browsers from framing, sniffing, caching or leaking
//! the map ([`security_headers`]). The one exception is what hyper answers itself to a request
//! it cannot parse (400, 431 or 414, with `connection: close`, `content-length: 0` and `date`
//! only, then closes): the service never sees those, and there is no body to protect. Listening on a loopback address, the server answers only requests
//! whose `Host` is a loopback name or address: a web page the operator opens elsewhere could
//! otherwise rebind its own DNS name to 127.0.0.1 and read the map through the browser. On any
//! other address (a pod behind a Service, a port-forward) every `Host` is accepted: the names
//! clients use there (Service DNS names, IPs, an ingress host) are not known in advance, and
//! whoever can reach such an address can reach the map without a browser anyway.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

use super::{EdgeSource, MAX_REFRESH, MapData, MapError, build, left_out_note, now_unix, page};
use crate::export::{HttpLimits, serve_router};
use crate::inventory::Inventory;
use crate::verdict::Engine;
use crate::verdict::edges::QUERY_TIMEOUT;

/// What the handlers serve, replaced by each refresh.
struct Served {
    page: Bytes,
    data: Bytes,
    /// The last good map, kept to be shown with the error of a failed refresh.
    last_good: Option<MapData>,
}

/// State shared by the refresh loop and the handlers.
pub struct MapState {
    served: RwLock<Served>,
    started: Instant,
    last_round: Mutex<Instant>,
    stall_after: Duration,
    loaded: AtomicBool,
    /// The error last reported on stderr, so a source that stays broken is reported once.
    last_error: Mutex<Option<String>>,
}

impl MapState {
    fn new(stall_after: Duration) -> Self {
        let empty = placeholder("loading: the first read of the edges has not finished");
        Self {
            served: RwLock::new(Served {
                page: Bytes::from(page::render(&empty)),
                data: Bytes::from(page::script_json(&empty)),
                last_good: None,
            }),
            started: Instant::now(),
            last_round: Mutex::new(Instant::now()),
            stall_after,
            loaded: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn publish(&self, data: &MapData, good: bool) {
        let page = Bytes::from(page::render(data));
        let json = Bytes::from(page::script_json(data));
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        served.page = page;
        served.data = json;
        if good {
            served.last_good = Some(data.clone());
            self.loaded.store(true, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn last_good(&self) -> Option<MapData> {
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last_good
            .clone()
    }

    fn round_done(&self) {
        *self.last_round.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn since_round(&self) -> Duration {
        self.last_round
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// An empty map carrying only an error or status line.
fn placeholder(error: &str) -> MapData {
    MapData {
        schema_version: super::SCHEMA_VERSION,
        generated_unix: now_unix(),
        source: String::new(),
        windows: Vec::new(),
        window_seconds: Vec::new(),
        namespaces: Vec::new(),
        nodes: Vec::new(),
        edges: Vec::new(),
        edges_left_out: 0,
        full_detail_max_workloads: super::FULL_DETAIL_MAX_WORKLOADS,
        full_detail_max_edges: super::FULL_DETAIL_MAX_EDGES,
        refresh_seconds: None,
        error: Some(error.to_owned()),
        notes: Vec::new(),
    }
}

/// The router: `/` (the page), `/data.json`, `/healthz`, `/readyz`, every answer (errors and
/// not-found included) with [`security_headers`]. With `loopback_only` (the server listens on
/// a loopback address) requests must name a loopback host (see [`loopback_host`]).
pub fn router(state: Arc<MapState>, loopback_only: bool) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/data.json", get(data))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(loopback_only, guard))
}

/// The page's policy as a header value, built once.
static HEADER_CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    // Hashes and keywords are ASCII: this cannot fail. Should it, nothing may run.
    HeaderValue::from_str(page::header_csp())
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"))
});

/// The headers of every answer: no MIME sniffing, no framing (the header CSP's
/// `frame-ancestors`, which a `<meta>` CSP cannot carry, and `X-Frame-Options` for older
/// browsers), no referrer, the page's own policy, no reading by other sites' pages as a
/// subresource (`Cross-Origin-Resource-Policy`), and, unless the answer says otherwise,
/// `Cache-Control: no-store`: the map names every workload and policy, and is live.
pub fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CONTENT_SECURITY_POLICY, HEADER_CSP.clone());
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// Whether a `Host` (or URI authority) names this machine's loopback: `localhost`, an address
/// of 127.0.0.0/8 or `[::1]`, each with or without a port.
pub fn loopback_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        let Some((v6, tail)) = rest.split_once(']') else {
            return false;
        };
        if !(tail.is_empty() || tail.strip_prefix(':').is_some_and(is_port)) {
            return false;
        }
        return v6.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// Rejects what must not be answered (see [`router`]), then adds [`security_headers`].
async fn guard(State(loopback_only): State<bool>, request: Request, next: Next) -> Response {
    let mut response = match check_host(&request, loopback_only) {
        Ok(()) => next.run(request).await,
        Err(rejected) => rejected.into_response(),
    };
    security_headers(response.headers_mut());
    response
}

/// Why [`guard`] turned a request away.
#[derive(Debug, PartialEq, Eq)]
enum Rejected {
    /// HTTP/1.1 without a `Host`, or with several: 400 (RFC 9112 3.2).
    BadHost,
    /// A host that is not a loopback one, on a loopback listener: 421.
    NotLoopback,
}

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        match self {
            Self::BadHost => (
                StatusCode::BAD_REQUEST,
                "bad request: HTTP/1.1 requires exactly one Host header\n",
            )
                .into_response(),
            Self::NotLoopback => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: this map listens on a loopback address and answers only \
                 requests for localhost, 127.0.0.1 or [::1] (a guard against DNS rebinding); \
                 listen on another address to serve it under other names\n",
            )
                .into_response(),
        }
    }
}

fn check_host(request: &Request, loopback_only: bool) -> Result<(), Rejected> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejected::BadHost);
    }
    // An absolute request URI names the host too, and takes precedence over `Host`.
    let authority = request.uri().authority().map(|a| a.as_str());
    if host.is_none() && authority.is_none() {
        return if request.version() == Version::HTTP_11 {
            Err(Rejected::BadHost)
        } else {
            // HTTP/1.0 has no Host; browsers, the only way to a rebinding, always send one.
            Ok(())
        };
    }
    if !loopback_only {
        return Ok(());
    }
    let host_ok = host.is_none_or(|h| h.to_str().is_ok_and(|h| loopback_host(h.trim())));
    if host_ok && authority.is_none_or(loopback_host) {
        Ok(())
    } else {
        Err(Rejected::NotLoopback)
    }
}

async fn index(State(state): State<Arc<MapState>>) -> Response {
    let page = state
        .served
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .page
        .clone();
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

async fn data(State(state): State<Arc<MapState>>) -> Response {
    let data = state
        .served
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .data
        .clone();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        data,
    )
        .into_response()
}

async fn healthz(State(state): State<Arc<MapState>>) -> Response {
    let since = state.since_round();
    if since > state.stall_after {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: refresh loop last completed {}s ago (limit {}s)\n",
                since.as_secs(),
                state.stall_after.as_secs()
            ),
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(state): State<Arc<MapState>>) -> Response {
    if state.loaded.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: waiting for the first map ({}s since start)\n",
                state.started.elapsed().as_secs()
            ),
        )
            .into_response()
    }
}

/// Where the map's inventory comes from, for [`serve_listener`].
pub enum InventoryInput {
    /// A manifest directory, watched for changes.
    Dir(std::path::PathBuf),
    /// The API server, through this client (watched like the daemon does).
    Kube(kube::Client),
}

/// The inventory behind the map, kept current.
enum Feed {
    Dir(crate::inventory::DirWatch),
    Kube(crate::inventory::kube::KubeInventory),
}

impl Feed {
    /// Starts the feed. The API server's is not waited for: until its first full sync the
    /// page says what it waits for, and the server answers meanwhile.
    async fn start(input: InventoryInput) -> Result<Self, MapError> {
        match input {
            InventoryInput::Kube(client) => {
                use crate::inventory::kube::{KubeInventory, KubeInventoryConfig};
                Ok(Self::Kube(KubeInventory::start(
                    client,
                    Arc::new(|_: &str| {}),
                    KubeInventoryConfig::default(),
                )))
            }
            InventoryInput::Dir(dir) => {
                let watch = crate::inventory::watch_dir(dir, Duration::from_secs(2))
                    .await
                    .map_err(|e| MapError::Usage(format!("loading the inventory: {e}")))?;
                Ok(Self::Dir(watch))
            }
        }
    }

    fn current(&self) -> Arc<Inventory> {
        match self {
            Self::Dir(w) => w.current(),
            Self::Kube(k) => k.current(),
        }
    }

    /// `Err` (what it waits for) until the first full inventory is in.
    fn ready(&self) -> Result<(), String> {
        match self {
            Self::Dir(_) => Ok(()),
            Self::Kube(k) if k.is_ready() => Ok(()),
            Self::Kube(k) => Err(format!(
                "waiting for the inventory: no full list from the API server yet ({})",
                k.health()
                    .last_error()
                    .unwrap_or_else(|| "not synced yet".to_owned())
            )),
        }
    }

    /// A remark when the inventory in use is no longer current (a watch or reload failing).
    fn stale(&self) -> Option<String> {
        let (stats, what) = match self {
            Self::Dir(w) => (w.stats(), "the manifest directory"),
            Self::Kube(k) => (k.health(), "the API server"),
        };
        if !stats.failing() {
            return None;
        }
        let since = stats.last_success_unix();
        let age = i64::try_from(now_unix()).unwrap_or(i64::MAX) - since;
        Some(format!(
            "inventory: reading {what} fails, so open fields and explain answers are from the inventory of {}: {}",
            if since > 0 {
                format!("{age}s ago")
            } else {
                "the start".to_owned()
            },
            stats.last_error().unwrap_or_default()
        ))
    }
}

/// Serves the map on `addr` until SIGINT or SIGTERM.
pub fn serve(
    spec: &str,
    source: EdgeSource,
    addr: SocketAddr,
    refresh: Duration,
    max_edges: usize,
) -> Result<(), MapError> {
    let fail = |reason: String| MapError::Serve { addr, reason };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let input = if spec == "kube" {
            let client = crate::inventory::kube::default_client()
                .await
                .map_err(|e| MapError::Usage(format!("loading the inventory: {e}")))?;
            InventoryInput::Kube(client)
        } else {
            InventoryInput::Dir(spec.into())
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| fail(format!("binding: {e}")))?;
        serve_listener(
            listener,
            input,
            source,
            refresh,
            max_edges,
            wait_for_signal(),
        )
        .await
    })
}

/// How long `/healthz` waits for a refresh round before it says the loop stalled: three
/// refreshes plus the time its queries may take (two per window and one for the denied
/// ports, each within QUERY_TIMEOUT), plus a margin. Saturates rather than overflows.
pub fn stall_after(refresh: Duration, windows: usize) -> Duration {
    let queries = u32::try_from(windows)
        .unwrap_or(u32::MAX)
        .saturating_mul(2)
        .saturating_add(1);
    refresh
        .saturating_mul(3)
        .saturating_add(QUERY_TIMEOUT.saturating_mul(queries))
        .saturating_add(Duration::from_secs(30))
}

/// Serves the map on `listener` until `shutdown` completes: the refresh loop and the HTTP
/// server of [`serve`], on the caller's runtime, with the `max_edges` heaviest edges.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    inventory: InventoryInput,
    source: EdgeSource,
    refresh: Duration,
    max_edges: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MapError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let fail = |reason: String| MapError::Serve { addr, reason };
    let feed = Feed::start(inventory).await?;
    // `--refresh` is bounded when parsed; callers of this function are held to the same
    // ceiling (the page's timer) and to a floor short enough for tests.
    let refresh = refresh.clamp(Duration::from_millis(500), MAX_REFRESH);
    let windows = match &source {
        EdgeSource::Prometheus { windows, .. } => windows.len(),
        EdgeSource::File(_) => 1,
    };
    let state = Arc::new(MapState::new(stall_after(refresh, windows)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(refresh_loop(
        Arc::clone(&state),
        feed,
        source,
        refresh,
        max_edges,
        stop_rx.clone(),
    ));
    eprintln!(
        "deny-observer: serving the traffic map on http://{addr}/ (refresh every {}s)",
        refresh.as_secs_f64()
    );
    let stopped = async move {
        let mut stop = stop_rx;
        let _ = stop.wait_for(|s| *s).await;
    };
    let loopback_only = addr.ip().to_canonical().is_loopback();
    let server = tokio::spawn(serve_router(
        listener,
        router(Arc::clone(&state), loopback_only),
        HttpLimits::default(),
        stopped,
    ));
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = refresher.await;
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(e) => Err(fail(e.to_string())),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn refresh_loop(
    state: Arc<MapState>,
    feed: Feed,
    source: EdgeSource,
    refresh: Duration,
    max_edges: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut engine: Option<(Arc<Inventory>, Arc<Engine>)> = None;
    // Whether stderr was told that edges are left out: said when it starts and when it ends,
    // not at every refresh (the counts move with the traffic).
    let mut told_left_out = false;
    loop {
        if let Err(waiting) = feed.ready() {
            show_error(&state, refresh, &waiting);
            state.round_done();
            tokio::select! {
                _ = tokio::time::sleep(refresh) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        let inventory = feed.current();
        let current = match &engine {
            Some((inv, e)) if Arc::ptr_eq(inv, &inventory) => Arc::clone(e),
            _ => {
                let inv = Arc::clone(&inventory);
                let compiled =
                    tokio::task::spawn_blocking(move || Arc::new(Engine::new(inv))).await;
                match compiled {
                    Ok(e) => {
                        engine = Some((inventory, Arc::clone(&e)));
                        e
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "compiling the inventory failed");
                        state.round_done();
                        continue;
                    }
                }
            }
        };
        match source.load(max_edges).await {
            Ok(observations) => {
                if (observations.left_out > 0) != told_left_out {
                    told_left_out = observations.left_out > 0;
                    if told_left_out {
                        eprintln!(
                            "deny-observer: note: {}",
                            left_out_note(observations.edges.len(), observations.left_out)
                        );
                    } else {
                        eprintln!("deny-observer: note: every edge is drawn again");
                    }
                }
                let stale = feed.stale();
                let built = tokio::task::spawn_blocking(move || {
                    let mut data = build(&current, &observations, now_unix());
                    data.refresh_seconds = Some(refresh.as_secs_f64());
                    data.notes.extend(stale);
                    data
                })
                .await;
                match built {
                    Ok(data) => state.publish(&data, true),
                    Err(err) => show_error(&state, refresh, &format!("building the map: {err}")),
                }
            }
            Err(err) => show_error(&state, refresh, &err.to_string()),
        }
        state.round_done();
        tokio::select! {
            _ = tokio::time::sleep(refresh) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Keeps the last good map, marked with `error`; says so on stderr when the error is new.
fn show_error(state: &MapState, refresh: Duration, error: &str) {
    let mut last = state.last_error.lock().unwrap_or_else(|e| e.into_inner());
    if last.as_deref() != Some(error) {
        eprintln!("deny-observer: map refresh failed (showing the last good map): {error}");
        *last = Some(error.to_owned());
    }
    drop(last);
    let mut data = state.last_good().unwrap_or_else(|| placeholder(error));
    data.error = Some(error.to_owned());
    data.refresh_seconds = Some(refresh.as_secs_f64());
    state.publish(&data, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost",
            "LocalHost:9966",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:9966",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:9966",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9966",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:9966",
            "0.0.0.0",
            "[::2]:9966",
            "[::1",
            "[::1]x",
            "::1",
            "localhost:",
            "localhost:99999999",
            "localhost:80:80",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn stalls_are_computed_without_overflow() {
        assert_eq!(
            stall_after(Duration::from_secs(5), 1),
            Duration::from_secs(15 + 3 * QUERY_TIMEOUT.as_secs() + 30)
        );
        assert_eq!(stall_after(Duration::MAX, 5), Duration::MAX);
        assert!(
            stall_after(Duration::from_secs(1), usize::MAX)
                >= QUERY_TIMEOUT.saturating_mul(u32::MAX)
        );
    }

    /// Sends `raw` bytes on a new connection and reads until the server closes it (10 s at
    /// most): the status (0 for none), headers (lower-case names) and body.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        // A server that answers early may close before it read everything: that is fine.
        let _ = stream.write_all(raw).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got));
        let _ = read
            .await
            .unwrap_or_else(|_| panic!("the server kept the connection open"));
        let text = String::from_utf8_lossy(&got).into_owned();
        let (top, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = top.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    }

    /// One `method` request (`head` after the request line, `\r\n`-separated).
    async fn request_with(
        addr: SocketAddr,
        method: &str,
        version: &str,
        path: &str,
        head: &str,
    ) -> (u16, Vec<(String, String)>, String) {
        let request = format!("{method} {path} {version}\r\n{head}Connection: close\r\n\r\n");
        let answer = exchange(addr, request.as_bytes()).await;
        assert_ne!(answer.0, 0, "no status for {request:?}");
        answer
    }

    /// One GET request (`head` after the request line, `\r\n`-separated).
    async fn request(
        addr: SocketAddr,
        version: &str,
        path: &str,
        head: &str,
    ) -> (u16, Vec<(String, String)>, String) {
        request_with(addr, "GET", version, path, head).await
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn assert_secured(what: &str, headers: &[(String, String)]) {
        assert_eq!(
            header(headers, "x-content-type-options"),
            Some("nosniff"),
            "{what}"
        );
        assert_eq!(header(headers, "x-frame-options"), Some("DENY"), "{what}");
        assert_eq!(
            header(headers, "referrer-policy"),
            Some("no-referrer"),
            "{what}"
        );
        assert_eq!(
            header(headers, "content-security-policy"),
            Some(page::header_csp()),
            "{what}"
        );
        assert_eq!(
            header(headers, "cross-origin-resource-policy"),
            Some("same-origin"),
            "{what}"
        );
        assert_eq!(header(headers, "cache-control"), Some("no-store"), "{what}");
    }

    /// Starts `map --listen` on `bind` (port 0) with a manifest directory and an edges file,
    /// refreshed every `refresh`; returns the address to connect to and the server's stop.
    async fn start(
        dir: &std::path::Path,
        bind: &str,
        refresh: Duration,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let inventory = dir.join("inventory");
        std::fs::create_dir_all(&inventory).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            inventory.join("ns.yaml"),
            "{apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let edges = dir.join("edges.jsonl");
        std::fs::write(
            &edges,
            "{\"source_namespace\":\"shop\",\"source_workload\":\"web\",\"destination_namespace\":\"shop\",\"destination_workload\":\"api\",\"protocol\":\"tcp\",\"port\":80,\"observed\":3,\"verdict\":\"deny\"}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_listener(
            listener,
            InventoryInput::Dir(inventory),
            EdgeSource::File(edges),
            refresh,
            10,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _, _) = request(addr, "HTTP/1.1", "/readyz", "Host: localhost\r\n").await;
            if status == 200 {
                return (addr, stop_tx);
            }
            assert!(Instant::now() < deadline, "not ready after 20s: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_loopback_server_answers_loopback_hosts_only_and_secures_every_answer() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A refresh far beyond the bounds overflowed the stall limit before it was clamped.
        let (addr, stop) = start(dir.path(), "127.0.0.1:0", Duration::MAX).await;
        let host = format!("Host: 127.0.0.1:{}\r\n", addr.port());

        let (status, headers, body) = request(addr, "HTTP/1.1", "/", &host).await;
        assert_eq!(status, 200, "{body}");
        assert_secured("/", &headers);
        assert!(
            body.contains(&format!("content=\"{}\"", page::page_csp())),
            "the page carries the same policy"
        );
        let (status, headers, body) =
            request(addr, "HTTP/1.1", "/data.json", "Host: localhost\r\n").await;
        assert_eq!(status, 200, "{body}");
        assert_secured("/data.json", &headers);
        let data: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(data["refresh_seconds"], 3600.0, "the refresh is clamped");
        assert_eq!(data["edges"].as_array().map(Vec::len), Some(1), "{data}");
        for path in ["/healthz", "/nope"] {
            let (status, headers, _) = request(addr, "HTTP/1.1", path, "Host: [::1]\r\n").await;
            assert_eq!(status, if path == "/nope" { 404 } else { 200 }, "{path}");
            assert_secured(path, &headers);
        }

        // DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1.
        for evil in ["Host: evil.example\r\n", "Host: evil.example:9966\r\n"] {
            let (status, headers, body) = request(addr, "HTTP/1.1", "/data.json", evil).await;
            assert_eq!(status, 421, "{evil}: {body}");
            assert!(body.contains("DNS rebinding"), "{body}");
            assert!(!body.contains("shop/web"), "{body}");
            assert_secured("421", &headers);
        }
        let (status, _, _) = request(
            addr,
            "HTTP/1.1",
            "http://evil.example/data.json",
            "Host: localhost\r\n",
        )
        .await;
        assert_eq!(status, 421, "an absolute URI names the host too");
        let (status, headers, body) = request(addr, "HTTP/1.1", "/", "").await;
        assert_eq!(status, 400, "HTTP/1.1 without Host: {body}");
        assert_secured("400", &headers);
        let (status, _, _) = request(
            addr,
            "HTTP/1.1",
            "/",
            "Host: localhost\r\nHost: evil.example\r\n",
        )
        .await;
        assert_eq!(status, 400, "two Hosts");
        let (status, _, _) = request(addr, "HTTP/1.0", "/healthz", "").await;
        assert_eq!(status, 200, "HTTP/1.0 needs no Host");
        let _ = stop.send(());
    }

    #[tokio::test]
    async fn every_route_method_and_error_of_ours_is_secured_and_hypers_own_are_empty() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (addr, stop) = start(dir.path(), "127.0.0.1:0", Duration::from_millis(500)).await;
        let host = "Host: localhost\r\n";
        for path in ["/", "/data.json", "/healthz", "/readyz"] {
            let (status, headers, body) = request(addr, "HTTP/1.1", path, host).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            assert_secured(path, &headers);
            // HEAD: the same headers, no body.
            let (status, headers, body) = request_with(addr, "HEAD", "HTTP/1.1", path, host).await;
            assert_eq!((status, body.as_str()), (200, ""), "HEAD {path}");
            assert_secured(path, &headers);
            // Nothing but GET and HEAD: no preflight is ever answered with CORS headers.
            for method in ["POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"] {
                let (status, headers, body) =
                    request_with(addr, method, "HTTP/1.1", path, host).await;
                assert_eq!(status, 405, "{method} {path}: {body}");
                assert_eq!(
                    header(&headers, "allow"),
                    Some("GET,HEAD"),
                    "{method} {path}"
                );
                assert!(
                    !headers
                        .iter()
                        .any(|(k, _)| k.starts_with("access-control-")),
                    "{method} {path}"
                );
                assert_secured(&format!("{method} {path}"), &headers);
            }
        }
        // No file is served from a path: whatever it names is 404, secured, without the map.
        for path in [
            "/../data.json",
            "/%2e%2e/data.json",
            "//data.json",
            "/data.json/",
            "/index.html",
            "/map.js",
            "/./",
            "/..%2f..%2fetc%2fpasswd",
        ] {
            let (status, headers, body) = request(addr, "HTTP/1.1", path, host).await;
            assert_eq!(status, 404, "{path}: {body}");
            assert!(!body.contains("shop"), "{path}: {body}");
            assert_secured(path, &headers);
        }
        let (status, headers, _) =
            request_with(addr, "CONNECT", "HTTP/1.1", "localhost:80", host).await;
        assert!(status == 404 || status == 405, "CONNECT: {status}");
        assert_secured("CONNECT", &headers);
        let (status, headers, _) =
            request_with(addr, "CONNECT", "HTTP/1.1", "evil.example:80", host).await;
        assert_eq!(status, 421, "CONNECT names its host in the target");
        assert_secured("CONNECT evil", &headers);

        // Requests hyper rejects while parsing never reach the service: hyper answers them
        // itself, with a status, `connection: close`, `content-length: 0` and `date` only,
        // and closes. There is no
        // body to sniff, render or frame, so the missing headers expose nothing; this pins
        // what a client gets (see the README).
        let big = "x".repeat(20 * 1024);
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        for (what, raw, want) in [
            ("a bad request line", "GARBAGE\r\n\r\n".to_owned(), 400),
            (
                "a bad method",
                "G\u{1}T / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_owned(),
                400,
            ),
            (
                "a bad header",
                "GET / HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n".to_owned(),
                400,
            ),
            (
                "a bad version",
                "GET / HTTP/9.9\r\nHost: localhost\r\n\r\n".to_owned(),
                400,
            ),
            (
                "oversize headers",
                format!("GET / HTTP/1.1\r\nHost: localhost\r\nX: {big}\r\n\r\n"),
                431,
            ),
            (
                "an oversize target",
                format!("GET /{big} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
                431,
            ),
            (
                "too many headers",
                format!("GET / HTTP/1.1\r\nHost: localhost\r\n{many}\r\n"),
                431,
            ),
        ] {
            let (status, headers, body) = exchange(addr, raw.as_bytes()).await;
            assert_eq!(status, want, "{what}: {headers:?} {body}");
            assert_eq!(body, "", "{what}");
            let mut names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["connection", "content-length", "date"], "{what}");
            assert_eq!(header(&headers, "content-length"), Some("0"), "{what}");
            assert_eq!(header(&headers, "connection"), Some("close"), "{what}");
        }
        // An HTTP/2 preface, and headers that never end: closed without any answer.
        let (status, headers, body) = exchange(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert_eq!(status, 0, "HTTP/2: {headers:?} {body}");
        let started = Instant::now();
        let (status, _, _) = exchange(addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n").await;
        assert_eq!(status, 0, "a request whose headers never end");
        assert!(
            started.elapsed() < HttpLimits::default().header_read_timeout + Duration::from_secs(3),
            "closed after the header timeout: {:?}",
            started.elapsed()
        );
        let _ = stop.send(());
    }

    #[tokio::test]
    async fn a_server_on_another_address_answers_any_host() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (addr, stop) = start(dir.path(), "0.0.0.0:0", Duration::from_millis(500)).await;
        let (status, headers, body) = request(
            addr,
            "HTTP/1.1",
            "/data.json",
            "Host: deny-observer-map.monitoring.svc:9966\r\n",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_secured("/data.json", &headers);
        let (status, _, _) = request(addr, "HTTP/1.1", "/", "").await;
        assert_eq!(status, 400, "HTTP/1.1 without Host");
        let _ = stop.send(());
    }
}
