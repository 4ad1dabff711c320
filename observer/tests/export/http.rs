//! Export stage: `/metrics`, `/healthz`, `/readyz` served on an ephemeral 127.0.0.1 port, spoken
//! to with plain HTTP/1.1 over a real socket.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::sync::Arc;
use std::time::Duration;

use observer::export::{HttpState, Metrics, MetricsConfig, ReadyCondition, serve};
use observer::inventory::ReloadStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("reply in time")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body split");
    let mut lines = head.lines();
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .expect("status code")
        .parse()
        .expect("numeric status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), observer::export::ExportError>>,
}

async fn start(state: Arc<HttpState>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops on shutdown")
            .expect("server task")
            .expect("serve returns Ok");
    }
}

fn state() -> Arc<HttpState> {
    let metrics = Arc::new(Metrics::new(MetricsConfig::default()).expect("metrics"));
    Arc::new(HttpState::new(metrics))
}

#[tokio::test]
async fn readyz_names_what_is_missing_until_both_conditions_hold() {
    let state = state();
    let server = start(state.clone()).await;

    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("programs_attached"), "{}", r.body);
    assert!(r.body.contains("inventory_loaded"), "{}", r.body);

    state.set_ready(ReadyCondition::ProgramsAttached, true);
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(!r.body.contains("programs_attached"), "{}", r.body);
    assert!(r.body.contains("inventory_loaded"), "{}", r.body);

    // A watch failing before the first load says why.
    let stats = Arc::new(ReloadStats::default());
    state.set_inventory_stats(Arc::clone(&stats));
    stats.mark_failed(
        2,
        "services watch: ApiError: services is forbidden (403)".into(),
    );
    let r = get(server.addr, "/readyz").await;
    assert!(
        r.body.contains(
            "inventory_loaded (last error: services watch: ApiError: services is forbidden (403))"
        ),
        "{}",
        r.body
    );
    stats.mark_ok(2);

    state.set_ready(ReadyCondition::InventoryLoaded, true);
    let r = get(server.addr, "/readyz").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Losing a condition (e.g. programs detached) makes it unready again.
    state.set_ready(ReadyCondition::ProgramsAttached, false);
    assert_eq!(get(server.addr, "/readyz").await.status, 503);

    // Liveness is independent of readiness.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    assert_eq!(get(server.addr, "/nope").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn metrics_serves_the_text_format() {
    let state = state();
    state.metrics().set_build_info("0.1.0", "6.18.0", "node-1");
    state.metrics().record_kernel_drops("no_socket", 4, 240);
    let server = start(state.clone()).await;

    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(
        r.body
            .contains("deny_observer_build_info{kernel_release=\"6.18.0\",node=\"node-1\",version=\"0.1.0\"} 1"),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("deny_observer_kernel_drops_total{reason=\"no_socket\"} 4"),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("# TYPE deny_observer_kernel_drops_total counter")
    );

    // Each scrape renders the current values.
    state.metrics().record_kernel_drops("no_socket", 1, 60);
    let r = get(server.addr, "/metrics").await;
    assert!(
        r.body
            .contains("deny_observer_kernel_drops_total{reason=\"no_socket\"} 5"),
        "{}",
        r.body
    );
    server.stop().await;
}

