//! New-denied-edge detection, persisted across restarts.
//!
//! An edge is (direction, source namespace/workload, destination namespace/workload, protocol,
//! port). It is **new** when it has not been denied within `retention`; every deny refreshes its
//! last-denied time, so a path that keeps being denied never fires again, and one that was
//! quiet for longer than the retention fires once more.
//!
//! Bounded against scans: each (direction, source, destination, protocol) keeps at most
//! `port_budget` distinct ports; further ports fold into one edge with `port="other"`. The
//! full table holds `max_edges` edges; the least recently denied beyond it move to a compact
//! known-edge set (a stable 64-bit hash and a time per edge, `known_capacity` of them), so an
//! edge evicted from the table does not page as new again. Only an edge pushed out of the
//! compact set too (more than `max_edges + known_capacity` distinct edges within the
//! retention) can page twice.
//!
//! Learning: for `learning` after the state file is first created, denied edges are recorded as
//! known without being new, so a first start on a cluster with existing denies does not page
//! for each of them. The start of learning is stored in the state file: a restart continues
//! (or has finished) the same learning period.
//!
//! The state lives in `<state_dir>/denied-edges.json` (versioned JSON, written to a temporary
//! file in the same directory, synced, then renamed over the old one). A missing file starts
//! empty; an unreadable or corrupt one is logged, set aside as `denied-edges.json.corrupt`, and
//! the tracker starts empty (and learns again) rather than failing the daemon.

use std::fs;
use std::hash::Hasher;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::AlertError;
use super::spike::unix_ms;
use crate::flow::{Direction, FastMap, Protocol};

/// File name of the state file inside the state directory.
pub const STATE_FILE: &str = "denied-edges.json";
/// File name of the lock file inside the state directory (see [`StateLock`]).
pub const LOCK_FILE: &str = "lock";
/// Version written into the state file. Version 1 files (no learning start, no folded ports,
/// no compact set) are still read.
pub const STATE_VERSION: u32 = 2;

/// A denied path between two workloads.
///
/// Names are shared `Arc<str>`s: an edge is cloned into the tracker's maps and the spike key at
/// every drain, and a clone must not copy strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeniedEdge {
    /// Direction whose policy denied.
    pub direction: Direction,
    /// Source namespace (the caller's placeholder for off-cluster peers).
    #[serde(with = "arc_str")]
    pub source_namespace: Arc<str>,
    /// Source workload.
    #[serde(with = "arc_str")]
    pub source_workload: Arc<str>,
    /// Destination namespace.
    #[serde(with = "arc_str")]
    pub destination_namespace: Arc<str>,
    /// Destination workload.
    #[serde(with = "arc_str")]
    pub destination_workload: Arc<str>,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port; 0 for protocols without ports and for folded edges.
    pub port: u16,
    /// True for the edge that stands for every port beyond the per-edge port budget (its
    /// `port` label is `other`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ports_folded: bool,
}

impl DeniedEdge {
    /// The `port` label value: the number, or `other` for a folded edge.
    pub fn port_label(&self) -> String {
        if self.ports_folded {
            "other".to_owned()
        } else {
            self.port.to_string()
        }
    }

    /// The edge with its port folded: the key of its port budget, and the edge that stands
    /// for ports beyond it.
    pub fn folded(&self) -> DeniedEdge {
        DeniedEdge {
            port: 0,
            ports_folded: true,
            ..self.clone()
        }
    }

    /// A hash that stays the same across builds and restarts (FNV-1a over the fields), the
    /// identity of an edge in the compact known-edge set.
    fn stable_hash(&self) -> u64 {
        let mut h = Fnv1a::default();
        h.write(self.direction.label().as_bytes());
        for part in [
            &self.source_namespace,
            &self.source_workload,
            &self.destination_namespace,
            &self.destination_workload,
        ] {
            h.write(&[0xff]);
            h.write(part.as_bytes());
        }
        h.write(&[0xff]);
        h.write(self.protocol.label().as_bytes());
        h.write(&self.port.to_le_bytes());
        h.write(&[u8::from(self.ports_folded)]);
        h.finish()
    }
}

/// Serde for `Arc<str>` fields as plain strings (serde's own impl needs its `rc` feature).
mod arc_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(de).map(Arc::from)
    }
}

