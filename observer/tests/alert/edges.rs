//! New-denied-edge tracker: once per edge, retention, persistence across restarts.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers panic with context, like the tests"
)]

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use observer::alert::edges::{
    DeniedEdge, EdgeConfig, EdgeTracker, LoadOutcome, STATE_FILE, STATE_VERSION,
};
use observer::flow::{Direction, Protocol};

const DAY: u64 = 86400;

fn at(sec: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + sec)
}

fn edge(src: &str, dst: &str, port: u16) -> DeniedEdge {
    DeniedEdge {
        direction: Direction::Ingress,
        source_namespace: "shop".into(),
        source_workload: src.into(),
        destination_namespace: "db".into(),
        destination_workload: dst.into(),
        protocol: Protocol::Tcp,
        port,
        ports_folded: false,
    }
}

fn persistent(dir: &Path) -> EdgeConfig {
    EdgeConfig {
        state_dir: Some(dir.to_path_buf()),
        ..EdgeConfig::default()
    }
}

#[test]
fn fires_once_per_edge_and_per_distinguishing_field() {
    let mut t = EdgeTracker::open(EdgeConfig::default(), at(0));
    assert_eq!(t.load_outcome(), &LoadOutcome::InMemory);
    let e = edge("cart", "postgres", 5432);
    assert!(t.observe(at(0), &e, false));
    for s in 1..1000 {
        assert!(!t.observe(at(s), &e, false), "re-fired at {s}");
    }
    // Each field makes a different edge.
    let mut other_dir = e.clone();
    other_dir.direction = Direction::Egress;
    let mut other_proto = e.clone();
    other_proto.protocol = Protocol::Udp;
    for (i, n) in [
        edge("web", "postgres", 5432),
        edge("cart", "redis", 5432),
        edge("cart", "postgres", 5433),
        other_dir,
        other_proto,
    ]
    .into_iter()
    .enumerate()
    {
        assert!(t.observe(at(2000), &n, false), "variant {i} is a new edge");
        assert!(!t.observe(at(2001), &n, false), "variant {i} fired twice");
    }
    assert_eq!(t.len(), 6);
}

#[test]
fn fires_again_only_after_a_quiet_retention_window() {
    let retention = EdgeConfig::default().retention.as_secs();
    assert_eq!(retention, 7 * DAY);
    let mut t = EdgeTracker::open(EdgeConfig::default(), at(0));
    let e = edge("cart", "postgres", 5432);
    assert!(t.observe(at(0), &e, false));
    // Denied every day for three weeks: each deny refreshes it, so it never fires again.
    for d in 1..=21 {
        assert!(!t.observe(at(d * DAY), &e, false), "day {d}");
    }
    // Quiet for just under the retention: still known.
    let last = 21 * DAY;
    assert!(!t.observe(at(last + retention - 1), &e, false));
    // Quiet for the full retention: new again, once.
    let back = last + retention - 1 + retention;
    assert!(t.observe(at(back), &e, false));
    assert!(!t.observe(at(back + 1), &e, false));
}

#[test]
fn prune_forgets_expired_edges_with_their_expected_flag() {
    let mut t = EdgeTracker::open(EdgeConfig::default(), at(0));
    let old = edge("cart", "postgres", 5432);
    let recent = edge("web", "postgres", 5432);
    t.observe(at(0), &old, true);
    t.observe(at(3 * DAY), &recent, false);
    assert!(t.prune(at(6 * DAY)).is_empty());
    assert_eq!(t.prune(at(7 * DAY)), vec![(old.clone(), true)]);
    assert_eq!(t.len(), 1);
    assert!(t.observe(at(7 * DAY), &old, false));
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let e = edge("cart", "postgres", 5432);
    let f = edge("web", "postgres", 5432);
    {
        let mut t = EdgeTracker::open(persistent(dir.path()), at(0));
        assert_eq!(t.load_outcome(), &LoadOutcome::Missing);
        assert!(t.observe(at(0), &e, false));
        assert!(t.observe(at(10), &f, true));
        t.save(at(10)).unwrap();
    }
    // A restart an hour later: neither edge fires again.
    let mut t = EdgeTracker::open(persistent(dir.path()), at(3600));
    assert_eq!(t.load_outcome(), &LoadOutcome::Loaded(2));
    assert!(t.is_known(at(3600), &e) && t.is_known(at(3600), &f));
    // (Not re-denied here, so their last deny stays at 0 and 10.)
    assert!(t.observe(at(3600), &edge("api", "postgres", 5432), false));
    t.save(at(3600)).unwrap();

    // A restart after `e` and `f` went quiet for longer than the retention: they are not
    // loaded, and fire again; the edge denied at 3600 is still known.
    let mut t = EdgeTracker::open(persistent(dir.path()), at(3600 + 7 * DAY - 1));
    assert_eq!(t.load_outcome(), &LoadOutcome::Loaded(1));
    assert!(t.observe(at(3600 + 7 * DAY - 1), &e, false));
    assert!(!t.observe(
        at(3600 + 7 * DAY - 1),
        &edge("api", "postgres", 5432),
        false
    ));
}

