//! Series scale (issue 6): the cost of `Metrics::record_drop`, and what a port scan of 50,000
//! distinct flows does to the series count and the size of `/metrics`.
//!
//! Run: `cargo bench -p observer --bench series`. The scan summary is printed before the timings.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use observer::export::{DropLabels, Metrics, MetricsConfig};
use observer::flow::{Direction, Protocol};

const FLOWS: usize = 50_000;

fn labels<'a>(src: &'a str, dst: &'a str) -> DropLabels<'a> {
    DropLabels {
        reason: "netfilter_drop",
        direction: Direction::Ingress,
        source_namespace: "scan",
        source_workload: src,
        destination_namespace: "prod",
        destination_workload: dst,
        protocol: Protocol::Tcp,
    }
}

fn new_metrics() -> Metrics {
    match Metrics::new(MetricsConfig::default()) {
        Ok(m) => m,
        Err(e) => panic!("metrics: {e}"),
    }
}

fn scan(m: &Metrics, names: &[String]) {
    for n in names {
        m.record_drop(&labels(n, "db"), 1, 60);
    }
}

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..FLOWS).map(|i| format!("scanner-{i}")).collect();

    // The scale claim itself, measured once and printed: series stay at the limit.
    let m = new_metrics();
    scan(&m, &names);
    let counts = m.series_counts();
    let text = match m.encode_text() {
        Ok(t) => t,
        Err(e) => panic!("encode: {e}"),
    };
    let limit = m.config().series_limit;
    println!(
        "series scan: {FLOWS} distinct flows, limit {limit} -> {} drop series + {} overflow, \
         /metrics {} bytes ({} lines)",
        counts.drops,
        counts.drops_overflow,
        text.len(),
        text.lines().count()
    );
    assert_eq!(counts.drops, limit.min(FLOWS), "series limit not held");
    assert!(counts.drops_overflow <= 1, "one overflow series per reason");

    let mut g = c.benchmark_group("record_drop");
    g.bench_function("existing_series", |b| {
        let m = new_metrics();
        m.record_drop(&labels("web", "db"), 1, 60);
        b.iter(|| m.record_drop(black_box(&labels("web", "db")), 1, 60));
    });
    g.bench_function("overflow_series", |b| {
        // Already full: every new flow goes to the overflow series.
        b.iter(|| m.record_drop(black_box(&labels("scanner-new", "db")), 1, 60));
    });
    g.sample_size(10);
    g.bench_function("scan_50000_distinct_flows", |b| {
        b.iter_batched(new_metrics, |m| scan(&m, &names), BatchSize::PerIteration);
    });
    g.finish();

    c.bench_function("encode_metrics_at_limit", |b| {
        b.iter(|| black_box(m.encode_text().map(|t| t.len()).unwrap_or(0)));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
