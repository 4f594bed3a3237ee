"""Where a graph can be cut into pipeline stages, and what each cut costs on the wire.

A cut sits in front of a node (its *position* in topological order). Everything before it is one
stage, everything from it on the next; the activations produced before and used after are the
tensors the upstream device must send. Cuts with few crossing tensors are the candidates:
one tensor at transformer block boundaries, two (residual + branch) inside a block.

A cut is named by a *label*: the outermost module that starts exactly at that node
(``blocks.7`` is the input of block 7, ``blocks.7.norm2`` the second half of it), from the
exporter's name_scopes metadata. Graphs without metadata get the first node's name instead. A
user may also name a cut by its single crossing tensor.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import onnx_ir as ir
from edgepipe.compiler.graph import GraphIndex


class CutError(ValueError):
    """A requested cut does not exist or is not clean; the message says which and why."""


@dataclass(frozen=True)
class Cut:
    position: int  # index of the first node after the cut
    label: str
    tensors: tuple[str, ...]  # activations crossing the cut
    bytes_per_sample: int | None  # what one sample costs on the wire (None: a shape is unknown)


def find_cuts(index: GraphIndex, max_tensors: int = 1) -> list[Cut]:
    """Candidate cuts with at most ``max_tensors`` crossing tensors, in graph order.

    One-tensor cuts are all returned. Wider cuts are many inside attention, so when the graph
    carries module metadata only those at a module boundary are kept (PipeEdge's sub-block
    granularity). Positions with the same crossing set are one cut; the labelled one wins.
    """
    if max_tensors < 1:
        raise CutError("max_tensors must be at least 1")
    labels = module_start_labels(index)
    has_metadata = any(index.module_paths)
    # With a batch axis on the inputs, a tensor without one (a shape computed from the input) is
    # bookkeeping, not an activation a pipeline can stream; cuts through such tensors are skipped.
    batch_model = any(index.batched.get(name, False) for name, p in index.produced_at.items() if p < 0)
    by_tensors: dict[tuple[str, ...], Cut] = {}
    for position, crossing in _sweep_crossings(index, max_tensors):
        if all(index.produced_at[t] < 0 for t in crossing) or all(
            index.last_used_at[t] >= index.size for t in crossing
        ):
            continue  # one side would only pass graph inputs or outputs through: no work, not a stage
        if batch_model and not all(index.batched[t] for t in crossing):
            continue
        label = labels.get(position)
        if len(crossing) > 1 and has_metadata and label is None:
            continue
        key = tuple(crossing)
        previous = by_tensors.get(key)
        if previous is not None and (label is None or not previous.label.startswith("@")):
            continue
        by_tensors[key] = Cut(
            position=position,
            label=label or _fallback_label(index, position),
            tensors=key,
            bytes_per_sample=_sum_bytes(index, key),
        )
    return sorted(by_tensors.values(), key=lambda c: c.position)


def _sweep_crossings(index: GraphIndex, max_tensors: int):
    """Yield (position, crossing tensors) for every inner position with few enough tensors.

    One pass: a tensor joins the live set after its producer and leaves after its last consumer.
    """
    ends_at: dict[int, list[str]] = {}
    starts_after: dict[int, list[str]] = {}
    for name, produced in index.produced_at.items():
        last = index.last_used_at.get(name)
        if last is None or last <= produced:
            continue  # dead value: never crosses anything
        starts_after.setdefault(produced, []).append(name)
        ends_at.setdefault(last, []).append(name)
    live: dict[str, None] = dict.fromkeys(starts_after.get(-1, []))  # insertion order = production order
    for position in range(1, index.size):
        for name in starts_after.get(position - 1, []):
            live[name] = None
        for name in ends_at.get(position - 1, []):
            live.pop(name, None)
        if 0 < len(live) <= max_tensors:
            yield position, list(live)


def module_start_labels(index: GraphIndex) -> dict[int, str]:
    """position -> the outermost module whose first node is at that position."""
    first_at = module_start_positions(index)
    labels: dict[int, str] = {}
    for position, path in enumerate(index.module_paths):
        fresh = [scope for scope in path if first_at[scope] == position]
        if not fresh:
            continue
        label = fresh[0]
        # A container (ModuleList, Sequential) starts with its first child: name the child,
        # "blocks.0" rather than "blocks".
        for child in fresh[1:]:
            if re.fullmatch(re.escape(label) + r"\.\d+", child):
                label = child
        labels[position] = label
    return labels


def _fallback_label(index: GraphIndex, position: int) -> str:
    node = index.nodes[position]
    return f"@{node.name or f'{node.op_type}_{position}'}"


def _sum_bytes(index: GraphIndex, tensors: tuple[str, ...]) -> int | None:
    sizes = [index.bytes_per_sample.get(t) for t in tensors]
    return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[arg-type]


def natural_cuts(cuts: list[Cut], pattern: str | None) -> list[Cut]:
    """The cuts whose label matches the registry's natural-boundary pattern (all if none match)."""
    if not pattern:
        return cuts
    regex = re.compile(pattern)
    chosen = [c for c in cuts if regex.fullmatch(c.label)]
    return chosen or cuts


