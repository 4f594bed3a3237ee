"""Int8 weights for a stage (or a segment, or a profiling piece) with ONNX Runtime's own tool.

``onnxruntime.quantization.quantize_dynamic`` rewrites every MatMul/Gemm whose second input is a
weight into an integer matmul: the weight is stored as int8 with a float scale per output column
(``per_channel``), the activation is quantized to uint8 on the fly for each run. Activations
between stages stay float32, so a quantized stage has the same inputs and outputs as its fp32
twin and can sit anywhere in a pipeline. ONNX Runtime's graph optimiser fuses the rewritten nodes
into DynamicQuantizeMatMul kernels, which use the CPU's int8 dot products where it has them.

One function quantizes every graph the compiler writes (measured segments, profiling pieces,
deployed stages), so what the planner was told is what is deployed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    StageManifest,
    WeightQuantization,
    file_entries,
    load_bundle,
    write_manifest,
)

if TYPE_CHECKING:  # onnx_ir is imported where graphs are read: planning (int8_speed) needs none of it
    import onnx_ir as ir

METHOD = "onnxruntime.quantization.quantize_dynamic"


class QuantizeError(RuntimeError):
    """ONNX Runtime's quantizer could not rewrite a graph; the message names it."""


@dataclass(frozen=True)
class QuantSettings:
    """What ``quantize_dynamic`` is asked to do. Per-channel scales cost a few floats per weight
    column and keep each column's own range, which matters when columns differ in magnitude
    (trained transformers' projections do)."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: only for CPUs without VNNI that saturate; not needed here

    def describe(self) -> str:
        scale = "per-channel" if self.per_channel else "per-tensor"
        return f"int8 weights ({'/'.join(self.op_types)}, {scale} scales, {METHOD.rsplit('.', 1)[-1]})"

    def key(self) -> dict:
        """What a cached measurement of quantized graphs depends on."""
        return {"method": METHOD, "op_types": list(self.op_types), "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "onnxruntime": onnxruntime.__version__}


DEFAULT_SETTINGS = QuantSettings()


def quantizable_nodes(graph: ir.Graph, settings: QuantSettings = DEFAULT_SETTINGS) -> list[str]:
    """Names of the nodes ``quantize_dynamic`` will rewrite: MatMul/Gemm with a weight as second input
    (a MatMul of two activations, such as attention's Q x K^T, stays float: ORT's default in dynamic mode)."""
    found = []
    for node in graph:
        if node.op_type not in settings.op_types or node.domain not in ("", "ai.onnx"):
            continue
        b = node.inputs[1] if len(node.inputs) > 1 else None
        if b is not None and b.const_value is not None:
            found.append(node.name or "")
    return found


def quantize_onnx(src: Path, dst: Path, settings: QuantSettings = DEFAULT_SETTINGS) -> int:
    """Write the int8-weights version of the ONNX file ``src`` (external data beside it) to ``dst``
    (weights in ``<dst>.data``). Returns the bytes of the quantized graph's initializers."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet_root_logger():
            quantize_dynamic(src, dst, op_types_to_quantize=list(settings.op_types),
                             per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                             weight_type=QuantType.QInt8, use_external_data_format=True)
    except Exception as exc:  # the quantizer raises plain Exceptions, ValueErrors, onnx errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizeError(f"{src}: ONNX Runtime's quantize_dynamic failed: {first}") from None
    return initializer_bytes(dst)


def initializer_bytes(path: Path) -> int:
    import onnx_ir as ir
    from edgepipe.compiler.graph import tensor_bytes

    model = ir.load(path)  # external tensors are mapped, not read
    return sum(tensor_bytes(v) for v in model.graph.initializers.values())


def quantize_bundle(bundle_dir: Path, settings: QuantSettings = DEFAULT_SETTINGS) -> StageManifest:
    """Replace the stage bundle in ``bundle_dir`` by its int8-weights twin, in place.

    The bundle stays self-contained and hash-checked: new ``stage.onnx`` (+ ``stage.onnx.data``),
    its files re-hashed, ``weight_bytes`` the int8 graph's, and ``quantization`` recording how (so a
    device and ``edgepipe-agent check`` can tell). Quantizing a quantized bundle is refused."""
    bundle_dir = Path(bundle_dir)
    manifest = load_bundle(bundle_dir)
    if manifest.quantization is not None:
        raise QuantizeError(f"{bundle_dir}: already quantized ({manifest.quantization.weights})")
    with tempfile.TemporaryDirectory(dir=bundle_dir.parent, prefix=f".{bundle_dir.name}-int8-") as scratch:
        out = Path(scratch) / GRAPH_NAME
        weight_bytes = quantize_onnx(bundle_dir / GRAPH_NAME, out, settings)
        for name in (GRAPH_NAME, DATA_NAME):
            (bundle_dir / name).unlink(missing_ok=True)
        for name in (GRAPH_NAME, DATA_NAME):
            if (Path(scratch) / name).is_file():
                shutil.move(str(Path(scratch) / name), bundle_dir / name)
    names = [n for n in (GRAPH_NAME, DATA_NAME) if (bundle_dir / n).is_file()]
    extra = [n for n in manifest.files if n not in (GRAPH_NAME, DATA_NAME)]
    quantized = replace(
        manifest,
        files=file_entries(bundle_dir, names + extra),
        weight_bytes=weight_bytes,
        quantization=WeightQuantization(
            weights="int8",
            method=METHOD,
            op_types=settings.op_types,
            per_channel=settings.per_channel,
            onnxruntime=onnxruntime.__version__,
            float_weight_bytes=manifest.weight_bytes,
        ),
    )
    write_manifest(bundle_dir, quantized)
    return quantized


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call; the compiler
    prints its own progress instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def int8_speed(profiles: list) -> Any:
    """The planner's int8 speed of a device type (``DeviceType.int8``) from its devices' measured
    profiles (agent/formats/profiles.py ``int8_seconds``): the median per segment over the devices,
    at every size all of them measured. None when they have no int8 times (or the planner predates
    int8 stages)."""
    import statistics

    from edgepipe.planner import problem as planner_problem

    speed_type = getattr(planner_problem, "Int8Speed", None)
    timed = [p for p in profiles if p.int8_seconds]
    if speed_type is None or not timed or len(timed) != len(profiles):
        return None
    sizes = set.intersection(*(set(p.int8_seconds) for p in timed))
    table = {mb: tuple(statistics.median(p.int8_seconds[mb][i] for p in timed)
                       for i in range(len(timed[0].segment_names)))
             for mb in sorted(sizes)}
    return speed_type(profiles=table) if table else None
