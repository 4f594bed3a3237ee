"""Heuristic pieces for large problems: the programme restricted to fixed sequences of class
blocks (linear in the device count), and a lower bound on the bottleneck from a relaxation.

The class-order programme searches plain plans (one device per stage, raw hops, fp32 weights):
every one of them is a valid plan within any error budget, so its result bounds the optimum from
above and seeds the exact programme's pruning."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .tables import TOL, Op, PlainView, Tables, advance, plain_view, reach


def _blocks(t: Tables, order: Sequence[int], repeats: int) -> tuple[tuple[int, int], ...]:
    """``order`` repeated ``repeats`` times, each class's devices split evenly over its blocks,
    as (class, most devices in this block). Repeating lets classes interleave, which matters when
    stage boundaries must fall in step with a model's repeating layer pattern."""
    blocks = []
    for r in range(repeats):
        for c in order:
            n = int(t.counts[c])
            cap = n // repeats + (1 if r < n % repeats else 0)
            if cap:
                blocks.append((c, cap))
    return tuple(blocks)


def _block_dp(
    t: Tables, view: PlainView, op: Op, blocks: Sequence[tuple[int, int]], stages: bool = True
) -> tuple[float, list] | None:
    """Best plan whose devices follow ``blocks`` in order (any block may use fewer devices, or none):
    its value and, if ``stages``, its stages as (class, first segment, end segment).

    The state is (block, devices used in the block), so this is linear in the device count.
    """
    n = t.n_segments
    classes = np.array([c for c, _ in blocks], dtype=np.int64)
    acc = np.full((len(blocks), n + 1), np.inf)  # acc[p, j]: best value entering block p at position j
    acc[:, 0] = view.client_in[classes]
    rows: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []  # (block, class, count, entry, values)
    best, best_row = math.inf, -1
    for p, (c, cap) in enumerate(blocks):
        band = _band(view, op, c)
        if not band.shape[1]:
            continue
        entry = acc[p].copy()
        for count in range(1, cap + 1):
            values = advance(entry[None, :], band, op)[0]
            if not np.isfinite(values).any():
                break
            done = op(values[n], view.client_out[c])
            values[n] = np.inf
            rows.append((p, c, count, entry, values))
            if done < best:
                best, best_row = float(done), len(rows) - 1
            if p + 1 < len(blocks):
                later = view.send[:, c, classes[p + 1:]].T
                np.minimum(acc[p + 1:], op(values[None, :], later), out=acc[p + 1:])
            entry = op(values, view.send[:, c, c])
    if best_row < 0:
        return None
    return best, _trace_blocks(view, op, rows, best_row, n) if stages else []


def _band(view: PlainView, op: Op, c: int) -> np.ndarray:
    """The stage step for the bottleneck (np.maximum), its latency share for the latency (np.add)."""
    return view.bands[c] if op is np.maximum else view.lat[c]


def _trace_blocks(view: PlainView, op: Op, rows: list, idx: int, n: int) -> list[tuple[int, int, int]]:
    stages, end, last = [], n, True
    while True:
        p, c, count, entry, _ = rows[idx]
        band = _band(view, op, c)
        ds = np.arange(1, min(band.shape[1], end) + 1)
        cand = op(entry[end - ds], band[end - ds, ds - 1])
        if last:
            cand, last = op(cand, view.client_out[c]), False
        j = int(end - ds[int(np.argmin(cand))])
        stages.append((c, j, end))
        if count > 1:
            idx, end = idx - 1, j
            continue
        if j == 0:
            break
        sources = [(float(op(r[4][j], view.send[j, r[1], c])), i) for i, r in enumerate(rows) if r[0] < p]
        idx, end = min(sources)[1], j
    return stages[::-1]


def _seed_orders(t: Tables) -> list[tuple[int, ...]]:
    c_count = len(t.classes)
    if c_count <= 5:
        return list(itertools.permutations(range(c_count)))
    speed = np.argsort(t.prefix[:, 0, -1], kind="stable")
    memory = np.argsort(-t.capacity, kind="stable")
    return list(dict.fromkeys([
        tuple(range(c_count)), tuple(int(c) for c in speed), tuple(int(c) for c in speed[::-1]),
        tuple(int(c) for c in memory), tuple(int(c) for c in memory[::-1]),
    ]))


