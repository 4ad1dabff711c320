//! Builds the eBPF programs (nightly, `-Z build-std=core`) through aya-build and leaves the
//! object in OUT_DIR, where `capture` embeds it.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build for check/clippy/doc runs on machines without the
//! eBPF toolchain; an empty object is left in its place so the crate still compiles, and
//! `Capture::load` then fails with a clear error instead of loading garbage.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};

const OBJECT: &str = "deny-observer-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
        let object = out.join(OBJECT);
        std::fs::write(&object, [])
            .with_context(|| format!("writing the placeholder {}", object.display()))?;
        println!("cargo:warning=AYA_BUILD_SKIP set: the eBPF object is an empty placeholder");
        return Ok(());
    }
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("observer-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "observer-ebpf",
            root_dir: ebpf_dir,
            features: &["ebpf"],
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
