//! Export stage: recording into an existing series allocates nothing (the daemon calls
//! `record_drop` for every drained flow delta). Counted by a global allocator that counts the
//! allocations of the current thread only, so parallel tests do not disturb it.

#![allow(
    clippy::expect_used,
    reason = "helpers of integration tests panic with context, like the tests"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use observer::export::{DropLabels, Metrics, MetricsConfig, PolicyDenyLabels, PolicyMatch};
use observer::flow::{Direction, Protocol};

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread-local may be gone during thread teardown.
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn recording_into_existing_series_does_not_allocate() {
    let m = Metrics::new(MetricsConfig {
        series_limit: 1,
        expiry_grace: Duration::from_secs(60),
    })
    .expect("metrics");
    let drop = DropLabels {
        reason: "netfilter_drop",
        direction: Direction::Egress,
        source_namespace: "a",
        source_workload: "web",
        destination_namespace: "b",
        destination_workload: "db",
        protocol: Protocol::Udp,
    };
    let overflowing = DropLabels {
        source_workload: "other",
        ..drop
    };
    let deny = PolicyDenyLabels {
        direction: Direction::Egress,
        source_namespace: "a",
        source_workload: "web",
        destination_namespace: "b",
        destination_workload: "db",
        protocol: Protocol::Udp,
        policy: "a/default-deny",
        policy_match: PolicyMatch::DefaultDeny,
    };
    // First samples create the series (and the overflow series): those may allocate.
    let before = allocations();
    m.record_drop(&drop, 1, 1);
    m.record_drop(&overflowing, 1, 1);
    m.record_policy_deny(&deny, 1);
    assert!(
        allocations() > before,
        "the allocation counter does not count"
    );

    let before = allocations();
    for _ in 0..1000 {
        m.record_drop(&drop, 1, 100);
        m.record_drop(&overflowing, 1, 100);
        m.record_policy_deny(&deny, 1);
    }
    assert_eq!(allocations() - before, 0, "hot path allocated");
    assert_eq!(m.series_counts().drops, 1);
    assert_eq!(m.series_counts().drops_overflow, 1);
}
