//! `cargo xtask kernels`: the privileged capture tests on other kernels than the machine's own.
//!
//! Each Debian kernel is fetched from Debian's archive with a private apt configuration (nothing
//! is installed system-wide: installing `linux-image-amd64` would also upgrade systemd and udev
//! on the machine), extracted and cached under `target/kernels/`, and booted under qemu with TCG
//! (KVM hangs on these machines). The guest's root file system is the host's `/`, shared
//! read-only over 9p, so the guest runs the very test binaries and tools (`ip`, `nft`, `tc`)
//! of the host; a busybox initramfs only loads the virtio and 9p modules, mounts it and hands
//! over. A second, writable 9p share carries the exit status back; the serial console carries
//! the test output. `host` runs the same tests directly on the running kernel.
//!
//! Tool code, run from the binary's edge: errors are anyhow.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::cmd::{self, cmd};

/// Every kernel `cargo xtask kernels` runs by default.
pub const DEFAULT_KERNELS: &[&str] = &["bullseye", "bookworm", "bookworm-backports", "host"];

/// The kernels `cargo xtask test` boots: the oldest supported (5.10, no drop reasons) and
/// Debian stable's. The others add ~1.5 minutes each.
pub const TEST_KERNELS: &[&str] = &["bullseye", "bookworm"];

/// Tests of `observer/tests/kernel.rs` run on every kernel: which hook the default
/// picks, exact counts of nftables drops with it (tp_btf where the kernel has BTF) and with the
/// classic tracepoint forced, of tc (cls_bpf `TC_ACT_SHOT`) drops, the reason filter, and
/// what a kernel without drop reasons does when kallsyms is hidden (no CAP_SYSLOG), and the
/// accepted-connection counters (TCP everywhere, UDP where `sk_data_ready` exists), and the
/// drop cache with many flows and its thrashing mode (its verifier and memory-ordering
/// assumptions are per kernel). The flood and 50,000-flow tests stay on the host (TCG runs
/// them at a small fraction of the speed and they test userspace, not the kernel).
pub const GUEST_TESTS: &[&str] = &[
    "auto_attaches_tp_btf_where_available",
    "counts_nft_drops_exactly",
    "classic_tracepoint_counts_exactly",
    "counts_tc_drops_exactly",
    "without_cap_syslog_drops_still_count",
    "unknown_reason_name_is_rejected",
    "reasons_of_newer_kernels_are_reported_not_refused",
    "counts_accepted_connections_exactly",
    "drop_cache_counts_many_flows_exactly",
    "a_thrashing_drop_cache_counts_past_itself_and_recovers",
];

/// A Debian release whose `linux-image-amd64` the command can boot.
struct Release {
    name: &'static str,
    /// Lines of its private `sources.list`.
    sources: &'static [&'static str],
}

const RELEASES: &[Release] = &[
    Release {
        name: "bullseye",
        sources: &[
            "deb http://deb.debian.org/debian bullseye main",
            "deb http://deb.debian.org/debian-security bullseye-security main",
        ],
    },
    Release {
        name: "bookworm",
        sources: &[
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
        ],
    },
    Release {
        name: "bookworm-backports",
        sources: &["deb http://deb.debian.org/debian bookworm-backports main"],
    },
    Release {
        name: "trixie",
        sources: &[
            "deb http://deb.debian.org/debian trixie main",
            "deb http://deb.debian.org/debian-security trixie-security main",
        ],
    },
];

/// Modules the initramfs loads before it can mount the host's root over 9p (with their
/// dependencies, from the package's `modules.dep`; built-in ones are skipped).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// What to run, and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// Debian release names (see [`DEFAULT_KERNELS`]) or `host`.
    pub kernels: Vec<String>,
    /// The `kernel` integration-test binary.
    pub test_bin: PathBuf,
    /// Test names passed to it (exact match).
    pub tests: Vec<String>,
    /// `target/` (the cache lives in `target/kernels/`).
    pub target_dir: PathBuf,
    /// The workspace root.
    pub root: PathBuf,
    /// Limit for one guest, boot included.
    pub timeout: Duration,
}

/// Outcome of one kernel.
#[derive(Debug)]
struct Outcome {
    kernel: String,
    release: String,
    passed: bool,
    detail: String,
    secs: f64,
}

