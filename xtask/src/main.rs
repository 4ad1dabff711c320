//! `cargo xtask <command>`: set-up, build, tests and the demo for deny-observer.

mod deploycheck;
mod image;
mod kernels;
mod setup;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

// The tasks' modules reach the fixtures through these names (`crate::cmd`, ...).
use testkit::{BIN_ENV, IMAGE_ENV, SKIP_PRIVILEGED_ENV, cmd, demo, workspace_root};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "deny-observer developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: apt and pip packages, nightly rust-src, bpf-linker built
    /// against the nightly's libLLVM; mount tracefs and bpffs. Idempotent.
    Setup,
    /// Setup, then build target/release/deny-observer with the eBPF object embedded.
    Build,
    /// Setup, build, then the runtime image `localhost/deny-observer:dev` with podman (root; no
    /// registry: a Debian base from mmdebstrap, cached under target/image-base).
    Image,
    /// Setup, build, then every test: unit, integration, privileged end-to-end, deploy checks,
    /// and a deeper property-test pass.
    Test {
        /// Skip the tests that need root (sets DENY_OBSERVER_SKIP_PRIVILEGED=1).
        #[arg(long)]
        skip_privileged: bool,
    },
    /// Setup, build, then run the daemon on a simulated node with live allowed and denied
    /// traffic, and show what is denied. Ctrl-C stops and cleans up.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Where the daemon serves /metrics.
        #[arg(long, default_value = "127.0.0.1:9965")]
        metrics_addr: SocketAddr,
        /// Run this daemon binary instead of building target/release/deny-observer.
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Check deploy/: promtool rules and tests, kustomize renders, schemas, security properties.
    DeployCheck,
    /// Regenerate deploy/all-in-one.yaml and the PrometheusRule from their sources.
    DeployRender,
    /// Benchmark (root): drops/s, CPU, eBPF ns/drop, memory, accuracy and latency of
    /// deny-observer during a deny flood, against no observer and a bpftrace peer.
    Bench(bench::BenchArgs),
    /// Render time of `deny-observer map` in headless Chromium: 2,000 workloads and 10,000
    /// edges in full, twice that by namespace, against a trivial page's load.
    BenchMap(bench::map::MapBenchArgs),
    /// Setup, then the privileged capture tests on other kernels: Debian's kernels (fetched
    /// with a private apt configuration, cached under target/kernels/) booted under qemu, and
    /// the running kernel (`host`). Root.
    Kernels {
        /// A Debian release (bullseye: 5.10, bookworm: 6.1, bookworm-backports: 6.12, trixie)
        /// or `host`; repeat for several. Default: bullseye, bookworm, bookworm-backports, host.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Seconds one guest may take, boot included.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Run this prebuilt `kernel` test binary (observer/tests/kernel.rs) instead of building it.
        #[arg(long)]
        test_bin: Option<PathBuf>,
    },
    /// The libFuzzer pass of `test` alone: each target of xtask/fuzz for `--seconds` (needs
    /// cargo-fuzz: `cargo xtask setup`).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = FUZZ_SECONDS)]
        seconds: u32,
    },
    /// The benchmark's kernel-log tailer (configuration `log-tail`), spawned by `bench`.
    #[command(hide = true)]
    LogTail(bench::logtail::TailArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::run(),
        Task::DeployCheck => deploycheck::run(&root),
        Task::DeployRender => deploycheck::regenerate(&root),
        Task::Build => {
            setup::run()?;
            build(&root).map(|_| ())
        }
        Task::Image => {
            setup::run()?;
            let bin = build(&root)?;
            image::build(&root, &target_dir(&root), &bin).map(|_| ())
        }
        Task::Test { skip_privileged } => {
            if !skip_privileged && !cmd::is_root() {
                bail!(
                    "the end-to-end tests need root (netns, nftables, BPF); run as root, or pass \
                     --skip-privileged to skip them explicitly"
                );
            }
            setup::run()?;
            let bin = build(&root)?;
            test(&root, &bin, skip_privileged)
        }
        Task::Demo {
            duration,
            metrics_addr,
            bin,
        } => {
            setup::run()?;
            let bin = match bin {
                Some(bin) => bin,
                None => build(&root)?,
            };
            demo::run(&demo::DemoOptions {
                bin,
                root,
                metrics_addr,
                duration: duration.map(Duration::from_secs),
            })
        }
        Task::Kernels {
            kernels,
            timeout,
            test_bin,
        } => {
            setup::run()?;
            let kernels = if kernels.is_empty() {
                kernels::DEFAULT_KERNELS
                    .iter()
                    .map(|k| (*k).to_owned())
                    .collect()
            } else {
                kernels
            };
            run_kernels(&root, kernels, Duration::from_secs(timeout), test_bin)
        }
        Task::Fuzz { seconds } => fuzz(&root, seconds),
        Task::LogTail(args) => bench::logtail::tail(&args),
        Task::BenchMap(args) => {
            let bin = match &args.daemon {
                Some(bin) => bin.clone(),
                None => {
                    setup::run()?;
                    build(&root)?
                }
            };
            bench::map::run(&args, &bin)
        }
        Task::Bench(args) => {
            if !cmd::is_root() {
                bail!("cargo xtask bench needs root (netns, nftables, BPF); run it as root");
            }
            let bin = match &args.daemon {
                Some(bin) => bin.clone(),
                None => {
                    setup::run()?;
                    build(&root)?
                }
            };
            let flood = bench::run(&args, &bin);
            if args.floods_only {
                return flood;
            }
            // Both run whatever the other's outcome: each prints its own PASS/FAIL lines.
            let inventory = inventory_benches(&root, &bin);
            flood.and(inventory)
        }
    }
}

