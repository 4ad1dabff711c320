//! Observed edges: the workload-to-workload traffic `preflight` and `suggest` judge, read from
//! a JSON lines file or from Prometheus, and written by `deny-observer edges`.
//!
//! One line per edge: `{"source_namespace":"shop","source_workload":"web",
//! "destination_namespace":"db","destination_workload":"postgres","protocol":"tcp","port":5432,
//! "observed":1234,"verdict":"allow"}`. The drop metrics carry no port, so a denied edge from
//! Prometheus takes its ports from `deny_observer_new_denied_edges_total` (one line per port,
//! each with the edge's count over all its ports: see [`DeniedPorts`]); `port` is `null` where
//! that metric names none. Outside peers have an empty namespace and the workload `world`,
//! `private`, `node` or `host`, as in the daemon's metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::flow::Protocol;

/// Allowed connections, counted in the kernel (issue 14 item 1; absent until that lands).
pub const ALLOWED_METRIC: &str = "deny_observer_connections_total";
/// Drops the NetworkPolicy engine attributes to policies: the denied edges.
pub const DENIED_METRIC: &str = "deny_observer_policy_denies_total";
/// First denies of an edge, by destination port: where the denied edges' ports come from.
pub const DENIED_PORTS_METRIC: &str = "deny_observer_new_denied_edges_total";
/// Largest Prometheus response read, so a huge answer is an error, not an out-of-memory kill.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Time allowed for one Prometheus query, connection included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What was observed on an edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Connections or flows went through.
    Allow,
    /// Packets were dropped by a policy.
    Deny,
}

/// One observed edge, the unit of the `--edges` file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// Namespace of the source, `""` outside the cluster's pods.
    pub source_namespace: String,
    /// Workload of the source, or `world`, `private`, `node`, `host`.
    pub source_workload: String,
    /// Namespace of the destination, `""` outside the cluster's pods.
    pub destination_namespace: String,
    /// Workload of the destination, or `world`, `private`, `node`, `host`.
    pub destination_workload: String,
    /// `tcp`, `udp`, `sctp` (any case on input; written in lower case as the metrics).
    pub protocol: String,
    /// Destination port; `null` when the source (the drop metrics) has none.
    pub port: Option<u16>,
    /// Connections (allowed) or dropped packets (denied) in the window.
    pub observed: u64,
    /// Whether the traffic was seen allowed or denied.
    pub verdict: Observed,
}

/// Errors reading or fetching edges.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The edges file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the edges file is not a valid edge.
    #[error("{path} line {line}: {reason}")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why it is invalid.
        reason: String,
    },
    /// `--window` is not a Prometheus duration.
    #[error("invalid --window {0:?} (expected a Prometheus duration such as 7d, 12h, 90m)")]
    BadWindow(String),
    /// `--prometheus` is not a usable URL.
    #[error("invalid --prometheus URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The query failed: connection, HTTP status, timeout, size or an error answer.
    #[error("querying Prometheus at {url} for {metric}: {reason}")]
    Query {
        /// The base URL.
        url: String,
        /// The metric queried.
        metric: &'static str,
        /// What went wrong.
        reason: String,
    },
}

impl Edge {
    /// The protocol, parsed.
    pub fn protocol(&self) -> Result<Protocol, String> {
        self.protocol
            .parse::<Protocol>()
            .map_err(|_| format!("invalid protocol {:?}", self.protocol))
    }

    /// The edge without its port.
    pub fn key(&self) -> EdgeKey {
        EdgeKey {
            source_namespace: self.source_namespace.clone(),
            source_workload: self.source_workload.clone(),
            destination_namespace: self.destination_namespace.clone(),
            destination_workload: self.destination_workload.clone(),
            protocol: self.protocol.to_ascii_lowercase(),
        }
    }

    /// `ns/workload` of the source, or the bare outside name.
    pub fn source(&self) -> String {
        endpoint_name(&self.source_namespace, &self.source_workload)
    }

    /// `ns/workload` of the destination, or the bare outside name.
    pub fn destination(&self) -> String {
        endpoint_name(&self.destination_namespace, &self.destination_workload)
    }
}

fn endpoint_name(ns: &str, workload: &str) -> String {
    if ns.is_empty() {
        workload.to_owned()
    } else {
        format!("{ns}/{workload}")
    }
}

