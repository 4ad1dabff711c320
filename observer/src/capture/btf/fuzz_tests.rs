//! Bounded fuzzing of the BTF offset walk (`capture::btf::KernelBtf`).
//!
//! A small BTF blob is built here (`Builder`, following the kernel's
//! Documentation/bpf/btf.rst), shaped like the parts of vmlinux the program needs, and kept as
//! `tests/fuzz_corpus/btf/mini.btf` (bpftool must accept it). Mutated and truncated copies,
//! random type graphs (cycles, bitfields, huge offsets) and arbitrary member paths on the real
//! vmlinux must never panic, and unknown paths give errors naming the member.
//! Failures are kept in `tests/fuzz_corpus/regressions/fuzz_btf.txt`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code panics with context"
)]

use testkit::mutate;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::capture::btf::{BtfError, KernelBtf, VMLINUX_BTF};
use crate::capture::tracefs::KfreeSkbFields;
use observer_ebpf::{BTF_ARGS_MAX, BtfArgs, NO_ARG};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn corpus_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus/btf/mini.btf")
}

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_corpus/regressions/fuzz_btf.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// A BTF type; type ids are 1-based positions in the builder's list (0 is void).
#[derive(Clone, Debug)]
enum Ty {
    Int {
        name: String,
        size: u32,
    },
    Ptr(u32),
    Struct {
        name: String,
        size: u32,
        union: bool,
        members: Vec<Member>,
    },
    Typedef {
        name: String,
        ty: u32,
    },
    Const(u32),
    Enum {
        name: String,
        values: Vec<(String, i32)>,
    },
    Fwd {
        name: String,
    },
    /// A function prototype returning `ret` with unnamed parameters of these types.
    FuncProto {
        ret: u32,
        params: Vec<u32>,
    },
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    ty: u32,
    bit_offset: u32,
    /// Bitfield width; any `Some` sets the struct's kind_flag.
    bitfield: Option<u8>,
}

fn member(name: &str, ty: u32, byte_offset: u32) -> Member {
    Member {
        name: name.to_owned(),
        ty,
        bit_offset: byte_offset * 8,
        bitfield: None,
    }
}

/// Encodes types as a raw BTF blob (header, type section, string section).
fn encode(types: &[Ty]) -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut str_off = |s: &str| -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let mut t = Vec::new();
    let put = |v: u32, t: &mut Vec<u8>| t.extend_from_slice(&v.to_le_bytes());
    let info = |kind: u32, vlen: usize, kind_flag: bool| -> u32 {
        (u32::from(kind_flag) << 31) | (kind << 24) | (vlen as u32 & 0xffff)
    };
    for ty in types {
        match ty {
            Ty::Int { name, size } => {
                put(str_off(name), &mut t);
                put(info(1, 0, false), &mut t);
                put(*size, &mut t);
                put(size.saturating_mul(8).min(128), &mut t);
            }
            Ty::Ptr(to) => {
                put(0, &mut t);
                put(info(2, 0, false), &mut t);
                put(*to, &mut t);
            }
            Ty::Struct {
                name,
                size,
                union,
                members,
            } => {
                let kind_flag = members.iter().any(|m| m.bitfield.is_some());
                put(str_off(name), &mut t);
                put(
                    info(if *union { 5 } else { 4 }, members.len(), kind_flag),
                    &mut t,
                );
                put(*size, &mut t);
                for m in members {
                    put(str_off(&m.name), &mut t);
                    put(m.ty, &mut t);
                    let off = match (kind_flag, m.bitfield) {
                        (true, b) => (u32::from(b.unwrap_or(0)) << 24) | (m.bit_offset & 0xff_ffff),
                        (false, _) => m.bit_offset,
                    };
                    put(off, &mut t);
                }
            }
            Ty::Typedef { name, ty } => {
                put(str_off(name), &mut t);
                put(info(8, 0, false), &mut t);
                put(*ty, &mut t);
            }
            Ty::Const(ty) => {
                put(0, &mut t);
                put(info(10, 0, false), &mut t);
                put(*ty, &mut t);
            }
            Ty::Enum { name, values } => {
                put(str_off(name), &mut t);
                put(info(6, values.len(), false), &mut t);
                put(4, &mut t);
                for (n, v) in values {
                    put(str_off(n), &mut t);
                    put(*v as u32, &mut t);
                }
            }
            Ty::Fwd { name } => {
                put(str_off(name), &mut t);
                put(info(7, 0, false), &mut t);
                put(0, &mut t);
            }
            Ty::FuncProto { ret, params } => {
                put(0, &mut t);
                put(info(13, params.len(), false), &mut t);
                put(*ret, &mut t);
                for p in params {
                    put(0, &mut t);
                    put(*p, &mut t);
                }
            }
        }
    }
    let mut b = Vec::new();
    b.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    b.push(1); // version
    b.push(0); // flags
    for v in [
        24u32,
        0,
        t.len() as u32,
        t.len() as u32,
        strings.len() as u32,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend(t);
    b.extend(strings);
    b
}

