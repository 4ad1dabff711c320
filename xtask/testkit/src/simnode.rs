//! A simulated Kubernetes node on the real kernel: pods are network namespaces wired the way a
//! bridge CNI wires them, and nftables enforces NetworkPolicy-like rules inside each pod.
//!
//! ```text
//!  root netns ("the node")             pod netns (one per pod)
//!  bridge do-br<tag> 10.244.X.1/24      eth0 10.244.X.(10+i)/24, fd00:244:0:X::(10+i)/64
//!          fd00:244:0:X::1/64 ─ veth ─  default routes via the bridge
//! ```
//!
//! - Every name carries a tag made of our pid (5 base-36 digits) and a per-process counter, so
//!   simulated nodes of concurrent tests and people never collide, and [`cleanup_stale`] can tell
//!   the leftovers of a dead process from those of a live one.
//! - Each node takes its own /24 (and /64), so the daemon under test never confuses our pods
//!   with another run's.
//! - Neighbour entries are static (`nud permanent`) and IPv6 addresses skip DAD: traffic is
//!   then exact from the first packet. Without that, ARP/ND queues drop or delay the first
//!   packets (`NEIGH_QUEUEFULL`), and counts would not be exact.
//! - [`SimNode`] removes everything it created on drop; deleting a pod's netns also deletes its
//!   veth pair and its nft table.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cmd::{self, CmdError, cmd};

/// Prefix of every bridge name we create.
pub const BRIDGE_PREFIX: &str = "do-br";
/// Prefix of every host-side veth name we create.
pub const VETH_PREFIX: &str = "do-v";
/// Prefix of every network namespace name we create.
pub const NETNS_PREFIX: &str = "do-ns-";
/// The nft table installed in each pod's netns by [`SimNode::enforce`].
pub const NFT_TABLE: &str = "deny_sim";
/// Name of the counter of packets dropped by a pod's ingress default deny.
pub const INGRESS_DROP_COUNTER: &str = "ingress_drop";
/// Name of the counter of packets dropped by a pod's egress default deny.
pub const EGRESS_DROP_COUNTER: &str = "egress_drop";

const LOCK_FILE: &str = "/run/deny-observer-simnode.lock";

/// Errors of the simulated node.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An `ip` or `nft` command failed.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file, netns or address.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Network namespaces, veths and nftables need root.
    #[error("the simulated node needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    NotRoot,
    /// Every 10.244.X.0/24 with X in 1..=250 is taken.
    #[error("no free 10.244.X.0/24 subnet for a simulated node")]
    NoSubnet,
    /// Unexpected output from nft.
    #[error("nft in netns {netns}: {detail}")]
    Nft {
        /// The pod netns.
        netns: String,
        /// What was wrong.
        detail: String,
    },
    /// Pod index out of range.
    #[error("no pod #{0} on this simulated node")]
    NoPod(usize),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
    let what = what.into();
    move |source| SimError::Io { what, source }
}

/// Index of a pod in its [`SimNode`].
pub type PodId = usize;

/// Transport protocol of a rule or of generated traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Lower-case name, as nft and the daemon's `protocol` label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Upper-case name, as Kubernetes manifests spell it.
    pub fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A simulated pod: a network namespace with one veth into the node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Kubernetes namespace (only a name here; the netns is [`Pod::netns`]).
    pub namespace: String,
    /// Kubernetes pod name.
    pub name: String,
    /// Network namespace name (`ip netns`).
    pub netns: String,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// MAC address of the pod's eth0.
    pub mac: String,
    /// Host-side veth name (a port of the bridge).
    pub host_veth: String,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's address of the given family.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// An allowed flow: `from` may send `protocol` to `to` on `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Source pod.
    pub from: PodId,
    /// Destination pod.
    pub to: PodId,
    /// Protocol.
    pub protocol: Proto,
    /// Destination port.
    pub port: u16,
}

impl Rule {
    /// Name of the nft counter of packets this rule accepted at `to`'s ingress.
    pub fn ingress_counter(&self) -> String {
        format!("in_p{}_{}_{}", self.from, self.protocol, self.port)
    }

