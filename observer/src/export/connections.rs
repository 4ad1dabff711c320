//! `deny_observer_connections_total`: accepted connections per edge, and the rule that counts
//! each connection once cluster-wide.
//!
//! A connection between two pods can be seen by up to two kernels (one per end), and by one
//! kernel twice when both pods share a node. Each daemon counts only the end chosen by
//! [`counted_here`]:
//!
//! - the **accepting end** when the destination is a pod: that pod runs on this node, and the
//!   addresses there are the ones NetworkPolicy judges (after a Service's DNAT);
//! - the **opening end** when the source is a pod and the destination is not (a node, another
//!   host, an address outside the cluster): no daemon sees an accepting pod for it.
//!
//! Connections where neither end is a pod (node to outside) are not pod traffic and are not
//! counted. `sum(rate(deny_observer_connections_total[5m]))` over every node then counts each
//! connection once.
//!
//! **Services.** A pod that connects to a Service's ClusterIP has its opening end recorded with
//! the ClusterIP as destination: kube-proxy (or an eBPF replacement) translates the address to a
//! backend pod after the socket chose it, so the client socket never sees the backend. That end
//! is not a `private` edge: the backend pod's accepting end counts the same connection, with
//! the addresses NetworkPolicy judges. The opening end is counted instead on
//! `deny_observer_service_connections_total{source_namespace, source_workload,
//! service_namespace, service, protocol, port}` (the Service port, as the client dialled it),
//! which says which workloads use which Service and never adds to the edge count.
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::ExportError;
use super::labels::{LabelSet, Labelled};
use super::metrics::Metrics;
use super::series::{Family, Recorded};
use std::net::IpAddr;
use std::sync::Arc;

use crate::capture::connections::{Connection, ConnectionReport, Hook, Side};
use crate::flow::{FastMap, Protocol};
use crate::inventory::{Endpoint, Service};

/// `deny_observer_connections_total`.
pub const CONNECTIONS_TOTAL: &str = "deny_observer_connections_total";
/// `deny_observer_service_connections_total`: opening ends of connections to a Service
/// ClusterIP.
pub const SERVICE_CONNECTIONS_TOTAL: &str = "deny_observer_service_connections_total";
/// `deny_observer_connection_hooks{hook}`: 1 when a connection hook is attached.
pub const CONNECTION_HOOKS: &str = "deny_observer_connection_hooks";
/// `deny_observer_connection_map_entries`: edges in the kernel connection map.
pub const CONNECTION_MAP_ENTRIES: &str = "deny_observer_connection_map_entries";

/// `stage` of connections the kernel map had no room for.
pub const STAGE_MAP_FULL: &str = "connection_map_full";
/// `stage` of connections whose record or headers could not be read.
pub const STAGE_READ: &str = "connection_read";

/// Label names of `deny_observer_connections_total`, in order.
pub const CONNECTION_LABELS: [&str; 6] = [
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_workload",
    "protocol",
    "port",
];

/// One series of `deny_observer_connections_total`, borrowed for recording.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionSeries<'a> {
    /// Source namespace.
    pub source_namespace: &'a str,
    /// Source workload.
    pub source_workload: &'a str,
    /// Destination namespace.
    pub destination_namespace: &'a str,
    /// Destination workload.
    pub destination_workload: &'a str,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port, as its label value.
    pub port: &'a str,
}

impl LabelSet<6> for ConnectionSeries<'_> {
    const NAMES: [&'static str; 6] = CONNECTION_LABELS;
    fn values(&self) -> [&str; 6] {
        [
            self.source_namespace,
            self.source_workload,
            self.destination_namespace,
            self.destination_workload,
            self.protocol.label(),
            self.port,
        ]
    }
}

impl Labelled<6> for ConnectionSeries<'static> {
    type Set<'a> = ConnectionSeries<'a>;
}

/// Label names of `deny_observer_service_connections_total`, in order.
pub const SERVICE_CONNECTION_LABELS: [&str; 6] = [
    "source_namespace",
    "source_workload",
    "service_namespace",
    "service",
    "protocol",
    "port",
];

