//! Writing the inventory directory `deny-observer run --inventory <dir>` reads: Kubernetes
//! Namespaces and Pods as the API server would return them, for the pods of a [`SimNode`].
//!
//! [`SimNode`]: crate::simnode::SimNode

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::simnode::{Pod, Proto};

/// What owns a pod, as its `ownerReferences` say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A Deployment's pod: owned by ReplicaSet `<deployment>-<hash>`, with label
    /// `pod-template-hash=<hash>`. No ReplicaSet object is written: the daemon must resolve it
    /// through the label.
    Deployment {
        /// Deployment name.
        name: String,
        /// The pod-template-hash.
        hash: String,
    },
    /// A StatefulSet's pod.
    StatefulSet(String),
    /// A DaemonSet's pod.
    DaemonSet(String),
    /// A Job's pod.
    Job(String),
    /// No owner: a bare pod.
    None,
}

impl Owner {
    /// The workload name the daemon should report for such a pod (`pod_name` for a bare pod).
    pub fn workload<'a>(&'a self, pod_name: &'a str) -> &'a str {
        match self {
            Owner::Deployment { name, .. } => name,
            Owner::StatefulSet(n) | Owner::DaemonSet(n) | Owner::Job(n) => n,
            Owner::None => pod_name,
        }
    }
}

/// The Kubernetes side of a simulated pod.
#[derive(Clone, Debug)]
pub struct PodMeta {
    /// Labels (the owner's labels, such as `pod-template-hash`, are added by [`pod_manifest`]).
    pub labels: BTreeMap<String, String>,
    /// Owner.
    pub owner: Owner,
    /// Container ports: (name, port, protocol).
    pub ports: Vec<(String, u16, Proto)>,
}

impl PodMeta {
    /// A pod with `app=<app>` and the given owner, no ports.
    pub fn app(app: &str, owner: Owner) -> Self {
        Self {
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            owner,
            ports: Vec::new(),
        }
    }

    /// Adds a container port.
    pub fn port(mut self, name: &str, port: u16, protocol: Proto) -> Self {
        self.ports.push((name.to_owned(), port, protocol));
        self
    }
}

fn uid(kind: &str, namespace: &str, name: &str) -> String {
    // Stable, unique enough for an inventory: a hash of the identity in UUID shape.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{kind}/{namespace}/{name}").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 4) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

/// A Namespace object.
pub fn namespace_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": uid("Namespace", "", name),
            "labels": { "kubernetes.io/metadata.name": name },
        },
    })
}

/// A running Pod object for `pod` (its IPs come from the simulated node).
pub fn pod_manifest(pod: &Pod, meta: &PodMeta, node_name: &str) -> Value {
    let mut labels = meta.labels.clone();
    let owner = match &meta.owner {
        Owner::Deployment { name, hash } => {
            labels.insert("pod-template-hash".to_owned(), hash.clone());
            Some(("ReplicaSet", format!("{name}-{hash}")))
        }
        Owner::StatefulSet(n) => Some(("StatefulSet", n.clone())),
        Owner::DaemonSet(n) => Some(("DaemonSet", n.clone())),
        Owner::Job(n) => {
            labels.insert("job-name".to_owned(), n.clone());
            Some(("Job", n.clone()))
        }
        Owner::None => None,
    };
    let api = |kind: &str| if kind == "Job" { "batch/v1" } else { "apps/v1" };
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "uid": uid("Pod", &pod.namespace, &pod.name),
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": labels,
    });
    if let Some((kind, name)) = owner {
        metadata["ownerReferences"] = json!([{
            "apiVersion": api(kind),
            "kind": kind,
            "name": name,
            "uid": uid(kind, &pod.namespace, &name),
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    let ports: Vec<Value> = meta
        .ports
        .iter()
        .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto.k8s()}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": node_name,
            "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10", "ports": ports }],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ipv4.to_string(),
            "podIPs": [{ "ip": pod.ipv4.to_string() }, { "ip": pod.ipv6.to_string() }],
        },
    })
}