def resolve_cuts(index: GraphIndex, candidates: list[Cut], requested: list[str]) -> list[Cut]:
    """Turn user-given cut names (labels, module names or tensor names) into cuts, in graph order.

    A name that is not a candidate is checked: if the stage after it would need any other
    activation produced before it, the cut is refused, naming those tensors. It is never
    silently widened.
    """
    by_label = {c.label: c for c in candidates}
    by_tensors = {c.tensors: c for c in candidates}
    by_tensor = {c.tensors[0]: c for c in candidates if len(c.tensors) == 1}
    module_starts = module_start_positions(index)
    width = max((len(c.tensors) for c in candidates), default=1)
    chosen: list[Cut] = []
    for name in (n.strip() for n in requested):
        cut = by_label.get(name) or by_tensor.get(name)
        if cut is None and name in module_starts:
            cut = _cut_at(index, name, module_starts[name], by_tensors, width)
        if cut is None:
            cut = _cut_after_tensor(index, name, candidates)
        chosen.append(cut)
    chosen.sort(key=lambda c: c.position)
    for a, b in itertools.pairwise(chosen):
        if a.tensors == b.tensors:
            raise CutError(f"cuts {a.label!r} and {b.label!r} are the same place in the graph")
    return chosen


def module_start_positions(index: GraphIndex) -> dict[str, int]:
    """Every module name -> the position of its first node (several modules may share one)."""
    first_at: dict[str, int] = {}
    for position, path in enumerate(index.module_paths):
        for scope in path:
            first_at.setdefault(scope, position)
    return first_at


def _cut_at(index: GraphIndex, name: str, position: int, by_tensors: dict, width: int) -> Cut:
    crossing = tuple(index.crossing(position))
    if crossing in by_tensors:
        return by_tensors[crossing]
    if len(crossing) > width:
        raise CutError(
            f"cut {name!r} is not clean at --max-tensors {width}: it would have to carry {len(crossing)} "
            f"tensors {list(crossing)}; pass --max-tensors {len(crossing)} to allow that"
        )
    raise CutError(f"cut {name!r} is not a place where the graph can be split (nothing to run on one side)")


def _cut_after_tensor(index: GraphIndex, name: str, candidates: list[Cut]) -> Cut:
    produced = index.produced_at.get(name)
    if produced is None or produced < 0:
        hint = ", ".join(c.label for c in candidates[:8])
        raise CutError(
            f"unknown cut {name!r}: not a cut label, module or activation tensor (labels: {hint}, ...; "
            f"see edgepipe-compile --list-cuts)"
        )
    crossing = index.crossing(produced + 1)
    missing = [t for t in crossing if t != name]
    if missing:
        raise CutError(
            f"cut at tensor {name!r} is not clean: the rest of the graph also needs {missing} "
            f"from before it; choose a listed cut (edgepipe-compile --list-cuts, --max-tensors N)"
        )
    return Cut(produced + 1, f"@{name}", (name,), index.bytes_per_sample.get(name))


def stage_boundaries(graph: ir.Graph, cuts: list[Cut]) -> list[tuple[list[str], list[str]]]:
    """(input names, output names) of each stage the cuts make, first to last."""
    inputs = [v.name for v in graph.inputs]
    outputs = [v.name for v in graph.outputs]
    edges = [inputs, *[list(c.tensors) for c in cuts], outputs]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
