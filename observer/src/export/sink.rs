//! The Prometheus sink: records each drain's [`Outcomes`] on [`Metrics`].

use std::sync::Arc;
use std::time::SystemTime;

use super::labels::{DropLabels, PolicyDenyLabels};
use super::metrics::Metrics;
use crate::attribute::{Outcomes, Sink, endpoint_labels};
use crate::capture::Losses;

/// `stage` values of `deny_observer_events_lost_total` for the kernel side's losses.
fn kernel_losses(losses: &Losses) -> [(&'static str, u64); 10] {
    [
        ("ringbuf_full", losses.ringbuf_full),
        ("flow_insert", losses.flow_insert),
        ("skb_read", losses.skb_read),
        ("truncated_header", losses.truncated_header),
        (
            "ipv6_ext_headers_exceeded",
            losses.ipv6_ext_headers_exceeded,
        ),
        ("header_not_linear", losses.header_not_linear),
        ("drop_log_full", losses.drop_log_full),
        ("sample_budget", losses.sample_budget),
        ("flow_map_evicted", losses.evicted_packets),
        ("recursion_miss", losses.recursion_miss.unwrap_or(0)),
    ]
}

/// Records outcomes on the daemon's metrics.
#[derive(Clone)]
pub struct MetricsSink {
    metrics: Arc<Metrics>,
}

impl MetricsSink {
    /// A sink recording on `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl Sink for MetricsSink {
    fn record(&mut self, out: &Outcomes, _now: SystemTime) {
        let m = &self.metrics;
        for (reason, packets, bytes) in &out.kernel.reason_totals {
            m.record_kernel_drops(reason, *packets, *bytes);
        }
        for (stage, n) in kernel_losses(&out.kernel.losses) {
            if n > 0 {
                m.record_loss(stage, n);
            }
        }
        if out.bad_samples > 0 {
            m.record_loss("sample_malformed", out.bad_samples);
        }
        m.set_flow_map(out.kernel.flow_map_entries, out.kernel.flow_map_capacity);
        for d in &out.drops {
            let (source_namespace, source_workload) = endpoint_labels(d.src.as_ref());
            let (destination_namespace, destination_workload) = endpoint_labels(d.dst.as_ref());
            m.record_drop(
                &DropLabels {
                    reason: &d.reason,
                    direction: d.direction,
                    source_namespace,
                    source_workload,
                    destination_namespace,
                    destination_workload,
                    protocol: d.protocol,
                },
                d.packets,
                d.bytes,
            );
        }
        for d in &out.denies {
            let (source_namespace, source_workload) = endpoint_labels(d.src.as_ref());
            let (destination_namespace, destination_workload) = endpoint_labels(d.dst.as_ref());
            m.record_policy_deny(
                &PolicyDenyLabels {
                    direction: d.direction,
                    source_namespace,
                    source_workload,
                    destination_namespace,
                    destination_workload,
                    protocol: d.protocol,
                    policy: &d.policy,
                    policy_match: d.policy_match,
                },
                d.packets,
            );
        }
    }
}