/// Writes a manifest-directory inventory of a simulated node into `dir` (created if missing):
/// `namespaces.json` (every namespace a pod or policy is in), `pods.json` (`pods[i]` described by
/// `metas[i]`, on node `node_name`) and, when there are any, `policies.json`.
pub fn write_inventory(
    dir: &Path,
    pods: &[Pod],
    metas: &[PodMeta],
    node_name: &str,
    policies: Vec<Value>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut namespaces: Vec<&str> = pods
        .iter()
        .map(|p| p.namespace.as_str())
        .chain(
            policies
                .iter()
                .filter_map(|p| p.pointer("/metadata/namespace").and_then(Value::as_str)),
        )
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    write_list(
        dir,
        "namespaces.json",
        namespaces.into_iter().map(namespace_manifest).collect(),
    )?;
    let pod_objects = pods
        .iter()
        .zip(metas)
        .map(|(p, m)| pod_manifest(p, m, node_name))
        .collect();
    write_list(dir, "pods.json", pod_objects)?;
    if !policies.is_empty() {
        write_list(dir, "policies.json", policies)?;
    }
    Ok(())
}

/// Writes `objects` to `dir/<file>` as a `kind: List` (JSON, which the loader reads like YAML).
pub fn write_list(dir: &Path, file: &str, objects: Vec<Value>) -> std::io::Result<()> {
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    let text = serde_json::to_string_pretty(&list).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(file), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_pod_is_owned_by_its_replicaset() {
        let pod = Pod {
            namespace: "shop".into(),
            name: "api-5d8f7-x2x9q".into(),
            netns: "n".into(),
            ipv4: "10.244.3.10".parse().unwrap(),
            ipv6: "fd00:244:0:3::a".parse().unwrap(),
            mac: "0a:58:0a:f4:03:0a".into(),
            host_veth: "v".into(),
        };
        let meta = PodMeta::app(
            "api",
            Owner::Deployment {
                name: "api".into(),
                hash: "5d8f7".into(),
            },
        )
        .port("http", 8080, Proto::Tcp);
        let m = pod_manifest(&pod, &meta, "node-1");
        assert_eq!(m["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
        assert_eq!(m["metadata"]["ownerReferences"][0]["name"], "api-5d8f7");
        assert_eq!(m["metadata"]["labels"]["pod-template-hash"], "5d8f7");
        assert_eq!(m["status"]["podIPs"][1]["ip"], "fd00:244:0:3::a");
        assert_eq!(
            m["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert_eq!(meta.owner.workload(&pod.name), "api");
        assert_eq!(Owner::None.workload("scanner"), "scanner");
        assert_ne!(uid("Pod", "a", "b"), uid("Pod", "a", "c"));
    }

    #[test]
    fn inventory_directory_has_every_namespace_once() {
        let pod = |ns: &str, name: &str| Pod {
            namespace: ns.into(),
            name: name.into(),
            netns: "n".into(),
            ipv4: "10.244.3.10".parse().unwrap(),
            ipv6: "fd00:244:0:3::a".parse().unwrap(),
            mac: "0a:58:0a:f4:03:0a".into(),
            host_veth: "v".into(),
        };
        let pods = [pod("shop", "a"), pod("shop", "b"), pod("tools", "c")];
        let metas: Vec<PodMeta> = ["a", "b", "c"]
            .iter()
            .map(|n| PodMeta::app(n, Owner::None))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let inv = dir.path().join("inventory");
        let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "empty"}, "spec": {"podSelector": {}}});
        write_inventory(&inv, &pods, &metas, "n1", vec![policy]).unwrap();
        let read = |f: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(inv.join(f)).unwrap()).unwrap()
        };
        let names: Vec<String> = read("namespaces.json")["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["empty", "shop", "tools"]);
        assert_eq!(read("pods.json")["items"].as_array().unwrap().len(), 3);
        assert_eq!(read("policies.json")["items"].as_array().unwrap().len(), 1);
        // No policies: no policies file.
        let inv2 = dir.path().join("bare");
        write_inventory(&inv2, &pods, &metas, "n1", Vec::new()).unwrap();
        assert!(!inv2.join("policies.json").exists());
    }
}
