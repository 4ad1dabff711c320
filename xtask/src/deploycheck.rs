//! Placeholder for the deploy checks (`deploy/` manifests validated with kubectl and
//! kubernetes-validate). Another helper owns this file; theirs replaces this one at merge.

/// Runs the deploy checks against the workspace at the given root.
pub fn run(_: &std::path::Path) -> anyhow::Result<()> {
    Ok(())
}
