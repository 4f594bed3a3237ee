"""Facts about an ONNX graph that cut discovery, slicing and the planner's cost model share.

One linear pass over the nodes (ONNX requires topological order) yields, for every activation
tensor, where it is produced and where it is last used; from those, which tensors cross the boundary
in front of each node, how many bytes are alive there, and which module the node belongs to.
"Activation" means a value that depends on a graph input: initializers, Constant outputs and
anything computed only from them are recomputed inside every stage that needs them, so they never
cross a cut. The same pass records which activations are cheap bookkeeping a later stage can
rebuild for itself (compiler/derived.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from edgepipe.agent.formats.bundle import InputValues
from edgepipe.compiler.derived import Derivation, derive, model_input
from edgepipe.compiler.shapes import Dim, dims_of, fold_constant_dims, per_sample_elements

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class GraphIndex:
    nodes: tuple[ir.Node, ...]
    produced_at: dict[str, int]  # activation -> index of the producing node (-1: graph input)
    last_used_at: dict[str, int]  # activation -> index of its last consumer (len(nodes): graph output)
    bytes_per_sample: dict[str, int | None]  # activation -> bytes of one sample (None: unknown shape)
    batched: dict[str, bool]  # activation -> axis 0 is the model's batch axis
    module_paths: tuple[tuple[str, ...], ...]  # per node: enclosing modules, outermost first
    weight_names: tuple[frozenset[str], ...]  # per node: initializers it reads
    initializer_bytes: dict[str, int]
    input_names: tuple[str, ...] = ()  # the model's inputs, in order
    dims: dict[str, tuple[Dim, ...] | None] = field(default_factory=dict)  # activation -> its dimensions
    batch_dim: Dim = None  # axis 0 of the first model input: a symbol ("batch"), or a fixed batch size
    derivations: dict[str, Derivation] = field(default_factory=dict)  # activations a stage can rebuild

    @property
    def size(self) -> int:
        return len(self.nodes)

    def crossing(self, position: int) -> list[str]:
        """Activations produced before node ``position`` and used at or after it, in production order."""
        return sorted(
            (v for v, p in self.produced_at.items() if p < position <= self.last_used_at.get(v, -2)),
            key=lambda v: (self.produced_at[v], v),
        )


def tidy_shapes(graph: ir.Graph) -> int:
    """Fold constant symbolic dimensions (``((32*batch)//batch)`` -> 32) everywhere in ``graph``."""
    return fold_constant_dims([*graph.inputs, *(out for node in graph for out in node.outputs), *graph.outputs])


def index_graph(graph: ir.Graph) -> GraphIndex:
    nodes = tuple(graph)
    input_names = tuple(v.name for v in graph.inputs)
    produced_at: dict[str, int] = {name: -1 for name in input_names}
    last_used_at: dict[str, int] = {}
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    weight_names: list[frozenset[str]] = []
    initializers = graph.initializers
    initializer_bytes = {name: tensor_bytes(v) for name, v in initializers.items()}
    derivations: dict[str, Derivation] = {name: model_input(name) for name in input_names}

    for i, node in enumerate(nodes):
        reads = []
        dynamic = False
        for value in node.inputs:
            if value is None:
                continue
            if value.name in produced_at:
                last_used_at[value.name] = i
                dynamic = True
            elif value.name in initializers:
                reads.append(value.name)
        weight_names.append(frozenset(reads))
        if dynamic:
            derivation = derive(node, i, derivations, produced_at, initializer_bytes)
            for out in node.outputs:
                produced_at[out.name] = i
                values[out.name] = out
                if derivation is not None:
                    derivations[out.name] = derivation
    for out in graph.outputs:
        if out.name in produced_at:
            last_used_at[out.name] = len(nodes)

    dims = {name: dims_of(v) for name, v in values.items()}
    first = dims.get(input_names[0]) if input_names else None
    batch_dim = first[0] if first else None
    return GraphIndex(
        nodes=nodes,
        produced_at=produced_at,
        last_used_at=last_used_at,
        bytes_per_sample={name: value_bytes_per_sample(v) for name, v in values.items()},
        batched={name: _on_batch_axis(d, batch_dim) for name, d in dims.items()},
        module_paths=tuple(module_path(n) for n in nodes),
        weight_names=tuple(weight_names),
        initializer_bytes=initializer_bytes,
        input_names=input_names,
        dims=dims,
        batch_dim=batch_dim,
        derivations=derivations,
    )


def _on_batch_axis(dims: tuple[Dim, ...] | None, batch_dim: Dim) -> bool:
    """Axis 0 of a value with ``dims`` is the batch axis: it has the model input's batch dimension.
    (For a model with a fixed batch size that is a size, so a [1, ...] tensor counts at batch 1.)"""
    if not dims:
        return False
    return dims[0] == batch_dim if batch_dim is not None else not isinstance(dims[0], int)


def module_path(node: ir.Node) -> tuple[str, ...]:
    """The modules enclosing ``node``, outermost first, from the exporter's metadata.

    The dynamo exporter records ``['', 'blocks', 'blocks.3', 'blocks.3.norm1', 'layer_norm_6']`` in
    name_scopes: the root, the module path, then the node's own FX name, which is dropped here.
    The legacy TorchScript exporter has no such metadata but names nodes by scope instead
    (``/layer1/layer1.1/act2/Relu``), which gives ``('layer1', 'layer1.1', 'layer1.1.act2')``.
    """
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return _scopes_from_name(node.name or "")
    try:
        import ast

        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ()
    return tuple(s for s in scopes[:-1] if s)


def _scopes_from_name(name: str) -> tuple[str, ...]:
    if not name.startswith("/"):
        return ()
    parts = [p for p in name.split("/")[1:-1] if p]
    path: list[str] = []
    for part in parts:
        parent = path[-1] if path else ""
        path.append(part if not parent or part.startswith(parent + ".") else f"{parent}.{part}")
    return tuple(path)


def value_bytes_per_sample(value: ir.Value) -> int | None:
    """Bytes of one sample of ``value`` (axis 0 is the batch), None when unknown."""
    if value.shape is None or value.dtype is None or len(value.shape) == 0:
        return None
    rest = value.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        return None
    return math.prod(rest) * dtype_itemsize(value.dtype)


def dtype_itemsize(dtype: ir.DataType) -> int:
    return np.dtype(dtype.numpy()).itemsize


def numpy_dtype_name(dtype: ir.DataType) -> str:
    return np.dtype(dtype.numpy()).name


def tensor_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    if tensor is not None:
        return int(tensor.nbytes)
    if value.shape is None or value.dtype is None or not all(isinstance(d, int) for d in value.shape):
        return 0
    return math.prod(value.shape) * dtype_itemsize(value.dtype)


def node_flops_per_sample(node: ir.Node, batch_dim: Dim = "batch") -> float:
    """Rough multiply-add count of one sample: exact for MatMul/Gemm/Conv, one per element otherwise.

    Only used to balance stages before anything is measured and for what-if device speeds, so the
    dominant ops matter and the rest is a rounding error. ``batch_dim`` is the model's batch
    dimension; outputs whose batch is merged into another axis (``[128*batch, 768]``) count per
    sample too.
    """
    out = node.outputs[0] if node.outputs else None
    if out is None:
        return 0.0
    out_elems = per_sample_elements(dims_of(out), batch_dim)
    if out_elems is None:
        return 0.0
    first = node.inputs[0] if node.inputs else None
    if node.op_type in ("MatMul", "Gemm") and first is not None and first.shape is not None:
        k = first.shape[-1]
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            k = first.shape[0]
        return 2.0 * out_elems * k if isinstance(k, int) else float(out_elems)
    if node.op_type == "Conv" and len(node.inputs) > 1 and node.inputs[1] is not None:
        weight = node.inputs[1]
        if weight.shape is not None and all(isinstance(d, int) for d in weight.shape):
            return 2.0 * out_elems * math.prod(weight.shape[1:])
    return float(out_elems)


# Ops that pass integer ids through unchanged on their way to an embedding lookup.
_ID_PASSTHROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Slice"})


def input_values_from_graph(graph: ir.Graph) -> dict[str, InputValues]:
    """What each model input of an arbitrary ONNX file takes, read from the graph: integer inputs
    that index an embedding table are ids below its row count, inputs named like a mask are masks,
    float inputs are real numbers, other integers are taken as 0/1."""
    found = {}
    for value in graph.inputs:
        dtype = numpy_dtype_name(value.dtype) if value.dtype is not None else "float32"
        if dtype.startswith("float"):
            found[value.name] = InputValues("real")
        elif (rows := _embedding_rows(value)) is not None:
            found[value.name] = InputValues("index", rows)
        elif "mask" in value.name.lower() or dtype == "bool":
            found[value.name] = InputValues("mask")
        else:
            found[value.name] = InputValues("index", 2)
    return found


def _embedding_rows(value: ir.Value, depth: int = 0) -> int | None:
    """Rows of the embedding table ``value`` indexes (through id-preserving ops), or None."""
    for user, slot in value.uses():
        if user.op_type == "Gather" and slot == 1 and user.inputs[0] is not None:
            table = user.inputs[0]
            if table.const_value is not None and table.shape is not None and isinstance(table.shape[0], int):
                return table.shape[0]
        if user.op_type in _ID_PASSTHROUGH and slot == 0 and depth < 4:
            rows = _embedding_rows(user.outputs[0], depth + 1)
            if rows is not None:
                return rows
    return None
