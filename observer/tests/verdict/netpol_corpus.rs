//! Runs the NetworkPolicy corpus in `tests/fixtures/netpol/`: cases translated from the
//! upstream Kubernetes e2e suite (`test/e2e/network/netpol/network_policy.go`) and from
//! well-known policy recipes. Every case records its source; the expectations are upstream's
//! reachability matrices, written the way upstream writes them (`ExpectPeer`,
//! `ExpectAllIngress`, `ExpectAllEgress`, `Expect`) on top of a default.
//!
//! As upstream does (`ignoreLoopback = true`), a pod talking to itself is not probed.
//! Every case runs twice, once with IPv4 pod addresses and once with IPv6, unless it pins
//! `families`. `{{host x/b}}` in a fixture is x/b's address as a /32 (/128), and
//! `{{large x/b}}` the /4 that contains it (upstream's `makeLargeCIDRForIP`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use observer::flow::{IpFamily, Protocol};
use observer::inventory::{ContainerPort, Inventory, Labels, Namespace, Pod, PodPhase, Workload};
use observer::verdict::{Engine, FlowQuery, Peer};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// Upstream file (or recipe URL) the case comes from.
    source: String,
    /// Upstream test name.
    test: String,
    /// Namespaces and their labels; default: upstream's x, y, z.
    #[serde(default)]
    namespaces: Option<BTreeMap<String, Labels>>,
    /// Pods: `ns/name` strings (upstream model pods, label pod=<name>) or full entries.
    pods: Vec<PodEntry>,
    /// Protocols each model pod serves (container ports `serve-<port>-<proto>`).
    #[serde(default = "default_protocols")]
    protocols: Vec<Protocol>,
    /// Ports each model pod serves.
    #[serde(default = "default_ports")]
    ports: Vec<u16>,
    /// Address families to run; default both.
    #[serde(default = "default_families")]
    families: Vec<String>,
    stages: Vec<Stage>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}
