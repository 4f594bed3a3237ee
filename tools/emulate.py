"""Linux primitives the emulated edge cluster is built from.

Network namespaces, veth pairs, a bridge, `tc tbf` shaping and cgroup v1 limits (cpu, cpuacct, cpuset,
memory). Each function does one kernel-visible thing, by calling `ip`/`tc` or by writing cgroupfs, and
raises EmulationError carrying the failing command's own message. Functions that remove things accept
things that are already gone, so a teardown can be repeated after any crash.

tools/testbed.py composes these into a cluster; nothing here knows about cluster files or state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

NEEDS_ROOT = "testbed needs root: network namespaces and cgroups"

NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory")
CFS_PERIOD_US = 100_000
# The kernel refuses quotas under 1 ms.
CFS_MIN_QUOTA_US = 1_000
# Name of a device's end of its veth pair, inside its namespace.
DEVICE_IF = "eth0"
# Queueing bound of the tbf qdisc: packets waiting longer are dropped, as on a real router buffer.
TBF_LATENCY = "50ms"


class EmulationError(RuntimeError):
    """A Linux primitive failed; the message names the command or file and the kernel's reason."""


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise EmulationError(f"testbed needs `{name}` (iproute2) on PATH")
    return path


def run(argv: Sequence[str]) -> str:
    """Run a command, return its stdout, raise EmulationError with its last stderr line on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise EmulationError(f"`{' '.join(argv)}` failed: {reason}")
    return proc.stdout


def host_problem() -> str | None:
    """Why this host cannot run a testbed, or None if it can."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    for tool in ("ip", "tc"):
        try:
            _tool(tool)
        except EmulationError as exc:
            return str(exc)
    for controller in CONTROLLERS:
        if not (CGROUP_ROOT / controller / "cgroup.procs").exists():
            return f"testbed needs cgroup v1 controller {controller!r} mounted at {CGROUP_ROOT / controller}"
    return None


def check_host() -> None:
    problem = host_problem()
    if problem is not None:
        raise EmulationError(problem)


# --- network namespaces -------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def add_netns(name: str) -> None:
    run([_tool("ip"), "netns", "add", name])
    run([_tool("ip"), "-n", name, "link", "set", "lo", "up"])


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run([_tool("ip"), "netns", "delete", name])


def netns_pids(name: str) -> set[int]:
    """Processes whose network namespace is `name` (empty if the namespace is gone)."""
    if not netns_exists(name):
        return set()
    try:
        out = run([_tool("ip"), "netns", "pids", name])
    except EmulationError:
        return set()
    return {int(word) for word in out.split()}


# --- links -------------------------------------------------------------------------------------------


def _ip_in(netns: str | None) -> list[str]:
    return [_tool("ip")] if netns is None else [_tool("ip"), "-n", netns]


def list_links(netns: str | None = None) -> list[str]:
    out = run([*_ip_in(netns), "-j", "link", "show"])
    return sorted(link["ifname"] for link in json.loads(out or "[]"))


def link_exists(name: str, netns: str | None = None) -> bool:
    return name in list_links(netns)


def delete_link(name: str) -> None:
    """Delete a link of the root namespace; deleting one end of a veth pair deletes both."""
    if link_exists(name):
        run([_tool("ip"), "link", "delete", name])


