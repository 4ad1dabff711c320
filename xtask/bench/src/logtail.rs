//! Configuration 4 of the benchmark: an iptables-`LOG`-plus-log-tailing pipeline in the style
//! of kube-iptables-tailer.
//!
//! kube-iptables-tailer's README ("Setup iptables Log Prefix", github.com/box/kube-iptables-tailer)
//! has the drop chain log every packet with `iptables -A CHAIN -j LOG --log-prefix "PREFIX: "`,
//! with no `-m limit`, and the tailer follows the kernel log that syslog/journald write out,
//! keeping the lines with that exact prefix and reading `SRC=`, `DST=`, `DPT=` from them. The
//! bench's ruleset is nftables, where iptables-translate turns `-j LOG --log-prefix "P"` into a
//! `log prefix "P"` statement (iptables' extensions/libipt_LOG.txlate); it goes into the
//! destination's drop rule, before the counter and the `drop`, only while this configuration
//! runs ([`LogRule`]).
//!
//! This machine runs no syslog daemon or journald: LOG lines land only in the kernel's printk
//! ring buffer (128 KiB here, CONFIG_LOG_BUF_SHIFT=17), which syslog daemons read through
//! `/dev/kmsg` themselves. So the tailer reads `/dev/kmsg`, the source every such pipeline
//! starts from. Each record there carries a sequence number: a jump in it, or a read failing
//! with EPIPE, means records were overwritten before the tailer got to them, which is how the
//! loss is counted. The kernel's LOG backend (nf_log_syslog) does not rate-limit, but other
//! printk users say "N callbacks suppressed"; those lines are summed too.
//!
//! The tailer is a separate process (`cargo xtask log-tail`, hidden), spawned by the bench
//! like bpftrace; on SIGINT or SIGTERM it drains what is left, prints its counts and exits.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::sys::SysctlGuard;
use crate::cmd::{self, cmd};
use crate::simnode::{INGRESS_DROP_COUNTER, NFT_TABLE, PodId, SimNode};

/// The log prefix of the bench's LOG statement (kube-iptables-tailer matches it exactly).
pub const LOG_PREFIX: &str = "deny-observer-bench: ";
/// The kernel log, one record per `read`.
const KMSG: &str = "/dev/kmsg";
/// Logging from network namespaces other than the initial one is off unless this is 1
/// (nf_log_syslog's `nf_log_allowed`). In a cluster the CNI's LOG rules sit in the host
/// namespace and do not need it; the simulated node enforces inside the pod's namespace.
const NF_LOG_ALL_NETNS: &str = "/proc/sys/net/netfilter/nf_log_all_netns";
/// What the tailer writes to the kernel log at start, to find where it begins reading.
const START_MARKER: &str = "deny-observer log-tail: reading from here";
/// The line the tailer prints once it reads the log (the bench waits for it).
pub const READY_LINE: &str = "log-tail: ready";
/// At the end, keep draining records for at most this long (a flood may still be running).
const FINAL_DRAIN: Duration = Duration::from_secs(2);

/// `cargo xtask log-tail` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Count kernel log lines that start with this prefix.
    #[arg(long, default_value = LOG_PREFIX)]
    pub prefix: String,
}

/// The protocol as the LOG line names it (`PROTO=`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// Anything else, as printed (`ICMP`, `ICMPv6`, `SCTP`, or a protocol number).
    Other(String),
}

impl Proto {
    fn parse(s: &str) -> Self {
        match s {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            other => Self::Other(other.to_owned()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Other(s) => s,
        }
    }
}

/// What a drop is counted by: source, destination, protocol and destination port (none for
/// protocols without ports).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// `SRC=`.
    pub src: IpAddr,
    /// `DST=`.
    pub dst: IpAddr,
    /// `PROTO=`.
    pub proto: Proto,
    /// `DPT=`.
    pub dport: Option<u16>,
}

