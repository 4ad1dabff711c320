//! Conversion of Kubernetes API objects into the trimmed inventory model.
//!
//! Both inventory sources (manifest directory, API server reflectors) go through these
//! functions, so a pod means the same thing whichever way it arrived.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{
    ContainerPort, Labels, Namespace, Pod, PodPhase, Service, ServicePort, TargetPort,
};
use super::workload::{self, OwnerIndex};
use crate::flow::Protocol;

/// Label the API server puts on every namespace (Kubernetes ≥ 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Prefix of the annotations deny-observer reads from NetworkPolicies; all others are dropped.
pub const ANNOTATION_PREFIX: &str = "deny-observer.io/";

/// Why an object could not be converted. Messages name the object.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConvertError {
    /// `metadata.name` is missing or empty.
    #[error("{kind} has no metadata.name")]
    MissingName {
        /// Object kind.
        kind: &'static str,
    },
    /// `metadata.namespace` is missing or empty.
    #[error("{kind} {name:?} has no metadata.namespace")]
    MissingNamespace {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// An address in `status.podIP`/`podIPs` does not parse.
    #[error("Pod {namespace}/{name}: status pod IP {ip:?} is not an IP address")]
    BadPodIp {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The offending text.
        ip: String,
    },
    /// A container port is outside 1..=65535.
    #[error(
        "Pod {namespace}/{name}: container {container:?} has containerPort {port} outside 1..65535"
    )]
    BadPort {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// Container name.
        container: String,
        /// The offending number.
        port: i32,
    },
    /// A container port protocol is not TCP, UDP or SCTP.
    #[error(
        "Pod {namespace}/{name}: container {container:?} port {port} has protocol {protocol:?} (expected TCP, UDP or SCTP)"
    )]
    BadProtocol {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// Container name.
        container: String,
        /// Port number.
        port: i32,
        /// The offending protocol text.
        protocol: String,
    },
    /// A Service port or numeric target port is outside 1..=65535, or its protocol is not TCP,
    /// UDP or SCTP.
    #[error("Service {namespace}/{name}: port {port:?}: {problem}")]
    BadServicePort {
        /// Service namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// The port's name, or its number when it has no name.
        port: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An address in `spec.clusterIP`/`clusterIPs` is neither an IP address nor `None`.
    #[error("Service {namespace}/{name}: cluster IP {ip:?} is not an IP address or \"None\"")]
    BadClusterIp {
        /// Service namespace.
        namespace: String,
        /// Service name.
        name: String,
        /// The offending text.
        ip: String,
    },
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Converts a Namespace, setting the `kubernetes.io/metadata.name` label to its name, as the
/// API server does on every write (its namespace strategy's `Canonicalize` overwrites whatever
/// the manifest said): hand-written manifests usually leave it out, and one that names another
/// namespace must not let its pods match a policy's selector for that namespace.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ConvertError> {
    let name = non_empty(&ns.metadata.name)
        .ok_or(ConvertError::MissingName { kind: "Namespace" })?
        .to_owned();
    let labels = ns
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != NAMESPACE_NAME_LABEL)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([(NAMESPACE_NAME_LABEL, name.as_str())])
        .collect();
    Ok(Namespace { name, labels })
}