#[tokio::test]
async fn healthz_fails_when_the_main_loop_stalls() {
    let metrics = Arc::new(Metrics::new(MetricsConfig::default()).expect("metrics"));
    let state = Arc::new(HttpState::new(metrics).with_stall_after(Duration::from_millis(200)));
    let server = start(state.clone()).await;

    // Before the first heartbeat: alive (startup is readiness' business).
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    state.heartbeat();
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get(server.addr, "/healthz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("stalled"), "{}", r.body);
    state.heartbeat();
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    server.stop().await;
}

/// `/metrics` asks the refresher first and serves what it recorded; a refresher that never
/// answers delays a scrape by at most `REFRESH_WAIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_asks_the_refresher_first_and_never_waits_long() {
    use observer::export::{REFRESH_WAIT, RefreshRequest};

    let state = state();
    let (tx, rx) = std::sync::mpsc::sync_channel::<RefreshRequest>(8);
    state.set_refresher(tx);
    let metrics = state.metrics().clone();
    // Weak: the state owns the refresher's channel, which must close when the test drops it.
    let refreshed = Arc::downgrade(&state);
    // The refresher records one lost event per request, as a drain would record drops, and
    // says the counters changed, as the daemon's pipeline does after each drain.
    let refresher = std::thread::spawn(move || {
        let mut answered = 0u64;
        while let Ok(done) = rx.recv() {
            answered += 1;
            if answered <= 2 {
                metrics.record_loss("refresh_test", 1);
                if let Some(state) = refreshed.upgrade() {
                    state.counters_refreshed();
                }
                let _ = done.send(());
            } else {
                // From the third request on, never answer (hold the sender, then drop it).
                std::thread::sleep(REFRESH_WAIT * 2);
                drop(done);
            }
        }
        answered
    });
    let server = start(state.clone()).await;
    let line = |body: &str| {
        body.lines()
            .find(|l| l.contains("stage=\"refresh_test\""))
            .map(str::to_owned)
    };
    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        line(&r.body).is_some_and(|l| l.ends_with(" 1")),
        "the first scrape sees its own refresh: {:?}",
        line(&r.body)
    );
    let r = get(server.addr, "/metrics").await;
    assert!(line(&r.body).is_some_and(|l| l.ends_with(" 2")));
    let start = std::time::Instant::now();
    let r = get(server.addr, "/metrics").await;
    let waited = start.elapsed();
    assert_eq!(r.status, 200);
    assert!(line(&r.body).is_some_and(|l| l.ends_with(" 2")));
    assert!(
        waited >= REFRESH_WAIT && waited < REFRESH_WAIT + Duration::from_secs(2),
        "a silent refresher delays the scrape by REFRESH_WAIT, not more: {waited:?}"
    );
    server.stop().await;
    drop(state);
    assert_eq!(refresher.join().expect("refresher thread"), 3);
}

/// Scrapes between two refreshes share one render; a refresh makes the next scrape render
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_renders_once_per_refresh() {
    use observer::export::RefreshRequest;

    let state = state();
    // A refresher that answers without refreshing anything (a drain that was fresh enough).
    let (tx, rx) = std::sync::mpsc::sync_channel::<RefreshRequest>(64);
    state.set_refresher(tx);
    std::thread::spawn(move || {
        while let Ok(done) = rx.recv() {
            let _ = done.send(());
        }
    });
    let server = start(state.clone()).await;
    let scrapes: Vec<_> = (0..20)
        .map(|_| tokio::spawn(get(server.addr, "/metrics")))
        .collect();
    for s in scrapes {
        assert_eq!(s.await.expect("scrape task").status, 200);
    }
    assert_eq!(
        state.renders(),
        1,
        "20 scrapes without a refresh: one render"
    );
    state.metrics().record_loss("render_test", 7);
    state.counters_refreshed();
    let r = get(server.addr, "/metrics").await;
    assert!(r.body.contains("stage=\"render_test\"} 7"), "{}", r.body);
    assert_eq!(state.renders(), 2);
    server.stop().await;
}

/// The server closes the oldest connection when a new one exceeds the cap, so a probe always
/// gets in; silent connections are closed after the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_sheds_the_oldest_and_probes_get_in() {
    use observer::export::{HttpLimits, serve_with};

    let state = state();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = HttpLimits {
        max_connections: 8,
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_with(listener, state, limits, async move {
        let _ = stop_rx.await;
    }));
    // 50 clients that connect and say nothing.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let r = get(addr, "/healthz").await;
        assert_eq!(r.status, 200);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    // The oldest idle connections were closed by the server (EOF), at most 8 are left open,
    // and after the header timeout none is.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        idle.len(),
        "every silent connection is closed by now"
    );
    let _ = stop_tx.send(());
    task.await.expect("server task").expect("server");
}

/// A request whose headers exceed the limit is refused without the server buffering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_are_refused() {
    let server = start(state()).await;
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let big = "x".repeat(64 * 1024);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    // The server may close while we still write: only what it answers matters.
    let _ = s.write_all(req.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    let reply = String::from_utf8_lossy(&raw);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "oversized headers answered with {reply:?}"
    );
    assert!(!reply.contains("ok"), "{reply}");
    // The server still serves others.
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    server.stop().await;
}

