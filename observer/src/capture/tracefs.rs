//! Finding tracefs (never bpffs: nothing is pinned), and parsing of the `skb:kfree_skb` format file: field offsets for
//! the kernel program, and the kernel's own drop-reason names.
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where tracefs is mounted on current systems (and where it is mounted when missing).
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";
/// Where older systems have tracefs: inside debugfs.
pub const DEBUGFS_TRACING_ROOT: &str = "/sys/kernel/debug/tracing";
/// Where tracefs is looked for, in this order (the same order as aya's, which attaches the
/// classic tracepoint through whichever it finds).
pub const TRACEFS_CANDIDATES: [&str; 2] = [TRACEFS_ROOT, DEBUGFS_TRACING_ROOT];
/// Format file of the tracepoint, relative to the tracefs root.
pub const KFREE_SKB_FORMAT: &str = "events/skb/kfree_skb/format";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// tracefs is at none of [`TRACEFS_CANDIDATES`] and could not be mounted.
    #[error(
        "tracefs (events/skb/kfree_skb) not found at {} or {}, and mounting it at {} failed ({mount_error}){}",
        TRACEFS_ROOT,
        DEBUGFS_TRACING_ROOT,
        TRACEFS_ROOT,
        missing_tracefs_fix(mount_error, mounted_there.as_deref())
    )]
    NotFound {
        /// Why `mount -t tracefs` failed.
        mount_error: std::io::Error,
        /// The type of the file system mounted at [`TRACEFS_ROOT`] in this mount namespace, when
        /// one is: in a container, a volume of the host's directory (`sysfs` where the host has
        /// not mounted tracefs on it).
        mounted_there: Option<String>,
    },
    /// A `field:` line of the format file could not be parsed.
    #[error("format file line {line}: cannot parse {text:?}")]
    BadField {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A field the program needs is missing or has an unexpected size.
    #[error("kfree_skb format: field {field:?} {problem}")]
    Field {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// The tracefs directory to read the tracepoint from: the first of [`TRACEFS_CANDIDATES`] that
/// has `events/`; when neither has, tracefs is mounted at [`TRACEFS_ROOT`] if this process may
/// (CAP_SYS_ADMIN, which the DaemonSet does not grant: there it must come as a volume).
///
/// bpffs is never needed: nothing is pinned, the program lives as long as the process.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    if let Some(found) = find_tracefs(TRACEFS_CANDIDATES.iter().map(Path::new)) {
        return Ok(found);
    }
    let mounted_there = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|text| mounted_fs_at(&text, TRACEFS_ROOT))
            .filter(|fs| fs != "tracefs")
    };
    match mount_tracefs(TRACEFS_ROOT) {
        Ok(()) if Path::new(TRACEFS_ROOT).join("events").is_dir() => {
            Ok(PathBuf::from(TRACEFS_ROOT))
        }
        Ok(()) => Err(TracefsError::NotFound {
            mount_error: std::io::Error::other("mounted, but it has no events/ directory"),
            mounted_there: mounted_there(),
        }),
        Err(mount_error) => Err(TracefsError::NotFound {
            mount_error,
            mounted_there: mounted_there(),
        }),
    }
}

/// The file-system type of the topmost mount at `target` in `mountinfo` (the text of
/// `/proc/self/mountinfo`), if anything is mounted there.
pub fn mounted_fs_at(mountinfo: &str, target: &str) -> Option<String> {
    mountinfo
        .lines()
        // Later lines are mounted over earlier ones: the last match is on top.
        .rev()
        .find_map(|line| {
            // `id parent major:minor root mount-point options [optional...] - fstype source ...`
            let (head, tail) = line.split_once(" - ")?;
            let mount_point = head.split_whitespace().nth(4)?;
            let fstype = tail.split_whitespace().next()?;
            (mount_point == target).then(|| fstype.to_owned())
        })
}

