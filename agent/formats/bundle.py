"""The stage bundle: one directory per pipeline stage, written by the compiler, loaded by an agent.

A bundle is ``stage.onnx`` (the stage's graph), ``stage.onnx.data`` (only the weights this stage
uses, as ONNX external data) and ``stage.json`` (this manifest). The manifest pins the sha256 of
every file so a device refuses a bundle that was truncated, corrupted or mixed up in transit.

This module is the one definition of the format. It is imported by the agent on the device, so it
uses nothing but the standard library. See docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgepipe.stage-bundle"
# 2: adds ``forwarded``, ``input_values`` and ``fixed_batch`` (models with several inputs, e.g. a
# transformer's token ids and attention mask) and ``quantization`` (stages with int8 weights).
# Version 1 manifests are still read: they have none.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "stage.json"
GRAPH_NAME = "stage.onnx"
DATA_NAME = "stage.onnx.data"

# Numpy dtype strings the wire protocol and manifests use; ONNX element types map onto these.
SUPPORTED_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class BundleError(ValueError):
    """A bundle is missing, corrupted or not one this agent can run. The message names the file."""


@dataclass(frozen=True)
class TensorSpec:
    """A stage input or output. ``shape`` holds ints for fixed axes and strings for symbolic
    ones (``"batch"``); the batch axis is always axis 0."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def bytes_per_sample(self) -> int | None:
        """Bytes of one sample (axis 0 excluded), or None when another axis is symbolic."""
        import math

        rest = self.shape[1:]
        if any(not isinstance(d, int) for d in rest):
            return None
        return math.prod(rest) * _ITEMSIZE[self.dtype]


_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1,
             "uint8": 1, "bool": 1}


# What values a model input takes, so a client can make valid inputs without knowing the model.
INPUT_KINDS = ("real", "index", "mask")


@dataclass(frozen=True)
class InputValues:
    """``real``: any float (clients send normal noise); ``index``: integers in [0, ``high``), such as
    token ids within the vocabulary; ``mask``: 0/1 attention mask (1 = attend; clients send ones)."""

    kind: str
    high: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind {self.kind!r} is not one of {', '.join(INPUT_KINDS)}")
        if self.kind == "index" and (self.high is None or self.high < 1):
            raise ValueError(f"an index input needs high >= 1, got {self.high!r}")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class WeightQuantization:
    """How a stage's weights were quantized after slicing (``StageManifest.quantization``; absent or
    null there: float weights as exported). Inputs and outputs stay float32 either way."""

    weights: str  # "int8"
    method: str  # "onnxruntime.quantization.quantize_dynamic"
    op_types: tuple[str, ...]  # the ops whose weights were quantized ("MatMul", "Gemm")
    per_channel: bool  # one scale per output column (else one per weight)
    onnxruntime: str  # version of the quantizer
    float_weight_bytes: int  # weight bytes of the float stage it was made from

    def describe(self) -> str:
        return f"{self.weights} ({'/'.join(self.op_types)}, {self.method.rsplit('.', 1)[-1]})"


