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
pub mod manifest;
pub mod model;
pub mod reload;
pub mod validate;
pub mod workload;

pub use attribution::{Attributor, Endpoint, NodeAddrs, SERVICE_WORKLOAD_PREFIX, ServiceAddr};
pub use convert::ConvertError;
pub use delta::{PodDelta, rebase};
pub use manifest::{LoadError, load_dir};
pub use model::*;
pub use reload::{DirWatch, ReloadStats, watch_dir};
pub use workload::OwnerIndex;

/// Hands freed heap back to the kernel (glibc's `malloc_trim`).
///
/// Loading an inventory allocates far more than it keeps: a YAML List is parsed as a whole
/// document, and an API-server list response is decoded into full objects before conversion.
/// glibc keeps freed blocks resident; after a load (or a relist) this returns them.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
