"""Measure what each lossy choice does to a model's outputs: every codec at every cut, int8 weights
in every segment, each alone. The planner combines them (docs/compression.md).

Efficient by construction: the model is split into its segments (between all candidate cuts), one
ONNX Runtime session each, built once; chained they compute exactly the whole model. One fp32 pass
keeps every cut's tensors. Then, for each cut and codec, only the suffix after the cut runs, fed
``codecs.roundtrip`` of the cut's tensors (bit for bit what a receiver decodes); for each segment,
its int8-weights twin runs from its input cut and the fp32 suffix finishes. The results are cached
by everything they depend on, so a re-plan with another budget or cluster costs nothing.

Effects are reported as the planner's "error effect" (interfaces.md, Planner v2): ``max_abs_diff``
over all outputs and samples, ``cosine`` = the lowest per-sample cosine of the concatenated outputs
(a worst case, like max |Δ|), ``top1_agreement`` over the rows of the first output when it is a
classifier's logits (else None).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.bundle import TensorSpec
from edgepipe.compiler.calibration import Calibration
from edgepipe.compiler.cuts import Cut
from edgepipe.compiler.export import cache_root
from edgepipe.compiler.quantize import DEFAULT_SETTINGS, QuantSettings, quantizable_nodes, quantize_onnx
from edgepipe.compiler.slicing import stage_models

# Bump when what is measured or how changes, so stale cached measurements are not reused.
MEASURE_VERSION = 1
LOSSY_CODECS = codecs.LOSSY  # ("fp16", "int8")

# (step description, fraction done 0..1)
Progress = Callable[[str, float], None]


# --- the error of a model's outputs -------------------------------------------------------------


@dataclass(frozen=True)
class OutputError:
    """The model's outputs with some lossy choice made, against fp32 (the planner's error effect)."""

    max_abs_diff: float
    cosine: float
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_abs_diff": self.max_abs_diff, "cosine": self.cosine, "top1_agreement": self.top1_agreement}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> OutputError:
        top1 = raw.get("top1_agreement")
        return OutputError(float(raw["max_abs_diff"]), float(raw["cosine"]), None if top1 is None else float(top1))

    def describe(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        return f"max|Δ| {self.max_abs_diff:.3g}, cosine {self.cosine:.6f}{top1}"


def exact(classifier: bool) -> OutputError:
    return OutputError(0.0, 1.0, 1.0 if classifier else None)


def is_classifier(outputs: Sequence[TensorSpec]) -> bool:
    """Whether the model's first output is class scores: top-1 agreement is then meaningful."""
    if not outputs or not outputs[0].dtype.startswith("float"):
        return False
    first = outputs[0]
    return "logits" in first.name.lower() or len(first.shape) == 2


def output_error(reference: Sequence[np.ndarray], got: Sequence[np.ndarray], classifier: bool) -> OutputError:
    """Compare two runs of the model's outputs (same order, axis 0 = samples)."""
    if len(reference) != len(got):
        raise ValueError(f"{len(got)} outputs to compare with {len(reference)}")
    worst = 0.0
    for ref, out in zip(reference, got):
        if ref.shape != out.shape:
            raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
        worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)), initial=0.0)))
    samples = reference[0].shape[0] if reference and reference[0].ndim else 1
    ref_rows = _per_sample(reference, samples)
    got_rows = _per_sample(got, samples)
    dots = np.sum(ref_rows * got_rows, axis=1)
    norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(got_rows, axis=1)
    same = np.all(ref_rows == got_rows, axis=1)  # covers all-zero outputs, whose cosine is undefined
    cosines = np.where(same, 1.0, dots / np.where(norms > 0, norms, 1.0))
    top1 = None
    if classifier:
        ref_top = _rows(reference[0]).argmax(axis=1)
        got_top = _rows(got[0]).argmax(axis=1)
        top1 = float(np.mean(ref_top == got_top))
    return OutputError(worst, float(np.clip(cosines.min(initial=1.0), -1.0, 1.0)), top1)


def _per_sample(arrays: Sequence[np.ndarray], samples: int) -> np.ndarray:
    float_arrays = [a for a in arrays if np.issubdtype(a.dtype, np.floating)]
    return np.concatenate([a.reshape(samples, -1).astype(np.float64) for a in float_arrays], axis=1)