/// The vmlinux shapes the kernel program needs, with offsets chosen here (so the expected
/// layout below is known independently of the walker): anonymous unions and structs around
/// `dev` and the headers as in `struct sk_buff`, a typedef'd `possible_net_t`, `net.ns.inum`.
fn mini_types() -> Vec<Ty> {
    let s = |name: &str, size, union, members| Ty::Struct {
        name: name.to_owned(),
        size,
        union,
        members,
    };
    vec![
        /* 1 */
        Ty::Int {
            name: "unsigned int".into(),
            size: 4,
        },
        /* 2 */
        Ty::Int {
            name: "short unsigned int".into(),
            size: 2,
        },
        /* 3 */
        Ty::Int {
            name: "unsigned char".into(),
            size: 1,
        },
        /* 4 */ Ty::Ptr(3),
        /* 5 */ Ty::Typedef {
            name: "__u16".into(),
            ty: 2,
        },
        /* 6 */ Ty::Ptr(14),
        /* 7 anonymous { next; prev; } */
        s(
            "",
            16,
            false,
            vec![member("next", 4, 0), member("prev", 4, 8)],
        ),
        /* 8 anonymous union { { next; prev; }; dev_scratch; } in which dev sits */
        s("", 24, true, vec![member("", 7, 0), member("rbnode", 7, 0)]),
        /* 9 anonymous headers struct */
        s(
            "",
            6,
            false,
            vec![
                member("transport_header", 5, 0),
                member("network_header", 5, 2),
                member("mac_header", 5, 4),
            ],
        ),
        /* 10 anonymous union { headers; } */
        s("", 6, true, vec![member("", 9, 0), member("headers", 9, 0)]),
        /* 11 */
        s(
            "sk_buff",
            232,
            false,
            vec![
                member("", 8, 0),
                member("dev", 6, 24),
                Member {
                    name: "pkt_type".into(),
                    ty: 3,
                    bit_offset: 32 * 8 + 3,
                    bitfield: Some(3),
                },
                member("len", 1, 112),
                member("data_len", 1, 116),
                member("", 10, 180),
                member("tail", 1, 196),
                member("head", 4, 200),
                member("truesize", 1, 228),
            ],
        ),
        /* 12 struct { struct net *net; } */
        s("", 8, false, vec![member("net", 18, 0)]),
        /* 13 */
        Ty::Typedef {
            name: "possible_net_t".into(),
            ty: 12,
        },
        /* 14 */
        s(
            "net_device",
            2048,
            false,
            vec![member("ifindex", 1, 224), member("nd_net", 15, 1096)],
        ),
        /* 15 */ Ty::Const(13),
        /* 16 */
        s(
            "ns_common",
            24,
            false,
            vec![member("count", 1, 0), member("inum", 1, 16)],
        ),
        /* 17 */
        s(
            "net",
            256,
            false,
            vec![member("passive", 1, 0), member("ns", 16, 120)],
        ),
        /* 18 */ Ty::Ptr(17),
        /* 19 */
        Ty::Enum {
            name: "skb_drop_reason".into(),
            values: vec![
                ("SKB_NOT_DROPPED_YET".into(), 0),
                ("SKB_DROP_REASON_NOT_SPECIFIED".into(), 2),
                ("SKB_DROP_REASON_NETFILTER_DROP".into(), 12),
            ],
        },
        /* 20 a forward declaration with the name of a real struct: must be skipped */
        Ty::Fwd { name: "net".into() },
    ]
}

const TP: KfreeSkbFields = KfreeSkbFields {
    skbaddr: 8,
    location: 16,
    protocol: 32,
    reason: Some(36),
};