/// One `/dev/kmsg` record: `prio,seq,usec,flags[,...];message`, then continuation lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KmsgRecord<'a> {
    /// Sequence number (consecutive; a gap means overwritten records).
    pub seq: u64,
    /// The message (first line only).
    pub message: &'a str,
}

/// Parses a `/dev/kmsg` record (see the kernel's Documentation/ABI/testing/dev-kmsg).
pub fn parse_kmsg_record(raw: &str) -> Option<KmsgRecord<'_>> {
    let (header, rest) = raw.split_once(';')?;
    let seq = header.split(',').nth(1)?.parse().ok()?;
    let message = rest.split('\n').next().unwrap_or_default();
    Some(KmsgRecord { seq, message })
}

/// What a kernel log message is to the tailer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogLine {
    /// Not a LOG line with the prefix.
    Other,
    /// A LOG line with the prefix, without the fields a drop is counted by.
    Unparsed,
    /// A LOG line with the prefix.
    Drop(FlowKey),
}

/// Classifies `message` (a record's text) against `prefix`. Fields are `KEY=VALUE` words; the
/// first of each counts (a UDP line has the IP `LEN=` and then the UDP one).
pub fn parse_log_line(message: &str, prefix: &str) -> LogLine {
    let Some(fields) = message.strip_prefix(prefix) else {
        return LogLine::Other;
    };
    let (mut src, mut dst, mut proto, mut dport) = (None, None, None, None);
    for word in fields.split_ascii_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "SRC" if src.is_none() => src = v.parse::<IpAddr>().ok(),
            "DST" if dst.is_none() => dst = v.parse::<IpAddr>().ok(),
            "PROTO" if proto.is_none() => proto = Some(Proto::parse(v)),
            "DPT" if dport.is_none() => dport = v.parse::<u16>().ok(),
            _ => {}
        }
    }
    match (src, dst, proto) {
        (Some(src), Some(dst), Some(proto)) => LogLine::Drop(FlowKey {
            src,
            dst,
            proto,
            dport,
        }),
        _ => LogLine::Unparsed,
    }
}

/// `N` from "...: N callbacks suppressed" (printk_ratelimited and net_ratelimit say so when
/// they resume).
pub fn callbacks_suppressed(message: &str) -> Option<u64> {
    let head = message.strip_suffix(" callbacks suppressed")?;
    head.rsplit(' ').next()?.parse().ok()
}

/// What the tailer counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Drops per flow.
    pub flows: HashMap<FlowKey, u64>,
    /// Records read (any source).
    pub records: u64,
    /// Prefixed lines counted into [`Tally::flows`].
    pub matched: u64,
    /// Prefixed lines without source, destination or protocol.
    pub unparsed: u64,
    /// Records skipped by the sequence numbers: overwritten before they were read (any source).
    pub lost_records: u64,
    /// Reads that failed with EPIPE (the reader had been overtaken).
    pub overruns: u64,
    /// Sum of "N callbacks suppressed".
    pub suppressed: u64,
    /// Records that are not `/dev/kmsg` records.
    pub malformed: u64,
    last_seq: Option<u64>,
}

impl Tally {
    /// Accounts for one raw record.
    pub fn record(&mut self, raw: &str, prefix: &str) {
        let Some(rec) = parse_kmsg_record(raw) else {
            self.malformed += 1;
            return;
        };
        self.records += 1;
        if let Some(last) = self.last_seq
            && rec.seq > last + 1
        {
            self.lost_records += rec.seq - last - 1;
        }
        self.last_seq = Some(self.last_seq.map_or(rec.seq, |l| l.max(rec.seq)));
        match parse_log_line(rec.message, prefix) {
            LogLine::Drop(key) => {
                self.matched += 1;
                *self.flows.entry(key).or_default() += 1;
            }
            LogLine::Unparsed => self.unparsed += 1,
            LogLine::Other => {
                if let Some(n) = callbacks_suppressed(rec.message) {
                    self.suppressed += n;
                }
            }
        }
    }

