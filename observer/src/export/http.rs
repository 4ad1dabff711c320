//! `/metrics`, `/healthz` and `/readyz` on their own small router.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ExportError;
use super::metrics::Metrics;

/// A condition `/readyz` waits for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReadyCondition {
    /// The eBPF programs are loaded and attached.
    ProgramsAttached,
    /// The first inventory is loaded (manifest directory read, or API-server watches synced).
    InventoryLoaded,
}

impl ReadyCondition {
    /// Every condition, in the order `/readyz` reports them.
    pub const ALL: [ReadyCondition; 2] = [Self::ProgramsAttached, Self::InventoryLoaded];

    /// Name used in the `/readyz` body.
    pub fn name(self) -> &'static str {
        match self {
            Self::ProgramsAttached => "programs_attached",
            Self::InventoryLoaded => "inventory_loaded",
        }
    }
}

/// How long a `/metrics` request waits for the counters to be refreshed before it serves
/// what it has.
pub const REFRESH_WAIT: Duration = Duration::from_millis(250);

/// A request to refresh the counters now; the refresher answers on the sender when done.
pub type RefreshRequest = tokio::sync::oneshot::Sender<()>;

/// Default for [`HttpState::with_stall_after`].
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// State shared by the daemon's loops and the HTTP handlers.
pub struct HttpState {
    metrics: Arc<Metrics>,
    programs_attached: AtomicBool,
    inventory_loaded: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` at the last [`HttpState::heartbeat`], plus one (0 = never).
    last_beat_ms: AtomicU64,
    stall_after: Duration,
    /// Where `/metrics` asks for fresh counters (see [`HttpState::set_refresher`]).
    refresher: OnceLock<SyncSender<RefreshRequest>>,
}

impl HttpState {
    /// Not ready, no heartbeat yet, stall limit [`DEFAULT_STALL_AFTER`].
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            programs_attached: AtomicBool::new(false),
            inventory_loaded: AtomicBool::new(false),
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            stall_after: DEFAULT_STALL_AFTER,
            refresher: OnceLock::new(),
        }
    }

    /// Sets how long without a [`HttpState::heartbeat`] makes `/healthz` fail.
    pub fn with_stall_after(mut self, stall_after: Duration) -> Self {
        self.stall_after = stall_after;
        self
    }

    /// Makes every `/metrics` request first ask `refresher` to bring the counters up to date
    /// and wait for the answer, at most [`REFRESH_WAIT`]. The daemon drains the kernel maps
    /// there, so a scrape sees drops up to that moment rather than up to the last periodic
    /// drain. Only the first call takes effect.
    pub fn set_refresher(&self, refresher: SyncSender<RefreshRequest>) {
        let _ = self.refresher.set(refresher);
    }

    /// Asks the refresher, if any, and waits for it (bounded). A full queue means refreshes
    /// are already pending, and a refresher that is gone or slow is not waited for: the
    /// scrape then serves the counters as they are.
    async fn refresh(&self) {
        let Some(refresher) = self.refresher.get() else {
            return;
        };
        let (done, answered) = tokio::sync::oneshot::channel();
        if refresher.try_send(done).is_err() {
            return;
        }
        if tokio::time::timeout(REFRESH_WAIT, answered).await.is_err() {
            tracing::debug!(
                wait_ms = REFRESH_WAIT.as_millis() as u64,
                "counter refresh not done in time; serving /metrics as it is"
            );
        }
    }

    /// The metrics served on `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets or clears one readiness condition.
    pub fn set_ready(&self, condition: ReadyCondition, value: bool) {
        self.flag(condition).store(value, Ordering::Release);
    }

    fn flag(&self, condition: ReadyCondition) -> &AtomicBool {
        match condition {
            ReadyCondition::ProgramsAttached => &self.programs_attached,
            ReadyCondition::InventoryLoaded => &self.inventory_loaded,
        }
    }

    /// Conditions not met yet (empty when ready).
    pub fn missing(&self) -> Vec<ReadyCondition> {
        ReadyCondition::ALL
            .into_iter()
            .filter(|&c| !self.flag(c).load(Ordering::Acquire))
            .collect()
    }

    /// True once every [`ReadyCondition`] holds.
    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// Called by the daemon's main loop at each turn (e.g. each flow-map drain). `/healthz`
    /// fails once no heartbeat came for the stall limit; before the first one it passes, so a
    /// slow start is left to `/readyz`.
    pub fn heartbeat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_beat_ms.store(ms + 1, Ordering::Release);
    }

    /// Time since the last heartbeat, or `None` before the first.
    pub fn since_heartbeat(&self) -> Option<Duration> {
        let beat = self.last_beat_ms.load(Ordering::Acquire);
        let at = self.started + Duration::from_millis(beat.checked_sub(1)?);
        Some(Instant::now().saturating_duration_since(at))
    }
}

/// The router with `/metrics`, `/healthz` and `/readyz`.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExportError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "<unknown>".to_owned());
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ExportError::Serve { addr, source })
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    state.refresh().await;
    match state.metrics.encode_text() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode /metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response()
        }
    }
}

async fn healthz(State(state): State<Arc<HttpState>>) -> Response {
    match state.since_heartbeat() {
        Some(since) if since > state.stall_after => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: main loop last ran {}s ago (limit {}s)\n",
                since.as_secs(),
                state.stall_after.as_secs()
            ),
        )
            .into_response(),
        _ => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    let missing = state.missing();
    if missing.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: waiting for {}\n", names.join(", ")),
    )
        .into_response()
}
