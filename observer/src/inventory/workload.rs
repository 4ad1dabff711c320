//! Workload resolution: which controller a pod belongs to.
//!
//! A pod's controlling `ownerReference` names its immediate owner. Two kinds of owner are
//! themselves owned, and the SRE wants the top of the chain:
//!
//! - ReplicaSet → Deployment. When the ReplicaSet object is known ([`OwnerIndex`]), its own
//!   controller is used. Without it, the Deployment controller's naming rule is applied: a
//!   ReplicaSet is named `<deployment>-<pod-template-hash>`, and the pod carries the same
//!   `pod-template-hash` label. Argo Rollouts names its ReplicaSets the same way, with the hash
//!   in the pods' `rollouts-pod-template-hash` label: without the object, such a pod's workload
//!   is the `Rollout`, not the ReplicaSet of one revision.
//! - Job → CronJob. When the Job object is known, its own controller is used. Without it, the
//!   CronJob controller's naming rule is applied: `<cronjob>-<scheduled time in minutes since the
//!   epoch>` (kubernetes/kubernetes `pkg/controller/cronjob/utils.go`, `getJobName` and
//!   `getTimeHashInMinutes`: `fmt.Sprintf("%s-%d", cj.Name, scheduledTime.Unix()/60)`). Minutes
//!   since the epoch have had 8 digits since 1973, so at least 8 digits are required.
//!
//! StatefulSet, DaemonSet and any other controller kind are taken as the workload directly. A
//! pod without owners is its own workload (`kind: Pod`), and so is a mirror pod (a static pod,
//! owned by its Node).

use std::collections::HashMap;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::model::{Labels, Workload};

/// Label the Deployment controller puts on a ReplicaSet's pods; also the suffix of the
/// ReplicaSet's name.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Label the Argo Rollouts controller puts on its ReplicaSets' pods instead of
/// [`POD_TEMPLATE_HASH_LABEL`]; its ReplicaSets are named `<rollout>-<hash>` likewise.
pub const ROLLOUT_POD_TEMPLATE_HASH_LABEL: &str = "rollouts-pod-template-hash";

/// Shortest digit suffix accepted as a CronJob schedule time (minutes since the epoch).
const CRONJOB_SUFFIX_MIN_DIGITS: usize = 8;

/// Owners of intermediate controllers (ReplicaSets and Jobs), learned from those objects when
/// they are available. Lookups fall back to naming heuristics when an object is missing, so an
/// empty index (`OwnerIndex::default()`) still resolves the usual cases.
#[derive(Clone, Debug, Default)]
pub struct OwnerIndex {
    /// (namespace, ReplicaSet name) → its controller, or `None` for an orphan ReplicaSet.
    replicasets: HashMap<(String, String), Option<Workload>>,
    /// (namespace, Job name) → its controller, or `None` for a Job nobody owns.
    jobs: HashMap<(String, String), Option<Workload>>,
}

impl OwnerIndex {
    /// Records a ReplicaSet object's controller. Objects without a namespace or name are ignored
    /// (they cannot own a pod).
    pub fn insert_replicaset(&mut self, rs: &ReplicaSet) {
        if let (Some(ns), Some(name)) = (&rs.metadata.namespace, &rs.metadata.name) {
            let refs = rs.metadata.owner_references.as_deref().unwrap_or_default();
            self.insert_replicaset_refs(ns, name, refs);
        }
    }

    /// Records a ReplicaSet's controller from its namespace, name and owner references.
    pub fn insert_replicaset_refs(&mut self, namespace: &str, name: &str, refs: &[OwnerReference]) {
        self.replicasets.insert(
            (namespace.to_owned(), name.to_owned()),
            controller_of(refs).map(owner_workload),
        );
    }

