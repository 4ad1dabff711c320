//! The inventory from the API server: kube-rs reflectors for Pods (all namespaces: peers
//! matter, not only this node's pods), Namespaces, NetworkPolicies and Services (their
//! ClusterIPs only).
//!
//! Each object is validated and converted (through [`convert`], the same code
//! as the manifest loader) as it arrives, and the stores keep only the result ([`Stored`]),
//! never the API object: a 10,000-pod cluster is watched by every node, and a k8s-openapi `Pod`
//! is several KB even with [`trim_pod`] applied. A snapshot task gathers the stores into an
//! [`Inventory`] and publishes it on a `tokio::sync::watch` channel, at most once per debounce
//! interval and only when the content changed.
//!
//! Watch errors are counted through the caller's callback (the daemon exports them as
//! `deny_observer_inventory_watch_errors_total{resource}`), and the watchers reconnect with
//! kube's default backoff. The stores and the last snapshot stay in use meanwhile, so drops
//! are still attributed while the API server is unreachable.

use std::borrow::{Borrow, Cow};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort as K8sContainerPort, Namespace as K8sNamespace, Pod as K8sPod, PodIP,
    PodSpec, PodStatus, Service as K8sService,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::{self, Lookup, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::convert::{self, ANNOTATION_PREFIX};
use super::model::{Inventory, Pod, Service};
use super::reload::ReloadStats;
use super::validate::{self, InvalidObject, PodLayout};
use super::workload::OwnerIndex;

mod slim;
pub use slim::Slim;

/// Value of the `resource` label for Pods.
pub const RESOURCE_PODS: &str = "pods";
/// Value of the `resource` label for Namespaces.
pub const RESOURCE_NAMESPACES: &str = "namespaces";
/// Value of the `resource` label for NetworkPolicies.
pub const RESOURCE_NETWORKPOLICIES: &str = "networkpolicies";
/// Value of the `resource` label for Services.
pub const RESOURCE_SERVICES: &str = "services";

/// Environment variable (set from the downward API) that names this node.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Called with the `resource` label value (`pods`, `namespaces`, `networkpolicies`,
/// `services`) for each watch error.
pub type WatchErrorCounter = Arc<dyn Fn(&str) + Send + Sync>;

/// Errors of the API-server inventory.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Neither in-cluster config nor a kubeconfig gave a client.
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Client(#[source] kube::Error),
    /// The inventory tasks ended before the first full sync.
    #[error("the inventory watchers stopped before the first full sync")]
    Stopped,
}

/// [`ReloadStats`] parts of the four watches.
const WATCH_PODS: u32 = 0;
const WATCH_NAMESPACES: u32 = 1;
const WATCH_NETWORKPOLICIES: u32 = 2;
const WATCH_SERVICES: u32 = 3;

/// Settings of [`KubeInventory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeInventoryConfig {
    /// This node's name (from `NODE_NAME`), for logs.
    pub node_name: Option<String>,
    /// Minimum time between two published snapshots.
    pub debounce: Duration,
    /// How the initial lists (and the relists after a watch falls out of its window) are made.
    pub list: ListStrategy,
}

/// Objects per page of a [`ListStrategy::Paged`] list.
pub const LIST_PAGE_SIZE: u32 = 500;

/// How the reflectors make their initial lists and relists (`--inventory-list`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ListStrategy {
    /// Consistent lists of 500 objects a page (`limit`/`continue`): the daemon holds one page
    /// of API objects at a time, so its memory stays flat whatever the cluster's size. Before
    /// Kubernetes 1.31 (consistent list from the watch cache) every page is read from etcd.
    #[default]
    Paged,
    /// One `resourceVersion=0` list served from the API server's watch cache, never from etcd;
    /// the API server ignores `limit` for it, so the daemon decodes the whole list at once and
    /// its memory grows with the cluster.
    Cache,
}

impl ListStrategy {
    /// The watcher configuration of this strategy.
    pub fn watcher_config(self) -> watcher::Config {
        match self {
            Self::Paged => watcher::Config::default()
                .list_semantic(watcher::ListSemantic::MostRecent)
                .page_size(LIST_PAGE_SIZE),
            Self::Cache => {
                // kube drops `resourceVersion=0` from a list that has a limit, which turns it
                // into a consistent paged list: the cache list must ask for no limit.
                let mut config = watcher::Config::default().any_semantic();
                config.page_size = None;
                config
            }
        }
    }
}

