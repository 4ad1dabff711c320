//! Drop reasons on kernels that have none (before 5.17: 5.10, 5.15): the `location` the
//! tracepoint reports is the caller of `kfree_skb`, and for the callers below the caller says
//! why the packet was dropped. Userspace resolves their address ranges from `/proc/kallsyms` at
//! load time into a [`LocationTable`] the kernel program searches per drop.
//!
//! The precision is the calling function: a function that frees packets for more than one
//! cause gets one reason for all of them, so only functions whose `kfree_skb` calls are (nearly)
//! all drops of one kind are listed. Everything else is `not_specified`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use observer_ebpf::{LocationRange, LocationTable};

use super::tracefs::ReasonTable;

/// Where the kernel's symbols are read.
pub const KALLSYMS: &str = "/proc/kallsyms";

/// Label of drops whose caller is in no entry of [`CALL_SITES`].
pub const UNMAPPED: &str = "not_specified";

/// The mapping: kernel function → the reason label newer kernels give the drops it makes.
/// Checked on Debian 11's 5.10 kernel by `cargo xtask kernels` (nft and tc drops).
///
/// - `nf_hook_slow`: a netfilter hook returned `NF_DROP` (iptables, nftables).
/// - `sch_handle_ingress`, `sch_handle_egress`: a tc classifier (an eBPF dataplane's cls_bpf
///   program) returned `TC_ACT_SHOT`. Both are `static inline` in net/core/dev.c; where the
///   compiler inlined them their `kfree_skb` call sits in `__netif_receive_skb_core` and
///   `__dev_queue_xmit`, which is what 5.10's location shows (see below).
/// - `__dev_queue_xmit`: its only direct `kfree_skb` is the tc egress drop (the other
///   failures free through `kfree_skb_list`, a different caller).
/// - `__netif_receive_skb_core`: the tc ingress drop, and also a frame no protocol handler
///   takes (an unknown ethertype, counted in the device's `rx_nohandler`/`rx_dropped`); those
///   are rare on a pod network and cannot be told apart by caller.
/// - `ip_finish_output`, `ip6_finish_output`: their only `kfree_skb` is a cgroup eBPF egress
///   program's deny.
pub const CALL_SITES: &[(&str, &str)] = &[
    ("nf_hook_slow", "netfilter_drop"),
    ("sch_handle_ingress", "tc_ingress"),
    ("__netif_receive_skb_core", "tc_ingress"),
    ("sch_handle_egress", "tc_egress"),
    ("__dev_queue_xmit", "tc_egress"),
    ("ip_finish_output", "bpf_cgroup_egress"),
    ("ip6_finish_output", "bpf_cgroup_egress"),
];

/// Where the drop reasons of a [`super::Capture`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonSource {
    /// The kernel's own `skb_drop_reason` (5.17 and later).
    Kernel,
    /// The caller of `kfree_skb`, through [`CALL_SITES`] and `/proc/kallsyms`; `functions`
    /// address ranges were found.
    CallSite {
        /// Address ranges in the program's table.
        functions: u32,
    },
    /// Neither: the kernel has no drop reasons and its symbols could not be read, so every
    /// drop is `not_specified`.
    Unavailable,
}

impl ReasonSource {
    /// Short name for logs and tests: `kernel`, `call_site` or `unavailable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::CallSite { .. } => "call_site",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// The symbol file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Every address is zero: the kernel hides them from this process.
    #[error(
        "{path} shows only zero addresses (kernel.kptr_restrict={kptr_restrict}): reading them \
         needs CAP_SYSLOG (or kptr_restrict=0 with perf_event_paranoid<=1)"
    )]
    Hidden {
        /// The file.
        path: PathBuf,
        /// `/proc/sys/kernel/kptr_restrict`, or `?` if unreadable.
        kptr_restrict: String,
    },
}

/// The reason table of a kernel without drop reasons: `not_specified` is 0, then the labels of
/// [`CALL_SITES`] in order of first appearance. The `--reasons` filter names these labels, as
/// on newer kernels.
pub fn reason_table() -> ReasonTable {
    let mut labels: Vec<&str> = vec![UNMAPPED];
    for (_, label) in CALL_SITES {
        if !labels.contains(label) {
            labels.push(label);
        }
    }
    ReasonTable::from_kernel_names((0u32..).zip(labels))
}

/// A symbol line of `/proc/kallsyms`: `ffffffff81a2b3c0 T nf_hook_slow` (modules add
/// `\t[module]`). Lines that do not parse are skipped.
fn parse_line(line: &str) -> Option<(u64, &str)> {
    let mut it = line.split_whitespace();
    let addr = u64::from_str_radix(it.next()?, 16).ok()?;
    let _kind = it.next()?;
    Some((addr, it.next()?))
}

