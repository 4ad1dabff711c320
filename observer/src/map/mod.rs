//! `deny-observer map`: who talks to whom, and where it is denied, as one self-contained HTML
//! page.
//!
//! The edges come from Prometheus (allowed connections and policy denies, over `--window`
//! and the shorter standard windows the page can filter on) or from an `--edges` file; the
//! inventory marks open-field namespaces and lets the verdict engine explain every edge. The
//! result is a [`MapData`] document, embedded in the page ([`page::render`]) or served and
//! refreshed by [`serve::serve`] (`--listen`).

pub mod page;
pub mod serve;

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::flow::Protocol;
use crate::inventory::Inventory;
use crate::verdict::cli::{Endpoint, PortRef, declared_ports, judge, write_judgement};
use crate::verdict::edges::{
    ALLOWED_METRIC, DENIED_METRIC, DENIED_PORTS_METRIC, DeniedPorts, EdgeError, EdgeKey, Observed,
    check_window, denied_ports_query, parse_base, parse_denied_ports, query_prometheus,
    visit_edges_file,
};
use crate::verdict::preflight::{PreflightError, resolve_side};
use crate::verdict::{Engine, bounded_policy_list};

/// Version of the embedded map document; fields are only ever added.
pub const SCHEMA_VERSION: u32 = 1;
/// Up to this many workloads the page draws every workload; beyond it, namespaces first.
pub const FULL_DETAIL_MAX_WORKLOADS: usize = 2000;
/// Up to this many edges the page draws every edge; beyond it, namespaces first.
pub const FULL_DETAIL_MAX_EDGES: usize = 10_000;
/// Shorter windows the page offers besides `--window` (those shorter than it).
pub const FILTER_WINDOWS: [&str; 4] = ["5m", "1h", "6h", "1d"];
/// Default of `--max-edges`. The page of 300,000 edges was 102 MB and took 1 GB to build;
/// 50,000 take about 200 MB and a 19 MB page, five times what the page draws in full.
pub const DEFAULT_MAX_EDGES: usize = 50_000;
/// Shortest `--refresh`: every refresh reads the whole source again.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest `--refresh`: a map refreshed less often is no longer live, and the page's poll
/// timer (a signed 32-bit count of milliseconds in browsers: 24.8 days) stays far from
/// overflowing.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Ports explained per edge whose port is unknown (a denied edge none of whose ports the
/// daemon named: every port the destination declares is judged).
const MAX_EXPLAINED_PORTS: usize = 4;

