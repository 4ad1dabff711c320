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

/// Makes every thread allocate from glibc's main arena. Inventory loads run on whichever
/// blocking thread tokio picks, and each thread would otherwise get its own arena: a 10,000-pod
/// reload's freed memory then stays behind in a different arena each time (measured: 55 MiB
/// after the first load, 93 MiB after three reloads; one arena: 55 MiB throughout). The hot
/// path is one thread, so allocator contention is not a cost here.
///
/// It must run before the tokio runtime starts: a worker thread that allocates before it
/// keeps an arena of its own, and glibc then hands that arena, round robin, to later threads
/// too (measured: the manifest loads landed in a worker's arena, beside the main one).
///
/// It also pins the mmap threshold at 64 KiB. glibc otherwise raises it to the size of every
/// large block freed, up to 32 MiB: after the first API-server list page, each page's response
/// body (megabytes) comes from the heap, the models converted meanwhile are placed around it,
/// and the freed body can no longer be returned. Pinned, such buffers are mapped and unmapped
/// on their own (measured with 10,000 pods through the API server: 64 to 62 MiB after start,
/// 78 to 68 MiB over 10 relists).
pub(super) fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc tunables; M_ARENA_MAX takes effect for threads that have
    // no arena yet, M_MMAP_THRESHOLD for later allocations; neither invalidates existing ones.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Hands start-up garbage back to the allocator and the kernel.
///
/// Parsing the kernel's BTF (megabytes) and loading the program free many small blocks, which
/// glibc consolidates lazily, inside whichever later allocation needs a large block: that was
/// 20 to 30 ms of CPU in the first seconds of a drop flood (perf, `cargo xtask bench`). Trimming
/// now moves the cost to start-up, before the daemon reports ready, and lowers its RSS.
pub(super) fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
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