/// Runs the tests on every kernel in `opts`, prints a summary, and fails if any kernel failed.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask kernels needs root (the tests inside create namespaces and load BPF \
             programs; the host run and qemu's 9p export of / need it)"
        );
    }
    if opts.kernels.is_empty() {
        bail!("no kernel given");
    }
    for k in &opts.kernels {
        if k != "host" && release(k).is_none() {
            bail!(
                "unknown kernel {k:?}: use host or one of {}",
                RELEASES
                    .iter()
                    .map(|r| r.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut outcomes = Vec::new();
    for k in &opts.kernels {
        let start = Instant::now();
        let res = if k == "host" {
            run_host(opts)
        } else {
            run_debian(opts, k)
        };
        let secs = start.elapsed().as_secs_f64();
        let outcome = match res {
            Ok(release) => Outcome {
                kernel: k.clone(),
                release,
                passed: true,
                detail: "passed".to_owned(),
                secs,
            },
            Err(e) => Outcome {
                kernel: k.clone(),
                release: String::new(),
                passed: false,
                detail: format!("{e:#}"),
                secs,
            },
        };
        eprintln!(
            "kernels: {} {}: {} ({:.0} s)",
            outcome.kernel,
            outcome.release,
            if outcome.passed { "PASS" } else { "FAIL" },
            outcome.secs
        );
        outcomes.push(outcome);
    }
    eprintln!("kernels: summary");
    for o in &outcomes {
        eprintln!(
            "  {:<20} {:<24} {:<4} {:>5.0} s  {}",
            o.kernel,
            o.release,
            if o.passed { "PASS" } else { "FAIL" },
            o.secs,
            if o.passed { "" } else { o.detail.as_str() }
        );
    }
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("capture tests failed on: {}", failed.join(", "));
    }
    Ok(())
}

fn release(name: &str) -> Option<&'static Release> {
    RELEASES.iter().find(|r| r.name == name)
}

/// The tests on the running kernel.
fn run_host(opts: &Options) -> anyhow::Result<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    // Absolute: the tests run in the crate directory.
    let bin = opts
        .test_bin
        .canonicalize()
        .with_context(|| format!("the test binary {} is missing", opts.test_bin.display()))?;
    eprintln!("kernels: host {kernel}: {}", bin.display());
    let mut c = Command::new(&bin);
    c.args(["--exact", "--test-threads=1", "--nocapture"])
        .args(&opts.tests)
        .current_dir(opts.root.join("observer"))
        .env_remove(crate::SKIP_PRIVILEGED_ENV)
        .env("RUST_BACKTRACE", "1");
    cmd::interactive(&mut c)?;
    Ok(kernel)
}

/// An extracted kernel package: `vmlinuz`, and its modules under `root/lib/modules/<release>`.
#[derive(Debug)]
struct Extracted {
    /// Kernel release (`uname -r` in the guest).
    release: String,
    /// The package tree.
    root: PathBuf,
    vmlinuz: PathBuf,
}

fn run_debian(opts: &Options, name: &str) -> anyhow::Result<String> {
    let rel = release(name).ok_or_else(|| anyhow!("unknown release {name}"))?;
    let dir = opts.target_dir.join("kernels").join(rel.name);
    let kernel = fetch(rel, &dir).with_context(|| format!("fetching the {name} kernel"))?;
    let initramfs = dir.join(format!("initramfs-{}.cpio", kernel.release));
    write_initramfs(&kernel, &initramfs).context("building the initramfs")?;
    boot(opts, name, &kernel, &initramfs)?;
    Ok(kernel.release)
}

/// apt options that make apt use only files under `dir` (sources, lists, archives) and ignore
/// the machine's dpkg status, so nothing on the machine changes.
fn apt_opts(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::sourcelist={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::sourceparts=-".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oDir::State::status=/dev/null".to_owned(),
        // The files are root's, in a directory _apt cannot enter.
        "-oAPT::Sandbox::User=root".to_owned(),
        "-qq".to_owned(),
    ]
}