    /// Forgets a ReplicaSet (deleted from the cluster).
    pub fn remove_replicaset(&mut self, namespace: &str, name: &str) {
        self.replicasets
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Records a Job object's controller. Objects without a namespace or name are ignored.
    pub fn insert_job(&mut self, job: &Job) {
        if let (Some(ns), Some(name)) = (&job.metadata.namespace, &job.metadata.name) {
            let refs = job.metadata.owner_references.as_deref().unwrap_or_default();
            self.insert_job_refs(ns, name, refs);
        }
    }

    /// Records a Job's controller from its namespace, name and owner references.
    pub fn insert_job_refs(&mut self, namespace: &str, name: &str, refs: &[OwnerReference]) {
        self.jobs.insert(
            (namespace.to_owned(), name.to_owned()),
            controller_of(refs).map(owner_workload),
        );
    }

    /// Forgets a Job (deleted from the cluster).
    pub fn remove_job(&mut self, namespace: &str, name: &str) {
        self.jobs.remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Number of ReplicaSets and Jobs recorded.
    pub fn len(&self) -> usize {
        self.replicasets.len() + self.jobs.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replicaset(&self, namespace: &str, name: &str) -> Option<&Option<Workload>> {
        self.replicasets
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    fn job(&self, namespace: &str, name: &str) -> Option<&Option<Workload>> {
        self.jobs.get(&(namespace.to_owned(), name.to_owned()))
    }
}

/// The controlling owner reference. Controllers always set `controller: true`; hand-written
/// manifests often omit it, so the first reference stands in when none is marked.
pub(crate) fn controller_of(refs: &[OwnerReference]) -> Option<&OwnerReference> {
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())
}

fn owner_workload(r: &OwnerReference) -> Workload {
    Workload {
        kind: r.kind.clone(),
        name: r.name.clone(),
    }
}

/// Resolves the workload of a pod from its namespace, name, labels and owner references.
pub fn resolve(
    namespace: &str,
    pod_name: &str,
    labels: &Labels,
    owner_refs: &[OwnerReference],
    owners: &OwnerIndex,
) -> Workload {
    let Some(owner) = controller_of(owner_refs) else {
        return Workload {
            kind: "Pod".to_owned(),
            name: pod_name.to_owned(),
        };
    };
    match owner.kind.as_str() {
        "ReplicaSet" => match owners.replicaset(namespace, &owner.name) {
            Some(Some(parent)) => parent.clone(),
            Some(None) => owner_workload(owner),
            None => deployment_from_hash(&owner.name, labels)
                .map(|name| Workload {
                    kind: "Deployment".to_owned(),
                    name: name.to_owned(),
                })
                .or_else(|| {
                    rollout_from_hash(&owner.name, labels).map(|name| Workload {
                        kind: "Rollout".to_owned(),
                        name: name.to_owned(),
                    })
                })
                .unwrap_or_else(|| owner_workload(owner)),
        },
        // A mirror pod (kubelet's copy of a static pod) is owned by its Node. The node is no
        // workload: taken as one, every static pod of a node would share the node's name.
        "Node" => Workload {
            kind: "Pod".to_owned(),
            name: pod_name.to_owned(),
        },
        "Job" => match owners.job(namespace, &owner.name) {
            Some(Some(parent)) => parent.clone(),
            Some(None) => owner_workload(owner),
            None => cronjob_from_job_name(&owner.name)
                .map(|name| Workload {
                    kind: "CronJob".to_owned(),
                    name: name.to_owned(),
                })
                .unwrap_or_else(|| owner_workload(owner)),
        },
        _ => owner_workload(owner),
    }
}

/// The Deployment name when `rs_name` is `<deployment>-<pod-template-hash label>`.
pub fn deployment_from_hash<'a>(rs_name: &'a str, labels: &Labels) -> Option<&'a str> {
    owner_from_hash(rs_name, labels, POD_TEMPLATE_HASH_LABEL)
}

/// The Argo Rollout name when `rs_name` is `<rollout>-<rollouts-pod-template-hash label>`.
pub fn rollout_from_hash<'a>(rs_name: &'a str, labels: &Labels) -> Option<&'a str> {
    owner_from_hash(rs_name, labels, ROLLOUT_POD_TEMPLATE_HASH_LABEL)
}

/// The prefix of `rs_name` before `-<value of the hash label>`.
fn owner_from_hash<'a>(rs_name: &'a str, labels: &Labels, hash_label: &str) -> Option<&'a str> {
    let hash = labels.get(hash_label)?;
    if hash.is_empty() {
        return None;
    }
    let prefix = rs_name.strip_suffix(hash)?.strip_suffix('-')?;
    (!prefix.is_empty()).then_some(prefix)
}

