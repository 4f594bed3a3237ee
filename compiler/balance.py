"""How evenly chosen cuts share a model's work, and why when they do not.

A pipeline runs at the speed of its slowest stage, so a split where one stage holds most of the
FLOPs is barely faster than one device. That happens when the model offers no clean cut where one
is needed: some value crosses every position in that region and cannot be sent or rebuilt within
``--max-tensors``. ``check_balance`` measures each stage's share of the estimated FLOPs and, for a
stage far off its share, names the tensor that blocked the cuts there and what to do about it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from edgepipe.compiler.cuts import Cut, crossing_at
from edgepipe.compiler.graph import GraphIndex, node_flops_per_sample

# A stage is reported when its FLOPs are beyond these multiples of the mean stage's.
TOO_MUCH = 2.0
TOO_LITTLE = 0.5
_SAMPLED_POSITIONS = 200


@dataclass(frozen=True)
class Balance:
    stage_flops: tuple[float, ...]  # estimated FLOPs of one sample, per stage
    warnings: tuple[str, ...]  # one line each: which stage, how far off, why, what to try

    @property
    def mean(self) -> float:
        return sum(self.stage_flops) / len(self.stage_flops) if self.stage_flops else 0.0

    @property
    def worst_ratio(self) -> float:
        """The largest stage's FLOPs over the mean stage's (1.0 = perfectly even)."""
        return max(self.stage_flops) / self.mean if self.mean > 0 else 1.0

    @property
    def least_ratio(self) -> float:
        return min(self.stage_flops) / self.mean if self.mean > 0 else 1.0

    @property
    def balanced(self) -> bool:
        return not self.warnings


def node_flops(index: GraphIndex) -> list[float]:
    return [node_flops_per_sample(node, index.batch_dim) for node in index.nodes]


def stage_ranges(index: GraphIndex, cuts: list[Cut]) -> list[tuple[int, int]]:
    positions = [0, *[c.position for c in cuts], index.size]
    return list(itertools.pairwise(positions))


def check_balance(index: GraphIndex, cuts: list[Cut], max_tensors: int = 1,
                  flops: list[float] | None = None) -> Balance:
    """Each stage's FLOPs and a warning for every stage with far more or far less than its share."""
    flops = flops if flops is not None else node_flops(index)
    ranges = stage_ranges(index, cuts)
    per_stage = tuple(sum(flops[a:b]) for a, b in ranges)
    if len(per_stage) < 2 or sum(per_stage) <= 0:
        return Balance(per_stage, ())
    mean = sum(per_stage) / len(per_stage)
    warnings = []
    for k, ((start, end), work) in enumerate(zip(ranges, per_stage)):
        if work > TOO_MUCH * mean:
            warnings.append(f"stage {k} holds {work / sum(per_stage):.0%} of the FLOPs ({work / mean:.1f}x its share): "
                            + explain_heavy(index, start, end, max_tensors))
        elif work < TOO_LITTLE * mean:
            warnings.append(f"stage {k} holds only {work / sum(per_stage):.1%} of the FLOPs ({work / mean:.2f}x its "
                            f"share): its neighbours have no clean cut that would give it more; "
                            + explain_heavy(index, *_heaviest_neighbour(ranges, per_stage, k), max_tensors))
    return Balance(per_stage, tuple(warnings))


def _heaviest_neighbour(ranges: list[tuple[int, int]], per_stage: tuple[float, ...], k: int) -> tuple[int, int]:
    neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(ranges)]
    return ranges[max(neighbours, key=lambda j: per_stage[j])]


def explain_heavy(index: GraphIndex, start: int, end: int, max_tensors: int) -> str:
    """Why nodes ``start``..``end`` contain no usable cut, and what to try."""
    blockers = blocking_tensors(index, start, end, max_tensors)
    if not blockers:
        return ("it is one indivisible piece at this granularity; try more --max-tensors for sub-block cuts, "
                "or fewer --stages")
    name, share = blockers[0]
    dims = index.dims.get(name)
    shape = "?" if dims is None else "[" + ",".join(str(d) for d in dims) + "]"
    producer = index.produced_at.get(name, -1)
    node = index.nodes[producer] if producer >= 0 else None
    made = "a model input" if node is None else f"made by {node.op_type} node {node.name}"
    what = f"tensor {name} {shape} ({made}) crosses {share:.0%} of the positions inside it"
    if not index.batched.get(name, False):
        return (f"{what} and has no batch axis, so it cannot be sent, and it could not be rebuilt from the "
                f"received tensors; export the model with a dynamic batch axis, or compute that value inside "
                f"the block that uses it")
    derivation = index.derivations.get(name)
    if derivation is not None and derivation.roots:
        return (f"{what}; it could be rebuilt from model input(s) {', '.join(sorted(derivation.roots))}, but "
                f"forwarding them would cost more than sending it; --max-tensors {max_tensors + 1} sends it "
                f"beside the activation")
    return f"{what} besides the activation; --max-tensors {max_tensors + 1} allows cuts that also send it"


def blocking_tensors(index: GraphIndex, start: int, end: int, max_tensors: int) -> list[tuple[str, float]]:
    """Tensors that made positions in ``start``..``end`` unusable as cuts, most frequent first, with
    the fraction of the range's positions each one blocked.

    At a position that is one tensor too wide, the tensors beyond the main activation are the
    blockers; the main activation is the one produced last (the running hidden state).
    """
    counts: Counter[str] = Counter()
    # A sample of positions is enough to find what crosses most of them (and keeps ViT-H fast).
    positions = range(start + 1, end, max(1, (end - start) // _SAMPLED_POSITIONS))
    for position in positions:
        crossing = crossing_at(index, position)
        if crossing is None:
            continue
        tensors = list(crossing.tensors)
        unsendable = [t for t in tensors if not index.batched.get(t, False)]
        if unsendable:
            counts.update(unsendable)
        elif len(tensors) > max_tensors:
            by_age = sorted(tensors, key=lambda t: index.produced_at[t])
            counts.update(by_age[: len(tensors) - max_tensors])
    total = max(len(positions), 1)
    return [(name, n / total) for name, n in counts.most_common(3)]