def class_orders(t: Tables, budget: int) -> tuple[float, list] | None:
    """Search block sequences (class orders, repeated 1, 2 or max-count times) for the lowest
    bottleneck, then the lowest latency among the sequences that reach it. All orders are tried
    for up to 5 classes; beyond, a local search (moves and swaps) from a few seeds. ``budget``
    caps the number of sequences evaluated."""
    c_count = len(t.classes)
    most = int(t.counts.max())
    repeat_options = sorted({r for r in (1, 2, most) if 1 <= r <= most})
    bound, view = math.inf, plain_view(t, math.inf)
    scored: dict[tuple[tuple[int, int], ...], float] = {}

    def score(order: tuple[int, ...], repeats: int) -> float:
        nonlocal view, bound
        blocks = _blocks(t, order, repeats)
        if blocks not in scored:
            found = _block_dp(t, view, np.maximum, blocks, stages=False)
            scored[blocks] = math.inf if found is None else found[0]
            if scored[blocks] * (1 + TOL) < bound:
                bound = scored[blocks] * (1 + TOL)  # narrower bands make later sequences cheaper
                view = plain_view(t, bound)
        return scored[blocks]

    seeds = _seed_orders(t)
    share = max(1, budget // len(repeat_options))
    for repeats in repeat_options:
        for order in seeds[:share]:
            score(order, repeats)
        if c_count <= 5:
            continue
        current = min(seeds, key=lambda o, r=repeats: score(o, r))
        evaluated, improved = 0, True
        while improved and evaluated < share:
            improved = False
            for i, j in itertools.permutations(range(c_count), 2):
                moved = list(current)
                moved.insert(j, moved.pop(i))
                for cand in (tuple(moved), _swap(current, i, j)):
                    evaluated += 1
                    if score(cand, repeats) < score(current, repeats) * (1 - TOL):
                        current, improved = cand, True
                if evaluated >= share:
                    break
    best = min(scored.values())
    if not math.isfinite(best):
        return None
    ties = [blocks for blocks, v in scored.items() if v <= best * (1 + TOL)]
    view = plain_view(t, best * (1 + TOL))
    results = [r for blocks in ties[:64] if (r := _block_dp(t, view, np.add, blocks)) is not None]
    return best, min(results, key=lambda r: (r[0], len(r[1])))[1]


def _swap(order: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    out = list(order)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def relaxed_bound(t: Tables) -> float:
    """No plan has a bottleneck below this. A relaxation that forgets the order of devices, their
    comm costs and the error budget: at a bottleneck T a group of r devices of a class covers at
    most its longest stage whose compute (in any variant in play) is within r * T, measured in
    segments or in any type's seconds, so each device covers at most 1/r of that; together they
    must cover the model, and every segment, the first and the last stage must fit somewhere."""
    n = t.n_segments
    measures = t.measures()
    reaches = [_Reach.of(t, c, v, measures) for c in range(len(t.classes)) for v in range(len(t.variants))]
    groups = [(k.cls, k.replicas) for k in t.kinds]
    values = np.concatenate([*(r.comps / k for r in reaches for c, k in groups if c == r.cls),
                             t.client_in, t.client_out])
    totals = measures[:, -1]

    def feasible(bound: float) -> bool:
        covered = np.zeros(n, dtype=bool)
        capacity = np.zeros((len(t.classes), len(measures)))
        first_ok = last_ok = False
        for r in reaches:
            for c, k in groups:
                if c != r.cls:
                    continue
                limit = bound * k * (1 + TOL)
                first_ok |= r.first <= limit and t.client_in[c] <= bound
                last_ok |= r.last <= limit and t.client_out[c] <= bound
                covered |= r.cover <= limit
                capacity[c] = np.maximum(capacity[c], r.span(limit) / k)
        have = t.counts @ capacity
        return first_ok and last_ok and covered.all() and bool((have >= totals * (1 - TOL)).all())

    return _smallest_passing(values, feasible)


def _smallest_passing(values: np.ndarray, test: Callable[[float], bool]) -> float:
    """The smallest of ``values`` (unsorted) that passes a monotone ``test``, inf if none: a binary
    search by medians, which halves the candidates each step without sorting them all."""
    values = values[np.isfinite(values)]
    best = math.inf
    while len(values):
        median = float(np.partition(values, len(values) // 2)[len(values) // 2])
        if test(median):
            best, values = median, values[values < median]
        else:
            values = values[values > median]
    return best


@dataclass(frozen=True)
class _Reach:
    """What one device of a class covers, in one variant, as a function of its compute limit."""

    cls: int
    comps: np.ndarray  # sorted compute of every stage that fits
    spans: np.ndarray  # (K, len(comps)): the longest span in each measure among stages up to that compute
    cover: np.ndarray  # (S,): least compute of a fitting stage containing segment s
    first: float  # least compute of a fitting stage starting at 0
    last: float  # ... ending at S

    @staticmethod
    def of(t: Tables, c: int, v: int, measures: np.ndarray) -> _Reach:
        n = t.n_segments
        masked = t.stage_compute[c, v]
        sorted_stages = reach(t, c, v)
        down = np.minimum.accumulate(masked, axis=0)  # down[s, j] = least over starts i <= s
        # cover[s] = least over j > s of down[s, j]: a running min from the right, read off the diagonal.
        right = np.minimum.accumulate(down[:, ::-1], axis=1)[:, ::-1]
        cover = right[np.arange(n), np.arange(n) + 1]
        return _Reach(c, sorted_stages.comps, sorted_stages.spans, cover, float(masked[0].min()),
                      float(masked[:, n].min()))

    def span(self, limit: float) -> np.ndarray:
        k = int(np.searchsorted(self.comps, limit, side="right"))
        return self.spans[:, k - 1] if k else np.zeros(self.spans.shape[0])
