//! The daemon's Prometheus metrics: one [`Registry`] owned by [`Metrics`], no global state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{IntCounter, IntGauge, Registry, TextEncoder};

use super::ExportError;
use super::labels::{
    BuildInfoLabels, Counters, DropLabels, Gauges, KindLabels, MetricLabels, PolicyDenyLabels,
    ReasonLabels, ResourceLabels, ResultLabels, StageLabels,
};
use super::series::{Family, Recorded};

/// `deny_observer_drops_total`: packets dropped, attributed to workloads.
pub const DROPS_TOTAL: &str = "deny_observer_drops_total";
/// `deny_observer_drop_bytes_total`: bytes of those packets.
pub const DROP_BYTES_TOTAL: &str = "deny_observer_drop_bytes_total";
/// `deny_observer_policy_denies_total`: drops explained (or not) by NetworkPolicies.
pub const POLICY_DENIES_TOTAL: &str = "deny_observer_policy_denies_total";
/// `deny_observer_kernel_drops_total{reason}`: every drop on the node.
pub const KERNEL_DROPS_TOTAL: &str = "deny_observer_kernel_drops_total";
/// `deny_observer_kernel_drop_bytes_total{reason}`.
pub const KERNEL_DROP_BYTES_TOTAL: &str = "deny_observer_kernel_drop_bytes_total";
/// `deny_observer_events_lost_total{stage}`.
pub const EVENTS_LOST_TOTAL: &str = "deny_observer_events_lost_total";
/// `deny_observer_flow_map_entries`.
pub const FLOW_MAP_ENTRIES: &str = "deny_observer_flow_map_entries";
/// `deny_observer_flow_map_capacity`.
pub const FLOW_MAP_CAPACITY: &str = "deny_observer_flow_map_capacity";
/// `deny_observer_inventory_objects{kind}`.
pub const INVENTORY_OBJECTS: &str = "deny_observer_inventory_objects";
/// `deny_observer_inventory_invalid_objects{kind}`.
pub const INVENTORY_INVALID_OBJECTS: &str = "deny_observer_inventory_invalid_objects";
/// `deny_observer_inventory_reloads_total{result}`.
pub const INVENTORY_RELOADS_TOTAL: &str = "deny_observer_inventory_reloads_total";
/// `deny_observer_inventory_watch_errors_total{resource}`.
pub const INVENTORY_WATCH_ERRORS_TOTAL: &str = "deny_observer_inventory_watch_errors_total";
/// `deny_observer_build_info{version, kernel_release, node}`.
pub const BUILD_INFO: &str = "deny_observer_build_info";
/// `deny_observer_series_overflow_total{metric}`.
pub const SERIES_OVERFLOW_TOTAL: &str = "deny_observer_series_overflow_total";
/// `deny_observer_series{metric}`: series currently held below the limit.
pub const SERIES: &str = "deny_observer_series";
/// `deny_observer_inventory_last_reload_successful`: 1 when the inventory source's last attempt
/// succeeded, else 0 (named like Prometheus' `prometheus_config_last_reload_successful`).
pub const INVENTORY_LAST_RELOAD_SUCCESSFUL: &str = "deny_observer_inventory_last_reload_successful";
/// `deny_observer_inventory_last_reload_success_timestamp_seconds`: when the inventory was
/// last known current.
pub const INVENTORY_LAST_RELOAD_SUCCESS_TIMESTAMP: &str =
    "deny_observer_inventory_last_reload_success_timestamp_seconds";
/// `deny_observer_capture_reasons_unavailable{reason}`: 1 for each configured drop reason
/// this node's kernel does not have, and so does not count.
pub const CAPTURE_REASONS_UNAVAILABLE: &str = "deny_observer_capture_reasons_unavailable";
/// `deny_observer_series_limit`: the configured limit per labelled metric.
pub const SERIES_LIMIT: &str = "deny_observer_series_limit";

