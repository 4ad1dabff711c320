//! Bounded fuzzing of manifest loading (`inventory::manifest::load_str` / `load_dir`):
//! byte mutations of real manifests, wrong types in every field, deep nesting, huge numbers,
//! alias bombs and non-UTF-8 never panic, and every error names the file, and for an object
//! at fault, the document (and item) it sits in.
//!
//! Seeds: `tests/fixtures/inventory/*.yaml`, `tests/fixtures/netpol/cli/*.yaml`, the policies
//! of `tests/fixtures/netpol/{upstream,recipes}/*.yaml` as NetworkPolicy objects, and
//! `tests/fuzz_corpus/manifest/*`. Failures are kept in
//! `tests/fuzz_corpus/regressions/fuzz_manifest.txt`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code panics with context"
)]

use testkit::mutate;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use observer::inventory::Inventory;
use observer::inventory::manifest::{self, LoadError};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use serde::Deserialize;
use serde_json::Value;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_corpus/regressions/fuzz_manifest.txt",
        ))),
        ..ProptestConfig::default()
    }
}

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    v.sort();
    v
}

/// The policies of a netpol test-case file, as NetworkPolicy manifests (one YAML stream).
fn policies_of_netpol_cases(text: &str) -> String {
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let doc = Value::deserialize(doc).unwrap();
        for stage in doc["stages"].as_array().into_iter().flatten() {
            for p in stage["policies"].as_array().into_iter().flatten() {
                let mut p = p.clone();
                p["apiVersion"] = "networking.k8s.io/v1".into();
                p["kind"] = "NetworkPolicy".into();
                out += "---\n";
                out += &serde_yaml::to_string(&p).unwrap();
            }
        }
    }
    out
}

/// `(file name, text)` of every seed; each loads without error.
fn seeds() -> &'static [(String, String)] {
    static SEEDS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let t = tests_dir();
        let mut out = Vec::new();
        for dir in [
            "fixtures/inventory",
            "fixtures/netpol/cli",
            "fuzz_corpus/manifest",
        ] {
            for p in read_dir_sorted(&t.join(dir)) {
                out.push((
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                ));
            }
        }
        for dir in ["fixtures/netpol/upstream", "fixtures/netpol/recipes"] {
            for p in read_dir_sorted(&t.join(dir)) {
                let text = policies_of_netpol_cases(&std::fs::read_to_string(&p).unwrap());
                // Upstream cases reuse policy names across cases: keep each file's first copy.
                let mut seen = std::collections::HashSet::new();
                let mut dedup = String::new();
                for doc in text.split("---\n").filter(|d| !d.is_empty()) {
                    let v: Value = serde_yaml::from_str(doc).unwrap();
                    if seen.insert((
                        v["metadata"]["namespace"].clone(),
                        v["metadata"]["name"].clone(),
                    )) {
                        dedup += "---\n";
                        dedup += doc;
                    }
                }
                out.push((
                    format!("policies-{}", p.file_name().unwrap().to_string_lossy()),
                    dedup,
                ));
            }
        }
        out
    })
}

#[test]
fn seeds_load() {
    let mut policies = 0;
    for (name, text) in seeds() {
        let inv = manifest::load_str(Path::new(name), text).unwrap_or_else(|e| panic!("{e}"));
        check_inventory(&inv).unwrap();
        policies += inv.policies.len();
    }
    assert!(seeds().len() >= 8, "{}", seeds().len());
    assert!(policies > 30, "{policies} policies in the seeds");
}

/// What holds of any inventory that loaded.
fn check_inventory(inv: &Inventory) -> Result<(), TestCaseError> {
    for p in &inv.pods {
        prop_assert!(
            inv.namespaces.contains_key(&p.namespace),
            "pod {}/{} has no namespace",
            p.namespace,
            p.name
        );
    }
    for p in &inv.policies {
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        prop_assert!(
            inv.namespaces.contains_key(ns),
            "policy namespace {:?} missing",
            ns
        );
    }
    Ok(())
}

/// Every error names the file first; syntax and object errors name the document.
fn check_error(file: &str, e: &LoadError) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(msg.starts_with(&format!("{file}: ")), "{}", msg);
    prop_assert_eq!(e.path(), Path::new(file));
    match e {
        LoadError::Syntax { what, .. } => {
            prop_assert!(what.starts_with("document "), "{}", msg);
            prop_assert!(msg.starts_with(&format!("{file}: document ")), "{}", msg);
        }
        LoadError::Object {
            object, message, ..
        } => {
            prop_assert!(object.document >= 1);
            prop_assert!(
                msg.starts_with(&format!("{file}: document {}", object.document)),
                "{}",
                msg
            );
            prop_assert!(!message.is_empty());
        }
        LoadError::Duplicate {
            object,
            first_object,
            ..
        } => {
            prop_assert!(
                object.name.is_some() && object.name == first_object.name,
                "{}",
                msg
            );
        }
        LoadError::Io { .. } => prop_assert!(false, "I/O error from load_str: {}", msg),
    }
    Ok(())
}

