//! What is in the cluster: namespaces, pods and NetworkPolicies, and the attribution of
//! addresses to pods and workloads.
//!
//! Two sources fill an [`Inventory`]: a directory of manifests ([`manifest`]) and, in a cluster,
//! the API server (`kube`, added by the in-cluster work). Everything downstream only sees the
//! [`Inventory`] snapshot.

pub mod convert;
pub mod model;
pub mod workload;

pub use convert::ConvertError;
pub use model::*;
pub use workload::OwnerIndex;
