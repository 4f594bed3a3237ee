"""Profile every device of a cluster, and the links between them, from the workstation.

Each device runs ``edgepipe-agent daemon`` at the control endpoint its cluster entry gives
(``control``, or ``address``). Requests are authenticated (CurveZMQ: the workstation's keypair and
each device's ``public_key``) unless the caller passes no keypair (insecure mode, by name). The
profiling bundle travels to the device in the request and the DeviceProfile comes back, so no one
logs in anywhere. A stored profile (``<out_dir>/<device>.json``) is reused while its key (model
hash, device, microbatch sizes, dtype, the device's ONNX Runtime version as it reports it now,
threads) still matches; otherwise the device is profiled again. Unreachable devices are reported by
name and the others are still profiled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edgepipe.agent.control_client import auth_for, control_request, request_probe, request_profile, request_status
from edgepipe.agent.formats.control import ControlError
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.agent.formats.profiles import (
    PROFILE_VERSION,
    DeviceProfile,
    ProfileError,
    load_profile,
    load_profile_bundle,
    save_profile,
)
from edgepipe.compiler.planning import profile_path
from edgepipe.planner.cluster import Cluster
from edgepipe.planner.problem import Device, Link

LINKS_FORMAT = "edgepipe.links"
LINKS_VERSION = 1
LINKS_FILE = "links.json"
DTYPE = "float32"


@dataclass(frozen=True)
class DeviceOutcome:
    device: str
    profile: DeviceProfile | None
    source: str  # "measured", "reused", or why there is no profile


@dataclass(frozen=True)
class Access:
    """How the workstation reaches a cluster's daemons: its keypair (None: insecure mode) and per
    device the control endpoint and public key from the cluster file."""

    keypair: KeyPair | None
    endpoints: dict[str, str]
    keys: dict[str, str | None]

    def auth(self, device: str):
        return auth_for(self.keypair, self.keys.get(device))


def cluster_access(cluster: Cluster, keypair: KeyPair | None) -> Access:
    """Endpoints and keys of every device that names a daemon; ControlError for a device whose entry
    is unusable (the caller reports it with the others)."""
    from edgepipe.compiler.fleet.build import BuildError, device_targets

    try:
        targets = device_targets(cluster)
    except BuildError as exc:
        raise ControlError(str(exc)) from None
    return Access(keypair, {n: t.control for n, t in targets.items()}, {n: t.public_key for n, t in targets.items()})


def control_endpoint(device: Device, access: Access | None = None) -> str:
    """The device's control endpoint (cluster ``control``, else ``address``)."""
    if access is not None and device.name in access.endpoints:
        return access.endpoints[device.name]
    if not device.address:
        raise ControlError(f"device {device.name!r} has no control endpoint in the cluster file")
    return device.address if "://" in device.address else f"tcp://{device.address}"


def expected_key(model_sha256: str, device: str, microbatches: Sequence[int], ort_version: str,
                 threads: int) -> tuple:
    """What ``DeviceProfile.key()`` must equal for a stored profile to be reused."""
    return (model_sha256, device, tuple(sorted(set(microbatches))), DTYPE, ort_version, threads)


def profile_device(device: Device, bundle_dir: Path, out_dir: Path, microbatches: Sequence[int], threads: int,
                   timeout_s: float, model_sha256: str, access: Access, repeats: int = 10) -> DeviceOutcome:
    """Reuse or measure one device's profile; never raises for the device's own failures."""
    try:
        endpoint = control_endpoint(device, access)
        auth = access.auth(device.name)
        status = request_status(endpoint, auth=auth, timeout_s=min(timeout_s, 5.0))
        path = profile_path(out_dir, device.name)
        want = expected_key(model_sha256, device.name, microbatches, str(status.get("ort_version")), threads)
        if path.is_file():
            try:
                stored = load_profile(path)
                if stored.key() == want and stored.format_version == PROFILE_VERSION:  # v1: no comm costs
                    return DeviceOutcome(device.name, stored, "reused")
            except ProfileError:
                pass  # unreadable or foreign: measure again and overwrite
        profile = request_profile(endpoint, bundle_dir, device.name, microbatches, threads, repeats=repeats, auth=auth,
                                  timeout_s=timeout_s)
        if profile.key() != want:
            return DeviceOutcome(device.name, None, f"{device.name}: the device returned a profile for "
                                 f"{profile.key()}, expected {want}")
        save_profile(path, profile)
        return DeviceOutcome(device.name, profile, "measured")
    except (ControlError, OSError) as exc:
        return DeviceOutcome(device.name, None, f"{device.name}: {exc}")