/// One series of `deny_observer_service_connections_total`, borrowed for recording.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceConnectionSeries<'a> {
    /// Source namespace.
    pub source_namespace: &'a str,
    /// Source workload.
    pub source_workload: &'a str,
    /// The Service's namespace.
    pub service_namespace: &'a str,
    /// The Service's name.
    pub service: &'a str,
    /// Protocol.
    pub protocol: Protocol,
    /// Service port, as its label value.
    pub port: &'a str,
}

impl LabelSet<6> for ServiceConnectionSeries<'_> {
    const NAMES: [&'static str; 6] = SERVICE_CONNECTION_LABELS;
    fn values(&self) -> [&str; 6] {
        [
            self.source_namespace,
            self.source_workload,
            self.service_namespace,
            self.service,
            self.protocol.label(),
            self.port,
        ]
    }
}

impl Labelled<6> for ServiceConnectionSeries<'static> {
    type Set<'a> = ServiceConnectionSeries<'a>;
}

/// Whether this node counts a connection seen from `side`, given the attributed ends (`None`:
/// unknown address). See the module documentation for the rule.
pub fn counted_here(side: Side, src: Option<&Endpoint>, dst: Option<&Endpoint>) -> bool {
    let is_pod = |e: Option<&Endpoint>| matches!(e, Some(Endpoint::Pod(_)));
    match side {
        Side::Accept => is_pod(dst),
        Side::Connect => is_pod(src) && !is_pod(dst),
    }
}

/// The connection metrics, registered in the daemon's registry.
pub struct ConnectionMetrics {
    family: Family<ConnectionSeries<'static>, 6>,
    series: IntGauge,
    overflow: IntCounter,
    services: Family<ServiceConnectionSeries<'static>, 6>,
    service_series: IntGauge,
    service_overflow: IntCounter,
    hooks: IntGaugeVec,
    map_entries: IntGauge,
    series_limit: usize,
}

impl std::fmt::Debug for ConnectionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionMetrics")
            .field("series", &self.family.len())
            .finish_non_exhaustive()
    }
}

/// Labels of one edge, owned (one drain's sums are keyed by them).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// Source namespace ("" for addresses that are no pod's).
    pub source_namespace: String,
    /// Source workload, or `node`, `host`, `world`, `private`, `unknown`.
    pub source_workload: String,
    /// Destination namespace.
    pub destination_namespace: String,
    /// Destination workload.
    pub destination_workload: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

impl ConnectionLabels {
    /// The labels of a connection between `src` and `dst`.
    pub fn new(src: Option<&Endpoint>, dst: Option<&Endpoint>, c: &Connection) -> Self {
        let (sn, sw) = super::endpoint_labels(src);
        let (dn, dw) = super::endpoint_labels(dst);
        Self {
            source_namespace: sn.to_owned(),
            source_workload: sw.to_owned(),
            destination_namespace: dn.to_owned(),
            destination_workload: dw.to_owned(),
            protocol: c.protocol,
            port: c.dst_port,
        }
    }
}

/// Labels of one pod's connections to one Service port, owned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceConnectionLabels {
    /// Source namespace.
    pub source_namespace: String,
    /// Source workload.
    pub source_workload: String,
    /// The Service's namespace.
    pub service_namespace: String,
    /// The Service's name.
    pub service: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: Protocol,
    /// The Service port the client dialled.
    pub port: u16,
}

/// One drain, attributed: the edges this node counts and the opening ends that went to a
/// Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttributedConnections {
    /// `deny_observer_connections_total` increments, per edge (see [`counted_here`]).
    pub edges: FastMap<ConnectionLabels, u64>,
    /// `deny_observer_service_connections_total` increments: opening ends whose destination
    /// is a Service ClusterIP, which the accepting backend counts as the edge.
    pub services: FastMap<ServiceConnectionLabels, u64>,
}

