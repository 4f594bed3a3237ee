"""Tensor dimensions as the compiler reasons about them: a fixed size, a symbol, or unknown.

Exporters write symbolic dimensions as strings, sometimes unsimplified: the dynamo exporter gives
GPT-2's attention masks a last axis ``((32*batch)//batch)``, which is always 32. Such a dimension
hides a fixed size from everything downstream (bytes on the wire, FLOPs), so ``fold_constant_dims``
replaces every symbolic expression whose value does not depend on its symbols by that value.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable

import onnx_ir as ir

Dim = int | str | None  # a fixed size, a symbol ("batch"), or unknown

# Symbol values an expression is evaluated at to decide whether it is a constant. Several, and not
# all small, so that expressions like (n*32)//n or n - n + 7 are recognised but n//64 is not.
_PROBES = (1, 2, 3, 5, 64, 1000)

_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


def dim_of(dim: object) -> Dim:
    """One onnx_ir dimension as an int, a symbol name, or None."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    return value if isinstance(value, str) and value else None


def dims_of(value: ir.Value) -> tuple[Dim, ...] | None:
    """All dimensions of ``value``, or None when its rank is unknown."""
    if value.shape is None:
        return None
    return tuple(dim_of(d) for d in value.shape)


def is_symbol(dim: Dim) -> bool:
    """A plain symbol (``batch``, ``s0``) rather than a fixed size, an expression or unknown."""
    return isinstance(dim, str) and dim.isidentifier()


def constant_value(expression: str) -> int | None:
    """The value of a symbolic dimension expression when it is the same for every value of its
    symbols, else None. Only integer arithmetic (+ - * // %) on names and literals is understood."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return None
    values = set()
    for probe in _PROBES:
        try:
            values.add(_evaluate(tree.body, probe))
        except (ValueError, ZeroDivisionError):
            return None
    return values.pop() if len(values) == 1 else None


def per_sample_elements(dims: tuple[Dim, ...] | None, batch_dim: Dim) -> int | None:
    """Elements of one sample of a tensor with ``dims``, wherever the batch is: on axis 0
    (``[batch, 197, 192]``) or merged into another axis (``[128*batch, 768]``, GPT-2's projections
    work on tokens of all samples at once). None when another symbol is involved."""
    if dims is None:
        return None
    total = 1
    for dim in dims:
        if isinstance(dim, int):
            total *= dim
        elif isinstance(dim, str) and batch_dim is not None and isinstance(batch_dim, str):
            value = _evaluate_with(dim, {batch_dim: 1})
            if value is None:
                return None
            total *= value
        else:
            return None
    if isinstance(batch_dim, int) and dims and dims[0] == batch_dim and batch_dim > 0:
        total //= batch_dim  # a fixed-batch model: axis 0 holds the whole batch
    return total


def _evaluate_with(expression: str, names: dict[str, int]) -> int | None:
    try:
        tree = ast.parse(expression, mode="eval")
        return _evaluate(tree.body, 0, names)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _evaluate(node: ast.AST, probe: int, names: dict[str, int] | None = None) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if names is not None:
            if node.id not in names:
                raise ValueError(f"unknown symbol {node.id}")
            return names[node.id]
        return probe
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, probe, names)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, probe, names), _evaluate(node.right, probe, names))
    raise ValueError(f"unsupported expression {ast.dump(node)}")


def fold_constant_dims(values: Iterable[ir.Value]) -> int:
    """Replace constant symbolic expressions in the shapes of ``values`` by their value; returns how
    many dimensions changed."""
    changed = 0
    for value in values:
        if value.shape is None:
            continue
        dims = list(value.shape)
        folded_here = 0
        for axis, dim in enumerate(dims):
            name = dim_of(dim)
            if isinstance(name, str) and not is_symbol(name):
                folded = constant_value(name)
                if folded is not None:
                    dims[axis] = folded
                    folded_here += 1
        if folded_here:
            value.shape = ir.Shape(dims)
            changed += folded_here
    return changed