/// The first of `candidates` that holds tracefs's `events/` directory.
pub fn find_tracefs<'a>(candidates: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .find(|root| root.join("events").is_dir())
        .map(Path::to_path_buf)
}

/// What to do when tracefs is missing, for [`TracefsError::NotFound`]; `mount_error` tells a
/// missing capability from a kernel without tracefs, and `mounted_there` (what is mounted at
/// [`TRACEFS_ROOT`] instead of tracefs) a volume that is there from one that is missing.
pub fn missing_tracefs_fix(mount_error: &std::io::Error, mounted_there: Option<&str>) -> String {
    match mount_error.raw_os_error() {
        // The DaemonSet's hostPath volume is in place: it shows the node's own directory, and
        // the node has not mounted tracefs on it. Adding the volume again would change nothing.
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) if mounted_there.is_some() => {
            format!(
                ": {TRACEFS_ROOT} is mounted into this container (a {} volume, presumably the \
                 host's directory) but holds no tracefs: the node has not mounted tracefs there. \
                 On the node, as root: `mount -t tracefs tracefs {TRACEFS_ROOT}` (to keep it \
                 across reboots: systemd's sys-kernel-tracing.mount, or an fstab line \
                 `tracefs {TRACEFS_ROOT} tracefs defaults 0 0`); the container finds it when it \
                 next starts",
                mounted_there.unwrap_or_default()
            )
        }
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => format!(
            ": mounting needs CAP_SYS_ADMIN, which deny-observer does not ask for. In a container, \
             mount the host's {TRACEFS_ROOT} read-only (a hostPath volume of type Directory, as \
             deploy/base/daemonset.yaml does); if the host has tracefs only under debugfs, \
             deploy/overlays/legacy-kernel mounts /sys/kernel/debug. On the host itself: \
             `mount -t tracefs tracefs {TRACEFS_ROOT}`"
        ),
        Some(libc::ENODEV) => ": this kernel has no tracefs (CONFIG_TRACING / CONFIG_FTRACE); \
                               deny-observer needs a kernel with tracepoints"
            .to_owned(),
        _ => format!(
            ": mount the host's {TRACEFS_ROOT} into the container read-only (hostPath volume), \
             or mount tracefs on the host"
        ),
    }
}

fn mount_tracefs(path: &str) -> Result<(), std::io::Error> {
    let fstype = c"tracefs";
    let target = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Another process may have mounted it between our check and our mount.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Ok(())
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Field name (`skbaddr`, `reason`, ...).
    pub name: String,
    /// C type as written (`void *`, `enum skb_drop_reason`).
    pub c_type: String,
    /// Offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A parsed tracepoint format file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TracepointFormat {
    /// All fields, common ones included, in file order.
    pub fields: Vec<Field>,
    /// The `print fmt:` line, without the prefix.
    pub print_fmt: String,
}

impl TracepointFormat {
    /// The field named `name`.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Parses a tracepoint `format` file.
pub fn parse_format(text: &str) -> Result<TracepointFormat, TracefsError> {
    let mut out = TracepointFormat::default();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("print fmt:") {
            out.print_fmt = rest.trim().to_owned();
        } else if t.starts_with("field:") {
            out.fields
                .push(parse_field(t).ok_or_else(|| TracefsError::BadField {
                    line: i + 1,
                    text: t.to_owned(),
                })?);
        }
    }
    Ok(out)
}

/// `field:void * skbaddr; offset:8; size:8; signed:0;`
fn parse_field(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once(':')?;
        match k {
            "field" => decl = Some(v.trim()),
            "offset" => offset = v.trim().parse().ok(),
            "size" => size = v.trim().parse().ok(),
            _ => {}
        }
    }
    let decl = decl?;
    // The name is the last identifier. A trailing array suffix (`char name[16]`) is dropped;
    // brackets inside the type (`__data_loc char[] name`) stay part of the type.
    let decl_no_array = match decl.strip_suffix(']') {
        Some(d) => d.rsplit_once('[')?.0,
        None => decl,
    }
    .trim_end();
    let split = decl_no_array.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
    let name = decl_no_array.get(split + 1..)?;
    if name.is_empty() {
        return None;
    }
    Some(Field {
        name: name.to_owned(),
        c_type: decl_no_array.get(..=split)?.trim().to_owned(),
        offset: offset?,
        size: size?,
    })
}

