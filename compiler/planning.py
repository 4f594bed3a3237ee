"""Join a model's segments, a cluster file and measured device profiles into a plan.

The planner is pure and knows nothing of files the devices wrote; this is where measured
profiles (``edgepipe-agent profile``, one per device) become per-type compute times. Devices of one
declared type are meant to be alike; the type's time per segment is the median over its profiled
devices, so one noisy device does not skew the rest.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from edgepipe.agent.formats.profiles import DeviceProfile, ProfileError, check_profile_matches, load_profile
from edgepipe.compiler.quantize import int8_speed  # light: no onnx_ir at import
from edgepipe.planner.cluster import Cluster
from edgepipe.planner.problem import ModelSpec


def profile_path(profiles_dir: Path, device: str) -> Path:
    return Path(profiles_dir) / f"{device}.json"


def load_device_profiles(profiles_dir: Path, cluster: Cluster, spec: ModelSpec) -> tuple[list[DeviceProfile],
                                                                                       dict[str, str]]:
    """The usable profiles in ``profiles_dir`` (``<device>.json``) and, per device without one, why."""
    usable, missing = [], {}
    for device in cluster.devices:
        path = profile_path(profiles_dir, device.name)
        if not path.is_file():
            missing[device.name] = f"no profile ({path})"
            continue
        try:
            profile = load_profile(path)
            check_profile_matches(profile, model_sha256=spec.model_sha256, device=device.name, source=str(path))
            check_segments(profile, spec, str(path))
        except ProfileError as exc:
            missing[device.name] = str(exc)
            continue
        usable.append(profile)
    return usable, missing


def check_segments(profile: DeviceProfile, spec: ModelSpec, source: str) -> None:
    names = tuple(s.name for s in spec.segments)
    if profile.segment_names != names:
        raise ProfileError(
            f"{source}: profiled {len(profile.segment_names)} segments, the plan uses {len(names)}; "
            f"profile with the same --max-tensors as you plan with"
        )


def apply_profiles(cluster: Cluster, profiles: list[DeviceProfile]) -> Cluster:
    """``cluster`` with each profiled type's compute times replaced by its devices' median."""
    type_of = {d.name: d.type for d in cluster.devices}
    by_type: dict[str, list[DeviceProfile]] = {}
    for profile in profiles:
        by_type.setdefault(type_of[profile.device], []).append(profile)
    types = []
    for device_type in cluster.device_types:
        measured = by_type.get(device_type.name)
        if not measured:
            types.append(device_type)
            continue
        sizes = set.intersection(*(set(p.seconds) for p in measured))
        table = {
            mb: tuple(statistics.median(p.seconds[mb][i] for p in measured)
                      for i in range(len(measured[0].segment_names)))
            for mb in sorted(sizes)
        }
        int8 = int8_speed(measured)  # compiler/quantize.py: int8-weights times, when profiled
        types.append(dataclasses.replace(device_type, profiles=table, **({} if int8 is None else {"int8": int8})))
    return dataclasses.replace(cluster, device_types=tuple(types))


def usable_devices(cluster: Cluster, microbatch: int) -> tuple[Cluster, dict[str, str]]:
    """``cluster`` without devices whose type has no way to time ``microbatch`` (no profile at that
    size, no gflops, no reference that has one), and why each was left out."""
    types = {t.name: t for t in cluster.device_types}

    def timed(name: str, seen: frozenset[str] = frozenset()) -> bool:
        t = types[name]
        if microbatch in t.profiles or t.gflops is not None:
            return True
        return t.reference is not None and t.reference not in seen and timed(t.reference, seen | {name})

    kept = tuple(d for d in cluster.devices if timed(d.type))
    left_out = {d.name: f"type {d.type!r} has no profile at microbatch {microbatch} and no gflops"
                for d in cluster.devices if not timed(d.type)}
    return dataclasses.replace(cluster, devices=kept), left_out