    /// Name of the nft counter of packets this rule accepted at `from`'s egress.
    pub fn egress_counter(&self) -> String {
        format!("out_p{}_{}_{}", self.to, self.protocol, self.port)
    }
}

/// What nftables enforces, the way NetworkPolicy works: a pod that is isolated in a direction
/// drops everything in that direction except what a rule allows. Replies of allowed
/// connections pass (conntrack), as with every CNI.
#[derive(Clone, Debug, Default)]
pub struct Enforcement {
    /// Pods isolated for ingress.
    pub ingress_isolated: BTreeSet<PodId>,
    /// Pods isolated for egress.
    pub egress_isolated: BTreeSet<PodId>,
    /// Flows allowed at the destination's ingress.
    pub ingress_allow: BTreeSet<Rule>,
    /// Flows allowed at the source's egress.
    pub egress_allow: BTreeSet<Rule>,
}

impl Enforcement {
    /// Allows `rule` in both directions.
    pub fn allow(&mut self, rule: Rule) -> &mut Self {
        self.ingress_allow.insert(rule);
        self.egress_allow.insert(rule);
        self
    }
}

/// Result of sending datagrams or SYNs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Packets the local stack accepted.
    pub sent: u64,
    /// Packets the pod's own egress rules refused (`EPERM` from `sendto`); they are still
    /// kernel drops, counted by the kernel at the source.
    pub refused_locally: u64,
}

/// An nft named counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A simulated node. Dropping it deletes every pod and the bridge.
#[derive(Debug)]
pub struct SimNode {
    tag: String,
    bridge: String,
    subnet: u8,
    pods: Vec<Pod>,
}

static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid encoded in a name we created, if the name is ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = [BRIDGE_PREFIX, VETH_PREFIX, NETNS_PREFIX]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    let digits = rest.get(..5)?;
    u32::from_str_radix(digits, 36).ok()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// An exclusive lock on [`LOCK_FILE`]: subnet choice and bridge creation are one step across
/// processes.
struct Lock {
    _file: File,
}

impl Lock {
    fn take() -> Result<Self, SimError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(LOCK_FILE)
            .map_err(io_err(format!("opening {LOCK_FILE}")))?;
        // SAFETY: flock on a file descriptor we own; it is released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(format!("locking {LOCK_FILE}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { _file: file })
    }
}

fn ip(args: &[&str]) -> Result<(), SimError> {
    cmd::quiet(&mut cmd("ip", args))?;
    Ok(())
}