/// Errors of `deny-observer map`.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The edges could not be read or fetched.
    #[error(transparent)]
    Edges(#[from] EdgeError),
    /// The inventory could not be loaded.
    #[error(transparent)]
    Inventory(#[from] PreflightError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The page could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server could not start or stopped with an error.
    #[error("serving the map on {addr}: {reason}")]
    Serve {
        /// `--listen`.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Arguments of `deny-observer map`.
#[derive(Debug, Clone, clap::Args)]
pub struct MapArgs {
    /// Inventory: a directory of manifests, or `kube` for the API server; marks open-field
    /// namespaces and explains each edge. Defaults to `kube` inside a pod.
    #[arg(long, env = "DENY_OBSERVER_INVENTORY")]
    pub inventory: Option<String>,
    /// Prometheus base URL (`http://prometheus:9090`), queried through `/api/v1/query`.
    #[arg(long, required_unless_present = "edges", conflicts_with = "edges")]
    pub prometheus: Option<String>,
    /// How far back to look in Prometheus; the page also filters on the standard windows
    /// shorter than it (5m, 1h, 6h, 1d).
    #[arg(long, default_value = "1h")]
    pub window: String,
    /// JSON lines of observed edges (as written by `deny-observer edges`) instead of
    /// Prometheus.
    #[arg(long)]
    pub edges: Option<PathBuf>,
    /// Write the page to this file.
    #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
    pub output: Option<PathBuf>,
    /// Serve the page on this address (`127.0.0.1:9966`), refreshed from the source.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// With `--listen`: how often the edges are read again and the open pages update, from 1s
    /// to 1h.
    #[arg(long, default_value = "5s", value_parser = parse_refresh)]
    pub refresh: Duration,
    /// Most edges drawn: beyond it the heaviest are kept (denied ones first, then by count),
    /// and the page and stderr say how many were left out.
    #[arg(long, default_value_t = DEFAULT_MAX_EDGES, value_parser = parse_max_edges)]
    pub max_edges: usize,
}

/// clap parser of `--refresh`: a duration from [`MIN_REFRESH`] to [`MAX_REFRESH`].
pub fn parse_refresh(text: &str) -> Result<Duration, String> {
    let refresh = crate::alert::config::parse_duration(text).map_err(|e| e.to_string())?;
    if !(MIN_REFRESH..=MAX_REFRESH).contains(&refresh) {
        return Err(format!(
            "{text:?} is out of range: --refresh must be from {}s to {}s (1h)",
            MIN_REFRESH.as_secs(),
            MAX_REFRESH.as_secs()
        ));
    }
    Ok(refresh)
}

/// clap parser of `--max-edges`: a count of at least 1.
fn parse_max_edges(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("at least 1 edge must be drawn".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?} is not a count: {e}")),
    }
}

impl MapArgs {
    /// The inventory source: `--inventory`, else `kube` inside a cluster.
    pub fn inventory_source(&self) -> Result<String, MapError> {
        match &self.inventory {
            Some(spec) => Ok(spec.clone()),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Ok("kube".to_owned()),
            None => Err(MapError::Usage(
                "--inventory is required outside a cluster: a manifest directory or `kube`"
                    .to_owned(),
            )),
        }
    }

    /// Where the edges come from.
    pub fn source(&self) -> Result<EdgeSource, MapError> {
        match (&self.edges, &self.prometheus) {
            (Some(path), _) => Ok(EdgeSource::File(path.clone())),
            (None, Some(url)) => {
                check_window(&self.window)?;
                parse_base(url)?;
                Ok(EdgeSource::Prometheus {
                    url: url.clone(),
                    windows: filter_windows(&self.window)?,
                })
            }
            (None, None) => Err(MapError::Usage(
                "pass --prometheus <url> or --edges <file>".to_owned(),
            )),
        }
    }
}

/// Runs `deny-observer map`: writes the page, or serves it until interrupted.
pub fn run_map(args: &MapArgs, notes: &mut dyn std::io::Write) -> Result<(), MapError> {
    let spec = args.inventory_source()?;
    let source = args.source()?;
    match (&args.output, args.listen) {
        (Some(path), _) => {
            let inventory = crate::verdict::preflight::load_inventory(&spec)?;
            let observations = source.load_blocking(args.max_edges)?;
            let data = build(&Engine::new(inventory), &observations, now_unix());
            for note in &data.notes {
                let _ = writeln!(notes, "deny-observer: note: {note}");
            }
            let html = page::render(&data);
            std::fs::write(path, html).map_err(|source| MapError::Write {
                path: path.clone(),
                source,
            })
        }
        (None, Some(addr)) => serve::serve(&spec, source, addr, args.refresh, args.max_edges),
        (None, None) => Err(MapError::Usage(
            "pass --output <file.html> or --listen <addr:port>".to_owned(),
        )),
    }
}

/// Seconds in a Prometheus duration (`1h`, `1d12h`, `500ms`).
pub fn window_seconds(window: &str) -> Result<f64, EdgeError> {
    check_window(window)?;
    let mut rest = window;
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: f64 = rest[..digits]
            .parse()
            .map_err(|_| EdgeError::BadWindow(window.to_owned()))?;
        rest = &rest[digits..];
        let (unit, secs) = [
            ("ms", 0.001),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
            ("d", 86400.0),
            ("w", 604_800.0),
            ("y", 31_536_000.0),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))
        .ok_or_else(|| EdgeError::BadWindow(window.to_owned()))?;
        rest = &rest[unit.len()..];
        total += n * secs;
    }
    Ok(total)
}

