//! Series increments of one drain, summed per label set before they reach [`Metrics`].
//!
//! A drain reports one record per flow that changed, and a scan or a wide flood makes
//! thousands of flows that differ only in their ports and land on a handful of series.
//! Looking each record's label strings up in the series maps was about a quarter of the
//! daemon's CPU in such a flood (`cargo xtask bench`, udp-many). Here records are summed under a
//! key of pointers and small integers first, and each label set is looked up once per drain.
use std::mem::Discriminant;
use std::sync::Arc;

use super::metrics::{DropLabels, Metrics, PolicyDenyLabels, PolicyMatch};
use crate::flow::{Direction, FastMap, Protocol};
use crate::inventory::Endpoint;

/// The `(namespace, workload)` labels of an endpoint; `("", "unknown")` when the address is
/// unknown.
pub fn endpoint_labels(ep: Option<&Endpoint>) -> (&str, &str) {
    match ep {
        Some(ep) => (ep.namespace_label(), ep.workload_label()),
        None => ("", "unknown"),
    }
}

/// Identity of an endpoint within one drain: its kind, and for a pod the address of its
/// `Arc` (the batch holds a clone, so the address stays unique until the flush). Two pods of
/// one workload are two identities that share a series: they are summed by the series map at
/// the flush, so grouping only ever merges equal label sets.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
struct EndpointId(Option<(Discriminant<Endpoint>, usize)>);

impl EndpointId {
    fn of(ep: Option<&Endpoint>) -> Self {
        Self(ep.map(|e| {
            let ptr = match e {
                Endpoint::Pod(p) => Arc::as_ptr(p) as usize,
                _ => 0,
            };
            (std::mem::discriminant(e), ptr)
        }))
    }
}

#[derive(PartialEq, Eq, Hash)]
struct DropKey {
    /// Address of the reason label's `Arc<str>` (one per reason in the capture stage).
    reason: usize,
    direction: Direction,
    protocol: Protocol,
    src: EndpointId,
    dst: EndpointId,
}

struct DropSum {
    reason: Arc<str>,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
    packets: u64,
    bytes: u64,
}

#[derive(PartialEq, Eq, Hash)]
struct DenyKey {
    direction: Direction,
    protocol: Protocol,
    src: EndpointId,
    dst: EndpointId,
    /// Address of the policy label's `Arc<str>` (one per verdict).
    policy: usize,
    policy_match: PolicyMatch,
}

struct DenySum {
    policy: Arc<str>,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
    packets: u64,
}

/// Drop and policy-deny increments of one drain; [`DrainBatch::flush`] records them. Reused
/// from drain to drain, so its maps keep their capacity.
#[derive(Default)]
pub struct DrainBatch {
    drops: FastMap<DropKey, DropSum>,
    denies: FastMap<DenyKey, DenySum>,
}

impl DrainBatch {
    /// Adds a drop record for `deny_observer_drops_total` / `deny_observer_drop_bytes_total`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_drop(
        &mut self,
        reason: &Arc<str>,
        direction: Direction,
        protocol: Protocol,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
        packets: u64,
        bytes: u64,
    ) {
        let key = DropKey {
            reason: Arc::as_ptr(reason).cast::<u8>() as usize,
            direction,
            protocol,
            src: EndpointId::of(src),
            dst: EndpointId::of(dst),
        };
        let sum = self.drops.entry(key).or_insert_with(|| DropSum {
            reason: Arc::clone(reason),
            src: src.cloned(),
            dst: dst.cloned(),
            packets: 0,
            bytes: 0,
        });
        sum.packets += packets;
        sum.bytes += bytes;
    }

    /// Adds a record for `deny_observer_policy_denies_total`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_policy_deny(
        &mut self,
        direction: Direction,
        protocol: Protocol,
        src: Option<&Endpoint>,
        dst: Option<&Endpoint>,
        policy: &Arc<str>,
        policy_match: PolicyMatch,
        packets: u64,
    ) {
        let key = DenyKey {
            direction,
            protocol,
            src: EndpointId::of(src),
            dst: EndpointId::of(dst),
            policy: Arc::as_ptr(policy).cast::<u8>() as usize,
            policy_match,
        };
        self.denies
            .entry(key)
            .or_insert_with(|| DenySum {
                policy: Arc::clone(policy),
                src: src.cloned(),
                dst: dst.cloned(),
                packets: 0,
            })
            .packets += packets;
    }

    /// Records every sum on `metrics` and empties the batch.
    pub fn flush(&mut self, metrics: &Metrics) {
        for (key, sum) in self.drops.drain() {
            let (source_namespace, source_workload) = endpoint_labels(sum.src.as_ref());
            let (destination_namespace, destination_workload) = endpoint_labels(sum.dst.as_ref());
            metrics.record_drop(
                &DropLabels {
                    reason: &sum.reason,
                    direction: key.direction,
                    source_namespace,
                    source_workload,
                    destination_namespace,
                    destination_workload,
                    protocol: key.protocol,
                },
                sum.packets,
                sum.bytes,
            );
        }
        for (key, sum) in self.denies.drain() {
            let (source_namespace, source_workload) = endpoint_labels(sum.src.as_ref());
            let (destination_namespace, destination_workload) = endpoint_labels(sum.dst.as_ref());
            metrics.record_policy_deny(
                &PolicyDenyLabels {
                    direction: key.direction,
                    source_namespace,
                    source_workload,
                    destination_namespace,
                    destination_workload,
                    protocol: key.protocol,
                    policy: &sum.policy,
                    policy_match: key.policy_match,
                },
                sum.packets,
            );
        }
    }

    /// True when nothing is waiting for a flush.
    pub fn is_empty(&self) -> bool {
        self.drops.is_empty() && self.denies.is_empty()
    }
}
