//! Builds the eBPF programs (nightly, `-Z build-std=core`) through aya-build and leaves the
//! object in OUT_DIR, where `capture` embeds it. `AYA_BUILD_SKIP=1` skips this for
//! check/clippy runs on machines without the eBPF toolchain.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
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