/// Longest line read from an edges or flows file, newline excluded. An edge line is about
/// 300 bytes and a flow line less, so a longer one is not an edge (a binary file, `/dev/zero`);
/// reading it whole would take memory without bound.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// What [`read_line_bounded`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundedLine {
    /// The end of the input: nothing was read.
    Eof,
    /// A line, with its `\n` unless it ended the input.
    Line,
    /// A line longer than the limit. The buffer holds its start only, and the input is left
    /// within the line: the caller stops reading.
    TooLong,
}

/// Reads one line into `buf` (cleared first), unless it is longer than `max` bytes without
/// its newline. Reads the input's buffer a chunk at a time, so a line without end costs at
/// most `max` bytes of memory, not the whole line.
pub fn read_line_bounded(
    input: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<BoundedLine> {
    buf.clear();
    loop {
        let chunk = match input.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(if buf.is_empty() {
                BoundedLine::Eof
            } else {
                BoundedLine::Line
            });
        }
        let (take, content, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, i, true),
            None => (chunk.len(), chunk.len(), false),
        };
        if buf.len().saturating_add(content) > max {
            return Ok(BoundedLine::TooLong);
        }
        buf.extend_from_slice(&chunk[..take]);
        input.consume(take);
        if done {
            return Ok(BoundedLine::Line);
        }
    }
}

/// Reads an edges file (JSON lines; blank lines skipped). The first invalid line is an error
/// naming its number: a half-read edge list would make `preflight` pass on what it skipped.
pub fn read_edges(path: &std::path::Path) -> Result<Vec<Edge>, EdgeError> {
    let mut out = Vec::new();
    visit_edges_file(path, &mut |edge| out.push(edge))?;
    Ok(out)
}

/// [`read_edges`], handing each edge to `visit` as it is read instead of keeping them all.
pub fn visit_edges_file(
    path: &std::path::Path,
    visit: &mut dyn FnMut(Edge),
) -> Result<(), EdgeError> {
    let file = std::fs::File::open(path).map_err(|source| EdgeError::Io {
        path: path.to_owned(),
        source,
    })?;
    visit_edges(path, &mut std::io::BufReader::new(file), visit)
}

/// [`read_edges`] over any reader; `path` only names the input in errors.
pub fn parse_edges(
    path: &std::path::Path,
    input: &mut dyn BufRead,
) -> Result<Vec<Edge>, EdgeError> {
    let mut out = Vec::new();
    visit_edges(path, input, &mut |edge| out.push(edge))?;
    Ok(out)
}

/// [`visit_edges_file`] over any reader; `path` only names the input in errors.
pub fn visit_edges(
    path: &std::path::Path,
    input: &mut dyn BufRead,
    visit: &mut dyn FnMut(Edge),
) -> Result<(), EdgeError> {
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        let read =
            read_line_bounded(input, &mut buf, MAX_LINE_BYTES).map_err(|source| EdgeError::Io {
                path: path.to_owned(),
                source,
            })?;
        if read == BoundedLine::Eof {
            break;
        }
        line += 1;
        let bad = |reason: String| EdgeError::BadLine {
            path: path.to_owned(),
            line,
            reason,
        };
        if read == BoundedLine::TooLong {
            return Err(bad(format!(
                "longer than {MAX_LINE_BYTES} bytes, so not an edge (an edge line is about 300 bytes); stopped reading"
            )));
        }
        let text = std::str::from_utf8(&buf).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let mut edge: Edge =
            serde_json::from_str(text.trim()).map_err(|e| bad(format!("invalid edge: {e}")))?;
        let protocol = edge.protocol().map_err(bad)?;
        edge.protocol = protocol.label().to_owned();
        if edge.source_workload.is_empty() || edge.destination_workload.is_empty() {
            return Err(bad(
                "empty source_workload or destination_workload".to_owned()
            ));
        }
        visit(edge);
    }
    Ok(())
}

/// Writes edges as JSON lines.
pub fn write_edges(edges: &[Edge], out: &mut dyn Write) -> std::io::Result<()> {
    for edge in edges {
        serde_json::to_writer(&mut *out, edge)?;
        writeln!(out)?;
    }
    out.flush()
}