/// The CronJob name when `job_name` is `<cronjob>-<scheduled minute>` as the CronJob controller
/// names its Jobs.
pub fn cronjob_from_job_name(job_name: &str) -> Option<&str> {
    let (prefix, digits) = job_name.rsplit_once('-')?;
    let is_minutes =
        digits.len() >= CRONJOB_SUFFIX_MIN_DIGITS && digits.bytes().all(|b| b.is_ascii_digit());
    (is_minutes && !prefix.is_empty()).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oref(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            controller,
            block_owner_deletion: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wl(kind: &str, name: &str) -> Workload {
        Workload {
            kind: kind.into(),
            name: name.into(),
        }
    }

    #[test]
    fn bare_pod_is_its_own_workload() {
        let w = resolve("ns", "debug", &Labels::new(), &[], &OwnerIndex::default());
        assert_eq!(w, wl("Pod", "debug"));
    }

    #[test]
    fn replicaset_resolved_by_hash_without_replicaset_object() {
        let l = labels(&[("pod-template-hash", "7d4b9c8f6"), ("app", "web")]);
        let w = resolve(
            "prod",
            "web-api-7d4b9c8f6-xk2lp",
            &l,
            &[oref("ReplicaSet", "web-api-7d4b9c8f6", Some(true))],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("Deployment", "web-api"));
    }

    #[test]
    fn replicaset_hash_mismatch_stays_replicaset() {
        // A hand-made ReplicaSet whose name does not end in the hash is not a Deployment's.
        let l = labels(&[("pod-template-hash", "abc")]);
        let w = resolve(
            "prod",
            "p",
            &l,
            &[oref("ReplicaSet", "standalone-rs", Some(true))],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("ReplicaSet", "standalone-rs"));
        // No hash label at all.
        let w = resolve(
            "prod",
            "p",
            &Labels::new(),
            &[oref("ReplicaSet", "web-7d4b9c8f6", Some(true))],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("ReplicaSet", "web-7d4b9c8f6"));
        // The hash alone is not a name.
        let l = labels(&[("pod-template-hash", "abc")]);
        assert_eq!(deployment_from_hash("-abc", &l), None);
        assert_eq!(deployment_from_hash("abc", &l), None);
        assert_eq!(deployment_from_hash("xabc", &l), None);
    }

    #[test]
    fn replicaset_resolved_through_index_beats_heuristic() {
        let mut idx = OwnerIndex::default();
        // An Argo Rollout owns this ReplicaSet; the hash heuristic would say Deployment.
        idx.insert_replicaset_refs(
            "prod",
            "web-7d4b9c8f6",
            &[oref("Rollout", "web-rollout", Some(true))],
        );
        idx.insert_replicaset_refs("prod", "orphan-5f5f5f", &[]);
        let l = labels(&[("pod-template-hash", "7d4b9c8f6")]);
        let w = resolve(
            "prod",
            "p",
            &l,
            &[oref("ReplicaSet", "web-7d4b9c8f6", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("Rollout", "web-rollout"));
        let l = labels(&[("pod-template-hash", "5f5f5f")]);
        let w = resolve(
            "prod",
            "p",
            &l,
            &[oref("ReplicaSet", "orphan-5f5f5f", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("ReplicaSet", "orphan-5f5f5f"));
        // Same name in another namespace is not confused.
        let l = labels(&[("pod-template-hash", "7d4b9c8f6")]);
        let w = resolve(
            "dev",
            "p",
            &l,
            &[oref("ReplicaSet", "web-7d4b9c8f6", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("Deployment", "web"));
        idx.remove_replicaset("prod", "web-7d4b9c8f6");
        let w = resolve(
            "prod",
            "p",
            &l,
            &[oref("ReplicaSet", "web-7d4b9c8f6", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("Deployment", "web"));
    }

    #[test]
    fn replicaset_object_learned_from_k8s_object() {
        let mut rs = ReplicaSet::default();
        rs.metadata.namespace = Some("prod".into());
        rs.metadata.name = Some("db-proxy-66c9".into());
        rs.metadata.owner_references = Some(vec![
            oref("SomethingElse", "gc-owner", None),
            oref("Deployment", "db-proxy", Some(true)),
        ]);
        let mut idx = OwnerIndex::default();
        idx.insert_replicaset(&rs);
        assert_eq!(idx.len(), 1);
        let w = resolve(
            "prod",
            "p",
            &Labels::new(),
            &[oref("ReplicaSet", "db-proxy-66c9", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("Deployment", "db-proxy"));
    }

    #[test]
    fn statefulset_and_daemonset_are_direct() {
        let idx = OwnerIndex::default();
        let w = resolve(
            "prod",
            "db-0",
            &Labels::new(),
            &[oref("StatefulSet", "db", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("StatefulSet", "db"));
        let w = resolve(
            "kube-system",
            "agent-x7",
            &Labels::new(),
            &[oref("DaemonSet", "agent", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("DaemonSet", "agent"));
    }

    #[test]
    fn controller_flag_wins_over_order() {
        let w = resolve(
            "ns",
            "p",
            &Labels::new(),
            &[
                oref("ConfigMap", "gc-anchor", Some(false)),
                oref("StatefulSet", "db", Some(true)),
            ],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("StatefulSet", "db"));
        // No controller flag anywhere: the first reference is the owner.
        let w = resolve(
            "ns",
            "p",
            &Labels::new(),
            &[oref("StatefulSet", "db", None)],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("StatefulSet", "db"));
    }

    #[test]
    fn job_resolved_to_cronjob_by_name_heuristic() {
        // 29_000_000 minutes ≈ 2025: the CronJob controller's Job naming.
        let w = resolve(
            "batch",
            "nightly-report-29012345-abcde",
            &Labels::new(),
            &[oref("Job", "nightly-report-29012345", Some(true))],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("CronJob", "nightly-report"));
        // Too few digits, or not digits: a plain Job.
        for job in [
            "migrate-1234567",
            "migrate-v2",
            "migrate-2901234a",
            "12345678",
        ] {
            let w = resolve(
                "batch",
                "p",
                &Labels::new(),
                &[oref("Job", job, Some(true))],
                &OwnerIndex::default(),
            );
            assert_eq!(w, wl("Job", job), "{job}");
        }
        assert_eq!(cronjob_from_job_name("-29012345"), None);
    }

    #[test]
    fn static_pods_are_their_own_workload_not_their_node() {
        // kubelet's mirror pod of a static pod (`<manifest>-<node>`) is owned by its Node:
        // the node is no workload, and every static pod of a node would share its name.
        let node = OwnerReference {
            api_version: "v1".into(),
            ..oref("Node", "cp-1", Some(true))
        };
        for pod in ["kube-apiserver-cp-1", "etcd-cp-1"] {
            let w = resolve(
                "kube-system",
                pod,
                &Labels::new(),
                std::slice::from_ref(&node),
                &OwnerIndex::default(),
            );
            assert_eq!(w, wl("Pod", pod));
        }
    }

    #[test]
    fn argo_rollout_pods_resolve_without_replicaset_objects() {
        // Argo Rollouts names its ReplicaSets `<rollout>-<hash>` and labels their pods with
        // `rollouts-pod-template-hash` (not `pod-template-hash`). Without the ReplicaSet
        // objects (the API-server inventory watches none), the workload must not be the
        // ReplicaSet, whose name changes at every rollout.
        let l = labels(&[("rollouts-pod-template-hash", "6f8d9c7b5"), ("app", "web")]);
        let w = resolve(
            "prod",
            "web-6f8d9c7b5-abcde",
            &l,
            &[oref("ReplicaSet", "web-6f8d9c7b5", Some(true))],
            &OwnerIndex::default(),
        );
        assert_eq!(w, wl("Rollout", "web"));
        // The ReplicaSet object, when known, still wins.
        let mut idx = OwnerIndex::default();
        idx.insert_replicaset_refs("prod", "web-6f8d9c7b5", &[]);
        let w = resolve(
            "prod",
            "web-6f8d9c7b5-abcde",
            &l,
            &[oref("ReplicaSet", "web-6f8d9c7b5", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("ReplicaSet", "web-6f8d9c7b5"));
    }

    #[test]
    fn job_resolved_through_index() {
        let mut idx = OwnerIndex::default();
        let mut job = Job::default();
        job.metadata.namespace = Some("batch".into());
        job.metadata.name = Some("backup".into());
        job.metadata.owner_references = Some(vec![oref("CronJob", "backup-cron", Some(true))]);
        idx.insert_job(&job);
        // A manual Job whose name looks like a CronJob's, known to be unowned.
        idx.insert_job_refs("batch", "manual-29012345", &[]);
        let w = resolve(
            "batch",
            "p",
            &Labels::new(),
            &[oref("Job", "backup", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("CronJob", "backup-cron"));
        let w = resolve(
            "batch",
            "p",
            &Labels::new(),
            &[oref("Job", "manual-29012345", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("Job", "manual-29012345"));
        idx.remove_job("batch", "manual-29012345");
        let w = resolve(
            "batch",
            "p",
            &Labels::new(),
            &[oref("Job", "manual-29012345", Some(true))],
            &idx,
        );
        assert_eq!(w, wl("CronJob", "manual"));
    }
}