fn mini() -> KernelBtf {
    KernelBtf::from_bytes(&encode(&mini_types())).unwrap()
}

/// The corpus blob is the builder's output (regenerate with `FUZZ_CORPUS_WRITE=1`), and
/// bpftool, an independent BTF parser, reads it as the types written.
#[test]
fn corpus_blob_is_real_btf() {
    let blob = encode(&mini_types());
    let path = corpus_path();
    if std::env::var_os("FUZZ_CORPUS_WRITE").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &blob).unwrap();
    }
    assert_eq!(std::fs::read(&path).unwrap(), blob, "{}", path.display());
    let out = std::process::Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .output()
        .expect("running bpftool (installed on this machine; see platform-facts.md)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "STRUCT 'sk_buff' size=232 vlen=9",
        "'tail' type_id=1 bits_offset=1568",
        "'network_header' type_id=5 bits_offset=16",
        "TYPEDEF 'possible_net_t' type_id=12",
        "'SKB_DROP_REASON_NETFILTER_DROP' val=12",
        "FWD 'net'",
    ] {
        assert!(
            text.contains(want),
            "bpftool output lacks {want:?}:\n{text}"
        );
    }
}

/// The walk finds members through anonymous unions/structs, typedefs and const, skipping the
/// forward declaration, at the offsets `mini_types` wrote.
#[test]
fn mini_btf_layout() {
    let btf = mini();
    let l = btf.kernel_layout(&TP).unwrap();
    assert_eq!(
        (
            l.skb_head,
            l.skb_network_header,
            l.skb_transport_header,
            l.skb_len,
            l.skb_dev
        ),
        (200, 182, 180, 112, 24)
    );
    assert_eq!(
        (l.dev_ifindex, l.dev_nd_net, l.net_ns_inum),
        (224, 1096, 136)
    );
    assert_eq!((l.skb_tail, l.skb_data_len), (196, 116));
    assert_eq!((l.tp_protocol, l.tp_reason), (32, 36));
    assert_eq!(btf.member_offset("sk_buff.next").unwrap(), 0);
    assert_eq!(btf.member_offset("sk_buff.prev").unwrap(), 8);
    assert_eq!(
        btf.member_offset("sk_buff.headers.mac_header").unwrap(),
        184
    );
    let err = btf.member_offset("sk_buff.pkt_type").unwrap_err();
    assert!(matches!(err, BtfError::NotByteAligned { .. }), "{err}");
    let values = btf.enum_values("skb_drop_reason").unwrap();
    assert_eq!(values[2], ("SKB_DROP_REASON_NETFILTER_DROP".to_owned(), 12));
}

/// Empty path elements are errors, not matches of anonymous types or members; a path must
/// name a member.
#[test]
fn empty_path_elements_are_rejected() {
    let btf = mini();
    for path in ["", ".next", "sk_buff..next", "sk_buff.", ".", "sk_buff"] {
        let err = btf.member_offset(path).unwrap_err();
        assert!(matches!(err, BtfError::BadPath(_)), "{path:?}: {err}");
        assert!(err.to_string().contains(&format!("{path:?}")), "{err}");
    }
}