/// YAML and JSON syntax that matters to the loader.
const TOKENS: &[&str] = &[
    "---\n",
    "\n",
    ": ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "&a ",
    "*a",
    "!!binary ",
    "!!int ",
    "? ",
    "|\n",
    "kind: List\n",
    "kind: Pod\n",
    "kind: NetworkPolicy\n",
    "apiVersion: v1\n",
    "items: ",
    "metadata: ",
    "name: ",
    "namespace: ",
    "podIP: ",
    "containerPort: ",
    "port: ",
    "cidr: ",
    "99999999999999999999999",
    "-1",
    "1e400",
    "0x10",
    ".nan",
    "~",
    "null",
    "true",
    "10.0.0.300",
    "::ffff:10.0.0.1",
    "fd00::/129",
    "\u{feff}",
    "\u{0}",
    "é",
    "\t",
    "#",
];

proptest! {
    #![proptest_config(config())]

    /// Byte mutations of the seeds, loaded from text.
    #[test]
    fn mutated_text_never_panics(seed in any::<Index>(), muts in mutate::mutations(8)) {
        let (name, text) = &seeds()[seed.index(seeds().len())];
        let bytes = mutate::apply(text.as_bytes(), &muts, TOKENS);
        let text = String::from_utf8_lossy(&bytes);
        match manifest::load_str(Path::new(name), &text) {
            Ok(inv) => check_inventory(&inv)?,
            Err(e) => check_error(name, &e)?,
        }
    }
}

/// Every node of a document, as a path of keys/indices.
fn node_paths(v: &Value, prefix: &mut Vec<PathElem>, out: &mut Vec<Vec<PathElem>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(PathElem::Key(k.clone()));
                node_paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(PathElem::Idx(i));
                node_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathElem {
    Key(String),
    Idx(usize),
}

fn node_mut<'a>(v: &'a mut Value, path: &[PathElem]) -> &'a mut Value {
    path.iter().fold(v, |v, p| match p {
        PathElem::Key(k) => &mut v[k.as_str()],
        PathElem::Idx(i) => &mut v[*i],
    })
}

/// Values of every JSON type, including ones no Kubernetes field takes.
fn wrong_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "10.0.0.1",
            "fd00::1",
            "10.0.0.0/33",
            "TCP",
            "ICMP",
            "Running",
            "",
            "In",
            "Exists"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The documents of a seed, as the loader sees them.