/// The (namespace, workload) label pairs of the attributed families: checked by expiry, and
/// with the policy, folded into [`OVERFLOW`](super::OVERFLOW) beyond the series limit.
const ENDPOINT_LABELS: [(&str, &str); 2] = [
    ("source_namespace", "source_workload"),
    ("destination_namespace", "destination_workload"),
];
/// Labels folded into the overflow series of every attributed family.
const WORKLOAD_LABELS: [&str; 4] = [
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_workload",
];

/// `stage` value used when a sample lands in an overflow series.
pub const STAGE_SERIES_OVERFLOW: &str = "series_overflow";

/// Most policies named in one `policy` label value; the rest become `+N more`.
pub const MAX_POLICIES_IN_LABEL: usize = 5;

/// Tunables of [`Metrics`].
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Most distinct label sets per labelled metric (drops, policy denies). Beyond it, new label
    /// sets are counted on one overflow series per remaining bounded labels. Default 2,000:
    /// a 50,000-flow port scan then gives a `/metrics` of about 0.8 MB, rendered in about
    /// 12 ms (10,000 gave 4 MB and 230 ms on the 2-core test VM; `benches/series.rs`).
    pub series_limit: usize,
    /// How long a workload must stay absent from the inventory before its series are removed,
    /// so that a rollout or a reload hiccup does not reset counters.
    pub expiry_grace: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            series_limit: 2_000,
            expiry_grace: Duration::from_secs(10 * 60),
        }
    }
}

/// Builds the `policy` label value: sorted `ns/name`, comma-joined, at most
/// [`MAX_POLICIES_IN_LABEL`] names followed by `+N more`, so one label value stays bounded.
pub fn policy_label<S: AsRef<str>>(policies: &[S]) -> String {
    let mut names: Vec<&str> = policies.iter().map(AsRef::as_ref).collect();
    names.sort_unstable();
    names.dedup();
    let extra = names.len().saturating_sub(MAX_POLICIES_IN_LABEL);
    names.truncate(MAX_POLICIES_IN_LABEL);
    let mut out = names.join(",");
    if extra > 0 {
        out.push_str(&format!(",+{extra} more"));
    }
    out
}

/// Series currently held by the bounded metrics.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SeriesCounts {
    /// Label sets of drops (shared by drops and drop bytes), overflow series excluded.
    pub drops: usize,
    /// Overflow series of drops.
    pub drops_overflow: usize,
    /// Label sets of policy denies, overflow series excluded.
    pub policy_denies: usize,
    /// Overflow series of policy denies.
    pub policy_denies_overflow: usize,
}

/// All metrics of the daemon, and the registry they (and other stages' metrics) live in.
///
/// Shared as `Arc<Metrics>`: recording takes `&self`.
pub struct Metrics {
    registry: Registry,
    config: MetricsConfig,
    /// Label names of every family registered through [`Metrics::register`], by metric name.
    names: Mutex<BTreeMap<String, Vec<String>>>,
    drops: Family<DropLabels<'static>, 7>,
    policy_denies: Family<PolicyDenyLabels<'static>, 8>,
    kernel_drops: Counters<ReasonLabels<'static>, 1>,
    kernel_drop_bytes: Counters<ReasonLabels<'static>, 1>,
    events_lost: Counters<StageLabels<'static>, 1>,
    flow_map_entries: IntGauge,
    flow_map_capacity: IntGauge,
    inventory_objects: Gauges<KindLabels<'static>, 1>,
    inventory_invalid_objects: Gauges<KindLabels<'static>, 1>,
    inventory_reloads: Counters<ResultLabels<'static>, 1>,
    watch_errors: Counters<ResourceLabels<'static>, 1>,
    build_info: Gauges<BuildInfoLabels<'static>, 3>,
    reasons_unavailable: Gauges<ReasonLabels<'static>, 1>,
    series_overflow: Counters<MetricLabels<'static>, 1>,
    series: Gauges<MetricLabels<'static>, 1>,
    reload_successful: IntGauge,
    reload_success_timestamp: IntGauge,
    drops_handles: FamilyHandles,
    policy_denies_handles: FamilyHandles,
    lost_to_overflow: IntCounter,
}

