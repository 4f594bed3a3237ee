"""The planning problem: a model cut into segments, device types, devices and links.

A problem file holds everything the planner needs, so plans can be made (and questioned) without
any device at hand. The compiler writes the model part from an ONNX graph; the cluster file
(cluster.py) supplies the devices. Format "edgepipe.problem", version 2 (version 1 files are read
too: they are version 2 files without the optional lossy choices, int8 speeds and comm costs),
documented in docs/formats/plan.md. This module is the one definition of that format.

Version 2 adds what lets the planner trade accuracy for speed, and count the runtime's own work:
- per cut, each activation codec's wire bytes and measured effect on the model's outputs;
- per segment, an int8-weights variant (its weight bytes and measured effect), and per device type
  its int8 compute speed;
- per device type, the CPU cost of receiving and sending messages (comm costs, from the profiler);
- an error budget (``max_error``): without one no lossy choice is ever made.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edgepipe.problem"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CODECS = ("raw", "fp16", "int8")  # activation codecs of agent/formats/codecs.py; raw is implicit
LOSSY_CODECS = CODECS[1:]
MIB = 1 << 20
DEFAULT_RUNTIME_OVERHEAD_BYTES = 100 * MIB


class ProblemError(ValueError):
    """A problem is malformed. The message names the offending field."""


@dataclass(frozen=True)
class ErrorEffect:
    """What one lossy choice does to the model's final outputs, measured against fp32 with only that
    choice made: the largest absolute difference, the cosine similarity of the output vectors, and
    the fraction of samples whose top-1 class is unchanged (None: not a classifier)."""

    max_abs_diff: float
    cosine: float
    top1_agreement: float | None = None


@dataclass(frozen=True)
class CutCodec:
    """A segment's output cut sent in a lossy codec: its wire bytes per sample and its effect."""

    codec: str  # "fp16" or "int8"
    out_bytes: int
    effect: ErrorEffect


@dataclass(frozen=True)
class Int8Weights:
    """A segment with int8 weights: its weight bytes and its effect when only it is quantized."""

    weight_bytes: int
    effect: ErrorEffect


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
    codecs: tuple[CutCodec, ...] = ()  # lossy ways to send the cut after this segment
    int8: Int8Weights | None = None  # the int8-weights variant, if the compiler measured one

    def codec(self, name: str) -> CutCodec | None:
        return next((c for c in self.codecs if c.codec == name), None)


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    model_sha256: str
    input_bytes: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Int8Speed:
    """How fast a device type computes the int8-weights variant: measured seconds per segment for
    whole microbatches, or an effective GFLOPS figure."""

    profiles: dict[int, tuple[float, ...]] = field(default_factory=dict)
    gflops: float | None = None


@dataclass(frozen=True)
class CommCost:
    """CPU seconds a device spends per message (one per microbatch and hop) to take it from the
    socket and decode it (recv) or to encode it and hand it to the socket (send), for one codec,
    with CURVE encryption on the hop or not. Bytes are the message's tensors at their uncompressed
    size (what ``Segment.out_bytes * microbatch`` counts), whatever the codec. Measured by the
    profiler (the same fields as the device profile's ``comm.costs``)."""

    codec: str
    secure: bool
    recv_per_message_s: float = 0.0
    recv_per_byte_s: float = 0.0
    send_per_message_s: float = 0.0
    send_per_byte_s: float = 0.0

    def recv_s(self, n_bytes: float) -> float:
        return self.recv_per_message_s + self.recv_per_byte_s * n_bytes

    def send_s(self, n_bytes: float) -> float:
        return self.send_per_message_s + self.send_per_byte_s * n_bytes


