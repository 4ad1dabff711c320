//! `/metrics`, `/healthz` and `/readyz` on their own small router, behind a bounded server.
//!
//! The port is reachable from every pod of the cluster (unless the optional NetworkPolicy in
//! `deploy/overlays/metrics-networkpolicy` is applied), so the server assumes hostile clients:
//! - at most [`HttpLimits::max_connections`] connections; a new connection beyond it closes the
//!   oldest one (idle keep-alives and slow clients go first in practice, since a scrape lasts
//!   milliseconds), so a probe always gets in, and the process never runs out of file
//!   descriptors for its own work (inventory reloads);
//! - request headers within [`HttpLimits::header_read_timeout`] and
//!   [`HttpLimits::max_request_bytes`]; an idle connection is closed after
//!   [`HttpLimits::idle_timeout`], a client that takes less than [`MIN_WRITE_PROGRESS`] bytes
//!   of a response within [`HttpLimits::write_timeout`] (one that stops reading, or reads a
//!   trickle) is closed;
//! - each connection's kernel send buffer is fixed at [`SEND_BUFFER_BYTES`] instead of
//!   growing to `tcp_wmem`'s maximum (4 MiB), and a connection the server closes while the
//!   kernel still holds response bytes for it is reset, not closed gracefully: otherwise the
//!   kernel would take a whole `/metrics` into an autotuned buffer and keep it, for a client
//!   that reads a byte now and then, in an orphaned socket the connection cap no longer counts
//!   (2 MiB of kernel memory per request of a 1.4 MB `/metrics`, measured);
//! - a response must be sent within [`HttpLimits::response_timeout`] (30 s), or it is cut off
//!   and its connection reset: the minimum write progress alone lets a client that reads just
//!   over [`MIN_WRITE_PROGRESS`] per write timeout hold a 1.4 MB `/metrics` for minutes. Bodies
//!   are handed to hyper in [`RESPONSE_CHUNK_BYTES`] slices (of the same bytes, Content-Length
//!   kept), so the timeout is checked every 64 KiB;
//! - `/metrics` is rendered once per counter refresh and the same bytes are shared by every
//!   client (a non-reading client holds a reference, not a copy). A scrape triggers a refresh
//!   (at most every 100 ms), so slow clients could still each hold a render of a different
//!   generation: at most [`MAX_RENDERS_ALIVE`] renders are kept alive, beyond which a scrape
//!   is served the latest one until an older one is freed.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::ExportError;
use super::metrics::Metrics;
use crate::inventory::ReloadStats;

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

/// Most `/metrics` renders kept in memory at once (the latest, and older ones still being
/// sent). Scrapes render anew after each counter refresh, which a scrape itself triggers (at
/// most every 100 ms), so slow clients could otherwise each hold a render of their own, up to
/// [`HttpLimits::max_connections`] of them. Once this many are alive, a scrape is served the
/// latest render, whatever its generation, until an older one is freed (a response that
/// finished, or was cut off at [`HttpLimits::response_timeout`]).
pub const MAX_RENDERS_ALIVE: usize = 8;

/// A request to refresh the counters now; the refresher answers on the sender when done.
pub type RefreshRequest = tokio::sync::oneshot::Sender<()>;