/// Offsets of the kfree_skb fields the kernel program reads.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KfreeSkbFields {
    /// `skbaddr` (pointer).
    pub skbaddr: u32,
    /// `location` (pointer).
    pub location: u32,
    /// `protocol` (u16).
    pub protocol: u32,
    /// `reason` (4-byte enum); `None` on kernels before drop reasons (< 5.17).
    pub reason: Option<u32>,
}

impl KfreeSkbFields {
    /// Checks the fields the program needs, with the sizes it reads them with.
    pub fn from_format(fmt: &TracepointFormat) -> Result<Self, TracefsError> {
        let get = |field: &'static str, size: u32| -> Result<Option<u32>, TracefsError> {
            match fmt.field(field) {
                None => Ok(None),
                Some(f) if f.size == size => Ok(Some(f.offset)),
                Some(f) => Err(TracefsError::Field {
                    field,
                    problem: format!("has size {}, expected {size}", f.size),
                }),
            }
        };
        let need = |field: &'static str, size: u32| -> Result<u32, TracefsError> {
            get(field, size)?.ok_or_else(|| TracefsError::Field {
                field,
                problem: "is missing".to_owned(),
            })
        };
        Ok(Self {
            skbaddr: need("skbaddr", 8)?,
            location: need("location", 8)?,
            protocol: need("protocol", 2)?,
            reason: get("reason", 4)?,
        })
    }
}

/// Drop-reason numbers of the running kernel mapped to metric label values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReasonTable {
    by_num: BTreeMap<u32, Arc<str>>,
}

impl ReasonTable {
    /// Builds a table from `(number, kernel name)` pairs; names are turned into labels with
    /// `reason_label`.
    pub fn from_kernel_names<'a>(pairs: impl IntoIterator<Item = (u32, &'a str)>) -> Self {
        Self {
            by_num: pairs
                .into_iter()
                .map(|(n, name)| (n, Arc::from(reason_label(name))))
                .collect(),
        }
    }

    /// Table for kernels without a `reason` field: everything is reason 0, `unknown`.
    pub fn unknown_only() -> Self {
        Self {
            by_num: BTreeMap::from([(0, Arc::from("unknown"))]),
        }
    }

    /// Label of reason `num`; numbers the kernel did not name get `reason_<num>`, so a label
    /// is never lost (the set stays bounded by the kernel's reasons).
    pub fn label(&self, num: u32) -> Arc<str> {
        match self.by_num.get(&num) {
            Some(l) => l.clone(),
            None => Arc::from(format!("reason_{num}")),
        }
    }

    /// Reason number of a label or kernel name (`netfilter_drop`, `NETFILTER_DROP`,
    /// `SKB_DROP_REASON_NETFILTER_DROP` all work).
    pub fn number(&self, name: &str) -> Option<u32> {
        let label = reason_label(name);
        self.by_num
            .iter()
            .find(|(_, l)| l.as_ref() == label.as_str())
            .map(|(n, _)| *n)
    }

    /// All `(number, label)` pairs, by number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Arc<str>)> {
        self.by_num.iter().map(|(n, l)| (*n, l))
    }

    /// Number of named reasons.
    pub fn len(&self) -> usize {
        self.by_num.len()
    }

    /// True when no reason is named.
    pub fn is_empty(&self) -> bool {
        self.by_num.is_empty()
    }
}