/// 64-bit FNV-1a: stable, unlike the std and foldhash hashers, whose output may change between
/// releases (the compact set's hashes are persisted).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Tracker settings. Defaults: retention 7 d, 20,000 edges in the table plus 100,000 in the
/// compact set, 16 ports per edge, no learning (`deny-observer run` learns for 1 h by default),
/// no state directory (in memory), save 5 s
/// after a new edge and at most every 60 s for refreshed last-denied times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeConfig {
    /// An edge not denied for this long is forgotten, and fires again when next denied.
    pub retention: Duration,
    /// Most edges kept with their labels; beyond it the least recently denied move to the
    /// compact known-edge set.
    pub max_edges: usize,
    /// Most edges kept in the compact known-edge set (16 bytes each).
    pub known_capacity: usize,
    /// Most distinct ports per (direction, source, destination, protocol); more fold into
    /// `port="other"`.
    pub port_budget: usize,
    /// How long after the state file is created new edges are learned instead of reported.
    pub learning: Duration,
    /// Directory of the state file; `None` keeps the state in memory only.
    pub state_dir: Option<PathBuf>,
    /// Minimum time between saves after a new edge (debounces bursts of new edges).
    pub save_debounce: Duration,
    /// Minimum time between saves when only last-denied times changed.
    pub save_interval: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 86400),
            max_edges: 20_000,
            known_capacity: 100_000,
            port_budget: 16,
            learning: Duration::ZERO,
            state_dir: None,
            save_debounce: Duration::from_secs(5),
            save_interval: Duration::from_secs(60),
        }
    }
}

impl EdgeConfig {
    /// Checks the ranges the tracker relies on.
    pub fn validate(&self) -> Result<(), AlertError> {
        if self.retention.is_zero() {
            return Err(AlertError::InvalidConfig {
                field: "edge retention",
                reason: "must be greater than 0".into(),
            });
        }
        if self.max_edges == 0 {
            return Err(AlertError::InvalidConfig {
                field: "edge max entries",
                reason: "must be at least 1".into(),
            });
        }
        if self.port_budget == 0 {
            return Err(AlertError::InvalidConfig {
                field: "edge port budget",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// How the state file was found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No state directory configured.
    InMemory,
    /// No state file yet.
    Missing,
    /// Loaded this many edges still within retention.
    Loaded(usize),
    /// The file could not be read or parsed; started empty. Holds the reason.
    Corrupt(String),
}

/// Failure to write the state file.
#[derive(Debug, thiserror::Error)]
pub enum EdgeStateError {
    /// Filesystem error on `path`.
    #[error("cannot write denied-edge state {path}: {source}")]
    Write {
        /// File or directory involved.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Serialization failed (should not happen for this data).
    #[error("cannot serialize denied-edge state for {path}: {source}")]
    Serialize {
        /// Target file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Failure to take the state directory's lock.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    /// Another process holds the lock.
    #[error(
        "another deny-observer{holder} already uses the state directory {dir}: run one daemon \
         per --state-dir (stop the other one, or give this one its own --state-dir)"
    )]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// " (pid N)" when the lock file names its holder, else "".
        holder: String,
    },
    /// The directory or lock file could not be created or locked.
    #[error(
        "cannot lock the state directory {path}: {source}{}",
        state_dir_fix(source)
    )]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// What to do when the state directory cannot be written: in the DaemonSet the root file system
/// is read-only, so a `--state-dir` without a volume fails this way.
fn state_dir_fix(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
            ". --state-dir must be a writable directory: with a read-only root file system (as \
             in the DaemonSet) mount a volume there (deploy/base/daemonset.yaml's `state` \
             emptyDir at /var/lib/deny-observer, or deploy/overlays/host-state)"
        }
        _ => "",
    }
}

/// An exclusive `flock` on `<state_dir>/lock`, held for the life of the value (the kernel drops
/// it when the process exits, however it exits). Two daemons writing one state file would
/// overwrite each other's edges.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
    path: PathBuf,
}

impl StateLock {
    /// Creates `dir` if needed and locks it, without waiting: a held lock is an error that
    /// names the holder's pid.
    pub fn acquire(dir: &Path) -> Result<Self, StateLockError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateLockError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a file descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                // A pid is a few bytes: read no more, whatever the file is.
                let mut text = String::new();
                let holder = fs::File::open(&path)
                    .and_then(|f| f.take(64).read_to_string(&mut text))
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(StateLockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            return Err(StateLockError::Io { path, source: err });
        }
        // The pid is for the error message of a second daemon; the lock is what counts. A full
        // file system must not stop the daemon here: it would crash-loop, while a state file
        // it cannot save only costs persistence (`deny_observer_alert_state_save_errors_total`).
        let pid = format!("{}\n", std::process::id());
        if let Err(err) = file
            .set_len(0)
            .and_then(|()| file.write_all(pid.as_bytes()))
        {
            tracing::warn!(
                path = %path.display(),
                error = %err,
                "cannot write the pid into the state lock file; the lock is held all the same"
            );
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Clone, Copy, Debug)]
struct EdgeRecord {
    first_ms: u64,
    last_ms: u64,
    expected: bool,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    saved_at_unix_ms: u64,
    /// When learning started (absent in version 1 files: those daemons had no learning, so
    /// nothing is learned after an upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    learning_started_unix_ms: Option<u64>,
    edges: Vec<StoredEdge>,
    /// The compact known-edge set: `[stable hash, last denied unix ms]`.
    #[serde(default)]
    known: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize)]
