//! The `explain --flows` reader (`verdict::cli::explain_batch`) on arbitrary bytes, against a
//! small fixed inventory: it never panics, every output line is one JSON object that names its
//! input line (an answer or `{"line":N,"error":...}`), in increasing order, and never more
//! lines out than in.

#![no_main]

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use observer::inventory::manifest::load_str;
use observer::verdict::Engine;
use observer::verdict::cli::explain_batch;

const CLUSTER: &str = include_str!("../../../observer/tests/fixtures/netpol/cli/cluster.yaml");

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let inv = load_str(Path::new("cluster.yaml"), CLUSTER).expect("the fixture loads");
        Engine::new(Arc::new(inv))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    // An Err is a read or write failure of the streams, not a property of the input lines.
    if explain_batch(engine(), &mut Cursor::new(data), &mut out).is_err() {
        return;
    }
    let inputs = data.split(|&b| b == b'\n').count();
    let text = std::str::from_utf8(&out).expect("the output is UTF-8");
    let mut last = 0u64;
    let mut n = 0usize;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("each output line is JSON");
        let num = v["line"]
            .as_u64()
            .expect("each answer names its input line");
        assert!(num > last, "line numbers increase: {num} after {last}");
        last = num;
        n += 1;
    }
    assert!(n <= inputs, "{n} answers for {inputs} input lines");
});
