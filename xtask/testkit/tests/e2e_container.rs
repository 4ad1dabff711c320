//! The DaemonSet as shipped, in a container (privileged): `deploy/` is rendered with kustomize,
//! and the daemon's container runs from the image of `cargo xtask image` (`DENY_OBSERVER_IMAGE`)
//! with exactly the pod template's security context, volumes, environment, limits and
//! arguments, translated by `testkit::podspec` from the rendered manifest.
//!
//! One deviation, because there is no API server here: `--inventory=kube` becomes
//! `--inventory=/inventory`, a manifest directory bind-mounted read-only, describing the
//! simulated node's pods and policies. The pod gets its own network namespace (as without
//! hostNetwork); the test reaches /readyz and /metrics from inside it.
//!
//! Runs, each on a fresh container:
//! 1. base DaemonSet, podman's own default seccomp profile (podman 4.3's refuses bpf() to
//!    CAP_BPF without CAP_SYS_ADMIN): the daemon must fail and its error must name the fix.
//! 2. base DaemonSet, containerd's default profile (`xtask/seccomp/containerd-default.json`,
//!    translated from containerd's source) as the runtime default: ready, counts exactly.
//! 3. `deploy/overlays/seccomp-localhost`: its init container installs the Localhost profile
//!    into (a stand-in for) kubelet's seccomp directory, then the daemon runs under it: ready,
//!    counts exactly.
//! 4. base DaemonSet on a node that has not mounted tracefs (the tracefs hostPath is the node's
//!    bare directory): the daemon stops, and its error, a JSON log line like every other one,
//!    says to mount tracefs on the node rather than to add the volume it already has.
//!
//! Run 2 ends with `podman stop`, as kubelet stops a pod: the daemon exits 0 within the
//! DaemonSet's grace period.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness helpers: a failed step must stop the test with its context"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::cmd;
use testkit::manifests::{self, Owner, PodMeta};
use testkit::metrics::{self, Metrics};
use testkit::podspec::{self, Context, PodmanRun};
use testkit::podspec::{podman, ulimit_args};
use testkit::simnode::{Enforcement, INGRESS_DROP_COUNTER, Proto, SimNode, in_netns};

const CONTAINER: &str = "deny-observer";
const INIT_CONTAINER: &str = "install-seccomp-profile";
const NODE_NAME: &str = "ct-node";
const APP_NS: &str = "ct-app";
const DROPS: &str = "deny_observer_drops_total";

/// A network namespace for the pod (`ip netns add`), deleted on drop.
struct PodNetns(String);

impl PodNetns {
    fn new(name: String) -> Self {
        let _ = cmd::quiet(&mut cmd::cmd("ip", ["netns", "del", &name]));
        cmd::quiet(&mut cmd::cmd("ip", ["netns", "add", &name])).expect("ip netns add");
        cmd::quiet(&mut cmd::cmd(
            "ip",
            ["-n", &name, "link", "set", "lo", "up"],
        ))
        .expect("lo up in the pod netns");
        Self(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = cmd::quiet(&mut cmd::cmd("ip", ["netns", "del", &self.0]));
    }
}

/// A detached podman container, removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn start(image: &str, name: &str, run: &PodmanRun, extra: &[String]) -> Self {
        let _ = cmd::quiet(podman().args(["rm", "--force", name]));
        let mut c = podman();
        c.args(["run", "--detach", "--name", name])
            .args(ulimit_args())
            .args(&run.options)
            .args(extra);
        if let Some((entry, rest)) = run.command.split_first() {
            c.arg(format!("--entrypoint={entry}"));
            c.arg(image).args(rest);
        } else {
            c.arg(image);
        }
        c.args(&run.args);
        let command = cmd::describe(&c);
        eprintln!("container test: {command}");
        cmd::quiet(&mut c).unwrap_or_else(|e| panic!("podman run failed: {e}"));
        Self {
            name: name.to_owned(),
        }
    }

    fn logs(&self) -> String {
        let out = Command::new("podman")
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `Some(exit code)` once the container has stopped.
    fn exited(&self) -> Option<i64> {
        let state = cmd::output(podman().args([
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.ExitCode}}",
            &self.name,
        ]))
        .expect("podman inspect");
        let mut f = state.split_whitespace();
        match (f.next(), f.next()) {
            (Some("false"), Some(code)) => code.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = cmd::quiet(podman().args(["rm", "--force", "--time", "5", &self.name]));
    }
}