fn default_ports() -> Vec<u16> {
    vec![80]
}
fn default_families() -> Vec<String> {
    vec!["v4".into(), "v6".into()]
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PodEntry {
    Model(String),
    Custom {
        id: String,
        #[serde(default)]
        labels: Labels,
        #[serde(default)]
        ports: Vec<PortEntry>,
        #[serde(default)]
        host_network: bool,
    },
}

#[derive(Debug, Deserialize)]
struct PortEntry {
    name: Option<String>,
    port: u16,
    #[serde(default = "tcp")]
    protocol: Protocol,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    #[serde(default)]
    note: Option<String>,
    /// Labels added to namespaces at this stage (upstream `AddNamespaceLabel`).
    #[serde(default)]
    namespace_labels: BTreeMap<String, Labels>,
    /// Labels added to pods at this stage (upstream `AddPodLabels`).
    #[serde(default)]
    pod_labels: BTreeMap<String, Labels>,
    /// The complete set of policies existing at this stage.
    #[serde(default)]
    policies: Vec<serde_yaml::Value>,
    probes: Vec<Probe>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    port: u16,
    #[serde(default = "tcp")]
    protocol: Protocol,
    /// Default expectation for every pod pair (upstream `NewReachability(..., true)`); when
    /// absent only the listed expectations are probed.
    #[serde(default)]
    default: Option<bool>,
    #[serde(default)]
    expect: Vec<Expect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSpec {
    #[serde(default)]
    ns: Option<String>,
    #[serde(default)]
    pod: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerPair {
    #[serde(default)]
    from: PeerSpec,
    #[serde(default)]
    to: PeerSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `ExpectPeer(from, to, allowed)`.
    #[serde(default)]
    peer: Option<PeerPair>,
    /// `ExpectAllIngress(pod, allowed)`.
    #[serde(default)]
    all_ingress: Option<String>,
    /// `ExpectAllEgress(pod, allowed)`.
    #[serde(default)]
    all_egress: Option<String>,
    /// `Expect(from, to, allowed)`; either end may also be an IP address outside the pods.
    #[serde(default)]
    pair: Option<(String, String)>,
    allowed: bool,
}

impl PeerSpec {
    fn matches(&self, pod: &str) -> bool {
        let (ns, name) = pod.split_once('/').unwrap();
        self.ns.as_deref().is_none_or(|n| n == ns) && self.pod.as_deref().is_none_or(|p| p == name)
    }
}

fn addr(family: &str, index: usize) -> IpAddr {
    let i = index + 1;
    match family {
        "v4" => format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
        "v6" => format!("fd00::{i:x}").parse().unwrap(),
        other => panic!("unknown family {other}"),
    }
}

fn pod_ids(case: &Case) -> Vec<String> {
    case.pods
        .iter()
        .map(|p| match p {
            PodEntry::Model(id) => id.clone(),
            PodEntry::Custom { id, .. } => id.clone(),
        })
        .collect()
}

/// Replaces `{{host ns/pod}}` and `{{large ns/pod}}` with addresses of `family`.
fn substitute(text: &str, ids: &[String], family: &str) -> String {
    let mut out = text.to_owned();
    for (i, id) in ids.iter().enumerate() {
        let ip = addr(family, i);
        let host = IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).unwrap();
        let large = IpNet::new(ip, 4).unwrap().trunc();
        out = out.replace(&format!("{{{{host {id}}}}}"), &host.to_string());
        out = out.replace(&format!("{{{{large {id}}}}}"), &large.to_string());
    }
    out
}

fn build_inventory(case: &Case, stage: &Stage, family: &str) -> Inventory {
    let mut namespaces: BTreeMap<String, Namespace> = BTreeMap::new();
    let ns_source = case.namespaces.clone().unwrap_or_else(|| {
        ["x", "y", "z"]
            .iter()
            .map(|n| {
                // Upstream's model labels each namespace ns=<name>; the API server adds
                // kubernetes.io/metadata.name (added below for every namespace).
                (
                    (*n).to_owned(),
                    Labels::from([("ns".to_owned(), (*n).to_owned())]),
                )
            })
            .collect()
    });
    for (name, labels) in ns_source {
        let mut labels = labels.clone();
        labels.insert("kubernetes.io/metadata.name", &name);
        if let Some(extra) = stage.namespace_labels.get(&name) {
            labels.extend(extra.iter());
        }
        namespaces.insert(name.clone(), Namespace { name, labels });
    }
    let mut pods = Vec::new();
    for (i, entry) in case.pods.iter().enumerate() {
        let (id, mut labels, ports, host_network) = match entry {
            PodEntry::Model(id) => {
                let name = id.split_once('/').unwrap().1.to_owned();
                let mut ports = Vec::new();
                for port in &case.ports {
                    for proto in &case.protocols {
                        ports.push(ContainerPort {
                            name: Some(format!("serve-{port}-{}", proto.label())),
                            port: *port,
                            protocol: *proto,
                        });
                    }
                }
                (
                    id.clone(),
                    Labels::from([("pod".to_owned(), name)]),
                    ports,
                    false,
                )
            }
            PodEntry::Custom {
                id,
                labels,
                ports,
                host_network,
            } => (
                id.clone(),
                labels.clone(),
                ports
                    .iter()
                    .map(|p| ContainerPort {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol,
                    })
                    .collect(),
                *host_network,
            ),
        };
        if let Some(extra) = stage.pod_labels.get(&id) {
            labels.extend(extra.iter());
        }
        let (namespace, name) = id.split_once('/').unwrap();
        pods.push(Arc::new(Pod {
            namespace: namespace.into(),
            name: name.into(),
            labels,
            ips: vec![addr(family, i)],
            host_network,
            node_name: None,
            phase: PodPhase::Running,
            uid: None,
            created_unix: 0,
            ports,
            workload: Workload {
                kind: "Pod".into(),
                name: name.into(),
            },
        }));
    }
    let ids = pod_ids(case);
    let policies = stage
        .policies
        .iter()
        .map(|v| {
            let text = substitute(&serde_yaml::to_string(v).unwrap(), &ids, family);
            Arc::new(serde_yaml::from_str::<NetworkPolicy>(&text).unwrap())
        })
        .collect();
    Inventory {
        namespaces,
        pods,
        policies,
        ..Inventory::default()
    }
}

/// Expected matrix of one probe: (from, to) → allowed.
fn expected(case: &Case, probe: &Probe) -> BTreeMap<(String, String), bool> {
    let ids = pod_ids(case);
    let mut m = BTreeMap::new();
    if let Some(d) = probe.default {
        for f in &ids {
            for t in &ids {
                m.insert((f.clone(), t.clone()), d);
            }
        }
    }
    for e in &probe.expect {
        let set = [
            e.peer.is_some(),
            e.all_ingress.is_some(),
            e.all_egress.is_some(),
            e.pair.is_some(),
        ];
        assert_eq!(
            set.iter().filter(|s| **s).count(),
            1,
            "one operation per expectation: {e:?}"
        );
        if let Some(p) = &e.peer {
            for f in ids.iter().filter(|f| p.from.matches(f)) {
                for t in ids.iter().filter(|t| p.to.matches(t)) {
                    m.insert((f.clone(), t.clone()), e.allowed);
                }
            }
        }
        if let Some(to) = &e.all_ingress {
            assert!(ids.contains(to), "unknown pod {to}");
            for f in &ids {
                m.insert((f.clone(), to.clone()), e.allowed);
            }
        }
        if let Some(from) = &e.all_egress {
            assert!(ids.contains(from), "unknown pod {from}");
            for t in &ids {
                m.insert((from.clone(), t.clone()), e.allowed);
            }
        }
        if let Some((f, t)) = &e.pair {
            m.insert((f.clone(), t.clone()), e.allowed);
        }
    }
    // Upstream ignores loopback.
    m.retain(|(f, t), _| f != t);
    m
}

fn endpoint(engine: &Engine, s: &str) -> Peer {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Peer::External(ip);
    }
    let (ns, name) = s.split_once('/').unwrap();
    Peer::Pod(Arc::clone(
        engine
            .find_pod(ns, name)
            .unwrap_or_else(|| panic!("unknown pod {s}")),
    ))
}

fn run_file(path: &Path) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut cases = 0;
    let mut probes = 0;
    let mut failures = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let case =
            Case::deserialize(doc).unwrap_or_else(|e| panic!("{}: bad case: {e}", path.display()));
        cases += 1;
        for family in &case.families {
            for (si, stage) in case.stages.iter().enumerate() {
                let engine = Engine::new(Arc::new(build_inventory(&case, stage, family)));
                assert!(
                    engine.warnings().is_empty(),
                    "{}: {:?}",
                    case.test,
                    engine.warnings()
                );
                for probe in &stage.probes {
                    let matrix = expected(&case, probe);
                    assert!(!matrix.is_empty(), "{}: empty probe", case.test);
                    for ((from, to), want) in matrix {
                        probes += 1;
                        let v = engine.evaluate(&FlowQuery {
                            src: endpoint(&engine, &from),
                            dst: endpoint(&engine, &to),
                            protocol: probe.protocol,
                            port: probe.port,
                            family: Some(if family == "v6" {
                                IpFamily::V6
                            } else {
                                IpFamily::V4
                            }),
                            own_node: false,
                            src_remote: false,
                        });
                        if v.allowed != want {
                            failures.push(format!(
                                "{} [{}] {:?} stage {} ({}) {from} -> {to} {}/{}: want {}, got {} (egress {:?}, ingress {:?})",
                                path.file_name().unwrap().to_string_lossy(),
                                family,
                                case.test,
                                si + 1,
                                stage.note.as_deref().unwrap_or("-"),
                                probe.protocol,
                                probe.port,
                                if want { "allow" } else { "deny" },
                                v,
                                v.egress,
                                v.ingress,
                            ));
                        }
                    }
                }
            }
        }
        assert!(!case.source.is_empty());
    }
    (cases, probes, failures)
}