/// Converts a Service: its namespace, name and ClusterIPs (`spec.clusterIPs`, else
/// `spec.clusterIP`; none for a headless Service, whose `clusterIP` is `None`, or one without an
/// allocated address). Each address appears once.
pub fn service(svc: &core::Service) -> Result<Service, ConvertError> {
    let meta = &svc.metadata;
    let name = non_empty(&meta.name).ok_or(ConvertError::MissingName { kind: "Service" })?;
    let namespace = non_empty(&meta.namespace).ok_or_else(|| ConvertError::MissingNamespace {
        kind: "Service",
        name: name.to_owned(),
    })?;
    let spec = svc.spec.as_ref();
    let listed = spec
        .and_then(|s| s.cluster_ips.as_deref())
        .filter(|ips| !ips.is_empty());
    let single = spec.and_then(|s| non_empty(&s.cluster_ip));
    let texts: Vec<&str> = match listed {
        Some(ips) => ips.iter().map(String::as_str).collect(),
        None => single.into_iter().collect(),
    };
    let mut cluster_ips: Vec<IpAddr> = Vec::with_capacity(texts.len());
    for text in texts {
        if text.is_empty() || text == "None" {
            continue;
        }
        let ip = super::validate::parse_ip(text).ok_or_else(|| ConvertError::BadClusterIp {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip: text.to_owned(),
        })?;
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    // Written by the API server's users and load-balancer controllers, not validated like a
    // ClusterIP: an entry that is no address (a hostname-only ingress) is left out.
    let lb = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.ip.as_deref());
    let mut external_ips: Vec<IpAddr> = Vec::new();
    for text in spec
        .and_then(|s| s.external_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .chain(lb)
    {
        if let Some(ip) = super::validate::parse_ip(text)
            && !cluster_ips.contains(&ip)
            && !external_ips.contains(&ip)
        {
            external_ips.push(ip);
        }
    }
    let selector = spec
        .and_then(|s| s.selector.as_ref())
        .filter(|sel| !sel.is_empty())
        .map(|sel| sel.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect());
    let mut ports = Vec::new();
    for p in spec.and_then(|s| s.ports.as_deref()).unwrap_or_default() {
        let bad = |problem: String| ConvertError::BadServicePort {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: non_empty(&p.name).map_or_else(|| p.port.to_string(), str::to_owned),
            problem,
        };
        let number = |n: i32, what: &str| {
            u16::try_from(n)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| bad(format!("{what} {n} is not in 1..=65535")))
        };
        let port = number(p.port, "port")?;
        let protocol = match non_empty(&p.protocol) {
            None => Protocol::Tcp,
            Some(text) => match text.parse::<Protocol>() {
                Ok(proto) if proto.has_ports() => proto,
                _ => return Err(bad(format!("protocol {text:?} is not TCP, UDP or SCTP"))),
            },
        };
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(number(*n, "targetPort")?),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            // Digits are no valid port name (the API server refuses them as one): read them
            // as the number they say rather than as a name no pod can declare.
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(number(n, "targetPort")?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: non_empty(&p.name).map(str::to_owned),
            protocol,
            port,
            target,
        });
    }
    Ok(Service {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        cluster_ips,
        external_ips,
        selector,
        ports,
    })
}

/// A namespace known only by name (referenced by a pod or policy but not listed).
pub fn namespace_from_name(name: &str) -> Namespace {
    let labels = Labels::from([(NAMESPACE_NAME_LABEL, name)]);
    Namespace {
        name: name.to_owned(),
        labels,
    }
}

fn phase(p: Option<&str>) -> PodPhase {
    match p {
        Some("Running") => PodPhase::Running,
        Some("Pending") => PodPhase::Pending,
        Some("Succeeded") | Some("Failed") => PodPhase::Terminated,
        _ => PodPhase::Unknown,
    }
}

