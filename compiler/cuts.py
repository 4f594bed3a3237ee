"""Where a graph can be cut into pipeline stages, and what each cut costs on the wire.

A cut sits in front of a node (its *position* in topological order). Everything before it is one
stage, everything from it on the next; the values produced before and used after *cross* the cut.
They are of three kinds, and a cut says which is which:

- *tensors*: activations the upstream stage computed and sends (one at a transformer block or CNN
  stage boundary, two, residual + branch, inside a block);
- *rebuilt*: cheap bookkeeping the next stage recomputes for itself (attention masks and their
  expanded forms, position ids, a batch size read from ``Shape(pixels)``; compiler/derived.py);
- *forwarded*: the model inputs those values are rebuilt from (``attention_mask``), sent along
  beside the tensors and counted in the cut's bytes.

Rebuilding is chosen when what it needs forwarded costs at most ``FORWARD_FRACTION`` of the
tensors' bytes, which holds for masks (a few hundred bytes against hundreds of KiB); otherwise
those values are sent as tensors themselves. Values computed from shapes alone (no model input)
are always rebuilt: they cost nothing to send and cannot be streamed (no batch axis).

Cuts with few tensors are the candidates. A cut is named by a *label*: the outermost module that
starts exactly at that node (``blocks.7`` is the input of block 7, ``blocks.7.norm2`` the second half
of it), from the exporter's name_scopes metadata; a label always means "cut in front of this
module". Graphs without metadata get the first node's name instead (``@node_add_17``). A user may
also name a cut by its single tensor.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnx_ir as ir
from edgepipe.compiler.graph import GraphIndex
from edgepipe.compiler.shapes import is_symbol

# Forwarded model inputs may add at most this fraction to the bytes a cut sends; beyond it, the
# values they would rebuild are sent as tensors instead (and count against --max-tensors).
FORWARD_FRACTION = 0.25
# Stand-in for a symbolic non-batch dimension (a sequence length) when bytes must be compared.
_SYMBOL_GUESS = 64


class CutError(ValueError):
    """A requested cut does not exist or is not clean; the message says which and why."""


@dataclass(frozen=True)
class Cut:
    position: int  # index of the first node after the cut
    label: str
    tensors: tuple[str, ...]  # activations the stage before computes and sends
    bytes_per_sample: int | None  # what one sample costs on the wire, forwarded inputs included (None: unknown)
    forwarded: tuple[str, ...] = ()  # model inputs sent along so later stages can rebuild values from them
    rebuilt: tuple[str, ...] = ()  # values the stage after recomputes instead of receiving them
    rebuilt_bytes_per_sample: int = 0  # what sending the rebuilt values would have cost (known sizes)

    @property
    def sent(self) -> tuple[str, ...]:
        """Everything that crosses the network at this cut: the stage's outputs / next stage's inputs."""
        return self.tensors + self.forwarded


@dataclass(frozen=True)
class Crossing:
    """How the values crossing one position travel (see the module doc)."""

    tensors: tuple[str, ...]
    forwarded: tuple[str, ...]
    rebuilt: tuple[str, ...]


def find_cuts(index: GraphIndex, max_tensors: int = 1) -> list[Cut]:
    """Candidate cuts with at most ``max_tensors`` tensors (forwarded inputs not counted), in order.

    One-tensor cuts are all returned. Wider cuts are many inside attention, so when the graph
    carries module metadata only those at a module boundary are kept (PipeEdge's sub-block
    granularity). Positions that send the same values are one cut; the labelled one wins.
    """
    if max_tensors < 1:
        raise CutError("max_tensors must be at least 1")
    labels = module_start_labels(index)
    has_metadata = any(index.module_paths)
    by_sent: dict[tuple[str, ...], Cut] = {}
    for position, live in _sweep_live(index, max_tensors):
        crossing = plan_crossing(index, live)
        if crossing is None or not _is_stage_boundary(index, crossing.tensors, max_tensors):
            continue
        label = labels.get(position)
        if len(crossing.tensors) > 1 and has_metadata and label is None:
            continue
        key = crossing.tensors + crossing.forwarded
        previous = by_sent.get(key)
        if previous is not None and (label is None or not previous.label.startswith("@")):
            continue
        by_sent[key] = make_cut(index, position, label or _fallback_label(index, position), crossing)
    return sorted(by_sent.values(), key=lambda c: c.position)


def make_cut(index: GraphIndex, position: int, label: str, crossing: Crossing) -> Cut:
    return Cut(position=position, label=label, tensors=crossing.tensors,
               bytes_per_sample=_sum_bytes(index, crossing.tensors + crossing.forwarded),
               forwarded=crossing.forwarded, rebuilt=crossing.rebuilt,
               rebuilt_bytes_per_sample=sum(index.bytes_per_sample.get(v) or 0 for v in crossing.rebuilt))


def _is_stage_boundary(index: GraphIndex, tensors: tuple[str, ...], max_tensors: int) -> bool:
    if not 0 < len(tensors) <= max_tensors:
        return False
    if all(index.produced_at[t] < 0 for t in tensors) or all(index.last_used_at[t] >= index.size for t in tensors):
        return False  # one side would only pass graph inputs or outputs through: no work, not a stage
    # A tensor without the batch axis (a shape that could not be rebuilt) cannot be streamed.
    return all(index.batched.get(t, False) for t in tensors)


def plan_crossing(index: GraphIndex, live: Sequence[str], available: frozenset[str] | None = None) -> Crossing | None:
    """Split the values ``live`` across a position into tensors, forwarded inputs and rebuilt values.

    ``available`` limits the model inputs that may be forwarded to those the stage before has
    (None: any). Returns None when nothing but model inputs crosses (no stage boundary).
    """
    derivable = [v for v in live if v in index.derivations]
    computed = [v for v in live if v not in index.derivations]
    if not computed:
        return None
    return (_rebuild_everything(index, computed, derivable, available)
            or _rebuild_shapes_only(index, computed, derivable))


def _rebuild_everything(index: GraphIndex, computed: list[str], derivable: list[str],
                        available: frozenset[str] | None) -> Crossing | None:
    roots = set().union(*(index.derivations[v].roots for v in derivable))
    if available is not None and not roots <= available:
        return None
    forwarded = tuple(name for name in index.input_names if name in roots)
    rebuilt = tuple(v for v in derivable if index.produced_at[v] >= 0)
    if not _symbols_available(index, rebuilt, computed + list(forwarded)):
        return None
    if not all(index.batched.get(v, False) for v in forwarded):
        return None
    if forwarded and _estimated_bytes(index, forwarded) > FORWARD_FRACTION * _estimated_bytes(index, computed):
        return None
    return Crossing(tuple(computed), forwarded, rebuilt)


def _rebuild_shapes_only(index: GraphIndex, computed: list[str], derivable: list[str]) -> Crossing:
    rebuilt = tuple(v for v in derivable if not index.derivations[v].roots)
    if not _symbols_available(index, rebuilt, computed):
        rebuilt = ()
    sent = tuple(v for v in [*computed, *derivable] if v not in rebuilt)
    ordered = tuple(sorted(sent, key=lambda v: (index.produced_at[v], v)))
    return Crossing(ordered, (), rebuilt)


def _symbols_available(index: GraphIndex, rebuilt: Sequence[str], received: Sequence[str]) -> bool:
    needed = set().union(*(index.derivations[v].symbols for v in rebuilt))
    have = {d for v in received for d in (index.dims.get(v) or ()) if is_symbol(d)}
    return needed <= have


def _estimated_bytes(index: GraphIndex, names: Sequence[str]) -> float:
    total = 0.0
    for name in names:
        known = index.bytes_per_sample.get(name)
        if known is not None:
            total += known
            continue
        dims = index.dims.get(name) or ()
        total += 4 * math.prod(d if isinstance(d, int) else _SYMBOL_GUESS for d in dims[1:])
    return total


def _sweep_live(index: GraphIndex, max_tensors: int) -> Iterator[tuple[int, list[str]]]:
    """Yield (position, live values) for every inner position where at most ``max_tensors`` values
    that cannot be rebuilt are live.

    One pass: a value joins the live set after its producer and leaves after its last consumer.
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
    computed = sum(1 for v in live if v not in index.derivations)
    for position in range(1, index.size):
        for name in starts_after.get(position - 1, []):
            live[name] = None
            computed += name not in index.derivations
        for name in ends_at.get(position - 1, []):
            if name in live:
                del live[name]
                computed -= name not in index.derivations
        if 0 < computed <= max_tensors:
            yield position, list(live)


