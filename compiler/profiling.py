"""Write the profiling bundle: every segment the planner reasons about, as a small runnable piece.

Devices time these pieces (``edgepipe-agent profile``) so the planner plans with measured numbers.
Segments with the same structure (same ops, attributes, shapes; weights may differ) take the same
time, so each structure is written and profiled once: the 24 block halves of ViT-Base become two
pieces (attention half, MLP half) plus the two ends.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from edgepipe.agent.formats.profiles import ProfileBundle, save_profile_bundle
from edgepipe.compiler.cuts import Cut
from edgepipe.compiler.slicing import ModelIdentity, stage_models, write_stage

# Initializers this small are shape constants (Reshape targets, axes), part of the structure;
# larger ones are weights, whose values do not change the time.
_STRUCTURAL_ELEMENTS = 64


def write_profile_bundle(
    model: ir.Model,
    cuts: list[Cut],
    out_dir: Path,
    identity: ModelIdentity,
    on_piece: Callable[[int, int], None] | None = None,
    int8: bool = False,
) -> ProfileBundle:
    """One piece per distinct segment structure under ``out_dir``; returns the manifest written.
    With ``int8``, also the int8-weights twin of every piece that has weights to quantize, so devices
    time both and the planner may choose int8 stages (compiler/quantize.py)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    names = ["input", *[c.label for c in cuts]]
    piece_of_key: dict[str, int] = {}
    segment_pieces = []
    for k, segment in stage_models(model, cuts):
        key = structure_key(segment.graph)
        if key not in piece_of_key:
            piece = len(piece_of_key)
            piece_of_key[key] = piece
            write_stage(segment, out_dir / f"piece-{piece}", identity, piece, 0, names[k], None)
        segment_pieces.append(piece_of_key[key])
        if on_piece is not None:
            on_piece(k, len(names))
    bundle = ProfileBundle(
        model_id=identity.model_id,
        model_sha256=identity.model_sha256,
        segment_names=tuple(names),
        segment_pieces=tuple(segment_pieces),
        piece_count=len(piece_of_key),
    )
    if int8:
        bundle = add_int8_pieces(out_dir, bundle)
    save_profile_bundle(out_dir, bundle)
    return bundle


def structure_key(graph: ir.Graph) -> str:
    """A digest of what determines a subgraph's run time, blind to value names and weight values."""
    ids: dict[str, int] = {}
    weights = graph.initializers

    def vid(value: ir.Value | None) -> str:
        if value is None:
            return "-"
        if value.name in weights:  # by content, not by order of appearance
            tensor = value.const_value
            small = tensor is not None and tensor.size <= _STRUCTURAL_ELEMENTS
            content = hashlib.sha1(np.ascontiguousarray(tensor.numpy()).tobytes()).hexdigest() if small else ""
            return f"w:{value.dtype}:{value.shape}:{content}"
        if value.name not in ids:
            ids[value.name] = len(ids)
        return f"v{ids[value.name]}:{value.dtype}:{value.shape}"

    parts: list[str] = [",".join(vid(v) for v in graph.inputs)]
    for node in graph:
        attrs = ";".join(f"{k}={_attr_repr(a)}" for k, a in sorted(node.attributes.items()))
        parts.append(f"{node.domain}:{node.op_type}({','.join(vid(v) for v in node.inputs)})"
                     f"->{','.join(vid(v) for v in node.outputs)}[{attrs}]")
    parts.append(",".join(vid(v) for v in graph.outputs))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _attr_repr(attr: ir.Attr) -> str:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return hashlib.sha1(np.ascontiguousarray(value.numpy()).tobytes()).hexdigest()
    return repr(value)


def add_int8_pieces(out_dir: Path, bundle: ProfileBundle) -> ProfileBundle:
    """``bundle`` plus, after its pieces, the int8-weights twin of each piece that has a MatMul/Gemm
    weight; a segment without one runs its fp32 piece as its int8 variant."""
    import dataclasses

    from edgepipe.agent.formats.bundle import GRAPH_NAME
    from edgepipe.compiler.quantize import quantizable_nodes, quantize_bundle

    twin: dict[int, int] = {}
    for piece in range(bundle.piece_count):
        src = bundle.piece_dir(out_dir, piece)
        if not quantizable_nodes(ir.load(src / GRAPH_NAME).graph):
            twin[piece] = piece
            continue
        index = bundle.piece_count + sum(1 for p, q in twin.items() if p != q)
        dst = bundle.piece_dir(out_dir, index)
        shutil.copytree(src, dst)
        quantize_bundle(dst)
        twin[piece] = index
    return dataclasses.replace(bundle, piece_count=max(twin.values(), default=-1) + 1,
                               int8_segment_pieces=tuple(twin[p] for p in bundle.segment_pieces))