/// Checks a Prometheus range duration: digits then a unit, possibly repeated (`1d12h`).
pub fn check_window(window: &str) -> Result<(), EdgeError> {
    let bad = || EdgeError::BadWindow(window.to_owned());
    let mut rest = window;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
    }
    Ok(())
}

const KEY_LABELS: &str =
    "source_namespace, source_workload, destination_namespace, destination_workload, protocol";

/// The PromQL for one metric over `window`. Drops carry no port label, so their edges are
/// summed without one.
pub fn edge_query(metric: &str, window: &str, with_port: bool) -> String {
    let port = if with_port { ", port" } else { "" };
    format!("sum by ({KEY_LABELS}{port}) (increase({metric}[{window}])) > 0")
}

#[derive(Deserialize)]
struct PromAnswer {
    status: String,
    #[serde(default)]
    data: Option<PromData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct PromData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<PromSample>,
}

#[derive(Deserialize)]
struct PromSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// One sample of a Prometheus vector answer over edge labels.
pub(crate) struct EdgeSample {
    /// Every label of the sample.
    pub labels: BTreeMap<String, String>,
    /// The `port` label, when present and not empty.
    pub port: Option<u16>,
    /// The value rounded up: increase() extrapolates, and 0.6 of a connection was still one.
    pub observed: u64,
}

impl EdgeSample {
    /// The label `k`, empty when absent.
    pub fn label(&self, k: &str) -> String {
        self.labels.get(k).cloned().unwrap_or_default()
    }
}

/// Parses a Prometheus `/api/v1/query` vector answer over edge labels. Samples without a
/// workload label or with an unparsable port or value are errors: they mean the metric is not
/// the one this reads.
pub(crate) fn parse_vector(body: &[u8]) -> Result<Vec<EdgeSample>, String> {
    let answer: PromAnswer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if answer.status != "success" {
        return Err(format!(
            "status {}: {}",
            answer.status,
            answer.error.unwrap_or_default()
        ));
    }
    let data = answer.data.ok_or("answer without data")?;
    if data.result_type != "vector" {
        return Err(format!("expected a vector, got {}", data.result_type));
    }
    let mut out = Vec::with_capacity(data.result.len());
    for sample in data.result {
        let port = match sample.metric.get("port").map(String::as_str) {
            // Port labels that stand for many ports: beyond the new-edge port budget, or
            // folded by the series limit. The raw label stays in `labels`.
            None | Some("" | "other" | "__overflow__") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| format!("sample with invalid port label {p:?}"))?,
            ),
        };
        let value: f64 = sample
            .value
            .1
            .parse()
            .map_err(|_| format!("sample with invalid value {:?}", sample.value.1))?;
        let has = |k: &str| sample.metric.get(k).is_some_and(|v| !v.is_empty());
        if !has("source_workload") || !has("destination_workload") {
            return Err(format!(
                "sample without workload labels: {:?}",
                sample.metric
            ));
        }
        out.push(EdgeSample {
            labels: sample.metric,
            port,
            observed: value.ceil().max(0.0) as u64,
        });
    }
    Ok(out)
}

/// Turns a Prometheus `/api/v1/query` answer into edges of `verdict` (see `parse_vector`).
pub fn parse_answer(body: &[u8], verdict: Observed) -> Result<Vec<Edge>, String> {
    Ok(parse_vector(body)?
        .into_iter()
        .map(|s| Edge {
            source_namespace: s.label("source_namespace"),
            source_workload: s.label("source_workload"),
            destination_namespace: s.label("destination_namespace"),
            destination_workload: s.label("destination_workload"),
            protocol: s.label("protocol"),
            port: s.port,
            observed: s.observed,
            verdict,
        })
        .collect())
}

/// An edge without its port: the labels the denied edges and their ports are joined on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    /// Namespace of the source.
    pub source_namespace: String,
    /// Workload of the source.
    pub source_workload: String,
    /// Namespace of the destination.
    pub destination_namespace: String,
    /// Workload of the destination.
    pub destination_workload: String,
    /// `tcp`, `udp`, `sctp` (lower case).
    pub protocol: String,
}