/// Cached self-monitoring series of one bounded family, so recording does not look them up.
struct FamilyHandles {
    series: IntGauge,
    overflow: IntCounter,
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, ExportError> {
    IntGauge::new(name, help).map_err(|source| ExportError::Register {
        name: name.to_owned(),
        source,
    })
}

fn saturating_i64<T: TryInto<i64>>(n: T) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl Metrics {
    /// Creates every metric and registers it in a fresh registry.
    pub fn new(config: MetricsConfig) -> Result<Self, ExportError> {
        let drops = Counters::<DropLabels<'static>, 7>::new(
            DROPS_TOTAL,
            "Packets dropped by the kernel, attributed to source and destination workloads.",
        )?;
        let drop_bytes = Counters::<DropLabels<'static>, 7>::new(
            DROP_BYTES_TOTAL,
            "Bytes of packets dropped by the kernel, attributed to workloads.",
        )?;
        let policy_denies = Counters::<PolicyDenyLabels<'static>, 8>::new(
            POLICY_DENIES_TOTAL,
            "Dropped packets with a NetworkPolicy verdict: default_deny (isolated, no rule \
             allows) or unexplained (policies allow it, yet a policy-type drop happened).",
        )?;
        let series_limit = gauge(
            SERIES_LIMIT,
            "Most label sets kept per labelled metric before the overflow series is used.",
        )?;
        series_limit.set(saturating_i64(config.series_limit));
        let series_overflow = Counters::<MetricLabels<'static>, 1>::new(
            SERIES_OVERFLOW_TOTAL,
            "Units counted on an __overflow__ series because the series limit was reached: \
             packets for drops and policy denies, edges for new denied edges, connections \
             for the connection metrics.",
        )?;
        let series = Gauges::<MetricLabels<'static>, 1>::new(
            SERIES,
            "Label sets currently held per labelled metric (overflow series excluded).",
        )?;
        let events_lost = Counters::<StageLabels<'static>, 1>::new(
            EVENTS_LOST_TOTAL,
            "Events deny-observer could not count exactly or attribute, by pipeline stage.",
        )?;

        let metrics = Self {
            registry: Registry::new(),
            names: Mutex::new(BTreeMap::new()),
            drops: Family::new(
                DROPS_TOTAL,
                vec![drops.vec().clone(), drop_bytes.vec().clone()],
                &WORKLOAD_LABELS,
                ENDPOINT_LABELS,
                config.series_limit,
            )?,
            policy_denies: Family::new(
                POLICY_DENIES_TOTAL,
                vec![policy_denies.vec().clone()],
                &[WORKLOAD_LABELS.as_slice(), &["policy"]].concat(),
                ENDPOINT_LABELS,
                config.series_limit,
            )?,
            kernel_drops: Counters::new(
                KERNEL_DROPS_TOTAL,
                "Every packet the kernel dropped on this node, by drop reason.",
            )?,
            kernel_drop_bytes: Counters::new(
                KERNEL_DROP_BYTES_TOTAL,
                "Bytes of every packet the kernel dropped on this node, by drop reason.",
            )?,
            flow_map_entries: gauge(
                FLOW_MAP_ENTRIES,
                "Entries in the kernel flow map at the last drain.",
            )?,
            flow_map_capacity: gauge(FLOW_MAP_CAPACITY, "Capacity of the kernel flow map.")?,
            inventory_objects: Gauges::new(
                INVENTORY_OBJECTS,
                "Objects in the current inventory, by kind.",
            )?,
            inventory_invalid_objects: Gauges::new(
                INVENTORY_INVALID_OBJECTS,
                "Objects left out of the inventory because the API server would refuse them \
                 (invalid policies, pods, namespaces), by kind. `deny-observer audit` names them.",
            )?,
            inventory_reloads: Counters::new(
                INVENTORY_RELOADS_TOTAL,
                "Inventory loads, by result (ok, error). On error the last good inventory stays.",
            )?,
            watch_errors: Counters::new(
                INVENTORY_WATCH_ERRORS_TOTAL,
                "Errors of API-server watches, by resource; each is retried with backoff.",
            )?,
            build_info: Gauges::new(
                BUILD_INFO,
                "Always 1; labels give the deny-observer version, kernel release and node.",
            )?,
            reasons_unavailable: Gauges::new(
                CAPTURE_REASONS_UNAVAILABLE,
                "1 for each drop reason in --reasons that this node's kernel does not have \
                 (newer than the kernel, or any reason before 5.17): not counted on this node.",
            )?,
            reload_successful: gauge(
                INVENTORY_LAST_RELOAD_SUCCESSFUL,
                "1 when the inventory source's last attempt succeeded (manifest directory \
                 loaded or unchanged; API-server watches without error), else 0.",
            )?,
            reload_success_timestamp: gauge(
                INVENTORY_LAST_RELOAD_SUCCESS_TIMESTAMP,
                "Unix time when the inventory was last known current (0: never).",
            )?,
            drops_handles: FamilyHandles {
                series: series.with(&MetricLabels {
                    metric: DROPS_TOTAL,
                }),
                overflow: series_overflow.with(&MetricLabels {
                    metric: DROPS_TOTAL,
                }),
            },
            policy_denies_handles: FamilyHandles {
                series: series.with(&MetricLabels {
                    metric: POLICY_DENIES_TOTAL,
                }),
                overflow: series_overflow.with(&MetricLabels {
                    metric: POLICY_DENIES_TOTAL,
                }),
            },
            lost_to_overflow: events_lost.with(&StageLabels {
                stage: STAGE_SERIES_OVERFLOW,
            }),
            series_overflow,
            series,
            events_lost,
            config,
        };

        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(drops.vec().clone()),
            Box::new(drop_bytes.vec().clone()),
            Box::new(policy_denies.vec().clone()),
            Box::new(metrics.kernel_drops.vec().clone()),
            Box::new(metrics.kernel_drop_bytes.vec().clone()),
            Box::new(metrics.events_lost.vec().clone()),
            Box::new(metrics.flow_map_entries.clone()),
            Box::new(metrics.flow_map_capacity.clone()),
            Box::new(metrics.inventory_objects.vec().clone()),
            Box::new(metrics.inventory_invalid_objects.vec().clone()),
            Box::new(metrics.inventory_reloads.vec().clone()),
            Box::new(metrics.watch_errors.vec().clone()),
            Box::new(metrics.build_info.vec().clone()),
            Box::new(metrics.reasons_unavailable.vec().clone()),
            Box::new(metrics.series_overflow.vec().clone()),
            Box::new(metrics.series.vec().clone()),
            Box::new(series_limit),
            Box::new(metrics.reload_successful.clone()),
            Box::new(metrics.reload_success_timestamp.clone()),
        ];
        for c in collectors {
            metrics.register(c)?;
        }

        // Series that alerts compare over time exist from the start, at zero (the overflow and
        // series-count handles above already created theirs).
        for kind in crate::inventory::validate::METRIC_KINDS {
            metrics
                .inventory_invalid_objects
                .with(&KindLabels { kind })
                .set(0);
        }
        for result in ["ok", "error"] {
            metrics.inventory_reloads.with(&ResultLabels { result });
        }
        Ok(metrics)
    }

    /// The registry: other stages register their metrics here (prefer [`Metrics::register`],
    /// which also lists them in [`Metrics::metric_names`]).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The configuration this was built with.
    pub fn config(&self) -> &MetricsConfig {
        &self.config
    }

    /// Registers another stage's collector, and remembers its metric names and label names.
    pub fn register(&self, collector: Box<dyn Collector>) -> Result<(), ExportError> {
        let descs: Vec<(String, Vec<String>)> = collector
            .desc()
            .iter()
            .map(|d| (d.fq_name.clone(), d.variable_labels.clone()))
            .collect();
        self.registry
            .register(collector)
            .map_err(|source| ExportError::Register {
                name: descs
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                source,
            })?;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(descs);
        Ok(())
    }

    /// Label names of every family registered through [`Metrics::register`], by metric name,
    /// from the collectors' descriptors (the order the values are given in).
    pub fn metric_labels(&self) -> BTreeMap<String, Vec<String>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every metric family name the daemon can export, sorted: those registered through
    /// [`Metrics::register`] (from their descriptors, so metrics without samples yet count
    /// too), plus any family with samples registered directly in [`Metrics::registry`].
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.extend(
            self.registry
                .gather()
                .into_iter()
                .map(|mf| mf.name().to_owned()),
        );
        names.into_iter().collect()
    }

    /// Counts an attributed drop sample (`packets`, `bytes`) on `deny_observer_drops_total`
    /// and `deny_observer_drop_bytes_total`.
    pub fn record_drop(&self, labels: &DropLabels<'_>, packets: u64, bytes: u64) {
        let recorded = self.drops.record(labels, &[packets, bytes]);
        // Every attributed packet is on drops_total: its overflow is where attribution is
        // lost, so only this family feeds events_lost{stage="series_overflow"}.
        self.after_record(recorded, &self.drops_handles, packets, true);
    }

    /// Counts a policy-attributed deny sample on `deny_observer_policy_denies_total`.
    pub fn record_policy_deny(&self, labels: &PolicyDenyLabels<'_>, packets: u64) {
        let recorded = self.policy_denies.record(labels, &[packets]);
        self.after_record(recorded, &self.policy_denies_handles, packets, false);
    }

    /// Overflow is counted in packets, not in drain records: a record stands for any number
    /// of packets, so counting records would make the loss look arbitrarily small.
    fn after_record(&self, recorded: Recorded, handles: &FamilyHandles, packets: u64, lost: bool) {
        match recorded {
            Recorded::Existing => {}
            Recorded::New(len) => handles.series.set(saturating_i64(len)),
            Recorded::Overflow => {
                handles.overflow.inc_by(packets);
                if lost {
                    self.lost_to_overflow.inc_by(packets);
                }
            }
        }
    }

    /// The self-monitoring handles of another bounded metric `metric`:
    /// `deny_observer_series_overflow_total{metric}` and `deny_observer_series{metric}`.
    pub fn series_accounting(&self, metric: &str) -> (IntCounter, IntGauge) {
        (
            self.series_overflow.with(&MetricLabels { metric }),
            self.series.with(&MetricLabels { metric }),
        )
    }

    /// Counts drops of one kernel reason, attributed or not.
    pub fn record_kernel_drops(&self, reason: &str, packets: u64, bytes: u64) {
        self.kernel_drops
            .with(&ReasonLabels { reason })
            .inc_by(packets);
        self.kernel_drop_bytes
            .with(&ReasonLabels { reason })
            .inc_by(bytes);
    }

    /// Counts `n` lost events at `stage` (`ringbuf_full`, `flow_map_evicted`, ...). `n == 0`
    /// creates the series at zero, which is how the daemon announces its stages up front.
    pub fn record_loss(&self, stage: &str, n: u64) {
        self.events_lost.with(&StageLabels { stage }).inc_by(n);
    }

    /// The counter of losses at `stage`, for a stage that counts on its own thread.
    pub fn loss_counter(&self, stage: &str) -> IntCounter {
        self.events_lost.with(&StageLabels { stage })
    }

    /// Marks the configured reasons this node's kernel does not have.
    pub fn set_reasons_unavailable(&self, reasons: &[String]) {
        self.reasons_unavailable.vec().reset();
        for reason in reasons {
            self.reasons_unavailable
                .with(&ReasonLabels { reason })
                .set(1);
        }
    }

    /// Sets the flow-map fill.
    pub fn set_flow_map(&self, entries: u64, capacity: u64) {
        self.flow_map_entries.set(saturating_i64(entries));
        self.flow_map_capacity.set(saturating_i64(capacity));
    }

    /// Sets the invalid objects per kind (as from `Inventory::invalid_counts`); kinds absent
    /// from `counts` are removed, except the ones always exported at zero.
    pub fn set_inventory_invalid_objects(
        &self,
        counts: &std::collections::BTreeMap<String, usize>,
    ) {
        self.inventory_invalid_objects.vec().reset();
        for kind in crate::inventory::validate::METRIC_KINDS {
            self.inventory_invalid_objects
                .with(&KindLabels { kind })
                .set(0);
        }
        for (kind, n) in counts {
            self.inventory_invalid_objects
                .with(&KindLabels { kind })
                .set(saturating_i64(*n));
        }
    }

    /// Sets the number of inventory objects of `kind` (`pods`, `namespaces`, `networkpolicies`).
    pub fn set_inventory_objects(&self, kind: &str, n: usize) {
        self.inventory_objects
            .with(&KindLabels { kind })
            .set(saturating_i64(n));
    }

    /// Counts an inventory load (`result="ok"` or `result="error"`).
    pub fn record_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inventory_reloads.with(&ResultLabels { result }).inc();
    }

    /// Sets the inventory source's staleness gauges.
    pub fn set_inventory_reload_status(&self, successful: bool, last_success_unix: i64) {
        self.reload_successful.set(i64::from(successful));
        self.reload_success_timestamp.set(last_success_unix);
    }

    /// Counts a watch error of `resource` (`pods`, `namespaces`, `networkpolicies`).
    pub fn record_watch_error(&self, resource: &str) {
        self.watch_errors.with(&ResourceLabels { resource }).inc();
    }

    /// Sets `deny_observer_build_info` to 1 for these labels (replacing earlier values).
    pub fn set_build_info(&self, version: &str, kernel_release: &str, node: &str) {
        self.build_info.vec().reset();
        self.build_info
            .with(&BuildInfoLabels {
                version,
                kernel_release,
                node,
            })
            .set(1);
    }

    /// Removes series whose source or destination workload has been gone for the grace period.
    /// `live(namespace, workload)` says whether a workload is still in the inventory; it is not
    /// asked about non-pod values (empty namespace or workload, `node`, `host`, `world`,
    /// `private`, `unknown`, `__overflow__`), which never expire. Returns the number of label
    /// sets removed. Call it after each inventory change and periodically.
    pub fn retain_workloads(&self, live: &dyn Fn(&str, &str) -> bool) -> usize {
        self.retain_workloads_at(Instant::now(), live)
    }

    /// [`Metrics::retain_workloads`] with an explicit clock, for tests.
    pub fn retain_workloads_at(&self, now: Instant, live: &dyn Fn(&str, &str) -> bool) -> usize {
        let grace = self.config.expiry_grace;
        let removed =
            self.drops.retain(now, grace, live) + self.policy_denies.retain(now, grace, live);
        self.drops_handles
            .series
            .set(saturating_i64(self.drops.len()));
        self.policy_denies_handles
            .series
            .set(saturating_i64(self.policy_denies.len()));
        removed
    }

    /// Series currently held by the bounded metrics.
    pub fn series_counts(&self) -> SeriesCounts {
        SeriesCounts {
            drops: self.drops.len(),
            drops_overflow: self.drops.overflow_len(),
            policy_denies: self.policy_denies.len(),
            policy_denies_overflow: self.policy_denies.overflow_len(),
        }
    }

    /// Renders every registered metric in the Prometheus text format (version 0.0.4).
    pub fn encode_text(&self) -> Result<String, ExportError> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(ExportError::Encode)
    }
}