def _rows(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(-1, logits.shape[-1]) if logits.ndim > 1 else logits.reshape(1, -1)


# --- one session per segment --------------------------------------------------------------------


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A plain CPU session (all optimisations, no spinning), like verify.py's."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SegmentChain:
    """The model as a chain of segment sessions between all candidate cuts; built once, in
    ``workdir`` (each segment's graph and only its weights), and reused by every measurement."""

    def __init__(self, model: ir.Model, cuts: Sequence[Cut], workdir: Path, threads: int = 0,
                 on_segment: Callable[[int, int], None] | None = None) -> None:
        self.workdir = Path(workdir)
        self.threads = threads
        self.output_names = [v.name for v in model.graph.outputs]
        self.boundaries: list[tuple[list[str], list[str]]] = []  # per segment: its input and output names
        self.paths: list[Path] = []
        self.sessions: list[ort.InferenceSession] = []
        self.quantizable: list[int] = []  # per segment: MatMul/Gemm nodes with a weight
        # the segments exactly as stages are sliced (masks and shapes rebuilt where a cut needs them,
        # model inputs forwarded), so what is measured is what a stage boundary there would do
        for k, segment in stage_models(model, list(cuts)):
            self.boundaries.append(([v.name for v in segment.graph.inputs], [v.name for v in segment.graph.outputs]))
            path = self.workdir / f"segment-{k}.onnx"
            ir.save(segment, path, external_data=f"segment-{k}.onnx.data")
            self.quantizable.append(len(quantizable_nodes(segment.graph)))
            del segment
            self.paths.append(path)
            self.sessions.append(cpu_session(path, threads))
            if on_segment is not None:
                on_segment(k + 1, len(cuts) + 1)

    def __len__(self) -> int:
        return len(self.boundaries)

    def forward(self, feeds: Mapping[str, np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
        """One fp32 pass: the tensors entering each segment (index k: segment k's inputs) and the
        model's outputs."""
        values: dict[str, np.ndarray] = dict(feeds)
        entering = []
        for k in range(len(self)):
            entering.append({name: values[name] for name in self.boundaries[k][0]})
            values.update(self._run(k, self.sessions[k], values))
        return entering, [values[name] for name in self.output_names]

    def run_from(self, k: int, values: Mapping[str, np.ndarray], first: ort.InferenceSession | None = None
                 ) -> list[np.ndarray]:
        """The model's outputs when segment ``k`` is fed ``values`` (its inputs, plus any model input
        a later segment reads) and the rest runs in fp32; ``first`` replaces segment k's session."""
        current = dict(values)
        for j in range(k, len(self)):
            session = first if (j == k and first is not None) else self.sessions[j]
            current.update(self._run(j, session, current))
        return [current[name] for name in self.output_names]

    def _run(self, k: int, session: ort.InferenceSession, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs, outputs = self.boundaries[k]
        results = session.run(outputs, {name: values[name] for name in inputs})
        return dict(zip(outputs, results))


# --- the measurements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecEffect:
    codec: str
    out_bytes: int  # wire bytes per sample of the cut's tensors in this codec
    error: OutputError


@dataclass(frozen=True)
class Int8Effect:
    weight_bytes: int  # the segment's initializers with int8 weights
    error: OutputError
    quantized_nodes: int  # MatMul/Gemm rewritten (0: nothing to quantize, same graph)


@dataclass(frozen=True)
class SegmentEffects:
    name: str  # the segment's name in the planner's model (label of the cut it starts at)
    codecs: tuple[CodecEffect, ...] = ()  # the cut after this segment in each lossy codec
    int8: Int8Effect | None = None

    def problem_fields(self) -> dict[str, Any]:
        """This segment's ``codecs`` and ``int8`` entries in the problem file (Planner v2)."""
        fields: dict[str, Any] = {}
        if self.codecs:
            fields["codecs"] = {c.codec: {"out_bytes": c.out_bytes, **c.error.to_dict()} for c in self.codecs}
        if self.int8 is not None:
            fields["int8"] = {"weight_bytes": self.int8.weight_bytes, **self.int8.error.to_dict()}
        return fields


@dataclass(frozen=True)
class LossyMeasurements:
    model_sha256: str
    calibration: str  # where the samples came from
    samples: int
    classifier: bool
    segments: tuple[SegmentEffects, ...]
    quantization: str  # QuantSettings.describe()
    cached: bool = False
    key: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "edgepipe.lossy-measurements",
            "format_version": 1,
            "model_sha256": self.model_sha256,
            "calibration": self.calibration,
            "samples": self.samples,
            "classifier": self.classifier,
            "quantization": self.quantization,
            "key": self.key,
            "segments": [{"name": s.name, **s.problem_fields(),
                          "int8_quantized_nodes": None if s.int8 is None else s.int8.quantized_nodes}
                         for s in self.segments],
        }

    @staticmethod
    def from_dict(raw: Mapping[str, Any], cached: bool = False) -> LossyMeasurements:
        segments = []
        for s in raw["segments"]:
            cut_codecs = tuple(CodecEffect(name, int(c["out_bytes"]), OutputError.from_dict(c))
                               for name, c in s.get("codecs", {}).items())
            int8 = s.get("int8")
            segments.append(SegmentEffects(
                name=str(s["name"]), codecs=cut_codecs,
                int8=None if int8 is None else Int8Effect(int(int8["weight_bytes"]), OutputError.from_dict(int8),
                                                          int(s.get("int8_quantized_nodes") or 0))))
        return LossyMeasurements(model_sha256=str(raw["model_sha256"]), calibration=str(raw["calibration"]),
                                 samples=int(raw["samples"]), classifier=bool(raw["classifier"]),
                                 segments=tuple(segments), quantization=str(raw["quantization"]),
                                 cached=cached, key=dict(raw.get("key", {})))


def cut_out_bytes(tensors: Mapping[str, np.ndarray], codec: str) -> int:
    """Wire bytes of one sample of ``tensors`` (arrays with a batch axis) in ``codec``; tensors the
    codec does not apply to (integers, masks) travel raw."""
    total = 0
    for arr in tensors.values():
        shape = (1, *arr.shape[1:])
        used = codec if codecs.compressible(arr.dtype.name) else "raw"
        total += codecs.wire_nbytes(shape, arr.dtype.name, used)
    return total


def measure_codec(chain: SegmentChain, cut: int, entering: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                  reference: Sequence[np.ndarray], codec: str, classifier: bool) -> CodecEffect:
    """The cut after segment ``cut`` (i.e. segment ``cut + 1``'s inputs ``entering``) sent in ``codec``."""
    received = {name: codecs.roundtrip(arr, codec) for name, arr in entering.items()}
    got = chain.run_from(cut + 1, {**feeds, **received})
    return CodecEffect(codec, cut_out_bytes(entering, codec), output_error(reference, got, classifier))


def measure_int8(chain: SegmentChain, k: int, entering: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                 reference: Sequence[np.ndarray], classifier: bool, settings: QuantSettings) -> Int8Effect:
    """Segment ``k`` with int8 weights, everything else fp32."""
    from edgepipe.compiler.quantize import initializer_bytes

    if chain.quantizable[k] == 0:  # nothing to rewrite: the int8 variant is the segment itself
        return Int8Effect(initializer_bytes(chain.paths[k]), exact(classifier), 0)
    path = chain.workdir / f"segment-{k}-int8.onnx"
    weight_bytes = quantize_onnx(chain.paths[k], path, settings)
    session = cpu_session(path, chain.threads)
    got = chain.run_from(k, {**feeds, **entering}, first=session)
    del session
    return Int8Effect(weight_bytes, output_error(reference, got, classifier), chain.quantizable[k])


def measure_lossy(
    model: ir.Model,
    cuts: Sequence[Cut],
    calibration: Calibration,
    model_sha256: str,
    *,
    codec_names: Sequence[str] = LOSSY_CODECS,
    int8: bool = True,
    settings: QuantSettings = DEFAULT_SETTINGS,
    threads: int = 0,
    use_cache: bool = True,
    progress: Progress | None = None,
) -> LossyMeasurements:
    """Every lossy choice's effect on the outputs of ``model`` cut at ``cuts`` (all candidate cuts:
    the planner's segments), on ``calibration``'s samples. Cached under $EDGEPIPE_CACHE/measurements."""
    key = measurement_key(model_sha256, cuts, calibration, codec_names, settings if int8 else None)
    path = cache_path(key)
    if use_cache and path.is_file():
        try:
            return LossyMeasurements.from_dict(json.loads(path.read_text()), cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache entry: measure again and overwrite it
    report = progress or (lambda _step, _fraction: None)
    classifier = is_classifier([_spec_with_rank(v) for v in model.graph.outputs])
    with tempfile.TemporaryDirectory(prefix="edgepipe-measure-") as scratch:
        chain = SegmentChain(model, cuts, Path(scratch), threads,
                             on_segment=lambda done, total: report("preparing segment sessions", 0.2 * done / total))
        feeds = dict(calibration.feeds)
        entering, reference = chain.forward(feeds)
        n = len(chain)
        steps = (n - 1) * len(codec_names) + (n if int8 else 0)
        done = 0
        segments = []
        for k in range(n):
            found = []
            if k + 1 < n:  # the last segment's output goes to the client, always raw
                for codec in codec_names:
                    report(f"codec {codec} at cut {k + 1}/{n - 1}", 0.2 + 0.8 * done / max(steps, 1))
                    found.append(measure_codec(chain, k, entering[k + 1], feeds, reference, codec, classifier))
                    done += 1
            int8_effect = None
            if int8:
                report(f"int8 weights in segment {k + 1}/{n}", 0.2 + 0.8 * done / max(steps, 1))
                int8_effect = measure_int8(chain, k, entering[k], feeds, reference, classifier, settings)
                done += 1
            segments.append(SegmentEffects(segment_name(cuts, k), tuple(found), int8_effect))
        del chain
    result = LossyMeasurements(model_sha256=model_sha256, calibration=calibration.source,
                               samples=calibration.samples, classifier=classifier, segments=tuple(segments),
                               quantization=settings.describe() if int8 else "", key=key)
    if use_cache:
        _write_atomically(path, json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def segment_name(cuts: Sequence[Cut], k: int) -> str:
    """Segment k's name in the planner's model (compiler/segments.py): its starting cut's label."""
    return "input" if k == 0 else cuts[k - 1].label


def measurement_key(model_sha256: str, cuts: Sequence[Cut], calibration: Calibration, codec_names: Sequence[str],
                    settings: QuantSettings | None) -> dict[str, Any]:
    return {
        "version": MEASURE_VERSION,
        "model_sha256": model_sha256,
        "cuts": [[c.label, list(c.tensors)] for c in cuts],
        "calibration": calibration.digest,
        "codecs": list(codec_names),
        "int8": None if settings is None else settings.key(),
        "onnxruntime": ort.__version__,
    }


def cache_path(key: Mapping[str, Any]) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "measurements" / f"{key['model_sha256'][:12]}-{digest}.json"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _np_name(dtype: ir.DataType) -> str:
    from edgepipe.compiler.graph import numpy_dtype_name

    return numpy_dtype_name(dtype)


def _spec_with_rank(value: ir.Value) -> TensorSpec:
    shape = () if value.shape is None else tuple(d if isinstance(d, int) else "?" for d in value.shape)
    return TensorSpec(value.name, "float32" if value.dtype is None else _np_name(value.dtype), shape)


# --- into the planner's problem -----------------------------------------------------------------


class MeasurementMismatch(ValueError):
    """Measurements made for other segments than the problem's."""


def attach_to_problem(problem: Any, measurements: LossyMeasurements, max_error: Any = None) -> Any:
    """``problem`` (edgepipe.planner.problem.Problem) with every segment's measured ``codecs`` and
    ``int8`` fields, and the error budget ``max_error`` (an ErrorBudget or None), as Planner v2
    defines them. Goes through the problem's JSON form, so the planner's own reader validates it."""
    raw = problem.to_dict()
    segments = raw["model"]["segments"]
    names = [s["name"] for s in segments]
    measured = [s.name for s in measurements.segments]
    if names != measured:
        raise MeasurementMismatch(f"measured {len(measured)} segments, the problem has {len(names)}; "
                                  f"measure with the same --max-tensors as you plan with")
    for seg_raw, effects in zip(segments, measurements.segments):
        seg_raw.update(effects.problem_fields())
    if max_error is not None:
        raw["max_error"] = {"max_abs_diff": max_error.max_abs_diff, "cosine": max_error.cosine,
                            "top1_agreement": max_error.top1_agreement}
    return type(problem).from_dict(raw)