/// A client that asks for a large response and then reads a trickle is cut off once it has
/// taken less than `MIN_WRITE_PROGRESS` bytes within the write timeout, and the kernel drops
/// what it still held for it: the client gets a reset, not the rest of the body from an
/// orphaned socket (whose kernel buffer would otherwise have grown to `tcp_wmem`'s 4 MiB).
/// A client that reads at full speed still gets all of a `Connection: close` response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_reader_is_cut_off_and_its_queued_bytes_are_dropped() {
    use observer::export::{HttpLimits, serve_router};

    const BODY: usize = 16 << 20;
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let router = axum::Router::new().route(
        "/big",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = HttpLimits {
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_router(listener, router, limits, async move {
        let _ = stop_rx.await;
    }));

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    // 1 KiB every 100 ms, for 4 s: far less than 64 KiB a second.
    let mut trickled = 0;
    let mut buf = [0u8; 1024];
    let mut reset = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(n)) => trickled += n,
            Ok(Err(e)) => reset |= e.kind() == std::io::ErrorKind::ConnectionReset,
            Err(_) => {}
        }
    }
    // Now at full speed: whatever the kernel still holds for us comes, then the end.
    let mut rest = vec![0u8; 1 << 20];
    let mut tail = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await {
            Ok(Ok(0)) => break "end of stream".to_owned(),
            Ok(Ok(n)) => tail += n,
            Ok(Err(e)) => break format!("{:?}", e.kind()),
            Err(_) => break "timeout".to_owned(),
        }
    };
    // The reset is reported once: during the trickle, or now.
    assert!(
        reset || end == "ConnectionReset",
        "no reset: trickled {trickled} bytes, then {tail} more, then {end}"
    );
    assert!(
        trickled + tail < 1 << 20,
        "the server kept sending: trickled {trickled} bytes, then {tail} more"
    );

    // A fast reader gets the whole body, even though the server closes right after it.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("reply in time")
        .expect("read");
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{:?}", &raw[..64]);
    assert!(raw.ends_with(&[b'x'; 64]), "body cut short");
    assert!(raw.len() > BODY, "{} bytes", raw.len());

    let _ = stop_tx.send(());
    task.await.expect("server task").expect("server");
}

/// A state whose `/metrics` is about 1.4 MB (20,000 `events_lost_total` series), far more than
/// the kernel buffers of a connection, with a refresher that, like the daemon's, starts a new
/// generation at each scrape: every scrape renders anew.
fn big_state() -> Arc<HttpState> {
    use observer::export::RefreshRequest;

    let state = state();
    for i in 0..20_000 {
        state
            .metrics()
            .record_loss(&format!("big_render_test_stage_{i:06}"), 1);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<RefreshRequest>(64);
    state.set_refresher(tx);
    // Weak: the state owns the channel, which closes (ending the thread) when it is dropped.
    let refreshed = Arc::downgrade(&state);
    std::thread::spawn(move || {
        while let Ok(done) = rx.recv() {
            if let Some(state) = refreshed.upgrade() {
                state.counters_refreshed();
            }
            let _ = done.send(());
        }
    });
    state
}

async fn start_with(state: Arc<HttpState>, limits: observer::export::HttpLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(observer::export::serve_with(
        listener,
        state,
        limits,
        async move {
            let _ = rx.await;
        },
    ));
    Server {
        addr,
        stop: Some(tx),
        task,
    }
}

/// A client with a 4 KiB receive buffer that asked for `/metrics` and has its first bytes.
async fn slow_metrics_client(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("response starts in time")
        .expect("read");
    assert_eq!(&head, b"HTTP/1.1 200");
    s
}

/// Waits (at most 5 s) until `state` holds `n` renders.
async fn renders_alive_become(state: &HttpState, n: usize) -> usize {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while state.renders_alive() != n && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.renders_alive()
}

/// A client that reads `/metrics` steadily, well above the minimum write progress but too
/// slowly to finish within the response timeout, is cut off (reset) shortly after it, and the
/// render it held is freed: the write timeout alone lets it hold the render for as long as
/// the body takes at its pace (9 s here; minutes for a 1.4 MB `/metrics` read at just over
/// 64 KiB per 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_slow_metrics_reader_is_cut_off_at_the_response_timeout() {
    use observer::export::{HttpLimits, MIN_WRITE_PROGRESS};

    let state = big_state();
    let limits = HttpLimits {
        response_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        ..HttpLimits::default()
    };
    let server = start_with(state.clone(), limits).await;
    let body_len = get(server.addr, "/metrics").await.body.len();
    assert!(body_len > 1_000_000, "a small render: {body_len} bytes");

    let t0 = std::time::Instant::now();
    let mut s = slow_metrics_client(server.addr).await;
    // 8 KiB every 50 ms: 160 KiB/s, 5 times the minimum progress (64 KiB in the 2 s write
    // timeout), so about 9 s for the whole body.
    const { assert!(160 * 1024 >= 5 * MIN_WRITE_PROGRESS / 2) };
    let mut buf = vec![0u8; 8192];
    let mut read = 0;
    // Meanwhile another scrape renders anew; the slow client still holds the older render.
    let other = tokio::spawn({
        let (addr, state) = (server.addr, Arc::clone(&state));
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(get(addr, "/metrics").await.status, 200);
            state.renders_alive()
        }
    });
    let end = 'reading: loop {
        if t0.elapsed() > Duration::from_secs(15) {
            break "still reading after 15 s".to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut chunk = 0;
        while chunk < buf.len() {
            match tokio::time::timeout(Duration::from_millis(5), s.read(&mut buf[chunk..])).await {
                Ok(Ok(0)) => break 'reading "end of stream".to_owned(),
                Ok(Ok(n)) => {
                    chunk += n;
                    read += n;
                }
                Ok(Err(e)) => break 'reading format!("{:?}", e.kind()),
                Err(_) => break,
            }
        }
    };
    let took = t0.elapsed();
    assert_eq!(other.await.expect("other scrape"), 2);
    assert_eq!(
        end, "ConnectionReset",
        "after {read} of {body_len} bytes in {took:?}"
    );
    assert!(read < body_len / 2, "read {read} of {body_len} bytes");
    // The timeout is checked when hyper asks for the next 64 KiB slice, a fraction of a second
    // at this pace (at most about one write timeout at the minimum progress).
    assert!(
        took < limits.response_timeout + limits.write_timeout + Duration::from_millis(1500),
        "cut off after {took:?}"
    );
    assert_eq!(
        renders_alive_become(&state, 1).await,
        1,
        "the cut-off response's render is freed"
    );
    server.stop().await;
}

