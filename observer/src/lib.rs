//! deny-observer: ties every packet the kernel drops to pods, workloads and the NetworkPolicies
//! that caused it, and exports the result to Prometheus.
//!
//! The modules follow the data flow, and each only imports the ones before it:
//!
//! ```text
//! capture → inventory → verdict → attribute → export → alert
//! ```
//!
//! - [`flow`]: the small vocabulary every stage shares (protocols, directions).
//! - [`capture`]: loads the kernel program, drains its flow map into [`capture::FlowDrop`]s.
//! - [`inventory`]: namespaces, pods and policies (from a manifest directory or the API server),
//!   and the address → pod → workload attribution.
//! - [`verdict`]: the NetworkPolicy engine that names the policies behind a deny.
//! - [`attribute`]: the pure core: a drain and the inventory in, typed outcomes (drop series,
//!   policy denies, denied edges, Event notices) out, for the sinks that follow.
//! - [`export`]: Prometheus metrics with bounded series, and the HTTP endpoints.
//! - [`alert`]: deny-spike baselines and new-denied-edge detection.
//! - [`daemon`]: wires the stages together for `deny-observer run`.

pub mod alert;
pub mod attribute;
pub mod capture;
pub mod daemon;
pub mod export;
pub mod flow;
pub mod inventory;
pub mod map;
pub mod verdict;
