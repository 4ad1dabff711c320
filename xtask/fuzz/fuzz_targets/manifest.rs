//! The manifest loader (`inventory::manifest::load_str`), validation included, on arbitrary
//! text: it never panics, an error names the file, and what loads is consistent (every
//! invalid object says why and where; every pod's and policy's namespace exists).
//!
//! Text that starts with `{` is read as a JSON stream (`.json`), anything else as YAML, as the
//! file name would decide; the seeds are plain manifest files.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use observer::inventory::manifest::load_str;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let json = text.trim_start().starts_with('{');
    let path = Path::new(if json { "fuzz.json" } else { "fuzz.yaml" });
    match load_str(path, &text) {
        Err(e) => assert_eq!(e.path(), path, "{e}"),
        Ok(inv) => {
            for o in &inv.invalid {
                assert!(!o.errors.is_empty(), "{o:?}");
                assert!(
                    o.source.as_deref().is_some_and(|s| s.starts_with("fuzz.")),
                    "{o:?}"
                );
            }
            for ns in inv.pods.iter().map(|p| p.namespace.as_str()).chain(
                inv.policies
                    .iter()
                    .filter_map(|p| p.metadata.namespace.as_deref()),
            ) {
                assert!(
                    inv.namespaces.contains_key(ns),
                    "{ns} is not in the inventory"
                );
            }
            let counted: usize = inv.invalid_counts().values().sum();
            assert_eq!(counted, inv.invalid.len());
        }
    }
});
