//! New-denied-edge detection, persisted across restarts.
//!
//! An edge is (direction, source namespace/workload, destination namespace/workload, protocol,
//! port). It is **new** when it has not been denied within `retention`; every deny refreshes its
//! last-denied time, so a path that keeps being denied never fires again, and one that was
//! quiet for longer than the retention fires once more.
//!
//! The state lives in `<state_dir>/denied-edges.json` (versioned JSON, written to a temporary
//! file in the same directory, synced, then renamed over the old one). A missing file starts
//! empty; an unreadable or corrupt one is logged, set aside as `denied-edges.json.corrupt`, and
//! the tracker starts empty rather than failing the daemon.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::AlertError;
use super::spike::unix_ms;
use crate::flow::{Direction, FastMap, Protocol};

/// File name of the state file inside the state directory.
pub const STATE_FILE: &str = "denied-edges.json";
/// Version written into (and required from) the state file.
pub const STATE_VERSION: u32 = 1;

/// A denied path between two workloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeniedEdge {
    /// Direction whose policy denied.
    pub direction: Direction,
    /// Source namespace (the caller's placeholder for off-cluster peers).
    pub source_namespace: String,
    /// Source workload.
    pub source_workload: String,
    /// Destination namespace.
    pub destination_namespace: String,
    /// Destination workload.
    pub destination_workload: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port; 0 for protocols without ports.
    pub port: u16,
}

/// Tracker settings. Defaults: retention 7 d, 20,000 edges, no state directory (in memory),
/// save 5 s after a new edge and at most every 60 s for refreshed last-denied times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeConfig {
    /// An edge not denied for this long is forgotten, and fires again when next denied.
    pub retention: Duration,
    /// Most edges kept; beyond it the least recently denied go first.
    pub max_edges: usize,
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
    edges: Vec<StoredEdge>,
}

#[derive(Serialize, Deserialize)]
struct StoredEdge {
    #[serde(flatten)]
    edge: DeniedEdge,
    expected: bool,
    first_denied_unix_ms: u64,
    last_denied_unix_ms: u64,
}

