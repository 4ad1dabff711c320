//! Work done and time taken per benchmark, summed over criterion's samples, so that a bench
//! can print its figures against a baseline timed in the same run.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Items and time per benchmark name.
static TIMES: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Adds `items` done in `took` to `name`.
pub fn record(name: &'static str, items: u64, took: Duration) {
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    let entry = times.entry(name).or_default();
    entry.0 += items;
    entry.1 += took;
}

/// Items per second of `name`; `None` if it did not run (a criterion filter, `--test` mode).
pub fn rate(name: &str) -> Option<f64> {
    let times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    times
        .get(name)
        .filter(|(n, t)| *n > 0 && !t.is_zero())
        .map(|(n, t)| *n as f64 / t.as_secs_f64())
}
