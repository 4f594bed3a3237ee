"""The exact programme: a dynamic programme over (segments placed, multiset of classes used,
class of the last device), run in layers of devices used and vectorised over the multisets of a
layer and over segment positions. ``beam_search`` runs the same programme with each layer cut
to its most promising rows, for problems too large to solve exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tables import TOL, Op, Tables, View, advance, make_view


@dataclass(frozen=True)
class Layer:
    """All partial plans using k devices: one row per multiset of classes used (``counts``),
    values[row, a, j] = best value with segments [0, j) placed and the last device of class a."""

    codes: np.ndarray  # (m,) mixed-radix code of each row's multiset, sorted
    counts: np.ndarray  # (m, C)
    values: np.ndarray  # (m, C, S+1)


def _strides(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[1], np.cumprod(counts[:-1] + 1)]).astype(np.int64)


def lattice_states(counts: np.ndarray) -> int:
    """Size of the programme: every multiset of classes times the class of the last device."""
    return int(np.prod((counts + 1).astype(np.float64))) * len(counts)


def run_lattice(
    t: Tables, view: View, op: Op, incumbent: float, keep_layers: bool, beam: int | None = None
) -> tuple[list[Layer], list[tuple]]:
    """Run the programme layer by layer. Returns the layers (if kept, for tracing back) and every
    finished plan as (value, layer index, row, last class). ``op`` is np.maximum (bottleneck) or
    np.add (latency)."""
    n, c_count = t.n_segments, len(t.classes)
    strides = _strides(t.counts)
    bottleneck = op is np.maximum
    senders = [_senders(view.send[:, :, b]) for b in range(c_count)]
    parts = []
    for b in range(c_count):
        entry = np.full((1, n + 1), np.inf)
        entry[0, 0] = view.client_in[b]
        new = advance(entry, view.bands[b], op)
        if np.isfinite(new).any():
            parts.append((b, np.array([0]), new))
    empty = np.zeros((1, c_count), dtype=np.int64)
    layer = _merge(parts, np.zeros(1, dtype=np.int64), empty, strides, c_count)
    layers, finals, best, depth = [], [], incumbent, 0
    while len(layer.codes):
        if keep_layers:
            layers.append(layer)
        done = op(layer.values[:, :, n], view.client_out[None, :])
        for row, a in zip(*np.nonzero(np.isfinite(done)), strict=True):
            finals.append((float(done[row, a]), depth, int(row), int(a)))
        depth += 1
        if finals:
            best = min(best, min(f[0] for f in finals))
        # A partial plan already at the best finished value cannot improve the bottleneck; for the
        # latency keep near-ties, since fewer devices breaks them.
        dead = layer.values >= best if bottleneck else layer.values > best * (1 + TOL)
        live = np.where(dead | ~_can_finish(t, view, layer.counts)[:, None, :], np.inf, layer.values)
        live[:, :, n] = np.inf
        parts = []
        alive = np.isfinite(live).any(axis=(1, 2))
        lowest: dict[tuple[int, ...], np.ndarray] = {}
        for b in range(c_count):
            rows = np.nonzero((layer.counts[:, b] < t.counts[b]) & alive)[0]
            if not len(rows) or not view.bands[b].shape[1]:
                continue
            # Senders whose link to class b is the same are reduced first, once per layer.
            entry = np.full((len(rows), n + 1), np.inf)
            for group, column in senders[b]:
                if group not in lowest:
                    lowest[group] = live[:, list(group), :].min(axis=1)
                np.minimum(entry, op(lowest[group][rows], column), out=entry)
            new = advance(entry, view.bands[b], op)
            keep = np.isfinite(new).any(axis=1)
            parts.append((b, rows[keep], new[keep]))
        layer = _merge(parts, layer.codes, layer.counts, strides, c_count)
        if beam is not None and len(layer.codes) > beam:
            layer = _narrow(t, view, layer, beam)
    return layers, finals


def _narrow(t: Tables, view: View, layer: Layer, beam: int) -> Layer:
    """Keep the ``beam`` rows with the most spare capacity: segments the unused devices could still
    cover (at their longest stage) minus the segments left after the row's furthest position."""
    positions = np.arange(layer.values.shape[2])[None, :]
    reach = np.where(np.isfinite(layer.values).any(axis=1), positions, -1).max(axis=1)
    spare = (t.counts[None, :] - layer.counts) @ view.capacity[:, 0] - (t.n_segments - reach)
    keep = np.sort(np.argpartition(-spare, beam - 1)[:beam])
    return Layer(layer.codes[keep], layer.counts[keep], layer.values[keep])


