//! What changed between two inventory snapshots, so that a pod change updates the views that
//! depend on it instead of rebuilding them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Inventory, Pod};

/// The pods that differ between two snapshots. A changed pod is in both lists: its old version
/// in `removed`, its new one in `added`.
#[derive(Clone, Debug, Default)]
pub struct PodDelta {
    /// Pods of the old snapshot that are gone or changed.
    pub removed: Vec<Arc<Pod>>,
    /// Pods of the new snapshot that are new or changed.
    pub added: Vec<Arc<Pod>>,
}

impl PodDelta {
    /// True when no pod changed.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    /// Every address of a removed or added pod: an address whose owner may have changed.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.removed
            .iter()
            .chain(&self.added)
            .flat_map(|p| p.ips.iter().map(|ip| ip.to_canonical()))
    }
}

/// `new`, with every object whose content did not change taken from `old` (the same `Arc`),
/// and the pods that did change.
///
/// A manifest reload parses every object again; keeping the old `Arc`s of unchanged objects
/// means the views built on `old` stay valid for them and the new copies are freed at once,
/// rather than two copies of the cluster living side by side. Snapshots from the API server
/// already share their unchanged `Arc`s, which makes this a walk of pointer comparisons.
pub fn rebase(old: &Inventory, new: Arc<Inventory>) -> (Arc<Inventory>, PodDelta) {
    let (pods, delta, pods_substituted) = rebase_pods(&old.pods, &new.pods);
    let mut substituted = pods_substituted;
    let policies = new
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| match old.policies.get(i) {
            Some(o) if !Arc::ptr_eq(o, p) && o == p => {
                substituted = true;
                Arc::clone(o)
            }
            _ => Arc::clone(p),
        })
        .collect();
    if !substituted {
        return (new, delta);
    }
    let inventory = Inventory {
        namespaces: new.namespaces.clone(),
        pods,
        policies,
        services: new.services.clone(),
        invalid: new.invalid.clone(),
    };
    (Arc::new(inventory), delta)
}

fn same(a: &Arc<Pod>, b: &Arc<Pod>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The pods of `new` with unchanged ones taken from `old`, the delta, and whether any was
/// substituted.
fn rebase_pods(old: &[Arc<Pod>], new: &[Arc<Pod>]) -> (Vec<Arc<Pod>>, PodDelta, bool) {
    // Snapshots are sorted and a change touches few pods: the common prefix and suffix cover
    // nearly everything, and only the window between them is matched by name.
    let prefix = old.iter().zip(new).take_while(|(a, b)| same(a, b)).count();
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| same(a, b))
        .count();
    let old_mid = &old[prefix..old.len() - suffix];
    let new_mid = &new[prefix..new.len() - suffix];
    let mut out: Vec<Arc<Pod>> = Vec::with_capacity(new.len());
    let mut substituted = false;
    let mut keep = |o: &Arc<Pod>, n: &Arc<Pod>, out: &mut Vec<Arc<Pod>>| {
        substituted |= !Arc::ptr_eq(o, n);
        out.push(Arc::clone(o));
    };
    for (o, n) in old.iter().zip(new).take(prefix) {
        keep(o, n, &mut out);
    }
    let mut delta = PodDelta::default();
    let mut by_name: HashMap<(&str, &str), (usize, bool)> = old_mid
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.namespace.as_str(), p.name.as_str()), (i, false)))
        .collect();
    for n in new_mid {
        match by_name.get_mut(&(n.namespace.as_str(), n.name.as_str())) {
            Some((i, kept)) if same(&old_mid[*i], n) => {
                *kept = true;
                keep(&old_mid[*i], n, &mut out);
            }
            _ => {
                delta.added.push(Arc::clone(n));
                out.push(Arc::clone(n));
            }
        }
    }
    let mut removed: Vec<(usize, &Arc<Pod>)> = by_name
        .into_values()
        .filter(|(_, kept)| !kept)
        .map(|(i, _)| (i, &old_mid[i]))
        .collect();
    removed.sort_by_key(|(i, _)| *i);
    delta.removed = removed.into_iter().map(|(_, p)| Arc::clone(p)).collect();
    let (old_tail, new_tail) = (&old[old.len() - suffix..], &new[new.len() - suffix..]);
    for (o, n) in old_tail.iter().zip(new_tail) {
        keep(o, n, &mut out);
    }
    (out, delta, substituted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{PodPhase, Workload};

    fn pod(name: &str, ip: &str) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: "prod".into(),
            name: name.into(),
            labels: Default::default(),
            ips: vec![ip.parse().unwrap()],
            host_network: false,
            node_name: None,
            phase: PodPhase::Running,
            uid: None,
            created_unix: 1,
            ports: vec![],
            workload: Workload {
                kind: "Deployment".into(),
                name: "w".into(),
            },
        })
    }

    fn inv(pods: Vec<Arc<Pod>>) -> Arc<Inventory> {
        Arc::new(Inventory {
            pods,
            ..Default::default()
        })
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn shared_arcs_give_the_changed_pods_only() {
        let (a, b, c, d) = (
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2"),
            pod("c", "10.0.0.3"),
            pod("d", "10.0.0.4"),
        );
        let b2 = pod("b", "10.0.0.9");
        let old = inv(vec![a.clone(), b.clone(), c.clone()]);
        let new = inv(vec![a.clone(), b2.clone(), d.clone()]);
        let (rebased, delta) = rebase(&old, Arc::clone(&new));
        assert!(Arc::ptr_eq(&rebased, &new), "nothing to substitute");
        assert_eq!(names(&delta.removed), ["b", "c"]);
        assert_eq!(names(&delta.added), ["b", "d"]);
        let mut addrs: Vec<String> = delta.addresses().map(|i| i.to_string()).collect();
        addrs.sort();
        assert_eq!(addrs, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.9"]);
    }

    #[test]
    fn equal_copies_are_replaced_by_the_old_arcs() {
        let old = inv(vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.2")]);
        // A reload parses everything again: equal content, new allocations.
        let new = inv(vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.7")]);
        let (rebased, delta) = rebase(&old, new);
        assert!(Arc::ptr_eq(&rebased.pods[0], &old.pods[0]));
        assert!(!Arc::ptr_eq(&rebased.pods[1], &old.pods[1]));
        assert_eq!(rebased.pods[1].ips, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(names(&delta.removed), ["b"]);
        assert_eq!(names(&delta.added), ["b"]);
        let (_, none) = rebase(&rebased, Arc::clone(&rebased));
        assert!(none.is_empty());
    }

    #[test]
    fn unsorted_and_reordered_snapshots() {
        let pods: Vec<Arc<Pod>> = (0..20)
            .map(|i| pod(&format!("p{i:02}"), &format!("10.0.1.{i}")))
            .collect();
        let old = inv(pods.clone());
        let mut reordered = pods.clone();
        reordered.reverse();
        reordered.retain(|p| p.name != "p07");
        reordered.push(pod("p20", "10.0.1.20"));
        let (rebased, delta) = rebase(&old, inv(reordered));
        assert_eq!(names(&delta.removed), ["p07"]);
        assert_eq!(names(&delta.added), ["p20"]);
        assert_eq!(rebased.pods.len(), 20);
    }
}