/// The windows the page filters on: the standard ones shorter than `window`, then `window`.
pub fn filter_windows(window: &str) -> Result<Vec<(String, f64)>, EdgeError> {
    let longest = window_seconds(window)?;
    let mut out: Vec<(String, f64)> = Vec::new();
    for w in FILTER_WINDOWS {
        let secs = window_seconds(w)?;
        if secs < longest {
            out.push((w.to_owned(), secs));
        }
    }
    out.push((window.to_owned(), longest));
    Ok(out)
}

/// Where the edges come from.
#[derive(Clone, Debug)]
pub enum EdgeSource {
    /// An edges file (JSON lines), read again at each refresh.
    File(PathBuf),
    /// Prometheus, one pair of queries per window.
    Prometheus {
        /// Base URL.
        url: String,
        /// `(window, seconds)`, shortest first; the last is `--window`.
        windows: Vec<(String, f64)>,
    },
}

/// An observed edge with its counts per window, before it is judged.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Observation {
    /// Namespace of the source (`""` outside the cluster's pods).
    pub source_namespace: String,
    /// Workload of the source, or `world`, `private`, `node`, `host`.
    pub source_workload: String,
    /// Namespace of the destination.
    pub destination_namespace: String,
    /// Workload of the destination.
    pub destination_workload: String,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// Destination port, when the source knows it (allowed connections).
    pub port: Option<u16>,
    /// Allowed or denied.
    pub verdict: Observed,
    /// The deny's `policy` label, when the source has it (Prometheus).
    pub policy: Option<String>,
    /// The deny's `match` label (`default_deny`, `unexplained`), when the source has it.
    pub matched: Option<String>,
    /// Connections (allowed) or dropped packets (denied) per window of [`Observations`].
    pub counts: Vec<u64>,
    /// A denied edge split by port: every port of the edge (`other` for the unnamed ones).
    /// The counts are the edge's over all of them, the same on each: the drop metrics count
    /// packets per edge, not per port. Empty when the counts are this observation's own.
    pub count_ports: Vec<String>,
}

impl Observation {
    fn key(&self) -> EdgeKey {
        EdgeKey {
            source_namespace: self.source_namespace.clone(),
            source_workload: self.source_workload.clone(),
            destination_namespace: self.destination_namespace.clone(),
            destination_workload: self.destination_workload.clone(),
            protocol: self.protocol.clone(),
        }
    }
}

/// Splits each denied observation without a port into one per port the daemon named for the
/// edge (see [`DeniedPorts`]); the counts stay the edge's, marked by `count_ports`.
pub fn split_by_port(
    observations: Vec<Observation>,
    ports: &BTreeMap<EdgeKey, DeniedPorts>,
) -> Vec<Observation> {
    let mut out = Vec::with_capacity(observations.len());
    for obs in observations {
        let known = (obs.verdict == Observed::Deny && obs.port.is_none())
            .then(|| ports.get(&obs.key()))
            .flatten();
        match known {
            Some(known) => {
                let labels = known.labels();
                for port in known.split() {
                    out.push(Observation {
                        port,
                        count_ports: labels.clone(),
                        ..obs.clone()
                    });
                }
            }
            None => out.push(obs),
        }
    }
    out
}

/// Denied edges of an edges file as `deny-observer edges` writes them: one line per port, each
/// with the edge's count over all its ports. Gathers the ports of each denied edge while the
/// file is read, to mark the lines kept with them.
#[derive(Default)]
struct FilePorts(BTreeMap<EdgeKey, DeniedPorts>);

impl FilePorts {
    fn note(&mut self, obs: &Observation) {
        if obs.verdict != Observed::Deny {
            return;
        }
        let entry = self.0.entry(obs.key()).or_default();
        match obs.port {
            Some(p) => {
                entry.ports.insert(p);
            }
            None => entry.other = true,
        }
    }

    /// Marks the denied observations whose edge has named ports with all of them.
    fn mark(&self, observations: &mut [Observation]) {
        for obs in observations.iter_mut() {
            if obs.verdict != Observed::Deny {
                continue;
            }
            if let Some(ports) = self.0.get(&obs.key()).filter(|p| !p.ports.is_empty()) {
                obs.count_ports = ports.labels();
            }
        }
    }
}

/// An observation ranked for [`Heaviest`]: denied before allowed (the denies are what the map
/// is for, and they are few), then by its count over the longest window; ties go to the
/// first in the observations' order, so the edges kept do not depend on the input's order.
struct Ranked(Observation);