/// The Service a connection's opening end dialled, when it is a pod's connection to a
/// ClusterIP. Such an end is never an edge: the DNATed connection reaches a backend whose
/// accepting end is the edge (counted where that backend runs).
fn dialled_service<'s>(
    c: &Connection,
    src: &Endpoint,
    dst: &Endpoint,
    service: &impl Fn(IpAddr) -> Option<&'s Arc<Service>>,
) -> Option<&'s Arc<Service>> {
    if c.side != Side::Connect || src.pod().is_none() || dst.pod().is_some() {
        return None;
    }
    service(c.dst)
}

/// The edges of one drain that this node counts (see [`counted_here`]), summed per label set,
/// and the opening ends that dialled a Service. `lookup` attributes an address; `service`
/// names the Service whose ClusterIP an address is.
pub fn attribute<'s>(
    report: &ConnectionReport,
    lookup: impl Fn(IpAddr) -> Endpoint,
    service: impl Fn(IpAddr) -> Option<&'s Arc<Service>>,
) -> AttributedConnections {
    let mut out = AttributedConnections::default();
    for c in &report.connections {
        let (src, dst) = (lookup(c.src), lookup(c.dst));
        if let Some(svc) = dialled_service(c, &src, &dst, &service) {
            let (sn, sw) = super::endpoint_labels(Some(&src));
            *out.services
                .entry(ServiceConnectionLabels {
                    source_namespace: sn.to_owned(),
                    source_workload: sw.to_owned(),
                    service_namespace: svc.namespace.clone(),
                    service: svc.name.clone(),
                    protocol: c.protocol,
                    port: c.dst_port,
                })
                .or_default() += c.count;
            continue;
        }
        if !counted_here(c.side, Some(&src), Some(&dst)) {
            continue;
        }
        *out.edges
            .entry(ConnectionLabels::new(Some(&src), Some(&dst), c))
            .or_default() += c.count;
    }
    out
}