@dataclass(frozen=True)
class DeviceType:
    """How fast a kind of device computes each segment, and what its messages cost it.

    Resolution order for a microbatch size: a measured profile at that size (seconds per segment
    for the whole microbatch); else the ``reference`` type's seconds divided by ``speed``; else
    ``flops * microbatch / (gflops * 1e9)``. The int8 variant resolves the same way through
    ``int8`` (its profiles, the reference's int8 seconds / speed, its gflops); a type with none
    never runs int8 stages.

    ``comm_share`` is the fraction of the comm CPU seconds that lengthens compute: 1 when the
    agent's receive and send threads share compute's core, 0 when they have cores of their own
    (measured, it can exceed 1: contention costs compute more than the comm work's own CPU time).
    """

    name: str
    profiles: dict[int, tuple[float, ...]] = field(default_factory=dict)
    speed: float = 1.0
    reference: str | None = None
    gflops: float | None = None
    int8: Int8Speed | None = None
    comm: tuple[CommCost, ...] = ()
    comm_share: float = 1.0

    def comm_cost(self, codec: str, secure: bool) -> CommCost | None:
        return next((c for c in self.comm if c.codec == codec and c.secure == secure), None)


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
class ErrorBudget:
    """The user's tolerance for the model's outputs against fp32 (any subset of the three)."""

    max_abs_diff: float | None = None
    cosine: float | None = None  # the lowest acceptable cosine similarity
    top1_agreement: float | None = None  # the lowest acceptable top-1 agreement

    def describe(self) -> str:
        parts = []
        if self.max_abs_diff is not None:
            parts.append(f"max|Δ| ≤ {self.max_abs_diff:g}")
        if self.cosine is not None:
            parts.append(f"cosine ≥ {self.cosine:g}")
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement ≥ {self.top1_agreement:g}")
        return ", ".join(parts)


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
    max_error: ErrorBudget | None = None  # None: no lossy choice (codec, int8 weights) is made
    secure: bool = True  # CURVE on every hop: which comm costs apply

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
                "segments": [_segment_to_dict(s) for s in self.model.segments],
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
            "max_error": None if self.max_error is None else _budget_to_dict(self.max_error),
            "secure": self.secure,
        }

    @property
    def has_lossy_options(self) -> bool:
        """Whether the model offers any lossy choice (a codec at a cut, an int8 variant)."""
        return any(s.codecs or s.int8 is not None for s in self.model.segments)

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


def int8_segment_seconds(problem: Problem, type_name: str, microbatch: int) -> np.ndarray | None:
    """Seconds of the int8-weights variant of each segment on ``type_name``, or None when the type
    has no int8 figures (its own profile at this size, its reference's, or int8 gflops)."""
    dtype = problem.device_type(type_name)
    int8 = dtype.int8
    if int8 is not None and microbatch in int8.profiles:
        return np.asarray(int8.profiles[microbatch], dtype=np.float64)
    if dtype.reference is not None:
        base = int8_segment_seconds(problem, dtype.reference, microbatch)
        if base is not None:
            return base / dtype.speed
    if int8 is not None and int8.gflops is not None:
        flops = np.array([s.flops for s in problem.model.segments], dtype=np.float64)
        return flops * microbatch / (int8.gflops * 1e9)
    return None


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


# --- the error budget -------------------------------------------------------------------------

_BUDGET_KEYS = {"max_abs": "max_abs_diff", "max_abs_diff": "max_abs_diff", "cosine": "cosine",
                "top1": "top1_agreement", "top1_agreement": "top1_agreement"}


def parse_error_budget(text: str) -> ErrorBudget:
    """``"0.05"`` (max |Δ|) or ``"max_abs=0.05,cosine=0.999,top1=0.99"`` (any subset) -> ErrorBudget.

    For command-line flags (``--max-error``); raises ProblemError with a one-line message."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        key, _, raw = part.rpartition("=")
        key = key.strip() or "max_abs"
        if key not in _BUDGET_KEYS:
            raise ProblemError(f"--max-error: unknown measure {key!r} in {text!r} (use max_abs, cosine, top1)")
        try:
            value = float(raw)
        except ValueError:
            raise ProblemError(f"--max-error: {key}={raw!r} is not a number (example: max_abs=0.05,cosine=0.999)"
                               ) from None
        values[_BUDGET_KEYS[key]] = value
    budget = ErrorBudget(**values)
    try:
        _validate_budget(budget, "--max-error")
    except ProblemError as exc:
        raise ProblemError(str(exc)) from None
    return budget


ERROR_UNITS = 2**32  # a lossy item's share of the budget is counted in these units, rounded up


def error_share(effect: ErrorEffect, budget: ErrorBudget) -> float:
    """The fraction of ``budget`` that one lossy item uses, by the conservative combination rule:
    max |Δ| adds up, angles (arccos of the cosines) add up, top-1 disagreements add up; an item's
    share is the largest of its fractions over the measures the budget names. A plan is within the
    budget when its items' shares sum to at most 1 (then every named measure is within its limit)."""
    fractions = [0.0]
    if budget.max_abs_diff is not None:
        fractions.append(_fraction(effect.max_abs_diff, budget.max_abs_diff))
    if budget.cosine is not None:
        fractions.append(_fraction(_angle(effect.cosine), _angle(budget.cosine)))
    if budget.top1_agreement is not None:
        agreement = 1.0 if effect.top1_agreement is None else effect.top1_agreement
        fractions.append(_fraction(1.0 - agreement, 1.0 - budget.top1_agreement))
    return max(fractions)