#[test]
fn corrupt_or_foreign_state_starts_fresh_and_is_set_aside() {
    let cases: [(&str, &[u8]); 4] = [
        ("garbage", b"{\"version\": 1, \"edges\": [tru"),
        ("binary", &[0xff, 0x00, 0x13, 0x37]),
        ("empty", b""),
        (
            "future version",
            b"{\"version\": 99, \"saved_at_unix_ms\": 0, \"edges\": []}",
        ),
    ];
    for (name, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        fs::write(&path, bytes).unwrap();
        let mut t = EdgeTracker::open(persistent(dir.path()), at(0));
        assert!(
            matches!(t.load_outcome(), LoadOutcome::Corrupt(r) if r.contains(STATE_FILE)),
            "{name}: {:?}",
            t.load_outcome()
        );
        assert!(t.is_empty(), "{name}");
        assert!(
            dir.path().join(format!("{STATE_FILE}.corrupt")).exists(),
            "{name}: bad file set aside"
        );
        // It works normally afterwards, and the next save is readable.
        let e = edge("cart", "postgres", 5432);
        assert!(t.observe(at(1), &e, false));
        t.save(at(1)).unwrap();
        let t = EdgeTracker::open(persistent(dir.path()), at(2));
        assert_eq!(t.load_outcome(), &LoadOutcome::Loaded(1), "{name}");
    }
    assert_eq!(STATE_VERSION, 2);
}

#[test]
fn saves_are_debounced_and_happen_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join(STATE_FILE);
    let cfg = EdgeConfig {
        state_dir: Some(dir.path().join("nested")),
        ..EdgeConfig::default()
    };
    let debounce = cfg.save_debounce.as_secs();
    let interval = cfg.save_interval.as_secs();
    let mut t = EdgeTracker::open(cfg, at(0));
    // Written at open: the learning start must survive a crash in the first seconds.
    assert!(path.exists(), "state dir and file created at open");
    assert!(!t.maybe_save(at(100)).unwrap(), "nothing changed");

    let e = edge("cart", "postgres", 5432);
    assert!(t.observe(at(100), &e, false));
    assert!(
        t.maybe_save(at(100)).unwrap(),
        "last save long ago: new edge saved now"
    );
    assert!(path.exists());

    // A burst of new edges right after: held back by the debounce, then written once.
    for p in 1..50 {
        t.observe(
            at(101),
            &edge("cart", &format!("postgres-{p}"), 5432),
            false,
        );
    }
    assert!(!t.maybe_save(at(100 + debounce - 1)).unwrap());
    assert!(t.maybe_save(at(100 + debounce)).unwrap());
    assert!(!t.maybe_save(at(100 + debounce + 1)).unwrap());
    let reloaded = EdgeTracker::open(
        EdgeConfig {
            state_dir: Some(dir.path().join("nested")),
            ..EdgeConfig::default()
        },
        at(200),
    );
    assert_eq!(reloaded.load_outcome(), &LoadOutcome::Loaded(50));

    // Only refreshed last-denied times: saved on the slower interval.
    let base = 100 + debounce;
    assert!(!t.observe(at(base + 1), &e, false));
    assert!(!t.maybe_save(at(base + interval - 1)).unwrap());
    assert!(t.maybe_save(at(base + interval)).unwrap());
}

#[test]
fn an_unwritable_state_dir_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the directory should be: fails even for root.
    let blocker = dir.path().join("not-a-dir");
    fs::write(&blocker, b"x").unwrap();
    let mut t = EdgeTracker::open(persistent(&blocker), at(0));
    assert!(t.observe(at(0), &edge("cart", "postgres", 5432), false));
    let err = t.save(at(0)).unwrap_err().to_string();
    assert!(err.contains("not-a-dir"), "{err}");
    // Still usable in memory.
    assert!(!t.observe(at(1), &edge("cart", "postgres", 5432), false));
}