impl Default for KubeInventoryConfig {
    fn default() -> Self {
        Self {
            node_name: node_name_from_env(),
            debounce: Duration::from_secs(1),
            list: ListStrategy::default(),
        }
    }
}

/// This node's name from `NODE_NAME` (the DaemonSet sets it from `spec.nodeName`).
pub fn node_name_from_env() -> Option<String> {
    std::env::var(NODE_NAME_ENV).ok().filter(|s| !s.is_empty())
}

/// A client from the in-cluster config, or from the kubeconfig outside a cluster.
pub async fn default_client() -> Result<Client, KubeError> {
    Client::try_default().await.map_err(KubeError::Client)
}

/// An object as a store keeps it: what it converted into, or why it was left out. The API
/// objects themselves are not kept: a k8s-openapi `Pod` is several KB even trimmed, its model
/// a few hundred bytes, and every node stores every pod of the cluster. The identity is the
/// model's (or the refusal's), not a copy: the store's key already holds one.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<M> {
    /// The model, or why the object was left out of the inventory (boxed: rare, and five
    /// times the size of the model's `Arc`).
    pub model: Result<M, Box<InvalidObject>>,
}

/// The name and namespace of a stored model.
pub trait Named {
    /// The object's name.
    fn name(&self) -> &str;
    /// The object's namespace (`None` for namespaces themselves).
    fn namespace(&self) -> Option<&str>;
}

impl Named for Arc<Pod> {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> Option<&str> {
        Some(&self.namespace)
    }
}

impl Named for super::model::Namespace {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> Option<&str> {
        None
    }
}

impl Named for Arc<NetworkPolicy> {
    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
    fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
}

impl Named for Arc<Service> {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> Option<&str> {
        Some(&self.namespace)
    }
}

impl<M: Named> Stored<M> {
    /// The object's name.
    pub fn name(&self) -> &str {
        match &self.model {
            Ok(m) => m.name(),
            Err(e) => e.name.as_deref().unwrap_or_default(),
        }
    }

    /// The object's namespace (`None` for namespaces themselves).
    pub fn namespace(&self) -> Option<&str> {
        match &self.model {
            Ok(m) => m.namespace(),
            Err(e) => e.namespace.as_deref(),
        }
    }
}

/// A converted Pod, as the pod store keeps it.
pub type StoredPod = Stored<Arc<Pod>>;
/// A converted Namespace.
pub type StoredNamespace = Stored<super::model::Namespace>;
/// A validated NetworkPolicy with its metadata trimmed (the same `Arc` goes into snapshots).
pub type StoredPolicy = Stored<Arc<NetworkPolicy>>;
/// A converted Service: namespace, name and ClusterIPs.
pub type StoredService = Stored<Arc<Service>>;

macro_rules! stored_lookup {
    ($model:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl Lookup for Stored<$model> {
            type DynamicType = ();

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn name(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(Stored::name(self)))
            }

            fn namespace(&self) -> Option<Cow<'_, str>> {
                Stored::namespace(self).map(Cow::Borrowed)
            }

            // Not kept: the store keys objects by kind, namespace and name only.
            fn resource_version(&self) -> Option<Cow<'_, str>> {
                None
            }

            fn uid(&self) -> Option<Cow<'_, str>> {
                None
            }
        }
    };
}

stored_lookup!(Arc<Pod>, "Pod", "", "v1", "pods");
stored_lookup!(super::model::Namespace, "Namespace", "", "v1", "namespaces");
stored_lookup!(
    Arc<NetworkPolicy>,
    "NetworkPolicy",
    "networking.k8s.io",
    "v1",
    "networkpolicies"
);
stored_lookup!(Arc<Service>, "Service", "", "v1", "services");

/// Converts an API object into what its store keeps.
pub trait ToStored: Sized {
    /// The stored form.
    type Stored: Lookup<DynamicType = ()> + Clone + 'static;
    /// Validates and converts.
    fn stored(&self) -> Self::Stored;
}

impl ToStored for K8sPod {
    type Stored = StoredPod;
    fn stored(&self) -> StoredPod {
        stored(check_pod(self))
    }
}

impl ToStored for K8sNamespace {
    type Stored = StoredNamespace;
    fn stored(&self) -> StoredNamespace {
        stored(check_namespace(self))
    }
}

impl ToStored for NetworkPolicy {
    type Stored = StoredPolicy;
    fn stored(&self) -> StoredPolicy {
        stored(check_policy(self))
    }
}