impl ConnectionMetrics {
    /// Records one drain: the counted edges, the map fill, and what the kernel could not
    /// count (`deny_observer_events_lost_total{stage="connection_map_full"|"connection_read"}`).
    pub fn record_drain<'s>(
        &self,
        metrics: &Metrics,
        report: &ConnectionReport,
        lookup: impl Fn(IpAddr) -> Endpoint,
        service: impl Fn(IpAddr) -> Option<&'s Arc<Service>>,
    ) {
        let attributed = attribute(report, lookup, service);
        self.record(&attributed.edges);
        self.record_services(&attributed.services);
        self.set_map_entries(report.map_entries);
        if report.map_full > 0 {
            metrics.record_loss(STAGE_MAP_FULL, report.map_full);
        }
        if report.read_errors > 0 {
            metrics.record_loss(STAGE_READ, report.read_errors);
        }
    }

    /// Creates the metrics and registers them in `metrics`' registry, under its series limit.
    pub fn new(metrics: &Metrics) -> Result<Self, ExportError> {
        let total = IntCounterVec::new(
            Opts::new(
                CONNECTIONS_TOTAL,
                "Accepted TCP connections and UDP flows, by source and destination workload, \
                 protocol and destination port; each connection is counted on one node only.",
            ),
            &CONNECTION_LABELS,
        )
        .map_err(|source| ExportError::Register {
            name: CONNECTIONS_TOTAL.to_owned(),
            source,
        })?;
        let hooks = IntGaugeVec::new(
            Opts::new(
                CONNECTION_HOOKS,
                "1 when the kernel hook counting connections is attached, 0 when this kernel \
                 or the configuration does not allow it (those connections are not counted).",
            ),
            &["hook"],
        )
        .map_err(|source| ExportError::Register {
            name: CONNECTION_HOOKS.to_owned(),
            source,
        })?;
        let map_entries = IntGauge::new(
            CONNECTION_MAP_ENTRIES,
            "Edges in the kernel connection map at the last drain.",
        )
        .map_err(|source| ExportError::Register {
            name: CONNECTION_MAP_ENTRIES.to_owned(),
            source,
        })?;
        let services = IntCounterVec::new(
            Opts::new(
                SERVICE_CONNECTIONS_TOTAL,
                "Connections pods opened to a Service ClusterIP, by source workload, Service, \
                 protocol and Service port. Counted where the client runs; the backend's \
                 accepting end counts the same connection on deny_observer_connections_total.",
            ),
            &SERVICE_CONNECTION_LABELS,
        )
        .map_err(|source| ExportError::Register {
            name: SERVICE_CONNECTIONS_TOTAL.to_owned(),
            source,
        })?;
        metrics.register(Box::new(total.clone()))?;
        metrics.register(Box::new(services.clone()))?;
        metrics.register(Box::new(hooks.clone()))?;
        metrics.register(Box::new(map_entries.clone()))?;
        // Announced at zero, like the drop path's stages.
        metrics.record_loss(STAGE_MAP_FULL, 0);
        metrics.record_loss(STAGE_READ, 0);
        let (overflow, series) = metrics.series_accounting(CONNECTIONS_TOTAL);
        let (service_overflow, service_series) =
            metrics.series_accounting(SERVICE_CONNECTIONS_TOTAL);
        let series_limit = metrics.config().series_limit;
        Ok(Self {
            // Overflow keeps the protocol only: ports are as unbounded as workloads.
            family: Family::new(
                CONNECTIONS_TOTAL,
                vec![total],
                &[
                    "source_namespace",
                    "source_workload",
                    "destination_namespace",
                    "destination_workload",
                    "port",
                ],
                [
                    ("source_namespace", "source_workload"),
                    ("destination_namespace", "destination_workload"),
                ],
                series_limit,
            )?,
            series,
            overflow,
            // Only the source expires a series: a Service is not a workload.
            services: Family::new(
                SERVICE_CONNECTIONS_TOTAL,
                vec![services],
                &[
                    "source_namespace",
                    "source_workload",
                    "service_namespace",
                    "service",
                    "port",
                ],
                [
                    ("source_namespace", "source_workload"),
                    ("source_namespace", "source_workload"),
                ],
                series_limit,
            )?,
            service_series,
            service_overflow,
            hooks,
            map_entries,
            series_limit,
        })
    }

    /// Sets `deny_observer_connection_hooks{hook}` from the capture's hooks.
    pub fn set_hooks(&self, hooks: &[Hook]) {
        for h in hooks {
            self.hooks
                .with_label_values(&[h.name])
                .set(i64::from(h.error.is_none()));
        }
    }

    /// Sets the kernel map fill.
    pub fn set_map_entries(&self, n: u64) {
        self.map_entries.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Adds the connections of one drain, summed per label set.
    pub fn record(&self, sums: &FastMap<ConnectionLabels, u64>) {
        for (l, n) in sums {
            let port = l.port.to_string();
            let series = ConnectionSeries {
                source_namespace: &l.source_namespace,
                source_workload: &l.source_workload,
                destination_namespace: &l.destination_namespace,
                destination_workload: &l.destination_workload,
                protocol: l.protocol,
                port: &port,
            };
            match self.family.record(&series, &[*n]) {
                Recorded::Existing => {}
                Recorded::New(len) => self.series.set(i64::try_from(len).unwrap_or(i64::MAX)),
                Recorded::Overflow => self.overflow.inc_by(*n),
            }
        }
    }

    /// Adds the opening ends of one drain that dialled a Service, summed per label set.
    pub fn record_services(&self, sums: &FastMap<ServiceConnectionLabels, u64>) {
        for (l, n) in sums {
            let port = l.port.to_string();
            let series = ServiceConnectionSeries {
                source_namespace: &l.source_namespace,
                source_workload: &l.source_workload,
                service_namespace: &l.service_namespace,
                service: &l.service,
                protocol: l.protocol,
                port: &port,
            };
            match self.services.record(&series, &[*n]) {
                Recorded::Existing => {}
                Recorded::New(len) => self
                    .service_series
                    .set(i64::try_from(len).unwrap_or(i64::MAX)),
                Recorded::Overflow => self.service_overflow.inc_by(*n),
            }
        }
    }

    /// Expires series of workloads gone for `grace` (as [`Metrics::retain_workloads`] does
    /// for the drop metrics). Returns the number removed.
    pub fn retain_workloads_at(
        &self,
        now: Instant,
        grace: Duration,
        live: &dyn Fn(&str, &str) -> bool,
    ) -> usize {
        let removed = self.family.retain(now, grace, live) + self.services.retain(now, grace, live);
        self.series
            .set(i64::try_from(self.family.len()).unwrap_or(i64::MAX));
        self.service_series
            .set(i64::try_from(self.services.len()).unwrap_or(i64::MAX));
        removed
    }

    /// Label sets held below the limit, and the limit.
    pub fn series(&self) -> (usize, usize) {
        (self.family.len(), self.series_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::export::MetricsConfig;
    use crate::inventory::{Pod, PodPhase, Workload};

    fn pod(ns: &str, wl: &str) -> Endpoint {
        Endpoint::Pod(Arc::new(Pod {
            namespace: ns.into(),
            name: format!("{wl}-0"),
            labels: Default::default(),
            ips: vec![],
            host_network: false,
            node_name: None,
            phase: PodPhase::Running,
            uid: None,
            created_unix: 0,
            ports: vec![],
            workload: Workload {
                kind: "Deployment".into(),
                name: wl.into(),
            },
        }))
    }

    #[test]
    fn each_connection_is_counted_on_one_end() {
        let (a, b) = (pod("shop", "web"), pod("shop", "db"));
        // Pod to pod: the accepting end only, wherever the two pods run.
        assert!(counted_here(Side::Accept, Some(&a), Some(&b)));
        assert!(!counted_here(Side::Connect, Some(&a), Some(&b)));
        // Outside to pod: only the accepting end exists in the cluster.
        assert!(counted_here(Side::Accept, Some(&Endpoint::World), Some(&b)));
        assert!(counted_here(Side::Accept, None, Some(&b)));
        // Pod to outside, node or another host: the opening end.
        for peer in [
            Endpoint::World,
            Endpoint::Private,
            Endpoint::Node,
            Endpoint::Host,
        ] {
            assert!(counted_here(Side::Connect, Some(&a), Some(&peer)));
            assert!(!counted_here(Side::Accept, Some(&a), Some(&peer)));
        }
        assert!(counted_here(Side::Connect, Some(&a), None));
        // Neither end a pod: not pod traffic.
        assert!(!counted_here(
            Side::Connect,
            Some(&Endpoint::Node),
            Some(&Endpoint::World)
        ));
        assert!(!counted_here(
            Side::Accept,
            Some(&Endpoint::World),
            Some(&Endpoint::Node)
        ));
    }

    #[test]
    fn a_drain_keeps_one_end_per_connection_and_sums_per_edge() {
        use crate::capture::connections::Connection;
        let conn = |src: &str, dst: &str, side, count| Connection {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dst_port: 8080,
            side,
            count,
        };
        // 10.0.0.1 and 10.0.0.2 are pods of `client` (two replicas), 10.0.0.9 of `server`.
        let report = ConnectionReport {
            connections: vec![
                conn("10.0.0.1", "10.0.0.9", Side::Connect, 5),
                conn("10.0.0.1", "10.0.0.9", Side::Accept, 5),
                conn("10.0.0.2", "10.0.0.9", Side::Accept, 2),
                conn("10.0.0.1", "1.1.1.1", Side::Connect, 7),
            ],
            ..ConnectionReport::default()
        };
        let sums = attribute(
            &report,
            |ip| match ip.to_string().as_str() {
                "10.0.0.1" | "10.0.0.2" => pod("a", "client"),
                "10.0.0.9" => pod("b", "server"),
                _ => Endpoint::World,
            },
            |_| None,
        );
        assert!(sums.services.is_empty());
        let sums = sums.edges;
        let edge = |dn: &str, dw: &str| ConnectionLabels {
            source_namespace: "a".into(),
            source_workload: "client".into(),
            destination_namespace: dn.into(),
            destination_workload: dw.into(),
            protocol: Protocol::Tcp,
            port: 8080,
        };
        assert_eq!(sums.len(), 2, "{sums:?}");
        assert_eq!(sums[&edge("b", "server")], 7);
        assert_eq!(sums[&edge("", "world")], 7);
    }

    #[test]
    fn opening_ends_to_a_cluster_ip_are_counted_by_service_not_as_edges() {
        use crate::capture::connections::Connection;
        use crate::inventory::Service;
        let metrics = Metrics::new(MetricsConfig::default()).unwrap();
        let conns = ConnectionMetrics::new(&metrics).unwrap();
        let web = Arc::new(Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec!["10.96.0.20".parse().unwrap()],
            external_ips: vec![],
            selector: None,
            ports: Vec::new(),
        });
        let conn = |dst: &str, port, side, count| Connection {
            src: "10.0.0.1".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: Protocol::Tcp,
            dst_port: port,
            side,
            count,
        };
        let report = ConnectionReport {
            connections: vec![
                conn("10.96.0.20", 80, Side::Connect, 5),
                conn("10.0.0.9", 8080, Side::Accept, 5),
            ],
            ..ConnectionReport::default()
        };
        let lookup = |ip: std::net::IpAddr| match ip.to_string().as_str() {
            "10.0.0.1" => pod("a", "client"),
            "10.0.0.9" => pod("shop", "web"),
            _ => Endpoint::Private,
        };
        let service = |ip: std::net::IpAddr| (ip == web.cluster_ips[0]).then_some(&web);
        conns.record_drain(&metrics, &report, lookup, service);
        let text = metrics.encode_text().unwrap();
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("deny_observer_") && l.contains("connections_total{"))
            .collect();
        assert_eq!(
            samples,
            [
                r#"deny_observer_connections_total{destination_namespace="shop",destination_workload="web",port="8080",protocol="tcp",source_namespace="a",source_workload="client"} 5"#,
                r#"deny_observer_service_connections_total{port="80",protocol="tcp",service="web",service_namespace="shop",source_namespace="a",source_workload="client"} 5"#,
            ],
            "{text}"
        );
        // Series expire with their source workload, like the edges.
        let t0 = Instant::now();
        let grace = Duration::from_secs(1);
        conns.retain_workloads_at(t0, grace, &|_, _| false);
        assert_eq!(
            conns.retain_workloads_at(t0 + grace, grace, &|_, _| false),
            2
        );
    }

    #[test]
    fn series_are_bounded_and_expire_with_their_workloads() {
        let metrics = Metrics::new(MetricsConfig {
            series_limit: 2,
            ..MetricsConfig::default()
        })
        .unwrap();
        let conns = ConnectionMetrics::new(&metrics).unwrap();
        let mut sums = FastMap::default();
        for (port, n) in [(80u16, 3u64), (81, 4), (82, 5)] {
            sums.insert(
                ConnectionLabels {
                    source_namespace: "a".into(),
                    source_workload: "client".into(),
                    destination_namespace: "b".into(),
                    destination_workload: "server".into(),
                    protocol: Protocol::Tcp,
                    port,
                },
                n,
            );
        }
        conns.record(&sums);
        let text = metrics.encode_text().unwrap();
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with(CONNECTIONS_TOTAL))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 12, "{text}");
        assert_eq!(conns.series().0, 2);
        assert!(
            text.contains(
                r#"deny_observer_series_overflow_total{metric="deny_observer_connections_total"}"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"port="__overflow__""#), "{text}");
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        assert_eq!(conns.retain_workloads_at(t0, grace, &|_, _| false), 0);
        assert_eq!(
            conns.retain_workloads_at(t0 + grace, grace, &|_, _| false),
            2
        );
        assert_eq!(conns.series().0, 0);
    }
}