/// The destination ports a denied edge is known by.
///
/// `deny_observer_policy_denies_total` has no port label (a port scan must not make a series
/// per port); the daemon names the ports of each denied edge on
/// `deny_observer_new_denied_edges_total` instead, one series per port, at most 16 per edge
/// (then `port="other"`), from its first deny until the edge has been quiet for the
/// daemon's retention. A series present over the window therefore names a port this edge was
/// denied on within the retention, not necessarily within the window; and the packet counts
/// stay per edge: they cannot be split by port. An edge first denied during the daemon's
/// `--edge-learning` period has no such series, and no port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeniedPorts {
    /// The ports named.
    pub ports: BTreeSet<u16>,
    /// Denied on further ports too: `port="other"` (beyond 16 per edge), or port 0 (a header
    /// cut short, so the port was not read).
    pub other: bool,
}

impl DeniedPorts {
    /// The ports to give the edge: each named port, then `None` for the others (when any).
    pub fn split(&self) -> Vec<Option<u16>> {
        let mut out: Vec<Option<u16>> = self.ports.iter().copied().map(Some).collect();
        if self.other {
            out.push(None);
        }
        out
    }

    /// The ports as labels (`80`, `443`, `other`), for the operator.
    pub fn labels(&self) -> Vec<String> {
        let mut out: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        if self.other {
            out.push("other".to_owned());
        }
        out
    }
}

/// The PromQL of the denied edges' ports: the new-edge series present over `window`. Their
/// value is a count of first denies, not of packets: only their presence is used.
pub fn denied_ports_query(window: &str) -> String {
    format!("max by ({KEY_LABELS}, port) (max_over_time({DENIED_PORTS_METRIC}[{window}]))")
}

/// Parses the answer of [`denied_ports_query`]. Protocols without ports (ICMP) are left out:
/// their edges keep no port.
pub fn parse_denied_ports(body: &[u8]) -> Result<BTreeMap<EdgeKey, DeniedPorts>, String> {
    let mut out: BTreeMap<EdgeKey, DeniedPorts> = BTreeMap::new();
    for s in parse_vector(body)? {
        let protocol = s.label("protocol").to_ascii_lowercase();
        if !protocol.parse::<Protocol>().is_ok_and(|p| p.has_ports()) {
            continue;
        }
        let key = EdgeKey {
            source_namespace: s.label("source_namespace"),
            source_workload: s.label("source_workload"),
            destination_namespace: s.label("destination_namespace"),
            destination_workload: s.label("destination_workload"),
            protocol,
        };
        let entry = out.entry(key).or_default();
        match s.port {
            Some(0) | None => entry.other = true,
            Some(p) => {
                entry.ports.insert(p);
            }
        }
    }
    Ok(out)
}

/// Gives each denied edge without a port the ports [`parse_denied_ports`] found for it: one
/// edge per port, each with the edge's count (over all its ports). Edges with no known port
/// stay as they are.
pub fn split_denied_by_port(edges: Vec<Edge>, ports: &BTreeMap<EdgeKey, DeniedPorts>) -> Vec<Edge> {
    let mut out = Vec::with_capacity(edges.len());
    for edge in edges {
        let known = (edge.verdict == Observed::Deny && edge.port.is_none())
            .then(|| ports.get(&edge.key()))
            .flatten();
        match known {
            Some(known) => {
                for port in known.split() {
                    out.push(Edge {
                        port,
                        ..edge.clone()
                    });
                }
            }
            None => out.push(edge),
        }
    }
    out
}

/// Arguments shared by the commands that read edges.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeSourceArgs {
    /// Prometheus base URL (`http://prometheus:9090`), queried through `/api/v1/query`.
    #[arg(long, required_unless_present = "edges", conflicts_with = "edges")]
    pub prometheus: Option<String>,
    /// How far back to look in Prometheus.
    #[arg(long, default_value = "7d")]
    pub window: String,
    /// JSON lines of observed edges (as written by `deny-observer edges`) instead of Prometheus.
    #[arg(long)]
    pub edges: Option<PathBuf>,
}

/// Arguments of `deny-observer edges`.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgesArgs {
    /// Prometheus base URL (`http://prometheus:9090`).
    #[arg(long)]
    pub prometheus: String,
    /// How far back to look.
    #[arg(long, default_value = "7d")]
    pub window: String,
}

/// Where the edges came from, and what it could not see.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The edges, sorted.
    pub edges: Vec<Edge>,
    /// Remarks for the operator (e.g. no allowed traffic is counted yet).
    pub notes: Vec<String>,
}

