//! Validation of inventory objects as the Kubernetes API server does it.
//!
//! An object the API server would refuse does not exist in a real cluster, so the inventory
//! leaves it out rather than guessing what it means (and before this, an invalid selector or
//! CIDR silently matched nothing, or a misspelt `policyTypes` entry silently isolated nothing).
//! Both inventory sources call these functions: the manifest loader (where invalid objects are
//! common: hand-written YAML) and the API-server path (where they should not happen, but a
//! newer or patched API server could let something through).
//!
//! The rules and their messages follow upstream, so that an operator sees the error
//! `kubectl apply` would print:
//! - `k8s.io/apimachinery/pkg/api/validate/content/kube.go` (label keys and values),
//!   `k8s.io/apimachinery/pkg/util/validation/validation.go` (DNS-1123 labels and subdomains,
//!   port numbers and port names, the wording of the messages);
//! - `k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go` (label selectors:
//!   operators, values, keys);
//! - `k8s.io/apimachinery/pkg/api/validation/objectmeta.go` (name, namespace, labels,
//!   annotations) and `.../api/validation/ip.go` (IPs and CIDRs of legacy fields);
//! - `k8s.io/kubernetes/pkg/apis/networking/validation/validation.go` (`ValidateNetworkPolicy`:
//!   ports, `endPort`, peers, `ipBlock`, `policyTypes`);
//! - `k8s.io/kubernetes/pkg/apis/core/validation/validation.go` (namespace names, container
//!   ports, pod IPs).
//!
//! Only what deny-observer reads is validated (a pod's volumes are none of its business).
//! IPs and CIDRs are validated as Kubernetes 1.33 does by default (the `StrictIPCIDRValidation`
//! gate is alpha and off): IPv4 octets with leading zeros are decimal, a CIDR may have bits set
//! beyond its prefix, and an IPv4-mapped IPv6 CIDR means the IPv4 block it maps (Go's
//! `net.IPNet` semantics, which CNIs written in Go inherit). [`parse_cidr`] is that parser; the
//! verdict engine uses it too, so validation and matching never disagree.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// Maximum length of a DNS-1123 label (namespace names, label name parts).
pub const DNS1123_LABEL_MAX: usize = 63;
/// Maximum length of a DNS-1123 subdomain (pod and policy names, label key prefixes).
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// Maximum length of a label value.
pub const LABEL_VALUE_MAX: usize = 63;
/// Maximum total size of an object's annotations (`TotalAnnotationSizeLimitB`).
pub const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;
/// Maximum length of a port name (IANA service name).
pub const PORT_NAME_MAX: usize = 15;

/// The category of a field error, as `field.ErrorType` words it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorType {
    /// A required field is missing.
    Required,
    /// A value is malformed or out of range.
    Invalid,
    /// A value is not one of an enumeration.
    NotSupported,
    /// A field may not be set in this context.
    Forbidden,
    /// A value appears twice where it must be unique.
    Duplicate,
    /// A value is too long.
    TooLong,
}

impl ErrorType {
    fn words(self) -> &'static str {
        match self {
            Self::Required => "Required value",
            Self::Invalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Forbidden => "Forbidden",
            Self::Duplicate => "Duplicate value",
            Self::TooLong => "Too long",
        }
    }
}

/// One problem with one field, displayed as the API server prints it:
/// `spec.policyTypes[0]: Unsupported value: "Ingres": supported values: "Ingress", "Egress"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    /// Category.
    pub kind: ErrorType,
    /// The offending value, already formatted (strings quoted), when the category shows one.
    pub value: Option<String>,
    /// Why it is wrong.
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.kind.words())?;
        if let Some(v) = &self.value {
            write!(f, ": {v}")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// Longest part of an invalid value or name a message repeats: enough to recognise it, where
/// a 1 MB label value made a 1 MB line of `audit`.
const SHOWN_CHARS: usize = 200;

/// `s` cut to [`SHOWN_CHARS`] characters, saying how much was left out.
fn shortened(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(SHOWN_CHARS) {
        None => s.into(),
        Some((at, _)) => format!("{}… ({} more bytes)", &s[..at], s.len() - at).into(),
    }
}

/// `s` for a message about an object: control characters escaped (a name from a hostile
/// manifest must not move the cursor or hide text on a terminal), and cut short.
pub fn printable(s: &str) -> String {
    let short = shortened(s);
    if !short.chars().any(char::is_control) {
        return short.into_owned();
    }
    short
        .chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn quote(s: &str) -> String {
    format!("{:?}", shortened(s))
}

fn required(field: &str, detail: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        kind: ErrorType::Required,
        value: None,
        detail: detail.to_owned(),
    }
}

fn invalid(field: &str, value: String, detail: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_owned(),
        kind: ErrorType::Invalid,
        value: Some(value),
        detail: detail.into(),
    }
}