/// The annotation that holds a mirror pod's static-pod UID.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Converts a Pod: UID, addresses, host networking, phase, creation time, container ports and
/// its workload (resolved through `owners`, see [`workload::resolve`]).
pub fn pod(pod: &core::Pod, owners: &OwnerIndex) -> Result<Pod, ConvertError> {
    let meta = &pod.metadata;
    let name = non_empty(&meta.name).ok_or(ConvertError::MissingName { kind: "Pod" })?;
    let namespace = non_empty(&meta.namespace).ok_or_else(|| ConvertError::MissingNamespace {
        kind: "Pod",
        name: name.to_owned(),
    })?;
    let labels = meta.labels.as_ref().map(Labels::from).unwrap_or_default();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();

    // podIPs is authoritative (dual-stack); podIP is its first entry, or the only field older
    // manifests carry.
    let mut ips: Vec<IpAddr> = Vec::new();
    let texts = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()));
    for text in texts {
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        // As validation parses it (leading zeros are decimal, as in the API server's
        // `ParseIPSloppy`); an IPv4-mapped v6 address is the v4 pod on the wire.
        let ip = super::validate::parse_ip(text).ok_or_else(|| ConvertError::BadPodIp {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip: text.to_owned(),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    let mut ports = Vec::new();
    if let Some(spec) = spec {
        // Sidecar init containers serve traffic too, and named ports may point at them.
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter());
        for c in containers {
            for p in c.ports.iter().flatten() {
                let bad_port = || ConvertError::BadPort {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    container: c.name.clone(),
                    port: p.container_port,
                };
                let port = u16::try_from(p.container_port).map_err(|_| bad_port())?;
                if port == 0 {
                    return Err(bad_port());
                }
                let protocol = match non_empty(&p.protocol) {
                    None => Protocol::Tcp,
                    Some(text) => match text.parse::<Protocol>() {
                        Ok(proto) if proto.has_ports() => proto,
                        _ => {
                            return Err(ConvertError::BadProtocol {
                                namespace: namespace.to_owned(),
                                name: name.to_owned(),
                                container: c.name.clone(),
                                port: p.container_port,
                                protocol: text.to_owned(),
                            });
                        }
                    },
                };
                ports.push(ContainerPort {
                    name: non_empty(&p.name).map(str::to_owned),
                    port,
                    protocol,
                });
            }
        }
    }

    let owner_refs = meta.owner_references.as_deref().unwrap_or_default();
    let workload = workload::resolve(namespace, name, &labels, owner_refs, owners);

    // kubectl describe finds a mirror pod's Events by the static pod's UID, which the kubelet
    // writes into this annotation, and every other pod's by its own UID.
    let uid = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .or(meta.uid.as_ref())
        .filter(|u| !u.is_empty())
        .map(|u| Box::from(u.as_str()));

    Ok(Pod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid,
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node_name: spec
            .and_then(|s| non_empty(&s.node_name))
            .map(str::to_owned),
        phase: phase(status.and_then(|s| s.phase.as_deref())),
        created_unix: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        ports,
        workload,
        labels,
    })
}

