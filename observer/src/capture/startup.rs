//! Start-up refusals, explained: when the kernel or the container runtime refuses `bpf()` or
//! `perf_event_open()`, the error names what is missing (a capability, the seccomp profile, an
//! LSM, the memlock limit) and the fix, from what this process can see of itself.
//!
//! The mapping from (refused call, this process's capabilities and seccomp mode) to the text is
//! a pure function, [`fix_for`], so every branch is tested without a container.

use std::error::Error as _;
use std::path::{Path, PathBuf};

use super::CaptureError;
use super::btf::VMLINUX_BTF;

/// The Localhost seccomp profile shipped for runtimes whose default profile refuses `bpf()`.
pub const SECCOMP_PROFILE: &str = "deploy/seccomp/deny-observer.json";
/// The overlay that installs [`SECCOMP_PROFILE`] on every node and selects it.
pub const SECCOMP_OVERLAY: &str = "deploy/overlays/seccomp-localhost";

/// [`SECCOMP_PROFILE`] itself, so the binary installs the profile of its own version.
pub const SECCOMP_PROFILE_JSON: &str = include_str!("../../../deploy/seccomp/deny-observer.json");
/// The profile's file name under [`InstallSeccompArgs::dir`]; the overlay's
/// `localhostProfile` is `deny-observer/<this>`.
pub const SECCOMP_PROFILE_FILE: &str = "deny-observer.json";

/// `deny-observer install-seccomp-profile`: the seccomp-localhost overlay's init container.
#[derive(Debug, clap::Args)]
pub struct InstallSeccompArgs {
    /// Directory under kubelet's seccomp root to write the profile into.
    #[arg(long, default_value = "/var/lib/kubelet/seccomp/deny-observer")]
    pub dir: PathBuf,
}

/// Writes [`SECCOMP_PROFILE_JSON`] to `dir`/[`SECCOMP_PROFILE_FILE`] (atomically: a container
/// being created while it is rewritten reads the old or the new profile, never half of one).
/// Returns the file written.
pub fn install_seccomp_profile(args: &InstallSeccompArgs) -> Result<PathBuf, std::io::Error> {
    let with_path = |path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{path}: {e}"))
    };
    std::fs::create_dir_all(&args.dir).map_err(with_path(&args.dir))?;
    let target = args.dir.join(SECCOMP_PROFILE_FILE);
    if std::fs::read_to_string(&target).is_ok_and(|old| old == SECCOMP_PROFILE_JSON) {
        return Ok(target);
    }
    let partial = args.dir.join(format!(".{SECCOMP_PROFILE_FILE}.partial"));
    std::fs::write(&partial, SECCOMP_PROFILE_JSON).map_err(with_path(&partial))?;
    std::fs::rename(&partial, &target).map_err(with_path(&target))?;
    Ok(target)
}

/// The system call the kernel or the runtime refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `bpf()`: map creation, BTF load, `tp_btf` attach.
    Bpf,
    /// `bpf(BPF_PROG_LOAD)` of the tracing program: needs CAP_PERFMON besides CAP_BPF, since
    /// the program reads kernel memory.
    ProgLoad,
    /// `perf_event_open()`: attaching the classic tracepoint.
    PerfEventOpen,
}

/// What this process holds, from `/proc/self/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    /// CAP_BPF in the effective set.
    pub cap_bpf: bool,
    /// CAP_PERFMON in the effective set.
    pub cap_perfmon: bool,
    /// CAP_SYS_ADMIN in the effective set (covers both on every kernel).
    pub cap_sys_admin: bool,
    /// A seccomp filter is installed (`Seccomp: 2`).
    pub seccomp_filter: bool,
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

