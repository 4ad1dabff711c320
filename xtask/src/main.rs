mod deploycheck;

fn main() -> anyhow::Result<()> {
    // The repository root: xtask lives one level below it.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::args().nth(1).as_deref() {
        Some("deploy-check") => deploycheck::run(&root),
        Some("deploy-render") => deploycheck::regenerate(&root),
        other => anyhow::bail!("unknown xtask {other:?}: deploy-check | deploy-render"),
    }
}
