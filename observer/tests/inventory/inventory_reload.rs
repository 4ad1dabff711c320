//! The manifest-directory watcher on real files: change → new snapshot; broken file → the old
//! snapshot stays and the failure is counted; fix → recovery; ConfigMap-style symlink swaps.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers panic with context, like the tests themselves"
)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use observer::inventory::Inventory;
use observer::inventory::reload::watch_dir;
use tokio::sync::watch;

const POLL: Duration = Duration::from_millis(20);
/// Generous: the machine is shared; a reload normally lands within two polls.
const WAIT: Duration = Duration::from_secs(10);

fn pods(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: n}}\nstatus: {{podIP: 10.0.0.{}}}\n",
                i + 1
            )
        })
        .collect()
}

async fn next(rx: &mut watch::Receiver<Arc<Inventory>>) -> Arc<Inventory> {
    tokio::time::timeout(WAIT, rx.changed())
        .await
        .expect("no reload within the timeout")
        .unwrap();
    rx.borrow_and_update().clone()
}

/// Waits until `cond` holds, polling (for counters, which have no change notification).
async fn until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn write(path: &Path, text: &str) {
    // Write-then-rename, as editors and kubectl cp do, so a poll never sees half a file.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn change_break_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pods.yaml");
    write(&file, &pods(1));
    let w = watch_dir(dir.path().to_owned(), POLL).await.unwrap();
    let stats = w.stats();
    let mut rx = w.subscribe();
    assert_eq!(w.current().pods.len(), 1);
    assert_eq!(stats.reloads_ok(), 1);
    assert_eq!(stats.reloads_failed(), 0);
    assert!(stats.last_success_unix() > 0);

    // Change → new snapshot.
    write(&file, &pods(3));
    let inv = next(&mut rx).await;
    assert_eq!(inv.pods.len(), 3);
    assert_eq!(w.counts().pods, 3);
    assert_eq!(stats.reloads_ok(), 2);

    // A new file with an object the API server would refuse → a new snapshot without it.
    let bad = dir.path().join("zz-bad.yaml");
    write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: n}\nstatus: {podIP: 10.0.0.999}\n",
    );
    let inv = next(&mut rx).await;
    assert_eq!(inv.pods.len(), 3);
    assert_eq!(inv.invalid.len(), 1);
    assert_eq!(inv.invalid_counts()["pods"], 1);
    assert_eq!(stats.reloads_ok(), 3);

    // A file that does not parse → the old snapshot stays, the failure is counted once.
    write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: n\n",
    );
    until(|| stats.reloads_failed() == 1).await;
    assert!(stats.failing());
    let err = stats.last_error().unwrap();
    assert!(err.contains("zz-bad.yaml"), "{err}");
    assert!(err.contains("document 1"), "{err}");
    assert_eq!(w.current().pods.len(), 3);
    // Unchanged broken directory: no repeated failures.
    tokio::time::sleep(POLL * 10).await;
    assert_eq!(stats.reloads_failed(), 1);
    assert!(!rx.has_changed().unwrap());

    // Fix → recovers.
    write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: fixed, namespace: n}\nstatus: {podIP: 10.0.0.99}\n",
    );
    let inv = next(&mut rx).await;
    assert_eq!(inv.pods.len(), 4);
    assert!(inv.pods.iter().any(|p| p.name == "fixed"));
    assert!(!stats.failing());
    assert!(inv.invalid.is_empty());
    assert_eq!(stats.reloads_ok(), 4);
    // The last error is kept for diagnosis.
    assert!(stats.last_error().is_some());

    // Removing a file is a change too.
    fs::remove_file(&bad).unwrap();
    let inv = next(&mut rx).await;
    assert_eq!(inv.pods.len(), 3);
}

#[tokio::test]
async fn initial_failure_is_returned() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("x.yaml"), "kind: [oops");
    let e = watch_dir(dir.path().to_owned(), POLL).await.unwrap_err();
    assert!(e.to_string().contains("x.yaml"), "{e}");
    let e = watch_dir(dir.path().join("nope"), POLL).await.unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[tokio::test]
async fn configmap_symlink_swap_reloads() {
    // The kubelet's ConfigMap update: write a new timestamped directory, then atomically
    // repoint `..data`. The visible file path never changes.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("..v1")).unwrap();
    fs::write(d.join("..v1/pods.yaml"), pods(2)).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/pods.yaml", d.join("pods.yaml")).unwrap();
    let w = watch_dir(d.to_owned(), POLL).await.unwrap();
    let mut rx = w.subscribe();
    assert_eq!(w.current().pods.len(), 2);

    fs::create_dir(d.join("..v2")).unwrap();
    // Same size as before on purpose (two pods, different IPs of equal length).
    fs::write(
        d.join("..v2/pods.yaml"),
        pods(2).replace("10.0.0.", "10.9.0."),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    fs::remove_dir_all(d.join("..v1")).unwrap();
    let inv = next(&mut rx).await;
    assert_eq!(inv.pods.len(), 2);
    assert!(
        inv.pods
            .iter()
            .all(|p| p.ips[0].to_string().starts_with("10.9.0.")),
        "{inv:?}"
    );
    assert_eq!(w.stats().reloads_failed(), 0);
}

#[tokio::test]
async fn an_empty_directory_is_refused_at_start_and_later() {
    let dir = tempfile::tempdir().unwrap();
    let e = watch_dir(dir.path().to_owned(), POLL).await.unwrap_err();
    assert!(e.to_string().contains("holds no namespace"), "{e}");

    // Deleted and recreated empty: a failed reload, the last inventory stays, and the success
    // time stops advancing.
    let d = dir.path().join("inv");
    fs::create_dir(&d).unwrap();
    write(&d.join("pods.yaml"), &pods(2));
    let w = watch_dir(d.clone(), POLL).await.unwrap();
    let stats = w.stats();
    fs::remove_dir_all(&d).unwrap();
    fs::create_dir(&d).unwrap();
    until(|| stats.reloads_failed() >= 1).await;
    assert!(stats.failing());
    assert_eq!(w.counts().pods, 2, "the last good inventory stays in use");
    let frozen = stats.last_success_unix();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        stats.last_success_unix(),
        frozen,
        "success time advanced while failing"
    );

    // Files back: success again, and an unchanged directory keeps the success time current.
    write(&d.join("pods.yaml"), &pods(3));
    until(|| !stats.failing()).await;
    assert_eq!(w.counts().pods, 3);
    let t = stats.last_success_unix();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        stats.last_success_unix() > t,
        "an unchanged poll confirms the inventory"
    );
}

#[tokio::test]
async fn reload_now_rereads_an_unchanged_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("pods.yaml"), &pods(1));
    let w = watch_dir(dir.path().to_owned(), Duration::from_secs(3600))
        .await
        .unwrap();
    let mut rx = w.subscribe();
    let stats = w.stats();
    assert_eq!(stats.reloads_ok(), 1);
    w.reload_now();
    let _ = next(&mut rx).await;
    assert_eq!(stats.reloads_ok(), 2);
}
