//! Struct member offsets and enum values from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the offsets the kernel program needs are computed here
//! and passed to it as a global.
use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Type};
use observer_ebpf::{BTF_ARGS_MAX, BtfArgs, KernelLayout, NO_ARG};

use super::tracefs::KfreeSkbFields;

/// The running kernel's BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Deepest nesting of anonymous structs/unions searched for a member (real kernels use 3 or 4).
const MAX_ANON_DEPTH: u32 = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read or parsed.
    #[error("loading BTF from {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// btf-rs's message.
        message: String,
    },
    /// The first element of a member path names no struct or union.
    #[error("BTF has no struct or union named {0:?}")]
    NoType(String),
    /// A member of the path does not exist (the kernel lacks that field).
    #[error("BTF: {ty} has no member {member:?} (resolving {path:?}); this kernel lacks the field")]
    NoMember {
        /// The full path being resolved.
        path: String,
        /// The type that was searched.
        ty: String,
        /// The missing member.
        member: String,
    },
    /// A member is a bitfield or otherwise not byte-addressable.
    #[error("BTF: {path:?} is not at a byte offset")]
    NotByteAligned {
        /// The full path.
        path: String,
    },
    /// A path element descends into something that is not a struct or union.
    #[error("BTF: {path:?}: {member:?} is not a struct or union")]
    NotComposite {
        /// The full path.
        path: String,
        /// The member that is not a struct/union.
        member: String,
    },
    /// A member path names no member (`sk_buff`) or has an empty element (`sk_buff..len`).
    #[error("BTF member path {0:?} is not of the form `type.member[.member...]`")]
    BadPath(String),
    /// The enum was not found.
    #[error("BTF has no enum named {0:?}")]
    NoEnum(String),
    /// The BTF prototype of a tracepoint is missing or lacks an argument the BTF-enabled
    /// program needs (the classic tracepoint is used then).
    #[error("BTF: {typedef}: {problem}")]
    TracepointProto {
        /// The `btf_trace_<name>` typedef.
        typedef: String,
        /// What is missing or unexpected.
        problem: String,
    },
    /// btf-rs failed while walking types.
    #[error("BTF lookup for {what}: {message}")]
    Lookup {
        /// What was being looked up.
        what: String,
        /// btf-rs's message.
        message: String,
    },
}

/// Parsed kernel BTF.
pub struct KernelBtf {
    btf: Btf,
}

impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelBtf")
    }
}