/// Default for [`HttpState::with_stall_after`].
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// Default for [`HttpState::with_inventory_max_age`] (and `--inventory-max-age`).
pub const DEFAULT_INVENTORY_MAX_AGE: Duration = Duration::from_secs(600);

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
    /// Bumped by the refresher after each refresh: a render of an older generation is stale.
    generation: AtomicU64,
    /// The last `/metrics` render and its generation; the async lock makes concurrent scrapes
    /// wait for one render instead of each doing its own.
    rendered: tokio::sync::Mutex<Option<(u64, Bytes)>>,
    renders: AtomicU64,
    /// Renders whose bytes are still referenced (by `rendered` or by responses being sent).
    renders_alive: Arc<AtomicUsize>,
    /// Scrapes served an older generation because [`MAX_RENDERS_ALIVE`] renders were alive.
    renders_capped: AtomicU64,
    /// Staleness of the inventory source, for `/readyz`.
    inventory: OnceLock<Arc<ReloadStats>>,
    inventory_empty: AtomicBool,
    inventory_max_age: Duration,
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
            generation: AtomicU64::new(0),
            rendered: tokio::sync::Mutex::new(None),
            renders: AtomicU64::new(0),
            renders_alive: Arc::new(AtomicUsize::new(0)),
            renders_capped: AtomicU64::new(0),
            inventory: OnceLock::new(),
            inventory_empty: AtomicBool::new(false),
            inventory_max_age: DEFAULT_INVENTORY_MAX_AGE,
        }
    }

    /// Sets how long since the inventory source last succeeded makes `/readyz` fail.
    pub fn with_inventory_max_age(mut self, max_age: Duration) -> Self {
        self.inventory_max_age = max_age;
        self
    }

    /// Makes `/readyz` fail while `stats` says the source has not succeeded within the max age
    /// (see [`HttpState::with_inventory_max_age`]). Only the first call takes effect.
    pub fn set_inventory_stats(&self, stats: Arc<ReloadStats>) {
        let _ = self.inventory.set(stats);
    }

    /// Says whether the inventory in use is empty (no namespace, pod or policy): `/readyz`
    /// fails while it is.
    pub fn set_inventory_empty(&self, empty: bool) {
        self.inventory_empty.store(empty, Ordering::Release);
    }

    /// Called by the refresher after it refreshed the counters: the next `/metrics` renders
    /// again; until then every scrape shares the last render.
    pub fn counters_refreshed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times `/metrics` was rendered (for tests and debugging).
    pub fn renders(&self) -> u64 {
        self.renders.load(Ordering::Relaxed)
    }

    /// How many `/metrics` renders are in memory now: the latest, and older ones still
    /// referenced by responses being sent (at most [`MAX_RENDERS_ALIVE`]).
    pub fn renders_alive(&self) -> usize {
        self.renders_alive.load(Ordering::Acquire)
    }

    /// The `/metrics` body: the shared render of the current generation, or a new one (the
    /// latest one, stale or not, while [`MAX_RENDERS_ALIVE`] are alive). Without a refresher
    /// nobody bumps the generation, so every call renders.
    async fn render(&self) -> Result<Bytes, ExportError> {
        let mut cached = self.rendered.lock().await;
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, body)) = cached.as_ref() {
            if self.refresher.get().is_some() && *g == generation {
                return Ok(body.clone());
            }
            if self.renders_alive.load(Ordering::Acquire) >= MAX_RENDERS_ALIVE {
                let capped = self.renders_capped.fetch_add(1, Ordering::Relaxed) + 1;
                if capped.is_power_of_two() {
                    tracing::warn!(
                        max_renders_alive = MAX_RENDERS_ALIVE,
                        capped,
                        "slow /metrics clients hold the most renders kept; serving the latest"
                    );
                }
                return Ok(body.clone());
            }
        }
        let text = self.metrics.encode_text()?;
        self.renders.fetch_add(1, Ordering::Relaxed);
        self.renders_alive.fetch_add(1, Ordering::AcqRel);
        let body = Bytes::from_owner(Render {
            text,
            alive: Arc::clone(&self.renders_alive),
        });
        *cached = Some((generation, body.clone()));
        Ok(body)
    }

    /// Why the inventory is not fit to serve, if it is not.
    fn inventory_problem(&self) -> Option<String> {
        if self.inventory_empty.load(Ordering::Acquire)
            && self.inventory_loaded.load(Ordering::Acquire)
        {
            return Some("inventory_not_empty".to_owned());
        }
        let stats = self.inventory.get()?;
        let last = stats.last_success_unix();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let age = now.saturating_sub(u64::try_from(last).unwrap_or(0));
        (last > 0 && age > self.inventory_max_age.as_secs()).then(|| {
            format!(
                "inventory_fresh (last successful reload {age}s ago, --inventory-max-age {}s{})",
                self.inventory_max_age.as_secs(),
                stats
                    .last_error()
                    .filter(|_| stats.failing())
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            )
        })
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

/// The text of one `/metrics` render; counted in [`HttpState::renders_alive`] until the last
/// response (or slice of one) referencing it is dropped.
struct Render {
    text: String,
    alive: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Render {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl Drop for Render {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::AcqRel);
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

/// A response write must hand the kernel at least this many bytes within
/// [`HttpLimits::write_timeout`] (or finish), or the connection is closed: a client reading a
/// trickle would otherwise hold its response (and the `/metrics` render it references) for as
/// long as it likes. 64 KiB in 10 s is far below what any scraper reads.
pub const MIN_WRITE_PROGRESS: usize = 64 * 1024;

/// Kernel send buffer of each accepted connection (`SO_SNDBUF`; the kernel doubles it for its
/// bookkeeping). Fixing it bounds the kernel memory a connection can hold to about twice this,
/// and lets [`HttpLimits::write_timeout`] see a client that does not read.
pub const SEND_BUFFER_BYTES: usize = 128 * 1024;

/// Most bytes of a response body hyper is handed at once. hyper queues a data frame whole
/// (without copying it) and asks for the next only once less than its buffer limit (16 KiB,
/// from [`HttpLimits::max_request_bytes`]) is left to write, so this bounds how much is
/// written between two checks of [`HttpLimits::response_timeout`]. The pieces are slices of
/// the same bytes, not copies.
pub const RESPONSE_CHUNK_BYTES: usize = 64 * 1024;

/// Bounds of the HTTP server; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Most open connections; a new one beyond it closes the oldest.
    pub max_connections: usize,
    /// Time for a client to send its request headers.
    pub header_read_timeout: Duration,
    /// An open connection with no request in flight and nothing received for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// A response write that hands the kernel less than [`MIN_WRITE_PROGRESS`] bytes in this
    /// long (and does not finish) closes the connection.
    pub write_timeout: Duration,
    /// Most bytes of a request's line and headers.
    pub max_request_bytes: usize,
    /// Longest a response may take from the moment it is ready until its last byte is handed
    /// to the kernel; a response still being sent then is cut off and its connection reset.
    /// [`HttpLimits::write_timeout`] alone lets a client that reads just over
    /// [`MIN_WRITE_PROGRESS`] bytes per write timeout hold a 1.4 MB `/metrics` (and the render
    /// it references) for minutes. Checked each time the server hands out the next
    /// [`RESPONSE_CHUNK_BYTES`] of a body, so the cut comes at most about one write timeout
    /// after it (Prometheus's own `scrape_timeout` defaults to 10 s).
    pub response_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_request_bytes: 16 * 1024,
            response_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves [`router`] on `listener` with [`HttpLimits::default`] until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExportError> {
    serve_with(listener, state, HttpLimits::default(), shutdown).await
}

/// Open connections, oldest first, each with the sender that closes it.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Connections {
    fn lock(this: &Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        // Only ids and senders inside: consistent even after a panic elsewhere.
        this.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the oldest connection; false when none is open.
    fn close_oldest(&mut self) -> bool {
        match self.open.pop_first() {
            Some((_, close)) => {
                let _ = close.send(());
                true
            }
            None => false,
        }
    }
}

/// Serves [`router`] on `listener` within `limits` until `shutdown` completes; open connections
/// are then closed.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExportError> {
    serve_router(listener, router(state), limits, shutdown).await
}

/// Serves any `router` on `listener` within `limits` until `shutdown` completes, with the same
/// connection cap and timeouts as the metrics server (`deny-observer map --listen` uses it).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExportError> {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut shutdown = std::pin::pin!(shutdown);
    let max = limits.max_connections.max(1);
    let mut shed_total: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors: the pending connection stays queued and accept
                // would fail again at once. Free one by closing the oldest connection, and
                // pause a moment so a reload elsewhere in the process can get its descriptor.
                let fds = matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if fds {
                    Connections::lock(&connections).close_oldest();
                }
                tracing::debug!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(if fds { 20 } else { 5 })).await;
                continue;
            }
        };
        let (close_tx, close_rx) = oneshot::channel();
        let id = {
            let mut conns = Connections::lock(&connections);
            while conns.open.len() >= max && conns.close_oldest() {
                shed_total += 1;
                if shed_total.is_power_of_two() {
                    tracing::warn!(
                        max_connections = max,
                        shed_total,
                        "HTTP connection limit reached; closing the oldest connections"
                    );
                }
            }
            let id = conns.next;
            conns.next += 1;
            conns.open.insert(id, close_tx);
            id
        };
        let _ = stream.set_nodelay(true);
        set_send_buffer(&stream, SEND_BUFFER_BYTES);
        let inner = hyper_util::service::TowerToHyperService::new(router.clone());
        let response_timeout = limits.response_timeout;
        let service = hyper::service::service_fn(move |request| {
            let response = hyper::service::Service::call(&inner, request);
            async move {
                response
                    .await
                    .map(|r| r.map(|body| DeadlineBody::new(body, response_timeout)))
            }
        });
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            let io = DeadlineIo::new(stream, limits.idle_timeout, limits.write_timeout);
            let abort = Arc::clone(&io.abort);
            let io = hyper_util::rt::TokioIo::new(io);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_request_bytes.max(8192))
                .max_headers(64)
                .keep_alive(true);
            // Pinned out here, not moved into `select!`, so that the connection (and the
            // stream, whose drop looks at `abort`) outlives the branch that sets `abort`.
            let mut conn = std::pin::pin!(builder.serve_connection(io, service));
            tokio::select! {
                result = &mut conn => {
                    if let Err(err) = result {
                        // A timeout, a reset or a protocol error: whatever the kernel still
                        // holds for this client is not worth sending.
                        abort.store(true, Ordering::Relaxed);
                        tracing::debug!(error = %err, "HTTP connection ended with an error");
                    }
                }
                _ = close_rx => abort.store(true, Ordering::Relaxed),
            }
            Connections::lock(&connections).open.remove(&id);
        });
    }
    let mut conns = Connections::lock(&connections);
    while conns.close_oldest() {}
    Ok(())
}