impl Privileges {
    /// Reads this process's `/proc/self/status`; `None` when it cannot be read or parsed.
    pub fn of_self() -> Option<Self> {
        Self::parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    /// Parses the `CapEff:` and `Seccomp:` lines of a `/proc/<pid>/status` text.
    pub fn parse_status(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        let has = |cap: u32| eff & (1u64 << cap) != 0;
        Some(Self {
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
            // Kernels without CONFIG_SECCOMP have no such line: no filter.
            seccomp_filter: field("Seccomp:").is_some_and(|m| m == "2"),
        })
    }
}

/// Why `call` was refused and how to fix it, given what the process holds (`None`: unknown).
pub fn fix_for(call: Refused, privileges: Option<Privileges>) -> String {
    if call == Refused::ProgLoad {
        let missing_perfmon =
            privileges.is_some_and(|p| p.cap_bpf && !p.cap_perfmon && !p.cap_sys_admin);
        if missing_perfmon {
            return "CAP_PERFMON is missing: the kernel loads a tracing program that reads kernel \
                    memory only with CAP_PERFMON besides CAP_BPF. Add `PERFMON` to the \
                    container's securityContext.capabilities.add (deploy/base/daemonset.yaml \
                    does)"
                .to_owned();
        }
        return fix_for(Refused::Bpf, privileges);
    }
    let (syscall, cap, cap_name, held) = match call {
        Refused::Bpf | Refused::ProgLoad => (
            "bpf()",
            "BPF",
            "CAP_BPF",
            privileges.map(|p| p.cap_bpf || p.cap_sys_admin),
        ),
        Refused::PerfEventOpen => (
            "perf_event_open()",
            "PERFMON",
            "CAP_PERFMON",
            privileges.map(|p| p.cap_perfmon || p.cap_sys_admin),
        ),
    };
    let seccomp_fix = format!(
        "the container's seccomp profile refuses {syscall} to a process with {cap_name} but \
         without CAP_SYS_ADMIN (the default profiles of podman and CRI-O do; containerd >= 1.7 \
         allows it). Fix: run with the Localhost seccomp profile {SECCOMP_PROFILE} \
         (`kubectl apply -k {SECCOMP_OVERLAY}` installs it on every node and selects it)"
    );
    let memlock = if call != Refused::PerfEventOpen {
        ", or, on kernels before 5.11, RLIMIT_MEMLOCK is too small for the maps \
         (deploy/overlays/legacy-kernel adds CAP_SYS_RESOURCE)"
    } else {
        ", or kernel.perf_event_paranoid is above 2 (a Debian/Ubuntu patch): set the sysctl \
         to 2"
    };
    let missing_cap = format!(
        "{cap_name} is missing: add `{cap}` to the container's securityContext.capabilities.add \
         (deploy/base/daemonset.yaml does); kernels before 5.8 have neither {cap_name} nor the \
         BPF ring buffer the program needs, and are not supported"
    );
    match (held, privileges.map(|p| p.seccomp_filter)) {
        (Some(false), _) => missing_cap,
        (Some(true), Some(true)) => {
            format!("{cap_name} is held, so {seccomp_fix}{memlock}")
        }
        (Some(true), Some(false) | None) => format!(
            "{cap_name} is held and no seccomp filter is active, so a Linux security module \
             (SELinux, AppArmor) refused {syscall} (see the audit log){memlock}"
        ),
        (None, _) => format!("either {missing_cap}, or {seccomp_fix}{memlock}"),
    }
}

/// The text of `err` and every error under it, joined as `anyhow`'s `{:#}` would.
fn chain(err: &CaptureError) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        // Wrappers that print their inner error (`#[error("...: {0}")]` with `#[from]`, or
        // aya's "returned {io_error}. Verifier output: ...") would otherwise repeat it.
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

/// Which call a permission error in `err` came from, if it is one: the failing syscall's
/// name when aya says it, else `site` (the call the failing step makes).
fn refused_call(err: &CaptureError, site: Refused) -> Option<Refused> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut call = None;
    let mut errno = None;
    // BPF_PROG_LOAD failed (aya names no call for it).
    let mut verifier = false;
    while let Some(e) = next {
        if let Some(sys) = e.downcast_ref::<aya::sys::SyscallError>() {
            call.get_or_insert(sys.call);
        }
        match e.downcast_ref::<aya::programs::ProgramError>() {
            // `#[error(transparent)]`: the chain skips the SyscallError inside.
            Some(aya::programs::ProgramError::SyscallError(sys)) => {
                call.get_or_insert(sys.call);
            }
            // EACCES from BPF_PROG_LOAD is the verifier's rejection, not a privilege problem.
            Some(aya::programs::ProgramError::LoadError { .. }) => verifier = true,
            _ => {}
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = errno.or(io.raw_os_error());
        }
        next = e.source();
    }
    let refused = match errno {
        Some(libc::EPERM) => true,
        Some(libc::EACCES) => !verifier,
        _ => false,
    };
    if !refused {
        return None;
    }
    Some(match call {
        _ if verifier => Refused::ProgLoad,
        Some(c) if c.starts_with("perf_event_open") => Refused::PerfEventOpen,
        // PERF_EVENT_IOC_SET_BPF is refused when the program reads past the tracepoint's
        // record (a kernel-layout problem), not for lack of privilege.
        Some("PERF_EVENT_IOC_SET_BPF") => return None,
        Some(c) if c.starts_with("bpf") => Refused::Bpf,
        _ => site,
    })
}