impl KernelBtf {
    /// Loads `/sys/kernel/btf/vmlinux`.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    /// Parses raw BTF held in memory (the fuzz tests' blobs); errors name it `<memory>`.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        let btf = Btf::from_bytes(bytes).map_err(|e| BtfError::Load {
            path: PathBuf::from("<memory>"),
            message: e.to_string(),
        })?;
        Ok(Self { btf })
    }

    /// Loads a raw BTF file.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|e| BtfError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self { btf })
    }

    fn lookup_err(what: &str, e: impl std::fmt::Display) -> BtfError {
        BtfError::Lookup {
            what: what.to_owned(),
            message: e.to_string(),
        }
    }

    /// Byte offset of a member path such as `sk_buff.network_header` or `net.ns.inum`.
    ///
    /// Members inside anonymous structs and unions are found as C finds them. Each element after
    /// the first descends into the previous member's struct/union type (through typedefs and
    /// qualifiers, never through pointers).
    pub fn member_offset(&self, path: &str) -> Result<u32, BtfError> {
        // An empty element would match anonymous types and members by their empty name.
        if path.split('.').any(str::is_empty) {
            return Err(BtfError::BadPath(path.to_owned()));
        }
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let mut current = self.composite_by_name(root)?;
        let mut current_name = root.to_owned();
        let mut bits: u64 = 0;
        let mut any = false;
        for member in parts {
            any = true;
            let found = self.find_member(&current, member, 0).map_err(|e| match e {
                BtfError::NotComposite { .. } => BtfError::NotComposite {
                    path: path.to_owned(),
                    member: current_name.clone(),
                },
                other => other,
            })?;
            let (off, ty) = found.ok_or_else(|| BtfError::NoMember {
                path: path.to_owned(),
                ty: current_name.clone(),
                member: member.to_owned(),
            })?;
            // u64 cannot overflow here: at most `path.len()` additions of u32 values.
            bits += u64::from(off);
            current_name = member.to_owned();
            current = ty;
        }
        if !any {
            return Err(BtfError::BadPath(path.to_owned()));
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::NotByteAligned {
                path: path.to_owned(),
            });
        }
        u32::try_from(bits / 8).map_err(|e| Self::lookup_err(path, e))
    }

    /// The struct or union named `name` (skipping forward declarations).
    fn composite_by_name(&self, name: &str) -> Result<Type, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoType(name.to_owned()))?;
        types
            .into_iter()
            .find(|t| matches!(t, Type::Struct(_) | Type::Union(_)))
            .ok_or_else(|| BtfError::NoType(name.to_owned()))
    }

    /// Follows typedefs and qualifiers down to the underlying type.
    fn strip(&self, mut t: Type) -> Result<Type, BtfError> {
        for _ in 0..32 {
            match &t {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    let bt = t.as_btf_type().ok_or_else(|| {
                        Self::lookup_err("typedef", "qualifier without chained type")
                    })?;
                    t = self
                        .btf
                        .resolve_chained_type(bt)
                        .map_err(|e| Self::lookup_err("typedef", e))?;
                }
                _ => return Ok(t),
            }
        }
        Err(Self::lookup_err("typedef", "typedef chain too long"))
    }

    /// Finds `name` in a struct/union, descending into anonymous members. Returns the bit offset
    /// from the start of `ty` and the member's (stripped) type.
    ///
    /// `depth` counts anonymous levels: corrupt BTF can make an anonymous member contain its
    /// own type, which would otherwise recurse until the stack overflows.
    fn find_member(
        &self,
        ty: &Type,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, Type)>, BtfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(Self::lookup_err(
                name,
                format!("anonymous members nested deeper than {MAX_ANON_DEPTH} (corrupt BTF?)"),
            ));
        }
        let ty = self.strip(ty.clone())?;
        let members = match &ty {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => {
                return Err(BtfError::NotComposite {
                    path: name.to_owned(),
                    member: name.to_owned(),
                });
            }
        };
        for m in members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let mtype = self
                .btf
                .resolve_chained_type(m)
                .map_err(|e| Self::lookup_err(name, e))?;
            if mname == name {
                if m.bitfield_size().is_some_and(|s| s != 0) {
                    return Err(BtfError::NotByteAligned {
                        path: name.to_owned(),
                    });
                }
                return Ok(Some((m.bit_offset(), self.strip(mtype)?)));
            }
            if mname.is_empty() {
                let inner = self.strip(mtype)?;
                if matches!(inner, Type::Struct(_) | Type::Union(_))
                    && let Some((off, t)) = self.find_member(&inner, name, depth + 1)?
                {
                    let bits = m.bit_offset().checked_add(off).ok_or_else(|| {
                        Self::lookup_err(name, "member offset overflows (corrupt BTF?)")
                    })?;
                    return Ok(Some((bits, t)));
                }
            }
        }
        Ok(None)
    }

    /// `(NAME, value)` pairs of the enum `name` (32- or 64-bit enums).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u32)>, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoEnum(name.to_owned()))?;
        for t in types {
            match t {
                Type::Enum(e) => {
                    return e
                        .members
                        .iter()
                        .map(|m| {
                            let n = self
                                .btf
                                .resolve_name(m)
                                .map_err(|e| Self::lookup_err(name, e))?;
                            Ok((n, m.val()))
                        })
                        .collect();
                }
                Type::Enum64(e) => {
                    return e
                        .members
                        .iter()
                        .map(|m| {
                            let n = self
                                .btf
                                .resolve_name(m)
                                .map_err(|e| Self::lookup_err(name, e))?;
                            Ok((n, u32::try_from(m.val()).unwrap_or(u32::MAX)))
                        })
                        .collect();
                }
                _ => {}
            }
        }
        Err(BtfError::NoEnum(name.to_owned()))
    }

    /// Where the BTF-enabled `kfree_skb` tracepoint (`tp_btf/kfree_skb`) finds its arguments.
    ///
    /// The kernel describes the tracepoint by the typedef `btf_trace_kfree_skb`, a pointer to
    /// `void (*)(void *__data, <tracepoint args>)`. Its parameters carry no names, so they are
    /// found by type: the first `struct sk_buff *`, the `enum skb_drop_reason` and the first
    /// `void *` after the skb (the code location). Indices count from the first argument after
    /// `__data`, as the program's context does.
    ///
    /// An error (missing typedef, no skb or reason argument, an index beyond what the program
    /// can load) means the classic tracepoint must be used.
    pub fn kfree_skb_btf_args(&self) -> Result<BtfArgs, BtfError> {
        self.tp_btf_args("kfree_skb")
    }

    fn tp_btf_args(&self, tracepoint: &str) -> Result<BtfArgs, BtfError> {
        let typedef = format!("btf_trace_{tracepoint}");
        let problem = |p: &str| BtfError::TracepointProto {
            typedef: typedef.clone(),
            problem: p.to_owned(),
        };
        let types = self
            .btf
            .resolve_types_by_name(&typedef)
            .map_err(|_| problem("no such typedef (kernel without BTF for this tracepoint)"))?;
        let def = types
            .into_iter()
            .find(|t| matches!(t, Type::Typedef(_)))
            .ok_or_else(|| problem("no such typedef (kernel without BTF for this tracepoint)"))?;
        let Type::Ptr(ptr) = self.strip(def)? else {
            return Err(problem("not a function pointer"));
        };
        let proto = self
            .btf
            .resolve_chained_type(&ptr)
            .map_err(|e| Self::lookup_err(&typedef, e))?;
        let Type::FuncProto(proto) = self.strip(proto)? else {
            return Err(problem("not a function pointer"));
        };
        let mut params = proto.parameters.iter();
        match params.next() {
            Some(p) if self.is_void_ptr(p)? => {}
            _ => return Err(problem("first parameter is not `void *__data`")),
        }
        let mut args = BtfArgs {
            nr_args: u32::try_from(proto.parameters.len() - 1).unwrap_or(u32::MAX),
            ..BtfArgs::NONE
        };
        for (i, p) in params.enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if p.is_variadic() {
                return Err(problem("variadic prototype"));
            }
            if args.skb == NO_ARG && self.is_ptr_to_struct(p, "sk_buff")? {
                args.skb = i;
            } else if args.reason == NO_ARG && self.is_enum(p, "skb_drop_reason")? {
                args.reason = i;
            } else if args.skb != NO_ARG && args.location == NO_ARG && self.is_void_ptr(p)? {
                args.location = i;
            }
        }
        if args.skb == NO_ARG {
            return Err(problem("no `struct sk_buff *` argument"));
        }
        // Without a reason argument (kernels before 5.17) the program derives the reason from
        // the location, so then the location is required.
        let mut needed = vec![("sk_buff", args.skb)];
        if args.reason == NO_ARG {
            if args.location == NO_ARG {
                return Err(problem(
                    "neither an `enum skb_drop_reason` nor a `void *location` argument",
                ));
            }
            needed.push(("location", args.location));
        } else {
            needed.push(("reason", args.reason));
        }
        for (what, idx) in needed {
            if idx >= BTF_ARGS_MAX {
                return Err(problem(&format!(
                    "the {what} argument is number {idx}, beyond the {BTF_ARGS_MAX} the program can load"
                )));
            }
        }
        if args.location >= BTF_ARGS_MAX {
            // Only samples use it then; they report location 0.
            args.location = NO_ARG;
        }
        Ok(args)
    }

    /// The type a parameter points to, after typedefs and qualifiers; `None` if not a pointer.
    fn pointee(&self, p: &dyn BtfType) -> Result<Option<Type>, BtfError> {
        let t = self
            .btf
            .resolve_chained_type(p)
            .map_err(|e| Self::lookup_err("parameter", e))?;
        let Type::Ptr(ptr) = self.strip(t)? else {
            return Ok(None);
        };
        let to = self
            .btf
            .resolve_chained_type(&ptr)
            .map_err(|e| Self::lookup_err("parameter", e))?;
        Ok(Some(self.strip(to)?))
    }

    fn is_void_ptr(&self, p: &dyn BtfType) -> Result<bool, BtfError> {
        Ok(matches!(self.pointee(p)?, Some(Type::Void)))
    }

    fn is_ptr_to_struct(&self, p: &dyn BtfType, name: &str) -> Result<bool, BtfError> {
        Ok(match self.pointee(p)? {
            Some(Type::Struct(s)) => self.btf.resolve_name(&s).is_ok_and(|n| n == name),
            _ => false,
        })
    }

    fn is_enum(&self, p: &dyn BtfType, name: &str) -> Result<bool, BtfError> {
        let t = self
            .btf
            .resolve_chained_type(p)
            .map_err(|e| Self::lookup_err("parameter", e))?;
        Ok(match self.strip(t)? {
            Type::Enum(e) => self.btf.resolve_name(&e).is_ok_and(|n| n == name),
            Type::Enum64(e) => self.btf.resolve_name(&e).is_ok_and(|n| n == name),
            _ => false,
        })
    }

    /// All offsets the kernel program needs, for the tracepoint fields `tp`.
    pub fn kernel_layout(&self, tp: &KfreeSkbFields) -> Result<KernelLayout, BtfError> {
        Ok(KernelLayout {
            tp_skbaddr: tp.skbaddr,
            tp_location: tp.location,
            tp_protocol: tp.protocol,
            tp_reason: tp.reason.unwrap_or(u32::MAX),
            skb_head: self.member_offset("sk_buff.head")?,
            skb_network_header: self.member_offset("sk_buff.network_header")?,
            skb_transport_header: self.member_offset("sk_buff.transport_header")?,
            skb_len: self.member_offset("sk_buff.len")?,
            skb_dev: self.member_offset("sk_buff.dev")?,
            dev_ifindex: self.member_offset("net_device.ifindex")?,
            dev_nd_net: self.member_offset("net_device.nd_net.net")?,
            net_ns_inum: self.member_offset("net.ns.inum")?,
            skb_tail: self.member_offset("sk_buff.tail")?,
            skb_data_len: self.member_offset("sk_buff.data_len")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmlinux() -> Option<KernelBtf> {
        let present = Path::new(VMLINUX_BTF).exists();
        if !testkit::requires(
            "capture::btf tests",
            "the kernel's BTF ({VMLINUX_BTF})",
            present,
        ) {
            return None;
        }
        Some(KernelBtf::vmlinux().unwrap())
    }

    #[test]
    fn sk_buff_offsets_are_plausible_and_distinct() {
        let Some(btf) = vmlinux() else { return };
        let head = btf.member_offset("sk_buff.head").unwrap();
        let nh = btf.member_offset("sk_buff.network_header").unwrap();
        let th = btf.member_offset("sk_buff.transport_header").unwrap();
        let len = btf.member_offset("sk_buff.len").unwrap();
        let dev = btf.member_offset("sk_buff.dev").unwrap();
        // network_header and transport_header are adjacent u16s inside an anonymous struct
        // (struct_group headers) in every kernel since 4.x.
        assert_eq!(nh, th + 2);
        // dev lives in the first anonymous union/struct, len and the headers after it.
        assert!(
            dev < len && len < nh && nh < head,
            "{dev} {len} {nh} {head}"
        );
        assert!(head < 256);
        let sk_buff_size = btf.member_offset("sk_buff.truesize").unwrap();
        assert!(sk_buff_size > head);
    }

    #[test]
    fn net_offsets_resolve_through_typedefs() {
        let Some(btf) = vmlinux() else { return };
        let nd_net = btf.member_offset("net_device.nd_net").unwrap();
        // possible_net_t is a typedef'd struct whose only member is `net` at offset 0.
        assert_eq!(btf.member_offset("net_device.nd_net.net").unwrap(), nd_net);
        let ns = btf.member_offset("net.ns").unwrap();
        let inum = btf.member_offset("net.ns.inum").unwrap();
        assert!(inum >= ns);
        assert!(btf.member_offset("net_device.ifindex").unwrap() > 0);
    }

    #[test]
    fn missing_member_names_it() {
        let Some(btf) = vmlinux() else { return };
        let err = btf.member_offset("sk_buff.no_such_field").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no_such_field") && msg.contains("sk_buff"),
            "{msg}"
        );
        let err = btf.member_offset("no_such_struct_xyz.len").unwrap_err();
        assert!(err.to_string().contains("no_such_struct_xyz"), "{err}");
        let err = btf.member_offset("sk_buff.len.x").unwrap_err();
        assert!(matches!(err, BtfError::NotComposite { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("sk_buff.len.x") && msg.contains("\"len\""),
            "{msg}"
        );
    }

    #[test]
    fn drop_reason_enum_has_netfilter_drop() {
        let Some(btf) = vmlinux() else { return };
        let values = btf.enum_values("skb_drop_reason").unwrap();
        let nf = values
            .iter()
            .find(|(n, _)| n == "SKB_DROP_REASON_NETFILTER_DROP")
            .map(|(_, v)| *v);
        assert!(nf.is_some(), "{values:?}");
        assert!(btf.enum_values("no_such_enum_xyz").is_err());
    }

    #[test]
    fn kfree_skb_btf_args_on_this_kernel() {
        let Some(btf) = vmlinux() else { return };
        // Every kernel with drop reasons in the tracepoint (5.17+) has (skb, location,
        // reason[, rx_sk]) after __data; 6.18: `void (*)(void *, struct sk_buff *, void *,
        // enum skb_drop_reason, struct sock *)`.
        let args = btf.kfree_skb_btf_args().unwrap();
        assert_eq!(
            (args.skb, args.location, args.reason),
            (0, 1, 2),
            "{args:?}"
        );
        assert!(args.nr_args >= 3, "{args:?}");
        // consume_skb (skb, location) has the shape of kfree_skb before drop reasons (5.10):
        // accepted, with the reason to come from the location.
        let args = btf.tp_btf_args("consume_skb").unwrap();
        assert_eq!(
            (args.skb, args.location, args.reason, args.nr_args),
            (0, 1, NO_ARG, 2),
            "{args:?}"
        );
        // A tracepoint with neither (netif_receive_skb: skb only) is refused.
        let err = btf
            .tp_btf_args("netif_receive_skb")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("btf_trace_netif_receive_skb") && err.contains("location"),
            "{err}"
        );
        let err = btf
            .tp_btf_args("no_such_tracepoint_xyz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("btf_trace_no_such_tracepoint_xyz"), "{err}");
    }

    #[test]
    fn layout_from_real_btf() {
        let Some(btf) = vmlinux() else { return };
        let tp = KfreeSkbFields {
            skbaddr: 8,
            location: 16,
            protocol: 32,
            reason: None,
        };
        let l = btf.kernel_layout(&tp).unwrap();
        assert_eq!(l.tp_reason, u32::MAX);
        assert_eq!(l.skb_len, btf.member_offset("sk_buff.len").unwrap());
    }
}

#[cfg(test)]
mod fuzz_tests;