def crossing_at(index: GraphIndex, position: int, available: frozenset[str] | None = None) -> Crossing | None:
    """How the values crossing ``position`` travel (None: only model inputs cross there)."""
    return plan_crossing(index, index.crossing(position), available)


def module_start_labels(index: GraphIndex) -> dict[int, str]:
    """position -> the module that starts at that position, as users name stage boundaries.

    Several modules usually start at one node (``encoder``, ``encoder.layer``, ``encoder.layer.0``,
    ``encoder.layer.0.attention``...). The outermost element of a container (a name ending in an
    index: ``blocks.0``, ``layer1.2``, ``stages.1``) is chosen, since pipelines are cut between
    blocks; without one, the outermost module.
    """
    first_at = module_start_positions(index)
    labels: dict[int, str] = {}
    for position, path in enumerate(index.module_paths):
        fresh = [scope for scope in path if first_at[scope] == position]
        if fresh:
            labels[position] = next((s for s in fresh if _CONTAINER_ELEMENT.fullmatch(s)), fresh[0])
    return labels


_CONTAINER_ELEMENT = re.compile(r".+\.\d+")


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
    by_tensor = {c.tensors[0]: c for c in candidates if len(c.tensors) == 1}
    module_starts = module_start_positions(index)
    width = max((len(c.tensors) for c in candidates), default=1)
    chosen: list[Cut] = []
    for name in (n.strip() for n in requested):
        cut = by_label.get(name) or by_tensor.get(name)
        if cut is None and name in module_starts:
            cut = _cut_at(index, name, module_starts[name], candidates, width)
        if cut is None:
            cut = _cut_after_tensor(index, name, candidates)
        chosen.append(cut)
    chosen.sort(key=lambda c: c.position)
    for a, b in itertools.pairwise(chosen):
        if a.sent == b.sent:
            raise CutError(f"cuts {a.label!r} and {b.label!r} are the same place in the graph")
    return chosen