/// `err` with the fix appended when it is a permission refusal of `site`'s call; otherwise
/// `err` unchanged.
pub fn explain(err: CaptureError, site: Refused) -> CaptureError {
    match refused_call(&err, site) {
        Some(call) => CaptureError::Refused {
            problem: chain(&err),
            fix: fix_for(call, Privileges::of_self()),
        },
        None => err,
    }
}

/// Fails with the fix when the kernel's BTF is not where the program's offsets come from.
pub fn require_btf() -> Result<(), CaptureError> {
    if Path::new(VMLINUX_BTF).is_file() {
        return Ok(());
    }
    Err(CaptureError::Refused {
        problem: format!("{VMLINUX_BTF} does not exist"),
        fix: "the kernel needs BTF (CONFIG_DEBUG_INFO_BTF=y, Linux >= 5.8 as built by every \
              major distribution); in a container, mount the host's /sys/kernel/btf read-only \
              (a hostPath volume, as deploy/base/daemonset.yaml does)"
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privs(cap_bpf: bool, cap_perfmon: bool, seccomp_filter: bool) -> Option<Privileges> {
        Some(Privileges {
            cap_bpf,
            cap_perfmon,
            cap_sys_admin: false,
            seccomp_filter,
        })
    }

    #[test]
    fn embedded_profile_allows_bpf_and_perf_event_open() {
        let profile: serde_json::Value = serde_json::from_str(SECCOMP_PROFILE_JSON).unwrap();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        let allowed = |name: &str| {
            profile["syscalls"].as_array().unwrap().iter().any(|r| {
                r["action"] == "SCMP_ACT_ALLOW"
                    && r["args"].as_array().is_none_or(Vec::is_empty)
                    && r["names"].as_array().unwrap().iter().any(|n| n == name)
            })
        };
        assert!(allowed("bpf") && allowed("perf_event_open") && allowed("read"));
        assert!(!allowed("mount") && !allowed("unshare") && !allowed("init_module"));
    }

    #[test]
    fn profile_install_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let args = InstallSeccompArgs {
            dir: dir.path().join("seccomp/deny-observer"),
        };
        let path = install_seccomp_profile(&args).unwrap();
        assert_eq!(path, args.dir.join(SECCOMP_PROFILE_FILE));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            SECCOMP_PROFILE_JSON
        );
        std::fs::write(&path, "stale").unwrap();
        install_seccomp_profile(&args).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            SECCOMP_PROFILE_JSON
        );
        let names: Vec<_> = std::fs::read_dir(&args.dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no partial file left behind");
    }

    #[test]
    fn status_lines_are_parsed() {
        // CAP_BPF (39) and CAP_PERFMON (38) only, as the DaemonSet grants; a seccomp filter.
        let status = "Name:\tdeny-observer\nCapInh:\t0000000000000000\n\
                      CapEff:\t000000c000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n";
        assert_eq!(
            Privileges::parse_status(status),
            Some(Privileges {
                cap_bpf: true,
                cap_perfmon: true,
                cap_sys_admin: false,
                seccomp_filter: true,
            })
        );
        let root = "CapEff:\t000001ffffffffff\nSeccomp:\t0\n";
        let p = Privileges::parse_status(root).unwrap();
        assert!(p.cap_sys_admin && p.cap_bpf && !p.seccomp_filter);
        assert_eq!(Privileges::parse_status("Name:\tx\n"), None);
        assert_eq!(Privileges::parse_status("CapEff:\tzz\n"), None);
    }

    #[test]
    fn bpf_refused_under_seccomp_names_the_profile_and_overlay() {
        let fix = fix_for(Refused::Bpf, privs(true, true, true));
        assert!(fix.starts_with("CAP_BPF is held"), "{fix}");
        assert!(fix.contains("seccomp profile refuses bpf()"), "{fix}");
        assert!(fix.contains(SECCOMP_PROFILE), "{fix}");
        assert!(fix.contains(SECCOMP_OVERLAY), "{fix}");
        assert!(fix.contains("RLIMIT_MEMLOCK"), "{fix}");
    }

    #[test]
    fn missing_capability_is_named_with_the_manifest_fix() {
        let fix = fix_for(Refused::Bpf, privs(false, true, true));
        assert!(fix.starts_with("CAP_BPF is missing"), "{fix}");
        assert!(fix.contains("`BPF`"), "{fix}");
        assert!(!fix.contains("seccomp"), "{fix}");
        let fix = fix_for(Refused::PerfEventOpen, privs(true, false, false));
        assert!(fix.starts_with("CAP_PERFMON is missing"), "{fix}");
        assert!(fix.contains("`PERFMON`"), "{fix}");
    }

    #[test]
    fn program_load_without_perfmon_names_perfmon() {
        let fix = fix_for(Refused::ProgLoad, privs(true, false, true));
        assert!(fix.starts_with("CAP_PERFMON is missing"), "{fix}");
        assert!(fix.contains("`PERFMON`"), "{fix}");
        // With both capabilities, a refused program load is the seccomp/LSM case of bpf().
        let fix = fix_for(Refused::ProgLoad, privs(true, true, true));
        assert!(fix.contains("seccomp profile refuses bpf()"), "{fix}");
        let fix = fix_for(Refused::ProgLoad, privs(false, false, true));
        assert!(fix.starts_with("CAP_BPF is missing"), "{fix}");
    }

    #[test]
    fn sys_admin_counts_as_holding_both() {
        let p = Some(Privileges {
            cap_sys_admin: true,
            ..Privileges::default()
        });
        assert!(fix_for(Refused::Bpf, p).starts_with("CAP_BPF is held"));
        assert!(fix_for(Refused::PerfEventOpen, p).starts_with("CAP_PERFMON is held"));
    }

    #[test]
    fn no_seccomp_points_at_lsm_and_limits() {
        let fix = fix_for(Refused::Bpf, privs(true, true, false));
        assert!(fix.contains("security module"), "{fix}");
        assert!(!fix.contains(SECCOMP_PROFILE), "{fix}");
        let fix = fix_for(Refused::PerfEventOpen, privs(true, true, false));
        assert!(fix.contains("perf_event_paranoid"), "{fix}");
    }

    #[test]
    fn unknown_privileges_give_both_causes() {
        let fix = fix_for(Refused::PerfEventOpen, None);
        assert!(fix.contains("CAP_PERFMON is missing"), "{fix}");
        assert!(
            fix.contains("seccomp profile refuses perf_event_open()"),
            "{fix}"
        );
    }

    fn io(errno: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn refusals_are_recognised_by_call_and_errno() {
        let map = CaptureError::Load(aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "FLOWS".into(),
            io_error: io(libc::EPERM),
        }));
        assert_eq!(refused_call(&map, Refused::Bpf), Some(Refused::Bpf));
        let text = chain(&map);
        assert!(text.contains("FLOWS"), "{text}");
        assert!(text.contains("Operation not permitted"), "{text}");

        let perf = CaptureError::Program(aya::programs::ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "perf_event_open",
                io_error: io(libc::EACCES),
            },
        ));
        assert_eq!(
            refused_call(&perf, Refused::Bpf),
            Some(Refused::PerfEventOpen)
        );

        let set_bpf = CaptureError::Program(aya::programs::ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "PERF_EVENT_IOC_SET_BPF",
                io_error: io(libc::EACCES),
            },
        ));
        assert_eq!(refused_call(&set_bpf, Refused::PerfEventOpen), None);

        let enoent = CaptureError::Program(aya::programs::ProgramError::SyscallError(
            aya::sys::SyscallError {
                call: "bpf_raw_tracepoint_open",
                io_error: io(libc::ENOENT),
            },
        ));
        assert_eq!(refused_call(&enoent, Refused::Bpf), None);
        assert!(matches!(
            explain(enoent, Refused::Bpf),
            CaptureError::Program(_)
        ));
    }

    #[test]
    fn explained_error_keeps_the_cause_and_adds_the_fix() {
        let map = CaptureError::Load(aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "FLOWS".into(),
            io_error: io(libc::EPERM),
        }));
        let text = explain(map, Refused::Bpf).to_string();
        assert!(
            text.contains("failed to create map `FLOWS`: Operation not permitted"),
            "{text}"
        );
        // The fix depends on this process's own capabilities and seccomp mode (see the fix_for
        // tests); it is appended after the kernel's error.
        assert!(
            text.contains("Operation not permitted (os error 1). CAP_BPF "),
            "{text}"
        );
    }
}
