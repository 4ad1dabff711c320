//! The daemon's process: resource limits, logging, memory hand-back, signals.

use tracing::{debug, warn};

use super::LogFormat;

/// Raises the soft file-descriptor limit to the hard one (as Go and systemd services do) and
/// returns the soft limit now in force.
pub(super) fn raise_nofile_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit struct passed to it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads a valid, initialised rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(limit.rlim_cur)
}

pub(super) fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are noise in `kubectl logs` and log collectors: only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests calling main twice) is harmless; ignore its error.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large flow maps load.
pub(super) fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)"
        );
    }
}

pub(super) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// What a signal asks of the daemon.
pub(super) enum Signal {
    /// SIGTERM or SIGINT: save the state and exit.
    Stop,
    /// SIGHUP: reload the inventory.
    Reload,
}

/// The signal streams, registered once so that no signal falls between two waits.
pub(super) struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(super) fn register() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())
            .map_err(|err| warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the daemon"))
            .ok();
        let hup = signal(SignalKind::hangup())
            .map_err(|err| warn!(error = %err, "cannot listen for SIGHUP"))
            .ok();
        Self { term, hup }
    }

    /// Waits for SIGTERM or SIGINT. A SIGHUP meanwhile (during start-up) changes nothing: the
    /// inventory is being loaded for the first time.
    pub(super) async fn stop(&mut self) {
        loop {
            if let Signal::Stop = self.next().await {
                return;
            }
            debug!("SIGHUP during start-up: the inventory is being loaded now; nothing to reload");
        }
    }

    pub(super) async fn next(&mut self) -> Signal {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            () = recv(&mut self.term) => Signal::Stop,
            () = recv(&mut self.hup) => Signal::Reload,
        }
    }
}
