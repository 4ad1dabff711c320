//! The connection-rate scenario: a TCP connect/accept loop between two simulated pods, with no
//! drop anywhere, so that what it measures is the cost of counting accepted connections
//! (`deny_observer_connections_total`) on the connection setup path.
//!
//! The client closes each connection with an RST (`SO_LINGER` 0), so neither end keeps a
//! TIME_WAIT socket and the loop never runs out of ephemeral ports.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use testkit::simnode::in_netns;

/// Port of the accept loop in the server pod.
pub const PORT: u16 = 7070;

/// One measured connect/accept window.
#[derive(Clone, Debug, Default)]
pub struct ConnWindow {
    /// Connections the client completed (the truth).
    pub connections: u64,
    /// Connections the server accepted.
    pub accepted: u64,
    /// Length of the connect loop.
    pub elapsed: Duration,
    /// What the daemon counted on the edge (only with the daemon).
    pub counted: Option<u64>,
}

impl ConnWindow {
    /// Connections per second.
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The accept loop in `netns`, until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Listens on [`PORT`] (IPv4 and IPv6) in `netns`.
    pub fn start(netns: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop2, accepted2, netns) = (stop.clone(), accepted.clone(), netns.to_owned());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            in_netns(&netns, move || -> anyhow::Result<()> {
                let listener = match listen() {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e).context("binding the accept loop");
                    }
                };
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok(_) => {
                            accepted2.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        // A connection reset before accept() took it.
                        Err(_) => {}
                    }
                }
                Ok(())
            })?
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self {
                stop,
                accepted,
                thread: Some(thread),
            }),
            Ok(Err(e)) => anyhow::bail!("starting the accept loop: {e}"),
            Err(_) => anyhow::bail!("the accept loop did not start within 5 s"),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// The accept loop's socket: non-blocking, polled every 200 µs when idle (several connections
/// are then taken per wake-up, as a busy server's event loop does), with a backlog as large as
/// Linux's default `somaxconn`. With the standard library's backlog of 128 the queue
/// overflowed whenever the thread lost its core for a few milliseconds: the SYN was dropped
/// and the client stalled about a second, a third of a window, in either configuration (a
/// limit window of 1.92 s for 1.5 s asked, at 12,638 connections/s against 28,000).
fn listen() -> anyhow::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
        .context("creating the listening socket")?;
    s.set_reuse_address(true).context("SO_REUSEADDR")?;
    s.bind(&SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), PORT).into())
        .with_context(|| format!("binding port {PORT}"))?;
    s.listen(4096).context("listen")?;
    s.set_nonblocking(true).context("O_NONBLOCK")?;
    Ok(s.into())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `to` from `netns` in a loop for `length`: returns the connections completed
/// and the time taken.
pub fn connect_loop(
    netns: &str,
    to: SocketAddr,
    length: Duration,
) -> anyhow::Result<(u64, Duration)> {
    in_netns(netns, move || -> anyhow::Result<(u64, Duration)> {
        let domain = socket2::Domain::for_address(to);
        let to = socket2::SockAddr::from(to);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < length {
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                .context("creating a TCP socket")?;
            s.set_linger(Some(Duration::ZERO))
                .context("setting SO_LINGER")?;
            s.connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connection {n}"))?;
            n += 1;
        }
        Ok((n, start.elapsed()))
    })?
}

/// Ratio of its connection rate to the limit's the daemon must reach.
pub const RATIO_TARGET: f64 = 0.95;

/// Per-round `(limit, daemon)` windows of the connection scenario.
fn pairs(results: &crate::Results) -> Vec<(&ConnWindow, &ConnWindow)> {
    results
        .rounds
        .iter()
        .filter_map(|round| {
            let of = |c: crate::Config| {
                round
                    .iter()
                    .find(|(config, _)| *config == c)
                    .and_then(|(_, s)| s.conn.as_ref())
            };
            Some((of(crate::Config::Limit)?, of(crate::Config::Daemon)?))
        })
        .collect()
}

/// Median per-round ratio of the daemon's connection rate to the limit's.
pub fn ratio(results: &crate::Results) -> Option<crate::report::Spread> {
    let ratios: Vec<f64> = pairs(results)
        .iter()
        .map(|(l, d)| d.rate() / l.rate().max(1e-9))
        .collect();
    crate::report::Spread::of(&ratios)
}

