"""The planner's view of a model: the atomic segments between candidate cuts and what each costs.

Per segment: the weights it holds, the activation memory it needs per sample, the bytes per sample
that cross the cut after it, and an estimate of its FLOPs (used to balance stages before any device
has been profiled, and for what-if device speeds).
"""

from __future__ import annotations

from edgepipe.compiler.cuts import Cut
from edgepipe.compiler.graph import GraphIndex, node_flops_per_sample
from edgepipe.planner.problem import ModelSpec, Segment


def model_spec(index: GraphIndex, cuts: list[Cut], model_id: str, model_sha256: str, outputs: list[str],
               inputs: list[str]) -> ModelSpec:
    """Segments between consecutive ``cuts`` (plus the two ends of the graph)."""
    starts = [0, *[c.position for c in cuts]]
    ends = [*[c.position for c in cuts], index.size]
    names = ["input", *[c.label for c in cuts]]
    out_bytes = [c.bytes_per_sample or 0 for c in cuts] + [_bytes(index, outputs)]
    live = live_bytes(index)
    segments = []
    for name, start, end, out in zip(names, starts, ends, out_bytes):
        weights: set[str] = set()
        flops = 0.0
        for position in range(start, end):
            weights |= index.weight_names[position]
            flops += node_flops_per_sample(index.nodes[position], index.batch_dim)
        segments.append(
            Segment(
                name=name,
                weight_bytes=sum(index.initializer_bytes.get(w, 0) for w in weights),
                activation_bytes=max(live[start:end], default=0),
                out_bytes=out,
                flops=flops,
            )
        )
    return ModelSpec(model_id=model_id, model_sha256=model_sha256, input_bytes=_bytes(index, inputs),
                     segments=tuple(segments))


def live_bytes(index: GraphIndex) -> list[int]:
    """Per node: bytes per sample of all activations alive while it runs (its inputs and outputs
    included), the peak working set a stage containing that node must hold."""
    delta = [0] * (index.size + 2)
    for name, produced in index.produced_at.items():
        last = max(index.last_used_at.get(name, produced), produced)
        size = index.bytes_per_sample.get(name) or 0
        delta[max(produced, 0)] += size
        delta[min(last, index.size - 1) + 1] -= size
    running, out = 0, []
    for position in range(index.size):
        running += delta[position]
        out.append(running)
    return out


def _bytes(index: GraphIndex, names: list[str]) -> int:
    return sum(index.bytes_per_sample.get(n) or 0 for n in names)


def balanced_partition(costs: list[float], parts: int) -> list[int]:
    """Split ``costs`` into ``parts`` consecutive non-empty groups minimising the largest sum.

    Returns the start index of every group but the first. Exact O(parts * n^2) dynamic programme;
    n is at most a few hundred segments.
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} segments into {parts} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest bottleneck of the first i segments in k groups.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    start = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], start[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        i = start[k][i]
        bounds.append(i)
    return sorted(bounds)[1:]
