"""Profiling formats: the profiling bundle a device runs, and the device profile it writes back.

A *profiling bundle* (written by ``edgepipe-compile --profile-bundle``) is a directory with
``profile-bundle.json`` and one stage bundle per distinct segment (``piece-K/``, the ordinary
stage-bundle format, hash-checked on load). Segments with identical structure (every transformer
block of a ViT) share one piece, so a 32-block model is profiled by running a handful of pieces.

A *device profile* (written by ``edgepipe-agent profile``) holds, per microbatch size, the compute
seconds of every segment (mean of the timed runs left after outliers are rejected), their spread,
each segment's peak memory, and (version 2) what the runtime's own communication costs on the
device. It is keyed by what makes it valid: model hash, device, microbatch sizes, dtype, ONNX
Runtime version and thread count; a profile whose key differs from the current one is never
silently reused. Version 1 profiles are still read (no spread, no communication costs).

Both formats are documented in docs/formats/profile.md. Standard library only: devices load this.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROFILE_BUNDLE_FORMAT = "edgepipe.profile-bundle"
PROFILE_FORMAT = "edgepipe.profile"
FORMAT_VERSION = 1  # the profiling bundle's
PROFILE_VERSION = 2  # the device profile's; version 1 is still read
READABLE_PROFILE_VERSIONS = (1, 2)
PROFILE_BUNDLE_MANIFEST = "profile-bundle.json"


class ProfileError(ValueError):
    """A profiling bundle or profile is malformed, or belongs to something else; names the file."""


@dataclass(frozen=True)
class ProfileBundle:
    model_id: str
    model_sha256: str
    segment_names: tuple[str, ...]  # the planner's segments, in order
    segment_pieces: tuple[int, ...]  # per segment: which piece-K directory runs it
    piece_count: int
    # per segment: the piece running its int8-weights variant (a segment with nothing to quantize
    # points at its fp32 piece); empty: the bundle has no int8 variants. Optional field, absent = ().
    int8_segment_pieces: tuple[int, ...] = ()
    format: str = PROFILE_BUNDLE_FORMAT
    format_version: int = FORMAT_VERSION

    def piece_dir(self, root: Path, piece: int) -> Path:
        return Path(root) / f"piece-{piece}"


@dataclass(frozen=True)
class CommCost:
    """CPU seconds the agent's own process spends per message and per byte moving tensors in one
    codec, with or without CURVE. Bytes are the uncompressed tensor bytes (what the planner's
    ``out_bytes`` count), whatever the codec: a codec's effect is in its coefficients."""

    codec: str
    secure: bool
    recv_per_message_s: float  # receive + decode
    recv_per_byte_s: float
    send_per_message_s: float  # encode + send
    send_per_byte_s: float

    def recv_s(self, nbytes: float) -> float:
        return self.recv_per_message_s + self.recv_per_byte_s * nbytes

    def send_s(self, nbytes: float) -> float:
        return self.send_per_message_s + self.send_per_byte_s * nbytes


@dataclass(frozen=True)
class CommProfile:
    """The runtime's own costs on a device, and how much of them lengthens compute.

    ``share`` is (compute_with_comm_s - compute_alone_s) / comm_cpu_s: the fraction of the CPU
    seconds spent on communication that a compute run is delayed by when both run at once (1 when
    they share one core, near 0 with a spare core)."""

    costs: tuple[CommCost, ...]
    message_bytes: tuple[int, int]  # the two message sizes the per-byte lines were fitted through
    share: float
    compute_alone_s: float
    compute_with_comm_s: float
    comm_cpu_s: float  # CPU seconds of communication (both ends of loopback) per compute run

    def cost(self, codec: str = "raw", secure: bool = False) -> CommCost | None:
        return next((c for c in self.costs if c.codec == codec and c.secure == secure), None)


@dataclass(frozen=True)
class Learned:
    """One update of a profile from a measured run (``edgepipe-compile ... --from-run``)."""

    source: str
    microbatch: int
    first_segment: int
    end_segment: int
    scale: float  # measured / profiled compute of those segments
    created: str