def profile_cluster(cluster: Cluster, profile_bundle_dir: Path, out_dir: Path, microbatches: Sequence[int],
                    threads: int = 1, timeout_s: float = 600.0, parallel: bool = False,
                    on_device: Callable[[DeviceOutcome], None] | None = None, repeats: int = 10, *,
                    keypair: KeyPair | None,
                    ) -> tuple[list[DeviceProfile], dict[str, str]]:
    """Every device's profile (reused or measured) and, per device without one, why not.

    Devices are profiled one after another unless ``parallel`` (devices that share CPUs, like an
    emulated testbed, would slow each other down and skew the numbers)."""
    bundle = load_profile_bundle(profile_bundle_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    access = cluster_access(cluster, keypair)

    def one(device: Device) -> DeviceOutcome:
        outcome = profile_device(device, Path(profile_bundle_dir), Path(out_dir), microbatches, threads,
                                 timeout_s, bundle.model_sha256, access, repeats)
        if on_device is not None:
            on_device(outcome)
        return outcome

    if parallel:
        with ThreadPoolExecutor(max_workers=len(cluster.devices)) as pool:
            outcomes = list(pool.map(one, cluster.devices))
    else:
        outcomes = [one(d) for d in cluster.devices]
    profiles = [o.profile for o in outcomes if o.profile is not None]
    failures = {o.device: o.source for o in outcomes if o.profile is None}
    return profiles, failures


def probe_links(cluster: Cluster, out_dir: Path, tensor_bytes: int, count: int = 5, seconds: float = 5.0,
                timeout_s: float = 30.0, *, keypair: KeyPair | None) -> tuple[list[Link], dict[str, str]]:
    """Ask each device to probe every other (all ordered pairs); the slower direction of a pair is
    its symmetric link. Saves ``<out_dir>/links.json``; returns the links and, per unreachable
    device or failed pair ("a->b"), why. In secure mode every daemon is first told the other
    devices' keys (``peers``: they may send it echoes, nothing else), and each probe names the
    peer's key, so no daemon ever connects to a peer it cannot authenticate."""
    measured: dict[tuple[str, str], dict] = {}
    failures: dict[str, str] = {}
    reachable = []
    access = cluster_access(cluster, keypair)
    peer_keys = sorted({k for k in access.keys.values() if k})
    for device in cluster.devices:  # one short request each, so a dead device costs seconds, not minutes
        try:
            header = {"cmd": "peers", "keys": peer_keys} if keypair is not None else {"cmd": "status"}
            control_request(control_endpoint(device, access), header, auth=access.auth(device.name),
                            timeout_s=min(timeout_s, 5.0))
            reachable.append(device)
        except ControlError as exc:
            failures[device.name] = str(exc)
    for src in reachable:
        for dst in reachable:
            if src.name == dst.name:
                continue
            try:
                reply = request_probe(control_endpoint(src, access), control_endpoint(dst, access), tensor_bytes,
                                      count, seconds, auth=access.auth(src.name), peer_key=access.keys.get(dst.name),
                                      timeout_s=timeout_s)
                measured[(src.name, dst.name)] = {"bandwidth_mbps": float(reply["bandwidth_mbps"]),
                                                  "latency_s": float(reply["latency_s"])}
            except (ControlError, KeyError, TypeError, ValueError) as exc:
                failures[f"{src.name}->{dst.name}"] = str(exc)
    links = []
    names = [d.name for d in cluster.devices]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [measured[p] for p in ((a, b), (b, a)) if p in measured]
            if both:
                links.append(Link(a=a, b=b, bandwidth_mbps=min(m["bandwidth_mbps"] for m in both),
                                  latency_s=max(m["latency_s"] for m in both)))
    save_links(Path(out_dir) / LINKS_FILE, links, tensor_bytes, measured)
    return links, failures


def merge_links(configured: Sequence[Link], measured: Sequence[Link]) -> tuple[Link, ...]:
    """Measured links replace configured ones for the same pair; other configured links stay."""
    pairs = {frozenset((k.a, k.b)) for k in measured}
    return (*[k for k in configured if frozenset((k.a, k.b)) not in pairs], *measured)


def save_links(path: Path, links: Sequence[Link], tensor_bytes: int, directed: dict[tuple[str, str], dict]) -> None:
    raw = {
        "format": LINKS_FORMAT, "format_version": LINKS_VERSION, "tensor_bytes": tensor_bytes,
        "links": [{"a": k.a, "b": k.b, "bandwidth_mbps": k.bandwidth_mbps, "latency_s": k.latency_s}
                  for k in links],
        "directed": [{"from": a, "to": b, **m} for (a, b), m in sorted(directed.items())],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(raw, indent=2) + "\n")


def load_links(path: Path) -> list[Link]:
    """The symmetric links of a links.json; ProfileError naming the file if it is not one."""
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != LINKS_FORMAT or raw.get("format_version") != LINKS_VERSION:
            raise ProfileError(f"{path}: not an {LINKS_FORMAT} version {LINKS_VERSION} file")
        return [Link(a=str(k["a"]), b=str(k["b"]), bandwidth_mbps=float(k["bandwidth_mbps"]),
                     latency_s=float(k["latency_s"])) for k in raw["links"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(f"{path}: unreadable links file: {exc}") from None