/// Turns a kernel reason name into its label: lower case, without `SKB_DROP_REASON_` / `SKB_`.
pub fn reason_label(kernel_name: &str) -> String {
    let upper = kernel_name.trim().to_ascii_uppercase();
    let short = upper
        .strip_prefix("SKB_DROP_REASON_")
        .or_else(|| upper.strip_prefix("SKB_"))
        .unwrap_or(&upper);
    // Trimmed again so that a label maps to itself (`SKB_ X` would otherwise label " x",
    // which `number(" x")` trims to "x" and no longer finds).
    short.trim().to_ascii_lowercase()
}

/// Parses `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, ...)` out of a `print fmt`.
/// Returns `None` when the format has no such list (older kernels print the number).
pub fn parse_reason_symbols(print_fmt: &str) -> Option<ReasonTable> {
    let start = print_fmt.find("__print_symbolic(REC->reason")?;
    let rest = print_fmt.get(start..)?;
    let mut pairs = Vec::new();
    let mut depth = 0usize;
    let mut entry = String::new();
    for c in rest.chars().skip("__print_symbolic(".len()) {
        match c {
            '{' => {
                depth += 1;
                entry.clear();
            }
            '}' => {
                depth = depth.saturating_sub(1);
                let (num, name) = entry.split_once(',')?;
                let num = parse_c_int(num.trim())?;
                let name = name.trim().trim_matches('"');
                pairs.push((num, name.to_owned()));
            }
            ')' if depth == 0 => break,
            _ if depth > 0 => entry.push(c),
            _ => {}
        }
    }
    if pairs.is_empty() {
        return None;
    }
    Some(ReasonTable::from_kernel_names(
        pairs.iter().map(|(n, s)| (*n, s.as_str())),
    ))
}

