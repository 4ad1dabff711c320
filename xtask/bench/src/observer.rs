//! The observers under test, as child processes: the deny-observer daemon, the bpftrace
//! one-liner and the kernel-log tailer. All die with the benchmark (PR_SET_PDEATHSIG) and are
//! stopped on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::logtail::{self, Tally};
use super::sys;
use crate::daemon::free_loopback_addr;
use crate::metrics::{self, Metrics};

/// The peer: the minimal bpftrace program on the same hook, counting by reason.
pub const BPFTRACE_PROGRAM: &str = "tracepoint:skb:kfree_skb { @[args->reason] = count(); }";

/// A running observer process.
pub struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
    /// eBPF programs it loaded.
    pub progs: BTreeSet<u64>,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        crate::cmd::die_with_parent(command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", crate::cmd::describe(command)))?;
        Ok(Self {
            child,
            name,
            log,
            progs: BTreeSet::new(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
        Ok(())
    }

    /// Sends `signal` and waits up to `grace` for the exit; then kills. Returns how it ended.
    fn stop(&mut self, signal: i32, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({status}) before it was signalled");
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child, not yet reaped (we own its Child).
            unsafe {
                libc::kill(pid, signal);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("exited ({status}) after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!(
            "killed: no exit within {} s of signal {signal}",
            grace.as_secs()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(libc::SIGTERM, Duration::from_secs(5));
    }
}

/// `deny-observer run` on a loopback metrics port.
pub struct Daemon {
    /// The process.
    pub proc: Proc,
    /// Its metrics address.
    pub addr: SocketAddr,
}

/// Sizes of the daemon's kernel maps (its defaults when `None`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MapSizes {
    /// `--flow-map-entries`.
    pub flow_map_entries: Option<u32>,
    /// `--ringbuf-bytes`.
    pub ringbuf_bytes: Option<u32>,
    /// `--drop-log-records` (0 turns the drop cache off: every drop goes to the flow map).
    pub drop_log_records: Option<u32>,
}

impl Daemon {
    /// Starts the daemon and waits for `/readyz`.
    pub fn start(
        bin: &Path,
        inventory: &Path,
        sizes: MapSizes,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let before: BTreeSet<u64> = sys::progs()?.into_keys().collect();
        let addr = free_loopback_addr().context("picking a metrics port")?;
        let mut c = Command::new(bin);
        c.arg("run")
            .arg("--inventory")
            .arg(inventory)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        if let Some(n) = sizes.flow_map_entries {
            c.arg("--flow-map-entries").arg(n.to_string());
        }
        if let Some(n) = sizes.ringbuf_bytes {
            c.arg("--ringbuf-bytes").arg(n.to_string());
        }
        if let Some(n) = sizes.drop_log_records {
            c.arg("--drop-log-records").arg(n.to_string());
        }
        let mut proc = Proc::spawn("deny-observer", &mut c, log)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            proc.check_alive()?;
            if metrics::http_get(addr, "/readyz").is_ok_and(|r| r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "deny-observer not ready at http://{addr}/readyz after 60 s:\n{}",
                    proc.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        proc.progs = sys::observer_progs(&before, proc.pid())?;
        if proc.progs.is_empty() {
            bail!("deny-observer is ready but no new tracepoint program of its process is loaded");
        }
        Ok(Self { proc, addr })
    }

    /// Scrapes `/metrics`; also returns the size of the body in bytes.
    pub fn scrape(&mut self) -> anyhow::Result<(Metrics, usize)> {
        self.proc.check_alive()?;
        let resp = metrics::http_get(self.addr, "/metrics")?;
        if resp.status != 200 {
            bail!("GET http://{}/metrics: status {}", self.addr, resp.status);
        }
        Ok((Metrics::parse(&resp.body), resp.body.len()))
    }
}

/// The bpftrace one-liner.
pub struct Bpftrace {
    /// The process.
    pub proc: Proc,
}

impl Bpftrace {
    /// Starts bpftrace and waits until it has attached.
    pub fn start(log: PathBuf) -> anyhow::Result<Self> {
        let before: BTreeSet<u64> = sys::progs()?.into_keys().collect();
        let mut proc = Proc::spawn(
            "bpftrace",
            Command::new("bpftrace").args(["-e", BPFTRACE_PROGRAM]),
            log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // bpftrace prints "Attaching N probe(s)..." and attaches right after: wait for the line
        // and for its program to be loaded, then give the attach a moment.
        loop {
            proc.check_alive()?;
            if proc.output().contains("Attaching") {
                proc.progs = sys::observer_progs(&before, proc.pid())?;
                if !proc.progs.is_empty() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("bpftrace did not attach within 60 s:\n{}", proc.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { proc })
    }

    /// Stops bpftrace (SIGINT, as Ctrl-C) and returns its map: reason number → count.
    pub fn finish(mut self) -> anyhow::Result<BTreeMap<u64, u64>> {
        // It prints its maps on the way out; on a loaded 2-core machine that has taken over 20 s.
        let ended = self.proc.stop(libc::SIGINT, Duration::from_secs(60));
        let out = self.proc.output();
        let counts = parse_bpftrace_counts(&out);
        if counts.is_empty() {
            bail!("bpftrace printed no counts; it {ended}; its output:\n{out}");
        }
        Ok(counts)
    }
}

/// The kernel-log tailer (`cargo xtask log-tail`, this very binary), in the style of
/// kube-iptables-tailer.
pub struct LogTailer {
    /// The process.
    pub proc: Proc,
}

impl LogTailer {
    /// Starts the tailer and waits until it reads the kernel log.
    pub fn start(log: PathBuf) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        let mut proc = Proc::spawn(
            "log-tail",
            Command::new(exe).args(["log-tail", "--prefix", logtail::LOG_PREFIX]),
            log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !proc.output().contains(logtail::READY_LINE) {
            proc.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "log-tail not reading the kernel log within 20 s:\n{}",
                    proc.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { proc })
    }

    /// Stops the tailer (SIGINT; it drains what is left first) and returns its counts.
    pub fn finish(mut self) -> anyhow::Result<Tally> {
        let ended = self.proc.stop(libc::SIGINT, Duration::from_secs(20));
        let out = self.proc.output();
        Tally::parse(&out)
            .with_context(|| format!("reading log-tail's counts; it {ended}; its output:\n{out}"))
    }
}

/// Parses bpftrace's exit dump, lines of the form `@[12]: 3087658`.
fn parse_bpftrace_counts(out: &str) -> BTreeMap<u64, u64> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("@[")?;
            let (key, value) = l.split_once("]:")?;
            Some((key.trim().parse().ok()?, value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftrace_dump() {
        let out = "Attaching 1 probe...\n\n\n@[4]: 1\n@[2]: 570\n@[12]: 3087658\nnoise\n";
        let m = parse_bpftrace_counts(out);
        assert_eq!(m.len(), 3);
        assert_eq!(m[&12], 3_087_658);
        assert_eq!(m[&2], 570);
    }
}