@dataclass(frozen=True)
class DeviceProfile:
    model_id: str
    model_sha256: str
    device: str
    dtype: str
    ort_version: str
    threads: int
    segment_names: tuple[str, ...]
    # microbatch size -> compute seconds of each segment for a whole microbatch: the mean of the
    # timed runs left after rejecting outliers (a pipeline's throughput follows the mean)
    seconds: dict[int, tuple[float, ...]]
    # peak resident memory of each segment's session while running the largest microbatch
    peak_memory_bytes: tuple[int, ...]
    repeats: int
    warmup: int
    host: dict[str, Any] = field(default_factory=dict)  # cpu model, cores: for the reader's benefit
    created: str = ""
    # microbatch size -> per segment: robust relative spread (1.4826 * MAD / median) of the timed
    # runs, and how many runs were rejected as outliers. Empty in version 1 profiles.
    spread: dict[int, tuple[float, ...]] = field(default_factory=dict)
    outliers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    comm: CommProfile | None = None
    learned: tuple[Learned, ...] = ()
    # the int8-weights variants (profiling bundles with int8 pieces), like seconds / peak_memory_bytes;
    # optional fields, absent = not measured
    int8_seconds: dict[int, tuple[float, ...]] = field(default_factory=dict)
    int8_peak_memory_bytes: tuple[int, ...] = ()
    format: str = PROFILE_FORMAT
    format_version: int = PROFILE_VERSION

    def key(self) -> tuple:
        return (self.model_sha256, self.device, tuple(sorted(self.seconds)), self.dtype, self.ort_version,
                self.threads)

    def max_spread(self, microbatch: int | None = None) -> float:
        """The largest per-segment spread (at ``microbatch``, or at any size); 0 if not measured."""
        sizes = [microbatch] if microbatch is not None else list(self.spread)
        return max((s for mb in sizes for s in self.spread.get(mb, ())), default=0.0)


def save_profile_bundle(root: Path, bundle: ProfileBundle) -> Path:
    path = Path(root) / PROFILE_BUNDLE_MANIFEST
    path.write_text(json.dumps(asdict(bundle), indent=2) + "\n")
    return path


