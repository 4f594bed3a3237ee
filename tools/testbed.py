"""An emulated heterogeneous edge cluster on one Linux machine, from the planner's cluster TOML.

Every device of the cluster file becomes a network namespace joined by a veth pair to a bridge, its
traffic shaped by `tc tbf` in both directions to its `bandwidth`, its processes confined by cgroup v1
to its `cpu` share (cfs quota), optional `cpuset` and `memory` limit. The client is the root namespace,
at .1 of a /24 in 10.213.0.0/16 that only this testbed uses; devices have no other route, so traffic
stays between the namespaces (no NAT, no forwarding).

Everything created is recorded in /run/edgepipe-testbed/<name>.json *before* it is created, so a
teardown after any crash (`down NAME`, or the next `up`, which sweeps testbeds whose owner died) finds it.

    with Testbed("cluster.toml") as bed:
        listen = bed.endpoint("fast-1", 5555)
        agent = bed.run_in("fast-1", ["edgepipe-agent", "serve", "stage-0", "--listen", listen])
        ...
        print(bed.peak_memory("fast-1"))

CLI: `python tools/testbed.py up|down|run|status --help`. Import it with tools/ on sys.path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import emulate
import tomllib
import typer
from edgepipe.planner.units import parse_bytes, parse_mbps
from emulate import EmulationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

STATE_DIR = Path("/run/edgepipe-testbed")
STATE_FORMAT = "edgepipe.testbed-state"
STATE_VERSION = 1
# Testbed k uses 10.213.k.0/24: the client is .1, device i is .(10 + i).
SUBNET_BASE = ipaddress.IPv4Network("10.213.0.0/16")
CLIENT_HOST = 1
FIRST_DEVICE_HOST = 10
MAX_DEVICES = 254 - FIRST_DEVICE_HOST
# Every name this tool creates starts with "ep-<run id>-"; `down --all` sweeps exactly this pattern.
RESOURCE_PATTERN = re.compile(r"^ep-[0-9a-f]{6}-")
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Device keys of the planner (docs/formats/cluster.md) and of the testbed; any other key is a typo.
PLANNER_DEVICE_KEYS = frozenset({"name", "type", "address", "memory", "bandwidth"})
TESTBED_DEVICE_KEYS = frozenset({"cpu", "cpuset"})


class TestbedError(Exception):
    """Bad cluster file, unknown testbed or device, or a testbed that is already up."""

    __test__ = False  # not a pytest test class, despite the name


# --- the cluster description ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """What the testbed emulates for one device; None = not limited."""

    name: str
    cpu: float | None  # fraction of one core
    cpuset: str | None  # kernel cpu list, e.g. "1" or "0-1"
    memory_bytes: int | None
    bandwidth_bps: int | None  # egress and ingress


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    source: str
    devices: tuple[DeviceSpec, ...]
    warnings: tuple[str, ...]  # parts of the file the testbed cannot emulate


def parse_cpu_share(value: Any) -> float:
    """Fraction of one core: a plain number > 0 (0.25 = a quarter of a core, 2 = two cores)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a fraction of one core such as 0.5, got {value!r}")
    return float(value)


def _limit(entry: dict[str, Any], key: str, parse: Callable[[Any], float], where: str) -> float | None:
    """entry[key] parsed with the planner's units (so both read a file alike), > 0; None if absent."""
    if key not in entry:
        return None
    try:
        value = parse(entry[key])
    except ValueError as exc:
        raise TestbedError(f"{where}.{key}: {exc}") from None
    if not value > 0:
        raise TestbedError(f"{where}.{key}: must be > 0 for the testbed, got {entry[key]!r}")
    return value