fn parse_c_int(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Reads and parses the kfree_skb format file under `tracefs_root`.
pub fn read_kfree_skb_format(tracefs_root: &Path) -> Result<TracepointFormat, TracefsError> {
    let path = tracefs_root.join(KFREE_SKB_FORMAT);
    let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_format(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracefs_is_found_where_events_exist_in_candidate_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("tracing"), dir.path().join("debug/tracing"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(b.join("events")).unwrap();
        // An empty mount point (tracefs not mounted there) is skipped.
        assert_eq!(find_tracefs([a.as_path(), b.as_path()]), Some(b.clone()));
        std::fs::create_dir_all(a.join("events")).unwrap();
        assert_eq!(find_tracefs([a.as_path(), b.as_path()]), Some(a));
        assert_eq!(find_tracefs([dir.path().join("none").as_path()]), None);
    }

    #[test]
    fn missing_tracefs_names_the_volume_or_the_kernel_feature() {
        let denied = TracefsError::NotFound {
            mount_error: std::io::Error::from_raw_os_error(libc::EPERM),
            mounted_there: None,
        }
        .to_string();
        assert!(denied.contains("/sys/kernel/tracing"), "{denied}");
        assert!(denied.contains("CAP_SYS_ADMIN"), "{denied}");
        assert!(denied.contains("hostPath"), "{denied}");
        assert!(denied.contains("mount -t tracefs"), "{denied}");
        let nodev = TracefsError::NotFound {
            mount_error: std::io::Error::from_raw_os_error(libc::ENODEV),
            mounted_there: None,
        }
        .to_string();
        assert!(nodev.contains("no tracefs"), "{nodev}");
    }

    /// The volume is there but the node never mounted tracefs on its directory: the fix is on
    /// the node, not in the manifest.
    #[test]
    fn an_empty_tracefs_volume_points_at_the_node() {
        let empty = TracefsError::NotFound {
            mount_error: std::io::Error::from_raw_os_error(libc::EPERM),
            mounted_there: Some("sysfs".to_owned()),
        }
        .to_string();
        assert!(empty.contains("node has not mounted tracefs"), "{empty}");
        assert!(empty.contains("a sysfs volume"), "{empty}");
        assert!(
            empty.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
            "{empty}"
        );
        assert!(
            !empty.contains("hostPath volume of type Directory"),
            "{empty}"
        );
    }

    /// Lines as podman's runc container showed them: the DaemonSet's volume of a host whose
    /// tracefs is mounted, and of one whose is not (the bare sysfs directory).
    #[test]
    fn the_mount_at_the_tracefs_root_is_read_from_mountinfo() {
        let mounted = "214 211 0:50 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro\n\
                       247 214 0:22 /kernel/btf /sys/kernel/btf ro,relatime - sysfs sysfs rw\n\
                       248 214 0:13 / /sys/kernel/tracing ro,relatime - tracefs tracefs rw\n";
        assert_eq!(
            mounted_fs_at(mounted, TRACEFS_ROOT).as_deref(),
            Some("tracefs")
        );
        let bare = "214 211 0:50 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro\n\
                    248 214 0:22 /kernel/tracing /sys/kernel/tracing ro,relatime shared:5 - sysfs sysfs rw\n";
        assert_eq!(mounted_fs_at(bare, TRACEFS_ROOT).as_deref(), Some("sysfs"));
        // Stacked mounts: the last one is on top.
        let stacked = format!("{bare}249 248 0:13 / /sys/kernel/tracing rw - tracefs tracefs rw\n");
        assert_eq!(
            mounted_fs_at(&stacked, TRACEFS_ROOT).as_deref(),
            Some("tracefs")
        );
        assert_eq!(mounted_fs_at(bare, "/sys/kernel/debug/tracing"), None);
        assert_eq!(mounted_fs_at("garbage\n", TRACEFS_ROOT), None);
    }

    /// Verbatim from Linux 6.18 on this machine (print fmt shortened).
    const FORMAT_6_18: &str = r#"name: kfree_skb
ID: 2310
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:void * rx_sk;	offset:24;	size:8;	signed:0;
	field:unsigned short protocol;	offset:32;	size:2;	signed:0;
	field:enum skb_drop_reason reason;	offset:36;	size:4;	signed:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" }, { 73, "TC_INGRESS" }, { 128, "MAX" })
"#;

    /// Shape of 5.17–6.7 kernels: no rx_sk, so protocol and reason sit earlier.
    const FORMAT_NO_RX_SK: &str = r#"name: kfree_skb
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:unsigned short protocol;	offset:24;	size:2;	signed:0;
	field:enum skb_drop_reason reason;	offset:28;	size:4;	signed:0;

print fmt: "skbaddr=%p protocol=%u location=%p reason: %s", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, { 1, "NOT_SPECIFIED" }, { 2, "NO_SOCKET" })
"#;

    /// Shape of kernels before drop reasons (< 5.17).
    const FORMAT_NO_REASON: &str = r#"format:
	field:void * skbaddr;	offset:8;	size:8;	signed:0;
	field:void * location;	offset:16;	size:8;	signed:0;
	field:unsigned short protocol;	offset:24;	size:2;	signed:0;

print fmt: "skbaddr=%p protocol=%u location=%p", REC->skbaddr, REC->protocol, REC->location
"#;

    #[test]
    fn parses_6_18_offsets() {
        let f = KfreeSkbFields::from_format(&parse_format(FORMAT_6_18).unwrap()).unwrap();
        assert_eq!(
            f,
            KfreeSkbFields {
                skbaddr: 8,
                location: 16,
                protocol: 32,
                reason: Some(36)
            }
        );
    }

    #[test]
    fn parses_kernel_without_rx_sk() {
        let fmt = parse_format(FORMAT_NO_RX_SK).unwrap();
        assert!(fmt.field("rx_sk").is_none());
        let f = KfreeSkbFields::from_format(&fmt).unwrap();
        assert_eq!((f.protocol, f.reason), (24, Some(28)));
        let t = parse_reason_symbols(&fmt.print_fmt).unwrap();
        assert_eq!(t.number("no_socket"), Some(2));
    }

    /// Verbatim from Debian 11's 5.10.0-46 (printed by `cargo xtask kernels`): the record ends
    /// with `protocol` at byte 26, so the program may load nothing past byte 24 unasked.
    const FORMAT_5_10: &str = "name: kfree_skb
ID: 1267
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;

print fmt: \"skbaddr=%p protocol=%u location=%p\", REC->skbaddr, REC->protocol, REC->location
";

    #[test]
    fn parses_5_10() {
        let fmt = parse_format(FORMAT_5_10).unwrap();
        let f = KfreeSkbFields::from_format(&fmt).unwrap();
        assert_eq!(
            f,
            KfreeSkbFields {
                skbaddr: 8,
                location: 16,
                protocol: 24,
                reason: None
            }
        );
        assert!(parse_reason_symbols(&fmt.print_fmt).is_none());
        let last = fmt.fields.iter().map(|f| f.offset + f.size).max();
        assert_eq!(last, Some(26));
    }

    #[test]
    fn parses_kernel_without_reason() {
        let fmt = parse_format(FORMAT_NO_REASON).unwrap();
        let f = KfreeSkbFields::from_format(&fmt).unwrap();
        assert_eq!(f.reason, None);
        assert!(parse_reason_symbols(&fmt.print_fmt).is_none());
        assert_eq!(&*ReasonTable::unknown_only().label(0), "unknown");
    }

    #[test]
    fn wrong_size_is_an_error() {
        let text = FORMAT_6_18.replace("offset:36;\tsize:4;", "offset:36;\tsize:8;");
        let err = KfreeSkbFields::from_format(&parse_format(&text).unwrap()).unwrap_err();
        assert!(err.to_string().contains("reason"), "{err}");
    }

    #[test]
    fn missing_skbaddr_is_an_error() {
        let text = FORMAT_6_18.replace("skbaddr;", "other;");
        let err = KfreeSkbFields::from_format(&parse_format(&text).unwrap()).unwrap_err();
        assert!(err.to_string().contains("skbaddr"), "{err}");
    }

    #[test]
    fn parses_reason_names() {
        let fmt = parse_format(FORMAT_6_18).unwrap();
        let t = parse_reason_symbols(&fmt.print_fmt).unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(&*t.label(12), "netfilter_drop");
        assert_eq!(&*t.label(3), "no_socket");
        assert_eq!(&*t.label(73), "tc_ingress");
        assert_eq!(&*t.label(999), "reason_999");
        assert_eq!(t.number("NETFILTER_DROP"), Some(12));
        assert_eq!(t.number("SKB_DROP_REASON_TC_INGRESS"), Some(73));
        assert_eq!(t.number("nope"), None);
    }

    #[test]
    fn labels_strip_prefixes() {
        assert_eq!(
            reason_label("SKB_DROP_REASON_NETFILTER_DROP"),
            "netfilter_drop"
        );
        assert_eq!(reason_label("SKB_CONSUMED"), "consumed");
        assert_eq!(reason_label("NO_SOCKET"), "no_socket");
        // Found by the fuzz tests (tracefs/fuzz_tests.rs): labels are fixed points of reason_label.
        assert_eq!(reason_label("SKB_DROP_REASON_\tCSUM"), "csum");
    }

    #[test]
    fn data_loc_field_keeps_its_name() {
        // From net/net_dev_xmit on 6.18; found by the fuzz tests.
        let fmt = parse_format(
            "\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:char comm[16];\toffset:28;\tsize:16;\tsigned:0;\n",
        )
        .unwrap();
        let names: Vec<_> = fmt
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.c_type.as_str()))
            .collect();
        assert_eq!(names, [("name", "__data_loc char[]"), ("comm", "char")]);
    }

    #[test]
    fn bad_field_line_names_the_line() {
        let err = parse_format("format:\n\tfield:;\toffset:x;\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}

#[cfg(test)]
mod fuzz_tests;