/// Remembers which edges were denied recently; see the module docs.
#[derive(Debug)]
pub struct EdgeTracker {
    config: EdgeConfig,
    edges: FastMap<DeniedEdge, EdgeRecord>,
    load_outcome: LoadOutcome,
    dirty: bool,
    new_since_save: bool,
    last_save_ms: u64,
    /// Edges evicted by the cap since the last `prune`, so their series go too.
    evicted: Vec<(DeniedEdge, bool)>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl EdgeTracker {
    /// Opens the tracker, loading `<state_dir>/denied-edges.json` when there is one. Never
    /// fails: a bad file is logged and set aside (see [`EdgeTracker::load_outcome`]).
    pub fn open(config: EdgeConfig, now: SystemTime) -> Self {
        let now_ms = unix_ms(now);
        let mut tracker = Self {
            config,
            edges: FastMap::default(),
            load_outcome: LoadOutcome::InMemory,
            dirty: false,
            new_since_save: false,
            last_save_ms: now_ms,
            evicted: Vec::new(),
        };
        if let Some(path) = tracker.state_path() {
            tracker.load_outcome = match read_state(&path) {
                Ok(None) => LoadOutcome::Missing,
                Ok(Some(file)) => {
                    let retention = ms(tracker.config.retention);
                    for stored in file.edges {
                        if now_ms.saturating_sub(stored.last_denied_unix_ms) < retention {
                            tracker.edges.insert(
                                stored.edge,
                                EdgeRecord {
                                    first_ms: stored.first_denied_unix_ms,
                                    last_ms: stored.last_denied_unix_ms,
                                    expected: stored.expected,
                                },
                            );
                        }
                    }
                    tracker.enforce_cap();
                    // No series exist yet for edges dropped while loading.
                    tracker.evicted.clear();
                    tracing::info!(path = %path.display(), edges = tracker.edges.len(), "loaded denied-edge state");
                    LoadOutcome::Loaded(tracker.edges.len())
                }
                Err(reason) => {
                    let aside = path.with_extension("json.corrupt");
                    let moved = fs::rename(&path, &aside).is_ok();
                    tracing::warn!(
                        path = %path.display(),
                        %reason,
                        set_aside = moved.then(|| aside.display().to_string()),
                        "denied-edge state unreadable; starting fresh (known edges may fire again)"
                    );
                    LoadOutcome::Corrupt(reason)
                }
            };
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

    /// Records a deny of `edge` at `now`; true exactly when the edge is new (never denied, or
    /// not within the retention). `expected` is remembered for the edge's metric labels.
    pub fn observe(&mut self, now: SystemTime, edge: &DeniedEdge, expected: bool) -> bool {
        let now_ms = unix_ms(now);
        let retention = ms(self.config.retention);
        self.dirty = true;
        if let Some(rec) = self.edges.get_mut(edge) {
            let fresh = now_ms.saturating_sub(rec.last_ms) < retention;
            rec.last_ms = rec.last_ms.max(now_ms);
            if fresh {
                return false;
            }
            rec.first_ms = now_ms;
            rec.expected = expected;
        } else {
            self.edges.insert(
                edge.clone(),
                EdgeRecord {
                    first_ms: now_ms,
                    last_ms: now_ms,
                    expected,
                },
            );
            self.enforce_cap();
        }
        self.new_since_save = true;
        true
    }

    /// Forgets edges not denied within the retention and returns them with their `expected`
    /// flag, so their metric series can be removed; also returns edges the `max_edges` cap
    /// evicted since the last call.
    pub fn prune(&mut self, now: SystemTime) -> Vec<(DeniedEdge, bool)> {
        let now_ms = unix_ms(now);
        let retention = ms(self.config.retention);
        let expired: Vec<DeniedEdge> = self
            .edges
            .iter()
            .filter(|(_, r)| now_ms.saturating_sub(r.last_ms) >= retention)
            .map(|(e, _)| e.clone())
            .collect();
        let mut out = std::mem::take(&mut self.evicted);
        for edge in expired {
            if let Some(rec) = self.edges.remove(&edge) {
                out.push((edge, rec.expected));
            }
        }
        if !out.is_empty() {
            self.dirty = true;
        }
        out
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
        let file = StateFile {
            version: STATE_VERSION,
            saved_at_unix_ms: now_ms,
            edges,
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

    /// Number of edges remembered.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// True when no edge is remembered.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// True when `edge` was denied within the retention as of `now`.
    pub fn is_known(&self, now: SystemTime, edge: &DeniedEdge) -> bool {
        self.edges
            .get(edge)
            .is_some_and(|r| unix_ms(now).saturating_sub(r.last_ms) < ms(self.config.retention))
    }

    /// Drops the least recently denied edges beyond `max_edges`, a tenth of the cap at a time
    /// so a port scan at the cap does not sort the table for every new edge.
    fn enforce_cap(&mut self) {
        let max = self.config.max_edges;
        if self.edges.len() <= max {
            return;
        }
        let target = max - max / 10;
        let mut by_age: Vec<(u64, DeniedEdge)> = self
            .edges
            .iter()
            .map(|(e, r)| (r.last_ms, e.clone()))
            .collect();
        by_age.sort_unstable_by_key(|(last, _)| *last);
        let excess = self.edges.len() - target;
        for (_, edge) in by_age.into_iter().take(excess) {
            if let Some(rec) = self.edges.remove(&edge) {
                self.evicted.push((edge, rec.expected));
            }
        }
        tracing::warn!(
            max_edges = max,
            evicted = excess,
            "denied-edge table full; forgot the least recently denied edges"
        );
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
    if v.version != STATE_VERSION {
        return Err(format!(
            "{} has version {}, this build reads version {STATE_VERSION}",
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
        }
    }

    #[test]
    fn cap_evicts_least_recently_denied() {
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
        let now = t0 + Duration::from_secs(20);
        assert!(!t.is_known(now, &edge(0)), "oldest must go first");
        assert!(t.is_known(now, &edge(10)), "newest must stay");
        let evicted = t.prune(now);
        assert!(evicted.contains(&(edge(0), false)), "{evicted:?}");
        assert_eq!(evicted.len() + t.len(), 11);
        assert!(t.prune(now).is_empty());
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
        assert_eq!(v["version"], 1);
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
