//! Scraping `/metrics` and reading the Prometheus text format, for the demo and the e2e tests.
//!
//! A tiny HTTP/1.1 client over `TcpStream` is enough: the daemon only ever listens on loopback
//! here, and it keeps the tests free of an HTTP client stack.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Failure to fetch or read an HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Connecting, writing or reading failed.
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The response could not be understood.
    #[error("GET http://{addr}{path}: bad response: {reason}")]
    BadResponse {
        /// Address.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Status code and body of a GET.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: String,
}

/// GETs `path` from `addr` (HTTP/1.1, `Connection: close`), with a 5 s timeout per operation.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Response, ScrapeError> {
    let io = |source| ScrapeError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let bad = |reason: String| ScrapeError::BadResponse {
        addr,
        path: path.to_owned(),
        reason,
    };
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers".to_owned()))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line in {head:?}")))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked encoding".to_owned()))?
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        s = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`, ... suffixes as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// True when every `(name, value)` in `want` is a label of this sample with that value.
    pub fn matches(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus text format. Comment and malformed lines are skipped: this reader
    /// is for assertions on a known exporter, and promtool checks the format elsewhere.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// Samples named `name` that carry all labels in `want`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.matches(want))
    }

    /// Sum of the samples named `name` that carry all labels in `want` (0 when none).
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.select(name, want).map(|s| s.value).sum()
    }
}

/// Scrapes `http://addr/metrics` and parses it.
pub fn scrape(addr: SocketAddr) -> Result<Metrics, ScrapeError> {
    let resp = http_get(addr, "/metrics")?;
    if resp.status != 200 {
        return Err(ScrapeError::BadResponse {
            addr,
            path: "/metrics".to_owned(),
            reason: format!("status {}", resp.status),
        });
    }
    Ok(Metrics::parse(&resp.body))
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once('=')?;
            let r = r.strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            rest = &r[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_values() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE a counter\na_total{reason=\"netfilter_drop\",w=\"q\\\"x\\\\\"} 7\n\
             b 1.5e3\nc{} +Inf 123\n",
        );
        assert_eq!(m.samples.len(), 3);
        assert_eq!(m.samples[0].labels["w"], "q\"x\\");
        assert_eq!(m.sum("a_total", &[("reason", "netfilter_drop")]), 7.0);
        assert_eq!(m.sum("a_total", &[("reason", "no_socket")]), 0.0);
        assert_eq!(m.sum("b", &[]), 1500.0);
        assert!(m.sum("c", &[]).is_infinite());
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n").as_deref(),
            Some("Wikipedia")
        );
        assert_eq!(dechunk("zz\r\n"), None);
    }
}