/// The inventory's benches: the daemon's RSS with 10,000 pods / 2,000 policies through the
/// manifest directory and the API server, over 10 reloads (`observer/benches/inventory_rss.rs`,
/// target ≤ 64 MiB), the cost of a pod change against a rebuild (`observer/benches/churn.rs`),
/// and a drain's cost per flow in a port scan (`observer/benches/pipeline.rs`).
fn inventory_benches(root: &Path, bin: &Path) -> anyhow::Result<()> {
    let mut c = cargo(root)?;
    c.args([
        "bench",
        "-p",
        "observer",
        "--bench",
        "inventory_rss",
        "--bench",
        "churn",
        "--bench",
        "pipeline",
    ])
    .env(BIN_ENV, bin);
    cmd::interactive(&mut c).context("the inventory memory, churn and pipeline benches")?;
    Ok(())
}

fn cargo(root: &Path) -> anyhow::Result<Command> {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root).env("PATH", setup::build_path()?);
    Ok(c)
}

/// `cargo build --release -p observer`; returns the daemon's path.
fn build(root: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("build: cargo build --release -p observer");
    cmd::interactive(
        cargo(root)?
            .args(["build", "--release", "-p", "observer"])
            // The eBPF object must be built and embedded, whatever the caller's shell says.
            .env_remove("AYA_BUILD_SKIP"),
    )?;
    let bin = target_dir(root).join("release/deny-observer");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    eprintln!("build: {}", bin.display());
    Ok(bin)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn test(root: &Path, bin: &Path, skip_privileged: bool) -> anyhow::Result<()> {
    // The container test (xtask/testkit/tests/e2e_container.rs) runs this image.
    let image = if skip_privileged {
        None
    } else {
        Some(image::build(root, &target_dir(root), bin).context("cargo xtask image")?)
    };
    let with_env = |c: &mut Command| {
        c.env(BIN_ENV, bin).env_remove("AYA_BUILD_SKIP");
        if let Some(image) = &image {
            c.env(IMAGE_ENV, image);
        }
        if skip_privileged {
            c.env(SKIP_PRIVILEGED_ENV, "1");
        } else {
            // An inherited value must not skip them silently.
            c.env_remove(SKIP_PRIVILEGED_ENV);
        }
    };

    eprintln!("test: cargo test --workspace --no-fail-fast");
    let mut c = cargo(root)?;
    c.args(["test", "--workspace", "--no-fail-fast"]);
    with_env(&mut c);
    cmd::interactive(&mut c)?;

    eprintln!("test: deploy checks");
    deploycheck::run(root).context("deploy checks")?;

    // Property tests run with proptest's default 256 cases above; this pass digs deeper into
    // the pure logic (library unit tests only, so the cost stays bounded).
    eprintln!("test: deeper property-test pass (PROPTEST_CASES=2048, library unit tests)");
    let mut c = cargo(root)?;
    c.args(["test", "--workspace", "--lib"])
        .env("PROPTEST_CASES", "2048");
    with_env(&mut c);
    cmd::interactive(&mut c)?;

    // The fuzz tests of the kernel-facing decoders are library unit tests (`fuzz_tests`
    // modules), so the pass above dug into them; the parsers of operator input
    // (observer/tests/fuzz, corpus in observer/tests/fuzz_corpus) get the same depth here. It
    // takes under a minute.
    eprintln!("test: deeper fuzz pass (PROPTEST_CASES=2048, observer/tests/fuzz)");
    let mut c = cargo(root)?;
    c.args(["test", "-p", "observer", "--test", "fuzz"])
        .env("PROPTEST_CASES", "2048");
    with_env(&mut c);
    cmd::interactive(&mut c)?;

    if skip_privileged {
        eprintln!("test: SKIPPED the capture tests on other kernels (--skip-privileged)");
    } else {
        eprintln!(
            "test: capture tests on other kernels under qemu ({})",
            kernels::TEST_KERNELS.join(", ")
        );
        let kernels = kernels::TEST_KERNELS
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        run_kernels(root, kernels, Duration::from_secs(600), None)?;
    }

    fuzz(root, FUZZ_SECONDS)?;
    if skip_privileged {
        eprintln!("test: all passed, but the privileged tests were SKIPPED (--skip-privileged)");
    } else {
        eprintln!("test: all passed");
    }
    Ok(())
}

/// Builds the `kernel` test binary (with the eBPF object) and runs it on `kernels`.
fn run_kernels(
    root: &Path,
    kernels: Vec<String>,
    timeout: Duration,
    test_bin: Option<PathBuf>,
) -> anyhow::Result<()> {
    let test_bin = match test_bin {
        Some(bin) => bin,
        None => kernel_test_bin(root)?,
    };
    kernels::run(&kernels::Options {
        kernels,
        test_bin,
        tests: kernels::GUEST_TESTS
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
        target_dir: target_dir(root),
        root: root.to_owned(),
        timeout,
    })
}

/// `cargo test --release --no-run` of observer/tests/kernel.rs, with the eBPF object;
/// its path. Optimised because under qemu's TCG the debug build's start-up (BTF parsing) made a
/// guest take 3 to 4 minutes instead of about 70 seconds.
fn kernel_test_bin(root: &Path) -> anyhow::Result<PathBuf> {
    let out = cmd::output(
        cargo(root)?
            .args([
                "test",
                "--release",
                "--no-run",
                "--message-format=json",
                "-p",
                "observer",
                "--test",
                "kernel",
            ])
            .env_remove("AYA_BUILD_SKIP"),
    )?;
    let test_bin = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "kernel")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo built no `kernel` test binary")?;
    Ok(test_bin)
}

