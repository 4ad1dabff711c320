//! The inventory data model: trimmed to what attribution and verdicts use, so that a
//! 10,000-pod cluster stays small in memory.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::validate::InvalidObject;
use crate::flow::Protocol;

pub use super::labels::Labels;

/// A namespace and its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Namespace labels (including `kubernetes.io/metadata.name`, which the API server sets;
    /// loaders add it when a manifest lacks it).
    pub labels: Labels,
}

/// Lifecycle phase of a pod, ordered by how much it deserves to own a reused IP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum PodPhase {
    /// Succeeded or Failed: its IP may already belong to a new pod.
    Terminated,
    /// Unknown phase.
    #[default]
    Unknown,
    /// Pending.
    Pending,
    /// Running.
    Running,
}

/// A named container port, used to resolve named ports in policies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerPort {
    /// Port name, if any.
    pub name: Option<String>,
    /// Port number.
    pub port: u16,
    /// Protocol (TCP when unset in the manifest).
    pub protocol: Protocol,
}

/// The controller a pod belongs to, resolved through its owner chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet`, `Pod`, ...
    pub kind: String,
    /// Name of the workload.
    pub name: String,
}

/// A pod, trimmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The UID `kubectl describe pod` looks the pod's Events up by (`involvedObject.uid`):
    /// `metadata.uid`, or for a mirror pod its `kubernetes.io/config.mirror` annotation.
    /// `None` when unknown (manifests often omit it).
    pub uid: Option<Box<str>>,
    /// Labels.
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such pods use the node's IPs and are not subject to policies.
    pub host_network: bool,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// Phase.
    pub phase: PodPhase,
    /// `metadata.creationTimestamp` as Unix seconds (0 when unknown); newest wins IP reuse ties.
    pub created_unix: i64,
    /// Container ports (all containers).
    pub ports: Vec<ContainerPort>,
    /// Owning workload.
    pub workload: Workload,
}

/// A Service, trimmed to what connection attribution reads: the virtual addresses kube-proxy
/// (or an eBPF replacement) translates to a backend pod, and the Service's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`): one per IP family on a dual-stack Service,
    /// empty for a headless (`None`), ExternalName or not yet allocated Service.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` and the IPs of `status.loadBalancer.ingress`: addresses outside the
    /// Service range that kube-proxy also translates to the Service's backends (or drops, when
    /// it has none, or none on the node under `externalTrafficPolicy: Local`).
    pub external_ips: Vec<IpAddr>,
    /// `spec.selector`: the labels of the pods it sends traffic to, in its namespace. `None`
    /// when it has none (its endpoints are managed by hand, so no pod can be named for it).
    pub selector: Option<Labels>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
}

/// One port of a Service: what a client dials, and where kube-proxy sends it on the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (required by the API server when a Service has more than one port).
    pub name: Option<String>,
    /// Protocol (TCP when unset).
    pub protocol: Protocol,
    /// The port clients dial on the ClusterIP.
    pub port: u16,
    /// `targetPort`: where the traffic arrives on the pod, which is the port NetworkPolicies
    /// see (they are evaluated after the translation).
    pub target: TargetPort,
}

/// A Service's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number (`port` itself when the manifest leaves `targetPort` out).
    Number(u16),
    /// A container port name, resolved on each pod.
    Name(String),
}

impl Service {
    /// Whether the inventory keeps it: it has an address to attribute connections to, or
    /// pods that `explain` can name for it.
    pub fn is_useful(&self) -> bool {
        !self.cluster_ips.is_empty() || !self.external_ips.is_empty() || self.selector.is_some()
    }

    /// Whether the Service sends traffic to `pod`: same namespace, and every selector label.
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    }
}

/// Complete inventory snapshot. Cheap to share: downstream stages hold an `Arc<Inventory>`.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// All pods.
    pub pods: Vec<Arc<Pod>>,
    /// All `networking.k8s.io/v1` NetworkPolicies (metadata trimmed to name, namespace,
    /// labels and the annotations deny-observer reads).
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// Services that have a ClusterIP, sorted by namespace and name.
    pub services: Vec<Arc<Service>>,
    /// Objects left out because the API server would refuse them (see
    /// [`validate`](super::validate)), sorted by kind, namespace and name.
    pub invalid: Vec<InvalidObject>,
}

/// Object counts of an inventory (for `deny_observer_inventory_objects{kind}`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectCounts {
    /// Namespaces (including those only implied by a pod or policy).
    pub namespaces: usize,
    /// Pods.
    pub pods: usize,
    /// NetworkPolicies.
    pub policies: usize,
    /// Services with a ClusterIP.
    pub services: usize,
}

impl Inventory {
    /// How many objects of each kind the snapshot holds.
    pub fn counts(&self) -> ObjectCounts {
        ObjectCounts {
            namespaces: self.namespaces.len(),
            pods: self.pods.len(),
            policies: self.policies.len(),
            services: self.services.len(),
        }
    }

    /// True when the snapshot holds no namespace, pod or policy (invalid objects aside).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.pods.is_empty() && self.policies.is_empty()
    }

    /// Invalid objects per `kind` label of `deny_observer_inventory_invalid_objects`
    /// (`namespaces`, `pods` and `networkpolicies` always present).
    pub fn invalid_counts(&self) -> std::collections::BTreeMap<String, usize> {
        super::validate::counts_by_kind(&self.invalid)
    }
}
