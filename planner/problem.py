"""The planning problem: a model cut into segments, device types, devices and links.

A problem file holds everything the planner needs, so plans can be made (and questioned) without
any device at hand. The compiler writes the model part from an ONNX graph; the cluster file
(cluster.py) supplies the devices. Format "edgepipe.problem", version 1, documented in
docs/formats/plan.md. This module is the one definition of that format.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edgepipe.problem"
FORMAT_VERSION = 1
MIB = 1 << 20
DEFAULT_RUNTIME_OVERHEAD_BYTES = 100 * MIB


class ProblemError(ValueError):
    """A problem is malformed. The message names the offending field."""


@dataclass(frozen=True)
class Segment:
    """The model between two neighbouring candidate cuts.

    ``name`` is the label of the cut where the segment starts ("input" for the first one);
    byte and FLOP figures are per sample. ``out_bytes`` is what crosses the cut after the segment
    (for the last segment: the model output, sent back to the client).
    """

    name: str
    weight_bytes: int
    activation_bytes: int
    out_bytes: int
    flops: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    model_sha256: str
    input_bytes: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class DeviceType:
    """How fast a kind of device computes each segment.

    Resolution order for a microbatch size: a measured profile at that size (seconds per segment
    for the whole microbatch); else the ``reference`` type's seconds divided by ``speed``; else
    ``flops * microbatch / (gflops * 1e9)``.
    """

    name: str
    profiles: dict[int, tuple[float, ...]] = field(default_factory=dict)
    speed: float = 1.0
    reference: str | None = None
    gflops: float | None = None


@dataclass(frozen=True)
class Device:
    name: str
    type: str
    memory_bytes: int
    bandwidth_mbps: float  # the device's NIC
    address: str = ""


@dataclass(frozen=True)
class Link:
    """A measured or configured link between two devices; overrides the NIC rule for that pair."""

    a: str
    b: str
    bandwidth_mbps: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class Problem:
    model: ModelSpec
    device_types: tuple[DeviceType, ...]
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    microbatch: int | None = 8  # None: the planner picks among the profiled sizes
    client_bandwidth_mbps: float | None = None  # None: the client is not modelled
    runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES
    queue_depth: int = 2

    def __post_init__(self) -> None:
        validate_problem(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {
                "model_id": self.model.model_id,
                "model_sha256": self.model.model_sha256,
                "input_bytes": self.model.input_bytes,
                "segments": [
                    {"name": s.name, "weight_bytes": s.weight_bytes, "activation_bytes": s.activation_bytes,
                     "out_bytes": s.out_bytes, "flops": s.flops}
                    for s in self.model.segments
                ],
            },
            "device_types": [_type_to_dict(t) for t in self.device_types],
            "devices": [
                {"name": d.name, "type": d.type, "memory_bytes": d.memory_bytes,
                 "bandwidth_mbps": d.bandwidth_mbps, "address": d.address}
                for d in self.devices
            ],
            "links": [
                {"a": k.a, "b": k.b, "bandwidth_mbps": k.bandwidth_mbps, "latency_s": k.latency_s}
                for k in self.links
            ],
            "microbatch": self.microbatch,
            "client_bandwidth_mbps": self.client_bandwidth_mbps,
            "runtime_overhead_bytes": self.runtime_overhead_bytes,
            "queue_depth": self.queue_depth,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(raw: Any, source: str = "problem") -> Problem:
        return _problem_from_dict(raw, source)

    @staticmethod
    def from_json(text: str, source: str = "problem") -> Problem:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProblemError(f"{source}: not valid JSON: {exc}") from exc
        return _problem_from_dict(raw, source)

    def sha256(self) -> str:
        """Hash of the canonical JSON; a plan records it to say which problem it answers."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise ProblemError(f"devices: no device named {name!r}")

    def device_type(self, name: str) -> DeviceType:
        for t in self.device_types:
            if t.name == name:
                return t
        raise ProblemError(f"device_types: no type named {name!r}")


def load_problem(path: str | Path) -> Problem:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProblemError(f"{path}: cannot read problem file: {exc}") from exc
    return Problem.from_json(text, source=str(path))


