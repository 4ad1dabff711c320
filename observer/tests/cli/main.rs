//! The command-line workflows (`audit`, `explain`, `preflight`, `suggest`, `edges`), the
//! metric names the deploy files rely on and the README's metrics table, run as an operator
//! would: through the public API and the built `deny-observer` binary.

mod audit_invalid;
mod deploy_metrics;
mod explain_cli;
mod netpol_cli;
mod preflight_cli;
mod readme_metrics;
mod run_cli;
