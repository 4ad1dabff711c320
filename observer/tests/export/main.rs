//! The export stage and its sinks: Prometheus metrics (bounded series, the drain path's
//! allocations), the HTTP endpoints, and Kubernetes Events against a fake API server.

mod alloc;
mod events;
mod http;
mod metrics;
