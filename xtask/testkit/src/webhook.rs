//! A tiny HTTP/1.1 server on 127.0.0.1 for the alert-path tests: Alertmanager's webhook
//! receiver (`POST /alerts`, every notification recorded with the time it arrived), plus a
//! `GET /metrics` whose text the test sets, so the harness self-test can drive a real scrape.
//!
//! std only: one accept thread, one connection at a time (Alertmanager and Prometheus are the
//! only clients, and both retry).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Path Alertmanager posts notifications to.
pub const WEBHOOK_PATH: &str = "/alerts";

/// One alert of one webhook notification (Alertmanager's webhook payload, version 4).
#[derive(Clone, Debug)]
pub struct ReceivedAlert {
    /// When the notification carrying it arrived.
    pub at: Instant,
    /// `firing` or `resolved`.
    pub status: String,
    /// Labels, `alertname` included.
    pub labels: BTreeMap<String, String>,
    /// Annotations (summary, description, runbook_url, ...).
    pub annotations: BTreeMap<String, String>,
    /// `startsAt` as Alertmanager sent it.
    pub starts_at: String,
}

impl ReceivedAlert {
    /// The `alertname` label ("" if absent).
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

#[derive(Default)]
struct Shared {
    alerts: Vec<ReceivedAlert>,
    /// Bodies that were not a webhook payload, kept for the failure report.
    malformed: Vec<String>,
    metrics: String,
}

/// The server; stops (and joins its thread) on drop.
pub struct Webhook {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Webhook {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("webhook".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            // A broken client connection only loses that request.
                            let _ = serve(stream, &shared);
                        }
                    }
                })?
        };
        Ok(Self {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to give Alertmanager.
    pub fn url(&self) -> String {
        format!("http://{}{WEBHOOK_PATH}", self.addr)
    }

    /// Sets the body of `GET /metrics` (Prometheus text format).
    pub fn set_metrics(&self, text: &str) {
        lock(&self.shared).metrics = text.to_owned();
    }

    /// Every alert received so far, in order of arrival.
    pub fn alerts(&self) -> Vec<ReceivedAlert> {
        lock(&self.shared).alerts.clone()
    }

    /// Request bodies that could not be read as a webhook payload.
    pub fn malformed(&self) -> Vec<String> {
        lock(&self.shared).malformed.clone()
    }

    /// Waits until a received alert satisfies `want`, at most `timeout`; polls every 100 ms.
    pub fn wait_for(
        &self,
        timeout: Duration,
        want: impl Fn(&ReceivedAlert) -> bool,
    ) -> Option<ReceivedAlert> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.alerts().into_iter().find(|a| want(a)) {
                return Some(a);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic elsewhere must not hide what was received.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one request and closes the connection.
fn serve(stream: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();

    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content) = match (method, path) {
        ("POST", WEBHOOK_PATH) => {
            let at = Instant::now();
            let mut s = lock(shared);
            match parse_notification(&body, at) {
                Some(alerts) => s.alerts.extend(alerts),
                None => s.malformed.push(body),
            }
            ("200 OK", String::new())
        }
        ("GET", "/metrics") => ("200 OK", lock(shared).metrics.clone()),
        _ => ("404 Not Found", String::new()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{content}",
        content.len()
    )?;
    stream.flush()
}

/// The alerts of one Alertmanager webhook payload, or `None` when it is not one.
fn parse_notification(body: &str, at: Instant) -> Option<Vec<ReceivedAlert>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let map = |v: &serde_json::Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let alerts = v.get("alerts")?.as_array()?;
    Some(
        alerts
            .iter()
            .map(|a| ReceivedAlert {
                at,
                status: a["status"].as_str().unwrap_or_default().to_owned(),
                labels: map(&a["labels"]),
                annotations: map(&a["annotations"]),
                starts_at: a["startsAt"].as_str().unwrap_or_default().to_owned(),
            })
            .collect(),
    )
}
