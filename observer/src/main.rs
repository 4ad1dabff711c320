//! `deny-observer`: the daemon (`run`) and the SRE workflows (`explain`, `audit`, `preflight`,
//! `edges`, `suggest`, `map`).
//!
//! Each subcommand's arguments and logic live in the library module of its stage; this file only
//! parses the command line, sets up logging, and maps errors to exit codes.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc. With 10,000 pods the inventory is some 340,000 small
/// live objects (names, labels, selectors): glibc puts each in a chunk with a header and a
/// 32-byte minimum, jemalloc in size classes from 8 bytes with none. Measured with the memory
/// bench (`inventory_rss`), anonymous RSS after 10 reloads: 39–41 → 31.5–32.1 MiB (manifest
/// directory), 45–47 → 34.7–35.8 MiB (API server, paged lists).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them one by one):
/// - `narenas:1`: inventory loads run on whichever blocking thread tokio picks; with an arena
///   per thread, each load's leftovers would pin pages in a different arena.
/// - `dirty_decay_ms:0`, `muzzy_decay_ms:0`: a page that frees up goes back to the kernel at
///   once (`MADV_DONTNEED`), so a replaced inventory leaves RSS as soon as it is dropped. With
///   a decay time, purging waits for later allocations, and an idle daemon kept a replaced
///   inventory's pages (measured: up to 75 MiB instead of 46 after reloads); jemalloc's
///   background thread would purge on time but costs CPU of its own (measured with `cargo
///   xtask bench --floods-only`: 0.003 instead of 0.001 core-s/s idle). The drop path's CPU
///   per million drops did not move (0.033–0.037 core-s with glibc or this, same bench).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0\0"[0];

/// Why is my Kubernetes traffic denied? Kernel drops → pods, workloads and NetworkPolicies.
#[derive(Debug, Parser)]
#[command(name = "deny-observer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon: capture drops, attribute them, serve /metrics.
    Run(Box<observer::daemon::RunArgs>),
    /// Explain why a flow is allowed or denied by the NetworkPolicies of an inventory.
    Explain(observer::verdict::ExplainArgs),
    /// List namespaces with no NetworkPolicy ("open fields"), unisolated pods, unused policies.
    Audit(observer::verdict::AuditArgs),
    /// Judge every observed edge before and after a policy change; exit 4 when one breaks.
    Preflight(observer::verdict::preflight::PreflightArgs),
    /// Write the edges observed in Prometheus as JSON lines (the input of `--edges`).
    Edges(observer::verdict::edges::EdgesArgs),
    /// Write least-privilege NetworkPolicies for a namespace from its observed allowed traffic.
    Suggest(observer::verdict::suggest::SuggestArgs),
    /// Draw the observed edges as a traffic map: one self-contained HTML page, or served and
    /// refreshed with `--listen`.
    Map(Box<observer::map::MapArgs>),
    /// Install the Localhost seccomp profile for kubelet (deploy/overlays/seccomp-localhost's
    /// init container): the runtime default plus bpf() and perf_event_open().
    InstallSeccompProfile(observer::capture::startup::InstallSeccompArgs),
}

/// The inventory of `explain` and `audit`: the same loader as the daemon's. Its errors name
/// the path already, so the context does not repeat it.
fn load(dir: &std::path::Path) -> anyhow::Result<std::sync::Arc<observer::inventory::Inventory>> {
    let inventory = observer::inventory::load_dir(dir).context("loading the inventory")?;
    Ok(std::sync::Arc::new(inventory))
}

/// Whether `err` comes from writing to a pipe whose reader has closed it.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `explain` exits 1 on DENY, so its own failures (all bad input: a missing inventory, an
    // unknown pod, a bad port) must not exit 1 as well.
    let failure = match cli.command {
        Command::Explain(_) => ExitCode::from(observer::verdict::cli::EXIT_BAD_INPUT),
        // 4 means "breaks" and CI gates on it; any failure to judge is bad input.
        Command::Preflight(_) | Command::Suggest(_) | Command::Edges(_) | Command::Map(_) => {
            ExitCode::from(observer::verdict::preflight::EXIT_BAD_INPUT)
        }
        _ => ExitCode::FAILURE,
    };
    let result = match cli.command {
        Command::Run(args) => observer::daemon::main(*args),
        Command::Explain(args) => load(&args.inventory).and_then(|inv| {
            let code = observer::verdict::explain(&args, inv, &mut std::io::stdout().lock())?;
            Ok(ExitCode::from(code))
        }),
        Command::Audit(args) => observer::verdict::cli::audit_dir(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
        .map(ExitCode::from)
        .map_err(Into::into),
        Command::Preflight(args) => observer::verdict::preflight::preflight(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
        .map(ExitCode::from)
        .context("preflight"),
        Command::Edges(args) => observer::verdict::edges::run_edges(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
        .map(|()| ExitCode::SUCCESS)
        .context("edges"),
        Command::Suggest(args) => observer::verdict::suggest::run_suggest(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
        .map(|()| ExitCode::SUCCESS)
        .context("suggest"),
        // Not a locked stderr: `--listen`'s refresh loop reports on stderr from its own thread.
        Command::Map(args) => observer::map::run_map(&args, &mut std::io::stderr())
            .map(|()| ExitCode::SUCCESS)
            .context("map"),
        Command::InstallSeccompProfile(args) => {
            observer::capture::startup::install_seccomp_profile(&args)
                .map(|path| {
                    println!("installed {}", path.display());
                    ExitCode::SUCCESS
                })
                .context("installing the seccomp profile")
        }
    };
    match result {
        Ok(code) => code,
        // The reader went away (`| head`): what it read is all it wanted, so no message; the
        // status still says the run did not finish, since a verdict may not have been written.
        Err(err) if is_broken_pipe(&err) => failure,
        Err(err) => {
            eprintln!(
                "deny-observer: error: {}",
                observer::daemon::error_line(&err)
            );
            failure
        }
    }
}
