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

/// CPU time of process `pid`, per thread, to the nanosecond.
///
/// proc(5) `stat` counts in clock ticks (10 ms), too coarse for a daemon that spends a few
/// milliseconds per window; `schedstat` has each thread's time on the CPU in nanoseconds. A
/// thread that ends between two snapshots takes its time with it, so [`CpuSnapshot::since`]
/// says when that happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// Thread id → (thread name, nanoseconds on the CPU).
    pub threads: BTreeMap<u32, (String, u64)>,
}

/// What a process used between two [`CpuSnapshot`]s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuDelta {
    /// Total over the threads alive at the end.
    pub total: Duration,
    /// Per thread name (threads of one name summed), largest first.
    pub by_name: Vec<(String, Duration)>,
    /// Threads of the first snapshot gone by the second: their last stretch is missing.
    pub vanished: usize,
}

impl CpuSnapshot {
    /// Reads every thread of `pid`.
    pub fn take(pid: u32) -> anyhow::Result<Self> {
        let dir = format!("/proc/{pid}/task");
        let mut threads = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let entry = entry.with_context(|| format!("reading {dir}"))?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread may end between the listing and the reads: skip it.
            let Ok(sched) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let Some(ns) = parse_schedstat_ns(&sched) else {
                bail!("unexpected {dir}/{tid}/schedstat: {sched:?}");
            };
            let name = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            threads.insert(tid, (name, ns));
        }
        if threads.is_empty() {
            bail!("{dir} lists no threads");
        }
        Ok(Self { threads })
    }

    /// CPU used since `earlier` (a snapshot of the same process).
    pub fn since(&self, earlier: &Self) -> CpuDelta {
        let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
        for (tid, (name, ns)) in &self.threads {
            let before = earlier.threads.get(tid).map_or(0, |(_, b)| *b);
            *by_name.entry(name).or_default() += ns.saturating_sub(before);
        }
        let total = by_name.values().sum();
        let mut by_name: Vec<(String, Duration)> = by_name
            .into_iter()
            .map(|(n, ns)| (n.to_owned(), Duration::from_nanos(ns)))
            .collect();
        by_name.sort_by_key(|b| std::cmp::Reverse(b.1));
        CpuDelta {
            total: Duration::from_nanos(total),
            by_name,
            vanished: earlier
                .threads
                .keys()
                .filter(|t| !self.threads.contains_key(t))
                .count(),
        }
    }
}

/// The first field of a thread's `schedstat`: nanoseconds spent on the CPU.
fn parse_schedstat_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
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

/// The programs an observer loaded: tracepoint programs (`tracepoint`, or `tracing` for a
/// `tp_btf` program) that were not there before it started, and, when bpftool can tell, that
/// the observer's process holds.
pub fn observer_progs(before: &BTreeSet<u64>, pid: u32) -> anyhow::Result<BTreeSet<u64>> {
    Ok(progs()?
        .into_values()
        .filter(|p| !before.contains(&p.id) && matches!(p.kind.as_str(), "tracepoint" | "tracing"))
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

/// A sysctl file set to a value while alive; the previous value comes back on drop, panics
/// included.
pub struct SysctlGuard {
    path: &'static str,
    previous: String,
}

impl SysctlGuard {
    /// Writes `value` to `path`.
    pub fn set(path: &'static str, value: &str) -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_owned();
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))?;
        Ok(Self { path, previous })
    }

    /// `kernel.bpf_stats_enabled=1`. Stats cost every program a clock read per run, so they
    /// are on only while the program's own cost is measured, never while throughput is.
    pub fn bpf_stats() -> anyhow::Result<Self> {
        Self::set(BPF_STATS_SYSCTL, "1")
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.path, &self.previous) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path, self.previous
            );
        }
    }
}

/// A one-line description of this machine for the report.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpu_identity(&cpuinfo);
    let caches = cpu0_caches();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let virt = cmd::output(&mut cmd("systemd-detect-virt", Vec::<&str>::new()))
        .map(|s| format!(", virtualization: {}", s.trim()))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}{caches}){virt}, Linux {kernel}")
}

/// The first CPU's model name with its family, model and stepping: a VM often shows only
/// "AMD EPYC", and hosts of one name differ (cache sizes, generation), which moves every
/// memory-bound figure of the bench.
fn cpu_identity(cpuinfo: &str) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".to_owned());
    match (field("cpu family"), field("model"), field("stepping")) {
        (Some(f), Some(m), Some(s)) => format!("{name}, family {f} model {m} stepping {s}"),
        _ => name,
    }
}

/// The first CPU's caches as sysfs lists them, e.g. "; L1d 32K, L1i 32K, L2 512K, L3 32768K"
/// (per instance: an L2 is usually one core's), or nothing where sysfs has none.
fn cpu0_caches() -> String {
    let dir = Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut found = Vec::new();
    for i in 0..8 {
        let idx = dir.join(format!("index{i}"));
        let read = |f: &str| std::fs::read_to_string(idx.join(f)).map(|s| s.trim().to_owned());
        let (Ok(level), Ok(kind), Ok(size)) = (read("level"), read("type"), read("size")) else {
            continue;
        };
        let suffix = match kind.as_str() {
            "Data" => "d",
            "Instruction" => "i",
            _ => "",
        };
        found.push(format!("L{level}{suffix} {size}"));
    }
    if found.is_empty() {
        String::new()
    } else {
        format!("; {}", found.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_identity_names_family_model_and_stepping() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n";
        assert_eq!(cpu_identity(info), "AMD EPYC, family 25 model 1 stepping 1");
        assert_eq!(cpu_identity("model name\t: X\n"), "X");
        assert_eq!(cpu_identity(""), "unknown CPU");
    }

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
    fn schedstat_and_deltas() {
        assert_eq!(parse_schedstat_ns("123456789 42 7\n"), Some(123_456_789));
        assert_eq!(parse_schedstat_ns("garbage"), None);
        let snap = |v: &[(u32, &str, u64)]| CpuSnapshot {
            threads: v
                .iter()
                .map(|(t, n, ns)| (*t, ((*n).to_owned(), *ns)))
                .collect(),
        };
        let a = snap(&[
            (1, "main", 100),
            (2, "tokio", 50),
            (3, "tokio", 10),
            (4, "gone", 5),
        ]);
        let b = snap(&[
            (1, "main", 150),
            (2, "tokio", 80),
            (3, "tokio", 30),
            (5, "new", 7),
        ]);
        let d = b.since(&a);
        assert_eq!(d.total, Duration::from_nanos(50 + 30 + 20 + 7));
        assert_eq!(d.vanished, 1);
        assert_eq!(
            d.by_name,
            vec![
                ("main".to_owned(), Duration::from_nanos(50)),
                ("tokio".to_owned(), Duration::from_nanos(50)),
                ("new".to_owned(), Duration::from_nanos(7)),
            ]
        );
    }

    #[test]
    fn own_process_has_cpu_and_rss() {
        let pid = std::process::id();
        let a = CpuSnapshot::take(pid).unwrap();
        // Burn a little CPU so the delta is visibly positive.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i * i));
        }
        // schedstat of a thread on the CPU is brought up to date only at a tick or when it is
        // scheduled out: sleep, so the loop above is in it however short it was.
        std::thread::sleep(Duration::from_millis(2));
        let d = CpuSnapshot::take(pid).unwrap().since(&a);
        assert!(d.total > Duration::ZERO, "{d:?} ({x})");
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