    /// Drops counted from `src` to `dst`, any protocol and port.
    pub fn between(&self, src: IpAddr, dst: IpAddr) -> u64 {
        self.flows
            .iter()
            .filter(|(k, _)| k.src == src && k.dst == dst)
            .map(|(_, n)| n)
            .sum()
    }

    /// The tailer's final output: a summary line, then one line per flow.
    pub fn render(&self) -> String {
        let mut o = format!(
            "log-tail: records={} matched={} unparsed={} lost_records={} overruns={} suppressed={} malformed={}\n",
            self.records,
            self.matched,
            self.unparsed,
            self.lost_records,
            self.overruns,
            self.suppressed,
            self.malformed
        );
        let mut flows: Vec<_> = self.flows.iter().collect();
        flows.sort();
        for (k, n) in flows {
            let _ = writeln!(
                o,
                "flow src={} dst={} proto={} dport={} count={n}",
                k.src,
                k.dst,
                k.proto.as_str(),
                k.dport.map_or("-".into(), |p| p.to_string())
            );
        }
        o
    }

    /// Parses [`Tally::render`]'s output out of the tailer's log (other lines are skipped).
    pub fn parse(out: &str) -> anyhow::Result<Self> {
        let mut tally = Self::default();
        let mut summary = false;
        for line in out.lines() {
            if let Some(rest) = line
                .strip_prefix("log-tail: ")
                .filter(|r| r.starts_with("records="))
            {
                let kv = key_values(rest);
                let get = |k: &str| -> anyhow::Result<u64> {
                    kv.get(k)
                        .with_context(|| format!("no {k}= in {line:?}"))?
                        .parse()
                        .with_context(|| format!("bad {k}= in {line:?}"))
                };
                tally.records = get("records")?;
                tally.matched = get("matched")?;
                tally.unparsed = get("unparsed")?;
                tally.lost_records = get("lost_records")?;
                tally.overruns = get("overruns")?;
                tally.suppressed = get("suppressed")?;
                tally.malformed = get("malformed")?;
                summary = true;
            } else if let Some(rest) = line.strip_prefix("flow ") {
                let kv = key_values(rest);
                let field = |k: &str| kv.get(k).with_context(|| format!("no {k}= in {line:?}"));
                let key = FlowKey {
                    src: field("src")?.parse().with_context(|| line.to_owned())?,
                    dst: field("dst")?.parse().with_context(|| line.to_owned())?,
                    proto: Proto::parse(field("proto")?),
                    dport: match *field("dport")? {
                        "-" => None,
                        p => Some(p.parse().with_context(|| line.to_owned())?),
                    },
                };
                let n: u64 = field("count")?.parse().with_context(|| line.to_owned())?;
                *tally.flows.entry(key).or_default() += n;
            }
        }
        if !summary {
            bail!("no `log-tail: records=...` summary line");
        }
        let sum: u64 = tally.flows.values().sum();
        if sum != tally.matched {
            bail!(
                "flow lines sum to {sum}, the summary says matched={}",
                tally.matched
            );
        }
        Ok(tally)
    }
}

fn key_values(s: &str) -> HashMap<&str, &str> {
    s.split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_stop_handler() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe). No SA_RESTART, so a
        // blocked poll returns EINTR and the loop sees the flag.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({signal}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits up to `timeout` for `fd` to be readable (or a signal).
fn wait_readable(fd: i32, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, ms);
    }
}

/// `cargo xtask log-tail`: follows `/dev/kmsg` from now on, counting LOG lines with the prefix
/// per flow, until SIGINT or SIGTERM; then prints [`Tally::render`] on stdout.
pub fn tail(args: &TailArgs) -> anyhow::Result<()> {
    install_stop_handler()?;
    let tally = follow(&args.prefix, &STOP, || println!("{READY_LINE}"))?;
    print!("{}", tally.render());
    std::io::stdout().flush().context("writing the counts")?;
    Ok(())
}

