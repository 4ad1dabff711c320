//! What the benchmark reads from the kernel: process CPU and memory from /proc, per-program eBPF
//! run time from `bpftool`, the drop-reason table from tracefs, and the `bpf_stats_enabled`
//! sysctl (switched on only while measured, and always restored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::cmd::{self, cmd};

const TRACING: &str = "/sys/kernel/tracing";
const KFREE_SKB_FORMAT: &str = "/sys/kernel/tracing/events/skb/kfree_skb/format";
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Mounts tracefs when it is missing (the daemon mounts it too, but bpftrace and the reason
/// table below need it first).
pub fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(KFREE_SKB_FORMAT).exists() {
        return Ok(());
    }
    cmd::quiet(&mut cmd("mount", ["-t", "tracefs", "tracefs", TRACING]))
        .context("mounting tracefs")?;
    if !Path::new(KFREE_SKB_FORMAT).exists() {
        bail!("{KFREE_SKB_FORMAT} is missing: this kernel has no skb:kfree_skb tracepoint");
    }
    Ok(())
}

/// The number of drop reason `name` (e.g. `NETFILTER_DROP`) in the running kernel, from the
/// `__print_symbolic` list in the kfree_skb format file. Reason numbers differ between kernels,
/// so this is never hard-coded.
pub fn drop_reason_number(name: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(KFREE_SKB_FORMAT)
        .with_context(|| format!("reading {KFREE_SKB_FORMAT}"))?;
    parse_reason_number(&text, name)
        .with_context(|| format!("no drop reason {name} in the print fmt of {KFREE_SKB_FORMAT}"))
}

/// Finds `{ N, "name" }` in a format file's `print fmt` line.
fn parse_reason_number(format: &str, name: &str) -> Option<u64> {
    let fmt = format.lines().find(|l| l.starts_with("print fmt:"))?;
    let quoted = format!("\"{name}\"");
    let at = fmt.find(&quoted)?;
    let open = fmt[..at].rfind('{')?;
    fmt[open + 1..at]
        .trim()
        .trim_end_matches(',')
        .trim()
        .parse()
        .ok()
}

/// User plus system CPU time of process `pid` (all its threads).
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// utime + stime (fields 14 and 15 of proc(5) `stat`), counted after the `)` that ends the
/// command name, which may itself contain spaces and parentheses.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set size (`VmHWM`) of process `pid`, in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_hwm(&text).with_context(|| format!("no VmHWM in {path}"))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One loaded eBPF program, as `bpftool prog show -j` lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prog {
    /// Program id.
    pub id: u64,
    /// Program type (`tracepoint`, ...).
    pub kind: String,
    /// Program name.
    pub name: String,
    /// Processes holding it, when bpftool knows.
    pub pids: Vec<u32>,
    /// Cumulative run time, when stats are or were enabled.
    pub run_time_ns: u64,
    /// Cumulative runs.
    pub run_cnt: u64,
}

/// Every loaded program.
pub fn progs() -> anyhow::Result<BTreeMap<u64, Prog>> {
    let out = cmd::output(&mut cmd("bpftool", ["prog", "show", "-j"]))?;
    parse_progs(&out).context("parsing `bpftool prog show -j`")
}

fn parse_progs(json: &str) -> anyhow::Result<BTreeMap<u64, Prog>> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    let list = value.as_array().context("not a JSON array")?;
    Ok(list
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()?;
            Some((
                id,
                Prog {
                    id,
                    kind: p["type"].as_str().unwrap_or_default().to_owned(),
                    name: p["name"].as_str().unwrap_or_default().to_owned(),
                    pids: p["pids"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x["pid"].as_u64())
                                .filter_map(|x| u32::try_from(x).ok())
                                .collect()
                        })
                        .unwrap_or_default(),
                    run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                    run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                },
            ))
        })
        .collect())
}

/// The programs an observer loaded: tracepoint programs that were not there before it started,
/// and, when bpftool can tell, that the observer's process holds.
pub fn observer_progs(before: &BTreeSet<u64>, pid: u32) -> anyhow::Result<BTreeSet<u64>> {
    Ok(progs()?
        .into_values()
        .filter(|p| !before.contains(&p.id) && p.kind == "tracepoint")
        .filter(|p| p.pids.is_empty() || p.pids.contains(&pid))
        .map(|p| p.id)
        .collect())
}

/// `(run_time_ns, run_cnt)` summed over `ids`.
pub fn run_stats(ids: &BTreeSet<u64>) -> anyhow::Result<(u64, u64)> {
    let all = progs()?;
    Ok(ids
        .iter()
        .filter_map(|id| all.get(id))
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt)))
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value comes back on drop, panics
/// included. Stats cost every program a clock read per run, so they are on only while the
/// program's own cost is measured, never while throughput is.
pub struct BpfStatsOn {
    previous: String,
}

impl BpfStatsOn {
    /// Switches stats on.
    pub fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStatsOn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "bench: could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// A one-line description of this machine for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let virt = cmd::output(&mut cmd("systemd-detect-virt", Vec::<&str>::new()))
        .map(|s| format!(", virtualization: {}", s.trim()))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}){virt}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_number_from_print_fmt() {
        let fmt = "name: kfree_skb\nformat:\n\tfield:void * skbaddr;\toffset:8;\n\n\
                   print fmt: \"skbaddr=%p reason: %s\", REC->skbaddr, \
                   __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, \
                   { 12, \"NETFILTER_DROP\" }, { 13, \"OTHERHOST\" })\n";
        assert_eq!(parse_reason_number(fmt, "NETFILTER_DROP"), Some(12));
        assert_eq!(parse_reason_number(fmt, "NO_SOCKET"), Some(3));
        assert_eq!(parse_reason_number(fmt, "NETFILTER"), None);
    }

    #[test]
    fn reason_number_of_the_running_kernel_is_found() {
        // Only where tracefs is mounted; the privileged bench needs it anyway.
        if Path::new(KFREE_SKB_FORMAT).exists() {
            assert!(drop_reason_number("NETFILTER_DROP").is_ok());
        }
    }

    #[test]
    fn stat_fields_after_a_tricky_comm() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 8 0 \
                    123 456 789";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(22));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_process_has_cpu_and_rss() {
        let pid = std::process::id();
        assert!(process_cpu(pid).is_ok());
        assert!(peak_rss(pid).unwrap() > 0);
        assert_eq!(
            parse_vm_hwm("VmPeak:\t 1 kB\nVmHWM:\t    2048 kB\n"),
            Some(2 << 20)
        );
    }

    #[test]
    fn bpftool_json() {
        let json = r#"[{"id":7,"type":"tracepoint","name":"kfree_skb","run_time_ns":900,
            "run_cnt":3,"pids":[{"pid":42,"comm":"deny-observer"}]},
            {"id":9,"type":"kprobe","name":"x"}]"#;
        let progs = parse_progs(json).unwrap();
        assert_eq!(progs[&7].pids, vec![42]);
        assert_eq!((progs[&7].run_time_ns, progs[&7].run_cnt), (900, 3));
        assert_eq!(progs[&9].run_cnt, 0);
    }
}
