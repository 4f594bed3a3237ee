"""The cluster file: which devices exist, what they are, how they are connected (TOML).

Sizes, rates and times are written the way people say them ("8 GiB", "1 Gbps", "2 ms"); plain
numbers mean bytes, Mbps and seconds. ``problem_for`` joins a cluster with a model's segments into
a planning Problem. Format documented in docs/formats/cluster.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .problem import (
    DEFAULT_RUNTIME_OVERHEAD_BYTES,
    Device,
    DeviceType,
    ErrorBudget,
    Int8Speed,
    Link,
    ModelSpec,
    Problem,
    ProblemError,
)
from .units import parse_bytes, parse_mbps, parse_seconds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project runs 3.11, devices may run 3.10
    import tomli as tomllib


TESTBED_DEVICE_KEYS = frozenset({"cpu", "cpuset"})
# Read by edgepipe-fleet (compiler/fleet) to reach and authenticate each device's daemon; the planner
# ignores them. Keys are Z85 text or key file paths (relative to the cluster file).
DEPLOY_DEVICE_KEYS = frozenset({"control", "public_key"})


class ClusterError(ValueError):
    """A cluster file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Cluster:
    name: str
    device_types: tuple[DeviceType, ...]
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    client_bandwidth_mbps: float | None = None
    runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES
    queue_depth: int = 2
    source: str = "<cluster>"
    # Deployment (edgepipe-fleet), not planning: device name -> its daemon's control endpoint and
    # public key; the workstation's public key; the public keys of clients allowed to submit.
    control: dict[str, str] = field(default_factory=dict)
    public_keys: dict[str, str] = field(default_factory=dict)
    workstation_key: str = ""
    client_keys: tuple[str, ...] = ()


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster TOML file. Raises ClusterError naming file, entry and field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ClusterError(f"{path}: cannot read cluster file: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClusterError(f"{path}: not valid TOML: {exc}") from exc
    return cluster_from_dict(raw, source=str(path))


def cluster_from_dict(raw: dict[str, Any], source: str = "<cluster>") -> Cluster:
    """Build a Cluster from parsed TOML (tables as dicts)."""
    _known(raw, {"cluster", "type", "device", "link"}, source, "top level")
    head = raw.get("cluster", {})
    if not isinstance(head, dict):
        raise ClusterError(f"{source}: [cluster]: must be a table")
    _known(head, {"name", "client_bandwidth", "runtime_overhead", "queue_depth", "workstation_key", "clients"},
           source, "[cluster]")
    name = _field(head, "name", source, "[cluster]", str, default=Path(source).stem)
    client = _field(head, "client_bandwidth", source, "[cluster]", parse_mbps, default=None)
    overhead = _field(head, "runtime_overhead", source, "[cluster]", parse_bytes,
                      default=DEFAULT_RUNTIME_OVERHEAD_BYTES)
    queue_depth = _field(head, "queue_depth", source, "[cluster]", _positive_int, default=2)
    workstation_key = _field(head, "workstation_key", source, "[cluster]", str, default="")
    clients = _field(head, "clients", source, "[cluster]", _text_list, default=())

    types = []
    for i, t in enumerate(_tables(raw, "type", source)):
        where = f"[[type]] #{i + 1}"
        _known(t, {"name", "gflops", "reference", "speed", "int8_gflops", "profile"}, source, where)
        tname = _field(t, "name", source, where, str)
        where = f"[[type]] {tname!r}"
        if "profile" in t:
            # Measured profiles are per device, not per type, and live beside the build.
            raise ClusterError(
                f"{source}: {where}.profile: measured profiles are not named in the cluster file; "
                "edgepipe-compile --cluster FILE --profile measures every device (or --profiles-dir DIR "
                "reuses stored ones) and they replace this type's gflops or reference + speed"
            )
        int8_gflops = _field(t, "int8_gflops", source, where, _positive_float, default=None)
        types.append(DeviceType(
            name=tname,
            gflops=_field(t, "gflops", source, where, _positive_float, default=None),
            reference=_field(t, "reference", source, where, str, default=None),
            speed=_field(t, "speed", source, where, _positive_float, default=1.0),
            int8=None if int8_gflops is None else Int8Speed(gflops=int8_gflops),
        ))
    devices = []
    control: dict[str, str] = {}
    public_keys: dict[str, str] = {}
    for i, d in enumerate(_tables(raw, "device", source)):
        where = f"[[device]] #{i + 1}"
        # cpu and cpuset are read by the testbed (tools/testbed.py) to emulate the device; the
        # planner plans from measured or declared speeds, not from them.
        _known(d, {"name", "type", "address", "memory", "bandwidth"} | TESTBED_DEVICE_KEYS | DEPLOY_DEVICE_KEYS,
               source, where)
        dname = _field(d, "name", source, where, str)
        where = f"[[device]] {dname!r}"
        if "control" in d:
            control[dname] = _field(d, "control", source, where, str)
        if "public_key" in d:
            public_keys[dname] = _field(d, "public_key", source, where, str)
        devices.append(Device(
            name=dname,
            type=_field(d, "type", source, where, str),
            memory_bytes=_field(d, "memory", source, where, parse_bytes),
            bandwidth_mbps=_field(d, "bandwidth", source, where, parse_mbps),
            address=_field(d, "address", source, where, str, default=""),
        ))
    links = []
    for i, k in enumerate(_tables(raw, "link", source)):
        where = f"[[link]] #{i + 1}"
        _known(k, {"a", "b", "bandwidth", "latency"}, source, where)
        links.append(Link(
            a=_field(k, "a", source, where, str),
            b=_field(k, "b", source, where, str),
            bandwidth_mbps=_field(k, "bandwidth", source, where, parse_mbps),
            latency_s=_field(k, "latency", source, where, parse_seconds, default=0.0),
        ))
    cluster = Cluster(name=name, device_types=tuple(types), devices=tuple(devices), links=tuple(links),
                      client_bandwidth_mbps=client, runtime_overhead_bytes=overhead,
                      queue_depth=queue_depth, source=source, control=control, public_keys=public_keys,
                      workstation_key=workstation_key, client_keys=clients)
    _check(cluster)
    return cluster


def problem_for(cluster: Cluster, model: ModelSpec, microbatch: int | None = 8, *,
                max_error: ErrorBudget | None = None, secure: bool = True) -> Problem:
    """The planning problem of running ``model`` on ``cluster`` (microbatch None: planner picks),
    within the error budget ``max_error`` (None: no lossy choice), with CURVE on every hop or not."""
    try:
        return Problem(
            model=model,
            device_types=cluster.device_types,
            devices=cluster.devices,
            links=cluster.links,
            microbatch=microbatch,
            client_bandwidth_mbps=cluster.client_bandwidth_mbps,
            runtime_overhead_bytes=cluster.runtime_overhead_bytes,
            queue_depth=cluster.queue_depth,
            max_error=max_error,
            secure=secure,
        )
    except ProblemError as exc:
        raise ClusterError(f"{cluster.source}: {exc}") from None


def _check(cluster: Cluster) -> None:
    """Cross-entry checks (names, references), phrased in the file's own terms."""
    src = cluster.source
    if not cluster.devices:
        raise ClusterError(f"{src}: no [[device]] entries")
    type_names = [t.name for t in cluster.device_types]
    for t in cluster.device_types:
        if type_names.count(t.name) > 1:
            raise ClusterError(f"{src}: [[type]] {t.name!r}: defined twice")
        if t.gflops is None and t.reference is None:
            raise ClusterError(f"{src}: [[type]] {t.name!r}: needs gflops, or reference + speed")
        if t.reference is not None and t.reference not in type_names:
            raise ClusterError(f"{src}: [[type]] {t.name!r}.reference: no [[type]] named {t.reference!r}")
        if t.speed != 1.0 and t.reference is None:
            raise ClusterError(f"{src}: [[type]] {t.name!r}.speed: is relative to a reference; set reference")
    device_names = [d.name for d in cluster.devices]
    for d in cluster.devices:
        if device_names.count(d.name) > 1:
            raise ClusterError(f"{src}: [[device]] {d.name!r}: defined twice")
        if d.type not in type_names:
            known = ", ".join(repr(n) for n in type_names) or "none"
            raise ClusterError(f"{src}: [[device]] {d.name!r}.type: no [[type]] {d.type!r} (known: {known})")
        if d.memory_bytes <= 0:
            raise ClusterError(f"{src}: [[device]] {d.name!r}.memory: must be more than 0")
        if d.bandwidth_mbps <= 0:
            raise ClusterError(f"{src}: [[device]] {d.name!r}.bandwidth: must be more than 0")
    seen: set[frozenset[str]] = set()
    for i, k in enumerate(cluster.links):
        where = f"[[link]] #{i + 1} ({k.a!r} - {k.b!r})"
        for end in (k.a, k.b):
            if end not in device_names:
                raise ClusterError(f"{src}: {where}: no [[device]] named {end!r}")
        if k.a == k.b:
            raise ClusterError(f"{src}: {where}: a link joins two different devices")
        if frozenset((k.a, k.b)) in seen:
            raise ClusterError(f"{src}: {where}: this pair already has a link")
        seen.add(frozenset((k.a, k.b)))
        if k.bandwidth_mbps <= 0:
            raise ClusterError(f"{src}: {where}.bandwidth: must be more than 0")
    if cluster.client_bandwidth_mbps is not None and cluster.client_bandwidth_mbps <= 0:
        raise ClusterError(f"{src}: [cluster].client_bandwidth: must be more than 0")


def _tables(raw: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ClusterError(f"{source}: {key}: write entries as [[{key}]] tables")
    return value


def _known(table: dict[str, Any], keys: set[str], source: str, where: str) -> None:
    for key in table:
        if key not in keys:
            expected = ", ".join(sorted(keys))
            raise ClusterError(f"{source}: {where}: unknown field {key!r} (expected one of {expected})")


_MISSING = object()


def _field(
    table: dict[str, Any], key: str, source: str, where: str, convert: Any, default: Any = _MISSING
) -> Any:
    if key not in table:
        if default is _MISSING:
            raise ClusterError(f"{source}: {where}.{key}: missing")
        return default
    value = table[key]
    if convert is str:
        if not isinstance(value, str) or not value:
            raise ClusterError(f"{source}: {where}.{key}: expected non-empty text, got {value!r}")
        return value
    try:
        return convert(value)
    except ValueError as exc:
        raise ClusterError(f"{source}: {where}.{key}: {exc}") from None


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"expected a positive number, got {value!r}")
    return float(value)


def _text_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return value