fn scrape_in(netns: &PodNetns, port: u16) -> Option<Metrics> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    in_netns(&netns.0, || metrics::scrape(addr)).ok()?.ok()
}

fn ready_in(netns: &PodNetns, path: &str, port: u16) -> bool {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    in_netns(&netns.0, || metrics::http_get(addr, path))
        .ok()
        .and_then(Result::ok)
        .is_some_and(|r| r.status == 200)
}

/// Waits for the readiness probe's endpoint to answer 200 (`Ok`) or the container to exit
/// (`Err(logs)`).
fn wait_ready(c: &Container, netns: &PodNetns, run: &PodmanRun) -> Result<(), String> {
    let (path, port) = run
        .readiness
        .clone()
        .expect("the DaemonSet's container has an httpGet readinessProbe");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if ready_in(netns, &path, port) {
            return Ok(());
        }
        if let Some(code) = c.exited() {
            return Err(format!("exited with {code}; logs:\n{}", c.logs()));
        }
        assert!(
            Instant::now() < deadline,
            "not ready at {path} on port {port} after 90 s; logs:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The simulated node: `intruder` sends to `server`, whose ingress is default-deny in nftables
/// and in the inventory's NetworkPolicy.
struct Node {
    sim: SimNode,
    inventory: PathBuf,
    server: usize,
    intruder: usize,
}

fn node(work: &Path) -> Node {
    let mut sim = SimNode::new().expect("simulated node");
    let server = sim.add_pod(APP_NS, "server-0").unwrap();
    let intruder = sim.add_pod(APP_NS, "intruder").unwrap();
    let metas = vec![
        PodMeta::app("server", Owner::StatefulSet("server".into())).port("dns", 5353, Proto::Udp),
        PodMeta::app("intruder", Owner::None),
    ];
    let mut policy = Enforcement::default();
    policy.ingress_isolated.insert(server);
    sim.enforce(&policy).unwrap();
    let policies = vec![json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-default-deny", "namespace": APP_NS},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
    })];
    let inventory = work.join("inventory");
    manifests::write_inventory(&inventory, sim.pods(), &metas, NODE_NAME, policies).unwrap();
    Node {
        sim,
        inventory,
        server,
        intruder,
    }
}

