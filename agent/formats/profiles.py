"""Profiling formats: the profiling bundle a device runs, and the device profile it writes back.

A *profiling bundle* (written by ``edgepipe-compile --profile-bundle``) is a directory with
``profile-bundle.json`` and one stage bundle per distinct segment (``piece-K/``, the ordinary
stage-bundle format, hash-checked on load). Segments with identical structure (every transformer
block of a ViT) share one piece, so a 32-block model is profiled by running a handful of pieces.

A *device profile* (written by ``edgepipe-agent profile``) holds, per microbatch size, the median
compute seconds of every segment and each segment's peak memory. It is keyed by what makes it
valid: model hash, device, microbatch sizes, dtype, ONNX Runtime version and thread count; a
profile whose key differs from the current one is never silently reused.

Both formats are documented in docs/formats/profile.md. Standard library only: devices load this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROFILE_BUNDLE_FORMAT = "edgepipe.profile-bundle"
PROFILE_FORMAT = "edgepipe.profile"
FORMAT_VERSION = 1
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
class DeviceProfile:
    model_id: str
    model_sha256: str
    device: str
    dtype: str
    ort_version: str
    threads: int
    segment_names: tuple[str, ...]
    # microbatch size -> median compute seconds of each segment for a whole microbatch
    seconds: dict[int, tuple[float, ...]]
    # peak resident memory of each segment's session while running the largest microbatch
    peak_memory_bytes: tuple[int, ...]
    repeats: int
    warmup: int
    host: dict[str, Any] = field(default_factory=dict)  # cpu model, cores: for the reader's benefit
    created: str = ""
    # the int8-weights variants (profiling bundles with int8 pieces), like seconds / peak_memory_bytes;
    # optional fields, absent = not measured
    int8_seconds: dict[int, tuple[float, ...]] = field(default_factory=dict)
    int8_peak_memory_bytes: tuple[int, ...] = ()
    format: str = PROFILE_FORMAT
    format_version: int = FORMAT_VERSION

    def key(self) -> tuple:
        return (self.model_sha256, self.device, tuple(sorted(self.seconds)), self.dtype, self.ort_version,
                self.threads)


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
    raw["seconds"] = {str(k): list(v) for k, v in profile.seconds.items()}
    raw["int8_seconds"] = {str(k): list(v) for k, v in profile.int8_seconds.items()}
    return raw


def save_profile(path: Path, profile: DeviceProfile) -> Path:
    Path(path).write_text(json.dumps(profile_to_dict(profile), indent=2) + "\n")
    return Path(path)


def load_profile(path: Path | str) -> DeviceProfile:
    return profile_from_dict(_read_json(Path(path), PROFILE_FORMAT), str(path))


def profile_from_dict(raw: Any, path: str = "profile") -> DeviceProfile:
    """Check and build a DeviceProfile from its JSON form; ``path`` names the source in errors."""
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path}: not an {PROFILE_FORMAT} file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{path}: format version {raw.get('format_version')} is not supported "
                           f"(supports {FORMAT_VERSION})")
    try:
        names = tuple(str(n) for n in raw["segment_names"])
        seconds = {int(k): tuple(float(x) for x in v) for k, v in raw["seconds"].items()}
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
            int8_seconds={int(k): tuple(float(x) for x in v) for k, v in (raw.get("int8_seconds") or {}).items()},
            int8_peak_memory_bytes=tuple(int(x) for x in raw.get("int8_peak_memory_bytes") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{path}: malformed field: {exc!r}") from exc
    for mb, values in (*profile.seconds.items(), *profile.int8_seconds.items()):
        if len(values) != len(names):
            raise ProfileError(f"{path}: microbatch {mb} has {len(values)} timings for {len(names)} segments")
    return profile


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


def _read_json(path: Path, expected_format: str) -> dict[str, Any]:
    if not path.is_file():
        raise ProfileError(f"{path}: missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != expected_format:
        raise ProfileError(f"{path}: not an {expected_format} file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{path}: format version {raw.get('format_version')} is not supported "
                           f"(supports {FORMAT_VERSION})")
    return raw