def parse_device(entry: Any, source: str, index: int) -> tuple[DeviceSpec, list[str]]:
    if not isinstance(entry, dict):
        raise TestbedError(f"{source}: [[device]] #{index + 1}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise TestbedError(f"{source}: [[device]] #{index + 1}.name: expected 1-64 letters, digits, '_', '.' "
                           f"or '-' starting with a letter or digit, got {name!r}")
    where = f"{source}: [[device]] {name!r}"
    cpu = _limit(entry, "cpu", parse_cpu_share, where)
    memory = _limit(entry, "memory", parse_bytes, where)
    bandwidth_mbps = _limit(entry, "bandwidth", parse_mbps, where)
    cpuset = entry.get("cpuset")
    if cpuset is not None:
        if isinstance(cpuset, int) and not isinstance(cpuset, bool):
            cpuset = str(cpuset)
        if not isinstance(cpuset, str):
            raise TestbedError(f'{where}.cpuset: expected a cpu list such as "1" or "0-1", got {cpuset!r}')
        try:
            emulate.parse_cpu_list(cpuset)
        except EmulationError as exc:
            raise TestbedError(f"{where}.cpuset: {exc}") from None
    warnings = []
    unknown = sorted(set(entry) - PLANNER_DEVICE_KEYS - TESTBED_DEVICE_KEYS)
    if unknown:
        known = ", ".join(sorted(PLANNER_DEVICE_KEYS | TESTBED_DEVICE_KEYS))
        warnings.append(f"{where}: unknown field(s) {', '.join(unknown)} ignored (known: {known})")
    bandwidth_bps = None if bandwidth_mbps is None else max(1, round(bandwidth_mbps * 1e6))
    return DeviceSpec(name, cpu, cpuset, None if memory is None else round(memory), bandwidth_bps), warnings