def error_units(effect: ErrorEffect, budget: ErrorBudget) -> float:
    """``error_share`` in integer units of 1/ERROR_UNITS (rounded up, so sums stay conservative and
    exact in float64); inf when the item alone exceeds the budget."""
    share = error_share(effect, budget)
    return math.inf if share > 1.0 else float(math.ceil(share * ERROR_UNITS))


def combine_effects(effects: Sequence[ErrorEffect]) -> ErrorEffect:
    """The predicted effect of several lossy items together (the rule of ``error_share``)."""
    top1 = [e.top1_agreement for e in effects if e.top1_agreement is not None]
    angle = min(math.pi, math.fsum(_angle(e.cosine) for e in effects))
    return ErrorEffect(
        max_abs_diff=math.fsum(e.max_abs_diff for e in effects),
        cosine=math.cos(angle) if effects else 1.0,
        top1_agreement=max(0.0, 1.0 - math.fsum(1.0 - a for a in top1)) if top1 else None,
    )


def _angle(cosine: float) -> float:
    return math.acos(min(1.0, max(-1.0, cosine)))


def _fraction(used: float, allowed: float) -> float:
    if used <= 0:
        return 0.0
    return math.inf if allowed <= 0 else used / allowed


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
        _validate_profiles(t.profiles, n_seg, f"{where}.profiles")
        if t.int8 is not None:
            _validate_profiles(t.int8.profiles, n_seg, f"{where}.int8.profiles")
            _require(t.int8.gflops is None or _positive(t.int8.gflops),
                     f"{where}.int8.gflops: must be a positive number, got {t.int8.gflops!r}")
        # Usually in [0, 1]; a measured share above 1 means the comm work slows compute by more than
        # its own CPU time (caches, scheduling), which the cost model takes as it is.
        _require(_non_negative(t.comm_share), f"{where}.comm.share: must be a number >= 0, got {t.comm_share!r}")
        seen_costs: set[tuple[str, bool]] = set()
        for k, c in enumerate(t.comm):
            at = f"{where}.comm.costs[{k}]"
            _require(c.codec in CODECS, f"{at}.codec: must be one of {', '.join(CODECS)}, got {c.codec!r}")
            _require(isinstance(c.secure, bool), f"{at}.secure: must be true or false")
            _require((c.codec, c.secure) not in seen_costs, f"{at}: duplicate entry for ({c.codec}, secure={c.secure})")
            seen_costs.add((c.codec, c.secure))
            for attr in ("recv_per_message_s", "recv_per_byte_s", "send_per_message_s", "send_per_byte_s"):
                v = getattr(c, attr)
                _require(_non_negative(v), f"{at}.{attr}: must be seconds >= 0, got {v!r}")
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
    _require(isinstance(p.secure, bool), f"secure: must be true or false, got {p.secure!r}")
    if p.max_error is not None:
        _validate_budget(p.max_error, "max_error")
        if p.max_error.top1_agreement is not None:
            for i, s in enumerate(p.model.segments):
                effects = [(f"codecs.{c.codec}", c.effect) for c in s.codecs]
                effects += [("int8", s.int8.effect)] if s.int8 is not None else []
                for what, effect in effects:
                    _require(effect.top1_agreement is not None,
                             f"max_error.top1_agreement: model.segments[{i}] ({s.name!r}).{what} has no "
                             "top1_agreement measured (not a classifier?); budget max_abs_diff or cosine instead")


def _validate_profiles(profiles: dict[int, tuple[float, ...]], n_seg: int, where: str) -> None:
    for mb, secs in profiles.items():
        _require(isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1,
                 f"{where}: microbatch size must be an integer >= 1, got {mb!r}")
        _require(len(secs) == n_seg, f"{where}[{mb}]: has {len(secs)} entries, the model has {n_seg} segments")
        for k, v in enumerate(secs):
            _require(_non_negative(v), f"{where}[{mb}][{k}]: must be seconds >= 0, got {v!r}")


