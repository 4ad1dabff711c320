//! `deny-observer run` as a DaemonSet's log pipeline reads it: with `--log-format json`, every
//! line on stderr is a JSON object, the fatal error included.

use std::process::Command;

use serde_json::Value;

/// A start-up failure (here: a missing inventory directory, which needs no root) is the one
/// line an SRE looks for; in JSON mode it must be a JSON object at level ERROR that names the
/// cause, not a plain-text line a collector cannot parse.
#[test]
fn run_failure_is_a_json_log_line_in_json_mode() {
    let state = tempfile::tempdir().unwrap();
    let missing = state.path().join("no-such-inventory");
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_deny-observer"))
            .args([
                "run",
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                format,
            ])
            .arg("--inventory")
            .arg(&missing)
            .arg("--state-dir")
            .arg(state.path())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };

    let out = run("json");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l:?}\n{stderr}"))
        })
        .collect();
    let fatal = lines
        .iter()
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR line:\n{stderr}"));
    let error = fatal["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("loading the inventory from") && error.contains("no-such-inventory"),
        "{fatal}"
    );

    // The human format keeps the one plain line that names the cause.
    let out = run("human");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("deny-observer: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("no-such-inventory"), "{stderr}");
}
