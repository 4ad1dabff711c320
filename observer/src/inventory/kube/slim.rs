//! API objects decoded with only the fields the inventory reads.
//!
//! A list page of 500 pods decoded as k8s-openapi `Pod`s is ~10 MB of small heap blocks
//! (managedFields as JSON trees, env, probes, volumes, container statuses), freed once the page
//! is converted. The converted models are allocated in between, so they end up scattered over
//! the page's heap and keep it resident after the free: that was most of what the API path used
//! above the manifest path. [`Slim`] decodes the same JSON into a k8s-openapi object that holds
//! only what validation and conversion read; everything else is skipped by the parser
//! without being allocated.
//!
//! What is kept: the metadata that [`validate`](super::super::validate) and
//! [`convert`](super::super::convert) read (name, namespace, uid, resourceVersion, labels,
//! annotations, owner references, creation and deletion times; the watcher needs the
//! resourceVersion), a Pod's nodeName, hostNetwork, containers' and init containers' names and
//! ports, its phase and addresses, a NetworkPolicy's whole spec and a Service's cluster IPs.
//! Namespaces keep metadata only.

use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServiceSpec,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// An API object of kind `K` holding only the fields the inventory reads (see the module
/// docs). Watch it through `Api<Slim<K>>`: the requests are those of `Api<K>`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slim<K>(pub K);

impl<K> Borrow<K> for Slim<K> {
    fn borrow(&self) -> &K {
        &self.0
    }
}

impl<K> Resource for Slim<K>
where
    K: Resource<DynamicType = ()>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// The metadata fields kept. Absent and `null` fields are `None`, as in k8s-openapi.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<OwnerReference>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
}

impl From<Meta> for ObjectMeta {
    fn from(m: Meta) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels,
            annotations: m.annotations,
            owner_references: m.owner_references,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        }
    }
}

#[derive(Deserialize)]
struct SlimPod {
    metadata: Option<Meta>,
    spec: Option<SlimPodSpec>,
    status: Option<SlimPodStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimPodSpec {
    containers: Option<Vec<SlimContainer>>,
    init_containers: Option<Vec<SlimContainer>>,
    host_network: Option<bool>,
    node_name: Option<String>,
}

#[derive(Deserialize)]
struct SlimContainer {
    name: Option<String>,
    ports: Option<Vec<ContainerPort>>,
}

impl From<SlimContainer> for Container {
    fn from(c: SlimContainer) -> Self {
        Container {
            name: c.name.unwrap_or_default(),
            ports: c.ports,
            ..Container::default()
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimPodStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIP>>,
}

impl<'de> Deserialize<'de> for Slim<Pod> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = SlimPod::deserialize(d)?;
        let containers = |c: Option<Vec<SlimContainer>>| {
            c.map(|c| c.into_iter().map(Container::from).collect::<Vec<_>>())
        };
        Ok(Slim(Pod {
            metadata: p.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: p.spec.map(|s| PodSpec {
                containers: containers(s.containers).unwrap_or_default(),
                init_containers: containers(s.init_containers),
                host_network: s.host_network,
                node_name: s.node_name,
                ..PodSpec::default()
            }),
            status: p.status.map(|s| PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips,
                ..PodStatus::default()
            }),
        }))
    }
}

#[derive(Deserialize)]
struct SlimMetaOnly {
    metadata: Option<Meta>,
}

impl<'de> Deserialize<'de> for Slim<Namespace> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = SlimMetaOnly::deserialize(d)?;
        Ok(Slim(Namespace {
            metadata: n.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: None,
            status: None,
        }))
    }
}

#[derive(Deserialize)]
struct SlimPolicy {
    metadata: Option<Meta>,
    spec: Option<NetworkPolicySpec>,
}

impl<'de> Deserialize<'de> for Slim<NetworkPolicy> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let np = SlimPolicy::deserialize(d)?;
        Ok(Slim(NetworkPolicy {
            metadata: np.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: np.spec,
        }))
    }
}