fn forbidden(field: &str, detail: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        kind: ErrorType::Forbidden,
        value: None,
        detail: detail.to_owned(),
    }
}

fn not_supported(field: &str, value: &str, supported: &[&str]) -> FieldError {
    let list: Vec<String> = supported.iter().map(|s| quote(s)).collect();
    FieldError {
        field: field.to_owned(),
        kind: ErrorType::NotSupported,
        value: Some(quote(value)),
        detail: format!("supported values: {}", list.join(", ")),
    }
}

// ---- wording, from k8s.io/apimachinery/pkg/util/validation/validation.go ----

fn max_len_error(n: usize) -> String {
    format!("must be no more than {n} characters")
}

fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    if examples.is_empty() {
        return format!("{msg} (regex used for validation is '{fmt}')");
    }
    // Upstream appends "', " after each example and " or " between them, hence the double
    // space; kept so messages match `kubectl apply` byte for byte.
    let ex: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{msg} (e.g. {}regex used for validation is '{fmt}')",
        ex.join(" or ")
    )
}

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_LABEL_ERR: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const LABEL_KEY_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_KEY_ERR: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn matches_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    match (b.first(), b.last()) {
        (Some(&f), Some(&l)) => edge(f) && edge(l) && b.iter().all(|&c| edge(c) || c == b'-'),
        _ => false,
    }
}

fn matches_dns_subdomain(s: &str) -> bool {
    s.split('.').all(matches_dns_label)
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn matches_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => {
            f.is_ascii_alphanumeric()
                && l.is_ascii_alphanumeric()
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `IsDNS1123Label`: the messages for `value`, empty when valid.
pub fn is_dns1123_label(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        errs.push(max_len_error(DNS1123_LABEL_MAX));
    }
    if !matches_dns_label(value) {
        if matches_dns_subdomain(value) {
            errs.push("must not contain dots".to_owned());
        } else {
            errs.push(regex_error(
                DNS1123_LABEL_ERR,
                DNS1123_LABEL_FMT,
                &["my-name", "123-abc"],
            ));
        }
    }
    errs
}

/// `IsDNS1123Subdomain`: the messages for `value`, empty when valid.
pub fn is_dns1123_subdomain(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(max_len_error(DNS1123_SUBDOMAIN_MAX));
    }
    if !matches_dns_subdomain(value) {
        errs.push(regex_error(
            DNS1123_SUBDOMAIN_ERR,
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errs
}

/// `IsLabelKey` (a.k.a. `IsQualifiedName`): an optional DNS subdomain prefix and `/`, then a
/// name of at most 63 characters.
pub fn is_label_key(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_owned());
            } else {
                errs.extend(
                    is_dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            errs.push(format!(
                "a valid label key {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(LABEL_KEY_ERR, LABEL_KEY_FMT, &["MyName", "my.name", "123-abc"])
            ));
            return errs;
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_owned());
    } else if name.len() > DNS1123_LABEL_MAX {
        errs.push(format!("name part {}", max_len_error(DNS1123_LABEL_MAX)));
    }
    if !matches_label_name(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                LABEL_KEY_ERR,
                LABEL_KEY_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errs
}

/// `IsLabelValue`: empty, or a label name of at most 63 characters.
pub fn is_label_value(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > LABEL_VALUE_MAX {
        errs.push(max_len_error(LABEL_VALUE_MAX));
    }
    if !value.is_empty() && !matches_label_name(value) {
        errs.push(regex_error(
            LABEL_VALUE_ERR,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errs
}

/// `IsValidPortNum`: 1 to 65535.
pub fn is_valid_port_num(port: i64) -> Vec<String> {
    if (1..=65535).contains(&port) {
        Vec::new()
    } else {
        vec!["must be between 1 and 65535, inclusive".to_owned()]
    }
}

/// `IsValidPortName`: an IANA service name (at most 15 of `[-a-z0-9]`, at least one letter,
/// no leading, trailing or double hyphen).
pub fn is_valid_port_name(port: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if port.len() > PORT_NAME_MAX {
        errs.push(max_len_error(PORT_NAME_MAX));
    }
    if port.is_empty()
        || !port
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        errs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".into());
    }
    if !port.bytes().any(|c| c.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)".into());
    }
    if port.contains("--") {
        errs.push("must not contain consecutive hyphens".into());
    }
    if port.starts_with('-') || port.ends_with('-') {
        errs.push("must not begin or end with a hyphen".into());
    }
    errs
}

// ---- IPs and CIDRs (k8s.io/apimachinery/pkg/api/validation/ip.go, non-strict) ----

/// Parses an IPv4 address whose octets may carry leading zeros, which `netutils.ParseIPSloppy`
/// reads as decimal.
fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 10 || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *o = u8::try_from(part.parse::<u32>().ok()?).ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Parses an IP as the API server's legacy IP fields accept it (`ParseIPSloppy`); an
/// IPv4-mapped IPv6 address is the IPv4 address.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| parse_ipv4_sloppy(s).map(IpAddr::V4))
        .map(|ip| ip.to_canonical())
}

/// Parses a CIDR as the API server's legacy CIDR fields accept it (`ParseCIDRSloppy`), with
/// Go's `net.IPNet` meaning: bits beyond the prefix are dropped, and `::ffff:a.b.c.d/n` is
/// the IPv4 block `a.b.c.d/(n-96)` (all of IPv4 when `n < 96`).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let ip = addr
        .parse::<IpAddr>()
        .ok()
        .or_else(|| parse_ipv4_sloppy(addr).map(IpAddr::V4))?;
    let net = match ip {
        IpAddr::V6(v6) if len <= 128 => match v6.to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, len.saturating_sub(96)).ok()?),
            None => IpNet::new(ip, len).ok()?,
        },
        _ => IpNet::new(ip, len).ok()?,
    };
    Some(net.trunc())
}

