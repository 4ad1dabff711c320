//! `cargo xtask image`: the runtime image, built with podman and no container registry.
//!
//! The base is Debian's own packages (glibc and libgcc, what distroless/cc holds), extracted by
//! mmdebstrap into a tarball and imported as a local image; the `Dockerfile`'s runtime stage
//! then puts the host-built release binary on top (`BINARY=prebuilt`). The tarball is cached
//! under `target/image-base/`, keyed by its recipe, so only the first run pays for it.
//!
//! podman runs with runc (crun refuses the hybrid cgroup layout of these machines) and with
//! explicit rlimits: inheriting the defaults makes the runtime fail in `setrlimit`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::cmd::{self, cmd};
use testkit::podspec::{podman, ulimit_args};

/// The image `cargo xtask image` builds and the container test runs.
pub const IMAGE: &str = "localhost/deny-observer:dev";
/// Repository of the local base image; the tag is the Debian suite and the recipe's hash.
pub const BASE_REPOSITORY: &str = "localhost/deny-observer-base";
/// Debian suite of the base (the one distroless/cc-debian12 is built from).
pub const SUITE: &str = "bookworm";
/// What the binary needs at run time (`ldd target/release/deny-observer`: libc, libgcc_s),
/// plus the files every image is expected to have (os-release, /etc/services, time zones,
/// CA certificates for HTTPS clients).
pub const BASE_PACKAGES: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "base-files",
    "netbase",
    "tzdata",
    "ca-certificates",
];
/// Shell hooks mmdebstrap runs on the extracted tree (`$1` is its root; the `extract` variant
/// runs extract hooks only). It runs no maintainer scripts, so what they would create is made
/// here.
const BASE_HOOKS: &[&str] = &[
    // ca-certificates' postinst builds the bundle; HTTPS clients read it.
    r#"mkdir -p "$1/etc/ssl/certs" && cat "$1"/usr/share/ca-certificates/mozilla/*.crt > "$1/etc/ssl/certs/ca-certificates.crt""#,
    // base-passwd's postinst writes these; uid 0 gets a name in logs and no login shell.
    r#"printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' > "$1/etc/passwd" && printf 'root:x:0:\n' > "$1/etc/group""#,
    r#"rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/info" "$1/usr/share/locale" "$1/var/cache/apt" "$1/var/lib/apt/lists""#,
    r#"chmod 1777 "$1/tmp""#,
];

/// FNV-1a, 64 bits: a cache key that stays the same across Rust versions (std's hasher may not).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The mmdebstrap arguments of the base, without the output file.
fn base_recipe() -> Vec<String> {
    let mut args = vec![
        "--variant=extract".to_owned(),
        "--mode=root".to_owned(),
        "--format=tar".to_owned(),
        format!("--include={}", BASE_PACKAGES.join(",")),
    ];
    args.extend(BASE_HOOKS.iter().map(|h| format!("--extract-hook={h}")));
    args.push(SUITE.to_owned());
    args
}

/// The base image's tag for the current recipe.
pub fn base_tag() -> String {
    let key = fnv1a(&base_recipe().join("\n"));
    format!("{BASE_REPOSITORY}:{SUITE}-{key:016x}")
}

fn image_exists(tag: &str) -> bool {
    cmd::succeeds(podman().args(["image", "exists", tag]))
}

/// Makes sure the base image exists: imports the cached tarball, building it first if needed.
pub fn ensure_base(target_dir: &Path) -> anyhow::Result<String> {
    let tag = base_tag();
    if image_exists(&tag) {
        eprintln!("image: base {tag} present");
        return Ok(tag);
    }
    let cache = target_dir.join("image-base");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let name = tag.rsplit(':').next().unwrap_or(SUITE);
    let tarball = cache.join(format!("debian-{name}.tar"));
    if !tarball.is_file() {
        eprintln!(
            "image: building the Debian {SUITE} base with mmdebstrap ({}) into {}",
            BASE_PACKAGES.join(", "),
            tarball.display()
        );
        let partial = cache.join(format!("debian-{name}.tar.partial"));
        cmd::interactive(cmd("mmdebstrap", base_recipe()).arg(&partial))
            .context("mmdebstrap (needs Debian's archive and root)")?;
        std::fs::rename(&partial, &tarball)
            .with_context(|| format!("renaming {} to {}", partial.display(), tarball.display()))?;
    }
    eprintln!("image: importing {} as {tag}", tarball.display());
    cmd::quiet(podman().arg("import").arg(&tarball).arg(&tag))?;
    Ok(tag)
}

/// Builds [`IMAGE`] from the `Dockerfile`'s runtime stage with `bin` inside; returns its name.
pub fn build(root: &Path, target_dir: &Path, bin: &Path) -> anyhow::Result<String> {
    if !cmd::is_root() {
        bail!("cargo xtask image runs podman and mmdebstrap as root; run it as root");
    }
    let base = ensure_base(target_dir)?;
    // The context holds only the binary, at the path the Dockerfile's `prebuilt` stage copies.
    let context = target_dir.join("image-context");
    let staged: PathBuf = context.join("target/release/deny-observer");
    if let Some(dir) = staged.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(bin, &staged)
        .with_context(|| format!("copying {} to {}", bin.display(), staged.display()))?;
    eprintln!("image: podman build {IMAGE} (base {base})");
    let mut build = podman();
    build
        .arg("build")
        .args(ulimit_args())
        .arg("--file")
        .arg(root.join("Dockerfile"))
        .args(["--build-arg", &format!("BASE_IMAGE={base}")])
        .args(["--build-arg", "BINARY=prebuilt"])
        .args(["--tag", IMAGE])
        .arg(&context);
    cmd::quiet(&mut build)?;
    // The image must run: the binary finds its libraries in the base.
    let version = cmd::output(
        podman()
            .args(["run", "--rm", "--network=none"])
            .args(ulimit_args())
            .args([IMAGE, "--version"]),
    )
    .context("running the built image's `deny-observer --version`")?;
    eprintln!("image: {IMAGE} built ({})", version.trim());
    Ok(IMAGE.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_tag_follows_the_recipe() {
        let tag = base_tag();
        assert!(
            tag.starts_with("localhost/deny-observer-base:bookworm-"),
            "{tag}"
        );
        assert_eq!(tag, base_tag());
        assert_ne!(fnv1a("a"), fnv1a("b"));
        // A known FNV-1a vector, so the key cannot drift silently between toolchains.
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