def add_bridge(name: str, cidr: str) -> None:
    """A bridge in the root namespace holding the client address `cidr`, forwarding nothing elsewhere."""
    ip = _tool("ip")
    run([ip, "link", "add", name, "type", "bridge"])
    # No IPv6 link-local chatter, and the root namespace must never route a device's packet onwards.
    run([ip, "link", "set", name, "addrgenmode", "none"])
    _write(Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding"), "0")
    run([ip, "addr", "add", cidr, "dev", name])
    run([ip, "link", "set", name, "up"])


def add_veth(host_if: str, bridge: str, netns: str, cidr: str) -> None:
    """A veth pair: `host_if` on `bridge` in the root namespace, DEVICE_IF with address `cidr` in `netns`."""
    ip = _tool("ip")
    run([ip, "link", "add", host_if, "type", "veth", "peer", "name", DEVICE_IF, "netns", netns])
    run([ip, "link", "set", host_if, "addrgenmode", "none"])
    run([ip, "-n", netns, "link", "set", DEVICE_IF, "addrgenmode", "none"])
    run([ip, "link", "set", host_if, "master", bridge, "up"])
    run([ip, "-n", netns, "addr", "add", cidr, "dev", DEVICE_IF])
    run([ip, "-n", netns, "link", "set", DEVICE_IF, "up"])


def routes(netns: str | None = None) -> list[dict]:
    return json.loads(run([*_ip_in(netns), "-j", "-4", "route", "show"]) or "[]")


def ipv4_addresses(netns: str | None = None) -> list[str]:
    """Every IPv4 address (with prefix length) configured in a namespace."""
    out = json.loads(run([*_ip_in(netns), "-j", "-4", "addr", "show"]) or "[]")
    return [f"{a['local']}/{a['prefixlen']}" for link in out for a in link.get("addr_info", [])]


# --- shaping -----------------------------------------------------------------------------------------


def tbf_args(rate_bps: int) -> list[str]:
    """tbf options for a rate in bit/s.

    The bucket holds at least one 64 KiB GSO packet (smaller makes tbf segment every packet) and at least
    10 ms of traffic, since tokens refill once per timer tick and HZ may be as low as 100.
    """
    if rate_bps <= 0:
        raise EmulationError(f"tbf rate must be positive, got {rate_bps} bit/s")
    burst = max(64 * 1024, math.ceil(rate_bps / 8 / 100))
    return ["tbf", "rate", f"{rate_bps}bit", "burst", str(burst), "latency", TBF_LATENCY]


def shape_egress(dev: str, rate_bps: int, netns: str | None = None) -> None:
    """Limit what leaves `dev` to `rate_bps` with a token bucket."""
    tc = [_tool("tc")] if netns is None else [_tool("tc"), "-n", netns]
    run([*tc, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_bps)])


def egress_rate_bps(dev: str, netns: str | None = None) -> int | None:
    """The tbf rate on `dev` in bit/s, or None if its egress is not shaped."""
    tc = [_tool("tc")] if netns is None else [_tool("tc"), "-n", netns]
    for qdisc in json.loads(run([*tc, "-j", "qdisc", "show", "dev", dev]) or "[]"):
        if qdisc.get("kind") == "tbf" and qdisc.get("root"):
            return int(qdisc["options"]["rate"]) * 8
    return None


# --- cgroups (v1) ------------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise EmulationError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise EmulationError(f"cannot read {path}: {exc.strerror}") from None