impl Ranked {
    fn weight(&self) -> (bool, u64) {
        (
            self.0.verdict == Observed::Deny,
            self.0.counts.last().copied().unwrap_or(0),
        )
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.weight()
            .cmp(&other.weight())
            .then_with(|| other.0.cmp(&self.0))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The `max` heaviest observations of those pushed, holding no more than `max` of them at any
/// time, and how many were left out. Denied edges rank before allowed ones, then by their
/// count over the longest window.
pub struct Heaviest {
    max: usize,
    kept: BinaryHeap<Reverse<Ranked>>,
    left_out: usize,
}

impl Heaviest {
    /// Keeps at most `max` observations (at least one).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            kept: BinaryHeap::new(),
            left_out: 0,
        }
    }

    /// Offers one observation: kept if among the `max` heaviest so far.
    pub fn push(&mut self, obs: Observation) {
        let ranked = Ranked(obs);
        if self.kept.len() < self.max {
            self.kept.push(Reverse(ranked));
            return;
        }
        self.left_out += 1;
        if let Some(mut lightest) = self.kept.peek_mut()
            && ranked > lightest.0
        {
            *lightest = Reverse(ranked);
        }
    }

    /// The observations kept, in their order, and how many were left out.
    pub fn finish(self) -> (Vec<Observation>, usize) {
        let mut kept: Vec<Observation> = self.kept.into_iter().map(|r| r.0.0).collect();
        kept.sort();
        (kept, self.left_out)
    }
}

/// The note of a map that left edges out.
fn left_out_note(kept: usize, left_out: usize) -> String {
    format!(
        "{left_out} of {} edges left out: the map draws the {kept} heaviest (denied first, then by count); --max-edges raises the limit",
        kept.saturating_add(left_out)
    )
}

/// What a source gave: edges and the windows their counts are for.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    /// Human description of the source (`Prometheus http://...`, `edges file x.jsonl`).
    pub source: String,
    /// `(window, seconds)`; seconds is 0 when unknown (an edges file).
    pub windows: Vec<(String, f64)>,
    /// The edges.
    pub edges: Vec<Observation>,
    /// Remarks for the operator.
    pub notes: Vec<String>,
    /// Edges the source had beyond `--max-edges`, not in [`Observations::edges`].
    pub left_out: usize,
}

impl EdgeSource {
    /// Reads the source on a private runtime (for `--output`), keeping the `max_edges`
    /// heaviest edges.
    pub fn load_blocking(&self, max_edges: usize) -> Result<Observations, MapError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MapError::Usage(format!("starting the HTTP client: {e}")))?;
        runtime.block_on(self.load(max_edges))
    }

    /// Reads the source, keeping the `max_edges` heaviest edges (see [`Heaviest`]).
    pub async fn load(&self, max_edges: usize) -> Result<Observations, MapError> {
        let mut heaviest = Heaviest::new(max_edges);
        let mut observations = match self {
            Self::File(path) => {
                // A line at a time into the bounded selection: a huge file costs the edges
                // kept and the ports of its denied edges, not all of its lines.
                let mut ports = FilePorts::default();
                visit_edges_file(path, &mut |e| {
                    let obs = Observation {
                        source_namespace: e.source_namespace,
                        source_workload: e.source_workload,
                        destination_namespace: e.destination_namespace,
                        destination_workload: e.destination_workload,
                        protocol: e.protocol,
                        port: e.port,
                        verdict: e.verdict,
                        policy: None,
                        matched: None,
                        counts: vec![e.observed],
                        count_ports: Vec::new(),
                    };
                    ports.note(&obs);
                    heaviest.push(obs);
                })?;
                let (mut edges, left_out) = heaviest.finish();
                ports.mark(&mut edges);
                Observations {
                    source: format!("edges file {}", path.display()),
                    windows: vec![("edges file".to_owned(), 0.0)],
                    edges,
                    notes: Vec::new(),
                    left_out,
                }
            }
            Self::Prometheus { url, windows } => {
                let mut fetched = fetch(url, windows).await?;
                for obs in std::mem::take(&mut fetched.edges) {
                    heaviest.push(obs);
                }
                (fetched.edges, fetched.left_out) = heaviest.finish();
                fetched
            }
        };
        if observations.left_out > 0 {
            observations.notes.push(left_out_note(
                observations.edges.len(),
                observations.left_out,
            ));
        }
        Ok(observations)
    }
}