/// Downloads and extracts the release's current `linux-image-amd64` kernel, once: the
/// extraction is reused while the archive offers the same package version, and when the
/// archive cannot be reached.
fn fetch(rel: &Release, dir: &Path) -> anyhow::Result<Extracted> {
    let apt_dir = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt_dir.join(sub))
            .with_context(|| format!("creating {}", apt_dir.join(sub).display()))?;
    }
    std::fs::write(apt_dir.join("sources.list"), rel.sources.join("\n") + "\n")
        .context("writing sources.list")?;
    let opts = apt_opts(&apt_dir);
    let updated = cmd::quiet(cmd("apt-get", &opts).arg("update"));
    let package = match updated.map_err(anyhow::Error::from).and_then(|()| {
        let show = cmd::output(cmd("apt-cache", &opts).args([
            "show",
            "--no-all-versions",
            "linux-image-amd64",
        ]))?;
        image_package(&show)
    }) {
        Ok(p) => p,
        Err(e) => {
            // Offline: the last extraction still tests this release's kernel.
            if let Some(cached) = newest_extraction(dir) {
                eprintln!(
                    "kernels: {}: the archive is unreachable ({e:#}); using the cached {}",
                    rel.name, cached.release
                );
                return Ok(cached);
            }
            return Err(e.context(format!("finding {}'s kernel package", rel.name)));
        }
    };
    let tree = dir.join(&package);
    if let Some(done) = extraction(&tree) {
        return Ok(done);
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    // The unsigned package has the same kernel and modules; the signed one is the fallback
    // where a release has no unsigned package.
    let mut downloaded = None;
    for candidate in [format!("{package}-unsigned"), package.clone()] {
        eprintln!("kernels: {}: apt-get download {candidate}", rel.name);
        let mut c = cmd("apt-get", &opts);
        c.args(["download", &candidate]).current_dir(&debs);
        if cmd::quiet(&mut c).is_ok() {
            downloaded = Some(candidate);
            break;
        }
    }
    let Some(candidate) = downloaded else {
        bail!("neither {package}-unsigned nor {package} could be downloaded");
    };
    let deb = std::fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{candidate}_")) && n.ends_with(".deb"))
        })
        .ok_or_else(|| anyhow!("apt-get download left no {candidate}_*.deb"))?;
    let tmp = dir.join(format!("{package}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    cmd::quiet(&mut cmd("dpkg-deb", [Path::new("-x"), &deb, &tmp]))?;
    let modules = tmp.join("lib/modules");
    let release = single_subdir(&modules)?;
    decompress_modules(&modules.join(&release))?;
    cmd::quiet(&mut cmd(
        "depmod",
        ["-b".as_ref(), tmp.as_os_str(), release.as_ref()],
    ))
    .context("depmod")?;
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::rename(&tmp, &tree)?;
    std::fs::write(tree.join(".complete"), &release)?;
    std::fs::remove_file(&deb)?;
    extraction(&tree).ok_or_else(|| anyhow!("{} is incomplete", tree.display()))
}

/// `linux-image-<abi>-amd64` from the metapackage's `Depends:`.
fn image_package(show: &str) -> anyhow::Result<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .and_then(|deps| deps.split([',', ' ']).find(|d| !d.is_empty()))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("linux-image-amd64 has no Depends line:\n{show}"))
}

fn extraction(tree: &Path) -> Option<Extracted> {
    let release = std::fs::read_to_string(tree.join(".complete")).ok()?;
    let vmlinuz = tree.join(format!("boot/vmlinuz-{release}"));
    vmlinuz.is_file().then(|| Extracted {
        release,
        root: tree.to_owned(),
        vmlinuz,
    })
}

fn newest_extraction(dir: &Path) -> Option<Extracted> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, extraction(&e.path())?))
        })
        .max_by_key(|(m, _)| *m)
        .map(|(_, x)| x)
}

fn single_subdir(dir: &Path) -> anyhow::Result<String> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        ),
    }
}

/// Newer packages ship `.ko.xz`/`.ko.zst`; busybox's insmod and older kmods load only plain
/// `.ko`, so they are decompressed once here.
fn decompress_modules(dir: &Path) -> anyhow::Result<()> {
    let mut xz = Vec::new();
    let mut zst = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "xz") {
                xz.push(p);
            } else if p.extension().is_some_and(|x| x == "zst") {
                zst.push(p);
            }
        }
    }
    for chunk in xz.chunks(200) {
        cmd::quiet(cmd("xz", ["-d", "-f"]).args(chunk)).context("xz -d")?;
    }
    for chunk in zst.chunks(200) {
        cmd::quiet(cmd("zstd", ["-q", "-d", "-f", "--rm"]).args(chunk)).context("zstd -d")?;
    }
    Ok(())
}