/// Seconds each libFuzzer target runs in `cargo xtask test`.
const FUZZ_SECONDS: u32 = 25;

/// The coverage-guided pass: each cargo-fuzz target of `xtask/fuzz` for `seconds`,
/// starting from its checked-in corpus (`xtask/fuzz/corpus/<target>`, read only: what libFuzzer
/// finds goes under `target/fuzz`). A missing cargo-fuzz is an error, never a skip: `cargo
/// xtask setup` installs it.
fn fuzz(root: &Path, seconds: u32) -> anyhow::Result<()> {
    let fuzz_dir = root.join("xtask/fuzz");
    if !setup::has_cargo_fuzz() {
        bail!(
            "`cargo +nightly fuzz` is not installed, so {} cannot run; `cargo xtask setup` installs it",
            fuzz_dir.display()
        );
    }
    let work = target_dir(root).join("fuzz");
    let fuzz_cmd = |args: &[&str]| {
        let mut c = Command::new("cargo");
        c.args(["+nightly", "fuzz"])
            .args(args)
            .arg("--fuzz-dir")
            .arg(&fuzz_dir)
            .current_dir(root)
            // The fuzzed parsers do not need the eBPF object.
            .env("AYA_BUILD_SKIP", "1");
        c
    };
    let targets = cmd::output(&mut fuzz_cmd(&["list"]))?;
    let targets: Vec<&str> = targets
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    anyhow::ensure!(
        !targets.is_empty(),
        "{} has no fuzz targets",
        fuzz_dir.display()
    );
    for target in targets {
        let seeds = fuzz_dir.join("corpus").join(target);
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        for d in [&corpus, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        eprintln!("test: fuzzing {target} for {seconds} s (cargo fuzz, libFuzzer)");
        let build = work.join("build");
        let mut c = fuzz_cmd(&["run", "--sanitizer", "none"]);
        c.arg("--target-dir")
            .arg(&build)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        cmd::interactive(&mut c).with_context(|| {
            format!(
                "fuzz target {target} failed; the input is under {}",
                artifacts.display()
            )
        })?;
    }
    Ok(())
}
