//! `deny-observer run`: wires capture → inventory → verdict → export → alert.

use std::process::ExitCode;

/// Arguments of `deny-observer run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Inventory source: a directory of Kubernetes manifests (YAML or JSON).
    #[arg(long)]
    pub inventory: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9965")]
    pub metrics_addr: std::net::SocketAddr,
}

/// Entry point of `deny-observer run`.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not wired yet")
}