impl EdgeSourceArgs {
    /// Reads the edges file, or queries Prometheus.
    pub fn load(&self) -> Result<Fetched, EdgeError> {
        match (&self.edges, &self.prometheus) {
            (Some(path), _) => Ok(Fetched {
                edges: read_edges(path)?,
                notes: Vec::new(),
            }),
            (None, Some(url)) => fetch_edges(url, &self.window),
            (None, None) => Err(EdgeError::BadUrl {
                url: String::new(),
                reason: "pass --prometheus <url> or --edges <file>".to_owned(),
            }),
        }
    }
}

/// Queries Prometheus for the allowed and denied edges of the last `window`.
pub fn fetch_edges(url: &str, window: &str) -> Result<Fetched, EdgeError> {
    check_window(window)?;
    let base = parse_base(url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EdgeError::Query {
            url: url.to_owned(),
            metric: ALLOWED_METRIC,
            reason: format!("starting the HTTP client: {e}"),
        })?;
    let mut fetched = Fetched::default();
    for (metric, verdict, with_port) in [
        (ALLOWED_METRIC, Observed::Allow, true),
        (DENIED_METRIC, Observed::Deny, false),
    ] {
        let query = edge_query(metric, window, with_port);
        let err = |reason: String| EdgeError::Query {
            url: url.to_owned(),
            metric,
            reason,
        };
        let body = runtime
            .block_on(query_prometheus(&base, &query))
            .map_err(err)?;
        let edges = parse_answer(&body, verdict).map_err(err)?;
        if edges.is_empty() && verdict == Observed::Allow {
            fetched.notes.push(format!(
                "no allowed edges observed: {ALLOWED_METRIC} has no increase over {window} (no allowed connection reached a pod, or the daemons run with --count-connections none); only denied edges are judged"
            ));
        }
        fetched.edges.extend(edges);
    }
    if fetched
        .edges
        .iter()
        .any(|e| e.verdict == Observed::Deny && e.port.is_none())
    {
        let query = denied_ports_query(window);
        let err = |reason: String| EdgeError::Query {
            url: url.to_owned(),
            metric: DENIED_PORTS_METRIC,
            reason,
        };
        let body = runtime
            .block_on(query_prometheus(&base, &query))
            .map_err(err)?;
        let ports = parse_denied_ports(&body).map_err(err)?;
        let before = fetched.edges.len();
        fetched.edges = split_denied_by_port(std::mem::take(&mut fetched.edges), &ports);
        if fetched
            .edges
            .iter()
            .any(|e| e.verdict == Observed::Deny && e.port.is_some())
        {
            fetched.notes.push(format!(
                "denied edges take their ports from {DENIED_PORTS_METRIC} ({} line(s) added): each port's line carries the edge's dropped packets over all its ports ({DENIED_METRIC} counts none per port); an edge first denied while the daemon was learning has no port (null)",
                fetched.edges.len() - before
            ));
        }
    }
    fetched.edges.sort();
    Ok(fetched)
}

/// Checks `--prometheus`: an `http://host:port[/prefix]` URL.
pub(crate) fn parse_base(url: &str) -> Result<http::Uri, EdgeError> {
    let bad = |reason: &str| EdgeError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported; reach Prometheus over http (e.g. kubectl port-forward)",
            ));
        }
        _ => return Err(bad("expected http://host:port")),
    }
    if uri.host().is_none() {
        return Err(bad("no host"));
    }
    Ok(uri)
}