/// A response body handed to hyper in slices of at most [`RESPONSE_CHUNK_BYTES`] that fails
/// once its deadline passed: hyper then ends the connection with an error (which resets it)
/// and drops the body and what it still queued of it.
struct DeadlineBody {
    inner: axum::body::Body,
    /// The part of the inner body's last data frame not handed out yet.
    pending: Bytes,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl DeadlineBody {
    fn new(inner: axum::body::Body, timeout: Duration) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
        }
    }

    /// The next slice of `data`, keeping the rest for later.
    fn slice(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > RESPONSE_CHUNK_BYTES {
            self.pending = data.split_off(RESPONSE_CHUNK_BYTES);
        }
        data
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Only checked when hyper asks for more: hyper asks as soon as it wrote most of the
        // previous slice, and a client that stops reading meets the write timeout instead.
        if tokio::time::Instant::now() >= this.deadline {
            this.pending = Bytes::new();
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("response not sent within {}s", this.timeout.as_secs_f64()),
            )))));
        }
        if !this.pending.is_empty() {
            let rest = std::mem::take(&mut this.pending);
            let data = this.slice(rest);
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let data = this.slice(data);
                    Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // Exact when the inner body's is, so that hyper still sends a Content-Length.
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(pending));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(pending));
        }
        hint
    }
}