const CIDR_ERR: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
const IP_ERR: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";

// ---- metadata (k8s.io/apimachinery/pkg/api/validation/objectmeta.go) ----

/// `ValidateLabels`: every key a label key, every value a label value.
pub fn labels(labels: &BTreeMap<String, String>, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (k, v) in labels {
        errs.extend(
            is_label_key(k)
                .into_iter()
                .map(|m| invalid(field, quote(k), m)),
        );
        errs.extend(
            is_label_value(v)
                .into_iter()
                .map(|m| invalid(field, quote(v), m)),
        );
    }
    errs
}

fn annotations(ann: &BTreeMap<String, String>, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut total = 0usize;
    for (k, v) in ann {
        errs.extend(
            is_label_key(&k.to_lowercase())
                .into_iter()
                .map(|m| invalid(field, quote(k), m)),
        );
        total = total.saturating_add(k.len()).saturating_add(v.len());
    }
    if total > ANNOTATIONS_MAX_BYTES {
        errs.push(FieldError {
            field: field.to_owned(),
            kind: ErrorType::TooLong,
            value: None,
            detail: format!("may not be more than {ANNOTATIONS_MAX_BYTES} bytes"),
        });
    }
    errs
}

/// How an object's name is checked.
#[derive(Copy, Clone)]
enum NameRule {
    Dns1123Label,
    Dns1123Subdomain,
}