impl ToStored for K8sService {
    type Stored = StoredService;
    fn stored(&self) -> StoredService {
        stored(
            convert::service(self)
                .map(Arc::new)
                .map_err(|e| invalid_from_api("Service", &self.metadata, vec![e.to_string()])),
        )
    }
}

fn stored<M>(model: Result<M, InvalidObject>) -> Stored<M> {
    Stored {
        model: model.map_err(Box::new),
    }
}

/// The writer of one store: takes watcher events of API objects, keeps their converted form.
pub struct StoreWriter<K: ToStored> {
    inner: reflector::store::Writer<K::Stored>,
    reader: Store<K::Stored>,
}

impl<K: ToStored> StoreWriter<K>
where
    K::Stored: PartialEq,
{
    fn new(inner: reflector::store::Writer<K::Stored>) -> Self {
        let reader = inner.as_reader();
        Self { inner, reader }
    }

    /// Applies one watcher event (what `reflect` does with a store of API objects).
    pub fn apply_watcher_event(&mut self, event: &watcher::Event<K>) {
        self.apply_event(event);
    }

    /// [`apply_watcher_event`](Self::apply_watcher_event) for events of `K` itself or of its
    /// [`Slim`] form (what the watchers decode).
    pub fn apply_event<T: Borrow<K>>(&mut self, event: &watcher::Event<T>) {
        let event = match event {
            watcher::Event::Apply(o) => watcher::Event::Apply(self.stored(o.borrow())),
            watcher::Event::Delete(o) => watcher::Event::Delete(o.borrow().stored()),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitApply(o) => watcher::Event::InitApply(self.stored(o.borrow())),
            watcher::Event::InitDone => watcher::Event::InitDone,
        };
        self.inner.apply_watcher_event(&event);
    }

    /// The stored form of `o`; the one already stored when nothing changed, so that a relist
    /// (every watch restart after a 410) or a status update that deny-observer does not read
    /// keeps the allocations that snapshots and views share.
    fn stored(&self, o: &K) -> K::Stored {
        let new = o.stored();
        match self.reader.get(&new.to_object_ref(())) {
            Some(old) if *old == new => (*old).clone(),
            _ => new,
        }
    }
}

/// The four stores.
#[derive(Clone)]
pub struct Stores {
    /// Pods, all namespaces.
    pub pods: Store<StoredPod>,
    /// Namespaces.
    pub namespaces: Store<StoredNamespace>,
    /// NetworkPolicies.
    pub policies: Store<StoredPolicy>,
    /// Services.
    pub services: Store<StoredService>,
}

/// Writers of the four stores (tests fill them directly with `apply_watcher_event`).
pub struct Writers {
    /// Pods.
    pub pods: StoreWriter<K8sPod>,
    /// Namespaces.
    pub namespaces: StoreWriter<K8sNamespace>,
    /// NetworkPolicies.
    pub policies: StoreWriter<NetworkPolicy>,
    /// Services.
    pub services: StoreWriter<K8sService>,
}

/// Four empty stores and their writers.
pub fn stores() -> (Stores, Writers) {
    let (pods, pods_w) = reflector::store();
    let (namespaces, namespaces_w) = reflector::store();
    let (policies, policies_w) = reflector::store();
    let (services, services_w) = reflector::store();
    (
        Stores {
            pods,
            namespaces,
            policies,
            services,
        },
        Writers {
            pods: StoreWriter::new(pods_w),
            namespaces: StoreWriter::new(namespaces_w),
            policies: StoreWriter::new(policies_w),
            services: StoreWriter::new(services_w),
        },
    )
}