/// The connection scenario's targets: rate ratio, and exact counts.
pub fn targets(results: &crate::Results) -> Vec<crate::report::Target> {
    let daemon: Vec<&ConnWindow> = results
        .rounds
        .iter()
        .flatten()
        .filter(|(c, _)| *c == crate::Config::Daemon)
        .filter_map(|(_, s)| s.conn.as_ref())
        .collect();
    if daemon.is_empty() {
        return Vec::new();
    }
    let made: u64 = daemon.iter().map(|w| w.connections).sum();
    let counted: u64 = daemon.iter().filter_map(|w| w.counted).sum();
    let inexact = daemon
        .iter()
        .filter(|w| w.counted != Some(w.connections))
        .count();
    let mut t = vec![crate::report::Target {
        name: "accuracy 1.0, tcp-connect (deny_observer_connections_total)".into(),
        pass: Some(inexact == 0),
        detail: format!(
            "counted {counted} of {made} connections over all rounds; {inexact} window(s) inexact"
        ),
    }];
    let ratio = ratio(results);
    if !pairs(results).is_empty() {
        let rates = |f: fn(&(&ConnWindow, &ConnWindow)) -> f64| {
            crate::report::Spread::of(&pairs(results).iter().map(f).collect::<Vec<_>>())
                .map_or("-".to_owned(), |s| format!("{:.0}", s.median))
        };
        t.push(crate::report::Target {
            name: format!("tcp-connect: connection rate ratio to the limit >= {RATIO_TARGET}"),
            pass: ratio.map(|r| r.median >= RATIO_TARGET),
            detail: format!(
                "median {} (min {}, max {}); connections/s median: limit {}, deny-observer {}",
                ratio.map_or("-".into(), |r| format!("{:.3}", r.median)),
                ratio.map_or("-".into(), |r| format!("{:.3}", r.min)),
                ratio.map_or("-".into(), |r| format!("{:.3}", r.max)),
                rates(|(l, _)| l.rate()),
                rates(|(_, d)| d.rate()),
            ),
        });
    }
    t
}

/// The scenario in the JSON report.
pub fn json(results: &crate::Results) -> serde_json::Value {
    let windows: Vec<serde_json::Value> = results
        .rounds
        .iter()
        .flatten()
        .filter_map(|(c, s)| {
            s.conn.as_ref().map(|w| {
                serde_json::json!({
                    "configuration": c.name(),
                    "connections": w.connections,
                    "accepted": w.accepted,
                    "seconds": w.elapsed.as_secs_f64(),
                    "rate": w.rate(),
                    "counted": w.counted,
                })
            })
        })
        .collect();
    serde_json::json!({
        "ratio_to_limit": ratio(results).map(|r| serde_json::json!({"median": r.median, "min": r.min, "max": r.max})),
        "windows": windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Results, Session};

    fn results(limit: u64, daemon: u64, counted: u64) -> Results {
        let w = |n: u64, counted: Option<u64>| ConnWindow {
            connections: n,
            accepted: n,
            elapsed: Duration::from_secs(1),
            counted,
        };
        let session = |conn| Session {
            conn: Some(conn),
            ..Session::default()
        };
        Results {
            rounds: vec![vec![
                (Config::Limit, session(w(limit, None))),
                (Config::Daemon, session(w(daemon, Some(counted)))),
            ]],
            ..Results::default()
        }
    }

    fn passes(r: &Results) -> Vec<Option<bool>> {
        targets(r).iter().map(|t| t.pass).collect()
    }

    #[test]
    fn rate_ratio_and_exact_counts_are_targets() {
        assert_eq!(
            passes(&results(10_000, 9_600, 9_600)),
            [Some(true), Some(true)]
        );
        assert_eq!(
            passes(&results(10_000, 9_000, 9_000)),
            [Some(true), Some(false)]
        );
        assert_eq!(
            passes(&results(10_000, 9_600, 9_599)),
            [Some(false), Some(true)]
        );
        let json = json(&results(10_000, 9_600, 9_600));
        assert!((json["ratio_to_limit"]["median"].as_f64().unwrap() - 0.96).abs() < 1e-9);
        assert_eq!(json["windows"].as_array().unwrap().len(), 2);
        assert!(targets(&Results::default()).is_empty());
    }
}