/// A corrupt blob whose anonymous member contains its own struct must not recurse forever.
#[test]
fn self_containing_anonymous_member_is_an_error() {
    let types = vec![
        Ty::Int {
            name: "int".into(),
            size: 4,
        },
        Ty::Struct {
            name: "loop".into(),
            size: 8,
            union: false,
            members: vec![member("", 2, 0), member("x", 1, 4)],
        },
    ];
    let btf = KernelBtf::from_bytes(&encode(&types)).unwrap();
    // `x` is found before the cycle is entered only if the walker looks at named members
    // first; either way it must end.
    let _ = btf.member_offset("loop.x");
    let err = btf.member_offset("loop.nope").unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

/// Type ids appended to the mini types by [`with_kfree_skb_proto`].
const VOID_PTR: u32 = 21;
const SKB_PTR: u32 = 22;
const CONST_SKB_PTR: u32 = 24;
const REASON: u32 = 19;
const INT: u32 = 1;

/// The mini types plus `typedef void (*btf_trace_kfree_skb)(void *__data, <params>)`, as the
/// kernel declares tracepoints in BTF (parameters without names).
fn with_kfree_skb_proto(params: &[u32]) -> KernelBtf {
    let mut types = mini_types();
    types.extend([
        /* 21 */ Ty::Ptr(0),
        /* 22 */ Ty::Ptr(11),
        /* 23 */ Ty::Const(11),
        /* 24 */ Ty::Ptr(23),
    ]);
    let proto = types.len() as u32 + 1;
    let mut all = vec![VOID_PTR];
    all.extend_from_slice(params);
    types.extend([
        Ty::FuncProto {
            ret: 0,
            params: all,
        },
        Ty::Ptr(proto),
        Ty::Typedef {
            name: "btf_trace_kfree_skb".into(),
            ty: proto + 1,
        },
    ]);
    KernelBtf::from_bytes(&encode(&types)).unwrap()
}

/// The 6.18 prototype `(void *, struct sk_buff *, void *, enum skb_drop_reason, struct sock *)`:
/// indices count from after `__data`.
#[test]
fn kfree_skb_btf_args_present() {
    let btf = with_kfree_skb_proto(&[SKB_PTR, VOID_PTR, REASON, VOID_PTR]);
    assert_eq!(
        btf.kfree_skb_btf_args().unwrap(),
        BtfArgs {
            skb: 0,
            location: 1,
            reason: 2,
            nr_args: 4
        }
    );
}

/// Arguments are found by type, wherever they sit; `const struct sk_buff *` counts too, and a
/// `void *` before the skb is not its location.
#[test]
fn kfree_skb_btf_args_found_by_type() {
    let btf = with_kfree_skb_proto(&[REASON, VOID_PTR, INT, CONST_SKB_PTR, VOID_PTR]);
    assert_eq!(
        btf.kfree_skb_btf_args().unwrap(),
        BtfArgs {
            skb: 3,
            location: 4,
            reason: 0,
            nr_args: 5
        }
    );
    let btf = with_kfree_skb_proto(&[SKB_PTR, REASON]);
    let args = btf.kfree_skb_btf_args().unwrap();
    assert_eq!((args.skb, args.reason, args.location), (0, 1, NO_ARG));
}

/// Kernels before drop reasons (5.16 and older: `(skb, location)`): accepted, the program
/// derives the reason from the location; without a location either, refused.
#[test]
fn kfree_skb_btf_args_without_reason() {
    let args = with_kfree_skb_proto(&[SKB_PTR, VOID_PTR])
        .kfree_skb_btf_args()
        .unwrap();
    assert_eq!(
        (args.skb, args.location, args.reason, args.nr_args),
        (0, 1, NO_ARG, 2)
    );
    let err = with_kfree_skb_proto(&[SKB_PTR, INT])
        .kfree_skb_btf_args()
        .unwrap_err();
    assert!(matches!(err, BtfError::TracepointProto { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("btf_trace_kfree_skb")
            && msg.contains("skb_drop_reason")
            && msg.contains("location"),
        "{msg}"
    );
}

#[test]
fn kfree_skb_btf_args_without_skb() {
    let err = with_kfree_skb_proto(&[VOID_PTR, VOID_PTR, REASON])
        .kfree_skb_btf_args()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("btf_trace_kfree_skb") && msg.contains("struct sk_buff *"),
        "{msg}"
    );
}

#[test]
fn kfree_skb_btf_args_without_typedef() {
    let err = mini().kfree_skb_btf_args().unwrap_err();
    assert!(matches!(err, BtfError::TracepointProto { .. }), "{err}");
    assert!(err.to_string().contains("btf_trace_kfree_skb"), "{err}");
}

/// An argument the program has no constant-offset load for is refused, not truncated.
#[test]
fn kfree_skb_btf_args_beyond_the_loadable() {
    let mut params = vec![INT; BTF_ARGS_MAX as usize];
    params.extend([SKB_PTR, REASON]);
    let err = with_kfree_skb_proto(&params)
        .kfree_skb_btf_args()
        .unwrap_err();
    assert!(err.to_string().contains("beyond"), "{err}");
    // The last loadable index is fine.
    let mut params = vec![INT; BTF_ARGS_MAX as usize - 2];
    params.extend([SKB_PTR, REASON]);
    let args = with_kfree_skb_proto(&params).kfree_skb_btf_args().unwrap();
    assert_eq!(
        (args.skb, args.reason),
        (BTF_ARGS_MAX - 2, BTF_ARGS_MAX - 1)
    );
}

/// Member-path elements: names that exist in the mini BTF and vmlinux, and junk.
fn path_element() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "sk_buff", "net_device", "net", "ns_common", "possible_net_t", "sock", "task_struct",
            "head", "network_header", "transport_header", "len", "dev", "ifindex", "nd_net",
            "ns", "inum", "next", "prev", "headers", "pkt_type", "truesize", "count", "data",
            "sk", "__sk_common", "skc_family", "cb", "users", "skb_drop_reason", "",
        ]).prop_map(str::to_owned),
        1 => "[a-z_]{1,12}".boxed(),
        1 => ".{0,6}".boxed(),
    ]
}