def _validate_budget(b: ErrorBudget, where: str) -> None:
    _require(any(v is not None for v in (b.max_abs_diff, b.cosine, b.top1_agreement)),
             f"{where}: give at least one of max_abs_diff, cosine, top1_agreement")
    _require(b.max_abs_diff is None or _non_negative(b.max_abs_diff),
             f"{where}.max_abs_diff: must be a number >= 0, got {b.max_abs_diff!r}")
    _require(b.cosine is None or (_number(b.cosine) and -1 <= b.cosine <= 1),
             f"{where}.cosine: must be a number in [-1, 1], got {b.cosine!r}")
    _require(b.top1_agreement is None or (_number(b.top1_agreement) and 0 <= b.top1_agreement <= 1),
             f"{where}.top1_agreement: must be a number in [0, 1], got {b.top1_agreement!r}")


def _validate_effect(e: ErrorEffect, where: str) -> None:
    _require(_non_negative(e.max_abs_diff), f"{where}.max_abs_diff: must be a number >= 0, got {e.max_abs_diff!r}")
    _require(_number(e.cosine) and -1 <= e.cosine <= 1,
             f"{where}.cosine: must be a number in [-1, 1], got {e.cosine!r}")
    _require(e.top1_agreement is None or (_number(e.top1_agreement) and 0 <= e.top1_agreement <= 1),
             f"{where}.top1_agreement: must be a number in [0, 1] or null, got {e.top1_agreement!r}")


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
        names = [c.codec for c in s.codecs]
        for c in s.codecs:
            at = f"{where}.codecs.{c.codec}"
            _require(c.codec in LOSSY_CODECS, f"{where}.codecs: unknown codec {c.codec!r} (lossy codecs: "
                     f"{', '.join(LOSSY_CODECS)}; raw is implicit)")
            _require(names.count(c.codec) == 1, f"{at}: given twice")
            _require(i < len(m.segments) - 1, f"{at}: the last segment's output goes to the client raw; "
                     "codecs apply between stages")
            _require(_int(c.out_bytes) and c.out_bytes >= 0, f"{at}.out_bytes: must be an integer >= 0, "
                     f"got {c.out_bytes!r}")
            _validate_effect(c.effect, at)
        if s.int8 is not None:
            _require(_int(s.int8.weight_bytes) and s.int8.weight_bytes >= 0,
                     f"{where}.int8.weight_bytes: must be an integer >= 0, got {s.int8.weight_bytes!r}")
            _validate_effect(s.int8.effect, f"{where}.int8")


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


def _profiles_to_dict(profiles: dict[int, tuple[float, ...]]) -> dict[str, list[float]]:
    return {str(k): list(v) for k, v in sorted(profiles.items())}


def _effect_to_dict(e: ErrorEffect) -> dict[str, Any]:
    return {"max_abs_diff": e.max_abs_diff, "cosine": e.cosine, "top1_agreement": e.top1_agreement}


def _budget_to_dict(b: ErrorBudget) -> dict[str, Any]:
    return {"max_abs_diff": b.max_abs_diff, "cosine": b.cosine, "top1_agreement": b.top1_agreement}


def _segment_to_dict(s: Segment) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "weight_bytes": s.weight_bytes, "activation_bytes": s.activation_bytes,
                           "out_bytes": s.out_bytes, "flops": s.flops}
    # Written only when present, so a problem without lossy choices reads like version 1.
    if s.codecs:
        out["codecs"] = {c.codec: {"out_bytes": c.out_bytes, **_effect_to_dict(c.effect)} for c in s.codecs}
    if s.int8 is not None:
        out["int8"] = {"weight_bytes": s.int8.weight_bytes, **_effect_to_dict(s.int8.effect)}
    return out


def _type_to_dict(t: DeviceType) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "profiles": _profiles_to_dict(t.profiles), "speed": t.speed,
                           "reference": t.reference, "gflops": t.gflops}
    if t.int8 is not None:
        out["int8"] = {"profiles": _profiles_to_dict(t.int8.profiles), "gflops": t.int8.gflops}
    if t.comm or t.comm_share != 1.0:
        out["comm"] = {"share": t.comm_share, "costs": [
            {"codec": c.codec, "secure": c.secure, "recv_per_message_s": c.recv_per_message_s,
             "recv_per_byte_s": c.recv_per_byte_s, "send_per_message_s": c.send_per_message_s,
             "send_per_byte_s": c.send_per_byte_s} for c in t.comm]}
    return out