/// A client that reads at full speed gets all of a large `/metrics`, sent in slices, with its
/// Content-Length (not chunked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_metrics_client_gets_the_whole_body_with_its_content_length() {
    let state = big_state();
    let server = start(state.clone()).await;
    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), None);
    let length: usize = r
        .header("content-length")
        .expect("content-length")
        .parse()
        .expect("numeric content-length");
    assert_eq!(length, r.body.len());
    assert!(length > 1_000_000, "{length} bytes");
    assert!(
        r.body.contains(
            "deny_observer_events_lost_total{stage=\"big_render_test_stage_019999\"} 1\n"
        ),
        "last series missing"
    );
    assert!(r.body.ends_with('\n'));
    server.stop().await;
}

/// Slow clients that each hold a `/metrics` of a different generation cannot keep more than
/// `MAX_RENDERS_ALIVE` renders in memory: beyond it, scrapes get the latest render. Once they
/// are gone, scrapes render anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_keep_more_than_max_renders_alive() {
    use observer::export::{HttpLimits, MAX_RENDERS_ALIVE};

    let state = big_state();
    let limits = HttpLimits {
        write_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        response_timeout: Duration::from_secs(60),
        ..HttpLimits::default()
    };
    let server = start_with(state.clone(), limits).await;
    let mut slow = Vec::new();
    for _ in 0..MAX_RENDERS_ALIVE + 4 {
        slow.push(slow_metrics_client(server.addr).await);
    }
    assert_eq!(state.renders_alive(), MAX_RENDERS_ALIVE);
    assert_eq!(state.renders(), MAX_RENDERS_ALIVE as u64);
    // A scrape is still answered, whole, from the latest render.
    let r = get(server.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.body.ends_with('\n'));
    assert_eq!(state.renders(), MAX_RENDERS_ALIVE as u64);

    // The slow clients go away: the server's next writes fail, their renders are freed and
    // scrapes render anew.
    drop(slow);
    assert_eq!(renders_alive_become(&state, 1).await, 1);
    assert_eq!(get(server.addr, "/metrics").await.status, 200);
    assert_eq!(state.renders(), MAX_RENDERS_ALIVE as u64 + 1);
    server.stop().await;
}