/// Drops what attribution and verdicts do not use from a Pod: managedFields, annotations (but
/// a mirror pod's UID) and every other metadata field but name, namespace, uid, labels, owners
/// and creation time; of
/// the spec only nodeName, hostNetwork and the containers' names and ports; of the status only
/// phase and addresses.
pub fn trim_pod(pod: &mut K8sPod) {
    // The one annotation conversion reads: a mirror pod's UID for its Events.
    let mirror = pod
        .metadata
        .annotations
        .as_mut()
        .and_then(|a| a.remove_entry(convert::MIRROR_ANNOTATION));
    trim_meta(&mut pod.metadata, false);
    pod.metadata.annotations = mirror.map(|m| [m].into());
    // Only the reference workload resolution reads survives: the controller, or the first one
    // when none is marked (as `workload::resolve` does).
    if let Some(owners) = pod.metadata.owner_references.take() {
        let pick = owners
            .iter()
            .position(|o| o.controller == Some(true))
            .unwrap_or(0);
        pod.metadata.owner_references = owners.into_iter().nth(pick).map(|o| {
            vec![OwnerReference {
                api_version: o.api_version,
                kind: o.kind,
                name: o.name,
                uid: String::new(),
                controller: o.controller,
                block_owner_deletion: None,
            }]
        });
    }
    // All container ports go into one container: a k8s-openapi `Container` is over 2 KB inline,
    // and attribution only needs the ports (named-port resolution), not which container has them.
    let spec = pod.spec.take().map(|spec| {
        let mut names: Vec<String> = Vec::new();
        let mut ports: Vec<K8sContainerPort> = Vec::new();
        for c in spec
            .init_containers
            .into_iter()
            .flatten()
            .chain(spec.containers)
        {
            let Some(cports) = c.ports.filter(|p| !p.is_empty()) else {
                continue;
            };
            names.push(c.name);
            ports.extend(cports.into_iter().map(|p| K8sContainerPort {
                container_port: p.container_port,
                name: p.name,
                protocol: p.protocol,
                ..K8sContainerPort::default()
            }));
        }
        let containers = if ports.is_empty() {
            Vec::new()
        } else {
            vec![Container {
                name: names.join(","),
                ports: Some(ports),
                ..Container::default()
            }]
        };
        PodSpec {
            containers,
            host_network: spec.host_network,
            node_name: spec.node_name,
            ..PodSpec::default()
        }
    });
    pod.spec = spec;
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status
            .pod_ips
            .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
        ..PodStatus::default()
    });
}

/// Keeps a Namespace's name and labels only.
pub fn trim_namespace(ns: &mut K8sNamespace) {
    trim_meta(&mut ns.metadata, false);
    ns.metadata.uid = None;
    ns.metadata.creation_timestamp = None;
    ns.metadata.owner_references = None;
    ns.spec = None;
    ns.status = None;
}

/// Keeps a NetworkPolicy's name, namespace, labels, `deny-observer.io/` annotations and spec.
pub fn trim_policy(np: &mut NetworkPolicy) {
    trim_meta(&mut np.metadata, true);
    np.metadata.uid = None;
    np.metadata.creation_timestamp = None;
    np.metadata.owner_references = None;
}