struct StoredEdge {
    #[serde(flatten)]
    edge: DeniedEdge,
    expected: bool,
    first_denied_unix_ms: u64,
    last_denied_unix_ms: u64,
}

/// What [`EdgeTracker::observe`] made of a deny.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Recorded as the pair's folded edge (`port="other"`): the edge given was folded, or its
    /// source and destination already had `port_budget` ports (see [`DeniedEdge::folded`]).
    pub folded: bool,
    /// First deny of the edge within the retention, outside learning: report it.
    pub new: bool,
    /// First deny of the edge during learning: recorded as known, not reported.
    pub learned: bool,
}

/// Edges that left the tracker, for their metric series and the eviction counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Edges (with their `expected` flag) no longer in the table: their series go.
    pub edges: Vec<(DeniedEdge, bool)>,
    /// How many of them the table's cap moved to the compact set (still known).
    pub evicted_to_known: u64,
    /// Edges the compact set's cap forgot (they can be reported as new again).
    pub evicted_from_known: u64,
}

/// Remembers which edges were denied recently; see the module docs.
#[derive(Debug)]
pub struct EdgeTracker {
    config: EdgeConfig,
    edges: FastMap<DeniedEdge, EdgeRecord>,
    /// Distinct (unfolded) ports in `edges` per folded edge, for the port budget.
    ports: FastMap<DeniedEdge, usize>,
    /// The compact known-edge set: stable hash → last denied (unix ms).
    known: FastMap<u64, u64>,
    learning_started_ms: Option<u64>,
    load_outcome: LoadOutcome,
    dirty: bool,
    new_since_save: bool,
    last_save_ms: u64,
    /// Edges evicted by the cap since the last `prune`, so their series go too.
    evicted: Vec<(DeniedEdge, bool)>,
    evicted_from_known: u64,
    /// The folded form of the last edge that needed one, kept so that the next edge of the
    /// same pair (a scan folds thousands of ports per drain) reuses its names rather than
    /// cloning four `Arc`s.
    fold_scratch: Option<DeniedEdge>,
    /// Set when the pair of `fold_scratch` is over its port budget and its folded edge was
    /// recorded at this time (unix ms) with this `expected`: until the table changes, another
    /// new port of that pair at the same time changes nothing, and is answered without the
    /// two lookups of the folded edge (a scan's thousands of ports, at every drain).
    fold_done: Option<(u64, bool)>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EdgeTracker {
    /// Opens the tracker, loading `<state_dir>/denied-edges.json` when there is one. Never
    /// fails: a bad file is logged and set aside (see [`EdgeTracker::load_outcome`]). A new
    /// state file (learning start) is written right away, so that a crash in the first
    /// seconds does not restart learning.
    pub fn open(config: EdgeConfig, now: SystemTime) -> Self {
        let now_ms = unix_ms(now);
        let mut tracker = Self {
            config,
            edges: FastMap::default(),
            ports: FastMap::default(),
            known: FastMap::default(),
            learning_started_ms: Some(now_ms),
            load_outcome: LoadOutcome::InMemory,
            dirty: false,
            new_since_save: false,
            last_save_ms: now_ms,
            evicted: Vec::new(),
            evicted_from_known: 0,
            fold_scratch: None,
            fold_done: None,
        };
        let Some(path) = tracker.state_path() else {
            return tracker;
        };
        tracker.load_outcome = match read_state(&path) {
            Ok(None) => LoadOutcome::Missing,
            Ok(Some(file)) => {
                tracker.learning_started_ms = file.learning_started_unix_ms;
                let retention = ms(tracker.config.retention);
                for stored in file.edges {
                    if now_ms.saturating_sub(stored.last_denied_unix_ms) < retention {
                        tracker.insert(
                            stored.edge,
                            EdgeRecord {
                                first_ms: stored.first_denied_unix_ms,
                                last_ms: stored.last_denied_unix_ms,
                                expected: stored.expected,
                            },
                        );
                    }
                }
                for (hash, last_ms) in file.known {
                    if now_ms.saturating_sub(last_ms) < retention {
                        tracker.known.insert(hash, last_ms);
                    }
                }
                tracker.enforce_cap();
                // No series exist yet for edges dropped while loading.
                tracker.evicted.clear();
                tracker.evicted_from_known = 0;
                tracing::info!(
                    path = %path.display(),
                    edges = tracker.edges.len(),
                    known = tracker.known.len(),
                    "loaded denied-edge state"
                );
                LoadOutcome::Loaded(tracker.edges.len())
            }
            Err(reason) => {
                let aside = path.with_extension("json.corrupt");
                let moved = fs::rename(&path, &aside).is_ok();
                tracing::warn!(
                    path = %path.display(),
                    %reason,
                    set_aside = moved.then(|| aside.display().to_string()),
                    "denied-edge state unreadable; starting fresh with a new learning period"
                );
                LoadOutcome::Corrupt(reason)
            }
        };
        if !matches!(tracker.load_outcome, LoadOutcome::Loaded(_)) {
            tracker.dirty = true;
            if let Err(err) = tracker.save(now) {
                tracing::warn!(error = %err, "cannot write the new denied-edge state; will retry");
            }
        }
        tracker
    }

    /// How the state file was found at start.
    pub fn load_outcome(&self) -> &LoadOutcome {
        &self.load_outcome
    }

    /// Path of the state file, if persistence is on.
    pub fn state_path(&self) -> Option<PathBuf> {
        self.config.state_dir.as_ref().map(|d| d.join(STATE_FILE))
    }

    /// When the learning period ends (`None`: no learning, e.g. a state file from before
    /// learning existed). It may lie in the past.
    pub fn learning_until(&self) -> Option<SystemTime> {
        let start = self.learning_started_ms?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(start) + self.config.learning)
    }