fn member_path() -> impl Strategy<Value = String> {
    prop::collection::vec(path_element(), 1..6).prop_map(|v| v.join("."))
}

/// Checks what a walk result may be: offsets of existing members, or an error that names
/// what it could not resolve.
fn check_walk(path: &str, r: Result<u32, BtfError>) -> Result<(), TestCaseError> {
    let Err(e) = r else {
        prop_assert!(!path.split('.').any(str::is_empty), "{:?} resolved", path);
        return Ok(());
    };
    let msg = e.to_string();
    match &e {
        BtfError::NoMember {
            path: p,
            member,
            ty,
        } => {
            prop_assert_eq!(p, path);
            prop_assert!(
                msg.contains(&format!("{member:?}")) && msg.contains(ty.as_str()),
                "{}",
                msg
            );
            prop_assert!(
                path.split('.').any(|m| m == member),
                "{} not in {}",
                member,
                path
            );
        }
        BtfError::NoType(root) => {
            prop_assert_eq!(Some(root.as_str()), path.split('.').next());
            prop_assert!(msg.contains(&format!("{root:?}")), "{}", msg);
        }
        BtfError::BadPath(p) => {
            prop_assert_eq!(p, path);
            prop_assert!(path.split('.').any(str::is_empty) || !path.contains('.'));
        }
        BtfError::NotComposite { path: p, .. } | BtfError::NotByteAligned { path: p } => {
            prop_assert!(
                p == path || path.split('.').any(|m| m == p),
                "{} vs {}",
                p,
                path
            );
        }
        BtfError::Lookup { .. } => {}
        other => prop_assert!(false, "unexpected error for {:?}: {}", path, other),
    }
    Ok(())
}

fn vmlinux() -> Option<&'static KernelBtf> {
    static BTF: OnceLock<Option<KernelBtf>> = OnceLock::new();
    BTF.get_or_init(|| {
        let present = Path::new(VMLINUX_BTF).exists();
        if !testkit::requires(
            "fuzz_btf on the running kernel",
            "its BTF ({VMLINUX_BTF})",
            present,
        ) {
            return None;
        }
        Some(KernelBtf::vmlinux().unwrap())
    })
    .as_ref()
}

/// A random type graph: ids may point anywhere (cycles, void, out of range), members may be
/// anonymous, bitfields, or at huge offsets.
fn random_types() -> impl Strategy<Value = Vec<Ty>> {
    let name = small_name();
    let id = 0u32..14;
    // Offsets near u32::MAX make sums over nested anonymous members overflow.
    let offset = prop_oneof![
        4 => (0u32..64).prop_map(|b| b * 8),
        1 => (u32::MAX - 512)..=u32::MAX,
        1 => any::<u32>(),
    ];
    let bitfield =
        prop_oneof![6 => Just(None), 1 => Just(Some(0)), 1 => any::<u8>().prop_map(Some)];
    let member = (name.clone(), id.clone(), offset, bitfield).prop_map(
        |(name, ty, bit_offset, bitfield)| Member {
            name,
            ty,
            bit_offset,
            bitfield,
        },
    );
    let ty = prop_oneof![
        1 => (name.clone(), prop_oneof![Just(1u32), Just(2), Just(4), Just(8)]).prop_map(|(name, size)| Ty::Int { name, size }),
        1 => id.clone().prop_map(Ty::Ptr),
        3 => (name.clone(), any::<u32>(), any::<bool>(), prop::collection::vec(member, 0..5))
            .prop_map(|(name, size, union, members)| Ty::Struct { name, size, union, members }),
        1 => (name.clone(), id.clone()).prop_map(|(name, ty)| Ty::Typedef { name, ty }),
        1 => id.prop_map(Ty::Const),
        1 => (name.clone(), prop::collection::vec(("[A-Z]{1,4}", any::<i32>()), 0..4)).prop_map(|(name, values)| Ty::Enum { name, values }),
        1 => name.prop_map(|name| Ty::Fwd { name }),
    ];
    prop::collection::vec(ty, 1..12)
}