const KEY_LABELS: &str =
    "source_namespace, source_workload, destination_namespace, destination_workload, protocol";

/// The PromQL of the allowed edges over `window`, by port.
pub fn allowed_query(window: &str) -> String {
    format!("sum by ({KEY_LABELS}, port) (increase({ALLOWED_METRIC}[{window}])) > 0")
}

/// The PromQL of the denied edges over `window`, by deciding policies and match.
pub fn denied_query(window: &str) -> String {
    format!("sum by ({KEY_LABELS}, policy, match) (increase({DENIED_METRIC}[{window}])) > 0")
}

/// Parses an `/api/v1/query` vector answer into observations of `verdict` (counts in the
/// slot `slot` of `slots`).
pub fn parse_samples(
    body: &[u8],
    verdict: Observed,
    slot: usize,
    slots: usize,
) -> Result<Vec<Observation>, String> {
    Ok(crate::verdict::edges::parse_vector(body)?
        .into_iter()
        .map(|s| {
            let mut counts = vec![0; slots];
            if let Some(c) = counts.get_mut(slot) {
                *c = s.observed;
            }
            let nonempty = |k: &str| s.labels.get(k).filter(|v| !v.is_empty()).cloned();
            Observation {
                source_namespace: s.label("source_namespace"),
                source_workload: s.label("source_workload"),
                destination_namespace: s.label("destination_namespace"),
                destination_workload: s.label("destination_workload"),
                protocol: s.label("protocol").to_ascii_lowercase(),
                port: s.port,
                verdict,
                policy: nonempty("policy"),
                matched: nonempty("match"),
                counts,
                count_ports: Vec::new(),
            }
        })
        .collect())
}

/// Merges observations that differ only in their counts (the same edge in several windows).
pub fn merge(observations: Vec<Observation>, slots: usize) -> Vec<Observation> {
    let mut merged: BTreeMap<Observation, Vec<u64>> = BTreeMap::new();
    for mut obs in observations {
        let counts = std::mem::take(&mut obs.counts);
        let entry = merged.entry(obs).or_insert_with(|| vec![0; slots]);
        for (slot, c) in entry.iter_mut().zip(counts) {
            *slot = (*slot).max(c);
        }
    }
    merged
        .into_iter()
        .map(|(mut obs, counts)| {
            obs.counts = counts;
            obs
        })
        .collect()
}

async fn fetch(url: &str, windows: &[(String, f64)]) -> Result<Observations, MapError> {
    let base = parse_base(url)?;
    let mut all = Vec::new();
    let mut allowed_seen = false;
    for (slot, (window, _)) in windows.iter().enumerate() {
        for (metric, verdict, query) in [
            (ALLOWED_METRIC, Observed::Allow, allowed_query(window)),
            (DENIED_METRIC, Observed::Deny, denied_query(window)),
        ] {
            let err = |reason: String| EdgeError::Query {
                url: url.to_owned(),
                metric,
                reason,
            };
            let body = query_prometheus(&base, &query).await.map_err(err)?;
            let found = parse_samples(&body, verdict, slot, windows.len()).map_err(err)?;
            allowed_seen |= verdict == Observed::Allow && !found.is_empty();
            all.extend(found);
        }
    }
    // The ports of the denied edges, over the longest window (the edges of shorter windows
    // are among its).
    if let Some((window, _)) = windows.last()
        && all
            .iter()
            .any(|o| o.verdict == Observed::Deny && o.port.is_none())
    {
        let err = |reason: String| EdgeError::Query {
            url: url.to_owned(),
            metric: DENIED_PORTS_METRIC,
            reason,
        };
        let body = query_prometheus(&base, &denied_ports_query(window))
            .await
            .map_err(err)?;
        let ports = parse_denied_ports(&body).map_err(err)?;
        all = split_by_port(all, &ports);
    }
    let mut notes = Vec::new();
    if !allowed_seen {
        let longest = windows.last().map(|(w, _)| w.as_str()).unwrap_or_default();
        notes.push(format!(
            "no allowed edges observed: {ALLOWED_METRIC} has no increase over {longest}; the map shows denied edges only"
        ));
    }
    Ok(Observations {
        source: format!("Prometheus {url}"),
        windows: windows.to_vec(),
        edges: merge(all, windows.len()),
        notes,
        left_out: 0,
    })
}