def _senders(send_to_b: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Group the sending classes a by their send-time column send[:, a, b] (usually one group per
    distinct link speed)."""
    groups: dict[bytes, tuple[list[int], np.ndarray]] = {}
    for a in range(send_to_b.shape[1]):
        column = send_to_b[:, a]
        groups.setdefault(column.tobytes(), ([], column))[0].append(a)
    return [(tuple(members), column) for members, column in groups.values()]


def _can_finish(t: Tables, view: View, used: np.ndarray) -> np.ndarray:
    """(m, S+1): whether the devices not yet used could cover segments [j, S) if each covered its
    longest stage within the view's bound, in every measure. Rows failing it are dead ends."""
    left = (t.counts[None, :] - used) @ view.capacity  # (m, K)
    need = view.measures[:, -1:] - view.measures  # (K, S+1)
    return (need[None, :, :] <= left[:, :, None] * (1 + TOL) + 1e-12).all(axis=1)


def _merge(parts: list, codes: np.ndarray, counts: np.ndarray, strides: np.ndarray, c_count: int) -> Layer:
    """Collect the rows reached by adding one device of class b to source rows into one layer."""
    if not parts:
        return Layer(np.zeros(0, dtype=np.int64), np.zeros((0, c_count), dtype=np.int64),
                      np.zeros((0, c_count, 0)))
    new_codes = np.concatenate([codes[rows] + strides[b] for b, rows, _ in parts])
    uniq, inverse = np.unique(new_codes, return_inverse=True)
    values = np.full((len(uniq), c_count, parts[0][2].shape[1]), np.inf)
    new_counts = np.zeros((len(uniq), c_count), dtype=np.int64)
    at = 0
    for b, rows, new in parts:
        idx = inverse[at: at + len(rows)]
        values[idx, b, :] = new
        new_counts[idx] = counts[rows]
        new_counts[idx, b] += 1
        at += len(rows)
    return Layer(uniq, new_counts, values)


def solve_exact(t: Tables, upper: float) -> tuple[float, list[tuple[int, int, int]]] | None:
    """Optimal (bottleneck, stages as (class, first, end)) or None when nothing fits."""
    _, finals = run_lattice(t, make_view(t, upper), np.maximum, incumbent=upper, keep_layers=False)
    best = min([upper, *(f[0] for f in finals)])
    if not math.isfinite(best):
        return None
    view = make_view(t, best * (1 + TOL))
    layers, finals = run_lattice(t, view, np.add, incumbent=math.inf, keep_layers=True)
    lowest = min(f[0] for f in finals)
    # Fewest devices among the latency ties, then the lowest latency among those.
    _, k, row, a = min((f for f in finals if f[0] <= lowest * (1 + TOL)), key=lambda f: (f[1], f[0]))
    return best, trace(t, view, np.add, layers, k, row, a)


def trace(t: Tables, view: View, op: Op, layers: list[Layer], k: int, row: int, a: int) -> list[tuple]:
    """Walk back from a finished state of a kept run, recomputing each step's argmin; returns the
    stages as (class, first segment, end segment)."""
    strides = _strides(t.counts)
    stages, end = [], t.n_segments
    while True:
        band = view.bands[a]
        if k == 0:
            stages.append((a, 0, end))
            break
        prev = layers[k - 1]
        prow = int(np.searchsorted(prev.codes, layers[k].codes[row] - strides[a]))
        best = (math.inf, -1, -1)
        for d in range(1, min(band.shape[1], end) + 1):
            j = end - d
            cand = op(op(prev.values[prow, :, j], view.send[j, :, a]), band[j, d - 1])
            pa = int(np.argmin(cand))
            if cand[pa] < best[0]:
                best = (float(cand[pa]), pa, j)
        _, pa, j = best
        stages.append((a, j, end))
        a, end, row, k = pa, j, prow, k - 1
    return stages[::-1]


def beam_search(t: Tables, upper: float, lower: float, width: int) -> tuple[float, list] | None:
    """The exact programme with each layer cut to its ``width`` most promising rows (``_narrow``),
    as a yes/no test "is there a plan within T?", binary-searched over the stage times between the
    lower bound and ``upper``; then the same for the latency at the best T found."""
    comps = [t.compute(c)[t.fits(c)] for c in range(len(t.classes))]
    values = np.unique(np.concatenate(comps))
    values = values[(values >= lower * (1 - TOL)) & (values < upper * (1 - TOL))]
    best = math.inf
    lo, hi = 0, len(values) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        view = make_view(t, values[mid] * (1 + TOL))
        _, finals = run_lattice(t, view, np.maximum, math.inf, False, beam=width)
        if finals:
            best = min(best, min(f[0] for f in finals))
            hi = mid - 1
        else:
            lo = mid + 1
    if not math.isfinite(best):
        return None
    view = make_view(t, best * (1 + TOL))
    for op in (np.add, np.maximum):  # the latency pass; if the beam loses the plan there, any plan at T
        layers, finals = run_lattice(t, view, op, math.inf, True, beam=width)
        if finals:
            lowest = min(f[0] for f in finals)
            _, k, row, a = min((f for f in finals if f[0] <= lowest * (1 + TOL)), key=lambda f: (f[1], f[0]))
            return best, trace(t, view, op, layers, k, row, a)
    return None