fn run_dir(dir: &str, min_cases: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/netpol")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let (mut cases, mut probes, mut failures) = (0, 0, Vec::new());
    for f in &files {
        let (c, p, fl) = run_file(f);
        cases += c;
        probes += p;
        failures.extend(fl);
    }
    eprintln!("{}: {cases} cases, {probes} probes", dir.display());
    assert!(
        cases >= min_cases,
        "only {cases} cases in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} failing probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn upstream_e2e_corpus() {
    run_dir("upstream", 45);
}

#[test]
fn recipes_corpus() {
    run_dir("recipes", 8);
}

#[test]
fn harness_detects_a_wrong_expectation() {
    // Guard against a harness that cannot fail: a deliberately wrong matrix must be reported.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.yaml");
    std::fs::write(
        &path,
        "source: self\ntest: wrong on purpose\npods: [x/a, y/a]\nstages:\n- policies:\n  - metadata: {name: deny, namespace: x}\n    spec: {podSelector: {}, policyTypes: [Ingress]}\n  probes:\n  - {port: 80, default: true}\n",
    )
    .unwrap();
    let (cases, probes, failures) = run_file(&path);
    assert_eq!(cases, 1);
    assert_eq!(probes, 4, "2 pairs x 2 families");
    assert_eq!(
        failures.len(),
        2,
        "y/a -> x/a is denied in both families: {failures:?}"
    );
}