def parse_cluster(data: dict[str, Any], source: str) -> ClusterSpec:
    """The testbed's view of a cluster TOML document already parsed into `data`."""
    cluster = data.get("cluster", {})
    if not isinstance(cluster, dict):
        raise TestbedError(f"{source}: [cluster]: must be a table")
    name = cluster.get("name", Path(source).stem)
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise TestbedError(f"{source}: [cluster].name: expected 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise TestbedError(f"{source}: no [[device]] entries: the testbed needs at least one device")
    if len(entries) > MAX_DEVICES:
        raise TestbedError(f"{source}: {len(entries)} devices; the testbed supports at most {MAX_DEVICES}")
    devices, warnings = [], []
    for index, entry in enumerate(entries):
        device, device_warnings = parse_device(entry, source, index)
        if any(d.name == device.name for d in devices):
            raise TestbedError(f"{source}: [[device]] {device.name!r}: name appears twice")
        devices.append(device)
        warnings.extend(device_warnings)
    if data.get("link"):
        warnings.append(f"{source}: [[link]] entries (bandwidth, latency) are not emulated: each device is "
                        "shaped by its own bandwidth, so a link runs at the smaller end's")
    if "client_bandwidth" in cluster:
        warnings.append(f"{source}: client_bandwidth is not emulated: the client (root namespace) is "
                        "unshaped and reaches each device at that device's bandwidth")
    return ClusterSpec(name, source, tuple(devices), tuple(warnings))


def load_cluster(path: str | os.PathLike[str]) -> ClusterSpec:
    """Read a cluster TOML file; TestbedError names the file, the device and the field on bad input."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TestbedError(f"{path}: cannot read cluster file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TestbedError(f"{path}: not valid TOML: {exc}") from None
    return parse_cluster(data, str(path))


# --- the state file: everything one testbed creates -----------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    name: str
    netns: str
    veth: str  # root-namespace end of the device's veth pair; the other end is eth0 in `netns`
    address: str
    cgroup: str  # the same group name under every cgroup controller
    cpu: float | None
    cpuset: str | None
    memory_bytes: int | None
    bandwidth_bps: int | None


@dataclass(frozen=True)
class TestbedState:
    __test__ = False

    name: str
    run_id: str
    subnet: str
    bridge: str
    client_address: str
    owner_pid: int | None  # None: detached (made by `up`), removed only by `down`
    owner_start: int | None  # start ticks of owner_pid, to tell it from a reused pid
    cluster_file: str
    created: float
    devices: tuple[DeviceState, ...]

    def to_json(self) -> str:
        body = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, indent=2)

    @staticmethod
    def from_json(text: str, source: str = "state") -> TestbedState:
        try:
            body = json.loads(text)
            if body.get("format") != STATE_FORMAT or body.get("format_version") != STATE_VERSION:
                raise TestbedError(f"{source}: not a {STATE_FORMAT} v{STATE_VERSION} file")
            del body["format"], body["format_version"]
            body["devices"] = tuple(DeviceState(**d) for d in body["devices"])
            return TestbedState(**body)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise TestbedError(f"{source}: corrupt testbed state: {exc}") from None

    def device(self, name: str) -> DeviceState:
        for device in self.devices:
            if device.name == name:
                return device
        known = ", ".join(d.name for d in self.devices)
        raise TestbedError(f"testbed {self.name!r} has no device {name!r} (devices: {known})")


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def save_state(state: TestbedState) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = state_path(state.name).with_suffix(".tmp")
    tmp.write_text(state.to_json())
    tmp.replace(state_path(state.name))


def load_state(name: str) -> TestbedState:
    path = state_path(name)
    if not DEVICE_NAME.match(name) or not path.exists():
        up = ", ".join(s.name for s in list_states()) or "none"
        raise TestbedError(f"no testbed named {name!r} is up (up: {up})")
    return TestbedState.from_json(path.read_text(), str(path))


def list_states() -> list[TestbedState]:
    if not STATE_DIR.is_dir():
        return []
    return [TestbedState.from_json(p.read_text(), str(p)) for p in sorted(STATE_DIR.glob("*.json"))]


@contextlib.contextmanager
def state_lock() -> Iterator[None]:
    """Serialises subnet choice and state files between concurrent `up`/`down` on this machine."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def owner_status(state: TestbedState) -> str:
    """"detached", "alive" or "dead" (a crashed owner: its testbed is stale)."""
    if state.owner_pid is None:
        return "detached"
    return "alive" if emulate.process_alive(state.owner_pid, state.owner_start) else "dead"


def free_subnet(taken: Sequence[str]) -> ipaddress.IPv4Network:
    """The first /24 of SUBNET_BASE overlapping none of the `taken` networks or addresses."""
    used = [ipaddress.ip_network(t, strict=False) for t in taken]
    for subnet in SUBNET_BASE.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise TestbedError(f"no free /24 left in {SUBNET_BASE}: run `down --all`")


def plan_state(spec: ClusterSpec, name: str, run_id: str, subnet: ipaddress.IPv4Network,
               owner: tuple[int, int | None] | None) -> TestbedState:
    """Names and addresses of everything a testbed for `spec` will create (pure)."""
    prefix = f"ep-{run_id}"
    hosts = list(subnet.hosts())
    devices = tuple(
        DeviceState(name=d.name, netns=f"{prefix}-{d.name}", veth=f"{prefix}-h{i}",
                    address=str(hosts[FIRST_DEVICE_HOST + i - 1]), cgroup=f"{prefix}-{d.name}", cpu=d.cpu,
                    cpuset=d.cpuset, memory_bytes=d.memory_bytes, bandwidth_bps=d.bandwidth_bps)
        for i, d in enumerate(spec.devices)
    )
    return TestbedState(name=name, run_id=run_id, subnet=str(subnet), bridge=f"{prefix}-br",
                        client_address=str(hosts[CLIENT_HOST - 1]), owner_pid=owner[0] if owner else None,
                        owner_start=owner[1] if owner else None, cluster_file=spec.source,
                        created=time.time(), devices=devices)


# --- bringing a testbed up and down ----------------------------------------------------------------------


def create(state: TestbedState, on_step: Callable[[str], None] | None = None) -> None:
    """Create the bridge, then per device: namespace, veth, shaping both ways, cgroups."""
    step = on_step or (lambda _: None)
    prefix_len = ipaddress.ip_network(state.subnet).prefixlen
    step(f"bridge {state.bridge}")
    emulate.add_bridge(state.bridge, f"{state.client_address}/{prefix_len}")
    for device in state.devices:
        step(f"device {device.name}")
        emulate.add_netns(device.netns)
        emulate.add_veth(device.veth, state.bridge, device.netns, f"{device.address}/{prefix_len}")
        if device.bandwidth_bps is not None:
            emulate.shape_egress(emulate.DEVICE_IF, device.bandwidth_bps, netns=device.netns)
            emulate.shape_egress(device.veth, device.bandwidth_bps)
        emulate.create_cgroup(device.cgroup, cpu=device.cpu, cpuset=device.cpuset,
                              memory_bytes=device.memory_bytes)


def device_pids(state: TestbedState) -> set[int]:
    """Every process in a device's cgroups or network namespace."""
    pids: set[int] = set()
    for device in state.devices:
        pids |= emulate.cgroup_pids(device.cgroup) | emulate.netns_pids(device.netns)
    return pids - {os.getpid()}


def destroy(state: TestbedState, procs: Sequence[subprocess.Popen] = (), grace_s: float = 5.0) -> None:
    """Stop every process, delete links, namespaces and cgroups, then the state file.

    Every step runs even if an earlier one failed; on any failure the state file stays, so `down` can
    be repeated, and one EmulationError lists what is left.
    """
    def pids_of() -> set[int]:
        for proc in procs:
            proc.poll()  # reaps, so finished children stop counting
        return device_pids(state) | {p.pid for p in procs if p.returncode is None}

    errors: list[str] = []
    survivors = emulate.stop_processes(pids_of, grace_s)
    if survivors:
        errors.append(f"processes {sorted(survivors)} survived SIGKILL")
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    steps: list[tuple[Callable[[str], None], str]] = [(emulate.delete_link, d.veth) for d in state.devices]
    steps.append((emulate.delete_link, state.bridge))
    steps += [(emulate.delete_netns, d.netns) for d in state.devices]
    steps += [(emulate.remove_cgroup, d.cgroup) for d in state.devices]
    for remove, what in steps:
        try:
            remove(what)
        except EmulationError as exc:
            errors.append(str(exc))
    if errors:
        raise EmulationError(f"teardown of testbed {state.name!r} incomplete (run `down {state.name}` "
                             "again): " + "; ".join(errors))
    state_path(state.name).unlink(missing_ok=True)


def sweep_stale() -> list[str]:
    """Tear down every testbed whose owning process died; return their names."""
    swept = []
    for state in list_states():
        if owner_status(state) == "dead":
            destroy(state, grace_s=1.0)
            swept.append(state.name)
    return swept


def sweep_orphans() -> list[str]:
    """Remove ep-<run id>-* namespaces, links and cgroups that no state file records; return them."""
    recorded = {s.run_id for s in list_states()}

    def orphan(name: str) -> bool:
        return bool(RESOURCE_PATTERN.match(name)) and name[3:9] not in recorded

    netns = [n for n in emulate.list_netns() if orphan(n)]
    links = [n for n in emulate.list_links() if orphan(n)]
    cgroups = sorted(n for n in emulate.list_cgroups() if orphan(n))
    pids: set[int] = set()
    for name in netns:
        pids |= emulate.netns_pids(name)
    for name in cgroups:
        pids |= emulate.cgroup_pids(name)
    emulate.stop_processes(lambda: {p for p in pids if emulate.process_start_ticks(p) is not None}, 1.0)
    for name in links:
        emulate.delete_link(name)
    for name in netns:
        emulate.delete_netns(name)
    for name in cgroups:
        emulate.remove_cgroup(name)
    return netns + links + cgroups


def bring_up(spec: ClusterSpec, name: str | None = None, *, detached: bool = False,
             on_step: Callable[[str], None] | None = None) -> TestbedState:
    """Create a testbed for `spec`, owned by this process unless `detached`; clean up if that fails."""
    emulate.check_host()
    name = name or spec.name
    if not DEVICE_NAME.match(name):
        raise TestbedError(f"testbed name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    host_cpus = emulate.host_cpus()
    for device in spec.devices:
        if device.cpuset is not None and not emulate.parse_cpu_list(device.cpuset) <= host_cpus:
            raise TestbedError(f"device {device.name!r}: cpuset {device.cpuset!r} is not within this "
                               f"machine's cpus {sorted(host_cpus)}")
    with state_lock():
        sweep_stale()
        if state_path(name).exists():
            raise TestbedError(f"testbed {name!r} is already up; "
                               f"run `python tools/testbed.py down {name}` first")
        taken = [s.subnet for s in list_states()] + emulate.ipv4_addresses() + [
            r["dst"] for r in emulate.routes() if r.get("dst", "default") != "default"]
        owner = None if detached else (os.getpid(), emulate.process_start_ticks(os.getpid()))
        run_id = os.urandom(3).hex()
        state = plan_state(spec, name, run_id, free_subnet(taken), owner)
        save_state(state)  # before creating anything, so any crash from here on leaves a record
    try:
        create(state, on_step)
    except BaseException as exc:
        try:
            destroy(state, grace_s=0.0)
        except EmulationError as cleanup:
            exc.add_note(str(cleanup))
        raise
    return state


def device_argv(device: DeviceState, argv: Sequence[str]) -> list[str]:
    """argv running `argv` inside `device`'s namespace and cgroups."""
    if not argv:
        raise TestbedError(f"no command given to run in device {device.name!r}")
    procs_files = emulate.cgroup_procs_files(device.cgroup)
    return emulate.confine_argv(device.netns, procs_files, [str(a) for a in argv])


class Testbed:
    """An emulated cluster that exists between `__enter__` and `__exit__` (or `up()` and `down()`).

    Teardown also runs on exceptions, Ctrl-C, SIGTERM and SIGHUP (turned into SystemExit while the
    testbed is up, if the process had no handler of its own); a second signal during teardown waits
    until it is done. A SIGKILLed owner leaves its state file behind: `down NAME` or the next `up`
    removes it.
    """

    __test__ = False

    def __init__(self, cluster: ClusterSpec | str | os.PathLike[str], *, name: str | None = None,
                 grace_s: float = 5.0) -> None:
        self.spec = cluster if isinstance(cluster, ClusterSpec) else load_cluster(cluster)
        self.name = name or self.spec.name
        self.grace_s = grace_s
        self._state: TestbedState | None = None
        self._procs: list[subprocess.Popen] = []
        self._saved_handlers: dict[int, Any] = {}

    # lifecycle

    def up(self, on_step: Callable[[str], None] | None = None) -> Testbed:
        if self._state is None:
            self._state = bring_up(self.spec, self.name, on_step=on_step)
        return self

    def down(self) -> None:
        """Stop every process in the devices (SIGTERM, then SIGKILL after grace_s) and remove everything."""
        if self._state is None:
            return
        with _signals_deferred():
            try:
                destroy(self._state, self._procs, self.grace_s)
            finally:
                self._state, self._procs = None, []

    def __enter__(self) -> Testbed:
        self._exit_on_signals()
        try:
            self.up()
        except BaseException:
            self._restore_signals()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.down()
        finally:
            self._restore_signals()

    def _exit_on_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:
                self._saved_handlers[signum] = signal.signal(signum, _exit_on_signal)

    def _restore_signals(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}

    # queries

    @property
    def state(self) -> TestbedState:
        if self._state is None:
            raise TestbedError(f"testbed {self.name!r} is not up")
        return self._state

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.spec.devices)

    @property
    def client_address(self) -> str:
        """Address of the root namespace (where the client runs) on the testbed's bridge."""
        return self.state.client_address

    def address(self, device: str) -> str:
        return self.state.device(device).address

    def endpoint(self, device: str, port: int) -> str:
        """ZeroMQ TCP endpoint of `port` on `device`, e.g. tcp://10.213.0.10:5555."""
        return f"tcp://{self.address(device)}:{port}"

    def peak_memory(self, device: str) -> int:
        """Highest memory charged to the device since up (or reset_peak_memory), page cache included."""
        return emulate.peak_memory(self.state.device(device).cgroup)

    def reset_peak_memory(self, device: str) -> None:
        emulate.reset_peak_memory(self.state.device(device).cgroup)

    def cpu_time_ns(self, device: str) -> int:
        """CPU time used by all processes of the device so far."""
        return emulate.cpu_time_ns(self.state.device(device).cgroup)

    def oom_kills(self, device: str) -> int:
        return emulate.oom_kills(self.state.device(device).cgroup)

    def pids(self, device: str) -> set[int]:
        """Processes running in the device's cgroups."""
        return emulate.cgroup_pids(self.state.device(device).cgroup)

    # processes

    def run_in(self, device: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside the device's namespace and cgroups; down() stops it.

        Popen's pid is the process itself. By default it gets its own session, so a Ctrl-C in the
        terminal reaches only the orchestrator, which then stops the devices in order.
        """
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(device_argv(self.state.device(device), argv), **popen_kwargs)
        self._procs.append(proc)
        return proc


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then deliver them to the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in signums}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


# --- status --------------------------------------------------------------------------------------------


def device_status(state: TestbedState, device: DeviceState) -> dict[str, Any]:
    """Live numbers of one device, read from its cgroups and qdiscs."""
    alive = emulate.netns_exists(device.netns)
    return {
        "name": device.name, "netns": device.netns, "address": device.address, "cpu": device.cpu,
        "cpuset": device.cpuset, "memory_limit_bytes": device.memory_bytes,
        "bandwidth_bps": device.bandwidth_bps,
        "shaped_egress_bps": emulate.egress_rate_bps(emulate.DEVICE_IF, device.netns) if alive else None,
        "shaped_ingress_bps": emulate.egress_rate_bps(device.veth) if alive else None,
        "processes": len(emulate.cgroup_pids(device.cgroup)) if alive else 0,
        "memory_bytes": emulate.memory_usage(device.cgroup) if alive else None,
        "peak_memory_bytes": emulate.peak_memory(device.cgroup) if alive else None,
        "cpu_time_s": emulate.cpu_time_ns(device.cgroup) / 1e9 if alive else None,
        "oom_kills": emulate.oom_kills(device.cgroup) if alive else None,
    }


def testbed_status(state: TestbedState) -> dict[str, Any]:
    return {"name": state.name, "run_id": state.run_id, "subnet": state.subnet,
            "client_address": state.client_address, "bridge": state.bridge, "owner": owner_status(state),
            "owner_pid": state.owner_pid, "cluster_file": state.cluster_file,
            "devices": [device_status(state, d) for d in state.devices]}


# --- CLI -----------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="""\
Emulated heterogeneous edge cluster on one Linux machine (needs root).

\b
  python tools/testbed.py up cluster.toml        # namespaces, shaping, cgroups
  python tools/testbed.py run NAME DEVICE -- CMD # run CMD inside DEVICE
  python tools/testbed.py status                 # addresses, memory, processes
  python tools/testbed.py down NAME              # remove it all (also after a crash)

See docs/testbed.md.""")
# Redirected output is read by people and scripts alike: do not truncate tables to 80 columns there.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    """One line on stderr per error: exit 2 for an unusable host or bad input, 1 for a failed operation."""
    problem = emulate.host_problem()
    if problem is not None:
        raise _fail(problem, 2)
    try:
        yield
    except TestbedError as exc:
        raise _fail(str(exc), 2) from None
    except EmulationError as exc:
        raise _fail(str(exc), 1) from None


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _human_rate(bps: int | None) -> str:
    if bps is None:
        return "-"
    return f"{bps / 1e9:g} Gbps" if bps >= 1e9 else f"{bps / 1e6:g} Mbps"


def _status_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"testbed {status['name']} (subnet {status['subnet']}, client "
                        f"{status['client_address']}, owner {status['owner']})")
    for column in ("device", "address", "cpu", "cpuset", "mem limit", "bandwidth", "procs", "memory", "peak",
                   "oom"):
        table.add_column(column, no_wrap=column in ("device", "address"))
    for d in status["devices"]:
        table.add_row(
            d["name"], d["address"], "-" if d["cpu"] is None else f"{d['cpu']:g}", d["cpuset"] or "-",
            _human_bytes(d["memory_limit_bytes"]), _human_rate(d["bandwidth_bps"]), str(d["processes"]),
            _human_bytes(d["memory_bytes"]), _human_bytes(d["peak_memory_bytes"]),
            "-" if d["oom_kills"] is None else str(d["oom_kills"]))
    return table


@app.command()
def up(cluster: Path = typer.Argument(..., help="Cluster TOML (the planner's format plus cpu/cpuset keys)."),
       name: str = typer.Option(None, help="Testbed name; default: [cluster] name."),
       as_json: bool = typer.Option(False, "--json", help="Print the testbed as JSON.")) -> None:
    """Create the emulated cluster and leave it up until `down`.

    One network namespace per [[device]], shaped to its bandwidth both ways, confined to its cpu,
    cpuset and memory; the client is this (root) namespace. Prints each device's address.

    \b
    Example: python tools/testbed.py up cluster.toml
    """
    with _cli_errors():
        spec = load_cluster(cluster)
        for warning in spec.warnings:
            err.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("creating", total=len(spec.devices) + 1)

            def advance(what: str) -> None:
                progress.update(task, description=what, advance=1)

            state = bring_up(spec, name, detached=True, on_step=advance)
        status = testbed_status(state)
    if as_json:
        out.print_json(json.dumps(status))
    else:
        out.print(_status_table(status))


@app.command(context_settings={"ignore_unknown_options": True})
def run(name: str = typer.Argument(..., help="Testbed name."),
        device: str = typer.Argument(..., help="Device to run in."),
        command: list[str] = typer.Argument(..., help="Command and its arguments (after --).")) -> None:
    """Run a command inside a device (its namespace and cgroups).

    Runs in the foreground and exits with the command's exit code; `down` stops whatever it leaves.

    \b
    Example: python tools/testbed.py run bench-hetero fast-1 -- ip -4 addr show eth0
    """
    with _cli_errors():
        argv = device_argv(load_state(name).device(device), command)
    proc = subprocess.Popen(argv)
    # The command shares our terminal's process group, so Ctrl-C reaches it directly; it decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = proc.wait()
    raise typer.Exit(code if code >= 0 else 128 - code)


@app.command()
def down(name: str = typer.Argument(None, help="Testbed to remove."),
         all_: bool = typer.Option(False, "--all", help="Remove every testbed and any ep-* leftovers."),
         grace: float = typer.Option(5.0, help="Seconds from SIGTERM to SIGKILL in the devices."),
         as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON.")) -> None:
    """Stop a testbed's processes and remove everything it created.

    Stops every process in its devices (SIGTERM, then SIGKILL after --grace seconds) and removes its
    namespaces, links and cgroups; works after a crash of whatever created it. --all does this for
    every testbed and also removes ep-* leftovers that no state file records.

    \b
    Example: python tools/testbed.py down bench-hetero
    """
    with _cli_errors():
        if all_ == (name is not None):
            raise TestbedError("give either a testbed NAME or --all")
        removed: dict[str, list[str]] = {"testbeds": [], "leftovers": []}
        with state_lock():
            for state in list_states() if all_ else [load_state(name)]:
                destroy(state, grace_s=grace)
                removed["testbeds"].append(state.name)
                if not as_json:
                    out.print(f"removed testbed {state.name} ({len(state.devices)} devices)")
            if all_:
                removed["leftovers"] = sweep_orphans()
    if as_json:
        out.print_json(json.dumps(removed))
        return
    for leftover in removed["leftovers"]:
        out.print(f"removed leftover {leftover}")


@app.command()
def status(name: str = typer.Argument(None, help="Testbed to show; default: all."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show testbeds: devices, addresses, limits, processes, memory.

    Memory and peak memory are what each device's memory cgroup was charged, page cache included.

    \b
    Example: python tools/testbed.py status --json
    """
    with _cli_errors():
        states = [load_state(name)] if name else list_states()
        statuses = [testbed_status(s) for s in states]
    if as_json:
        out.print_json(json.dumps(statuses))
        return
    if not statuses:
        out.print("no testbed is up")
    for s in statuses:
        out.print(_status_table(s))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