def load_profile_bundle(root: Path | str) -> ProfileBundle:
    path = Path(root) / PROFILE_BUNDLE_MANIFEST
    raw = _read_json(path, PROFILE_BUNDLE_FORMAT)
    try:
        bundle = ProfileBundle(
            model_id=str(raw["model_id"]),
            model_sha256=str(raw["model_sha256"]),
            segment_names=tuple(str(n) for n in raw["segment_names"]),
            segment_pieces=tuple(int(p) for p in raw["segment_pieces"]),
            piece_count=int(raw["piece_count"]),
            int8_segment_pieces=tuple(int(p) for p in raw.get("int8_segment_pieces") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{path}: malformed field: {exc!r}") from exc
    if len(bundle.segment_names) != len(bundle.segment_pieces):
        raise ProfileError(f"{path}: {len(bundle.segment_names)} segments but {len(bundle.segment_pieces)} pieces")
    if any(not 0 <= p < bundle.piece_count for p in (*bundle.segment_pieces, *bundle.int8_segment_pieces)):
        raise ProfileError(f"{path}: a segment refers to a piece outside 0..{bundle.piece_count - 1}")
    if bundle.int8_segment_pieces and len(bundle.int8_segment_pieces) != len(bundle.segment_names):
        raise ProfileError(f"{path}: {len(bundle.segment_names)} segments but {len(bundle.int8_segment_pieces)} "
                           f"int8 pieces")
    return bundle


def profile_to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The JSON form (also what the control protocol's ``profile`` reply carries)."""
    raw = asdict(profile)
    for name in ("seconds", "spread", "outliers", "int8_seconds"):
        raw[name] = {str(k): list(v) for k, v in getattr(profile, name).items()}
    return raw


def save_profile(path: Path, profile: DeviceProfile) -> Path:
    Path(path).write_text(json.dumps(profile_to_dict(profile), indent=2) + "\n")
    return Path(path)


def load_profile(path: Path | str) -> DeviceProfile:
    return profile_from_dict(_read_json(Path(path), PROFILE_FORMAT, None), str(path))  # version checked there


def profile_from_dict(raw: Any, path: str = "profile") -> DeviceProfile:
    """Check and build a DeviceProfile from its JSON form; ``path`` names the source in errors."""
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path}: not an {PROFILE_FORMAT} file")
    version = raw.get("format_version")
    if version not in READABLE_PROFILE_VERSIONS:
        raise ProfileError(f"{path}: profile format version {version} is not supported (reads "
                           f"{', '.join(map(str, READABLE_PROFILE_VERSIONS))}); re-profile the device")
    try:
        names = tuple(str(n) for n in raw["segment_names"])
        seconds = _per_size(raw["seconds"], float)
        profile = DeviceProfile(
            model_id=str(raw["model_id"]),
            model_sha256=str(raw["model_sha256"]),
            device=str(raw["device"]),
            dtype=str(raw["dtype"]),
            ort_version=str(raw["ort_version"]),
            threads=int(raw["threads"]),
            segment_names=names,
            seconds=seconds,
            peak_memory_bytes=tuple(int(x) for x in raw["peak_memory_bytes"]),
            repeats=int(raw["repeats"]),
            warmup=int(raw["warmup"]),
            host=dict(raw.get("host", {})),
            created=str(raw.get("created", "")),
            spread=_per_size(raw.get("spread") or {}, float),
            outliers=_per_size(raw.get("outliers") or {}, int),
            comm=_comm_from_dict(raw.get("comm")),
            learned=tuple(_learned_from_dict(x) for x in raw.get("learned") or ()),
            format_version=int(version),
            int8_seconds={int(k): tuple(float(x) for x in v) for k, v in (raw.get("int8_seconds") or {}).items()},
            int8_peak_memory_bytes=tuple(int(x) for x in raw.get("int8_peak_memory_bytes") or ()),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProfileError(f"{path}: malformed field: {exc!r}") from exc
    for name in ("seconds", "spread", "outliers", "int8_seconds"):
        for mb, values in getattr(profile, name).items():
            if len(values) != len(names):
                raise ProfileError(f"{path}: {name} at microbatch {mb} has {len(values)} values for "
                                   f"{len(names)} segments")
    if not all(math.isfinite(x) and x >= 0 for values in profile.seconds.values() for x in values):
        raise ProfileError(f"{path}: seconds must be finite and >= 0")
    return profile


def _per_size(raw: dict[str, Any], kind: type) -> dict[int, tuple]:
    return {int(k): tuple(kind(x) for x in v) for k, v in raw.items()}


def _comm_from_dict(raw: Any) -> CommProfile | None:
    if raw is None:
        return None
    costs = tuple(CommCost(codec=str(c["codec"]), secure=bool(c["secure"]),
                           recv_per_message_s=float(c["recv_per_message_s"]),
                           recv_per_byte_s=float(c["recv_per_byte_s"]),
                           send_per_message_s=float(c["send_per_message_s"]),
                           send_per_byte_s=float(c["send_per_byte_s"])) for c in raw["costs"])
    small, large = (int(x) for x in raw["message_bytes"])
    return CommProfile(costs=costs, message_bytes=(small, large), share=float(raw["share"]),
                       compute_alone_s=float(raw["compute_alone_s"]),
                       compute_with_comm_s=float(raw["compute_with_comm_s"]),
                       comm_cpu_s=float(raw["comm_cpu_s"]))


def _learned_from_dict(raw: Any) -> Learned:
    return Learned(source=str(raw["source"]), microbatch=int(raw["microbatch"]),
                   first_segment=int(raw["first_segment"]), end_segment=int(raw["end_segment"]),
                   scale=float(raw["scale"]), created=str(raw.get("created", "")))


def check_profile_matches(profile: DeviceProfile, *, model_sha256: str, device: str | None = None,
                          ort_version: str | None = None, source: str = "profile") -> None:
    """Refuse a profile measured for another model, device or ONNX Runtime version."""
    if profile.model_sha256 != model_sha256:
        raise ProfileError(f"{source}: measured for model {profile.model_sha256[:12]}, not {model_sha256[:12]}; "
                           f"re-profile this model")
    if device is not None and profile.device != device:
        raise ProfileError(f"{source}: measured on device {profile.device!r}, not {device!r}")
    if ort_version is not None and profile.ort_version != ort_version:
        raise ProfileError(f"{source}: measured with ONNX Runtime {profile.ort_version}, "
                           f"the device now runs {ort_version}; re-profile")


def _read_json(path: Path, expected_format: str,
               versions: tuple[int, ...] | None = (FORMAT_VERSION,)) -> dict[str, Any]:
    if not path.is_file():
        raise ProfileError(f"{path}: missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != expected_format:
        raise ProfileError(f"{path}: not an {expected_format} file")
    if versions is not None and raw.get("format_version") not in versions:
        raise ProfileError(f"{path}: format version {raw.get('format_version')} is not supported "
                           f"(supports {', '.join(map(str, versions))})")
    return raw