#[derive(Deserialize)]
struct SlimService {
    metadata: Option<Meta>,
    spec: Option<SlimServiceSpec>,
    status: Option<SlimServiceStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimServiceStatus {
    load_balancer: Option<k8s_openapi::api::core::v1::LoadBalancerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
    selector: Option<std::collections::BTreeMap<String, String>>,
    ports: Option<Vec<k8s_openapi::api::core::v1::ServicePort>>,
}

impl<'de> Deserialize<'de> for Slim<Service> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let svc = SlimService::deserialize(d)?;
        Ok(Slim(Service {
            metadata: svc.metadata.map(ObjectMeta::from).unwrap_or_default(),
            spec: svc.spec.map(|s| ServiceSpec {
                cluster_ip: s.cluster_ip,
                cluster_ips: s.cluster_ips,
                external_ips: s.external_ips,
                selector: s.selector,
                ports: s.ports,
                ..ServiceSpec::default()
            }),
            status: svc
                .status
                .map(|s| k8s_openapi::api::core::v1::ServiceStatus {
                    load_balancer: s.load_balancer,
                    ..Default::default()
                }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::convert;
    use crate::inventory::validate::{self, PodLayout};
    use crate::inventory::workload::OwnerIndex;
    use serde_json::json;

    fn full_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c8f6-xk2lp", "namespace": "prod", "uid": "u",
                "resourceVersion": "42", "generateName": "web-7d4b9c8f6-",
                "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-03-01T09:59:00Z"},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
                "creationTimestamp": "2025-03-01T10:00:00Z",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d4b9c8f6", "uid": "1", "controller": true}]
            },
            "spec": {
                "nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": false,
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [
                    {"name": "app", "image": "nginx", "args": ["a"],
                     "env": [{"name": "X", "value": "y"}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                     "ports": [{"containerPort": 8080, "name": "http", "hostPort": 80}]},
                    {"name": "sidecar", "image": "envoy"},
                    {"name": "metrics", "image": "m",
                     "ports": [{"containerPort": 9090, "name": "http", "protocol": "SCTP"}]}
                ],
                "initContainers": [{"name": "proxy", "image": "p", "restartPolicy": "Always",
                                    "ports": [{"containerPort": 15001, "name": "proxy"}]}]
            },
            "status": {"phase": "Running", "podIP": "10.0.1.5", "hostIP": "192.168.1.1",
                       "podIPs": [{"ip": "10.0.1.5"}],
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                                              "image": "nginx", "imageID": "x"}]}
        })
    }

    #[test]
    fn slim_pod_validates_and_converts_as_the_full_one() {
        let full: Pod = serde_json::from_value(full_pod()).unwrap();
        let slim: Slim<Pod> = serde_json::from_value(full_pod()).unwrap();
        assert_eq!(
            validate::pod(&slim.0, PodLayout::AsWritten),
            validate::pod(&full, PodLayout::AsWritten)
        );
        assert_eq!(
            convert::pod(&slim.0, &OwnerIndex::default()).unwrap(),
            convert::pod(&full, &OwnerIndex::default()).unwrap()
        );
        // What the watcher reads, and nothing of the bulk.
        assert_eq!(slim.meta().resource_version.as_deref(), Some("42"));
        assert!(slim.0.metadata.managed_fields.is_none());
        let spec = slim.0.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none());
        assert!(
            spec.containers
                .iter()
                .all(|c| c.image.is_none() && c.env.is_none())
        );
        assert!(spec.containers[0].readiness_probe.is_none());
        let status = slim.0.status.as_ref().unwrap();
        assert!(status.conditions.is_none() && status.container_statuses.is_none());
    }

    #[test]
    fn slim_pod_keeps_what_validation_refuses() {
        // The duplicate port name across two containers is fine; within one it is not, and an
        // invalid annotation key is refused: both must survive the slim decode.
        let mut v = full_pod();
        v["spec"]["containers"][0]["ports"] = json!([
            {"containerPort": 1, "name": "dup"}, {"containerPort": 2, "name": "dup"}]);
        v["metadata"]["annotations"] = json!({"bad key!": "x"});
        let full: Pod = serde_json::from_value(v.clone()).unwrap();
        let slim: Slim<Pod> = serde_json::from_value(v).unwrap();
        let errors = validate::pod(&slim.0, PodLayout::AsWritten);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.containers[0].ports[1].name")
                && fields.contains(&"metadata.annotations"),
            "{errors:?}"
        );
        assert_eq!(errors, validate::pod(&full, PodLayout::AsWritten));
    }

    #[test]
    fn slim_pod_accepts_sparse_and_null_fields() {
        let slim: Slim<Pod> = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "labels": null},
            "spec": {"containers": null},
            "status": null
        }))
        .unwrap();
        assert_eq!(slim.0.metadata.name.as_deref(), Some("p"));
        assert!(slim.0.spec.unwrap().containers.is_empty());
        assert!(slim.0.status.is_none());
    }

    #[test]
    fn slim_namespace_and_policy_match_the_full_ones() {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "prod", "resourceVersion": "5", "labels": {"team": "a"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        let full: Namespace = serde_json::from_value(ns.clone()).unwrap();
        let slim: Slim<Namespace> = serde_json::from_value(ns).unwrap();
        assert_eq!(
            convert::namespace(&slim.0).unwrap(),
            convert::namespace(&full).unwrap()
        );
        assert_eq!(slim.meta().resource_version.as_deref(), Some("5"));

        let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "n", "resourceVersion": "9",
                         "annotations": {"deny-observer.io/owner": "team-a",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                  "ports": [{"port": "http"}]}]}});
        let full: NetworkPolicy = serde_json::from_value(np.clone()).unwrap();
        let slim: Slim<NetworkPolicy> = serde_json::from_value(np).unwrap();
        assert_eq!(
            validate::network_policy(&slim.0),
            validate::network_policy(&full)
        );
        assert_eq!(
            convert::policy(slim.0.clone()).unwrap(),
            convert::policy(full).unwrap()
        );
        assert!(slim.0.metadata.managed_fields.is_none());
    }

    #[test]
    fn slim_service_converts_as_the_full_one() {
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "7",
                         "managedFields": [{"manager": "kube-controller-manager"}]},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10", "fd00::a"], "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            "status": {"loadBalancer": {}}});
        let full: Service = serde_json::from_value(svc.clone()).unwrap();
        // A LoadBalancer's addresses: externalIPs and the ingress IPs its controller wrote
        // (a hostname-only ingress has none; one equal to the ClusterIP is that already).
        let lb = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "shop", "namespace": "prod"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11",
                     "externalIPs": ["192.168.50.5", "not-an-ip"],
                     "ports": [{"port": 443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "34.120.0.5"},
                {"hostname": "lb.example.com"}, {"ip": "10.96.0.11"}, {"ip": "192.168.50.5"}]}}});
        let lb_full: Service = serde_json::from_value(lb.clone()).unwrap();
        let lb_slim: Slim<Service> = serde_json::from_value(lb).unwrap();
        let lb_model = convert::service(&lb_slim.0).unwrap();
        assert_eq!(lb_model, convert::service(&lb_full).unwrap());
        let ext: Vec<String> = lb_model
            .external_ips
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ext, ["192.168.50.5", "34.120.0.5"]);
        let slim: Slim<Service> = serde_json::from_value(svc).unwrap();
        assert_eq!(
            convert::service(&slim.0).unwrap(),
            convert::service(&full).unwrap()
        );
        assert_eq!(convert::service(&slim.0).unwrap().cluster_ips.len(), 2);
        assert_eq!(slim.meta().resource_version.as_deref(), Some("7"));
        let spec = slim.0.spec.as_ref().unwrap();
        // Kept for `explain --to <ns>/svc/<name>`: the pods it selects, its target ports.
        assert!(spec.ports.is_some() && spec.selector.is_some());
        let model = convert::service(&slim.0).unwrap();
        assert_eq!(
            model.ports[0].target,
            crate::inventory::TargetPort::Number(8080)
        );
        assert!(model.selector.is_some_and(|s| s.get("app") == Some("web")));
        assert!(slim.0.metadata.managed_fields.is_none());

        let headless: Slim<Service> = serde_json::from_value(json!({
            "metadata": {"name": "h", "namespace": "n"},
            "spec": {"clusterIP": "None", "clusterIPs": null}}))
        .unwrap();
        assert!(
            convert::service(&headless.0)
                .unwrap()
                .cluster_ips
                .is_empty()
        );
    }

    #[test]
    fn slim_requests_are_the_full_kinds_requests() {
        assert_eq!(Slim::<Pod>::url_path(&(), None), Pod::url_path(&(), None));
        assert_eq!(
            Slim::<NetworkPolicy>::url_path(&(), Some("n")),
            NetworkPolicy::url_path(&(), Some("n"))
        );
        assert_eq!(Slim::<Namespace>::kind(&()), "Namespace");
        assert_eq!(
            Slim::<Service>::url_path(&(), None),
            Service::url_path(&(), None)
        );
    }
}