fn object_meta(meta: &ObjectMeta, namespaced: bool, rule: NameRule) -> Vec<FieldError> {
    let mut errs = Vec::new();
    match meta.name.as_deref() {
        None | Some("") => errs.push(required(
            "metadata.name",
            "name or generateName is required",
        )),
        Some(name) => {
            let msgs = match rule {
                NameRule::Dns1123Label => is_dns1123_label(name),
                NameRule::Dns1123Subdomain => is_dns1123_subdomain(name),
            };
            errs.extend(
                msgs.into_iter()
                    .map(|m| invalid("metadata.name", quote(name), m)),
            );
        }
    }
    if namespaced {
        match meta.namespace.as_deref() {
            None | Some("") => errs.push(required("metadata.namespace", "")),
            Some(ns) => errs.extend(
                is_dns1123_label(ns)
                    .into_iter()
                    .map(|m| invalid("metadata.namespace", quote(ns), m)),
            ),
        }
    }
    // A namespace on a cluster-scoped object is cleared by the API server, not refused.
    if let Some(l) = &meta.labels {
        errs.extend(labels(l, "metadata.labels"));
    }
    if let Some(a) = &meta.annotations {
        errs.extend(annotations(a, "metadata.annotations"));
    }
    errs
}

// ---- label selectors (k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go) ----

/// `ValidateLabelSelector` (without `AllowInvalidLabelValueInSelector`): labels, operators,
/// values per operator, keys and values.
pub fn label_selector(sel: &LabelSelector, field: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(ml) = &sel.match_labels {
        errs.extend(labels(ml, &format!("{field}.matchLabels")));
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let path = format!("{field}.matchExpressions[{i}]");
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errs.push(required(
                &format!("{path}.values"),
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "In" | "NotIn" => {}
            "Exists" | "DoesNotExist" if !values.is_empty() => errs.push(forbidden(
                &format!("{path}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            "Exists" | "DoesNotExist" => {}
            other => errs.push(invalid(
                &format!("{path}.operator"),
                quote(other),
                "not a valid selector operator",
            )),
        }
        errs.extend(
            is_label_key(&req.key)
                .into_iter()
                .map(|m| invalid(&format!("{path}.key"), quote(&req.key), m)),
        );
        for (j, v) in values.iter().enumerate() {
            errs.extend(
                is_label_value(v)
                    .into_iter()
                    .map(|m| invalid(&format!("{path}.values[{j}]"), quote(v), m)),
            );
        }
    }
    errs
}

// ---- NetworkPolicy (k8s.io/kubernetes/pkg/apis/networking/validation/validation.go) ----

const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// `ValidateNetworkPolicyPort`.
fn policy_port(port: &NetworkPolicyPort, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(p) = port.protocol.as_deref()
        && !PROTOCOLS.contains(&p)
    {
        errs.push(not_supported(&format!("{path}.protocol"), p, &PROTOCOLS));
    }
    let end_path = format!("{path}.endPort");
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(n)), end) => {
            errs.extend(
                is_valid_port_num(i64::from(*n))
                    .into_iter()
                    .map(|m| invalid(&format!("{path}.port"), n.to_string(), m)),
            );
            if let Some(end) = end {
                if end < *n {
                    errs.push(invalid(
                        &end_path,
                        end.to_string(),
                        "must be greater than or equal to `port`",
                    ));
                }
                errs.extend(
                    is_valid_port_num(i64::from(end))
                        .into_iter()
                        .map(|m| invalid(&end_path, end.to_string(), m)),
                );
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if let Some(end) = end {
                errs.push(invalid(
                    &end_path,
                    end.to_string(),
                    "may not be specified when `port` is non-numeric",
                ));
            }
            errs.extend(
                is_valid_port_name(name)
                    .into_iter()
                    .map(|m| invalid(&format!("{path}.port"), quote(name), m)),
            );
        }
        (None, Some(end)) => errs.push(invalid(
            &end_path,
            end.to_string(),
            "may not be specified when `port` is not specified",
        )),
        (None, None) => {}
    }
    errs
}

/// `ValidateIPBlock`, with the legacy (non-strict) CIDR parsing.
fn ip_block(block: &IPBlock, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let cidr_path = format!("{path}.cidr");
    if block.cidr.is_empty() {
        errs.push(required(&cidr_path, ""));
        return errs;
    }
    let Some(cidr) = parse_cidr(&block.cidr) else {
        errs.push(invalid(&cidr_path, quote(&block.cidr), CIDR_ERR));
        return errs;
    };
    for (i, e) in block.except.iter().flatten().enumerate() {
        let except_path = format!("{path}.except[{i}]");
        let Some(except) = parse_cidr(e) else {
            errs.push(invalid(&except_path, quote(e), CIDR_ERR));
            continue;
        };
        if !cidr.contains(&except.network()) || cidr.prefix_len() >= except.prefix_len() {
            errs.push(invalid(
                &except_path,
                quote(e),
                "must be a strict subset of `cidr`",
            ));
        }
    }
    errs
}

/// `ValidateNetworkPolicyPeer`.
fn policy_peer(peer: &NetworkPolicyPeer, path: &str) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut n = 0;
    if let Some(s) = &peer.pod_selector {
        n += 1;
        errs.extend(label_selector(s, &format!("{path}.podSelector")));
    }
    if let Some(s) = &peer.namespace_selector {
        n += 1;
        errs.extend(label_selector(s, &format!("{path}.namespaceSelector")));
    }
    if let Some(b) = &peer.ip_block {
        n += 1;
        errs.extend(ip_block(b, &format!("{path}.ipBlock")));
    }
    if n == 0 {
        errs.push(required(path, "must specify a peer"));
    } else if n > 1 && peer.ip_block.is_some() {
        errs.push(forbidden(
            path,
            "may not specify both ipBlock and another peer",
        ));
    }
    errs
}

/// `ValidateNetworkPolicy`: metadata, pod selector, every rule's ports and peers, and
/// `policyTypes`.
pub fn network_policy(np: &NetworkPolicy) -> Vec<FieldError> {
    let mut errs = object_meta(&np.metadata, true, NameRule::Dns1123Subdomain);
    let Some(spec) = &np.spec else {
        return errs;
    };
    if let Some(sel) = &spec.pod_selector {
        errs.extend(label_selector(sel, "spec.podSelector"));
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            errs.extend(policy_port(port, &format!("spec.ingress[{i}].ports[{j}]")));
        }
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            errs.extend(policy_peer(peer, &format!("spec.ingress[{i}].from[{j}]")));
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            errs.extend(policy_port(port, &format!("spec.egress[{i}].ports[{j}]")));
        }
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            errs.extend(policy_peer(peer, &format!("spec.egress[{i}].to[{j}]")));
        }
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    if types.len() > 2 {
        errs.push(invalid(
            "spec.policyTypes",
            format!("{types:?}"),
            "may not specify more than two policyTypes",
        ));
        return errs;
    }
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            errs.push(not_supported(
                &format!("spec.policyTypes[{i}]"),
                t,
                &["Ingress", "Egress"],
            ));
        }
    }
    errs
}