/// Validates a NetworkPolicy and trims its metadata to name, namespace, labels and the
/// `deny-observer.io/` annotations. The spec is kept whole: the verdict engine reads it.
pub fn policy(np: NetworkPolicy) -> Result<Arc<NetworkPolicy>, ConvertError> {
    let name = non_empty(&np.metadata.name)
        .ok_or(ConvertError::MissingName {
            kind: "NetworkPolicy",
        })?
        .to_owned();
    let namespace = non_empty(&np.metadata.namespace)
        .ok_or_else(|| ConvertError::MissingNamespace {
            kind: "NetworkPolicy",
            name: name.clone(),
        })?
        .to_owned();
    let annotations: std::collections::BTreeMap<String, String> = np
        .metadata
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    Ok(Arc::new(NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: np.metadata.labels,
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        },
        spec: np.spec,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::Workload;

    fn pod_json(v: serde_json::Value) -> core::Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn namespace_name_label_is_always_its_name() {
        let ns: core::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "prod", "labels": {"team": "a"}}
        }))
        .unwrap();
        let n = namespace(&ns).unwrap();
        assert_eq!(n.name, "prod");
        assert_eq!(n.labels.get(NAMESPACE_NAME_LABEL).unwrap(), "prod");
        assert_eq!(n.labels.get("team").unwrap(), "a");

        // The API server overwrites another value with the name (namespace strategy,
        // `Canonicalize`), so a manifest cannot make its pods match another namespace.
        let ns: core::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "prod", "labels": {NAMESPACE_NAME_LABEL: "other"}}
        }))
        .unwrap();
        assert_eq!(
            namespace(&ns)
                .unwrap()
                .labels
                .get(NAMESPACE_NAME_LABEL)
                .unwrap(),
            "prod"
        );
        let err = namespace(&core::Namespace::default()).unwrap_err();
        assert_eq!(err, ConvertError::MissingName { kind: "Namespace" });
    }

    #[test]
    fn pod_fields_parsed() {
        let p = pod_json(serde_json::json!({
            "metadata": {
                "name": "web-7d4b9c8f6-xk2lp", "namespace": "prod",
                "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6"},
                "annotations": {"big": "dropped"},
                "creationTimestamp": "2025-03-01T10:00:00Z",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d4b9c8f6", "uid": "1", "controller": true}]
            },
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{"name": "proxy", "ports": [{"containerPort": 15001, "name": "proxy"}]}],
                "containers": [
                    {"name": "app", "ports": [
                        {"containerPort": 8080, "name": "http"},
                        {"containerPort": 53, "protocol": "UDP"}]},
                    {"name": "metrics", "ports": [{"containerPort": 9090, "name": "metrics", "protocol": "SCTP"}]}
                ]
            },
            "status": {"phase": "Running", "podIP": "10.0.1.5",
                       "podIPs": [{"ip": "10.0.1.5"}, {"ip": "fd00::5"}]}
        }));
        let c = pod(&p, &OwnerIndex::default()).unwrap();
        assert_eq!(c.namespace, "prod");
        assert_eq!(c.name, "web-7d4b9c8f6-xk2lp");
        assert_eq!(
            c.ips,
            vec![
                "10.0.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(!c.host_network);
        assert_eq!(c.node_name.as_deref(), Some("node-a"));
        assert_eq!(c.phase, PodPhase::Running);
        assert_eq!(c.created_unix, 1_740_823_200);

        // Leading zeros, which validation accepts as the API server's `ParseIPSloppy` does
        // (decimal), convert the same way instead of failing as "refused by the API server".
        let mut sloppy = p.clone();
        sloppy.status.as_mut().unwrap().pod_ips = None;
        sloppy.status.as_mut().unwrap().pod_ip = Some("10.0.1.005".into());
        let c2 = pod(&sloppy, &OwnerIndex::default()).unwrap();
        assert_eq!(c2.ips, vec!["10.0.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            c.workload,
            Workload {
                kind: "Deployment".into(),
                name: "web".into()
            }
        );
        assert_eq!(c.labels.len(), 2);
        let ports: Vec<_> = c
            .ports
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            vec![
                (Some("proxy"), 15001, Protocol::Tcp),
                (Some("http"), 8080, Protocol::Tcp),
                (None, 53, Protocol::Udp),
                (Some("metrics"), 9090, Protocol::Sctp),
            ]
        );
    }

    #[test]
    fn pod_ip_only_and_phases() {
        for (ph, want) in [
            ("Pending", PodPhase::Pending),
            ("Succeeded", PodPhase::Terminated),
            ("Failed", PodPhase::Terminated),
            ("Weird", PodPhase::Unknown),
        ] {
            let p = pod_json(serde_json::json!({
                "metadata": {"name": "a", "namespace": "n"},
                "spec": {"hostNetwork": true, "containers": []},
                "status": {"phase": ph, "podIP": "192.168.0.10"}
            }));
            let c = pod(&p, &OwnerIndex::default()).unwrap();
            assert_eq!(c.phase, want);
            assert!(c.host_network);
            assert_eq!(c.ips, vec!["192.168.0.10".parse::<IpAddr>().unwrap()]);
            assert_eq!(c.created_unix, 0);
            assert_eq!(c.workload.kind, "Pod");
        }
        // No status at all: a pod not yet scheduled.
        let p = pod_json(serde_json::json!({"metadata": {"name": "a", "namespace": "n"}}));
        let c = pod(&p, &OwnerIndex::default()).unwrap();
        assert!(c.ips.is_empty());
        assert_eq!(c.phase, PodPhase::Unknown);
    }

    #[test]
    fn service_ports_and_selector() {
        let svc = |spec: serde_json::Value| -> core::Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"}, "spec": spec}))
            .unwrap()
        };
        let s = service(&svc(serde_json::json!({
        "clusterIP": "10.96.0.1", "selector": {"app": "web", "tier": "fe"},
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "alt", "port": 8443, "targetPort": 443},
            {"name": "digits", "port": 81, "targetPort": "8081"}
        ]})))
        .unwrap();
        let sel = s.selector.as_ref().unwrap();
        assert_eq!((sel.get("app"), sel.get("tier")), (Some("web"), Some("fe")));
        let targets: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.name.as_deref(), p.protocol, p.port, p.target.clone()))
            .collect();
        assert_eq!(
            targets,
            [
                (
                    Some("http"),
                    Protocol::Tcp,
                    80,
                    TargetPort::Name("http".into())
                ),
                (Some("dns"), Protocol::Udp, 53, TargetPort::Number(53)),
                (Some("alt"), Protocol::Tcp, 8443, TargetPort::Number(443)),
                (Some("digits"), Protocol::Tcp, 81, TargetPort::Number(8081)),
            ]
        );
        // No selector, or an empty one: endpoints managed by hand.
        let s = service(&svc(
            serde_json::json!({"clusterIP": "10.96.0.1", "selector": {}}),
        ))
        .unwrap();
        assert!(s.selector.is_none() && s.ports.is_empty());
        for (port, why) in [
            (serde_json::json!({"port": 0}), "port 0 is not in 1..=65535"),
            (
                serde_json::json!({"port": 80, "targetPort": 70000}),
                "targetPort 70000",
            ),
            (
                serde_json::json!({"port": 80, "protocol": "ICMP"}),
                "protocol \"ICMP\"",
            ),
        ] {
            let e = service(&svc(serde_json::json!({"ports": [port]}))).unwrap_err();
            assert!(matches!(e, ConvertError::BadServicePort { .. }), "{e}");
            assert!(e.to_string().contains(why), "{e}");
            assert!(e.to_string().contains("shop/web"), "{e}");
        }
    }

    #[test]
    fn pod_errors_name_the_pod() {
        let p = pod_json(serde_json::json!({"metadata": {"name": "a"}}));
        assert_eq!(
            pod(&p, &OwnerIndex::default()).unwrap_err(),
            ConvertError::MissingNamespace {
                kind: "Pod",
                name: "a".into()
            }
        );
        let p = pod_json(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "status": {"podIP": "10.0.0.300"}
        }));
        let e = pod(&p, &OwnerIndex::default()).unwrap_err();
        assert!(e.to_string().contains("n/a"), "{e}");
        assert!(e.to_string().contains("10.0.0.300"), "{e}");
        let p = pod_json(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 70000}]}]}
        }));
        assert!(matches!(
            pod(&p, &OwnerIndex::default()).unwrap_err(),
            ConvertError::BadPort { port: 70000, .. }
        ));
        let p = pod_json(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}
        }));
        let e = pod(&p, &OwnerIndex::default()).unwrap_err();
        assert!(matches!(e, ConvertError::BadProtocol { .. }), "{e}");
        assert!(e.to_string().contains("\"c\""), "{e}");
    }

    #[test]
    fn policy_trimmed() {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "deny", "namespace": "prod", "uid": "x", "resourceVersion": "9",
                "labels": {"team": "a"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{...huge...}",
                    "deny-observer.io/owner": "sre"
                },
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let spec = np.spec.clone();
        let t = policy(np).unwrap();
        assert_eq!(t.metadata.name.as_deref(), Some("deny"));
        assert_eq!(t.metadata.namespace.as_deref(), Some("prod"));
        assert_eq!(t.metadata.labels.as_ref().unwrap().len(), 1);
        let ann = t.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann.len(), 1);
        assert_eq!(ann.get("deny-observer.io/owner").unwrap(), "sre");
        assert!(t.metadata.managed_fields.is_none());
        assert!(t.metadata.uid.is_none());
        assert_eq!(t.spec, spec);

        let mut np = NetworkPolicy::default();
        np.metadata.name = Some("x".into());
        assert_eq!(
            policy(np).unwrap_err(),
            ConvertError::MissingNamespace {
                kind: "NetworkPolicy",
                name: "x".into()
            }
        );
        assert_eq!(
            policy(NetworkPolicy::default()).unwrap_err(),
            ConvertError::MissingName {
                kind: "NetworkPolicy"
            }
        );
    }
}