/// The document the page draws (embedded as JSON; served as `/data.json` with `--listen`).
#[derive(Clone, Debug, Serialize)]
pub struct MapData {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// When the edges were read, Unix seconds.
    pub generated_unix: u64,
    /// Where the edges came from.
    pub source: String,
    /// The windows of [`MapEdge::observed`], shortest first.
    pub windows: Vec<String>,
    /// Their lengths in seconds (0: unknown, an edges file).
    pub window_seconds: Vec<f64>,
    /// Namespaces of the drawn workloads, sorted (`""`: outside the cluster's pods).
    pub namespaces: Vec<MapNamespace>,
    /// Workloads, sorted by id.
    pub nodes: Vec<MapNode>,
    /// Edges, sorted.
    pub edges: Vec<MapEdge>,
    /// Edges of the source beyond `--max-edges`, not drawn (the heaviest are kept).
    pub edges_left_out: usize,
    /// Beyond these the page shows namespaces first.
    pub full_detail_max_workloads: usize,
    /// See [`MapData::full_detail_max_workloads`].
    pub full_detail_max_edges: usize,
    /// With `--listen`: seconds between refreshes (the page polls `data.json`).
    pub refresh_seconds: Option<f64>,
    /// With `--listen`: the last refresh's error (the data shown is the last good one).
    pub error: Option<String>,
    /// Remarks (no allowed edges observed, unknown workloads...).
    pub notes: Vec<String>,
}

/// A namespace of the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapNamespace {
    /// Name; `""` for peers outside the cluster's pods.
    pub name: String,
    /// True when the inventory has no NetworkPolicy in it ("open field").
    pub open: bool,
    /// NetworkPolicies in it.
    pub policies: usize,
    /// Whether the inventory knows it.
    pub known: bool,
}

/// A workload (or an outside peer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapNode {
    /// `ns/workload` (`/world` for outside peers), the `data-workload` attribute.
    pub id: String,
    /// Namespace (`""` outside).
    pub namespace: String,
    /// Workload name.
    pub workload: String,
    /// `Deployment`, `StatefulSet`..., when the inventory knows it.
    pub kind: Option<String>,
    /// Pods of the workload in the inventory.
    pub pods: usize,
}

/// An edge of the map.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MapEdge {
    /// Source node id.
    pub source: String,
    /// Destination node id.
    pub target: String,
    /// `allowed` or `denied`, as observed.
    pub verdict: &'static str,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// Destination port, when known.
    pub port: Option<u16>,
    /// Count per window of [`MapData::windows`].
    pub observed: Vec<u64>,
    /// Denied: the deciding (isolating) policies, the metric's `policy` label. Allowed: the
    /// policies that allow it (empty when neither side is isolated).
    pub policy: String,
    /// Denied: `default_deny` or `unexplained` (the policies allow it, yet it was dropped).
    #[serde(rename = "match")]
    pub matched: Option<String>,
    /// What the verdict engine says today: `allow`, `deny` or `unknown` (not judged).
    pub judged: &'static str,
    /// The `explain` answer for the edge.
    pub explain: String,
    /// A denied edge shown once per port: all its ports (`other`: ports the daemon did not
    /// name). [`MapEdge::observed`] is then the edge's count over all of them, repeated on
    /// each port, since the drop metrics count packets per edge, not per port. Absent when
    /// the count is this edge's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub count_ports: Vec<String>,
}

/// Now, in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn node_id(ns: &str, workload: &str) -> String {
    format!("{ns}/{workload}")
}

struct Explained {
    judged: &'static str,
    policies: Vec<String>,
    text: String,
}

