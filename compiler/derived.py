"""Values a later stage can compute for itself instead of receiving them over the network.

Transformers build an attention mask from the ``attention_mask`` input once and every layer reads
it; CNNs read the batch size from ``Shape(pixels)`` at the start and use it in the head. Such values
cross every cut between where they are made and where they are used, so a graph cut in the
middle would have to send them beside the activation, and a batch-size scalar (no batch axis) cannot
be streamed at all. They are cheap, though: index arithmetic on model inputs and tensor shapes.

A value has a *derivation* when it is computed only by cheap ops (``CHEAP_OPS``: shape, index,
compare, cast and elementwise arithmetic, no weights beyond small constants) from

- model inputs (its *roots*; a stage that rebuilds it must receive them: they are *forwarded*), and
- the dimensions of tensors, read through ``Shape`` (a *shape leaf*: rebuilt from the dimensions of
  a tensor the stage receives, fixed sizes as constants and symbols such as ``batch`` from the
  received activation's own shape).

``rebuild_nodes`` writes the nodes that recompute such values inside a stage. The analysis is one
forward pass over the nodes (``derive`` per node); see compiler/cuts.py for how a cut chooses
between rebuilding, forwarding and sending.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from edgepipe.compiler.shapes import Dim, dims_of, is_symbol

# Ops whose cost is a few operations per element and that read no weights: what mask, position and
# shape bookkeeping is made of. Nothing here multiplies matrices or normalises activations.
CHEAP_OPS = frozenset({
    "Shape", "Size", "Identity", "Cast", "CastLike",
    "Gather", "GatherElements", "GatherND", "Slice", "Concat", "Split", "Unsqueeze", "Squeeze", "Reshape",
    "Expand", "Flatten", "Transpose", "Tile", "Range", "ConstantOfShape", "Trilu", "CumSum",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Min", "Max", "Mod", "Floor", "Ceil", "Sign", "Clip",
    "ReduceMax", "ReduceMin", "ReduceSum",
})
# A derivation larger than this is not "cheap bookkeeping" any more; keep it as an activation.
MAX_NODES = 160
# Constants a derivation may read (and every stage that rebuilds it copies): shape vectors, position
# id tables. Weights are far larger.
MAX_CONSTANT_BYTES = 64 * 1024
REBUILT_SUFFIX = "__rebuilt"


@dataclass(frozen=True)
class Derivation:
    """How a value is computed from model inputs and tensor dimensions by cheap ops alone."""

    roots: frozenset[str]  # model inputs it reads
    symbols: frozenset[str]  # symbolic dimensions it reads through Shape (e.g. "batch")
    nodes: frozenset[int]  # positions of the nodes computing it, shape leaves included
    shape_leaves: frozenset[int]  # Shape nodes among ``nodes`` rebuilt from dimensions, not from their input


def model_input(name: str) -> Derivation:
    """A model input derives from itself: a stage that needs it must receive it."""
    return Derivation(frozenset({name}), frozenset(), frozenset(), frozenset())


def derive(
    node: ir.Node,
    position: int,
    derivations: Mapping[str, Derivation],
    is_activation: Mapping[str, object],
    initializer_bytes: Mapping[str, int],
) -> Derivation | None:
    """The derivation of ``node``'s outputs, given those of the values before it, or None.

    ``is_activation`` holds every value computed from a model input so far; other inputs are
    initializers or constants (static).
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in CHEAP_OPS:
        return None
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return None
    if node.op_type == "Shape":
        leaf = _shape_leaf(node, position)
        if leaf is not None:
            return leaf
    parts: list[Derivation] = []
    for value in node.inputs:
        if value is None:
            continue
        if value.name in initializer_bytes:
            if initializer_bytes[value.name] > MAX_CONSTANT_BYTES:
                return None
            continue
        if value.name not in is_activation:
            continue  # a Constant's output or a value computed from constants only
        part = derivations.get(value.name)
        if part is None:
            return None
        parts.append(part)
    nodes = frozenset({position}).union(*(p.nodes for p in parts))
    if len(nodes) > MAX_NODES:
        return None
    return Derivation(
        roots=frozenset().union(*(p.roots for p in parts)),
        symbols=frozenset().union(*(p.symbols for p in parts)),
        nodes=nodes,
        shape_leaves=frozenset().union(*(p.shape_leaves for p in parts)),
    )


