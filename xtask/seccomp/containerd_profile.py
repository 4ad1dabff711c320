#!/usr/bin/env python3
"""Translates containerd's default seccomp profile (the Go function DefaultProfile in
contrib/seccomp/seccomp_default.go) into JSON, because containerd generates it in code and
ships no JSON.

    containerd_profile.py SECCOMP_DEFAULT_GO conditional > containerd-default.json
    containerd_profile.py SECCOMP_DEFAULT_GO localhost   > deny-observer.json

`conditional`: every rule of the function, its `switch` cases kept as conditions in the
containers/moby profile format (`includes`/`excludes` on caps, arches, minKernel), so podman
applies it exactly as containerd would for any capability set and architecture.
`localhost`: a plain OCI profile (what kubelet hands containerd or CRI-O for `type: Localhost`)
evaluated for deny-observer's container: CAP_BPF and CAP_PERFMON, amd64 and arm64, Linux >= 5.8.

The parser reads the function's structure (the base list, the kernel-version block, the arch
switch, the capability switch, the !admin block); it fails loudly on anything it does not know.
"""
import json
import re
import sys

# Values the rules use (golang.org/x/sys/unix, linux/amd64 and linux/arm64 agree on these).
CONSTANTS = {
    "unix.AF_ALG": 38,
    "unix.AF_VSOCK": 40,
    "unix.CLONE_NEWNS": 0x00020000,
    "unix.CLONE_NEWUTS": 0x04000000,
    "unix.CLONE_NEWIPC": 0x08000000,
    "unix.CLONE_NEWUSER": 0x10000000,
    "unix.CLONE_NEWPID": 0x20000000,
    "unix.CLONE_NEWNET": 0x40000000,
    "unix.CLONE_NEWCGROUP": 0x02000000,
}
ACTIONS = {"ActAllow": "SCMP_ACT_ALLOW", "ActErrno": "SCMP_ACT_ERRNO"}
OPS = {
    "OpEqualTo": "SCMP_CMP_EQ",
    "OpLessThan": "SCMP_CMP_LT",
    "OpGreaterThan": "SCMP_CMP_GT",
    "OpMaskedEqual": "SCMP_CMP_MASKED_EQ",
    "OpNotEqual": "SCMP_CMP_NE",
    "OpLessEqual": "SCMP_CMP_LE",
    "OpGreaterEqual": "SCMP_CMP_GE",
}
ENOSYS = 38
# arches() of the Go file, as libseccomp names: GOARCH -> (native, sub-architectures).
ARCH_MAP = {
    "amd64": ("SCMP_ARCH_X86_64", ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    "arm64": ("SCMP_ARCH_AARCH64", ["SCMP_ARCH_ARM"]),
    "s390x": ("SCMP_ARCH_S390X", ["SCMP_ARCH_S390"]),
    "riscv64": ("SCMP_ARCH_RISCV64", []),
}


def fail(msg):
    sys.exit(f"containerd_profile.py: {msg}")


def value(expr):
    expr = expr.strip()
    for name, v in CONSTANTS.items():
        expr = expr.replace(name, str(v))
    if not re.fullmatch(r"[0-9a-fA-Fx|+ ]+", expr):
        fail(f"unknown value expression {expr!r}")
    return eval(expr)  # only integers, | and + remain


def entries(block):
    """Every rule in `block`: each starts at a `Names:` field."""
    starts = [m.start() for m in re.finditer(r"\bNames:", block)]
    out = []
    for i, start in enumerate(starts):
        text = block[start : starts[i + 1] if i + 1 < len(starts) else len(block)]
        names_body = re.match(r"Names:\s*\[\]string\{(.*?)\}", text, re.S)
        if not names_body:
            fail(f"cannot read Names in {text[:80]!r}")
        names = re.findall(r'"([a-z0-9_]+)"', names_body.group(1))
        action = re.search(r"Action:\s*specs\.(\w+)", text)
        if not names or not action or action.group(1) not in ACTIONS:
            fail(f"cannot read rule {text[:120]!r}")
        rule = {"names": names, "action": ACTIONS[action.group(1)], "args": []}
        for arg in re.finditer(r"\{\s*Index:\s*(\d+),\s*Value:\s*([^,]+),\s*(?:ValueTwo:\s*([^,]+),\s*)?Op:\s*specs\.(\w+),?\s*\}", text):
            if arg.group(4) not in OPS:
                fail(f"unknown op {arg.group(4)}")
            rule["args"].append({
                "index": int(arg.group(1)),
                "value": value(arg.group(2)),
                "valueTwo": value(arg.group(3)) if arg.group(3) else 0,
                "op": OPS[arg.group(4)],
            })
        if "Index:" in text and not rule["args"]:
            fail(f"cannot read args of {names}")
        if "ErrnoRet" in text:
            if "&nosys" not in text:
                fail(f"unknown ErrnoRet in {names}")
            rule["errnoRet"] = ENOSYS
        out.append(rule)
    return out


def between(text, start, end):
    a = text.find(start)
    b = text.find(end, a + len(start))
    if a < 0 or b < 0:
        fail(f"marker not found: {start!r} .. {end!r}")
    return text[a + len(start) : b]


def cases(block):
    """`case "a", "b":` sections of a switch: [(labels, body)]; `default:` has labels None."""
    parts = re.split(r"\n\s*(case [^\n]*:|default:)\s*\n", block)
    out = []
    for i in range(1, len(parts), 2):
        label = parts[i]
        labels = None if label == "default:" else re.findall(r'"([^"]+)"', label)
        out.append((labels, parts[i + 1]))
    return out


def parse(go):
    body = between(go, "func DefaultProfile(", "\treturn s\n}")
    rules = []  # (rule, conditions)
    base = between(body, "syscalls := []specs.LinuxSyscall{", "\ts := &specs.LinuxSeccomp{")
    rules += [(r, {}) for r in entries(base)]
    if "DefaultAction: specs.ActErrno" not in body:
        fail("default action is not ActErrno")
    kernel = between(body, "// include by kernel version", "// include by arch")
    m = re.search(r"KernelVersion\{Kernel:\s*(\d+),\s*Major:\s*(\d+)\}", kernel)
    if not m:
        fail("kernel version condition not found")
    rules += [(r, {"minKernel": f"{m.group(1)}.{m.group(2)}"}) for r in entries(kernel)]
    for labels, case in cases(between(body, "switch runtime.GOARCH {", "admin := false")):
        rules += [(r, {"arches": labels}) for r in entries(case)]
    caps = between(body, "range sp.Process.Capabilities.Bounding {", "if !admin {")
    for labels, case in cases(caps):
        rules += [(r, {"caps": labels}) for r in entries(case)]
    not_admin = body[body.find("if !admin {") :]
    inner = between(not_admin, "switch runtime.GOARCH {", "// clone3")
    for labels, case in cases(inner):
        cond = {"not_caps": ["CAP_SYS_ADMIN"]}
        if labels is None:
            # default: every arch the other cases do not name
            cond["not_arches"] = [l for ls, _ in cases(inner) if ls for l in ls]
        else:
            cond["arches"] = labels
        rules += [(r, cond) for r in entries(case)]
    rules += [(r, {"not_caps": ["CAP_SYS_ADMIN"]}) for r in entries(not_admin[not_admin.find("// clone3") :])]
    return rules


def conditional(rules):
    out = []
    for rule, cond in rules:
        r = dict(rule)
        inc, exc = {}, {}
        if "caps" in cond:
            inc["caps"] = cond["caps"]
        if "arches" in cond:
            inc["arches"] = cond["arches"]
        if "minKernel" in cond:
            inc["minKernel"] = cond["minKernel"]
        if "not_caps" in cond:
            exc["caps"] = cond["not_caps"]
        if "not_arches" in cond:
            exc["arches"] = cond["not_arches"]
        r["includes"], r["excludes"] = inc, exc
        out.append(r)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": [
            {"architecture": native, "subArchitectures": subs}
            for native, subs in ARCH_MAP.values()
        ],
        "syscalls": out,
    }


def localhost(rules, caps=("CAP_BPF", "CAP_PERFMON"), arches=("amd64", "arm64")):
    def applies(cond):
        if "caps" in cond and not set(cond["caps"]) & set(caps):
            return False
        if "not_caps" in cond and set(cond["not_caps"]) & set(caps):
            return False
        if "arches" in cond and not set(cond["arches"]) & set(arches):
            return False
        if "not_arches" in cond and set(arches) <= set(cond["not_arches"]):
            return False
        return True  # minKernel 4.8: deny-observer needs >= 5.8 anyway

    architectures = []
    for a in arches:
        native, subs = ARCH_MAP[a]
        architectures += [native] + subs
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": architectures,
        "syscalls": [rule for rule, cond in rules if applies(cond)],
    }


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ("conditional", "localhost"):
        fail(__doc__)
    rules = parse(open(sys.argv[1]).read())
    profile = conditional(rules) if sys.argv[2] == "conditional" else localhost(rules)
    json.dump(profile, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
