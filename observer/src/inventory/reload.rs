//! Reloading the manifest directory when it changes.
//!
//! A task polls the directory's fingerprint (names, sizes, modification times and inodes of the
//! manifest files, following symlinks). Polling rather than inotify is deliberate: ConfigMap and
//! hostPath volumes change by swapping symlinks, which inotify on the visible path misses, and
//! a poll every few seconds costs nothing next to the reload it triggers.
//!
//! A reload that fails is logged with the file and object at fault and counted, and the last
//! good inventory stays published. Only the initial load's failure is returned to the caller.
//! A directory that holds no object at all (empty, or deleted and recreated empty) is a
//! failure, not an empty cluster: no real cluster has zero namespaces.
//!
//! Staleness: [`ReloadStats`] says whether the source's last attempt succeeded and when it last
//! did. A poll that finds the directory unchanged and readable counts as a success (the
//! inventory is known to be current), so the success time only falls behind while the
//! directory cannot be read or fails to load.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};

use super::manifest::{self, LoadError};
use super::model::{Inventory, ObjectCounts};

/// Floor for the poll period.
const MIN_POLL: Duration = Duration::from_millis(10);

/// Outcome counters and staleness of an inventory source, shared with whoever exports them.
///
/// A source has up to 32 parts (the manifest directory has one; the API server has one per
/// watched resource). The source is *successful* while no part's last attempt failed; the
/// success time advances only then.
#[derive(Debug, Default)]
pub struct ReloadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Bit `n` set: part `n`'s last attempt failed.
    failing: AtomicU32,
    last_success_unix: AtomicI64,
    last_error: Mutex<Option<String>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ReloadStats {
    /// Successful loads, the initial one included.
    pub fn reloads_ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Failed reloads (each change that produced a bad directory counts once).
    pub fn reloads_failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// True while the newest version of the source fails to load (an older inventory, or
    /// none, is in use).
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) != 0
    }

    /// Unix time (seconds) of the last success (0: never).
    pub fn last_success_unix(&self) -> i64 {
        self.last_success_unix.load(Ordering::Relaxed)
    }

    /// Message of the most recent failure, kept after recovery.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Part `part` succeeded now; when no other part is failing, the source is current now.
    pub fn mark_ok(&self, part: u32) {
        let bit = 1u32 << (part % 32);
        let before = self.failing.fetch_and(!bit, Ordering::Relaxed);
        if before & !bit == 0 {
            self.last_success_unix.store(unix_now(), Ordering::Relaxed);
        }
    }

    /// Part `part` failed with `message`.
    pub fn mark_failed(&self, part: u32, message: String) {
        self.failing
            .fetch_or(1u32 << (part % 32), Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(message);
    }

    /// The source is still current (a watch is connected, a poll found nothing changed):
    /// advances the success time unless a part is failing.
    pub fn confirm_current(&self) {
        if !self.failing() {
            self.last_success_unix.store(unix_now(), Ordering::Relaxed);
        }
    }

    fn record_ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.mark_ok(0);
    }

    fn record_failure(&self, message: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.mark_failed(0, message);
    }
}

/// A running directory watch. The polling task stops once this and every receiver from
/// [`DirWatch::subscribe`] are dropped.
#[derive(Debug)]
pub struct DirWatch {
    rx: watch::Receiver<Arc<Inventory>>,
    stats: Arc<ReloadStats>,
    reload: Arc<Notify>,
}

impl DirWatch {
    /// A receiver of inventory snapshots; `changed()` fires on each successful reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Inventory>> {
        self.rx.clone()
    }

    /// The inventory in use now.
    pub fn current(&self) -> Arc<Inventory> {
        self.rx.borrow().clone()
    }

    /// Object counts of the inventory in use now.
    pub fn counts(&self) -> ObjectCounts {
        self.rx.borrow().counts()
    }

    /// The reload counters.
    pub fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    /// Reloads the directory at once, even when it looks unchanged (SIGHUP): files edited in
    /// place within one timestamp tick, or a remote filesystem that hides changes, are read
    /// again.
    pub fn reload_now(&self) {
        self.reload.notify_one();
    }
}