fn explain_edge(
    engine: &Engine,
    obs: &Observation,
    from: &Endpoint,
    to: &Endpoint,
) -> Result<Explained, String> {
    let protocol: Protocol = obs
        .protocol
        .parse()
        .map_err(|_| format!("invalid protocol {:?}", obs.protocol))?;
    let ports: Vec<(u16, Option<String>)> = match obs.port {
        Some(p) => vec![(p, None)],
        None if protocol.has_ports() => {
            let declared: Vec<(u16, Option<String>)> = declared_ports(to, Some(protocol))
                .into_iter()
                .map(|(_, n, name)| (n, name))
                .collect();
            if declared.is_empty() {
                vec![(0, None)]
            } else {
                declared
            }
        }
        None => vec![(0, None)],
    };
    let mut text = String::new();
    if obs.port.is_none() && protocol.has_ports() {
        let why = if obs.matched.as_deref() == Some("unexplained") {
            format!(
                "The drop metrics carry no port, and {DENIED_PORTS_METRIC} names ports only for the denies the policies explain"
            )
        } else if obs.count_ports.is_empty() {
            format!(
                "The drop metrics carry no port, and {DENIED_PORTS_METRIC} names none for this edge (first denied while the daemon was learning, beyond its series limit, or allowed by the policies)"
            )
        } else {
            "These drops were on ports the daemon does not name (beyond 16 per edge, or a header cut short)".to_owned()
        };
        text.push_str(&format!(
            "{why}: judged on the {} port(s) {} declares.\n\n",
            protocol.label(),
            obs.destination_workload
        ));
    }
    let mut any_denied = false;
    let mut policies = BTreeSet::new();
    for (i, (port, name)) in ports.iter().enumerate() {
        let judged = judge(engine, from, to, protocol, &PortRef::Number(*port))
            .map_err(|e| e.to_string())?;
        if !judged.verdict.allowed || judged.denied > 0 {
            if !any_denied {
                policies.clear();
            }
            any_denied = true;
            if let Some(side) = judged.verdict.deciding_side() {
                policies.extend(side.isolating_policies.iter().cloned());
            }
        } else if !any_denied {
            policies.extend(judged.verdict.egress.allowed_by.iter().cloned());
            policies.extend(judged.verdict.ingress.allowed_by.iter().cloned());
        }
        if i < MAX_EXPLAINED_PORTS {
            if i > 0 {
                text.push('\n');
            }
            let mut buf = Vec::new();
            write_judgement(&judged, from, to, name.as_deref(), &mut buf)
                .map_err(|e| e.to_string())?;
            text.push_str(&String::from_utf8_lossy(&buf));
        }
    }
    if ports.len() > MAX_EXPLAINED_PORTS {
        text.push_str(&format!(
            "\n... and {} more declared port(s); `deny-observer explain --from {} --to {}` lists them all\n",
            ports.len() - MAX_EXPLAINED_PORTS,
            from.given,
            to.given
        ));
    }
    Ok(Explained {
        judged: if any_denied { "deny" } else { "allow" },
        policies: policies.into_iter().collect(),
        text,
    })
}