/// Modules to load, dependencies first, as paths relative to `lib/modules/<release>`.
fn module_load_order(kernel: &Extracted) -> anyhow::Result<Vec<String>> {
    let base = kernel.root.join("lib/modules").join(&kernel.release);
    let dep_text =
        std::fs::read_to_string(base.join("modules.dep")).context("reading modules.dep")?;
    let builtin = std::fs::read_to_string(base.join("modules.builtin")).unwrap_or_default();
    let deps: BTreeMap<String, Vec<String>> = dep_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.trim().to_owned(),
                d.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect();
    let find = |name: &str, paths: &[&str]| {
        let want = name.replace('-', "_");
        paths
            .iter()
            .find(|p| module_name(p) == want)
            .map(|p| (*p).to_owned())
    };
    let loadable: Vec<&str> = deps.keys().map(String::as_str).collect();
    let builtin: Vec<&str> = builtin.lines().collect();
    let mut order = Vec::new();
    for name in BOOT_MODULES {
        if let Some(path) = find(name, &loadable) {
            visit(&path, &deps, &mut order);
        } else if find(name, &builtin).is_none() {
            bail!("module {name} is neither in modules.dep nor built in");
        }
    }
    Ok(order)
}

/// `kernel/fs/9p/9p.ko` → `9p`; `virtio-pci` and `virtio_pci` are the same module.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).replace('-', "_")
}

/// Depth-first, dependencies before the module (modules.dep lists each module's full closure).
fn visit(path: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
    if order.iter().any(|p| p == path) {
        return;
    }
    for d in deps.get(path).into_iter().flatten() {
        visit(d, deps, order);
    }
    if !order.iter().any(|p| p == path) {
        order.push(path.to_owned());
    }
}

/// The initramfs's `/init`: loads the boot modules, mounts the host's `/` read-only over 9p
/// with the writable places a system needs as tmpfs, points the kernel's module requests at
/// a modprobe wrapper for the package's modules, then hands over to the run script named on
/// the kernel command line. `switch_root` moves the new root onto `/`, which the kernel's
/// usermode helpers (modprobe) also see.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "GUEST-INIT-FAILED: $*"; poweroff -f; }
for m in $(cat /modules.order); do
    insmod "/modules/$m" || fail "insmod $m"