/// One manifest file's identity and version.
#[derive(Debug, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    mtime_ns: i128,
    dev: u64,
    ino: u64,
}

/// The directory's state, or why it could not be listed (a change of error is a change too).
type Fingerprint = Result<Vec<FileStamp>, String>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let files = manifest::manifest_files(dir).map_err(|e| e.to_string())?;
    files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(FileStamp {
                len: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                dev: meta.dev(),
                ino: meta.ino(),
                path,
            })
        })
        .collect()
}

/// Loads `path` now, then polls it every `poll` (at least 10 ms) and publishes each successful reload. Must run
/// inside a tokio runtime. Returns the initial load's error if it fails.
pub async fn watch_dir(path: PathBuf, poll: Duration) -> Result<DirWatch, LoadError> {
    let stats = Arc::new(ReloadStats::default());
    let dir = path.clone();
    let (print, initial) = blocking(move || (fingerprint(&dir), load_non_empty(&dir))).await?;
    let initial = initial?;
    stats.record_ok();
    log_loaded(&path, &initial, "loaded inventory");
    let (tx, rx) = watch::channel(Arc::new(initial));
    let reload = Arc::new(Notify::new());
    tokio::spawn(poll_loop(
        path,
        poll,
        tx,
        stats.clone(),
        print,
        Arc::clone(&reload),
    ));
    Ok(DirWatch { rx, stats, reload })
}

/// [`manifest::load_dir`], refusing a directory without a single object.
fn load_non_empty(dir: &Path) -> Result<Inventory, LoadError> {
    let inv = manifest::load_dir(dir)?;
    if inv.is_empty() {
        return Err(LoadError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the inventory directory holds no namespace, pod or NetworkPolicy (an empty or \
                 half-written directory is not an empty cluster)",
            ),
        });
    }
    Ok(inv)
}

/// Runs blocking file-system work off the async workers. A panic in the loader becomes an I/O
/// error rather than taking the daemon down.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LoadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LoadError::Io {
            path: PathBuf::from("<inventory loader>"),
            source: std::io::Error::other(format!("loader task failed: {e}")),
        })
}

async fn poll_loop(
    path: PathBuf,
    poll: Duration,
    tx: watch::Sender<Arc<Inventory>>,
    stats: Arc<ReloadStats>,
    mut last: Fingerprint,
    reload: Arc<Notify>,
) {
    // `interval` panics on a zero period; a bad flag value must not crash the daemon.
    let mut ticker = tokio::time::interval(poll.max(MIN_POLL));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let forced = tokio::select! {
            _ = ticker.tick() => false,
            () = reload.notified() => true,
        };
        if tx.is_closed() {
            tracing::debug!(dir = %path.display(), "inventory watch has no receivers; stopping");
            return;
        }
        // The fingerprint is taken before loading: a write racing the load changes it again
        // and triggers another reload on the next tick.
        let dir = path.clone();
        let print = blocking(move || fingerprint(&dir))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        if print == last && !forced {
            if print.is_ok() {
                stats.confirm_current();
            }
            continue;
        }
        last = print;
        if forced {
            tracing::info!(dir = %path.display(), "reloading the inventory (SIGHUP)");
        }
        let dir = path.clone();
        let result = blocking(move || load_non_empty(&dir)).await.and_then(|r| r);
        match result {
            Ok(inv) => {
                stats.record_ok();
                log_loaded(&path, &inv, "reloaded inventory");
                // Unchanged objects keep the previous snapshot's allocations, so the views
                // built on it stay valid for them and the fresh copies are freed now.
                let (inv, _) = super::delta::rebase(&tx.borrow(), Arc::new(inv));
                tx.send_replace(inv);
            }
            Err(e) => {
                tracing::error!(
                    dir = %path.display(),
                    file = %e.path().display(),
                    error = %e,
                    "inventory reload failed; keeping the last good inventory"
                );
                stats.record_failure(e.to_string());
            }
        }
    }
}

fn log_loaded(path: &Path, inv: &Inventory, what: &str) {
    let c = inv.counts();
    tracing::info!(
        dir = %path.display(),
        namespaces = c.namespaces,
        pods = c.pods,
        policies = c.policies,
        "{what}"
    );
}
