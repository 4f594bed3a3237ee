"""Heuristic pieces for large problems: the programme restricted to fixed sequences of class
blocks (linear in the device count), and a lower bound on the bottleneck from a relaxation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from .tables import TOL, Op, Tables, View, advance, make_view


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
    t: Tables, view: View, op: Op, blocks: Sequence[tuple[int, int]], stages: bool = True
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
        band = view.bands[c]
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


def _trace_blocks(view: View, op: Op, rows: list, idx: int, n: int) -> list[tuple[int, int, int]]:
    stages, end, last = [], n, True
    while True:
        p, c, count, entry, _ = rows[idx]
        band = view.bands[c]
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
    speed = np.argsort(t.prefix[:, -1], kind="stable")
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
    bound, view = math.inf, make_view(t, math.inf)
    scored: dict[tuple[tuple[int, int], ...], float] = {}

    def score(order: tuple[int, ...], repeats: int) -> float:
        nonlocal view, bound
        blocks = _blocks(t, order, repeats)
        if blocks not in scored:
            found = _block_dp(t, view, np.maximum, blocks, stages=False)
            scored[blocks] = math.inf if found is None else found[0]
            if scored[blocks] * (1 + TOL) < bound:
                bound = scored[blocks] * (1 + TOL)  # narrower bands make later sequences cheaper
                view = make_view(t, bound)
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
    view = make_view(t, best * (1 + TOL))
    results = [r for blocks in ties[:64] if (r := _block_dp(t, view, np.add, blocks)) is not None]
    return best, min(results, key=lambda r: (r[0], len(r[1])))[1]


def _swap(order: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    out = list(order)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def relaxed_bound(t: Tables) -> float:
    """No plan has a bottleneck below this. A relaxation that forgets the order of devices: at a
    bottleneck T each device covers at most its longest feasible stage, measured in segments or
    in any type's seconds; together they must cover the model, and every segment, the first and
    the last stage must fit somewhere."""
    n, c_count = t.n_segments, len(t.classes)
    comps = [t.compute(c) for c in range(c_count)]
    fits = [t.fits(c) for c in range(c_count)]
    measures = list(np.unique(np.vstack([np.arange(n + 1, dtype=np.float64), t.prefix]), axis=0))
    values = np.unique(np.concatenate([
        *(comps[c][fits[c]] for c in range(c_count)), t.client_in, t.client_out,
    ]))

    def feasible(bound: float) -> bool:
        covered = np.zeros(n, dtype=bool)
        capacity = np.zeros(len(measures))
        first_ok = last_ok = False
        for c in range(c_count):
            valid = fits[c] & (comps[c] <= bound)
            if not valid.any():
                continue
            first_ok |= bool(valid[0].any()) and t.client_in[c] <= bound
            last_ok |= bool(valid[:, n].any()) and t.client_out[c] <= bound
            reach = np.maximum.accumulate(np.where(valid, np.arange(n + 1)[None, :], 0).max(axis=1))
            covered |= reach[:n] > np.arange(n)
            for k, m in enumerate(measures):
                span = np.where(valid, m[None, :] - m[:, None], 0.0)
                capacity[k] += t.counts[c] * span.max()
        totals = np.array([m[-1] for m in measures])
        return first_ok and last_ok and covered.all() and bool((capacity >= totals * (1 - TOL)).all())

    lo, hi = 0, len(values) - 1
    if not len(values) or not feasible(values[hi]):
        return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])
