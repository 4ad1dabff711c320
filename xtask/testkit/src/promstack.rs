//! A real Prometheus and a real Alertmanager on loopback, for end-to-end alert tests.
//!
//! [`PromStack::start`] runs Debian's `/usr/bin/prometheus` (2.42) and
//! `/usr/bin/prometheus-alertmanager` (0.25) on free 127.0.0.1 ports, each with a temporary
//! config and storage directory:
//! - Prometheus scrapes the given targets every second (job name of the caller's choice), loads
//!   the given rule files, evaluates them every second, and sends alerts to the Alertmanager;
//! - Alertmanager routes everything to a [`Webhook`] served by the test, grouping by every label
//!   (one notification per alert), with group_wait and group_interval 1 s. Its gossip is off
//!   (`--cluster.listen-address=`), so it opens no other port.
//!
//! Both processes are killed when the stack is dropped, also when a test panics. Their logs go
//! to files in the stack's directory; [`PromStack::report`] gathers those and the state of both
//! servers' APIs, for failure messages.
//!
//! Shipped rules often hold production windows (`for: 2m`) that a test cannot wait for:
//! [`render_rules`] writes a test copy with every `for:` replaced, and checks it with promtool.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::webhook::Webhook;

/// Debian's Prometheus server (package `prometheus`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// Debian's Alertmanager (package `prometheus-alertmanager`).
pub const ALERTMANAGER_BIN: &str = "/usr/bin/prometheus-alertmanager";
/// Debian's promtool (package `prometheus`).
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";

/// What the stack scrapes and evaluates.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Scrape job name (the shipped rules expect `deny-observer`).
    pub job: String,
    /// Targets scraped every second, at `/metrics`.
    pub targets: Vec<SocketAddr>,
    /// Rule files, loaded as they are (see [`render_rules`] for a shortened copy).
    pub rule_files: Vec<PathBuf>,
}

/// A running process killed (SIGKILL) and reaped on drop, and killed by the kernel when the
/// thread that started it ends (PR_SET_PDEATHSIG).
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Self {
        // SAFETY: only prctl, which is async-signal-safe, between fork and exec. The server
        // then dies with the test's thread even when the test process is killed outright.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out.try_clone().expect("cloning a log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Self { name, child, log }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                tail(&self.log, 30)
            )),
            Err(e) => Err(format!("waiting for {}: {e}", self.name)),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prometheus, Alertmanager and the webhook they page. Dropping it stops all three.
pub struct PromStack {
    // Field order is drop order: Prometheus first, so nothing posts to a stopped Alertmanager.
    prometheus: Proc,
    alertmanager: Proc,
    webhook: Webhook,
    prometheus_addr: SocketAddr,
    alertmanager_addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Fails loudly, naming the package, when a binary is missing.
pub fn require_binaries() {
    for (bin, package) in [
        (PROMETHEUS_BIN, "prometheus"),
        (ALERTMANAGER_BIN, "prometheus-alertmanager"),
        (PROMTOOL_BIN, "prometheus"),
    ] {
        assert!(
            Path::new(bin).is_file(),
            "{bin} is missing: install Debian's `{package}` (`cargo xtask setup` does)"
        );
    }
}

/// A free port on 127.0.0.1 (bound, then released; the race with other processes is small and
/// shows up as a clear bind error in the server's log).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
}