    /// True while new edges are learned rather than reported.
    pub fn is_learning(&self, now: SystemTime) -> bool {
        self.learning_until().is_some_and(|until| now < until)
    }

    /// Records a deny of `edge` at `now`; true exactly when the edge is to be reported as new
    /// (see [`EdgeTracker::record`] for the details).
    pub fn observe(&mut self, now: SystemTime, edge: &DeniedEdge, expected: bool) -> bool {
        self.record(now, edge, expected).new
    }

    /// Records a deny of `edge` at `now`; see [`Observed`]. `expected` is remembered for the
    /// edge's metric labels.
    pub fn record(&mut self, now: SystemTime, edge: &DeniedEdge, expected: bool) -> Observed {
        let now_ms = unix_ms(now);
        let retention = ms(self.config.retention);
        let learning = self.is_learning(now);
        self.dirty = true;
        // An edge in the table is recorded as itself: one lookup and no clone, the common case
        // at every drain.
        if let Some(rec) = self.edges.get_mut(edge) {
            let new = Self::denied_again(rec, now_ms, retention, expected);
            return self.observed(edge.ports_folded, new, learning);
        }
        // A new port of a pair that has used its budget is recorded as the pair's folded edge.
        let mut fold = false;
        if !edge.ports_folded && edge.protocol.has_ports() {
            let (folded, same) = Self::fold_into(&mut self.fold_scratch, edge);
            if !same {
                self.fold_done = None;
            } else if self.fold_done == Some((now_ms, expected)) {
                return self.observed(true, false, learning);
            }
            fold = self.ports.get(folded).copied().unwrap_or(0) >= self.config.port_budget;
        }
        let key = match &self.fold_scratch {
            Some(folded) if fold => {
                if let Some(rec) = self.edges.get_mut(folded) {
                    let new = Self::denied_again(rec, now_ms, retention, expected);
                    self.fold_done = Some((now_ms, expected));
                    return self.observed(true, new, learning);
                }
                folded.clone()
            }
            _ => edge.clone(),
        };
        // Back from the compact set: known, so not new; it gets its labels back.
        let known = self
            .known
            .remove(&key.stable_hash())
            .is_some_and(|last| now_ms.saturating_sub(last) < retention);
        let folded = key.ports_folded;
        self.insert(
            key,
            EdgeRecord {
                first_ms: now_ms,
                last_ms: now_ms,
                expected,
            },
        );
        self.enforce_cap();
        self.observed(folded, !known, learning)
    }

    /// Updates the record of an edge denied again; true when that starts it anew (its last
    /// deny is older than the retention).
    fn denied_again(rec: &mut EdgeRecord, now_ms: u64, retention: u64, expected: bool) -> bool {
        let fresh = now_ms.saturating_sub(rec.last_ms) < retention;
        rec.last_ms = rec.last_ms.max(now_ms);
        if !fresh {
            rec.first_ms = now_ms;
            rec.expected = expected;
        }
        !fresh
    }