def module_start_positions(index: GraphIndex) -> dict[str, int]:
    """Every module name -> the position of its first node (several modules may share one)."""
    first_at: dict[str, int] = {}
    for position, path in enumerate(index.module_paths):
        for scope in path:
            first_at.setdefault(scope, position)
    return first_at


def _cut_at(index: GraphIndex, name: str, position: int, candidates: list[Cut], width: int) -> Cut:
    crossing = crossing_at(index, position)
    if crossing is None or not _is_stage_boundary(index, crossing.tensors, len(crossing.tensors)):
        raise CutError(f"cut {name!r} is not a place where the graph can be split (nothing to run on one side)")
    for cut in candidates:
        if cut.sent == crossing.tensors + crossing.forwarded:
            return cut
    if len(crossing.tensors) > width:
        raise CutError(
            f"cut {name!r} is not clean at --max-tensors {width}: it would have to send "
            f"{len(crossing.tensors)} tensors {list(crossing.tensors)}; pass --max-tensors "
            f"{len(crossing.tensors)} to allow that"
        )
    return make_cut(index, position, name, crossing)


def _cut_after_tensor(index: GraphIndex, name: str, candidates: list[Cut]) -> Cut:
    produced = index.produced_at.get(name)
    if produced is None or produced < 0:
        hint = ", ".join(c.label for c in candidates[:8])
        raise CutError(
            f"unknown cut {name!r}: not a cut label, module or activation tensor (labels: {hint}, ...; "
            f"see edgepipe-compile --list-cuts)"
        )
    crossing = crossing_at(index, produced + 1)
    missing = [t for t in (crossing.tensors if crossing else index.crossing(produced + 1)) if t != name]
    if missing or crossing is None:
        raise CutError(
            f"cut at tensor {name!r} is not clean: the rest of the graph also needs {missing} "
            f"from before it; choose a listed cut (edgepipe-compile --list-cuts, --max-tensors N)"
        )
    return make_cut(index, produced + 1, f"@{name}", crossing)


def chain_cuts(index: GraphIndex, cuts: Sequence[Cut]) -> list[Cut]:
    """The cuts as one pipeline: a stage can forward only model inputs it received itself.

    Each candidate cut was planned on its own, assuming every model input it forwards reaches it.
    That holds unless the cut before sent a rebuildable value as a tensor instead (its forwarded
    inputs would have cost too much there); then the values are sent as tensors here too.
    """
    chained: list[Cut] = []
    available = frozenset(index.input_names)
    for cut in sorted(cuts, key=lambda c: c.position):
        crossing = crossing_at(index, cut.position, available)
        if crossing is None:
            raise CutError(f"cut {cut.label!r} is not a place where the graph can be split")
        if crossing.tensors != cut.tensors or crossing.forwarded != cut.forwarded or crossing.rebuilt != cut.rebuilt:
            cut = make_cut(index, cut.position, cut.label, crossing)
        chained.append(cut)
        available = frozenset(v for v in cut.sent if v in index.input_names)
    return chained


def describe_cut(index: GraphIndex, cut: Cut) -> str:
    """A short human description of where ``cut`` is: "in front of <module>" or of a named node."""
    node = index.nodes[cut.position]
    if not cut.label.startswith("@"):
        return f"in front of module {cut.label} ({node.op_type})"
    path = index.module_paths[cut.position]
    where = f" in {path[-1]}" if path else ""
    if cut.label == f"@{cut.tensors[0]}" and len(cut.tensors) == 1:
        producer = index.nodes[index.produced_at[cut.tensors[0]]] if index.produced_at[cut.tensors[0]] >= 0 else None
        made_by = f" ({producer.op_type} output)" if producer is not None else ""
        return f"right after tensor {cut.tensors[0]}{made_by}{where}"
    return f"in front of {node.op_type} node {node.name or cut.position}{where}"


def stage_boundaries(graph: ir.Graph, cuts: list[Cut]) -> list[tuple[list[str], list[str]]]:
    """(input names, output names) of each stage the cuts make, first to last."""
    inputs = [v.name for v in graph.inputs]
    outputs = [v.name for v in graph.outputs]
    edges = [inputs, *[list(c.sent) for c in cuts], outputs]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