impl PromStack {
    /// Starts Alertmanager (paging `webhook`) and Prometheus, and waits (at most 60 s) until
    /// both are ready and Prometheus knows the Alertmanager. Panics with their logs if not.
    /// The webhook is the caller's so that it can be a scrape target too.
    pub fn start(config: &StackConfig, webhook: Webhook) -> Self {
        require_binaries();
        let dir = tempfile::Builder::new()
            .prefix("deny-observer-promstack-")
            .tempdir()
            .expect("creating the stack's temp dir");
        let alertmanager_addr = free_port();
        let prometheus_addr = free_port();

        let am_config = dir.path().join("alertmanager.yml");
        std::fs::write(&am_config, alertmanager_config(&webhook.url()))
            .expect("writing alertmanager.yml");
        let prom_config = dir.path().join("prometheus.yml");
        std::fs::write(&prom_config, prometheus_config(config, alertmanager_addr))
            .expect("writing prometheus.yml");

        let mut am_cmd = Command::new(ALERTMANAGER_BIN);
        am_cmd
            .arg(format!("--config.file={}", am_config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("am-data").display()
            ))
            .arg(format!("--web.listen-address={alertmanager_addr}"))
            // Empty: no gossip listener, so a lone Alertmanager opens no cluster port.
            .arg("--cluster.listen-address=");
        let alertmanager = Proc::spawn(
            "alertmanager",
            &mut am_cmd,
            dir.path().join("alertmanager.log"),
        );

        let mut prom_cmd = Command::new(PROMETHEUS_BIN);
        prom_cmd
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("prom-data").display()
            ))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            // Alerts evaluated before the Alertmanager is discovered are dropped, and a firing
            // alert is re-sent only every resend delay (1 m by default): 1 s keeps a test's
            // first alert from waiting a minute.
            .arg("--rules.alert.resend-delay=1s");
        let prometheus = Proc::spawn(
            "prometheus",
            &mut prom_cmd,
            dir.path().join("prometheus.log"),
        );

        let mut stack = Self {
            prometheus,
            alertmanager,
            webhook,
            prometheus_addr,
            alertmanager_addr,
            dir,
        };
        stack.wait_ready(Duration::from_secs(60));
        stack
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self
                .prometheus
                .check_alive()
                .and_then(|()| self.alertmanager.check_alive())
            {
                panic!("the Prometheus stack did not start: {e}");
            }
            let ready = |addr| http_get(addr, "/-/ready").is_ok_and(|(s, _)| s == 200);
            if ready(self.prometheus_addr)
                && ready(self.alertmanager_addr)
                && http_get(self.prometheus_addr, "/api/v1/alertmanagers").is_ok_and(|(s, body)| {
                    s == 200 && body.contains(&self.alertmanager_addr.to_string())
                })
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Prometheus stack was not ready within {timeout:?}\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The webhook Alertmanager pages.
    pub fn webhook(&self) -> &Webhook {
        &self.webhook
    }

    /// Prometheus' address.
    pub fn prometheus_addr(&self) -> SocketAddr {
        self.prometheus_addr
    }

    /// Alertmanager's address.
    pub fn alertmanager_addr(&self) -> SocketAddr {
        self.alertmanager_addr
    }

    /// The stack's temporary directory (configs, storage, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Panics (with the report) when Prometheus or Alertmanager has exited.
    pub fn check_alive(&mut self) {
        if let Err(e) = self
            .prometheus
            .check_alive()
            .and_then(|()| self.alertmanager.check_alive())
        {
            panic!("{e}");
        }
    }

    /// Runs an instant PromQL query; returns the JSON `data.result`.
    pub fn query(&self, promql: &str) -> Result<serde_json::Value, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let v = get_json(self.prometheus_addr, &path)?;
        Ok(v["data"]["result"].clone())
    }

    /// Prometheus' active alerts (`/api/v1/alerts`, `data.alerts`): pending and firing.
    pub fn prometheus_alerts(&self) -> Result<serde_json::Value, String> {
        Ok(get_json(self.prometheus_addr, "/api/v1/alerts")?["data"]["alerts"].clone())
    }

    /// One line per active Prometheus alert: `name state {labels} value`, for timelines.
    pub fn alert_states(&self) -> Vec<String> {
        match self.prometheus_alerts() {
            Ok(serde_json::Value::Array(alerts)) => alerts
                .iter()
                .map(|a| {
                    format!(
                        "{} {} {} value={}",
                        a["labels"]["alertname"].as_str().unwrap_or("?"),
                        a["state"].as_str().unwrap_or("?"),
                        compact_labels(&a["labels"]),
                        a["value"].as_str().unwrap_or("?"),
                    )
                })
                .collect(),
            Ok(other) => vec![format!("unexpected /api/v1/alerts data: {other}")],
            Err(e) => vec![format!("/api/v1/alerts failed: {e}")],
        }
    }

    /// Everything useful after a failure: scrape targets, rule health, Prometheus and
    /// Alertmanager alerts, what the webhook got, and both logs' tails.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "--- Prometheus {} targets:", self.prometheus_addr);
        match get_json(self.prometheus_addr, "/api/v1/targets") {
            Ok(v) => {
                for t in v["data"]["activeTargets"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        s,
                        "  {} health={} lastError={:?} lastScrape={}",
                        t["scrapeUrl"].as_str().unwrap_or("?"),
                        t["health"].as_str().unwrap_or("?"),
                        t["lastError"].as_str().unwrap_or(""),
                        t["lastScrape"].as_str().unwrap_or("?"),
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(s, "  {e}");
            }
        }
        let _ = writeln!(s, "--- Prometheus rules (health, lastError):");
        match get_json(self.prometheus_addr, "/api/v1/rules") {
            Ok(v) => {
                for g in v["data"]["groups"].as_array().into_iter().flatten() {
                    for r in g["rules"].as_array().into_iter().flatten() {
                        let _ = writeln!(
                            s,
                            "  {} {} health={} state={} lastError={:?}",
                            g["name"].as_str().unwrap_or("?"),
                            r["name"].as_str().unwrap_or("?"),
                            r["health"].as_str().unwrap_or("?"),
                            r["state"].as_str().unwrap_or("-"),
                            r["lastError"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(s, "  {e}");
            }
        }
        let _ = writeln!(s, "--- Prometheus notifier (sent, errors, dropped):");
        match http_get(self.prometheus_addr, "/metrics") {
            Ok((_, text)) => {
                for line in text
                    .lines()
                    .filter(|l| l.starts_with("prometheus_notifications_"))
                {
                    let _ = writeln!(s, "  {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(s, "  {e}");
            }
        }
        let _ = writeln!(s, "--- Prometheus /api/v1/alerts:");
        for line in self.alert_states() {
            let _ = writeln!(s, "  {line}");
        }
        let _ = writeln!(
            s,
            "--- Alertmanager {} /api/v2/alerts:",
            self.alertmanager_addr
        );
        match get_json(self.alertmanager_addr, "/api/v2/alerts") {
            Ok(serde_json::Value::Array(alerts)) => {
                for a in alerts {
                    let _ = writeln!(
                        s,
                        "  {} state={} {}",
                        a["labels"]["alertname"].as_str().unwrap_or("?"),
                        a["status"]["state"].as_str().unwrap_or("?"),
                        compact_labels(&a["labels"]),
                    );
                }
            }
            Ok(other) => {
                let _ = writeln!(s, "  unexpected: {other}");
            }
            Err(e) => {
                let _ = writeln!(s, "  {e}");
            }
        }
        let _ = writeln!(s, "--- webhook {} received:", self.webhook.url());
        for a in self.webhook.alerts() {
            let _ = writeln!(
                s,
                "  {} {} {:?} startsAt={}",
                a.name(),
                a.status,
                a.labels,
                a.starts_at
            );
        }
        for body in self.webhook.malformed() {
            let _ = writeln!(s, "  (not a webhook payload) {body}");
        }
        for p in [&self.prometheus, &self.alertmanager] {
            let _ = writeln!(s, "--- {} log ({}):", p.name, p.log.display());
            let _ = writeln!(s, "{}", tail(&p.log, 15));
        }
        s
    }
}

fn prometheus_config(config: &StackConfig, alertmanager: SocketAddr) -> String {
    // JSON is YAML; serde_json spares us quoting rules.
    let v = serde_json::json!({
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "rule_files": config.rule_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "alerting": {
            "alertmanagers": [{
                "static_configs": [{ "targets": [alertmanager.to_string()] }],
            }],
        },
        "scrape_configs": [{
            "job_name": config.job,
            "static_configs": [{
                "targets": config.targets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }],
        }],
    });
    serde_json::to_string_pretty(&v).expect("serialising prometheus.yml")
}

fn alertmanager_config(webhook_url: &str) -> String {
    let v = serde_json::json!({
        "route": {
            "receiver": "test-webhook",
            // `...`: group by every label, so each alert is its own notification.
            "group_by": ["..."],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{
            "name": "test-webhook",
            "webhook_configs": [{ "url": webhook_url, "send_resolved": true }],
        }],
    });
    serde_json::to_string_pretty(&v).expect("serialising alertmanager.yml")
}

/// Writes a test copy of the rule file `shipped` to `out`: the documented textual substitution
/// is that every line whose first token is `for:` gets `for: <for_duration>` instead, keeping
/// its indentation. Nothing else changes: expressions, labels, annotations and range windows
/// (`[5m]`) are the shipped ones. Returns how many `for:` lines were replaced; the copy must
/// pass `promtool check rules`, or this panics with promtool's output.
pub fn render_rules(shipped: &Path, out: &Path, for_duration: &str) -> usize {
    let text = std::fs::read_to_string(shipped)
        .unwrap_or_else(|e| panic!("reading {}: {e}", shipped.display()));
    let mut replaced = 0;
    let mut rendered = String::with_capacity(text.len());
    for line in text.lines() {
        let body = line.trim_start();
        if body.starts_with("for:") {
            let indent = &line[..line.len() - body.len()];
            let _ = writeln!(rendered, "{indent}for: {for_duration}");
            replaced += 1;
        } else {
            rendered.push_str(line);
            rendered.push('\n');
        }
    }
    std::fs::write(out, rendered).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    let check = Command::new(PROMTOOL_BIN)
        .arg("check")
        .arg("rules")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("running {PROMTOOL_BIN}: {e}"));
    assert!(
        check.status.success(),
        "promtool check rules {} failed:\n{}{}",
        out.display(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    replaced
}

/// `{a="x", b="y"}` without `alertname`.
fn compact_labels(labels: &serde_json::Value) -> String {
    let inner: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "alertname")
        .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap_or("")))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// GETs `path` from `addr` (HTTP/1.1, `Connection: close`, 5 s timeouts); status and body.
/// Prometheus and Alertmanager answer their APIs with a Content-Length, never chunked, as long
/// as we send no Accept-Encoding.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let err = |e: std::io::Error| format!("GET http://{addr}{path}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(err)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{addr}{path}: no header end in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: bad status line in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)));
    }
    Ok((status, body.to_owned()))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = http_get(addr, path)?;
    if status != 200 {
        return Err(format!("GET http://{addr}{path}: status {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET http://{addr}{path}: {e}: {body}"))
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters pass).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
