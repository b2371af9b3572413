"""Kernel checks: the modules tenant networks need, the cgroup that carries CPU weights,
and the privileges the agent needs. Facts are read into plain values first, so the
evaluation can be fed a fake /sys, /lib/modules and kernel config.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nubes.agent.compute.cgroup import CgroupVersion, find_cpu_hierarchy
from nubes.doctor.report import Check, fail, ok, warn


@dataclass(frozen=True)
class Module:
    name: str
    config: str  # its Kconfig symbol
    why: str
    # The kernel loads these on first use (netlink link kinds, /dev/net/tun, nfnetlink);
    # br_netfilter it does not, and the agent writes its sysctls into every VPC namespace.
    autoloaded: bool = True


MODULES = (
    Module("vxlan", "VXLAN", "the overlay between hosts"),
    Module("tun", "TUN", "VM network interfaces (taps)"),
    Module("bridge", "BRIDGE", "subnet bridges"),
    Module("veth", "VETH", "links from VPCs to external networks"),
    Module("nf_tables", "NF_TABLES", "security groups, anti-spoofing, NAT"),
    Module(
        "br_netfilter",
        "BRIDGE_NETFILTER",
        "stateful security groups on bridged traffic",
        autoloaded=False,
    ),
)


@dataclass(frozen=True)
class KernelFacts:
    """What the running kernel says about its modules."""

    release: str
    loaded: frozenset[str] = frozenset()  # /sys/module entries
    builtin: frozenset[str] = frozenset()  # modules.builtin
    loadable: frozenset[str] = frozenset()  # modules.dep
    config: dict[str, str] = field(default_factory=dict)  # CONFIG_X -> y|m, when readable
    modules_listed: bool = False  # /lib/modules/<release>/modules.dep was readable


def _module_names(text: str) -> frozenset[str]:
    """Module names of a modules.dep or modules.builtin file (kernel/.../name.ko[.xz]:...)."""
    names = set()
    for line in text.splitlines():
        path = line.split(":", 1)[0].strip()
        if path:
            stem = os.path.basename(path).split(".ko", 1)[0]
            names.add(stem.replace("-", "_"))
    return frozenset(names)


def parse_kernel_config(text: str) -> dict[str, str]:
    return dict(re.findall(r"^CONFIG_(\w+)=(\S+)$", text, re.MULTILINE))


def read_kernel_facts(
    sys_module: Path = Path("/sys/module"),
    modules_root: Path = Path("/lib/modules"),
    config_paths: tuple[Path, ...] | None = None,
    release: str | None = None,
) -> KernelFacts:
    release = release or os.uname().release
    try:
        loaded = frozenset(entry.name for entry in sys_module.iterdir())
    except OSError:
        loaded = frozenset()
    directory = modules_root / release
    builtin = _read_names(directory / "modules.builtin")
    dep = _read_names(directory / "modules.dep")
    config: dict[str, str] = {}
    for path in config_paths or (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw) if path.suffix == ".gz" else raw
            config = parse_kernel_config(text.decode("utf-8", "replace"))
            break
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
    return KernelFacts(
        release=release,
        loaded=loaded,
        builtin=builtin or frozenset(),
        loadable=dep or frozenset(),
        config=config,
        modules_listed=dep is not None,
    )


def _read_names(path: Path) -> frozenset[str] | None:
    try:
        return _module_names(path.read_text(errors="replace"))
    except OSError:
        return None


def check_module(module: Module, facts: KernelFacts) -> Check:
    name = f"module {module.name}"
    setting = facts.config.get(module.config)
    if module.name in facts.loaded:
        return ok(name, f"loaded; for {module.why}")
    if module.name in facts.builtin or setting == "y":
        return ok(name, f"built into kernel {facts.release}; for {module.why}")
    if module.name in facts.loadable:
        if module.autoloaded:
            return ok(name, f"loadable, the kernel loads it on first use; for {module.why}")
        return fail(
            name,
            f"not loaded, and the kernel does not load it by itself; needed for {module.why}",
            f"modprobe {module.name} && echo {module.name} > /etc/modules-load.d/nubes.conf",
        )
    missing_fix = (
        f"install the modules of the running kernel (apt-get install linux-image-{facts.release})"
        f" or boot a kernel built with CONFIG_{module.config}"
    )
    if facts.modules_listed or facts.config:
        return fail(
            name,
            f"kernel {facts.release} has no {module.name}; needed for {module.why}",
            missing_fix,
        )
    return warn(
        name,
        f"cannot tell whether kernel {facts.release} has {module.name}: not loaded, and "
        f"neither /lib/modules/{facts.release} nor the kernel config is readable",
        missing_fix,
    )


def check_modules(facts: KernelFacts) -> list[Check]:
    return [check_module(module, facts) for module in MODULES]


def check_cgroup(mountinfo: str) -> Check:
    """cgroup v2 with the cpu controller; the agent falls back to v1 cpu.shares."""
    hierarchy = find_cpu_hierarchy(mountinfo)
    if hierarchy is None:
        return fail(
            "cgroup",
            "no cgroup hierarchy has the cpu controller: VM CPU weights cannot be set",
            "mount cgroup2 on /sys/fs/cgroup (systemd does) on a kernel with CONFIG_CGROUP_SCHED",
        )
    if not os.access(hierarchy.mount, os.W_OK):
        return fail(
            "cgroup",
            f"{hierarchy.mount} (cgroup {hierarchy.version}) is not writable: the agent "
            "cannot make VM groups",
            "run as root, outside a container that mounts cgroups read-only",
        )
    if hierarchy.version is CgroupVersion.V1:
        return warn(
            "cgroup",
            f"the cpu controller is on cgroup v1 ({hierarchy.mount}): CPU weights use cpu.shares",
            "for cgroup v2, boot with systemd.unified_cgroup_hierarchy=1 "
            "(GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub)",
        )
    return ok("cgroup", f"cgroup v2 at {hierarchy.mount} with the cpu controller (cpu.weight)")


# capabilities(7): what the agent's work needs beyond file access.
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def parse_effective_capabilities(status: str) -> int | None:
    found = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    return int(found.group(1), 16) if found else None


def check_privileges(euid: int, capabilities: int | None) -> Check:
    """Root with namespaces, links and firewalls allowed (this process's rights, as the
    agent's when it runs the same way)."""
    missing = [
        name
        for name, bit in CAPABILITIES.items()
        if capabilities is not None and not capabilities >> bit & 1
    ]
    if euid != 0:
        return fail(
            "privileges",
            f"running as uid {euid}: the agent makes namespaces, links and firewalls",
            "run nubes up, nubes agent and nubes doctor as root (sudo)",
        )
    if missing:
        return fail(
            "privileges",
            f"root, but without {', '.join(missing)} (a restricted container?)",
            f"give the process {', '.join(missing)} (e.g. docker run --privileged)",
        )
    return ok("privileges", "root with CAP_NET_ADMIN and CAP_SYS_ADMIN")