/// Sets `SO_SNDBUF`, which also turns off the kernel's autotuning of it. Best effort: a
/// failure leaves the kernel's default.
fn set_send_buffer(stream: &TcpStream, bytes: usize) {
    if let Err(error) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
        tracing::debug!(%error, "cannot set SO_SNDBUF");
    }
}

/// Bytes the kernel holds for `stream` that the peer has not acknowledged (`TIOCOUTQ`); 0 when
/// it cannot tell.
fn unsent_bytes(stream: &TcpStream) -> libc::c_int {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int to the valid pointer passed, on a socket this stream
    // owns.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc == 0 { queued } else { 0 }
}

/// Makes the coming close of `stream` a reset (`SO_LINGER` 0): the kernel frees what it still
/// holds for the peer at once instead of keeping it in an orphaned socket.
fn reset_on_close(stream: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(%error, "cannot set SO_LINGER");
    }
}

/// A TCP stream whose reads fail after `idle` without data and whose writes fail when less
/// than [`MIN_WRITE_PROGRESS`] bytes went out in `write`, so that neither a silent nor a
/// non-reading (or trickle-reading) client holds a connection (and the response it references)
/// for long.
struct DeadlineIo {
    inner: TcpStream,
    idle: Duration,
    write: Duration,
    read_deadline: Option<Pin<Box<Sleep>>>,
    write_deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes written since the write deadline was last cleared.
    written: usize,
    /// Set when the server gives up on the connection (a deadline passed, an error, shed or
    /// shut down): the close then resets it if the kernel still holds response bytes.
    abort: Arc<AtomicBool>,
}

