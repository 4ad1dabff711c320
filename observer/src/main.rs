//! `deny-observer`: the daemon (`run`) and the SRE workflows (`explain`, `audit`).
//!
//! Each subcommand's arguments and logic live in the library module of its stage; this file only
//! parses the command line, sets up logging, and maps errors to exit codes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Run(observer::daemon::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => observer::daemon::main(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("deny-observer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
