//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the traffic
//! map's tests and render benchmark.
//!
//! The protocol runs over `--remote-debugging-pipe`: Chromium reads commands from its fd 3 and
//! writes answers and events to its fd 4, each a JSON message ended by a NUL byte. A shell
//! `exec` moves our stdin/stdout pipes onto those descriptors, so no socket, port or
//! WebSocket client is involved, and the browser dies with its pipes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Errors driving the browser.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// No chromium binary on PATH.
    #[error("chromium is not installed (`cargo xtask setup` installs Debian's chromium)")]
    NotInstalled,
    /// Starting or talking to the process failed.
    #[error("chromium: {0}")]
    Io(#[from] std::io::Error),
    /// The browser closed its pipe or did not answer in time.
    #[error("chromium: {0}")]
    Protocol(String),
}

/// The chromium binary, if installed.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Flags every launch uses: headless, no sandbox (tests run as root, where Chromium's sandbox
/// refuses to start), software rendering, and a private profile.
fn base_flags(profile: &Path, width: u32, height: u32) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--no-default-browser-check".into(),
        "--disable-extensions".into(),
        "--disable-background-networking".into(),
        "--disable-dev-shm-usage".into(),
        "--hide-scrollbars".into(),
        format!("--window-size={width},{height}"),
        format!("--user-data-dir={}", profile.display()),
    ]
}

/// A headless browser with one page, driven over the DevTools protocol.
pub struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: Receiver<Value>,
    next_id: u64,
    session: String,
    /// What the page reported (see [`Browser::reports`]), oldest first, at most
    /// [`MAX_REPORTS`].
    reports: Vec<Value>,
    _profile: tempfile::TempDir,
}

/// The events [`Browser::reports`] keeps: console messages, the browser's own log (where
/// Chromium says what a Content-Security-Policy refused), and uncaught exceptions.
const REPORTED: [&str; 3] = [
    "Runtime.consoleAPICalled",
    "Log.entryAdded",
    "Runtime.exceptionThrown",
];

/// Reports kept; later ones are dropped (a test reads them long before).
const MAX_REPORTS: usize = 1000;

impl Browser {
    /// Starts Chromium with a `width`×`height` window and attaches to a blank page.
    pub fn launch(width: u32, height: u32) -> Result<Self, BrowserError> {
        let bin = binary().ok_or(BrowserError::NotInstalled)?;
        let profile = tempfile::tempdir()?;
        let mut flags = base_flags(profile.path(), width, height);
        flags.push("--remote-debugging-pipe".into());
        let quoted: Vec<String> = flags.iter().map(|f| format!("'{f}'")).collect();
        let script = format!(
            "exec '{}' {} about:blank 3<&0 4>&1 0</dev/null 1>/dev/null",
            bin.display(),
            quoted.join(" ")
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let commands = child
            .stdin
            .take()
            .ok_or_else(|| BrowserError::Protocol("no command pipe".into()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| BrowserError::Protocol("no answer pipe".into()))?;
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut browser = Self {
            child,
            commands,
            answers,
            next_id: 0,
            session: String::new(),
            reports: Vec::new(),
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}), false)?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| BrowserError::Protocol(format!("no targetId in {target}")))?
            .to_owned();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            false,
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| BrowserError::Protocol(format!("no sessionId in {attached}")))?
            .to_owned();
        browser.call("Page.enable", json!({}), true)?;
        browser.call("Runtime.enable", json!({}), true)?;
        browser.call("Log.enable", json!({}), true)?;
        Ok(browser)
    }

    /// Sends one command (to the page's session when `page`) and waits for its answer.
    pub fn call(&mut self, method: &str, params: Value, page: bool) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if page {
            msg["sessionId"] = Value::String(self.session.clone());
        }
        let mut bytes =
            serde_json::to_vec(&msg).map_err(|e| BrowserError::Protocol(e.to_string()))?;
        bytes.push(0);
        self.commands.write_all(&bytes)?;
        self.commands.flush()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(answer) if answer["id"] == json!(id) => {
                    if let Some(err) = answer.get("error") {
                        return Err(BrowserError::Protocol(format!("{method}: {err}")));
                    }
                    return Ok(answer["result"].clone());
                }
                // Events and answers to earlier commands.
                Ok(event) => self.keep(event),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BrowserError::Protocol(format!(
                        "{method}: no answer in 60s"
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BrowserError::Protocol(format!(
                        "{method}: the browser closed its pipe ({:?})",
                        self.child.try_wait()
                    )));
                }
            }
        }
    }

    fn keep(&mut self, event: Value) {
        let reported = event["method"]
            .as_str()
            .is_some_and(|m| REPORTED.contains(&m));
        if reported && self.reports.len() < MAX_REPORTS {
            self.reports.push(event);
        }
    }

    /// Takes what the page reported since the last call: each event's method and params
    /// (`Runtime.consoleAPICalled`, `Log.entryAdded`, `Runtime.exceptionThrown`).
    pub fn reports(&mut self) -> Vec<Value> {
        while let Ok(event) = self.answers.try_recv() {
            self.keep(event);
        }
        std::mem::take(&mut self.reports)
    }

    /// Navigates the page to `url` (the load continues in the background).
    pub fn navigate(&mut self, url: &str) -> Result<(), BrowserError> {
        let answer = self.call("Page.navigate", json!({"url": url}), true)?;
        match answer.get("errorText") {
            Some(err) => Err(BrowserError::Protocol(format!(
                "navigating to {url}: {err}"
            ))),
            None => Ok(()),
        }
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its JSON value.
    pub fn eval(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let answer = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            true,
        )?;
        if let Some(ex) = answer.get("exceptionDetails") {
            return Err(BrowserError::Protocol(format!(
                "evaluating {expression}: {ex}"
            )));
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until it is truthy; returns that value, or an
    /// error naming the expression after `timeout`.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> Result<Value, BrowserError> {
        let deadline = Instant::now() + timeout;
        loop {
            // A page in the middle of a navigation may have no context for a moment.
            let value = self.eval(expression).unwrap_or(Value::Null);
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(BrowserError::Protocol(format!(
                    "{expression} still false after {}s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Takes a PNG screenshot of `url` with Chromium's own `--screenshot`, after `budget_ms` of
/// virtual time (scripts and animation frames run, timers fire early).
pub fn screenshot(
    url: &str,
    png: &Path,
    width: u32,
    height: u32,
    budget_ms: u32,
) -> Result<(), BrowserError> {
    let bin = binary().ok_or(BrowserError::NotInstalled)?;
    let profile = tempfile::tempdir()?;
    let mut flags = base_flags(profile.path(), width, height);
    flags.push(format!("--virtual-time-budget={budget_ms}"));
    flags.push(format!("--screenshot={}", png.display()));
    let out = Command::new(bin)
        .args(&flags)
        .arg(url)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() || !png.is_file() {
        return Err(BrowserError::Protocol(format!(
            "screenshot of {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}