done
run=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in dobs.run=*) run="${arg#dobs.run=}" ;; esac
done
[ -n "$run" ] || fail "no dobs.run= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot || fail "mount hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results "/newroot$run" || fail "mount results"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
# A workspace under one of these (a checkout in /tmp) must stay visible: that one keeps the
# host's read-only view, and TMPDIR points the tests at a tmpfs instead.
for d in /tmp /run /var/tmp; do
  case "$run" in "$d"/*) continue;; esac
  mount -t tmpfs -o mode=1777 tmpfs "/newroot$d" || fail "tmpfs $d"
done
export TMPDIR=/dev/shm
mount -t tracefs tracefs /newroot/sys/kernel/tracing || fail "tracefs"
mount -t bpf bpf /newroot/sys/fs/bpf || fail "bpffs"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || true
# The kernel's module requests run the host's modprobe on the package's modules (the host may
# have no /lib/modules to mount them over).
echo "$run/bin/modprobe" > /proc/sys/kernel/modprobe
exec switch_root /newroot /bin/sh "$run/run.sh"
"#;

/// Writes the initramfs (an uncompressed newc cpio) for `kernel` to `out`.
fn write_initramfs(kernel: &Extracted, out: &Path) -> anyhow::Result<()> {
    let order = module_load_order(kernel)?;
    let base = kernel.root.join("lib/modules").join(&kernel.release);
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (busybox-static; `cargo xtask setup` installs it)")?;
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "modules", "proc", "sys", "newroot"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut names = Vec::new();
    for rel in &order {
        let name = rel.rsplit('/').next().unwrap_or(rel).to_owned();
        let data = std::fs::read(base.join(rel)).with_context(|| format!("reading {rel}"))?;
        cpio.file(&format!("modules/{name}"), 0o644, &data);
        names.push(name);
    }
    cpio.file("modules.order", 0o644, (names.join("\n") + "\n").as_bytes());
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// A newc-format cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            namesize,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots `kernel` with the initramfs and waits for the run script's exit status.
fn boot(opts: &Options, name: &str, kernel: &Extracted, initramfs: &Path) -> anyhow::Result<()> {
    let run_dir = opts.target_dir.join("kernels").join(format!("run-{name}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let rc_file = run_dir.join("rc");
    let test_bin = opts
        .test_bin
        .canonicalize()
        .with_context(|| format!("the test binary {} is missing", opts.test_bin.display()))?;
    let tests = opts
        .tests
        .iter()
        .map(|t| sh_quote(t))
        .collect::<Vec<_>>()
        .join(" ");
    // PID 1 of the guest after switch_root: runs the tests, stores the exit status on the
    // writable share, and powers off (a PID 1 that exits would panic the kernel).
    let script = format!(
        r#"export PATH={bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp RUST_BACKTRACE=1
unset {skip}
ip link set lo up
echo "guest: Linux $(uname -r), $(nproc) CPUs"
# For the record (and for fixtures): the tracepoint's layout on this kernel.
cat /sys/kernel/tracing/events/skb/kfree_skb/format
cd {crate_dir}
{bin} --exact --test-threads=1 --nocapture {tests}
rc=$?
echo "$rc" > {rc}.tmp && mv {rc}.tmp {rc}
sync
echo "guest: tests exited with status $rc"
busybox poweroff -f
"#,
        skip = crate::SKIP_PRIVILEGED_ENV,
        bin_dir = sh_quote(&run_dir.join("bin").to_string_lossy()),
        crate_dir = sh_quote(&opts.root.join("observer").canonicalize()?.to_string_lossy()),
        bin = sh_quote(&test_bin.to_string_lossy()),
        tests = tests,
        rc = sh_quote(&rc_file.to_string_lossy()),
    );
    std::fs::write(run_dir.join("run.sh"), script)?;
    // modprobe for the kernel's module requests and for the tools (first in PATH): the
    // package's modules, with the host's kmod.
    let bin_dir = run_dir.join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let wrapper = bin_dir.join("modprobe");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec /sbin/modprobe -d {} \"$@\"\n",
            sh_quote(&kernel.root.canonicalize()?.to_string_lossy())
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let log_path = run_dir.join("console.log");
    let mut log = std::fs::File::create(&log_path)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 loglevel=4 rdinit=/init dobs.run={}",
        run_dir.display()
    ))
    .arg("-virtfs")
    .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag=results,security_model=none",
        run_dir.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd::die_with_parent(&mut qemu);
    eprintln!(
        "kernels: {name}: booting Linux {} under qemu (TCG), timeout {} s; console: {}",
        kernel.release,
        opts.timeout.as_secs(),
        log_path.display()
    );
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no qemu stdout"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no qemu stderr"))?;
    let tag = name.to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let deadline = Instant::now() + opts.timeout;
    let mut tail: Vec<String> = Vec::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            let line = line.trim_end_matches('\r').to_owned();
            writeln!(log, "{line}")?;
            eprintln!("[{tag}] {line}");
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = out_thread.join();
    let _ = err_thread.join();
    while let Ok(line) = rx.try_recv() {
        writeln!(log, "{}", line.trim_end_matches('\r'))?;
        eprintln!("[{tag}] {line}");
    }
    let Some(status) = status else {
        bail!(
            "the guest did not finish within {} s (console: {})",
            opts.timeout.as_secs(),
            log_path.display()
        );
    };
    let rc = std::fs::read_to_string(&rc_file).map_err(|e| {
        anyhow!(
            "the guest left no exit status ({e}; qemu exited with {status}); last console lines:\n{}",
            tail.join("\n")
        )
    })?;
    match rc.trim() {
        "0" => Ok(()),
        other => bail!(
            "the tests failed in the guest (exit status {other}; console: {})",
            log_path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_package_from_the_metapackage() {
        let show = "Package: linux-image-amd64\nVersion: 5.10.262-1\nDepends: linux-image-5.10.0-46-amd64 (= 5.10.262-1)\n";
        assert_eq!(image_package(show).unwrap(), "linux-image-5.10.0-46-amd64");
        assert!(image_package("Package: x\n").is_err());
    }

    #[test]
    fn dependencies_load_first() {
        let deps: BTreeMap<String, Vec<String>> = [
            (
                "kernel/fs/9p/9p.ko",
                vec!["kernel/fs/netfs/netfs.ko", "kernel/net/9p/9pnet.ko"],
            ),
            ("kernel/net/9p/9pnet.ko", vec![]),
            ("kernel/fs/netfs/netfs.ko", vec![]),
            (
                "kernel/net/9p/9pnet_virtio.ko",
                vec!["kernel/net/9p/9pnet.ko"],
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
        let mut order = Vec::new();
        visit("kernel/net/9p/9pnet_virtio.ko", &deps, &mut order);
        visit("kernel/fs/9p/9p.ko", &deps, &mut order);
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio-pci.ko"),
            "virtio_pci"
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