/// Few distinct names, so that random paths often name random types' members.
fn small_name() -> impl Strategy<Value = String> + Clone {
    prop::sample::select(vec!["", "a", "b", "c", "sk_buff"]).prop_map(str::to_owned)
}

fn random_path() -> impl Strategy<Value = String> {
    let element = prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "c", "sk_buff"]).prop_map(str::to_owned),
        1 => small_name(),
    ];
    prop::collection::vec(element, 1..5).prop_map(|v| v.join("."))
}

proptest! {
    #![proptest_config(config())]

    /// Mutated and truncated copies of the corpus blob: loading fails cleanly or the walk
    /// (every path the program uses, the enum) runs without panicking.
    #[test]
    fn mutated_blobs_never_panic(muts in mutate::mutations(6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let blob = std::fs::read(corpus_path()).unwrap();
        let mut bytes = mutate::apply(&blob, &muts, &[]);
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        match KernelBtf::from_bytes(&bytes) {
            Err(e) => prop_assert!(e.to_string().starts_with("loading BTF from <memory>: "), "{}", e),
            Ok(btf) => {
                let _ = btf.kernel_layout(&TP);
                let _ = btf.enum_values("skb_drop_reason");
                let _ = btf.kfree_skb_btf_args();
                for path in ["sk_buff.headers.mac_header", "sk_buff.pkt_type", "net_device.nd_net.net.x"] {
                    check_walk(path, btf.member_offset(path))?;
                }
            }
        }
    }

    /// Random type graphs never make the walk panic or recurse without end.
    #[test]
    fn random_type_graphs_never_panic(types in random_types(), paths in prop::collection::vec(random_path(), 1..6)) {
        let btf = KernelBtf::from_bytes(&encode(&types));
        if let Ok(btf) = btf {
            for path in &paths {
                check_walk(path, btf.member_offset(path))?;
            }
            let _ = btf.kernel_layout(&TP);
            let _ = btf.enum_values("sk_buff");
        }
    }

    /// A member inside a chain of anonymous structs/unions (through typedefs and const) is at
    /// the sum of the chain's offsets; a sum beyond u32 bits, a bit offset, or a chain deeper
    /// than the walker's limit (32; real kernels nest 3 or 4) is an error, never a panic.
    #[test]
    fn anonymous_chains_sum_offsets(
        levels in prop::collection::vec((
            prop_oneof![4 => (0u32..4096).prop_map(|b| b * 8), 1 => any::<u32>(), 1 => (u32::MAX - 64)..=u32::MAX],
            any::<bool>(),
            0u8..3,
        ), 1..40),
        leaf_offset in prop_oneof![(0u32..64).prop_map(|b| b * 8), any::<u32>()],
    ) {
        // Innermost first: an anonymous struct/union holding `leaf`, then per level a struct
        // holding the previous one (behind const/typedef wrappers) as an anonymous member at
        // that level's offset. The outermost is named `root`.
        let mut types = vec![
            Ty::Int { name: "int".into(), size: 4 },
            Ty::Struct {
                name: String::new(),
                size: 8,
                union: levels[0].1,
                members: vec![Member { name: "leaf".into(), ty: 1, bit_offset: leaf_offset, bitfield: None }],
            },
        ];
        for (i, (offset, union, wrappers)) in levels.iter().enumerate() {
            let mut inner = types.len() as u32;
            for w in 0..*wrappers {
                types.push(if w % 2 == 0 {
                    Ty::Const(inner)
                } else {
                    Ty::Typedef { name: format!("t{inner}"), ty: inner }
                });
                inner = types.len() as u32;
            }
            let outermost = i + 1 == levels.len();
            types.push(Ty::Struct {
                name: if outermost { "root".into() } else { String::new() },
                size: 8,
                union: *union,
                members: vec![Member { name: String::new(), ty: inner, bit_offset: *offset, bitfield: None }],
            });
        }
        let btf = KernelBtf::from_bytes(&encode(&types)).unwrap();
        let got = btf.member_offset("root.leaf");
        let total = u64::from(leaf_offset) + levels.iter().map(|l| u64::from(l.0)).sum::<u64>();
        // find_member's depth at the struct that holds `leaf`.
        let depth = levels.len();
        const LIMIT: usize = 32;
        match got {
            Ok(off) => {
                prop_assert!(depth <= LIMIT, "depth {} resolved", depth);
                prop_assert_eq!(u64::from(off) * 8, total);
            }
            Err(BtfError::NotByteAligned { path }) => {
                prop_assert_eq!(path, "root.leaf");
                prop_assert!(total % 8 != 0 && total <= u64::from(u32::MAX) && depth <= LIMIT, "{}", total);
            }
            Err(e @ BtfError::Lookup { .. }) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("leaf"), "{}", msg);
                prop_assert!(
                    (msg.contains("overflows") && total > u64::from(u32::MAX))
                        || (msg.contains("nested deeper") && depth > LIMIT),
                    "{} (total {}, depth {})", msg, total, depth
                );
            }
            Err(e) => prop_assert!(false, "unexpected: {}", e),
        }
    }

    /// Any parameter list: the lookup agrees with a plain reading of the types (first skb
    /// pointer, first reason enum, first `void *` after the skb), or refuses when the skb, or
    /// both the reason and the location, are missing or out of reach.
    #[test]
    fn kfree_skb_btf_args_any_order(params in prop::collection::vec(prop::sample::select(vec![VOID_PTR, SKB_PTR, CONST_SKB_PTR, REASON, INT]), 0..12)) {
        let btf = with_kfree_skb_proto(&params);
        let pos = |f: &dyn Fn(u32) -> bool| params.iter().position(|&t| f(t)).map(|i| i as u32);
        let skb = pos(&|t| t == SKB_PTR || t == CONST_SKB_PTR);
        let reason = pos(&|t| t == REASON);
        let location = skb.and_then(|s| {
            params.iter().enumerate().position(|(i, &t)| i as u32 > s && t == VOID_PTR).map(|i| i as u32)
        });
        let in_reach = |i: u32| i < BTF_ARGS_MAX;
        match (skb, reason, location) {
            (Some(s), Some(r), _) if in_reach(s) && in_reach(r) => {
                let want = BtfArgs {
                    skb: s,
                    reason: r,
                    location: location.filter(|l| in_reach(*l)).unwrap_or(NO_ARG),
                    nr_args: params.len() as u32,
                };
                prop_assert_eq!(btf.kfree_skb_btf_args().unwrap(), want);
            }
            // Before drop reasons the location stands in for the reason, so it must be loadable.
            (Some(s), None, Some(l)) if in_reach(s) && in_reach(l) => {
                let want = BtfArgs {
                    skb: s,
                    reason: NO_ARG,
                    location: l,
                    nr_args: params.len() as u32,
                };
                prop_assert_eq!(btf.kfree_skb_btf_args().unwrap(), want);
            }
            _ => {
                let err = btf.kfree_skb_btf_args().unwrap_err();
                prop_assert!(matches!(err, BtfError::TracepointProto { .. }), "{}", err);
            }
        }
    }

    /// Arbitrary member paths on the mini BTF: known members resolve, anything else is an
    /// error naming what was not found.
    #[test]
    fn arbitrary_paths_on_mini(path in member_path()) {
        check_walk(&path, mini().member_offset(&path))?;
    }

    /// Arbitrary member paths on the running kernel's BTF.
    #[test]
    fn arbitrary_paths_on_vmlinux(paths in prop::collection::vec(member_path(), 1..8)) {
        let Some(btf) = vmlinux() else { return Ok(()) };
        for path in &paths {
            check_walk(path, btf.member_offset(path))?;
        }
    }

    /// A member that does not exist is an error naming it and the type searched.
    #[test]
    fn unknown_member_is_named(root in prop::sample::select(vec!["sk_buff", "net_device", "net"]), member in "zz_[a-z0-9_]{1,16}") {
        let path = format!("{root}.{member}");
        for btf in [Some(&mini()), vmlinux()].into_iter().flatten() {
            let msg = btf.member_offset(&path).unwrap_err().to_string();
            prop_assert!(msg.contains(&format!("{member:?}")) && msg.contains(root) && msg.contains("lacks the field"), "{}", msg);
        }
    }
}