fn documents(name: &str, text: &str) -> Vec<Value> {
    if name.ends_with(".json") {
        return serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .map(Result::unwrap)
            .collect();
    }
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn render(docs: &[Value], json: bool) -> String {
    if json {
        docs.iter()
            .map(|d| serde_json::to_string(d).unwrap() + "\n")
            .collect()
    } else {
        docs.iter()
            .map(|d| "---\n".to_owned() + &serde_yaml::to_string(d).unwrap())
            .collect()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Wrong types anywhere (any node of any document replaced by any value), as YAML or
    /// JSON: no panic, and an object error is about the document that was changed.
    #[test]
    fn wrong_types_in_any_field(seed in any::<Index>(), doc in any::<Index>(), node in any::<Index>(), value in wrong_value(), json in any::<bool>()) {
        let (name, text) = &seeds()[seed.index(seeds().len())];
        let mut docs = documents(name, text);
        prop_assume!(!docs.is_empty());
        let d = doc.index(docs.len());
        let mut paths = Vec::new();
        node_paths(&docs[d], &mut Vec::new(), &mut paths);
        let path = &paths[node.index(paths.len())];
        *node_mut(&mut docs[d], path) = value;
        let file = if json { format!("{name}.json") } else { format!("{name}.yaml") };
        let text = render(&docs, json);
        match manifest::load_str(Path::new(&file), &text) {
            Ok(inv) => check_inventory(&inv)?,
            Err(e) => {
                check_error(&file, &e)?;
                if let LoadError::Object { object, .. } = &e {
                    prop_assert_eq!(object.document, d + 1, "{} (changed {:?})", e, path);
                }
            }
        }
    }

    /// Numbers beyond every integer type in port, IP and size fields.
    #[test]
    fn huge_numbers(field in prop::sample::select(vec![
        "spec: {containers: [{name: c, ports: [{containerPort: N}]}]}",
        "spec: {containers: [{name: c, ports: [{containerPort: 80, hostPort: N}]}]}",
        "status: {podIP: N}",
        "status: {podIPs: [{ip: N}]}",
        "metadata: {name: N}",
        "metadata: {name: p, labels: {a: N}}",
        "spec: {hostNetwork: N}",
    ]), n in prop::sample::select(vec![
        "99999999999999999999999999999999", "-99999999999999999999999", "1e400", "-1e400",
        "18446744073709551616", "9223372036854775808", "-9223372036854775809", "65536", "-1",
        "0x1_0000_0000", "0o777777777777777777777777", ".inf", "-.nan", "1.5",
    ])) {
        let body = field.replace('N', n);
        let text = format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: n}}\n{body}\n");
        let text = if body.starts_with("metadata") {
            format!("apiVersion: v1\nkind: Pod\n{body}\n")
        } else {
            text
        };
        match manifest::load_str(Path::new("huge.yaml"), &text) {
            Ok(inv) => {
                check_inventory(&inv)?;
                for p in &inv.pods {
                    for port in &p.ports {
                        prop_assert!(port.port > 0, "{:?}", port);
                    }
                }
            }
            Err(e) => check_error("huge.yaml", &e)?,
        }
    }

    /// Deep nesting, in a field and as a whole document, in YAML and JSON: a clear error
    /// (the parsers' recursion limit) or a load, never a stack overflow.
    ///
    /// Depth stays below 2,000: serde_yaml (libyaml) scans a whole document before its
    /// recursion limit applies, in time quadratic in the flow nesting depth (10,000 levels
    /// took 1.8 s in a debug build here), so deeper cases would only make the test slow.
    #[test]
    fn deep_nesting(depth in prop_oneof![3 => 1usize..300, 1 => 300usize..2_000], map in any::<bool>(), json in any::<bool>(), whole in any::<bool>()) {
        let (open, close) = match (map, json) {
            (true, true) => ("{\"a\":", "}"),
            (true, false) => ("{a: ", "}"),
            (false, _) => ("[", "]"),
        };
        let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let file = if json { "deep.json" } else { "deep.yaml" };
        let text = match (whole, json) {
            (true, _) => nested,
            (false, true) => format!("{{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {{\"name\": \"p\"}}, \"spec\": {{\"x\": {nested}}}}}"),
            (false, false) => format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{x: {nested}}}\n"),
        };
        match manifest::load_str(Path::new(file), &text) {
            Ok(inv) => check_inventory(&inv)?,
            Err(e) => {
                check_error(file, &e)?;
                if depth > 200 {
                    prop_assert!(e.to_string().contains("recursion limit"), "{}", e);
                }
            }
        }
    }
}

/// A YAML alias bomb ("billion laughs") is refused quickly instead of expanding.
#[test]
fn alias_bomb_is_refused() {
    let mut text = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n",
    );
    for i in 1..12 {
        let prev = format!("*l{}", i - 1);
        text += &format!("  l{i}: &l{i} [{}]\n", [prev.as_str(); 10].join(", "));
    }
    let start = std::time::Instant::now();
    let e = manifest::load_str(Path::new("bomb.yaml"), &text).unwrap_err();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().starts_with("bomb.yaml: document 1: "), "{e}");
    assert!(e.to_string().contains("repetition limit"), "{e}");
}

proptest! {
    #![proptest_config(config())]

    /// Files that are not UTF-8 (a seed with bytes cut or flipped into invalid sequences),
    /// read from a directory: an I/O error naming the file, never a panic or a lossy load.
    #[test]
    fn non_utf8_files_name_the_file(seed in any::<Index>(), at in any::<Index>(), bad in prop::sample::select(vec![vec![0xffu8], vec![0xc3], vec![0xe2, 0x82], vec![0xed, 0xa0, 0x80], vec![0xfe, 0xff]])) {
        let (name, text) = &seeds()[seed.index(seeds().len())];
        let mut bytes = text.as_bytes().to_vec();
        let pos = at.index(bytes.len() + 1);
        bytes.splice(pos..pos, bad);
        prop_assume!(std::str::from_utf8(&bytes).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(if name.ends_with(".json") { "x.json" } else { "x.yaml" });
        std::fs::write(&file, &bytes).unwrap();
        let e = manifest::load_dir(dir.path()).unwrap_err();
        prop_assert!(matches!(e, LoadError::Io { .. }), "{}", e);
        prop_assert_eq!(e.path(), file.as_path());
        let msg = e.to_string();
        prop_assert!(msg.starts_with(&file.display().to_string()) && msg.contains("UTF-8"), "{}", msg);
    }
}