/// Sends `n` datagrams that nftables drops and checks that the daemon counts exactly `total`
/// (everything sent so far in this run).
fn assert_counts(node: &Node, netns: &PodNetns, port: u16, c: &Container, n: u64, label: &str) {
    let to = SocketAddr::new(node.sim.pod(node.server).unwrap().ip(false), 5353);
    let before = node
        .sim
        .counter(node.server, INGRESS_DROP_COUNTER)
        .unwrap()
        .packets;
    assert_eq!(node.sim.send_udp(node.intruder, to, n).unwrap().sent, n);
    let dropped = node
        .sim
        .counter(node.server, INGRESS_DROP_COUNTER)
        .unwrap()
        .packets
        - before;
    assert_eq!(dropped, n, "{label}: nftables dropped {dropped} of {n}");
    let want = [
        ("reason", "netfilter_drop"),
        ("source_namespace", APP_NS),
        ("source_workload", "intruder"),
        ("destination_namespace", APP_NS),
        ("destination_workload", "server"),
        ("protocol", "udp"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0.0;
    while Instant::now() < deadline {
        if let Some(m) = scrape_in(netns, port) {
            seen = m.sum(DROPS, &want);
            if seen >= n as f64 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Settled, not just reached: a later scrape must still say exactly n.
    std::thread::sleep(Duration::from_millis(2500));
    if let Some(m) = scrape_in(netns, port) {
        seen = m.sum(DROPS, &want);
    }
    assert_eq!(
        seen,
        n as f64,
        "{label}: {DROPS} for {APP_NS}/intruder -> {APP_NS}/server; logs:\n{}",
        c.logs()
    );
}

struct Run<'a> {
    image: &'a str,
    node: &'a Node,
    work: &'a Path,
    tag: String,
}

impl Run<'_> {
    fn context(
        &self,
        netns: &PodNetns,
        runtime_default: Option<PathBuf>,
        scratch: &str,
    ) -> Context {
        Context {
            node_name: NODE_NAME.to_owned(),
            node_ip: self.node.sim.gateway_v4().to_string(),
            namespace: "deny-observer".to_owned(),
            pod_name: format!("deny-observer-{}", self.tag),
            seccomp_root: self.work.join("kubelet/seccomp"),
            runtime_default_seccomp: runtime_default,
            scratch: self.work.join(scratch),
            netns: netns.path(),
            // kubelet's directory on this machine is not ours to write.
            host_path_remap: vec![(PathBuf::from("/var/lib/kubelet"), self.work.join("kubelet"))],
        }
    }

    /// The daemon's container of `pod`, with only the inventory argument overridden.
    fn daemon(&self, pod: &serde_yaml::Value, ctx: &Context, name: &str) -> (Container, PodmanRun) {
        let mut run = podspec::translate(pod, CONTAINER, ctx).unwrap_or_else(|e| panic!("{e}"));
        podspec::override_arg(&mut run.args, "--inventory", "/inventory").unwrap();
        let inventory = format!(
            "--mount=type=bind,src={},dst=/inventory,ro=true",
            self.node.inventory.display()
        );
        let c = Container::start(self.image, name, &run, &[inventory]);
        (c, run)
    }
}

fn pod_spec(dir: &Path) -> serde_yaml::Value {
    let docs = podspec::kustomize(dir).unwrap_or_else(|e| panic!("{e}"));
    podspec::daemonset_pod_spec(&docs, CONTAINER)
        .unwrap_or_else(|e| panic!("{e}"))
        .clone()
}

#[test]
fn shipped_daemonset_runs_in_a_container_and_counts_exactly() {
    if !testkit::privileged("shipped_daemonset_runs_in_a_container_and_counts_exactly") {
        return;
    }
    let image = testkit::container_image();
    let root = testkit::workspace_root();
    let _ = testkit::simnode::cleanup_stale();
    let work = tempfile::tempdir().unwrap();
    let node = node(work.path());
    let tag = format!("{}", std::process::id());
    let run = Run {
        image: &image,
        node: &node,
        work: work.path(),
        tag: tag.clone(),
    };
    let base = pod_spec(&root.join("deploy"));
    assert_eq!(
        base["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault"),
        "the runs below assume the base DaemonSet uses the runtime's default profile"
    );

    // 1. podman's default profile.
    {
        let netns = PodNetns::new(format!("ct-ns-{tag}-1"));
        let ctx = run.context(&netns, None, "run1");
        let (c, r) = run.daemon(&base, &ctx, &format!("ct-{tag}-podman-default"));
        match wait_ready(&c, &netns, &r) {
            Ok(()) => panic!(
                "the daemon started under podman's default seccomp profile: this podman allows \
                 bpf() with CAP_BPF, so the README's runtime table and the overlay's comment \
                 are out of date"
            ),
            Err(logs) => {
                for must in [
                    "CAP_BPF is held",
                    "seccomp profile refuses bpf()",
                    "deploy/seccomp/deny-observer.json",
                    "deploy/overlays/seccomp-localhost",
                ] {
                    assert!(
                        logs.contains(must),
                        "the start-up error lacks {must:?}:\n{logs}"
                    );
                }
            }
        }
    }

    // 2. containerd's default profile as the runtime default.
    {
        let profile = root.join("xtask/seccomp/containerd-default.json");
        let netns = PodNetns::new(format!("ct-ns-{tag}-2"));
        let ctx = run.context(&netns, Some(profile), "run2");
        let (c, r) = run.daemon(&base, &ctx, &format!("ct-{tag}-containerd-default"));
        wait_ready(&c, &netns, &r).unwrap_or_else(|logs| {
            panic!("not ready under containerd's default seccomp profile: {logs}")
        });
        let port = r.readiness.clone().map(|(_, p)| p).unwrap_or(9965);
        assert_counts(&node, &netns, port, &c, 13, "containerd default profile");
        // kubelet's stop: SIGTERM, then SIGKILL after terminationGracePeriodSeconds.
        let grace = base["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let started = Instant::now();
        cmd::quiet(podman().args(["stop", "--time", &grace.to_string(), &c.name]))
            .expect("podman stop");
        let took = started.elapsed();
        assert_eq!(
            c.exited(),
            Some(0),
            "exit status after SIGTERM; logs:\n{}",
            c.logs()
        );
        assert!(
            took < Duration::from_secs(grace / 2),
            "SIGTERM took {took:?} (grace {grace} s); logs:\n{}",
            c.logs()
        );
    }

    // 4. a node without tracefs mounted: the hostPath is its bare directory.
    {
        let bare = work.path().join("node-without-tracefs");
        std::fs::create_dir_all(&bare).unwrap();
        let netns = PodNetns::new(format!("ct-ns-{tag}-4"));
        let profile = root.join("xtask/seccomp/containerd-default.json");
        let mut ctx = run.context(&netns, Some(profile), "run4");
        ctx.host_path_remap
            .push((PathBuf::from("/sys/kernel/tracing"), bare.clone()));
        let (c, r) = run.daemon(&base, &ctx, &format!("ct-{tag}-no-tracefs"));
        if wait_ready(&c, &netns, &r).is_ok() {
            panic!("ready without tracefs:\n{}", c.logs());
        }
        let logs = c.logs();
        assert_eq!(c.exited(), Some(1), "{logs}");
        for must in [
            "node has not mounted tracefs",
            "mount -t tracefs tracefs /sys/kernel/tracing",
        ] {
            assert!(
                logs.contains(must),
                "the start-up error lacks {must:?}:\n{logs}"
            );
        }
        // The DaemonSet logs JSON: the fatal line too, at level ERROR.
        let mut fatal = 0;
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}\n{logs}"));
            if v["level"] == "ERROR" {
                fatal += 1;
            }
        }
        assert_eq!(fatal, 1, "{logs}");
    }

    // 3. the seccomp-localhost overlay: init container, then the daemon under the Localhost
    //    profile it installed.
    {
        let pod = pod_spec(&root.join("deploy/overlays/seccomp-localhost"));
        let netns = PodNetns::new(format!("ct-ns-{tag}-3"));
        let ctx = run.context(&netns, None, "run3");
        let init = podspec::translate(&pod, INIT_CONTAINER, &ctx).unwrap_or_else(|e| panic!("{e}"));
        let c = Container::start(&image, &format!("ct-{tag}-init"), &init, &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Some(code) = c.exited() {
                break code;
            }
            assert!(
                Instant::now() < deadline,
                "init container still running:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(code, 0, "init container failed:\n{}", c.logs());
        let installed = ctx.seccomp_root.join("deny-observer/deny-observer.json");
        assert_eq!(
            std::fs::read_to_string(&installed).unwrap_or_default(),
            std::fs::read_to_string(root.join("deploy/seccomp/deny-observer.json")).unwrap(),
            "the init container did not install the shipped profile at {}",
            installed.display()
        );
        drop(c);
        let (c, r) = run.daemon(&pod, &ctx, &format!("ct-{tag}-localhost"));
        wait_ready(&c, &netns, &r)
            .unwrap_or_else(|logs| panic!("not ready under the shipped Localhost profile: {logs}"));
        let port = r.readiness.clone().map(|(_, p)| p).unwrap_or(9965);
        assert_counts(&node, &netns, port, &c, 17, "shipped Localhost profile");
    }
}