def save_problem(problem: Problem, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(problem.to_json() + "\n")
    return path


def segment_seconds(problem: Problem, type_name: str, microbatch: int) -> np.ndarray:
    """Seconds each segment takes on a device of ``type_name`` for one microbatch.

    Raises ProblemError when the type has no profile at that size and nothing to derive it from.
    """
    return _segment_seconds(problem, type_name, microbatch, ())


def profiled_microbatches(problem: Problem) -> tuple[int, ...]:
    """Microbatch sizes the planner may choose among when ``problem.microbatch`` is None:
    every profiled size at which each device type in use has compute times."""
    sizes = sorted({mb for t in problem.device_types for mb in t.profiles})
    used = {d.type for d in problem.devices}
    usable = []
    for mb in sizes:
        try:
            for name in used:
                segment_seconds(problem, name, mb)
        except ProblemError:
            continue
        usable.append(mb)
    return tuple(usable)


def _segment_seconds(problem: Problem, type_name: str, microbatch: int, seen: tuple[str, ...]) -> np.ndarray:
    dtype = problem.device_type(type_name)
    if microbatch in dtype.profiles:
        return np.asarray(dtype.profiles[microbatch], dtype=np.float64)
    if dtype.reference is not None:
        base = _segment_seconds(problem, dtype.reference, microbatch, (*seen, type_name))
        return base / dtype.speed
    if dtype.gflops is not None:
        flops = np.array([s.flops for s in problem.model.segments], dtype=np.float64)
        return flops * microbatch / (dtype.gflops * 1e9)
    have = ", ".join(str(k) for k in sorted(dtype.profiles)) or "none"
    raise ProblemError(
        f"device type {type_name!r}: no profile for microbatch {microbatch} (profiled sizes: {have}) "
        "and no reference or gflops to derive one"
    )


# --- validation -------------------------------------------------------------------------------


def validate_problem(p: Problem) -> None:
    """Raise ProblemError naming the first field that is wrong."""
    _validate_model(p.model)
    n_seg = len(p.model.segments)
    types: dict[str, DeviceType] = {}
    for i, t in enumerate(p.device_types):
        where = f"device_types[{i}] ({t.name!r})"
        _require(isinstance(t.name, str) and t.name != "", f"device_types[{i}].name: must not be empty")
        _require(t.name not in types, f"{where}.name: duplicate type name")
        types[t.name] = t
        _require(_positive(t.speed), f"{where}.speed: must be a positive number, got {t.speed!r}")
        _require(t.gflops is None or _positive(t.gflops),
                 f"{where}.gflops: must be a positive number, got {t.gflops!r}")
        _require(t.speed == 1.0 or t.reference is not None,
                 f"{where}.speed: is relative to a reference type; set reference")
        _require(bool(t.profiles) or t.reference is not None or t.gflops is not None,
                 f"{where}: needs profiles, a reference type or gflops")
        for mb, secs in t.profiles.items():
            _require(isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1,
                     f"{where}.profiles: microbatch size must be an integer >= 1, got {mb!r}")
            _require(len(secs) == n_seg,
                     f"{where}.profiles[{mb}]: has {len(secs)} entries, the model has {n_seg} segments")
            for k, v in enumerate(secs):
                _require(_non_negative(v), f"{where}.profiles[{mb}][{k}]: must be seconds >= 0, got {v!r}")
    for i, t in enumerate(p.device_types):
        if t.reference is not None:
            _require(t.reference in types,
                     f"device_types[{i}] ({t.name!r}).reference: unknown type {t.reference!r}")
            chain, cur = [t.name], t.reference
            while cur is not None:
                _require(cur not in chain,
                         f"device_types[{i}] ({t.name!r}).reference: cycle {' -> '.join([*chain, cur])}")
                chain.append(cur)
                cur = types[cur].reference
    uses_gflops = [t.name for t in p.device_types if t.gflops is not None]
    if uses_gflops and n_seg and all(s.flops == 0 for s in p.model.segments):
        raise ProblemError(
            f"model.segments: every flops figure is 0 but device type {uses_gflops[0]!r} derives its "
            "speed from gflops"
        )

    _require(len(p.devices) > 0, "devices: at least one device is needed")
    names: set[str] = set()
    for i, d in enumerate(p.devices):
        where = f"devices[{i}] ({d.name!r})"
        _require(isinstance(d.name, str) and d.name != "", f"devices[{i}].name: must be a non-empty string")
        _require(d.name not in names, f"{where}.name: duplicate device name")
        names.add(d.name)
        _require(d.type in types, f"{where}.type: unknown device type {d.type!r}")
        _require(_int(d.memory_bytes) and d.memory_bytes > 0,
                 f"{where}.memory_bytes: must be a positive integer, got {d.memory_bytes!r}")
        _require(_positive(d.bandwidth_mbps),
                 f"{where}.bandwidth_mbps: must be a positive number, got {d.bandwidth_mbps!r}")
        _require(isinstance(d.address, str), f"{where}.address: must be a string")
    pairs: set[frozenset[str]] = set()
    for i, k in enumerate(p.links):
        where = f"links[{i}] ({k.a!r}, {k.b!r})"
        _require(k.a in names, f"{where}.a: unknown device {k.a!r}")
        _require(k.b in names, f"{where}.b: unknown device {k.b!r}")
        _require(k.a != k.b, f"{where}: a link joins two different devices")
        pair = frozenset((k.a, k.b))
        _require(pair not in pairs, f"{where}: duplicate link for this pair")
        pairs.add(pair)
        _require(_positive(k.bandwidth_mbps),
                 f"{where}.bandwidth_mbps: must be a positive number, got {k.bandwidth_mbps!r}")
        _require(_non_negative(k.latency_s), f"{where}.latency_s: must be seconds >= 0, got {k.latency_s!r}")
    _require(p.microbatch is None or (_int(p.microbatch) and p.microbatch >= 1),
             f"microbatch: must be an integer >= 1 or null, got {p.microbatch!r}")
    _require(p.client_bandwidth_mbps is None or _positive(p.client_bandwidth_mbps),
             f"client_bandwidth_mbps: must be a positive number or null, got {p.client_bandwidth_mbps!r}")
    _require(_int(p.runtime_overhead_bytes) and p.runtime_overhead_bytes >= 0,
             f"runtime_overhead_bytes: must be an integer >= 0, got {p.runtime_overhead_bytes!r}")
    _require(_int(p.queue_depth) and p.queue_depth >= 1,
             f"queue_depth: must be an integer >= 1, got {p.queue_depth!r}")


def _validate_model(m: ModelSpec) -> None:
    _require(isinstance(m.model_id, str), "model.model_id: must be a string")
    _require(isinstance(m.model_sha256, str), "model.model_sha256: must be a string")
    _require(_int(m.input_bytes) and m.input_bytes >= 0,
             f"model.input_bytes: must be an integer >= 0, got {m.input_bytes!r}")
    _require(len(m.segments) > 0, "model.segments: at least one segment is needed")
    seen: set[str] = set()
    for i, s in enumerate(m.segments):
        where = f"model.segments[{i}] ({s.name!r})"
        _require(isinstance(s.name, str) and s.name != "", f"model.segments[{i}].name: must not be empty")
        _require(s.name not in seen, f"{where}.name: duplicate segment name")
        seen.add(s.name)
        for attr in ("weight_bytes", "activation_bytes", "out_bytes"):
            v = getattr(s, attr)
            _require(_int(v) and v >= 0, f"{where}.{attr}: must be an integer >= 0, got {v!r}")
        _require(_non_negative(s.flops), f"{where}.flops: must be a number >= 0, got {s.flops!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ProblemError(message)


def _int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return numeric and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


# --- JSON reading ------------------------------------------------------------------------------


def _type_to_dict(t: DeviceType) -> dict[str, Any]:
    return {"name": t.name, "profiles": {str(k): list(v) for k, v in sorted(t.profiles.items())},
            "speed": t.speed, "reference": t.reference, "gflops": t.gflops}


def _problem_from_dict(raw: Any, source: str) -> Problem:
    r = _Reader(source)
    r.obj(raw, "")
    if raw.get("format") != FORMAT:
        raise ProblemError(f"{source}: not an EdgePipe problem file (format={raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ProblemError(
            f"{source}: problem format_version {raw.get('format_version')!r} is not supported "
            f"(this planner reads {FORMAT_VERSION})"
        )
    m = r.obj(r.field(raw, "model", ""), "model")
    segments = []
    for i, s in enumerate(r.objs(r.field(m, "segments", "model"), "model.segments")):
        at = f"model.segments[{i}]"
        segments.append(Segment(
            name=r.text(r.field(s, "name", at), f"{at}.name"),
            weight_bytes=r.integer(r.field(s, "weight_bytes", at), f"{at}.weight_bytes"),
            activation_bytes=r.integer(r.field(s, "activation_bytes", at), f"{at}.activation_bytes"),
            out_bytes=r.integer(r.field(s, "out_bytes", at), f"{at}.out_bytes"),
            flops=r.number(s.get("flops", 0.0), f"{at}.flops"),
        ))
    model = ModelSpec(
        model_id=r.text(r.field(m, "model_id", "model"), "model.model_id"),
        model_sha256=r.text(m.get("model_sha256", ""), "model.model_sha256"),
        input_bytes=r.integer(r.field(m, "input_bytes", "model"), "model.input_bytes"),
        segments=tuple(segments),
    )
    types = []
    for i, t in enumerate(r.objs(r.field(raw, "device_types", ""), "device_types")):
        at = f"device_types[{i}]"
        profiles: dict[int, tuple[float, ...]] = {}
        for key, secs in r.obj(t.get("profiles", {}), f"{at}.profiles").items():
            if not key.isdigit():
                raise r.fail(f"{at}.profiles", f"key {key!r} is not a microbatch size")
            where = f"{at}.profiles[{key}]"
            values = r.array(secs, where)
            profiles[int(key)] = tuple(r.number(v, f"{where}[{j}]") for j, v in enumerate(values))
        reference, gflops = t.get("reference"), t.get("gflops")
        types.append(DeviceType(
            name=r.text(r.field(t, "name", at), f"{at}.name"),
            profiles=profiles,
            speed=r.number(t.get("speed", 1.0), f"{at}.speed"),
            reference=None if reference is None else r.text(reference, f"{at}.reference"),
            gflops=None if gflops is None else r.number(gflops, f"{at}.gflops"),
        ))
    devices = []
    for i, d in enumerate(r.objs(r.field(raw, "devices", ""), "devices")):
        at = f"devices[{i}]"
        devices.append(Device(
            name=r.text(r.field(d, "name", at), f"{at}.name"),
            type=r.text(r.field(d, "type", at), f"{at}.type"),
            memory_bytes=r.integer(r.field(d, "memory_bytes", at), f"{at}.memory_bytes"),
            bandwidth_mbps=r.number(r.field(d, "bandwidth_mbps", at), f"{at}.bandwidth_mbps"),
            address=r.text(d.get("address", ""), f"{at}.address"),
        ))
    links = []
    for i, k in enumerate(r.objs(raw.get("links", []), "links")):
        at = f"links[{i}]"
        links.append(Link(
            a=r.text(r.field(k, "a", at), f"{at}.a"),
            b=r.text(r.field(k, "b", at), f"{at}.b"),
            bandwidth_mbps=r.number(r.field(k, "bandwidth_mbps", at), f"{at}.bandwidth_mbps"),
            latency_s=r.number(k.get("latency_s", 0.0), f"{at}.latency_s"),
        ))
    microbatch = raw.get("microbatch", 8)
    client = raw.get("client_bandwidth_mbps")
    overhead = raw.get("runtime_overhead_bytes", DEFAULT_RUNTIME_OVERHEAD_BYTES)
    try:
        return Problem(
            model=model,
            device_types=tuple(types),
            devices=tuple(devices),
            links=tuple(links),
            microbatch=None if microbatch is None else r.integer(microbatch, "microbatch"),
            client_bandwidth_mbps=None if client is None else r.number(client, "client_bandwidth_mbps"),
            runtime_overhead_bytes=r.integer(overhead, "runtime_overhead_bytes"),
            queue_depth=r.integer(raw.get("queue_depth", 2), "queue_depth"),
        )
    except ProblemError as exc:
        raise ProblemError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class _Reader:
    """Typed access to parsed JSON; every error names the source and the field path."""

    source: str

    def fail(self, where: str, what: str) -> ProblemError:
        return ProblemError(f"{self.source}: {where or 'top level'}: {what}")

    def field(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        return obj[key]

    def obj(self, v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def array(self, v: Any, where: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(where, f"expected a list, got {type(v).__name__}")
        return v

    def objs(self, v: Any, where: str) -> list[dict[str, Any]]:
        return [self.obj(x, f"{where}[{i}]") for i, x in enumerate(self.array(v, where))]

    def text(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"expected a string, got {v!r}")
        return v

    def integer(self, v: Any, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(where, f"expected an integer, got {v!r}")
        return v

    def number(self, v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(where, f"expected a number, got {v!r}")
        return float(v)