/// Judges and explains every observation with `engine` and lays out the document.
pub fn build(engine: &Engine, observations: &Observations, generated_unix: u64) -> MapData {
    let inventory: &Arc<Inventory> = engine.inventory();
    let audit: HashMap<String, (bool, usize)> = engine
        .audit()
        .into_iter()
        .map(|a| (a.name, (a.open, a.policies)))
        .collect();
    let mut kinds: HashMap<(&str, &str), (String, usize)> = HashMap::new();
    for pod in &inventory.pods {
        let entry = kinds
            .entry((pod.namespace.as_str(), pod.workload.name.as_str()))
            .or_insert_with(|| (pod.workload.kind.clone(), 0));
        entry.1 += 1;
    }
    let mut sides: HashMap<(String, String), Result<Endpoint, String>> = HashMap::new();
    let mut side = |ns: &str, wl: &str| -> Result<Endpoint, String> {
        sides
            .entry((ns.to_owned(), wl.to_owned()))
            .or_insert_with(|| resolve_side(engine, ns, wl))
            .clone()
    };
    let mut nodes: BTreeMap<String, MapNode> = BTreeMap::new();
    let mut edges = Vec::with_capacity(observations.edges.len());
    let mut unresolved = BTreeSet::new();
    for obs in &observations.edges {
        for (ns, wl) in [
            (&obs.source_namespace, &obs.source_workload),
            (&obs.destination_namespace, &obs.destination_workload),
        ] {
            let id = node_id(ns, wl);
            nodes.entry(id.clone()).or_insert_with(|| {
                let known = kinds.get(&(ns.as_str(), wl.as_str()));
                MapNode {
                    id,
                    namespace: ns.clone(),
                    workload: wl.clone(),
                    kind: known.map(|(k, _)| k.clone()),
                    pods: known.map_or(0, |(_, n)| *n),
                }
            });
        }
        let explained = side(&obs.source_namespace, &obs.source_workload)
            .map_err(|e| format!("source: {e}"))
            .and_then(|from| {
                side(&obs.destination_namespace, &obs.destination_workload)
                    .map_err(|e| format!("destination: {e}"))
                    .map(|to| (from, to))
            })
            .and_then(|(from, to)| explain_edge(engine, obs, &from, &to));
        let (judged, engine_policies, explain) = match explained {
            Ok(e) => (e.judged, e.policies, e.text),
            Err(reason) => {
                unresolved.insert(reason.clone());
                (
                    "unknown",
                    Vec::new(),
                    format!("cannot judge this edge with the inventory: {reason}\n"),
                )
            }
        };
        let (verdict, policy, matched) = match obs.verdict {
            Observed::Allow => ("allowed", bounded_policy_list(&engine_policies), None),
            Observed::Deny => {
                let policy = obs
                    .policy
                    .clone()
                    .unwrap_or_else(|| bounded_policy_list(&engine_policies));
                let matched = obs.matched.clone().or_else(|| match judged {
                    "allow" => Some("unexplained".to_owned()),
                    "deny" => Some("default_deny".to_owned()),
                    _ => None,
                });
                ("denied", policy, matched)
            }
        };
        edges.push(MapEdge {
            source: node_id(&obs.source_namespace, &obs.source_workload),
            target: node_id(&obs.destination_namespace, &obs.destination_workload),
            verdict,
            protocol: obs.protocol.clone(),
            port: obs.port,
            observed: obs.counts.clone(),
            policy,
            matched,
            judged,
            explain,
            count_ports: obs.count_ports.clone(),
        });
    }
    edges.sort_by(|a, b| {
        (&a.source, &a.target, &a.protocol, a.port, a.verdict).cmp(&(
            &b.source,
            &b.target,
            &b.protocol,
            b.port,
            b.verdict,
        ))
    });
    let namespaces: BTreeSet<&str> = nodes.values().map(|n| n.namespace.as_str()).collect();
    let namespaces = namespaces
        .into_iter()
        .map(|name| {
            let known = audit.get(name);
            MapNamespace {
                name: name.to_owned(),
                open: known.is_some_and(|(open, _)| *open),
                policies: known.map_or(0, |(_, p)| *p),
                known: known.is_some(),
            }
        })
        .collect();
    let mut notes = observations.notes.clone();
    if !unresolved.is_empty() {
        notes.push(format!(
            "{} edge endpoint(s) not in the inventory (shown, not judged); first: {}",
            unresolved.len(),
            unresolved.iter().next().map(String::as_str).unwrap_or("")
        ));
    }
    MapData {
        schema_version: SCHEMA_VERSION,
        generated_unix,
        source: observations.source.clone(),
        windows: observations
            .windows
            .iter()
            .map(|(w, _)| w.clone())
            .collect(),
        window_seconds: observations.windows.iter().map(|(_, s)| *s).collect(),
        namespaces,
        nodes: nodes.into_values().collect(),
        edges,
        edges_left_out: observations.left_out,
        full_detail_max_workloads: FULL_DETAIL_MAX_WORKLOADS,
        full_detail_max_edges: FULL_DETAIL_MAX_EDGES,
        refresh_seconds: None,
        error: None,
        notes,
    }
}

#[cfg(test)]
mod tests;