def parse_cpu_list(text: str) -> set[int]:
    """CPU numbers of a kernel cpu list such as "0-2,5"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise EmulationError(f"bad cpu list {text!r}: expected e.g. \"1\" or \"0-1,3\"") from None
        if lo < 0 or hi < lo:
            raise EmulationError(f"bad cpu list {text!r}: range {part!r} is empty or negative")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise EmulationError(f"bad cpu list {text!r}: no cpu in it")
    return cpus


def host_cpus() -> set[int]:
    return parse_cpu_list(_read(CGROUP_ROOT / "cpuset" / "cpuset.cpus"))


def cgroup_dir(controller: str, group: str) -> Path:
    return CGROUP_ROOT / controller / group


def list_cgroups() -> set[str]:
    return {p.name for c in CONTROLLERS if (CGROUP_ROOT / c).is_dir() for p in (CGROUP_ROOT / c).iterdir()
            if p.is_dir()}


def create_cgroup(group: str, *, cpu: float | None, cpuset: str | None, memory_bytes: int | None) -> None:
    """One cgroup named `group` under every controller; None leaves that resource unlimited."""
    for controller in CONTROLLERS:
        cgroup_dir(controller, group).mkdir(exist_ok=True)
    cpu_dir = cgroup_dir("cpu", group)
    _write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
    quota = -1 if cpu is None else max(CFS_MIN_QUOTA_US, round(cpu * CFS_PERIOD_US))
    _write(cpu_dir / "cpu.cfs_quota_us", str(quota))
    # A cpuset cgroup admits no task until both cpus and mems are set.
    cpus = cpuset if cpuset is not None else _read(CGROUP_ROOT / "cpuset" / "cpuset.cpus").strip()
    _write(cgroup_dir("cpuset", group) / "cpuset.cpus", cpus)
    _write(cgroup_dir("cpuset", group) / "cpuset.mems", _read(CGROUP_ROOT / "cpuset" / "cpuset.mems").strip())
    if memory_bytes is not None:
        mem_dir = cgroup_dir("memory", group)
        _write(mem_dir / "memory.limit_in_bytes", str(memory_bytes))
        # With swap accounting the limit must cover memory+swap too, or a device could swap past it.
        if (mem_dir / "memory.memsw.limit_in_bytes").exists():
            _write(mem_dir / "memory.memsw.limit_in_bytes", str(memory_bytes))


def cgroup_procs_files(group: str) -> list[Path]:
    """The files a process writes its pid to in order to join `group` under every controller."""
    return [cgroup_dir(c, group) / "cgroup.procs" for c in CONTROLLERS]


def cgroup_pids(group: str) -> set[int]:
    pids: set[int] = set()
    for procs in cgroup_procs_files(group):
        if procs.exists():
            pids.update(int(line) for line in _read(procs).split())
    return pids


def remove_cgroup(group: str, timeout_s: float = 5.0) -> None:
    """Remove `group` under every controller, SIGKILLing any task still in it.

    A task can join after the caller stopped the group's processes: a process being started has
    forked but joins only just before it execs. Killing what is inside on every retry catches those.
    """
    deadline = time.monotonic() + timeout_s
    for controller in CONTROLLERS:
        path = cgroup_dir(controller, group)
        while path.exists():
            try:
                path.rmdir()
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise EmulationError(f"cannot remove cgroup {path}: {exc.strerror}") from None
                signal_pids(cgroup_pids(group), signal.SIGKILL)
                time.sleep(0.02)


def peak_memory(group: str) -> int:
    """Highest memory charged to `group` since creation or reset (bytes; includes its page cache)."""
    return int(_read(cgroup_dir("memory", group) / "memory.max_usage_in_bytes"))


def reset_peak_memory(group: str) -> None:
    _write(cgroup_dir("memory", group) / "memory.max_usage_in_bytes", "0")


def drop_page_cache() -> None:
    """Drop the machine's clean page cache.

    A cached page is charged to the cgroup that first read it, so files the host has just written or
    read (stage bundles, weights) cost a device nothing until they are dropped. Machine-wide.
    """
    os.sync()
    _write(Path("/proc/sys/vm/drop_caches"), "1")


def memory_usage(group: str) -> int:
    return int(_read(cgroup_dir("memory", group) / "memory.usage_in_bytes"))


def cpu_time_ns(group: str) -> int:
    """CPU time consumed by every task of `group` so far (ns)."""
    return int(_read(cgroup_dir("cpuacct", group) / "cpuacct.usage"))


def oom_kills(group: str) -> int:
    """How many tasks of `group` the OOM killer has killed."""
    for line in _read(cgroup_dir("memory", group) / "memory.oom_control").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


# --- processes ---------------------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (tells a live process from a reused pid), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so count after its closing parenthesis.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def process_alive(pid: int, start_ticks: int | None) -> bool:
    return process_start_ticks(pid) is not None and process_start_ticks(pid) == start_ticks


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def confine_argv(netns: str, procs_files: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside `netns` and inside the cgroups of `procs_files`, under the same pid.

    A shell joins the cgroups with its own pid, then execs `ip netns exec`, which execs `argv`: the pid
    Popen returns is the final process, and every child it forks stays in the cgroups. Joining happens
    before `ip netns exec` because that command remounts /sys, hiding the cgroup filesystems.
    """
    script = (
        'ns="$1"; shift; '
        'while [ "$1" != "--" ]; do '
        'echo $$ > "$1" || { echo "ep-run: cannot join $1" >&2; exit 125; }; shift; '
        'done; '
        'shift; exec "$EP_IP" netns exec "$ns" "$@"'
    )
    return ["/bin/sh", "-c", script.replace("$EP_IP", _tool("ip")), "ep-run", netns,
            *[str(p) for p in procs_files], "--", *argv]


def stop_processes(pids_of: Callable[[], set[int]], grace_s: float, kill_timeout_s: float = 5.0) -> set[int]:
    """SIGTERM everything `pids_of()` returns, SIGKILL what is left after `grace_s`; return survivors.

    `pids_of` is called repeatedly, so processes forked while stopping are caught too. Each process gets
    one SIGTERM only: a second one means "stop now" to many programs and would cut a graceful drain short.
    """
    terminated: set[int] = set()
    deadline = time.monotonic() + grace_s
    pids = pids_of()
    while pids and time.monotonic() < deadline:
        signal_pids(pids - terminated, signal.SIGTERM)
        terminated |= pids
        time.sleep(0.05)
        pids = pids_of()
    deadline = time.monotonic() + kill_timeout_s
    while pids and time.monotonic() < deadline:
        signal_pids(pids, signal.SIGKILL)
        time.sleep(0.05)
        pids = pids_of()
    return pids