/// Follows `/dev/kmsg` from now on, counting the lines with `prefix`, until `stop` is set;
/// then drains what is left (for at most [`FINAL_DRAIN`]). Calls `ready` once it reads the
/// log.
pub fn follow(prefix: &str, stop: &AtomicBool, ready: impl FnOnce()) -> anyhow::Result<Tally> {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(KMSG)
        .with_context(|| format!("opening {KMSG}"))?;
    let fd = kmsg.as_raw_fd();
    // SAFETY: lseek on our own open descriptor; SEEK_END on /dev/kmsg moves the reader past
    // the last record, so earlier runs' lines are not counted.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_END) } < 0 {
        bail!(
            "seeking to the end of {KMSG}: {}",
            std::io::Error::last_os_error()
        );
    }
    // The marker's own record fixes the first sequence number: every later gap is a loss. It
    // must end in a newline: printk keeps a record without one open for continuation, and
    // readers do not see it until some other message closes it.
    kmsg.write_all(format!("<6>{START_MARKER} (pid {})\n", std::process::id()).as_bytes())
        .with_context(|| format!("writing the start marker to {KMSG}"))?;
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut ready = Some(ready);
    let mut drain_deadline: Option<Instant> = None;
    let started = Instant::now();
    loop {
        if drain_deadline.is_none() && stop.load(Ordering::Relaxed) {
            drain_deadline = Some(Instant::now() + FINAL_DRAIN);
        }
        if drain_deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        if ready.is_some() && started.elapsed() > Duration::from_secs(10) {
            bail!("did not read back the start marker from {KMSG} within 10 s");
        }
        match kmsg.read(&mut buf) {
            Ok(0) => wait_readable(fd, Duration::from_millis(200)),
            Ok(n) => {
                let raw = String::from_utf8_lossy(&buf[..n]);
                if ready.is_some()
                    && raw.contains(START_MARKER)
                    && let Some(f) = ready.take()
                {
                    f();
                }
                tally.record(&raw, prefix);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if drain_deadline.is_some() {
                    break;
                }
                wait_readable(fd, Duration::from_millis(200));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => tally.overruns += 1,
            Err(e) => return Err(e).with_context(|| format!("reading {KMSG}")),
        }
    }
    Ok(tally)
}

/// `net.netfilter.nf_log_all_netns=1` while alive (the kernel writes LOG lines from network
/// namespaces other than the host's only then); the previous value comes back on drop.
pub fn nf_log_all_netns() -> anyhow::Result<SysctlGuard> {
    SysctlGuard::set(NF_LOG_ALL_NETNS, "1")
}

/// The LOG statement in a pod's ingress drop rule, while alive: the rule becomes
/// `log prefix "<LOG_PREFIX>" counter name "ingress_drop" drop` (same handle, same named
/// counter, so the truth keeps counting), and goes back to `counter ... drop` on drop.
pub struct LogRule<'a> {
    node: &'a SimNode,
    pod: PodId,
    handle: u64,
}

impl<'a> LogRule<'a> {
    /// Adds the LOG statement to pod `pod`'s ingress drop rule.
    pub fn install(node: &'a SimNode, pod: PodId) -> anyhow::Result<Self> {
        let netns = node.pod(pod)?.netns.clone();
        let out = cmd::output(&mut cmd(
            "ip",
            [
                "netns", "exec", &netns, "nft", "-j", "-a", "list", "chain", "inet", NFT_TABLE,
                "ingress",
            ],
        ))?;
        let handle = drop_rule_handle(&out).with_context(|| {
            format!("no `counter {INGRESS_DROP_COUNTER} drop` rule in netns {netns}: {out}")
        })?;
        let guard = Self { node, pod, handle };
        guard.replace(Some(LOG_PREFIX))?;
        Ok(guard)
    }