fn trim_meta(meta: &mut ObjectMeta, keep_own_annotations: bool) {
    let annotations = if keep_own_annotations {
        meta.annotations
            .take()
            .map(|a| {
                a.into_iter()
                    .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .filter(|a| !a.is_empty())
    } else {
        None
    };
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        labels: meta.labels.take(),
        owner_references: meta.owner_references.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        annotations,
        ..ObjectMeta::default()
    };
}

/// Builds [`Inventory`] snapshots from the stores' converted objects.
#[derive(Default)]
pub struct SnapshotBuilder {
    current: Option<Arc<Inventory>>,
}

/// The result of one [`SnapshotBuilder::build`].
pub struct Build {
    /// The snapshot (the previous `Arc` when nothing changed). Objects left out because the
    /// API server should have refused them are in its `invalid` list.
    pub inventory: Arc<Inventory>,
    /// True when the content differs from the previous build (or this is the first).
    pub changed: bool,
    /// Invalid objects that were not invalid (or not there) in the previous build, to log
    /// each once rather than at every snapshot.
    pub newly_invalid: Vec<InvalidObject>,
}

fn invalid_from_api(kind: &str, meta: &ObjectMeta, errors: Vec<String>) -> InvalidObject {
    InvalidObject {
        kind: kind.to_owned(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
        source: None,
        errors,
    }
}

fn field_errors(errors: &[validate::FieldError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// Validates then converts a Namespace (as the manifest loader does).
fn check_namespace(ns: &K8sNamespace) -> Result<super::model::Namespace, InvalidObject> {
    let errors = validate::namespace(ns);
    if !errors.is_empty() {
        return Err(invalid_from_api(
            "Namespace",
            &ns.metadata,
            field_errors(&errors),
        ));
    }
    convert::namespace(ns)
        .map_err(|e| invalid_from_api("Namespace", &ns.metadata, vec![e.to_string()]))
}

/// Validates then converts a Pod. No ReplicaSets or Jobs are watched, so workloads come from
/// the owner reference and the `pod-template-hash` label (see [`workload::resolve`]).
///
/// [`workload::resolve`]: super::workload::resolve
fn check_pod(pod: &K8sPod) -> Result<Arc<Pod>, InvalidObject> {
    let errors = validate::pod(pod, PodLayout::AsWritten);
    if !errors.is_empty() {
        return Err(invalid_from_api(
            "Pod",
            &pod.metadata,
            field_errors(&errors),
        ));
    }
    convert::pod(pod, &OwnerIndex::default())
        .map(Arc::new)
        .map_err(|e| invalid_from_api("Pod", &pod.metadata, vec![e.to_string()]))
}

fn check_policy(np: &NetworkPolicy) -> Result<Arc<NetworkPolicy>, InvalidObject> {
    let errors = validate::network_policy(np);
    if !errors.is_empty() {
        return Err(invalid_from_api(
            "NetworkPolicy",
            &np.metadata,
            field_errors(&errors),
        ));
    }
    convert::policy(np.clone())
        .map_err(|e| invalid_from_api("NetworkPolicy", &np.metadata, vec![e.to_string()]))
}

impl SnapshotBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Collects the stores' current contents into a snapshot. Objects were converted as they
    /// arrived, so this only gathers `Arc`s and sorts them.
    pub fn build(&mut self, stores: &Stores) -> Build {
        let mut invalid = Vec::new();

        let mut namespaces = std::collections::BTreeMap::new();
        for ns in stores.namespaces.state() {
            match &ns.model {
                Ok(n) => {
                    namespaces.insert(n.name.clone(), n.clone());
                }
                Err(e) => invalid.push((**e).clone()),
            }
        }

        let mut pods = Vec::with_capacity(stores.pods.len());
        for obj in stores.pods.state() {
            match &obj.model {
                Ok(model) => pods.push(Arc::clone(model)),
                Err(e) => invalid.push((**e).clone()),
            }
        }
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for p in &pods {
            if !namespaces.contains_key(&p.namespace) {
                let ns = convert::namespace_from_name(&p.namespace);
                namespaces.insert(ns.name.clone(), ns);
            }
        }

        let mut policies = Vec::with_capacity(stores.policies.len());
        for obj in stores.policies.state() {
            match &obj.model {
                Ok(model) => policies.push(Arc::clone(model)),
                Err(e) => invalid.push((**e).clone()),
            }
        }
        policies.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        // A Service with neither an address to attribute nor pods to name (ExternalName, or
        // headless without a selector) is not kept.
        let mut services = Vec::new();
        for obj in stores.services.state() {
            match &obj.model {
                Ok(model) if model.is_useful() => services.push(Arc::clone(model)),
                Ok(_) => {}
                Err(e) => invalid.push((**e).clone()),
            }
        }
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        invalid.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        let newly_invalid: Vec<InvalidObject> = invalid
            .iter()
            .filter(|o| {
                self.current
                    .as_ref()
                    .is_none_or(|cur| !cur.invalid.contains(o))
            })
            .cloned()
            .collect();

        let next = Inventory {
            namespaces,
            pods,
            policies,
            services,
            invalid,
        };
        let changed = self
            .current
            .as_ref()
            .is_none_or(|cur| !same_content(cur, &next));
        let inventory = match (&self.current, changed) {
            (Some(cur), false) => Arc::clone(cur),
            _ => {
                let inv = Arc::new(next);
                self.current = Some(Arc::clone(&inv));
                // Pods deleted or relabelled since the last snapshot may have left label sets
                // that no object holds: free them with the snapshot that dropped them.
                super::labels::prune();
                inv
            }
        };
        Build {
            inventory,
            changed,
            newly_invalid,
        }
    }
}

fn same_content(a: &Inventory, b: &Inventory) -> bool {
    fn same_arcs<T: PartialEq>(x: &[Arc<T>], y: &[Arc<T>]) -> bool {
        x.len() == y.len()
            && x.iter()
                .zip(y)
                .all(|(p, q)| Arc::ptr_eq(p, q) || p.as_ref() == q.as_ref())
    }
    a.namespaces == b.namespaces
        && same_arcs(&a.pods, &b.pods)
        && same_arcs(&a.policies, &b.policies)
        && same_arcs(&a.services, &b.services)
        && a.invalid == b.invalid
}

/// The API-server inventory: watchers, stores and the snapshot channel. Dropping it stops its
/// tasks.
pub struct KubeInventory {
    stores: Stores,
    health: Arc<ReloadStats>,
    snapshots: watch::Receiver<Arc<Inventory>>,
    ready: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeInventory {
    /// Starts the four watchers and the snapshot task on the current Tokio runtime.
    /// `on_watch_error` is called with the resource label for every watch error.
    pub fn start(
        client: Client,
        on_watch_error: WatchErrorCounter,
        config: KubeInventoryConfig,
    ) -> Self {
        let (stores, writers) = stores();
        let changed = Arc::new(Notify::new());
        // Not successful until every watch has delivered its first event.
        let health = Arc::new(ReloadStats::default());
        for part in [
            WATCH_PODS,
            WATCH_NAMESPACES,
            WATCH_NETWORKPOLICIES,
            WATCH_SERVICES,
        ] {
            health.mark_failed(part, "not synced yet".to_owned());
        }
        let mut tasks = Vec::with_capacity(5);
        let lists = config.list.watcher_config();
        tasks.push(tokio::spawn(reflect(
            Api::<Slim<K8sPod>>::all(client.clone()),
            lists.clone(),
            writers.pods,
            RESOURCE_PODS,
            Arc::clone(&on_watch_error),
            Arc::clone(&changed),
            (WATCH_PODS, Arc::clone(&health)),
        )));
        tasks.push(tokio::spawn(reflect(
            Api::<Slim<K8sNamespace>>::all(client.clone()),
            lists.clone(),
            writers.namespaces,
            RESOURCE_NAMESPACES,
            Arc::clone(&on_watch_error),
            Arc::clone(&changed),
            (WATCH_NAMESPACES, Arc::clone(&health)),
        )));
        tasks.push(tokio::spawn(reflect(
            Api::<Slim<NetworkPolicy>>::all(client.clone()),
            lists.clone(),
            writers.policies,
            RESOURCE_NETWORKPOLICIES,
            Arc::clone(&on_watch_error),
            Arc::clone(&changed),
            (WATCH_NETWORKPOLICIES, Arc::clone(&health)),
        )));
        tasks.push(tokio::spawn(reflect(
            Api::<Slim<K8sService>>::all(client),
            lists,
            writers.services,
            RESOURCE_SERVICES,
            on_watch_error,
            Arc::clone(&changed),
            (WATCH_SERVICES, Arc::clone(&health)),
        )));
        let (snap_tx, snapshots) = watch::channel(Arc::new(Inventory::default()));
        let (ready_tx, ready) = watch::channel(false);
        tasks.push(tokio::spawn(snapshot_loop(
            stores.clone(),
            changed,
            snap_tx,
            ready_tx,
            config,
        )));
        Self {
            stores,
            health,
            snapshots,
            ready,
            tasks,
        }
    }

    /// Waits for the first full sync of all four resources and the first snapshot.
    pub async fn wait_until_ready(&self) -> Result<(), KubeError> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| KubeError::Stopped)
    }

    /// True once the first full sync is done (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// A receiver of snapshots; the value is empty until [`is_ready`](Self::is_ready).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Inventory>> {
        self.snapshots.clone()
    }

    /// The latest snapshot.
    pub fn current(&self) -> Arc<Inventory> {
        Arc::clone(&self.snapshots.borrow())
    }

    /// Health of the watches, as an inventory source's reload state: not successful while a
    /// watch's last result was an error (or it has not synced yet), successful again with its
    /// next complete list or change. See [`ReloadStats`].
    pub fn health(&self) -> Arc<ReloadStats> {
        Arc::clone(&self.health)
    }

    /// The stores (object counts for self-monitoring).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }
}

impl Drop for KubeInventory {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Watches one resource into its store, converting each object as it arrives, until the task
/// is aborted. Objects are decoded [`Slim`]: what conversion does not read is never allocated.
fn reflect<K>(
    api: Api<Slim<K>>,
    lists: watcher::Config,
    mut writer: StoreWriter<K>,
    resource: &'static str,
    on_error: WatchErrorCounter,
    changed: Arc<Notify>,
    health: (u32, Arc<ReloadStats>),
) -> impl Future<Output = ()> + Send + 'static
where
    K: Resource<DynamicType = ()> + ToStored + Clone + Debug + Send + Sync + 'static,
    Slim<K>: DeserializeOwned,
    K::Stored: Send + Sync + PartialEq,
{
    let stream = watcher(api, lists)
        .default_backoff()
        .inspect_ok(move |event| writer.apply_event(event));
    drive(stream, resource, on_error, changed, health, QUIET_RECOVERY)
}

/// After a watch error, how long without another event means the watcher is connected again.
/// A resumed watch that succeeds yields no event at all (kube's watcher only reports its
/// failures), so without this a quiet resource (NetworkPolicies, for days) would read as
/// failing after any API-server restart until its next change: /readyz would turn 503 and
/// DenyObserverInventoryStale fire on every node. A retry that fails again reports within
/// kube's backoff (30 s at most, with jitter), well inside this.
const QUIET_RECOVERY: Duration = Duration::from_secs(90);

async fn drive<K, S>(
    stream: S,
    resource: &'static str,
    on_error: WatchErrorCounter,
    changed: Arc<Notify>,
    (part, health): (u32, Arc<ReloadStats>),
    quiet_recovery: Duration,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    // Set by an error, cleared by anything that says how the retry went.
    let mut awaiting_retry = false;
    loop {
        let next = if awaiting_retry {
            match tokio::time::timeout(quiet_recovery, stream.next()).await {
                Ok(next) => next,
                Err(_quiet) => {
                    awaiting_retry = false;
                    health.mark_ok(part);
                    tracing::info!(resource, "inventory watch resumed");
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let Some(event) = next else { break };
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                awaiting_retry = false;
                health.mark_ok(part);
                changed.notify_one();
            }
            // Not a success yet: the watcher yields `Init` before the list request of every
            // (re)list, so a relist that keeps failing would otherwise read as current again at
            // each retry and its staleness would never show. A relist ends with `InitDone` or
            // an error, so the quiet timer no longer applies.
            Ok(watcher::Event::Init) => awaiting_retry = false,
            // A page of a list that may still fail (an expired `continue` token).
            Ok(watcher::Event::InitApply(_)) => {}
            Err(error) => {
                awaiting_retry = true;
                health.mark_failed(part, format!("{resource} watch: {error}"));
                on_error(resource);
                tracing::warn!(%error, resource, "inventory watch failed; retrying with backoff");
            }
        }
    }
}

async fn snapshot_loop(
    stores: Stores,
    changed: Arc<Notify>,
    snapshots: watch::Sender<Arc<Inventory>>,
    ready: watch::Sender<bool>,
    config: KubeInventoryConfig,
) {
    let node = config.node_name.as_deref().unwrap_or("");
    let synced = tokio::try_join!(
        stores.pods.wait_until_ready(),
        stores.namespaces.wait_until_ready(),
        stores.policies.wait_until_ready(),
        stores.services.wait_until_ready(),
    );
    if synced.is_err() {
        tracing::error!(node, "inventory watchers stopped before the first sync");
        return;
    }
    let mut builder = SnapshotBuilder::new();
    let mut first = true;
    loop {
        let build = builder.build(&stores);
        // The API server validates what it stores, so this means it let through what this
        // version of the rules refuses (a newer or patched API server, or a bug here).
        for object in &build.newly_invalid {
            tracing::warn!(
                node,
                %object,
                "left out of the inventory: the object fails the API server's validation"
            );
        }
        if build.changed {
            tracing::debug!(
                node,
                pods = build.inventory.pods.len(),
                namespaces = build.inventory.namespaces.len(),
                policies = build.inventory.policies.len(),
                services = build.inventory.services.len(),
                "inventory snapshot"
            );
            snapshots.send_replace(build.inventory);
        }
        if first {
            first = false;
            ready.send_replace(true);
            tracing::info!(
                node,
                pods = stores.pods.len(),
                namespaces = stores.namespaces.len(),
                policies = stores.policies.len(),
                services = stores.services.len(),
                "inventory synced from the API server"
            );
        }
        tokio::time::sleep(config.debounce).await;
        changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed watch that succeeds says nothing: after an error, quiet means connected.
    /// A relist in progress (`Init`) is not taken for that; it ends with `InitDone` or an error.
    #[tokio::test]
    async fn a_quiet_watch_after_an_error_reads_as_current_again() {
        let quiet = Duration::from_millis(50);
        let run = |events: Vec<Result<watcher::Event<K8sPod>, watcher::Error>>| {
            let health = Arc::new(ReloadStats::default());
            let stream = futures::stream::iter(events).chain(futures::stream::pending());
            let task = tokio::spawn(drive(
                stream,
                "pods",
                Arc::new(|_: &str| {}),
                Arc::new(Notify::new()),
                (0, Arc::clone(&health)),
                quiet,
            ));
            (health, task)
        };
        let (health, task) = run(vec![
            Ok(watcher::Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
        ]);
        tokio::time::sleep(quiet / 5).await;
        assert!(health.failing(), "right after the error");
        tokio::time::sleep(quiet * 3).await;
        assert!(!health.failing(), "quiet after the retry: connected again");
        task.abort();

        let (health, task) = run(vec![
            Ok(watcher::Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(watcher::Event::Init),
        ]);
        tokio::time::sleep(quiet * 4).await;
        assert!(health.failing(), "a relist under way is not a success");
        task.abort();
    }

    #[test]
    fn pod_trim_keeps_what_convert_reads() {
        let mut pod: K8sPod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-7d4b9c8f6-xk2lp", "namespace": "prod", "uid": "u",
                "resourceVersion": "42", "generateName": "web-7d4b9c8f6-",
                "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "creationTimestamp": "2025-03-01T10:00:00Z",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d4b9c8f6", "uid": "1", "controller": true,
                    "blockOwnerDeletion": true}]
            },
            "spec": {
                "nodeName": "node-a", "serviceAccountName": "web",
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [
                    {"name": "app", "image": "nginx", "args": ["a"],
                     "env": [{"name": "X", "value": "y"}],
                     "ports": [{"containerPort": 8080, "name": "http", "hostPort": 80}]},
                    {"name": "sidecar", "image": "envoy"},
                    {"name": "metrics", "image": "m",
                     "ports": [{"containerPort": 9090, "name": "metrics", "protocol": "SCTP"}]}
                ],
                "initContainers": [{"name": "proxy", "image": "p", "restartPolicy": "Always",
                                    "ports": [{"containerPort": 15001, "name": "proxy"}]}]
            },
            "status": {"phase": "Running", "podIP": "10.0.1.5", "hostIP": "192.168.1.1",
                       "podIPs": [{"ip": "10.0.1.5"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let before = convert::pod(&pod, &OwnerIndex::default()).unwrap();
        trim_pod(&mut pod);
        assert_eq!(convert::pod(&pod, &OwnerIndex::default()).unwrap(), before);
        assert!(pod.metadata.annotations.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        assert!(pod.metadata.resource_version.is_none());
        let spec = pod.spec.as_ref().unwrap();
        // One container with every port, whichever container declared it.
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].ports.as_ref().unwrap().len(), 3);
        assert!(spec.init_containers.is_none());
        assert!(spec.containers[0].image.is_none());
        assert!(spec.containers[0].env.is_none());
        assert!(spec.volumes.is_none());
        let status = pod.status.as_ref().unwrap();
        assert!(status.conditions.is_none());
        assert!(status.host_ip.is_none());
    }

    #[test]
    fn pod_trim_keeps_the_owner_resolution_reads() {
        for (owners, want) in [
            (
                serde_json::json!([
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "1"},
                    {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "2",
                     "controller": true}
                ]),
                "db",
            ),
            (
                serde_json::json!([
                    {"apiVersion": "example.com/v1", "kind": "Runner", "name": "r", "uid": "1"},
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "2"}
                ]),
                "r",
            ),
        ] {
            let mut pod: K8sPod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "n", "ownerReferences": owners}
            }))
            .unwrap();
            let before = convert::pod(&pod, &OwnerIndex::default()).unwrap();
            trim_pod(&mut pod);
            assert_eq!(pod.metadata.owner_references.as_ref().unwrap().len(), 1);
            let after = convert::pod(&pod, &OwnerIndex::default()).unwrap();
            assert_eq!(after, before);
            assert_eq!(after.workload.name, want);
        }
    }

    #[test]
    fn pod_trim_keeps_a_mirror_pods_event_uid() {
        let mut pod: K8sPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "etcd-node-a", "namespace": "kube-system", "uid": "api-uid",
                "annotations": {"kubernetes.io/config.mirror": "static-uid",
                                "kubernetes.io/config.hash": "static-uid"}}
        }))
        .unwrap();
        let before = convert::pod(&pod, &OwnerIndex::default()).unwrap();
        assert_eq!(before.uid.as_deref(), Some("static-uid"));
        trim_pod(&mut pod);
        assert_eq!(convert::pod(&pod, &OwnerIndex::default()).unwrap(), before);
        assert_eq!(pod.metadata.annotations.as_ref().map(|a| a.len()), Some(1));
    }

    #[test]
    fn policy_trim_keeps_own_annotations() {
        let mut np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"},
                "annotations": {"deny-observer.io/owner": "team-a", "other": "x"},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        trim_policy(&mut np);
        let ann = np.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann.len(), 1);
        assert_eq!(ann["deny-observer.io/owner"], "team-a");
        assert!(np.metadata.managed_fields.is_none());
        assert_eq!(
            np.spec.as_ref().unwrap().policy_types.as_ref().unwrap()[0],
            "Ingress"
        );
    }
}

#[cfg(test)]
mod store_tests;
