//! Which denies are expected (counted with `expected="true"`, never paging).
//!
//! A deny is expected when either:
//! - **any** isolating policy of the deciding direction carries the annotation
//!   `deny-observer.io/expected-denies: "true"` (value compared case-insensitively, surrounding
//!   blanks ignored). The isolating policies of a direction deny together (a packet is denied
//!   only when none of them allows it), so each of them is responsible for the deny; the owner
//!   of any one saying "denies here are expected" is enough. Requiring all of them would force
//!   annotating a namespace's default-deny, which would silence everything behind it.
//! - or the edge matches a configured `--expected-edge` pattern.
//!
//! Pattern syntax: `SRC_NS/SRC_WORKLOAD->DST_NS/DST_WORKLOAD[:PROTO[/PORT]]`, where any of the
//! four names may be `*`. Without `:PROTO` any protocol and port match; with `:PROTO` only
//! that protocol; with `/PORT` only that port. Patterns ignore the direction.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::AlertError;
use super::edges::DeniedEdge;
use crate::flow::Protocol;

/// The NetworkPolicy annotation that marks its denies as expected.
pub const EXPECTED_DENIES_ANNOTATION: &str = "deny-observer.io/expected-denies";

/// One side of an [`ExpectedEdge`]; `None` is the `*` wildcard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPattern {
    /// Namespace, or any.
    pub namespace: Option<String>,
    /// Workload, or any.
    pub workload: Option<String>,
}

impl EndpointPattern {
    fn matches(&self, namespace: &str, workload: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.workload.as_deref().is_none_or(|w| w == workload)
    }
}

/// A configured expected edge (`--expected-edge`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedEdge {
    /// Source side.
    pub source: EndpointPattern,
    /// Destination side.
    pub destination: EndpointPattern,
    /// Protocol, or any.
    pub protocol: Option<Protocol>,
    /// Port, or any.
    pub port: Option<u16>,
}

impl ExpectedEdge {
    /// True when `edge` matches this pattern.
    pub fn matches(&self, edge: &DeniedEdge) -> bool {
        self.source
            .matches(&edge.source_namespace, &edge.source_workload)
            && self
                .destination
                .matches(&edge.destination_namespace, &edge.destination_workload)
            && self.protocol.is_none_or(|p| p == edge.protocol)
            && self.port.is_none_or(|p| p == edge.port)
    }
}

fn parse_endpoint(whole: &str, part: &str) -> Result<EndpointPattern, AlertError> {
    let bad = |reason: &str| AlertError::InvalidExpectedEdge {
        value: whole.to_owned(),
        reason: reason.to_owned(),
    };
    let (ns, wl) = part
        .split_once('/')
        .ok_or_else(|| bad("each side must be NAMESPACE/WORKLOAD"))?;
    let name = |s: &str| -> Result<Option<String>, AlertError> {
        let s = s.trim();
        if s.is_empty() || s.contains(['/', ':', ' ']) {
            return Err(bad(
                "names must be non-empty and free of '/', ':' and spaces",
            ));
        }
        Ok((s != "*").then(|| s.to_owned()))
    };
    Ok(EndpointPattern {
        namespace: name(ns)?,
        workload: name(wl)?,
    })
}

impl FromStr for ExpectedEdge {
    type Err = AlertError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| AlertError::InvalidExpectedEdge {
            value: text.to_owned(),
            reason,
        };
        let (src, rest) = text.split_once("->").ok_or_else(|| {
            bad("expected SRC_NS/SRC_WORKLOAD->DST_NS/DST_WORKLOAD[:PROTO[/PORT]]".into())
        })?;
        let (dst, proto_port) = match rest.split_once(':') {
            Some((d, pp)) => (d, Some(pp)),
            None => (rest, None),
        };
        let source = parse_endpoint(text, src)?;
        let destination = parse_endpoint(text, dst)?;
        let (protocol, port) = match proto_port {
            None => (None, None),
            Some(pp) => {
                let (proto, port) = match pp.split_once('/') {
                    Some((p, n)) => (p, Some(n)),
                    None => (pp, None),
                };
                let protocol: Protocol = proto.trim().parse().map_err(|e| bad(format!("{e}")))?;
                let port = port
                    .map(|n| {
                        n.trim().parse::<u16>().map_err(|_| {
                            bad(format!("port {n:?} is not a number between 0 and 65535"))
                        })
                    })
                    .transpose()?;
                (Some(protocol), port)
            }
        };
        Ok(Self {
            source,
            destination,
            protocol,
            port,
        })
    }
}

impl fmt::Display for ExpectedEdge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |o: &Option<String>| o.clone().unwrap_or_else(|| "*".into());
        write!(
            f,
            "{}/{}->{}/{}",
            s(&self.source.namespace),
            s(&self.source.workload),
            s(&self.destination.namespace),
            s(&self.destination.workload)
        )?;
        if let Some(p) = self.protocol {
            write!(f, ":{p}")?;
            if let Some(port) = self.port {
                write!(f, "/{port}")?;
            }
        }
        Ok(())
    }
}

/// True when `policy` carries `deny-observer.io/expected-denies: "true"`.
pub fn policy_marks_expected(policy: &NetworkPolicy) -> bool {
    policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPECTED_DENIES_ANNOTATION))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// The expected-deny rules in force: annotated policies plus configured edges.
#[derive(Clone, Debug, Default)]
pub struct ExpectedDenies {
    /// Names of annotated policies by namespace: looked up per denied edge and drain with
    /// borrowed names, so without allocating.
    annotated: HashMap<String, HashSet<String>>,
    edges: Vec<ExpectedEdge>,
}

impl ExpectedDenies {
    /// Rules from configured edges; add policies with [`ExpectedDenies::set_policies`].
    pub fn new(edges: Vec<ExpectedEdge>) -> Self {
        Self {
            annotated: HashMap::new(),
            edges,
        }
    }

    /// Replaces the annotated-policy set from the current policies (call on inventory change).
    pub fn set_policies<'a>(&mut self, policies: impl IntoIterator<Item = &'a NetworkPolicy>) {
        self.annotated.clear();
        for p in policies.into_iter().filter(|p| policy_marks_expected(p)) {
            self.annotated
                .entry(p.metadata.namespace.clone().unwrap_or_default())
                .or_default()
                .insert(p.metadata.name.clone().unwrap_or_default());
        }
    }

    /// True when the policy `namespace/name` is annotated as expected.
    pub fn is_policy_annotated(&self, namespace: &str, name: &str) -> bool {
        self.annotated
            .get(namespace)
            .is_some_and(|names| names.contains(name))
    }

    /// Whether a deny of `edge` is expected. `isolating_policies` are the `(namespace, name)`
    /// of the policies that isolate the deciding direction (the ones that denied).
    pub fn is_expected<'p>(
        &self,
        edge: &DeniedEdge,
        isolating_policies: impl IntoIterator<Item = (&'p str, &'p str)>,
    ) -> bool {
        self.edges.iter().any(|e| e.matches(edge))
            || !self.annotated.is_empty()
                && isolating_policies
                    .into_iter()
                    .any(|(ns, name)| self.is_policy_annotated(ns, name))
    }

    /// The configured edge patterns.
    pub fn edges(&self) -> &[ExpectedEdge] {
        &self.edges
    }

    /// Number of annotated policies known.
    pub fn annotated_policies(&self) -> usize {
        self.annotated.values().map(HashSet::len).sum()
    }
}
