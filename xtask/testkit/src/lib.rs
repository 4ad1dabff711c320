//! The fixtures deny-observer's end-to-end tests, `cargo xtask demo` and `cargo xtask bench`
//! run on: a simulated Kubernetes node on the real kernel ([`simnode`]) and traffic for it
//! ([`flood`]), inventory manifests ([`manifests`]), the release daemon as a child process
//! ([`daemon`]) and a `/metrics` reader ([`metrics`]), byte mutations for fuzz tests ([`mutate`]), the demo's shop ([`demo`]), the
//! pod-template-to-podman translation the container test runs ([`podspec`]), a real Prometheus
//! and Alertmanager ([`promstack`]) with a webhook receiver ([`webhook`]), and the one gate of
//! machine-dependent tests ([`requires`], [`privileged`]).

pub mod chromium;
pub mod cmd;
pub mod daemon;
pub mod demo;
pub mod flood;
pub mod manifests;
pub mod metrics;
pub mod mutate;
pub mod podspec;
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers: a panic with context is their failure report"
)]
pub mod promstack;
pub mod simnode;
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers: a panic with context is their failure report"
)]
pub mod webhook;

use std::path::PathBuf;

/// Environment variable that skips privileged tests when `1` (set by `cargo xtask test
/// --skip-privileged`); see [`requires`].
pub const SKIP_PRIVILEGED_ENV: &str = "DENY_OBSERVER_SKIP_PRIVILEGED";
/// Environment variable naming the release daemon binary for end-to-end tests.
pub const BIN_ENV: &str = "DENY_OBSERVER_BIN";
/// Environment variable naming the container image for the container test (set by
/// `cargo xtask test` after `cargo xtask image`).
pub const IMAGE_ENV: &str = "DENY_OBSERVER_IMAGE";

/// The release daemon named by [`BIN_ENV`], for end-to-end tests. Panics with what to do when it
/// is unset or missing: a test that cannot run must say so, not pass.
pub fn daemon_bin() -> std::path::PathBuf {
    let Some(bin) = std::env::var_os(BIN_ENV) else {
        panic!(
            "{BIN_ENV} is not set: it must name the release daemon (target/release/deny-observer). \
             `cargo xtask test` builds it and sets it."
        );
    };
    // cargo runs tests in the crate directory; a relative path was meant from the workspace.
    let bin = workspace_root().join(bin);
    assert!(bin.is_file(), "{BIN_ENV}={} does not exist", bin.display());
    bin
}

/// The image named by [`IMAGE_ENV`], for the container test. Panics with what to do when unset.
pub fn container_image() -> String {
    std::env::var(IMAGE_ENV).unwrap_or_else(|_| {
        panic!(
            "{IMAGE_ENV} is not set: it must name the image built by `cargo xtask image` \
             (localhost/deny-observer:dev). `cargo xtask test` builds it and sets it."
        )
    })
}

/// The one gate of tests that need something of the machine (root, tracefs, the running
/// kernel's BTF). `DENY_OBSERVER_SKIP_PRIVILEGED=1` skips them: this says so and returns
/// `false`. Any other value, or none, means they are required: `true` when `available`, else a
/// panic naming what is missing and how to skip explicitly, so a test that cannot run never
/// passes.
pub fn requires(test: &str, what: &str, available: bool) -> bool {
    if std::env::var(SKIP_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: {SKIP_PRIVILEGED_ENV}=1");
        return false;
    }
    assert!(
        available,
        "{test} needs {what}; run it where it has that, or set {SKIP_PRIVILEGED_ENV}=1 to skip \
         it explicitly"
    );
    true
}

/// [`requires`] root: network namespaces, nftables, tracefs and BPF.
pub fn privileged(test: &str) -> bool {
    requires(test, "root (netns, nftables, tracefs, BPF)", cmd::is_root())
}

/// The workspace root (this crate is `xtask/testkit` in it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or(manifest)
}