    /// What a deny came to: an edge `new` to the table is reported, or learned while learning.
    fn observed(&mut self, folded: bool, new: bool, learning: bool) -> Observed {
        if new {
            self.new_since_save = true;
        }
        Observed {
            folded,
            new: new && !learning,
            learned: new && learning,
        }
    }

    /// `edge`'s folded form, made in `scratch` (see [`EdgeTracker::fold_scratch`]), and whether
    /// `scratch` already held it.
    fn fold_into<'s>(
        scratch: &'s mut Option<DeniedEdge>,
        edge: &DeniedEdge,
    ) -> (&'s DeniedEdge, bool) {
        let same_pair = scratch.as_ref().is_some_and(|f| {
            Arc::ptr_eq(&f.source_namespace, &edge.source_namespace)
                && Arc::ptr_eq(&f.source_workload, &edge.source_workload)
                && Arc::ptr_eq(&f.destination_namespace, &edge.destination_namespace)
                && Arc::ptr_eq(&f.destination_workload, &edge.destination_workload)
        });
        if !same_pair {
            *scratch = None;
        }
        let f = scratch.get_or_insert_with(|| edge.folded());
        let same = same_pair && f.direction == edge.direction && f.protocol == edge.protocol;
        f.direction = edge.direction;
        f.protocol = edge.protocol;
        (f, same)
    }

    fn insert(&mut self, edge: DeniedEdge, record: EdgeRecord) {
        self.fold_done = None;
        if !edge.ports_folded && edge.protocol.has_ports() {
            *self.ports.entry(edge.folded()).or_default() += 1;
        }
        self.edges.insert(edge, record);
    }

    fn remove(&mut self, edge: &DeniedEdge) -> Option<EdgeRecord> {
        self.fold_done = None;
        let rec = self.edges.remove(edge)?;
        if !edge.ports_folded && edge.protocol.has_ports() {
            let key = edge.folded();
            if let Some(n) = self.ports.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.ports.remove(&key);
                }
            }
        }
        Some(rec)
    }

    /// Forgets edges not denied within the retention and returns those that had labels, with
    /// their `expected` flag (see [`EdgeTracker::prune_report`]).
    pub fn prune(&mut self, now: SystemTime) -> Vec<(DeniedEdge, bool)> {
        self.prune_report(now).edges
    }

    /// Forgets edges not denied within the retention (from the table and the compact set)
    /// and reports them, with the edges the caps evicted since the last call.
    pub fn prune_report(&mut self, now: SystemTime) -> Forgotten {
        let now_ms = unix_ms(now);
        let retention = ms(self.config.retention);
        let expired: Vec<DeniedEdge> = self
            .edges
            .iter()
            .filter(|(_, r)| now_ms.saturating_sub(r.last_ms) >= retention)
            .map(|(e, _)| e.clone())
            .collect();
        let mut edges = std::mem::take(&mut self.evicted);
        let evicted_to_known = edges.len() as u64;
        for edge in expired {
            if let Some(rec) = self.remove(&edge) {
                edges.push((edge, rec.expected));
            }
        }
        // Its names may be of pairs gone: let them go (`Names::prune`).
        self.fold_scratch = None;
        self.fold_done = None;
        let known_before = self.known.len();
        self.known
            .retain(|_, last| now_ms.saturating_sub(*last) < retention);
        if !edges.is_empty() || known_before != self.known.len() {
            self.dirty = true;
        }
        Forgotten {
            edges,
            evicted_to_known,
            evicted_from_known: std::mem::take(&mut self.evicted_from_known),
        }
    }

    /// Saves when due: a new edge and `save_debounce` since the last save, or other changes
    /// and `save_interval`. Returns whether it wrote.
    pub fn maybe_save(&mut self, now: SystemTime) -> Result<bool, EdgeStateError> {
        if !self.dirty || self.config.state_dir.is_none() {
            return Ok(false);
        }
        let since = unix_ms(now).saturating_sub(self.last_save_ms);
        let due = if self.new_since_save {
            since >= ms(self.config.save_debounce)
        } else {
            since >= ms(self.config.save_interval)
        };
        if !due {
            return Ok(false);
        }
        self.save(now)?;
        Ok(true)
    }

    /// Writes the state file now (at shutdown, or when due). No-op without a state directory.
    pub fn save(&mut self, now: SystemTime) -> Result<(), EdgeStateError> {
        let (Some(dir), Some(path)) = (self.config.state_dir.clone(), self.state_path()) else {
            return Ok(());
        };
        let now_ms = unix_ms(now);
        let mut edges: Vec<StoredEdge> = self
            .edges
            .iter()
            .map(|(edge, r)| StoredEdge {
                edge: edge.clone(),
                expected: r.expected,
                first_denied_unix_ms: r.first_ms,
                last_denied_unix_ms: r.last_ms,
            })
            .collect();
        // Stable output: diffs of the file stay readable when debugging.
        edges.sort_by(|a, b| a.edge.cmp(&b.edge));
        let mut known: Vec<(u64, u64)> = self.known.iter().map(|(h, t)| (*h, *t)).collect();
        known.sort_unstable();
        let file = StateFile {
            version: STATE_VERSION,
            saved_at_unix_ms: now_ms,
            learning_started_unix_ms: self.learning_started_ms,
            edges,
            known,
        };
        let bytes = serde_json::to_vec(&file).map_err(|source| EdgeStateError::Serialize {
            path: path.clone(),
            source,
        })?;
        write_atomic(&dir, &path, &bytes)?;
        self.dirty = false;
        self.new_since_save = false;
        self.last_save_ms = now_ms;
        Ok(())
    }

    /// Number of edges in the table (with labels).
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// Number of edges in the compact known-edge set.
    pub fn known_len(&self) -> usize {
        self.known.len()
    }

    /// True when no edge is remembered.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty() && self.known.is_empty()
    }

    /// True when `edge` (as given, unfolded) was denied within the retention as of `now`,
    /// whether it is in the table or in the compact set.
    pub fn is_known(&self, now: SystemTime, edge: &DeniedEdge) -> bool {
        let now_ms = unix_ms(now);
        let retention = ms(self.config.retention);
        self.edges
            .get(edge)
            .map(|r| r.last_ms)
            .or_else(|| self.known.get(&edge.stable_hash()).copied())
            .is_some_and(|last| now_ms.saturating_sub(last) < retention)
    }

    /// Moves the least recently denied edges beyond `max_edges` to the compact set, and
    /// forgets the oldest of the compact set beyond `known_capacity`, a tenth of the cap at a
    /// time so a scan at the cap does not sort the table for every new edge.
    fn enforce_cap(&mut self) {
        let max = self.config.max_edges;
        if self.edges.len() > max {
            let target = max - max / 10;
            let mut by_age: Vec<(u64, DeniedEdge)> = self
                .edges
                .iter()
                .map(|(e, r)| (r.last_ms, e.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(last, _)| *last);
            let excess = self.edges.len() - target;
            for (_, edge) in by_age.into_iter().take(excess) {
                if let Some(rec) = self.remove(&edge) {
                    self.known.insert(edge.stable_hash(), rec.last_ms);
                    self.evicted.push((edge, rec.expected));
                }
            }
            tracing::info!(
                max_edges = max,
                moved = excess,
                "denied-edge table full; moved the least recently denied edges to the compact known set"
            );
        }
        let cap = self.config.known_capacity;
        if self.known.len() > cap {
            let target = cap - cap / 10;
            let mut by_age: Vec<(u64, u64)> = self.known.iter().map(|(h, t)| (*t, *h)).collect();
            by_age.sort_unstable();
            let excess = self.known.len() - target;
            for (_, hash) in by_age.into_iter().take(excess) {
                self.known.remove(&hash);
            }
            self.evicted_from_known += excess as u64;
            tracing::warn!(
                known_capacity = cap,
                forgotten = excess,
                "known denied-edge set full; forgot the least recently denied (they may be reported as new again)"
            );
        }
    }
}