fn encode_query(q: &str) -> String {
    let mut out = String::with_capacity(q.len() * 2);
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One instant query through `/api/v1/query`: the answer's bytes (within
/// [`MAX_RESPONSE_BYTES`] and [`QUERY_TIMEOUT`]).
pub(crate) async fn query_prometheus(base: &http::Uri, query: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let prefix = base.path().trim_end_matches('/');
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let uri = format!(
        "http://{authority}{prefix}/api/v1/query?query={}",
        encode_query(query)
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let request = http::Request::get(&uri)
        .header("accept", "application/json")
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let work = async {
        let response = client.request(request).await.map_err(|e| {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        })?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer (at most {MAX_RESPONSE_BYTES} bytes): {e}"))?
            .to_bytes();
        // Prometheus answers a bad query with 400 and a JSON error: keep it for the message.
        if !status.is_success() && !status.is_client_error() {
            return Err(format!("HTTP {status}"));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(QUERY_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {}s", QUERY_TIMEOUT.as_secs()))?
}

/// Runs `deny-observer edges`: the edges as JSON lines on `out`, notes on `notes`.
pub fn run_edges(
    args: &EdgesArgs,
    out: &mut dyn Write,
    notes: &mut dyn Write,
) -> Result<(), EdgeError> {
    let fetched = fetch_edges(&args.prometheus, &args.window)?;
    let io = |source| EdgeError::Io {
        path: PathBuf::from("<stdout>"),
        source,
    };
    for note in &fetched.notes {
        writeln!(notes, "deny-observer: note: {note}").map_err(io)?;
    }
    write_edges(&fetched.edges, out).map_err(io)
}

/// Counts the bytes a reader hands out: tests of the bounded readers check how far they read.
#[cfg(test)]
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) read: usize,
}

#[cfg(test)]
impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        for ok in ["7d", "12h", "90m", "1d12h", "30s", "500ms"] {
            assert!(check_window(ok).is_ok(), "{ok}");
        }
        for bad in ["", "7", "d", "7x", "7d;", "-1d", "7 d"] {
            assert!(check_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn edges_round_trip_and_bad_lines_name_their_number() {
        let text = "{\"source_namespace\":\"a\",\"source_workload\":\"web\",\"destination_namespace\":\"b\",\"destination_workload\":\"db\",\"protocol\":\"TCP\",\"port\":5432,\"observed\":3,\"verdict\":\"allow\"}\n\n{\"source_namespace\":\"\",\"source_workload\":\"world\",\"destination_namespace\":\"b\",\"destination_workload\":\"db\",\"protocol\":\"udp\",\"port\":null,\"observed\":1,\"verdict\":\"deny\"}\n";
        let edges = parse_edges("e".as_ref(), &mut text.as_bytes()).unwrap_or_default();
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].protocol, "tcp");
        assert_eq!(edges[1].port, None);
        assert_eq!(edges[1].source(), "world");
        let mut out = Vec::new();
        assert!(write_edges(&edges, &mut out).is_ok());
        let again = parse_edges("e".as_ref(), &mut out.as_slice()).unwrap_or_default();
        assert_eq!(again, edges);

        let bad = format!(
            "{}\n{{\"source_namespace\":\"a\"}}\n",
            text.lines().next().unwrap_or_default()
        );
        match parse_edges("e".as_ref(), &mut bad.as_bytes()) {
            Err(EdgeError::BadLine { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a bad line 2, got {other:?}"),
        }
        let proto = text.replace("\"TCP\"", "\"xyz\"");
        assert!(parse_edges("e".as_ref(), &mut proto.as_bytes()).is_err());
    }

    #[test]
    fn lines_are_read_up_to_the_limit_and_no_further() {
        let mut buf = Vec::new();
        let mut input: &[u8] = b"abc\nabcd\nab";
        let mut next = |buf: &mut Vec<u8>| read_line_bounded(&mut input, buf, 3).ok();
        assert_eq!(next(&mut buf), Some(BoundedLine::Line));
        assert_eq!(buf, b"abc\n", "exactly the limit, newline excluded");
        assert_eq!(next(&mut buf), Some(BoundedLine::TooLong));
        assert!(buf.len() <= 3, "{buf:?}");

        let mut input: &[u8] = b"ab";
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 3).ok(),
            Some(BoundedLine::Line),
            "a last line without newline"
        );
        assert_eq!(buf, b"ab");
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 3).ok(),
            Some(BoundedLine::Eof)
        );
        assert!(buf.is_empty());

        // Chunks smaller than the line: it is put together across them.
        let mut small = std::io::BufReader::with_capacity(2, &b"abcdefg\nx"[..]);
        assert_eq!(
            read_line_bounded(&mut small, &mut buf, 7).ok(),
            Some(BoundedLine::Line)
        );
        assert_eq!(buf, b"abcdefg\n");
    }

    #[test]
    fn an_endless_line_is_an_error_naming_it_not_an_exhausted_memory() {
        let good = "{\"source_namespace\":\"a\",\"source_workload\":\"web\",\"destination_namespace\":\"b\",\"destination_workload\":\"db\",\"protocol\":\"tcp\",\"port\":5432,\"observed\":3,\"verdict\":\"allow\"}\n";
        // `/dev/zero` (4 MiB of it) after a good line: the reader must stop at the limit, not
        // at the end of the line.
        let input = Counting {
            inner: std::io::Read::chain(
                good.as_bytes(),
                std::io::Read::take(std::io::repeat(0), 4 << 20),
            ),
            read: 0,
        };
        let mut reader = std::io::BufReader::new(input);
        match parse_edges("zero".as_ref(), &mut reader) {
            Err(EdgeError::BadLine { line, reason, .. }) => {
                assert_eq!(line, 2);
                assert!(reason.contains("longer than 1048576 bytes"), "{reason}");
            }
            other => panic!("expected line 2 too long, got {other:?}"),
        }
        let read = reader.get_ref().read;
        assert!(
            read <= MAX_LINE_BYTES + good.len() + 64 * 1024,
            "read {read} bytes"
        );
    }

    #[test]
    fn prometheus_answers() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"source_namespace":"a","source_workload":"web","destination_namespace":"b","destination_workload":"db","protocol":"tcp","port":"5432"},"value":[1700000000.1,"11.4"]},
            {"metric":{"source_namespace":"","source_workload":"world","destination_namespace":"b","destination_workload":"db","protocol":"tcp"},"value":[1700000000.1,"2"]}]}}"#;
        let edges = parse_answer(body, Observed::Allow).unwrap_or_default();
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].port, Some(5432));
        assert_eq!(edges[0].observed, 12);
        assert_eq!(edges[1].port, None);
        let err = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(
            parse_answer(err, Observed::Deny)
                .err()
                .is_some_and(|e| e.contains("parse error"))
        );
        assert!(parse_answer(b"<html>", Observed::Deny).is_err());
        let bad_port = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"source_workload":"a","destination_workload":"b","port":"http"},"value":[1,"1"]}]}}"#;
        assert!(parse_answer(bad_port, Observed::Deny).is_err());
    }

    #[test]
    fn denied_edges_split_by_the_ports_the_daemon_named() {
        let ports = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"source_namespace":"a","source_workload":"web","destination_namespace":"b","destination_workload":"db","protocol":"tcp","port":"5432"},"value":[1,"1"]},
            {"metric":{"source_namespace":"a","source_workload":"web","destination_namespace":"b","destination_workload":"db","protocol":"tcp","port":"other"},"value":[1,"1"]}]}}"#;
        let ports = parse_denied_ports(ports).unwrap_or_default();
        let edge = |dst: &str, port: Option<u16>, verdict: Observed| Edge {
            source_namespace: "a".into(),
            source_workload: "web".into(),
            destination_namespace: "b".into(),
            destination_workload: dst.into(),
            protocol: "tcp".into(),
            port,
            observed: 9,
            verdict,
        };
        let split = split_denied_by_port(
            vec![
                edge("db", None, Observed::Deny),
                edge("db", Some(5432), Observed::Allow),
                edge("cache", None, Observed::Deny),
            ],
            &ports,
        );
        let got: Vec<(&str, Option<u16>, Observed, u64)> = split
            .iter()
            .map(|e| {
                (
                    e.destination_workload.as_str(),
                    e.port,
                    e.verdict,
                    e.observed,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("db", Some(5432), Observed::Deny, 9),
                ("db", None, Observed::Deny, 9),
                ("db", Some(5432), Observed::Allow, 9),
                ("cache", None, Observed::Deny, 9),
            ]
        );
        // The series limit folds ports into `__overflow__`: read as an unnamed port, not
        // an error.
        let overflow = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"source_workload":"a","destination_workload":"b","protocol":"tcp","port":"__overflow__"},"value":[1,"1"]}]}}"#;
        assert!(parse_answer(overflow, Observed::Allow).is_ok_and(|e| e[0].port.is_none()));
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(matches!(
            parse_base("https://p:9090"),
            Err(EdgeError::BadUrl { .. })
        ));
        assert!(parse_base("p:9090").is_err());
        assert!(parse_base("http://127.0.0.1:9090/prom/").is_ok());
        assert!(encode_query("a b{c=\"d\"}[7d]").contains("%20"));
    }

    #[test]
    fn unreachable_prometheus_is_an_error_not_a_hang() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let err = fetch_edges("http://127.0.0.1:1", "1h").err();
        assert!(matches!(err, Some(EdgeError::Query { .. })), "{err:?}");
    }
}
