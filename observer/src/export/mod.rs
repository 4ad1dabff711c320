//! Export: Prometheus metrics with bounded series, and the HTTP endpoints.
//!
//! - [`Metrics`] owns one [`prometheus::Registry`] (no global registry) and every metric of the
//!   daemon. Later stages register their own collectors into it with [`Metrics::register`].
//! - Attributed series (drops, policy denies) are bounded: at most
//!   [`MetricsConfig::series_limit`] label sets per metric, then one overflow series per
//!   remaining bounded labels (namespaces, workloads and policies become [`OVERFLOW`]), counted
//!   on `deny_observer_series_overflow_total{metric}`. Series of workloads gone from the
//!   inventory for [`MetricsConfig::expiry_grace`] are removed by [`Metrics::retain_workloads`].
//! - [`serve`] runs `/metrics`, `/healthz` and `/readyz` (see [`HttpState`]).

pub mod connections;
pub mod events;
mod http;
pub mod labels;
mod metrics;
mod series;
mod sink;

pub use crate::attribute::{PolicyMatch, endpoint_labels};
pub use http::{
    DEFAULT_INVENTORY_MAX_AGE, DEFAULT_STALL_AFTER, HttpLimits, HttpState, MAX_RENDERS_ALIVE,
    MIN_WRITE_PROGRESS, REFRESH_WAIT, RESPONSE_CHUNK_BYTES, ReadyCondition, RefreshRequest,
    SEND_BUFFER_BYTES, router, serve, serve_router, serve_with,
};
pub use labels::{DropLabels, LabelSet, LabelValue, PolicyDenyLabels};
pub use metrics::*;
pub use series::{NON_POD_WORKLOADS, OVERFLOW};
pub use sink::MetricsSink;

/// Errors of the export stage.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A metric could not be created or registered (invalid or duplicate name).
    #[error("cannot register metric {name}: {source}")]
    Register {
        /// Metric name(s).
        name: String,
        /// Cause.
        #[source]
        source: prometheus::Error,
    },
    /// A bounded family names a label its label set does not have.
    #[error("metric {metric} has no label {label:?}")]
    UnknownLabel {
        /// Metric name.
        metric: String,
        /// The label asked for.
        label: String,
    },
    /// The registry could not be rendered in the text format.
    #[error("cannot encode metrics: {0}")]
    Encode(#[source] prometheus::Error),
    /// The HTTP server failed.
    #[error("HTTP server on {addr} failed: {source}")]
    Serve {
        /// Listening address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
