//! What is in the cluster: namespaces, pods and NetworkPolicies, and the attribution of
//! addresses to pods and workloads.
//!
//! Two sources fill an [`Inventory`]: a directory of manifests ([`manifest`]) and, in a cluster,
//! the API server (`kube`, added by the in-cluster work). Everything downstream only sees the
//! [`Inventory`] snapshot.

pub mod attribution;
pub mod convert;
pub mod delta;
pub mod kube;
pub mod labels;
pub mod manifest;
pub mod model;
pub mod reload;
pub mod validate;
pub mod workload;

pub use attribution::{Attributor, Endpoint, NodeAddrs, SERVICE_WORKLOAD_PREFIX, ServiceAddr};
pub use convert::ConvertError;
pub use delta::{PodDelta, rebase};
pub use labels::Labels;
pub use manifest::{LoadError, load_dir};
pub use model::*;
pub use reload::{DirWatch, ReloadStats, watch_dir};
pub use workload::OwnerIndex;