/// Whether kallsyms name `sym` is function `func` or a part the compiler split off it
/// (`func.cold`, `func.isra.0`, `func.constprop.0`).
fn is_part_of(sym: &str, func: &str) -> bool {
    sym.strip_prefix(func)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Builds the program's table from the text of `/proc/kallsyms`, with reason numbers from
/// `reasons` (see [`reason_table`]). A function ends where the next symbol starts. At most
/// [`observer_ebpf::LOCATION_RANGES_MAX`] ranges are used; the rest are reported as unmapped names.
pub fn location_table(
    kallsyms: &str,
    reasons: &ReasonTable,
) -> Result<(LocationTable, Vec<String>), LocationError> {
    let mut addrs: Vec<u64> = Vec::new();
    let mut hits: Vec<(u64, &str, &str)> = Vec::new();
    for (addr, name) in kallsyms.lines().filter_map(parse_line) {
        addrs.push(addr);
        if let Some((_, label)) = CALL_SITES.iter().find(|(f, _)| is_part_of(name, f)) {
            hits.push((addr, name, label));
        }
    }
    if !addrs.is_empty() && addrs.iter().all(|a| *a == 0) {
        let kptr_restrict = std::fs::read_to_string("/proc/sys/kernel/kptr_restrict")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        return Err(LocationError::Hidden {
            path: PathBuf::from(KALLSYMS),
            kptr_restrict,
        });
    }
    addrs.sort_unstable();
    addrs.dedup();
    hits.sort_unstable();
    hits.dedup_by_key(|h| h.0);
    let unmapped = reasons.number(UNMAPPED).unwrap_or(0);
    let mut table = LocationTable {
        unmapped,
        ..LocationTable::EMPTY
    };
    let mut left_out = Vec::new();
    let mut used = 0usize;
    for (start, name, label) in hits {
        let Some(reason) = reasons.number(label) else {
            continue;
        };
        // The function's end: the next symbol's start.
        let end = match addrs.binary_search(&start) {
            Ok(i) | Err(i) => addrs.get(i + 1).copied(),
        };
        let Some(end) = end.filter(|e| *e > start) else {
            continue;
        };
        match table.ranges.get_mut(used) {
            Some(slot) => {
                *slot = LocationRange {
                    start,
                    end,
                    reason,
                    _pad: 0,
                };
                used += 1;
            }
            None => left_out.push(name.to_owned()),
        }
    }
    table.len = u32::try_from(used).unwrap_or(0);
    Ok((table, left_out))
}

/// Reads `path` (normally [`KALLSYMS`]) and builds the table.
pub fn load_location_table(
    path: &Path,
    reasons: &ReasonTable,
) -> Result<(LocationTable, Vec<String>), LocationError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocationError::Read {
        path: path.to_owned(),
        source,
    })?;
    location_table(&text, reasons)
}

/// The functions of `table` by reason label, for the start-up log.
pub fn describe(table: &LocationTable, reasons: &ReasonTable) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in table.ranges.iter().take(table.len as usize) {
        *out.entry(reasons.label(r.reason).to_string()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use observer_ebpf::LOCATION_RANGES_MAX;

    const KALLSYMS_5_10: &str = "\
ffffffff81000000 T _stext
ffffffff8181a0f0 T __netif_receive_skb_core
ffffffff8181b060 t __netif_receive_skb_one_core
ffffffff8181c880 T __dev_queue_xmit
ffffffff8181d2e0 T dev_queue_xmit
ffffffff818a5e40 T nf_hook_slow
ffffffff818a5f00 T nf_hook_slow_list
ffffffff818f0000 t ip_finish_output
ffffffff818f0100 t __ip_finish_output
ffffffff81a00000 t nf_hook_slow.cold
ffffffff81a00040 t something_else.cold
ffffffffc0a01000 t cls_bpf_classify\t[cls_bpf]
";

    #[test]
    fn reason_numbers_are_stable_and_filterable() {
        let t = reason_table();
        assert_eq!(&*t.label(0), "not_specified");
        assert_eq!(t.number("netfilter_drop"), Some(1));
        assert_eq!(t.number("TC_INGRESS"), Some(2));
        assert_eq!(t.number("tc_egress"), Some(3));
        assert_eq!(t.number("bpf_cgroup_egress"), Some(4));
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn functions_become_ranges_up_to_the_next_symbol() {
        let reasons = reason_table();
        let (t, left_out) = location_table(KALLSYMS_5_10, &reasons).unwrap();
        assert!(left_out.is_empty());
        assert_eq!(t.unmapped, 0);
        let ranges: Vec<_> = t.ranges[..t.len as usize]
            .iter()
            .map(|r| (r.start, r.end, reasons.label(r.reason).to_string()))
            .collect();
        assert_eq!(
            ranges,
            [
                (0xffffffff8181a0f0, 0xffffffff8181b060, "tc_ingress".into()),
                (0xffffffff8181c880, 0xffffffff8181d2e0, "tc_egress".into()),
                (
                    0xffffffff818a5e40,
                    0xffffffff818a5f00,
                    "netfilter_drop".into()
                ),
                (
                    0xffffffff818f0000,
                    0xffffffff818f0100,
                    "bpf_cgroup_egress".into()
                ),
                // The compiler's cold part of nf_hook_slow, but not nf_hook_slow_list.
                (
                    0xffffffff81a00000,
                    0xffffffff81a00040,
                    "netfilter_drop".into()
                ),
            ]
        );
        let by_reason = describe(&t, &reasons);
        assert_eq!(by_reason["netfilter_drop"], 2);
    }

    #[test]
    fn hidden_addresses_are_an_error_that_names_the_capability() {
        let hidden = "0000000000000000 T nf_hook_slow\n0000000000000000 T dev_queue_xmit\n";
        let err = location_table(hidden, &reason_table()).unwrap_err();
        assert!(err.to_string().contains("CAP_SYSLOG"), "{err}");
    }

    #[test]
    fn too_many_ranges_are_reported_not_dropped_silently() {
        let mut text = String::new();
        for i in 0..(LOCATION_RANGES_MAX as u64 + 3) {
            text.push_str(&format!(
                "{:x} t nf_hook_slow.part.{i}\n",
                0x1000 + i * 0x100
            ));
        }
        text.push_str("ffff0000 T _etext\n");
        let (t, left_out) = location_table(&text, &reason_table()).unwrap();
        assert_eq!(t.len as usize, LOCATION_RANGES_MAX);
        assert_eq!(left_out.len(), 3);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let (t, _) = location_table("not a symbol\n\nzz T x\n", &reason_table()).unwrap();
        assert_eq!(t.len, 0);
    }
}
