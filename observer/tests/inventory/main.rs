//! The inventory stage through its public API: manifests and their validation, directory
//! reloads, and the Kubernetes watchers against a faked API server (tower-test), also behind
//! `deny-observer map --listen`.

mod inventory_manifest;
mod inventory_reload;
mod inventory_validate;
mod kube_api;
mod map_kube;
