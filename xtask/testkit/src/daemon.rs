//! Running `deny-observer run` as a child process, for the demo and the end-to-end tests.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::metrics;

/// Failures of the daemon process.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Starting it or creating its log failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It exited.
    #[error("deny-observer run exited ({status}); last log lines of {log}:\n{tail}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// `/readyz` did not answer 200 in time.
    #[error(
        "deny-observer not ready at http://{addr}/readyz after {secs} s; last log lines:\n{tail}"
    )]
    NotReady {
        /// Metrics address.
        addr: SocketAddr,
        /// Seconds waited.
        secs: u64,
        /// Its last log lines.
        tail: String,
    },
    /// The caller asked to stop waiting.
    #[error("interrupted while waiting for deny-observer")]
    Interrupted,
}

/// `deny-observer run --inventory <dir> --metrics-addr <addr>`, stopped (SIGTERM, then SIGKILL)
/// when dropped. Its stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

/// A free loopback port (bound, then released) for a daemon's metrics address.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl Daemon {
    /// Starts the daemon. It runs in its own process group (a terminal's Ctrl-C reaches only
    /// us, and we stop it in order), and dies with its parent (PR_SET_PDEATHSIG), so a crash
    /// of the demo or of a test leaves no daemon behind.
    pub fn start(
        bin: &Path,
        inventory: &Path,
        addr: SocketAddr,
        log: PathBuf,
    ) -> Result<Self, DaemonError> {
        Self::start_with_args(bin, inventory, addr, log, &[])
    }

    /// [`Daemon::start`] with more `run` arguments (e.g. a small flow map for a flood test).
    pub fn start_with_args(
        bin: &Path,
        inventory: &Path,
        addr: SocketAddr,
        log: PathBuf,
        extra: &[&str],
    ) -> Result<Self, DaemonError> {
        let io = |what: String| move |source| DaemonError::Io { what, source };
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let mut command = Command::new(bin);
        command
            .arg("run")
            .arg("--inventory")
            .arg(inventory)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .args(extra);
        // The new-denied-edge state defaults to /var/lib/deny-observer, shared by every run on
        // the machine: edges seen by an earlier test or demo would not be new here.
        if !extra.contains(&"--state-dir") {
            let state = log
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("deny-observer-state");
            command.arg("--state-dir").arg(state);
        }
        // The daemon learns edges for an hour after its state file is created, and pages for
        // none of them; the demo and the tests want the pages from the first deny.
        if !extra.contains(&"--edge-learning") {
            command.args(["--edge-learning", "0s"]);
        }
        command
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        crate::cmd::die_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(io(format!("starting {} run", bin.display())))?;
        Ok(Self { child, log, addr })
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let pid = i32::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: signalling our own child, which has not been reaped (we own its Child).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The metrics address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), DaemonError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(DaemonError::Exited {
                status,
                log: self.log.clone(),
                tail: self.log_tail(),
            }),
            Ok(None) => Ok(()),
            Err(source) => Err(DaemonError::Io {
                what: "waiting for deny-observer".into(),
                source,
            }),
        }
    }

    /// Waits until `/readyz` answers 200 (programs attached, inventory loaded).
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        interrupted: impl Fn() -> bool,
    ) -> Result<(), DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if metrics::http_get(self.addr, "/readyz").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if interrupted() {
                return Err(DaemonError::Interrupted);
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotReady {
                    addr: self.addr,
                    secs: timeout.as_secs(),
                    tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped (we own its Child).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
