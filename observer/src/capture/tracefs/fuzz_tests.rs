//! Bounded fuzzing of the tracepoint format-file parser (`capture::tracefs`): mutated real
//! format files never panic and fail with clear errors; generated well-formed variants parse
//! to exactly the offsets they were written with.
//!
//! Seeds: `tests/fuzz_corpus/format/` (6.18 files copied from tracefs, older kfree_skb shapes).
//! Failures are kept in `tests/fuzz_corpus/regressions/fuzz_tracefs.txt` and replayed first.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code panics with context"
)]

use testkit::mutate;

use std::path::{Path, PathBuf};

use crate::capture::tracefs::{self, KfreeSkbFields, TracefsError};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/format")
}

/// Every seed format file, by file name.
fn seeds() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "format"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 4, "corpus incomplete: {out:?}");
    out
}

/// Tokens that matter to the parser.
const TOKENS: &[&str] = &[
    "field:",
    "offset:",
    "size:",
    "signed:",
    ";",
    ":",
    "\t",
    "\n",
    " ",
    "[",
    "]",
    "[16]",
    "__data_loc char[] ",
    "{",
    "}",
    "{ 7, \"X\" }",
    ",",
    "\"",
    "(",
    ")",
    "0x",
    "0xffffffff",
    "4294967296",
    "-1",
    "99999999999999999999",
    "print fmt:",
    "__print_symbolic(REC->reason",
    "REC->reason",
    "skbaddr",
    "location",
    "protocol",
    "reason",
    "é",
    "\u{0}",
    "\r\n",
];

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_corpus/regressions/fuzz_tracefs.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// The kfree_skb offsets each kfree_skb seed must parse to: 6.18 from this machine's
/// tracefs (and /work/shared/platform-facts.md), the older shapes as documented in the corpus
/// README.
fn expected_kfree_skb(name: &str) -> Option<KfreeSkbFields> {
    let f = |protocol, reason| KfreeSkbFields {
        skbaddr: 8,
        location: 16,
        protocol,
        reason,
    };
    match name {
        "kfree_skb-6.18.format" => Some(f(32, Some(36))),
        "kfree_skb-5.17.format" => Some(f(24, Some(28))),
        "kfree_skb-5.10.format" => Some(f(24, None)),
        _ => None,
    }
}

#[test]
fn seeds_parse_to_known_offsets() {
    let mut kfree = 0;
    for (name, text) in seeds() {
        let fmt = tracefs::parse_format(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(fmt.fields.len() >= 5, "{name}: {:?}", fmt.fields);
        let Some(want) = expected_kfree_skb(&name) else {
            continue;
        };
        kfree += 1;
        let got = KfreeSkbFields::from_format(&fmt).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want, "{name}");
        let reasons = tracefs::parse_reason_symbols(&fmt.print_fmt);
        match (want.reason, reasons) {
            (None, None) => {}
            (Some(_), Some(t)) => {
                let no_socket = if name.contains("5.17") { 1 } else { 3 };
                assert_eq!(t.number("no_socket"), Some(no_socket), "{name}");
                assert!(t.number("not_specified").is_some(), "{name}");
            }
            (w, t) => panic!("{name}: reason field {w:?} but symbols {t:?}"),
        }
    }
    assert_eq!(kfree, 3);
}

/// The 6.18 file names every reason up to MAX; 12 is NETFILTER_DROP there.
#[test]
fn seed_6_18_reason_table() {
    let text = std::fs::read_to_string(corpus_dir().join("kfree_skb-6.18.format")).unwrap();
    let fmt = tracefs::parse_format(&text).unwrap();
    let t = tracefs::parse_reason_symbols(&fmt.print_fmt).unwrap();
    assert_eq!(t.number("netfilter_drop"), Some(12));
    assert_eq!(t.number("tc_ingress"), Some(73));
    assert_eq!(t.number("max"), Some(128));
    assert_eq!(t.len(), 127, "2..=128");
}

/// The field name of a `field:` line, found differently from the parser: the last
/// whitespace-separated word of the declaration, without an array suffix.
fn oracle_name(line: &str) -> Option<String> {
    let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
    let last = decl.split_whitespace().last()?;
    Some(last.split('[').next()?.to_owned())
}