def shape_slice(node: ir.Node) -> tuple[Dim, ...] | None:
    """The dimensions a Shape node outputs (its start/end attributes applied), None if rank unknown."""
    dims = dims_of(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if dims is None:
        return None
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return dims[start:end]


def _shape_leaf(node: ir.Node, position: int) -> Derivation | None:
    dims = shape_slice(node)
    if dims is None or not all(isinstance(d, int) or is_symbol(d) for d in dims):
        return None
    symbols = frozenset(d for d in dims if isinstance(d, str))
    return Derivation(frozenset(), symbols, frozenset({position}), frozenset({position}))


def symbol_sources(values: Sequence[ir.Value]) -> dict[str, tuple[ir.Value, int]]:
    """symbol -> (a value with that symbol as a dimension, its axis); the first value wins."""
    sources: dict[str, tuple[ir.Value, int]] = {}
    for value in values:
        for axis, dim in enumerate(dims_of(value) or ()):
            if is_symbol(dim):
                sources.setdefault(dim, (value, axis))  # type: ignore[arg-type]
    return sources


def rebuild_nodes(
    nodes: Sequence[ir.Node],
    derivations: Mapping[str, Derivation],
    names: Sequence[str],
    received: Sequence[ir.Value],
) -> tuple[list[ir.Node], dict[str, ir.Value]]:
    """New nodes that recompute ``names`` inside a stage from the values it ``received``.

    ``nodes`` is the whole graph in order (positions index it). Returns the nodes, in order, ready to
    be inserted in front of the stage's first node, and original name -> recomputed value. The new
    values are named ``<original>__rebuilt``; slicing renames them back once the stage is extracted.
    """
    available: dict[str, ir.Value] = {v.name: v for v in received}
    symbols = symbol_sources(received)
    cone = sorted(frozenset().union(*(derivations[n].nodes for n in names)))
    leaves = frozenset().union(*(derivations[n].shape_leaves for n in names))
    new_nodes: list[ir.Node] = []
    rebuilt: dict[str, ir.Value] = {}
    for position in cone:
        node = nodes[position]
        if all(out.name in available for out in node.outputs):
            continue  # received as it is
        if position in leaves:
            made, out = _shape_from_dims(node, symbols)
            new_nodes.extend(made)
            outputs = [out]
        else:
            inputs = [None if v is None else available.get(v.name, v) for v in node.inputs]
            outputs = [_like(v) for v in node.outputs]
            new_nodes.append(ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                                     outputs=outputs, name=f"{node.name}{REBUILT_SUFFIX}",
                                     version=node.version, overload=node.overload))
        for original, new in zip(node.outputs, outputs):
            available[original.name] = new
            rebuilt[original.name] = new
    return new_nodes, rebuilt


def _like(value: ir.Value) -> ir.Value:
    return ir.Value(name=f"{value.name}{REBUILT_SUFFIX}", shape=value.shape, type=value.type)


def _shape_from_dims(node: ir.Node, symbols: Mapping[str, tuple[ir.Value, int]]) -> tuple[list[ir.Node], ir.Value]:
    """Nodes giving what a Shape node gives, from fixed sizes and the axes of received tensors."""
    dims = shape_slice(node)
    assert dims is not None
    pieces: list[ir.Node] = []
    run: list[int] = []
    base = f"{node.name}{REBUILT_SUFFIX}"

    def flush(always: bool = False) -> None:
        if run or always:
            tensor = ir.tensor(np.array(run, dtype=np.int64))
            pieces.append(ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)],
                                  outputs=[ir.Value(name=f"{base}_c{len(pieces)}")], name=f"{base}_c{len(pieces)}"))
            run.clear()

    for dim in dims:
        if isinstance(dim, int):
            run.append(dim)
            continue
        flush()
        source, axis = symbols[dim]  # type: ignore[index]
        pieces.append(ir.Node("", "Shape", [source], [ir.AttrInt64("start", axis), ir.AttrInt64("end", axis + 1)],
                              outputs=[ir.Value(name=f"{base}_s{len(pieces)}")], name=f"{base}_s{len(pieces)}"))
    flush(always=not pieces)  # Shape of a scalar is an empty vector
    original = node.outputs[0]
    out = _like(original)
    if len(pieces) == 1:
        pieces[0].outputs[0].name = out.name
        pieces[0].outputs[0].shape = original.shape
        pieces[0].outputs[0].type = original.type
        return pieces, pieces[0].outputs[0]
    concat = ir.Node("", "Concat", [p.outputs[0] for p in pieces], [ir.AttrInt64("axis", 0)], outputs=[out],
                     name=base)
    return [*pieces, concat], out