// ---- Namespace and Pod (k8s.io/kubernetes/pkg/apis/core/validation/validation.go) ----

/// `ValidateNamespace`: the name is a DNS-1123 label; labels and annotations.
pub fn namespace(ns: &core::Namespace) -> Vec<FieldError> {
    object_meta(&ns.metadata, false, NameRule::Dns1123Label)
}

/// How a pod's container ports are laid out.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PodLayout {
    /// As written: port names must be unique within each container.
    AsWritten,
    /// Trimmed by [`trim_pod`](super::kube::trim_pod), which merges every container's ports
    /// into one: per-container uniqueness of port names can no longer be checked.
    Trimmed,
}

/// What `ValidatePod` checks of the fields deny-observer reads: metadata, container ports
/// (`validateContainerPorts`) and the pod IPs in the status (`validatePodIPs`).
pub fn pod(pod: &core::Pod, layout: PodLayout) -> Vec<FieldError> {
    let mut errs = object_meta(&pod.metadata, true, NameRule::Dns1123Subdomain);
    if let Some(spec) = &pod.spec {
        let groups = [
            ("spec.initContainers", spec.init_containers.as_deref()),
            ("spec.containers", Some(spec.containers.as_slice())),
        ];
        for (group, containers) in groups {
            for (i, c) in containers.into_iter().flatten().enumerate() {
                let mut names = HashSet::new();
                for (j, p) in c.ports.iter().flatten().enumerate() {
                    let path = format!("{group}[{i}].ports[{j}]");
                    if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                        let msgs = is_valid_port_name(name);
                        if !msgs.is_empty() {
                            errs.extend(
                                msgs.into_iter()
                                    .map(|m| invalid(&format!("{path}.name"), quote(name), m)),
                            );
                        } else if !names.insert(name) && layout == PodLayout::AsWritten {
                            errs.push(FieldError {
                                field: format!("{path}.name"),
                                kind: ErrorType::Duplicate,
                                value: Some(quote(name)),
                                detail: String::new(),
                            });
                        }
                    }
                    if p.container_port == 0 {
                        errs.push(required(&format!("{path}.containerPort"), ""));
                    } else {
                        errs.extend(
                            is_valid_port_num(i64::from(p.container_port))
                                .into_iter()
                                .map(|m| {
                                    invalid(
                                        &format!("{path}.containerPort"),
                                        p.container_port.to_string(),
                                        m,
                                    )
                                }),
                        );
                    }
                    // An absent protocol is defaulted to TCP before validation.
                    if let Some(proto) = p.protocol.as_deref().filter(|s| !s.is_empty())
                        && !PROTOCOLS.contains(&proto)
                    {
                        errs.push(not_supported(
                            &format!("{path}.protocol"),
                            proto,
                            &PROTOCOLS,
                        ));
                    }
                }
            }
        }
    }
    if let Some(status) = &pod.status {
        let ips = status.pod_ips.as_deref().unwrap_or_default();
        let mut families = Vec::new();
        for (i, p) in ips.iter().enumerate() {
            match parse_ip(&p.ip) {
                Some(ip) => families.push(ip.is_ipv4()),
                None => errs.push(invalid(
                    &format!("status.podIPs[{i}]"),
                    quote(&p.ip),
                    IP_ERR,
                )),
            }
        }
        if ips.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
            let list: Vec<&str> = ips.iter().map(|p| p.ip.as_str()).collect();
            errs.push(invalid(
                "status.podIPs",
                format!("{list:?}"),
                "may specify no more than one IP for each IP family",
            ));
        }
        // `podIP` is `podIPs[0]` in the API's internal form; on its own it is checked here.
        if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty())
            && ips.is_empty()
            && parse_ip(ip).is_none()
        {
            errs.push(invalid("status.podIP", quote(ip), IP_ERR));
        }
    }
    errs
}