/// Every format file of the running kernel parses, and each field gets the name the line
/// declares (covers `__data_loc char[] name`, arrays, pointers, multi-word types).
#[test]
fn every_format_file_of_this_kernel_parses() {
    if !testkit::privileged("every_format_file_of_this_kernel_parses") {
        return;
    }
    let events = Path::new(tracefs::TRACEFS_ROOT).join("events");
    if !events.is_dir() {
        tracefs::ensure_mounted().expect("mounting tracefs");
    }
    let mut files = 0;
    for group in std::fs::read_dir(&events).unwrap() {
        let group = group.unwrap().path();
        let Ok(evs) = std::fs::read_dir(&group) else {
            continue;
        };
        for ev in evs {
            let path = ev.unwrap().path().join("format");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            files += 1;
            let fmt =
                tracefs::parse_format(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let lines: Vec<_> = text
                .lines()
                .filter(|l| l.trim().starts_with("field:"))
                .collect();
            assert_eq!(fmt.fields.len(), lines.len(), "{}", path.display());
            for (f, line) in fmt.fields.iter().zip(lines) {
                assert_eq!(
                    Some(&f.name),
                    oracle_name(line).as_ref(),
                    "{}: {line}",
                    path.display()
                );
            }
        }
    }
    assert!(
        files > 100,
        "only {files} format files under {}",
        events.display()
    );
}

proptest! {
    #![proptest_config(config())]

    /// Mutated seeds never panic. A parse error names the line and quotes it; a layout error
    /// names the field; a successful layout matches the parsed fields.
    #[test]
    fn mutated_formats_never_panic(seed in any::<prop::sample::Index>(), muts in mutate::mutations(8)) {
        let seeds = seeds();
        let (_, text) = &seeds[seed.index(seeds.len())];
        let bytes = mutate::apply(text.as_bytes(), &muts, TOKENS);
        let text = String::from_utf8_lossy(&bytes);
        match tracefs::parse_format(&text) {
            Err(e) => {
                let TracefsError::BadField { line, text: bad } = &e else {
                    panic!("unexpected error kind: {e:?}");
                };
                let msg = e.to_string();
                prop_assert!(msg.contains(&format!("line {line}")), "{msg}");
                prop_assert_eq!(text.lines().nth(line - 1).map(str::trim), Some(bad.as_str()));
            }
            Ok(fmt) => {
                for f in &fmt.fields {
                    prop_assert!(!f.name.is_empty());
                    prop_assert!(f.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{:?}", f.name);
                }
                match KfreeSkbFields::from_format(&fmt) {
                    Ok(k) => {
                        prop_assert_eq!(Some(k.skbaddr), fmt.field("skbaddr").map(|f| f.offset));
                        prop_assert_eq!(Some(k.location), fmt.field("location").map(|f| f.offset));
                        prop_assert_eq!(Some(k.protocol), fmt.field("protocol").map(|f| f.offset));
                        prop_assert_eq!(k.reason, fmt.field("reason").map(|f| f.offset));
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(
                            ["\"skbaddr\"", "\"location\"", "\"protocol\"", "\"reason\""].iter().any(|f| msg.contains(f)),
                            "{}", msg
                        );
                    }
                }
                if let Some(t) = tracefs::parse_reason_symbols(&fmt.print_fmt) {
                    prop_assert!(!t.is_empty());
                    for (_, label) in t.iter() {
                        // Labels may repeat in a mutated list; `number` finds one of them.
                        prop_assert_eq!(label.trim(), label.as_ref());
                        prop_assert_eq!(tracefs::reason_label(label), label.as_ref());
                        let n = t.number(label);
                        prop_assert!(n.is_some(), "{}", label);
                        prop_assert_eq!(&t.label(n.unwrap_or_default()), label);
                    }
                }
            }
        }
    }

    /// Arbitrary text (not only mutations of real files) never panics either.
    #[test]
    fn arbitrary_text_never_panics(text in "(field:|offset:|size:|print fmt:|__print_symbolic\\(REC->reason|[{};:,\\[\\]\" \\t\\n0-9a-z_é])*") {
        if let Ok(fmt) = tracefs::parse_format(&text) {
            let _ = KfreeSkbFields::from_format(&fmt);
            let _ = tracefs::parse_reason_symbols(&fmt.print_fmt);
        }
        let _ = tracefs::parse_reason_symbols(&text);
    }
}

/// One field of a generated format file.
#[derive(Clone, Debug)]
struct GenField {
    c_type: &'static str,
    array: Option<u8>,
    name: String,
    offset: u32,
    size: u32,
}

fn gen_field() -> impl Strategy<Value = GenField> {
    (
        prop::sample::select(vec![
            "void *",
            "unsigned short",
            "int",
            "enum skb_drop_reason",
            "__data_loc char[]",
            "const char *",
            "u8",
            "struct foo *",
        ]),
        prop::option::of(1u8..64),
        "[a-z_][a-z0-9_]{0,20}",
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(c_type, array, name, offset, size)| GenField {
            c_type,
            // The kernel writes `__data_loc char[] name`, never an array suffix on it.
            array: array.filter(|_| !c_type.contains('[')),
            name,
            offset,
            size,
        })
}

/// Renders fields the way the kernel does (tab-separated), with optional extra blanks.
fn render(fields: &[GenField], print_fmt: &str, pad: &str) -> String {
    let mut s = String::from("name: gen\nID: 1\nformat:\n");
    for f in fields {
        let arr = f.array.map(|n| format!("[{n}]")).unwrap_or_default();
        s += &format!(
            "\tfield:{}{pad} {}{arr};{pad}\toffset:{};\tsize:{};{pad}\tsigned:0;\n",
            f.c_type, f.name, f.offset, f.size
        );
    }
    s += &format!("\nprint fmt: {print_fmt}\n");
    s
}

proptest! {
    #![proptest_config(config())]

    /// Well-formed variants (any order, offsets, extra fields, blanks) parse to exactly the
    /// fields written, and the kfree_skb layout takes its offsets from them.
    #[test]
    fn generated_formats_parse_exactly(
        extra in prop::collection::vec(gen_field(), 0..6),
        core in (any::<u16>(), any::<u16>(), any::<u16>(), prop::option::of(any::<u16>())),
        order in any::<prop::sample::Index>(),
        pad in prop::sample::select(vec!["", " ", "  "]),
    ) {
        let (skb, loc, proto, reason) = core;
        let mut fields: Vec<GenField> = extra
            .into_iter()
            .filter(|f| !["skbaddr", "location", "protocol", "reason"].contains(&f.name.as_str()))
            .collect();
        let mut need = vec![
            GenField { c_type: "void *", array: None, name: "skbaddr".into(), offset: skb.into(), size: 8 },
            GenField { c_type: "void *", array: None, name: "location".into(), offset: loc.into(), size: 8 },
            GenField { c_type: "unsigned short", array: None, name: "protocol".into(), offset: proto.into(), size: 2 },
        ];
        if let Some(r) = reason {
            need.push(GenField { c_type: "enum skb_drop_reason", array: None, name: "reason".into(), offset: r.into(), size: 4 });
        }
        for f in need {
            let at = order.index(fields.len() + 1);
            fields.insert(at, f);
        }
        // First occurrence wins in the parser, so keep names unique.
        let mut seen = std::collections::HashSet::new();
        fields.retain(|f| seen.insert(f.name.clone()));

        let text = render(&fields, "\"x\", REC->skbaddr", pad);
        let fmt = tracefs::parse_format(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let got: Vec<_> = fmt.fields.iter().map(|f| (f.name.as_str(), f.offset, f.size)).collect();
        let want: Vec<_> = fields.iter().map(|f| (f.name.as_str(), f.offset, f.size)).collect();
        prop_assert_eq!(got, want, "{}", text);
        let k = KfreeSkbFields::from_format(&fmt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(k, KfreeSkbFields {
            skbaddr: skb.into(),
            location: loc.into(),
            protocol: proto.into(),
            reason: reason.map(u32::from),
        });
    }

    /// A wrong size of a needed field is an error naming that field.
    #[test]
    fn wrong_sizes_name_the_field(which in 0usize..4, size in any::<u32>()) {
        let (name, good) = [("skbaddr", 8), ("location", 8), ("protocol", 2), ("reason", 4)][which];
        prop_assume!(size != good);
        let text = std::fs::read_to_string(corpus_dir().join("kfree_skb-6.18.format")).unwrap();
        let line = text.lines().find(|l| l.contains(&format!(" {name};"))).unwrap();
        let bad = line.replace(&format!("size:{good};"), &format!("size:{size};"));
        let fmt = tracefs::parse_format(&text.replace(line, &bad)).unwrap();
        let msg = KfreeSkbFields::from_format(&fmt).unwrap_err().to_string();
        prop_assert!(msg.contains(&format!("{name:?}")) && msg.contains(&size.to_string()), "{}", msg);
    }

    /// `__print_symbolic` lists with any numbers (decimal or hex) and names round-trip.
    #[test]
    fn reason_symbols_round_trip(
        pairs in prop::collection::btree_map(any::<u32>(), "[A-Z][A-Z0-9_]{0,24}", 1..40),
        hex in any::<bool>(),
    ) {
        // Labels must be unique for `number` to be a function.
        let mut labels = std::collections::HashSet::new();
        prop_assume!(pairs.values().all(|n| labels.insert(tracefs::reason_label(n))));
        let list: Vec<String> = pairs
            .iter()
            .map(|(n, name)| if hex { format!("{{ {n:#x}, \"{name}\" }}") } else { format!("{{ {n}, \"{name}\" }}") })
            .collect();
        let fmt = format!("\"reason: %s\", REC->location, __print_symbolic(REC->reason, {})", list.join(", "));
        let t = tracefs::parse_reason_symbols(&fmt).ok_or_else(|| TestCaseError::fail(fmt.clone()))?;
        prop_assert_eq!(t.len(), pairs.len());
        for (n, name) in &pairs {
            prop_assert_eq!(t.number(name), Some(*n));
            let label = tracefs::reason_label(name);
            prop_assert_eq!(&*t.label(*n), label.as_str());
        }
    }
}
