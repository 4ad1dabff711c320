//! `deny-observer map --listen`: serves the page and `data.json`, read again from the source
//! every `--refresh`; open pages poll `data.json` and redraw what changed.
//!
//! The server is the metrics server's bounded one ([`crate::export::serve_router`]):
//! the map names every workload and policy, and whoever can reach it should not be able to
//! exhaust it either. `/healthz` answers like the daemon's: 200 while the refresh loop runs,
//! 503 once it has not completed a round for much longer than a refresh and its queries may
//! take. A failing source keeps the last good map on screen, with the error in a banner.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

use super::{EdgeSource, MapData, MapError, build, now_unix, page};
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
        full_detail_max_workloads: super::FULL_DETAIL_MAX_WORKLOADS,
        full_detail_max_edges: super::FULL_DETAIL_MAX_EDGES,
        refresh_seconds: None,
        error: Some(error.to_owned()),
        notes: Vec::new(),
    }
}

/// The router: `/` (the page), `/data.json`, `/healthz`, `/readyz`.
pub fn router(state: Arc<MapState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/data.json", get(data))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
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
        serve_listener(listener, input, source, refresh, wait_for_signal()).await
    })
}

/// Serves the map on `listener` until `shutdown` completes: the refresh loop and the HTTP
/// server of [`serve`], on the caller's runtime.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    inventory: InventoryInput,
    source: EdgeSource,
    refresh: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MapError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let fail = |reason: String| MapError::Serve { addr, reason };
    let feed = Feed::start(inventory).await?;
    let refresh = refresh.max(Duration::from_millis(500));
    let windows = match &source {
        EdgeSource::Prometheus { windows, .. } => windows.len(),
        EdgeSource::File(_) => 1,
    };
    // Each round runs two queries per window and one for the denied ports, each within
    // QUERY_TIMEOUT.
    let stall_after =
        refresh * 3 + QUERY_TIMEOUT * (2 * windows as u32 + 1) + Duration::from_secs(30);
    let state = Arc::new(MapState::new(stall_after));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(refresh_loop(
        Arc::clone(&state),
        feed,
        source,
        refresh,
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
    let server = tokio::spawn(serve_router(
        listener,
        router(Arc::clone(&state)),
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
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut engine: Option<(Arc<Inventory>, Arc<Engine>)> = None;
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
        match source.load().await {
            Ok(observations) => {
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