/// An object the inventory left out because the API server would refuse it (or because it
/// could not be read as its kind at all).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct InvalidObject {
    /// `Namespace`, `Pod`, `NetworkPolicy`, `ReplicaSet` or `Job`.
    pub kind: String,
    /// `metadata.namespace` (the default one for a namespaced object without it), `null`
    /// for Namespaces.
    pub namespace: Option<String>,
    /// `metadata.name`, when present.
    pub name: Option<String>,
    /// Where it came from: `<file>: document N [item M]` for manifests, `null` from the API
    /// server.
    pub source: Option<String>,
    /// The problems, one per field, as the API server words them.
    pub errors: Vec<String>,
}

impl InvalidObject {
    /// The `kind` label of `deny_observer_inventory_invalid_objects`: the lower-case plural
    /// resource name (`networkpolicies`), as in `deny_observer_inventory_objects`.
    pub fn metric_kind(&self) -> String {
        resource_name(&self.kind)
    }

    /// `ns/name` (or `name`, or `<no name>`).
    pub fn id(&self) -> String {
        let name = self
            .name
            .as_deref()
            .map_or_else(|| "<no name>".to_owned(), printable);
        match &self.namespace {
            Some(ns) => format!("{}/{name}", printable(ns)),
            None => name,
        }
    }
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(src) = &self.source {
            write!(f, "{src}: ")?;
        }
        write!(
            f,
            "{} {}: {}",
            printable(&self.kind),
            self.id(),
            self.errors.join("; ")
        )
    }
}

/// The lower-case plural resource name of a kind (`NetworkPolicy` → `networkpolicies`).
pub fn resource_name(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with('y') {
        format!("{}ies", &lower[..lower.len() - 1])
    } else {
        format!("{lower}s")
    }
}

/// The kinds whose invalid objects are always exported (0 when there are none), so an alert
/// on the gauge has a series to look at.
pub const METRIC_KINDS: [&str; 3] = ["namespaces", "pods", "networkpolicies"];

/// Invalid objects per `kind` label, with every kind of [`METRIC_KINDS`] present.
pub fn counts_by_kind(invalid: &[InvalidObject]) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> =
        METRIC_KINDS.iter().map(|k| ((*k).to_owned(), 0)).collect();
    for o in invalid {
        *out.entry(o.metric_kind()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests;