    fn replace(&self, log_prefix: Option<&str>) -> anyhow::Result<()> {
        let log = log_prefix.map_or(String::new(), |p| format!("log prefix \"{p}\" "));
        let script = format!(
            "replace rule inet {NFT_TABLE} ingress handle {} {log}counter name \"{INGRESS_DROP_COUNTER}\" drop\n",
            self.handle
        );
        self.node.nft(self.pod, &script)?;
        Ok(())
    }
}

impl Drop for LogRule<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.replace(None) {
            eprintln!("bench: could not take the LOG statement out of the drop rule: {e:#}");
        }
    }
}

/// The handle of the rule `counter name "ingress_drop" drop` in `nft -j -a list chain` output.
fn drop_rule_handle(json: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value["nftables"].as_array()?.iter().find_map(|item| {
        let rule = item.get("rule")?;
        let expr = rule["expr"].as_array()?;
        let counts = expr
            .iter()
            .any(|e| e["counter"].as_str() == Some(INGRESS_DROP_COUNTER));
        let drops = expr.iter().any(|e| e.get("drop").is_some());
        (counts && drops).then(|| rule["handle"].as_u64())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on this kind of machine (Linux 6.18): `log prefix "deny-observer-bench: "` in
    // the input hook of a test netns's drop rule, one UDP datagram and one SYN sent from a
    // peer netns over a veth, read from /dev/kmsg.
    const UDP_RECORD: &str = "4,3960,14808038290,-;deny-observer-bench: IN=lt32670y OUT= MAC=92:1c:f0:cc:45:37:be:4b:bb:62:7d:ef:08:00 SRC=10.231.0.1 DST=10.231.0.2 LEN=29 TOS=0x00 PREC=0x00 TTL=64 ID=10053 DF PROTO=UDP SPT=55483 DPT=10000 LEN=9 \n";
    const SYN_RECORD: &str = "4,3961,14808038336,-;deny-observer-bench: IN=lt32670y OUT= MAC=92:1c:f0:cc:45:37:be:4b:bb:62:7d:ef:08:00 SRC=10.231.0.1 DST=10.231.0.2 LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID=13650 DF PROTO=TCP SPT=42592 DPT=10001 WINDOW=64240 RES=0x00 SYN URGP=0 \n";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn kmsg_records() {
        let r = parse_kmsg_record(UDP_RECORD).unwrap();
        assert_eq!(r.seq, 3960);
        assert!(r.message.starts_with(LOG_PREFIX));
        assert!(r.message.ends_with("DPT=10000 LEN=9 "));
        // Continuation lines (dictionary) are not part of the message.
        let r = parse_kmsg_record("6,7,8,-,caller=T1;hello\n SUBSYSTEM=net\n").unwrap();
        assert_eq!((r.seq, r.message), (7, "hello"));
        assert_eq!(parse_kmsg_record("no header"), None);
        assert_eq!(parse_kmsg_record("4,x,1,-;msg"), None);
    }

    #[test]
    fn log_lines_from_this_kernel() {
        let udp = parse_kmsg_record(UDP_RECORD).unwrap().message;
        assert_eq!(
            parse_log_line(udp, LOG_PREFIX),
            LogLine::Drop(FlowKey {
                src: ip("10.231.0.1"),
                dst: ip("10.231.0.2"),
                proto: Proto::Udp,
                dport: Some(10000),
            })
        );
        let syn = parse_kmsg_record(SYN_RECORD).unwrap().message;
        assert_eq!(
            parse_log_line(syn, LOG_PREFIX),
            LogLine::Drop(FlowKey {
                src: ip("10.231.0.1"),
                dst: ip("10.231.0.2"),
                proto: Proto::Tcp,
                dport: Some(10001),
            })
        );
        // Another prefix is someone else's.
        assert_eq!(parse_log_line(udp, "calico-drop: "), LogLine::Other);
        // IPv6 and port-less protocols.
        let v6 = "deny-observer-bench: IN=eth0 OUT= SRC=fd00::1 DST=fd00::2 LEN=104 TC=0 HOPLIMIT=64 FLOWLBL=1 PROTO=ICMPv6 TYPE=128 CODE=0 ID=1 SEQ=1 ";
        assert_eq!(
            parse_log_line(v6, LOG_PREFIX),
            LogLine::Drop(FlowKey {
                src: ip("fd00::1"),
                dst: ip("fd00::2"),
                proto: Proto::Other("ICMPv6".into()),
                dport: None,
            })
        );
        // A truncated line is counted as unparsed, not as a drop.
        assert_eq!(
            parse_log_line("deny-observer-bench: IN=eth0 OUT= SRC=10.0.0.1", LOG_PREFIX),
            LogLine::Unparsed
        );
        assert_eq!(
            callbacks_suppressed("net_ratelimit: 1234 callbacks suppressed"),
            Some(1234)
        );
        assert_eq!(
            callbacks_suppressed("nf_conntrack: 7 callbacks suppressed"),
            Some(7)
        );
        assert_eq!(callbacks_suppressed(udp), None);
    }

    #[test]
    fn tally_counts_flows_gaps_and_suppressions() {
        let mut t = Tally::default();
        t.record(UDP_RECORD, LOG_PREFIX);
        t.record(SYN_RECORD, LOG_PREFIX);
        // Three more UDP records, the first two after a gap of 5 sequence numbers.
        for seq in [3967, 3968, 3969] {
            t.record(
                &UDP_RECORD.replacen("3960", &seq.to_string(), 1),
                LOG_PREFIX,
            );
        }
        t.record(
            "6,3970,1,-;net_ratelimit: 12 callbacks suppressed\n",
            LOG_PREFIX,
        );
        t.record("4,3971,1,-;deny-observer-bench: IN=x OUT=\n", LOG_PREFIX);
        t.record("garbage", LOG_PREFIX);
        assert_eq!(t.records, 7);
        assert_eq!(t.matched, 5);
        assert_eq!(t.unparsed, 1);
        assert_eq!(t.lost_records, 5);
        assert_eq!(t.suppressed, 12);
        assert_eq!(t.malformed, 1);
        assert_eq!(t.between(ip("10.231.0.1"), ip("10.231.0.2")), 5);
        assert_eq!(t.between(ip("10.231.0.2"), ip("10.231.0.1")), 0);
        let udp = FlowKey {
            src: ip("10.231.0.1"),
            dst: ip("10.231.0.2"),
            proto: Proto::Udp,
            dport: Some(10000),
        };
        assert_eq!(t.flows[&udp], 4);
        assert_eq!(t.flows.len(), 2);
    }

    #[test]
    fn the_bench_reads_back_what_the_tailer_prints() {
        let mut t = Tally::default();
        t.record(UDP_RECORD, LOG_PREFIX);
        t.record(&SYN_RECORD.replacen("3961", "3970", 1), LOG_PREFIX);
        t.overruns = 2;
        let out = format!("{READY_LINE}\n{}", t.render());
        let back = Tally::parse(&out).unwrap();
        assert_eq!(back.matched, 2);
        assert_eq!(back.lost_records, 9);
        assert_eq!(back.overruns, 2);
        assert_eq!(back.flows, t.flows);
        // A literal dump, as the tailer prints it.
        let dump = "log-tail: ready\nlog-tail: records=900 matched=880 unparsed=0 lost_records=5000 overruns=3 suppressed=0 malformed=0\n\
                    flow src=10.1.0.2 dst=10.1.0.3 proto=UDP dport=10000 count=800\n\
                    flow src=fd00::1 dst=fd00::2 proto=ICMPv6 dport=- count=80\n";
        let d = Tally::parse(dump).unwrap();
        assert_eq!(d.between(ip("10.1.0.2"), ip("10.1.0.3")), 800);
        assert_eq!(d.between(ip("fd00::1"), ip("fd00::2")), 80);
        assert_eq!((d.records, d.lost_records, d.overruns), (900, 5000, 3));
        // Flows that do not add up, or no summary at all, are errors.
        assert!(Tally::parse(&dump.replace("count=80\n", "count=81\n")).is_err());
        assert!(Tally::parse("log-tail: ready\n").is_err());
    }

    #[test]
    fn drop_rule_handle_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"chain": {"family": "inet", "table": "deny_sim", "name": "ingress", "handle": 1}}, {"rule": {"family": "inet", "table": "deny_sim", "chain": "ingress", "handle": 3, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "deny_sim", "chain": "ingress", "handle": 4, "expr": [{"counter": "ingress_drop"}, {"drop": null}]}}]}"#;
        assert_eq!(drop_rule_handle(json), Some(4));
        assert_eq!(
            drop_rule_handle(&json.replace("ingress_drop", "other")),
            None
        );
    }

    /// The whole pipeline on the real kernel: the LOG statement in a simulated pod's drop rule,
    /// the kernel log, the tailer; its count matches the nft counter, and the rule and the
    /// sysctl go back afterwards.
    #[test]
    fn logs_real_drops_and_restores_the_rule() {
        if !testkit::privileged("logs_real_drops_and_restores_the_rule") {
            return;
        }
        let mut node = SimNode::new().unwrap();
        let src = node.add_pod("lt-src", "sender").unwrap();
        let dst = node.add_pod("lt-dst", "target").unwrap();
        let mut policy = crate::simnode::Enforcement::default();
        policy.ingress_isolated.insert(dst);
        node.enforce(&policy).unwrap();
        let (src_ip, dst_ip) = (
            node.pod(src).unwrap().ip(false),
            node.pod(dst).unwrap().ip(false),
        );
        let sysctl_before = std::fs::read_to_string(NF_LOG_ALL_NETNS).unwrap();
        let list = || {
            let netns = node.pod(dst).unwrap().netns.clone();
            cmd::output(&mut cmd(
                "ip",
                [
                    "netns", "exec", &netns, "nft", "-j", "-a", "list", "chain", "inet", NFT_TABLE,
                    "ingress",
                ],
            ))
            .unwrap()
        };
        let sent = 200;
        let (tally, actual) = {
            let _sysctl = nf_log_all_netns().unwrap();
            let _rule = LogRule::install(&node, dst).unwrap();
            assert!(list().contains(LOG_PREFIX), "{}", list());
            let stop = AtomicBool::new(false);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::scope(|scope| {
                let tailer = scope.spawn(|| {
                    follow(LOG_PREFIX, &stop, move || {
                        let _ = ready_tx.send(());
                    })
                });
                if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                    stop.store(true, Ordering::Relaxed);
                    panic!(
                        "the tailer never got ready: {:?}",
                        tailer.join().unwrap().map(|t| t.render())
                    );
                }
                let before = node.counter(dst, INGRESS_DROP_COUNTER).unwrap().packets;
                node.send_udp(src, (dst_ip, 10_000).into(), sent).unwrap();
                let actual = node.counter(dst, INGRESS_DROP_COUNTER).unwrap().packets - before;
                std::thread::sleep(Duration::from_millis(300));
                stop.store(true, Ordering::Relaxed);
                (tailer.join().unwrap().unwrap(), actual)
            })
        };
        assert_eq!(actual, sent);
        // 200 lines fit the ring buffer easily: nothing may be lost at this rate.
        assert_eq!(tally.lost_records, 0, "{}", tally.render());
        assert_eq!(tally.between(src_ip, dst_ip), actual, "{}", tally.render());
        assert!(
            !list().contains(LOG_PREFIX),
            "LOG statement left behind: {}",
            list()
        );
        assert!(drop_rule_handle(&list()).is_some());
        assert_eq!(
            std::fs::read_to_string(NF_LOG_ALL_NETNS).unwrap(),
            sysctl_before
        );
    }
}