@dataclass(frozen=True)
class StageManifest:
    """Everything an agent needs to know about its stage, without opening the ONNX file."""

    model_id: str  # e.g. "vit_base_patch16_224"
    model_sha256: str  # hash of the whole exported model graph + weights this stage was cut from
    stage_index: int  # 0-based
    stage_count: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, FileEntry]  # file name (relative to the bundle dir) -> hash and size
    cut_in: str | None  # label of the cut this stage starts at; None for the first stage
    cut_out: str | None  # label of the cut this stage ends at; None for the last stage
    weight_bytes: int  # bytes of initializers this stage holds
    compile_settings: dict[str, Any] = field(default_factory=dict)  # opset, exporter versions, ...
    # Inputs that are model inputs passed along from the client (e.g. "attention_mask"), not computed
    # by the stage before: this stage rebuilds masks from them, and passes them on when a later stage
    # needs them too (they are then also among its outputs, unchanged). Always empty for stage 0.
    forwarded: tuple[str, ...] = ()
    input_values: dict[str, InputValues] = field(default_factory=dict)  # model inputs among ``inputs``
    fixed_batch: int | None = None  # the one batch size the stage accepts (model exported without a batch axis)
    quantization: WeightQuantization | None = None  # None: float weights as exported
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        raw = asdict(self)
        raw["input_values"] = {k: {f: v for f, v in asdict(d).items() if v is not None}
                               for k, d in self.input_values.items()}
        return json.dumps(raw, indent=2, sort_keys=True)

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str = "stage.json") -> StageManifest:
        if raw.get("format") != FORMAT:
            raise BundleError(f"{source}: not an EdgePipe stage bundle manifest (format={raw.get('format')!r})")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{source}: bundle format version {version} is not supported by this agent "
                f"(supports {', '.join(map(str, READABLE_VERSIONS))}); recompile or upgrade edgepipe"
            )
        try:
            manifest = StageManifest(
                model_id=str(raw["model_id"]),
                model_sha256=str(raw["model_sha256"]),
                stage_index=int(raw["stage_index"]),
                stage_count=int(raw["stage_count"]),
                inputs=tuple(_tensor_spec(t) for t in raw["inputs"]),
                outputs=tuple(_tensor_spec(t) for t in raw["outputs"]),
                files={k: FileEntry(str(v["sha256"]), int(v["bytes"])) for k, v in raw["files"].items()},
                cut_in=raw.get("cut_in"),
                cut_out=raw.get("cut_out"),
                weight_bytes=int(raw["weight_bytes"]),
                compile_settings=dict(raw.get("compile_settings", {})),
                forwarded=tuple(str(n) for n in raw.get("forwarded", ())),
                input_values={str(k): InputValues(str(v["kind"]), None if v.get("high") is None else int(v["high"]))
                              for k, v in raw.get("input_values", {}).items()},
                fixed_batch=None if raw.get("fixed_batch") is None else int(raw["fixed_batch"]),
                quantization=_quantization(raw.get("quantization")),
                format_version=int(version),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source}: malformed manifest field: {exc!r}") from exc
        names = {t.name for t in manifest.inputs}
        stray = [n for n in (*manifest.forwarded, *manifest.input_values) if n not in names]
        if stray:
            raise BundleError(f"{source}: {stray} named in forwarded/input_values but not among the inputs")
        return manifest


def _quantization(raw: Any) -> WeightQuantization | None:
    if raw is None:
        return None
    return WeightQuantization(weights=str(raw["weights"]), method=str(raw["method"]),
                              op_types=tuple(str(o) for o in raw["op_types"]), per_channel=bool(raw["per_channel"]),
                              onnxruntime=str(raw["onnxruntime"]), float_weight_bytes=int(raw["float_weight_bytes"]))


def _tensor_spec(raw: dict[str, Any]) -> TensorSpec:
    dtype = str(raw["dtype"])
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} for tensor {raw.get('name')!r}")
    return TensorSpec(str(raw["name"]), dtype, tuple(d if isinstance(d, str) else int(d) for d in raw["shape"]))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(bundle_dir: Path, names: list[str]) -> dict[str, FileEntry]:
    """Hash the named files of a bundle being written."""
    return {n: FileEntry(sha256_file(bundle_dir / n), (bundle_dir / n).stat().st_size) for n in names}


def write_manifest(bundle_dir: Path, manifest: StageManifest) -> Path:
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(manifest.to_json() + "\n")
    return path


def read_manifest(bundle_dir: Path) -> StageManifest:
    """Parse stage.json without checking the other files (cheap; for listings)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle_dir} a stage bundle directory?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest is not a JSON object")
    return StageManifest.from_dict(raw, source=str(path))


def load_bundle(bundle_dir: Path | str) -> StageManifest:
    """Read the manifest and verify size and sha256 of every file it lists.

    Raises BundleError naming the first file that is missing, truncated or altered.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if GRAPH_NAME not in manifest.files:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME}: lists no {GRAPH_NAME}")
    for name, entry in manifest.files.items():
        path = bundle_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{bundle_dir / MANIFEST_NAME}: file name {name!r} escapes the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{path}: size {size} bytes, manifest says {entry.bytes} (truncated or replaced)")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{path}: sha256 mismatch (corrupted or modified after compile)")
    return manifest