fn read_state(path: &Path) -> Result<Option<StateFile>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly = serde_json::from_slice(&bytes)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    if v.version != STATE_VERSION && v.version != 1 {
        return Err(format!(
            "{} has version {}, this build reads versions 1 to {STATE_VERSION}",
            path.display(),
            v.version
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), EdgeStateError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| EdgeStateError::Write { path: p, source }
    };
    fs::create_dir_all(dir).map_err(err(dir))?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(err(&tmp))?;
        f.write_all(bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
        fs::rename(&tmp, path).map_err(err(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself; best effort, some filesystems refuse fsync on directories.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn edge(port: u16) -> DeniedEdge {
        DeniedEdge {
            direction: Direction::Ingress,
            source_namespace: "a".into(),
            source_workload: "w".into(),
            destination_namespace: "b".into(),
            destination_workload: "db".into(),
            protocol: Protocol::Tcp,
            port,
            ports_folded: false,
        }
    }

    #[test]
    fn cap_moves_least_recently_denied_to_the_known_set() {
        let cfg = EdgeConfig {
            max_edges: 10,
            ..EdgeConfig::default()
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = EdgeTracker::open(cfg, t0);
        for p in 0..11u16 {
            assert!(t.observe(t0 + Duration::from_secs(u64::from(p)), &edge(p), false));
        }
        assert!(t.len() <= 10, "{}", t.len());
        assert_eq!(t.len() + t.known_len(), 11);
        let now = t0 + Duration::from_secs(20);
        assert!(t.is_known(now, &edge(0)), "evicted, but still known");
        assert!(t.is_known(now, &edge(10)), "newest must stay");
        let report = t.prune_report(now);
        assert!(report.edges.contains(&(edge(0), false)), "{report:?}");
        assert_eq!(report.evicted_to_known, report.edges.len() as u64);
        assert_eq!(report.evicted_from_known, 0);
        assert!(t.prune(now).is_empty());
        // Back from the known set: not new, and it has its labels again.
        assert!(
            !t.observe(now, &edge(0), false),
            "an evicted edge paged again"
        );
        assert!(!t.record(now, &edge(0), false).folded);
    }

    #[test]
    fn without_a_known_set_evicted_edges_are_new_again_and_counted() {
        let cfg = EdgeConfig {
            max_edges: 10,
            known_capacity: 0,
            ..EdgeConfig::default()
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = EdgeTracker::open(cfg, t0);
        for p in 0..11u16 {
            t.observe(t0 + Duration::from_secs(u64::from(p)), &edge(p), false);
        }
        let now = t0 + Duration::from_secs(20);
        assert!(!t.is_known(now, &edge(0)));
        let report = t.prune_report(now);
        assert_eq!(report.evicted_from_known, report.evicted_to_known);
        assert!(report.evicted_from_known > 0);
        assert!(t.observe(now, &edge(0), false));
    }

    #[test]
    fn ports_beyond_the_budget_fold_into_other() {
        let cfg = EdgeConfig {
            port_budget: 3,
            ..EdgeConfig::default()
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = EdgeTracker::open(cfg, t0);
        let mut new = 0;
        for p in 1..=1000u16 {
            let o = t.record(t0, &edge(p), false);
            assert_eq!(o.folded, p > 3, "port {p}");
            new += usize::from(o.new);
        }
        assert_eq!(new, 4, "three ports and one `other`");
        assert_eq!(t.len(), 4);
        assert!(t.is_known(t0, &edge(1).folded()));
        assert!(!t.is_known(t0, &edge(4)));
        // Known ports keep their own edge.
        assert!(!t.record(t0, &edge(2), false).folded);
        // Another pair has its own budget, also right after the first pair's folding (the
        // folded form is reused only for the same pair).
        assert!(t.record(t0, &edge(500), false).folded);
        let mut other = edge(9);
        other.source_workload = "x".into();
        let o = t.record(t0, &other, false);
        assert!(!o.folded && o.new);
        assert!(t.is_known(t0, &other));
        // Once a port expires, its budget slot is free again.
        let later = t0 + EdgeConfig::default().retention;
        assert!(!t.prune(later).is_empty());
        assert!(!t.record(later, &edge(77), false).folded);
        assert!(t.is_known(later, &edge(77)));
    }

    #[test]
    fn a_folded_pair_keeps_its_edge_fresh_across_drains() {
        let cfg = EdgeConfig {
            port_budget: 3,
            ..EdgeConfig::default()
        };
        let retention = cfg.retention;
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = EdgeTracker::open(cfg, t0);
        // One pair's edges share their names, as the alert sink's do.
        let base = edge(0);
        let at = |port| DeniedEdge {
            port,
            ..base.clone()
        };
        // Two drains of a scan, half a retention apart: the second renews the folded edge
        // although the first already recorded it (and the budgeted ports are not renewed).
        let mut new = 0;
        for p in 1..=10u16 {
            new += usize::from(t.record(t0, &at(p), false).new);
        }
        assert_eq!(new, 4);
        let t1 = t0 + retention / 2;
        for p in 11..=20u16 {
            let o = t.record(t1, &at(p), false);
            assert!(o.folded && !o.new);
        }
        let t2 = t0 + retention + Duration::from_millis(1);
        let gone = t.prune(t2);
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(t.is_known(t2, &base.folded()));
        assert!(!t.is_known(t2, &at(1)));
        // With the budget free again, a new port is its own edge, not the folded one.
        let o = t.record(t2, &at(30), false);
        assert!(!o.folded && o.new);
        assert!(t.record(t2, &at(31), false).new);
        assert!(t.record(t2, &at(32), false).new);
        assert!(t.record(t2, &at(33), false).folded);
        // Another protocol of the same pair has its own budget and folded edge.
        let udp = DeniedEdge {
            protocol: Protocol::Udp,
            ..at(40)
        };
        let o = t.record(t2, &udp, false);
        assert!(!o.folded && o.new);
    }

    #[test]
    fn learning_records_without_reporting_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EdgeConfig {
            state_dir: Some(dir.path().to_path_buf()),
            learning: Duration::from_secs(3600),
            ..EdgeConfig::default()
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        {
            let mut t = EdgeTracker::open(cfg.clone(), t0);
            assert!(t.is_learning(t0));
            let o = t.record(t0 + Duration::from_secs(10), &edge(1), false);
            assert!(!o.new && o.learned, "{o:?}");
            // The learning start was written at open, before any edge.
            assert!(dir.path().join(STATE_FILE).exists());
        }
        // A restart half an hour in continues the same learning period; the state file was
        // written at open, so the edge learned afterwards is lost with the crash but learning
        // is not restarted.
        let half = t0 + Duration::from_secs(1800);
        let mut t = EdgeTracker::open(cfg.clone(), half);
        assert!(t.is_learning(half));
        assert_eq!(
            t.learning_until(),
            Some(t0 + Duration::from_secs(3600)),
            "learning restarted"
        );
        assert!(t.record(half, &edge(2), false).learned);
        t.save(half).unwrap();
        let after = t0 + Duration::from_secs(3601);
        let mut t = EdgeTracker::open(cfg, after);
        assert!(!t.is_learning(after));
        assert!(!t.observe(after, &edge(2), false), "learned edge paged");
        let o = t.record(after, &edge(3), false);
        assert!(o.new && !o.learned);
    }

    #[test]
    fn version_1_state_is_read_and_learns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v1 = serde_json::json!({
            "version": 1,
            "saved_at_unix_ms": 1_000_000_000u64,
            "edges": [{
                "direction": "ingress", "source_namespace": "a", "source_workload": "w",
                "destination_namespace": "b", "destination_workload": "db",
                "protocol": "TCP", "port": 5432, "expected": false,
                "first_denied_unix_ms": 999_000_000u64, "last_denied_unix_ms": 1_000_000_000u64
            }]
        });
        fs::write(dir.path().join(STATE_FILE), v1.to_string()).unwrap();
        let cfg = EdgeConfig {
            state_dir: Some(dir.path().to_path_buf()),
            learning: Duration::from_secs(3600),
            ..EdgeConfig::default()
        };
        let mut t = EdgeTracker::open(cfg, t0);
        assert_eq!(t.load_outcome(), &LoadOutcome::Loaded(1));
        assert!(!t.is_learning(t0));
        assert!(!t.observe(t0, &edge(5432), false));
        assert!(t.observe(t0, &edge(5433), false));
    }

    #[test]
    fn a_lock_file_that_takes_no_pid_still_locks() {
        // /dev/full refuses every write with ENOSPC (and truncation), as a full file system
        // refuses the pid of a new lock file.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(LOCK_FILE)).unwrap();
        let _first = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, StateLockError::Held { .. }), "{err}");
    }

    #[test]
    fn a_second_lock_on_the_state_dir_fails_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same process
        // conflicts just like another process would.
        let err = StateLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("--state-dir"),
            "{msg}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }

    /// The DaemonSet's root file system is read-only: a state directory without a volume must
    /// say to mount one, not only "Read-only file system".
    #[test]
    fn an_unwritable_state_dir_names_the_volume() {
        let err = StateLockError::Io {
            path: PathBuf::from("/var/lib/deny-observer"),
            source: io::Error::from_raw_os_error(libc::EROFS),
        }
        .to_string();
        assert!(err.contains("Read-only file system"), "{err}");
        assert!(err.contains("mount a volume there"), "{err}");
        assert!(err.contains("deploy/overlays/host-state"), "{err}");
        // Other causes (a full disk) keep their own words only.
        let full = StateLockError::Io {
            path: PathBuf::from("/var/lib/deny-observer"),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        }
        .to_string();
        assert!(!full.contains("mount a volume"), "{full}");
    }

    #[test]
    fn state_file_format_is_versioned_json() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EdgeConfig {
            state_dir: Some(dir.path().to_path_buf()),
            ..EdgeConfig::default()
        };
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut t = EdgeTracker::open(cfg, t0);
        t.observe(t0, &edge(5432), true);
        t.save(t0).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(v["version"], STATE_VERSION);
        assert_eq!(v["edges"][0]["port"], 5432);
        assert_eq!(v["edges"][0]["protocol"], "TCP");
        assert_eq!(v["edges"][0]["direction"], "ingress");
        assert_eq!(v["edges"][0]["expected"], true);
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }
}