impl DeadlineIo {
    fn new(inner: TcpStream, idle: Duration, write: Duration) -> Self {
        Self {
            inner,
            idle,
            write,
            read_deadline: None,
            write_deadline: None,
            written: 0,
            abort: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts `n` bytes written; enough of them clear the write deadline.
    fn wrote(&mut self, n: usize) {
        self.written = self.written.saturating_add(n);
        if self.written >= MIN_WRITE_PROGRESS {
            self.write_deadline = None;
            self.written = 0;
        }
    }

    /// Polls the write deadline; once it passed, the connection is given up.
    fn write_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let expired = expired(&mut self.write_deadline, self.write, cx, "write");
        if expired.is_ready() {
            self.abort.store(true, Ordering::Relaxed);
        }
        expired
    }
}

impl Drop for DeadlineIo {
    fn drop(&mut self) {
        // Only a connection given up on, and only with bytes still queued: a finished
        // response (`Connection: close`) must reach its client whole, and an idle keep-alive
        // closes gracefully.
        if self.abort.load(Ordering::Relaxed) && unsent_bytes(&self.inner) > 0 {
            reset_on_close(&self.inner);
        }
    }
}

/// Polls `deadline` (arming it for `after` from now if unarmed): an error once it passed.
fn expired(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    after: Duration,
    cx: &mut Context<'_>,
    what: &str,
) -> Poll<std::io::Error> {
    let sleep = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
    match sleep.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} timed out after {}s", after.as_secs_f64()),
        )),
        Poll::Pending => Poll::Pending,
    }
}

impl AsyncRead for DeadlineIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = expired(&mut this.read_deadline, this.idle, cx, "idle connection");
                if expired.is_ready() {
                    // hyper may end such a connection without an error.
                    this.abort.store(true, Ordering::Relaxed);
                }
                expired.map(Err)
            }
        }
    }
}

impl AsyncWrite for DeadlineIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.write_expired(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.write_expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        // hyper flushes once everything it buffered is written: the response is out, and the
        // next one starts with a fresh deadline.
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.write_deadline = None;
            this.written = 0;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    state.refresh().await;
    match state.render().await {
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
    let inventory = state.inventory_problem();
    if missing.is_empty() && inventory.is_none() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    // Before the first load, a watch that keeps failing (a 403 on one resource after an RBAC
    // edit) is why: say so here, not only in the logs.
    let load_error = state
        .inventory
        .get()
        .filter(|stats| stats.failing())
        .and_then(|stats| stats.last_error());
    let names: Vec<String> = missing
        .iter()
        .map(|c| match (c, &load_error) {
            (ReadyCondition::InventoryLoaded, Some(e)) => {
                format!("{} (last error: {e})", c.name())
            }
            _ => c.name().to_owned(),
        })
        .chain(inventory)
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: waiting for {}\n", names.join(", ")),
    )
        .into_response()
}