/// Names of all network namespaces (`ip netns list`).
fn netns_list() -> Result<Vec<String>, SimError> {
    let out = cmd::output(&mut cmd("ip", ["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Names of all links in the root netns.
fn link_list() -> Result<Vec<String>, SimError> {
    let out = cmd::output(&mut cmd("ip", ["-o", "link", "show"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
        .collect())
}

/// Removes namespaces, veths and bridges left by simulated nodes of processes that no longer
/// run (a crashed demo or test). Those of live processes are left alone. Returns what was
/// removed.
pub fn cleanup_stale() -> Result<Vec<String>, SimError> {
    if !cmd::is_root() {
        return Err(SimError::NotRoot);
    }
    let mut removed = Vec::new();
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !pid_alive(pid));
    for ns in netns_list()? {
        if stale(&ns) && ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    for link in link_list()? {
        if stale(&link) && ip(&["link", "del", &link]).is_ok() {
            removed.push(link);
        }
    }
    Ok(removed)
}

/// Runs `f` on a new thread that has entered network namespace `netns`; the caller's thread
/// stays where it is. Sockets made by `f` belong to that namespace.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T, SimError> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).map_err(io_err(format!("opening {path}")))?;
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid netns fd; it only changes this (new) thread's netns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
    });
    match result {
        Ok(r) => r.map_err(io_err(format!("entering netns {netns}"))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

impl SimNode {
    /// Creates the node: its bridge, with the gateway addresses, in the root netns.
    pub fn new() -> Result<Self, SimError> {
        if !cmd::is_root() {
            return Err(SimError::NotRoot);
        }
        let n = NODE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!(
            "{:0>5}{}",
            base36(u64::from(std::process::id())),
            base36(n.into())
        );
        let bridge = format!("{BRIDGE_PREFIX}{tag}");
        let _lock = Lock::take()?;
        // A dead process with our pid (pid reuse) may have left this very tag behind.
        for ns in netns_list()? {
            if ns.starts_with(&format!("{NETNS_PREFIX}{tag}-")) {
                let _ = ip(&["netns", "del", &ns]);
            }
        }
        if link_list()?.contains(&bridge) {
            let _ = ip(&["link", "del", &bridge]);
        }
        let used = cmd::output(&mut cmd("ip", ["-o", "-4", "addr", "show"]))?;
        let subnet = (1..=250u8)
            .find(|x| !used.contains(&format!(" 10.244.{x}.")))
            .ok_or(SimError::NoSubnet)?;
        let node = Self {
            tag,
            bridge,
            subnet,
            pods: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created.
        let br = node.bridge.as_str();
        ip(&["link", "add", br, "type", "bridge"])?;
        ip(&["link", "set", br, "address", &node.mac(1)])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", node.gateway_v4()),
            "dev",
            br,
        ])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", node.gateway_v6()),
            "dev",
            br,
            "nodad",
        ])?;
        ip(&["link", "set", br, "up"])?;
        Ok(node)
    }

    /// The unique tag in this node's names.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The node's IPv4 pod subnet, `10.244.X.0/24`.
    pub fn subnet_v4(&self) -> String {
        format!("10.244.{}.0/24", self.subnet)
    }

    /// The node's IPv6 pod subnet, `fd00:244:0:X::/64`.
    pub fn subnet_v6(&self) -> String {
        format!("fd00:244:0:{:x}::/64", self.subnet)
    }

    /// The bridge's IPv4 address, the pods' gateway.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// The bridge's IPv6 address, the pods' gateway.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x244, 0, u16::from(self.subnet), 0, 0, 0, 1)
    }

    fn mac(&self, host: u8) -> String {
        // The bridge CNI's convention: 0a:58 followed by the IPv4 address.
        format!("0a:58:0a:f4:{:02x}:{host:02x}", self.subnet)
    }

    /// All pods, indexed by [`PodId`].
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod `id`.
    pub fn pod(&self, id: PodId) -> Result<&Pod, SimError> {
        self.pods.get(id).ok_or(SimError::NoPod(id))
    }

    /// The pod named `namespace/name`.
    pub fn find(&self, namespace: &str, name: &str) -> Option<PodId> {
        self.pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
    }

    /// Adds a pod: a netns with eth0 on the bridge, addresses, default routes, static
    /// neighbour entries to and from every other pod and the gateway.
    pub fn add_pod(&mut self, namespace: &str, name: &str) -> Result<PodId, SimError> {
        let id = self.pods.len();
        let host = u8::try_from(id + 10)
            .ok()
            .filter(|h| *h < 255)
            .ok_or(SimError::NoPod(id))?;
        let pod = Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            netns: format!("{NETNS_PREFIX}{}-{id}", self.tag),
            ipv4: Ipv4Addr::new(10, 244, self.subnet, host),
            ipv6: Ipv6Addr::new(
                0xfd00,
                0x244,
                0,
                u16::from(self.subnet),
                0,
                0,
                0,
                host.into(),
            ),
            mac: self.mac(host),
            host_veth: format!("{VETH_PREFIX}{}-{id}", self.tag),
        };
        ip(&["netns", "add", &pod.netns])?;
        // Pushed now so that Drop deletes the netns even if wiring fails half-way.
        self.pods.push(pod.clone());
        let ns = pod.netns.as_str();
        ip(&[
            "link",
            "add",
            &pod.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ])?;
        ip(&["link", "set", &pod.host_veth, "master", &self.bridge, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "eth0", "address", &pod.mac, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ipv4),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{}/64", pod.ipv6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway_v4().to_string(),
        ])?;
        ip(&[
            "-n",
            ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.gateway_v6().to_string(),
        ])?;
        let gw_mac = self.mac(1);
        for (addr, mac) in [
            (self.gateway_v4().to_string(), gw_mac.as_str()),
            (self.gateway_v6().to_string(), gw_mac.as_str()),
        ] {
            neigh(Some(ns), "eth0", &addr, mac)?;
        }
        for addr in [pod.ipv4.to_string(), pod.ipv6.to_string()] {
            neigh(None, &self.bridge, &addr, &pod.mac)?;
        }
        for other in &self.pods[..id] {
            for (a, b) in [(&pod, other), (other, &pod)] {
                neigh(Some(&a.netns), "eth0", &b.ipv4.to_string(), &b.mac)?;
                neigh(Some(&a.netns), "eth0", &b.ipv6.to_string(), &b.mac)?;
            }
        }
        Ok(id)
    }

    /// `ip netns exec <pod netns> <program>`: a command to run inside the pod.
    pub fn pod_command(&self, id: PodId, program: &str) -> Result<Command, SimError> {
        let mut c = cmd("ip", ["netns", "exec", &self.pod(id)?.netns, program]);
        c.stdin(Stdio::null());
        Ok(c)
    }

    /// Runs `f` inside pod `id`'s netns (on a helper thread; see [`in_netns`]).
    pub fn in_pod<T: Send>(&self, id: PodId, f: impl FnOnce() -> T + Send) -> Result<T, SimError> {
        in_netns(&self.pod(id)?.netns, f)
    }

    /// Installs (or replaces) the nft table of every pod from `policy`.
    ///
    /// Per pod, table `inet deny_sim`: chain `ingress` on the input hook, chain `egress` on the
    /// output hook. Loopback, conntrack replies and IPv6 neighbour discovery pass; each allowed
    /// rule accepts through its own named counter ([`Rule::ingress_counter`],
    /// [`Rule::egress_counter`]); an isolated direction ends in a counted drop
    /// ([`INGRESS_DROP_COUNTER`], [`EGRESS_DROP_COUNTER`]).
    pub fn enforce(&self, policy: &Enforcement) -> Result<(), SimError> {
        for id in 0..self.pods.len() {
            let script = self.nft_script(id, policy)?;
            self.nft(id, &script)?;
        }
        Ok(())
    }

    /// Runs the nft script `script` (`nft -f -`) in pod `id`'s netns: for rules outside the
    /// [`Enforcement`] model, such as a firewall Kubernetes does not know about. Tables it
    /// creates go away with the pod.
    pub fn nft(&self, id: PodId, script: &str) -> Result<(), SimError> {
        let pod = self.pod(id)?;
        let mut child = cmd("ip", ["netns", "exec", &pod.netns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("running nft in netns {}", pod.netns)))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(io_err(format!("writing to nft in netns {}", pod.netns)))?;
        }
        let out = child
            .wait_with_output()
            .map_err(io_err(format!("running nft in netns {}", pod.netns)))?;
        if !out.status.success() {
            return Err(SimError::Nft {
                netns: pod.netns.clone(),
                detail: format!(
                    "{}\nscript:\n{script}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    /// The nft script [`SimNode::enforce`] installs in pod `id`.
    pub fn nft_script(&self, id: PodId, policy: &Enforcement) -> Result<String, SimError> {
        let mut counters = vec![
            INGRESS_DROP_COUNTER.to_owned(),
            EGRESS_DROP_COUNTER.to_owned(),
        ];
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        if policy.ingress_isolated.contains(&id) {
            for rule in policy.ingress_allow.iter().filter(|r| r.to == id) {
                let peer = self.pod(rule.from)?;
                let name = rule.ingress_counter();
                for (fam, addr) in [("ip", peer.ip(false)), ("ip6", peer.ip(true))] {
                    ingress.push(format!(
                        "{fam} saddr {addr} {} dport {} counter name \"{name}\" accept",
                        rule.protocol, rule.port
                    ));
                }
                counters.push(name);
            }
            ingress.push(format!("counter name \"{INGRESS_DROP_COUNTER}\" drop"));
        }
        if policy.egress_isolated.contains(&id) {
            for rule in policy.egress_allow.iter().filter(|r| r.from == id) {
                let peer = self.pod(rule.to)?;
                let name = rule.egress_counter();
                for (fam, addr) in [("ip", peer.ip(false)), ("ip6", peer.ip(true))] {
                    egress.push(format!(
                        "{fam} daddr {addr} {} dport {} counter name \"{name}\" accept",
                        rule.protocol, rule.port
                    ));
                }
                counters.push(name);
            }
            egress.push(format!("counter name \"{EGRESS_DROP_COUNTER}\" drop"));
        }
        counters.sort();
        counters.dedup();
        // Link control traffic is not what NetworkPolicy governs (CNIs let it through), and
        // it must not pollute exact drop counts: neighbour discovery, and MLD/router
        // solicitations to link multicast groups.
        let nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, \
                  nd-router-advert } accept\n    ip6 daddr ff00::/8 accept";
        let mut s = format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n");
        s.push_str(&format!("table inet {NFT_TABLE} {{\n"));
        for c in &counters {
            s.push_str(&format!("  counter {c} {{}}\n"));
        }
        for (chain, hook, lo, rules) in [
            ("ingress", "input", "iifname", &ingress),
            ("egress", "output", "oifname", &egress),
        ] {
            s.push_str(&format!(
                "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n"
            ));
            if !rules.is_empty() {
                s.push_str(&format!(
                    "    {lo} \"lo\" accept\n    ct state established,related accept\n    {nd}\n"
                ));
            }
            for r in rules {
                s.push_str(&format!("    {r}\n"));
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        Ok(s)
    }

    /// Reads nft named counter `name` of pod `id`'s table.
    pub fn counter(&self, id: PodId, name: &str) -> Result<Counter, SimError> {
        self.counter_in(id, NFT_TABLE, name)
    }

    /// Reads nft named counter `name` of table `inet <table>` in pod `id`.
    pub fn counter_in(&self, id: PodId, table: &str, name: &str) -> Result<Counter, SimError> {
        let pod = self.pod(id)?;
        let out = cmd::output(&mut cmd(
            "ip",
            [
                "netns", "exec", &pod.netns, "nft", "-j", "list", "counter", "inet", table, name,
            ],
        ))?;
        let bad = |detail: String| SimError::Nft {
            netns: pod.netns.clone(),
            detail,
        };
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| bad(format!("counter {name}: bad JSON ({e}): {out}")))?;
        let counter = json["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i.get("counter")))
            .ok_or_else(|| bad(format!("counter {name} not in: {out}")))?;
        Ok(Counter {
            packets: counter["packets"].as_u64().unwrap_or(0),
            bytes: counter["bytes"].as_u64().unwrap_or(0),
        })
    }

    /// Sends exactly `n` UDP datagrams (32 bytes each) from pod `from` to `to`.
    pub fn send_udp(&self, from: PodId, to: SocketAddr, n: u64) -> Result<SendReport, SimError> {
        self.in_pod(from, || -> Result<SendReport, SimError> {
            let bind: SocketAddr = if to.is_ipv6() {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind).map_err(io_err(format!("binding UDP {bind}")))?;
            let mut report = SendReport::default();
            for i in 0..n {
                match sock.send_to(&[0x5a; 32], to) {
                    Ok(_) => report.sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => report.refused_locally += 1,
                    Err(e) => return Err(io_err(format!("UDP datagram {i} to {to}"))(e)),
                }
            }
            Ok(report)
        })?
    }

    /// Sends exactly `n` TCP SYNs from pod `from` to `to`: each is a non-blocking `connect()`
    /// closed at once, so the kernel sends one SYN and never retransmits it (closing a
    /// SYN_SENT socket sends nothing). Only for flows that are denied: a SYN-ACK coming back
    /// would meet a closed socket and be dropped as `no_socket` at the source.
    pub fn send_tcp_syns(
        &self,
        from: PodId,
        to: SocketAddr,
        n: u64,
    ) -> Result<SendReport, SimError> {
        self.in_pod(from, || -> Result<SendReport, SimError> {
            let domain = socket2::Domain::for_address(to);
            let mut report = SendReport::default();
            for i in 0..n {
                let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                    .map_err(io_err("creating a TCP socket"))?;
                sock.set_nonblocking(true)
                    .map_err(io_err("making a TCP socket non-blocking"))?;
                match sock.connect(&to.into()) {
                    Ok(()) => report.sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => report.sent += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => report.refused_locally += 1,
                    Err(e) => return Err(io_err(format!("SYN {i} to {to}"))(e)),
                }
                drop(sock);
            }
            Ok(report)
        })?
    }

    /// One complete TCP connection from pod `from` to a [`Listener`] at `to`: connect, send,
    /// half-close, read until the server closes. For allowed flows; nothing is dropped.
    pub fn tcp_exchange(&self, from: PodId, to: SocketAddr) -> Result<(), SimError> {
        self.in_pod(from, || -> Result<(), SimError> {
            let what = format!("TCP exchange with {to}");
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(io_err(what.clone()))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(io_err(what.clone()))?;
            s.write_all(b"hello").map_err(io_err(what.clone()))?;
            s.shutdown(std::net::Shutdown::Write)
                .map_err(io_err(what.clone()))?;
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).map_err(io_err(what))?;
            Ok(())
        })?
    }

    /// Starts a server in pod `id` on `port` (IPv4 and IPv6): TCP connections are read to the
    /// end and closed, UDP datagrams are read and counted. Stops when the guard is dropped.
    pub fn listen(&self, id: PodId, protocol: Proto, port: u16) -> Result<Listener, SimError> {
        let netns = self.pod(id)?.netns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), SimError>>();
        let (stop2, received2) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let res = in_netns(&netns, move || {
                serve(protocol, port, &stop2, &received2, &ready)
            });
            if let Err(e) = res {
                let _ = ready_tx.send(Err(e));
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Listener {
                stop,
                received,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SimError::Io {
                what: format!("starting a {protocol} listener on port {port}"),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            }),
        }
    }
}

fn neigh(netns: Option<&str>, dev: &str, addr: &str, mac: &str) -> Result<(), SimError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend([
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ]);
    ip(&args)
}

fn serve(
    protocol: Proto,
    port: u16,
    stop: &AtomicBool,
    received: &AtomicU64,
    ready: &std::sync::mpsc::Sender<Result<(), SimError>>,
) {
    // [::] with IPV6_V6ONLY off (the netns default) takes IPv4 too.
    let addr: SocketAddr = (Ipv6Addr::UNSPECIFIED, port).into();
    let what = format!("{protocol} listener on {addr}");
    match protocol {
        Proto::Tcp => {
            let listener = match TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(io_err(what)(e)));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut sink = Vec::new();
                        let _ = s.read_to_end(&mut sink);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        Proto::Udp => {
            let sock = match UdpSocket::bind(addr).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(io_err(what)(e)));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv_from(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A server started by [`SimNode::listen`]; stops on drop.
#[derive(Debug)]
pub struct Listener {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// TCP connections accepted, or UDP datagrams received, so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        for pod in &self.pods {
            // Deleting the netns would take the veth pair with it, but asynchronously (the
            // kernel's netns cleanup runs later); deleting the veth first makes Drop final.
            let _ = ip(&["link", "del", &pod.host_veth]);
            if let Err(e) = ip(&["netns", "del", &pod.netns]) {
                eprintln!("simnode: cleanup of {}: {e}", pod.netns);
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("simnode: cleanup of {}: {e}", self.bridge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_the_owner_pid() {
        let tag = format!("{:0>5}{}", base36(4_194_303), base36(7));
        assert_eq!(tag.len(), 6);
        assert_eq!(owner_pid(&format!("{BRIDGE_PREFIX}{tag}")), Some(4_194_303));
        assert_eq!(
            owner_pid(&format!("{VETH_PREFIX}{tag}-12")),
            Some(4_194_303)
        );
        assert_eq!(
            owner_pid(&format!("{NETNS_PREFIX}{tag}-0")),
            Some(4_194_303)
        );
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("do-br"), None);
        // Linux limits interface names to 15 bytes; the longest we make must fit.
        let veth = format!(
            "{VETH_PREFIX}{:0>5}{}-{}",
            base36(4_194_303),
            base36(1295),
            244
        );
        assert!(veth.len() <= 15, "{veth}");
    }
}