def _problem_from_dict(raw: Any, source: str) -> Problem:
    r = _Reader(source)
    r.obj(raw, "")
    if raw.get("format") != FORMAT:
        raise ProblemError(f"{source}: not an EdgePipe problem file (format={raw.get('format')!r})")
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise ProblemError(
            f"{source}: problem format_version {raw.get('format_version')!r} is not supported "
            f"(this planner reads {', '.join(str(v) for v in READABLE_VERSIONS)})"
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
            codecs=tuple(r.cut_codec(name, c, f"{at}.codecs.{name}")
                         for name, c in r.obj(s.get("codecs", {}), f"{at}.codecs").items()),
            int8=None if s.get("int8") is None else Int8Weights(
                r.integer(r.field(r.obj(s["int8"], f"{at}.int8"), "weight_bytes", f"{at}.int8"),
                          f"{at}.int8.weight_bytes"),
                r.effect(s["int8"], f"{at}.int8"),
            ),
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
        reference, gflops = t.get("reference"), t.get("gflops")
        int8 = None
        if t.get("int8") is not None:
            i8 = r.obj(t["int8"], f"{at}.int8")
            int8 = Int8Speed(r.profiles(i8.get("profiles", {}), f"{at}.int8.profiles"),
                             r.optional_number(i8.get("gflops"), f"{at}.int8.gflops"))
        comm = r.obj(t.get("comm") or {}, f"{at}.comm")
        types.append(DeviceType(
            name=r.text(r.field(t, "name", at), f"{at}.name"),
            profiles=r.profiles(t.get("profiles", {}), f"{at}.profiles"),
            speed=r.number(t.get("speed", 1.0), f"{at}.speed"),
            reference=None if reference is None else r.text(reference, f"{at}.reference"),
            gflops=None if gflops is None else r.number(gflops, f"{at}.gflops"),
            int8=int8,
            comm=tuple(r.comm_cost(c, f"{at}.comm.costs[{k}]")
                       for k, c in enumerate(r.objs(comm.get("costs", []), f"{at}.comm.costs"))),
            comm_share=r.number(comm.get("share", 1.0), f"{at}.comm.share"),
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
    budget = None
    if raw.get("max_error") is not None:
        b = r.obj(raw["max_error"], "max_error")
        budget = ErrorBudget(*(r.optional_number(b.get(k), f"max_error.{k}")
                               for k in ("max_abs_diff", "cosine", "top1_agreement")))
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
            max_error=budget,
            secure=r.boolean(raw.get("secure", True), "secure"),
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

    def optional_number(self, v: Any, where: str) -> float | None:
        return None if v is None else self.number(v, where)

    def boolean(self, v: Any, where: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(where, f"expected true or false, got {v!r}")
        return v

    def profiles(self, v: Any, where: str) -> dict[int, tuple[float, ...]]:
        out: dict[int, tuple[float, ...]] = {}
        for key, secs in self.obj(v, where).items():
            if not key.isdigit():
                raise self.fail(where, f"key {key!r} is not a microbatch size")
            at = f"{where}[{key}]"
            out[int(key)] = tuple(self.number(x, f"{at}[{j}]") for j, x in enumerate(self.array(secs, at)))
        return out

    def effect(self, v: Any, where: str) -> ErrorEffect:
        obj = self.obj(v, where)
        return ErrorEffect(
            max_abs_diff=self.number(self.field(obj, "max_abs_diff", where), f"{where}.max_abs_diff"),
            cosine=self.number(self.field(obj, "cosine", where), f"{where}.cosine"),
            top1_agreement=self.optional_number(obj.get("top1_agreement"), f"{where}.top1_agreement"),
        )

    def cut_codec(self, name: str, v: Any, where: str) -> CutCodec:
        obj = self.obj(v, where)
        return CutCodec(name, self.integer(self.field(obj, "out_bytes", where), f"{where}.out_bytes"),
                        self.effect(obj, where))

    def comm_cost(self, v: dict[str, Any], where: str) -> CommCost:
        return CommCost(
            codec=self.text(self.field(v, "codec", where), f"{where}.codec"),
            secure=self.boolean(self.field(v, "secure", where), f"{where}.secure"),
            **{k: self.number(v.get(k, 0.0), f"{where}.{k}") for k in (
                "recv_per_message_s", "recv_per_byte_s", "send_per_message_s", "send_per_byte_s")},
        )
