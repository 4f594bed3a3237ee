"""The exact programme: a dynamic programme over (segments placed, multiset of classes used, kind
of the last stage, codec of its output), run in layers of devices used and vectorised over the
multisets of a layer and over segment positions. With ``beam`` it keeps only each layer's most
promising rows, for problems too large to solve exactly (the heuristic's beam search, solver.py).

It runs in one of four modes, which differ only in the value a partial plan carries:

- ``max``: its bottleneck so far (the slowest step): finds the smallest bottleneck;
- ``err``: its error units so far, with every step over the view's bound removed: finds the least
  error of any plan within the bound (and so whether one is within the budget);
- ``lex``: (error units, latency), compared error first, steps over the bound removed: finds the
  least error, then the lowest latency, of plans within the bound, and is walked back to a plan;
- ``lat``: latency alone, for problems without lossy options (every error is 0): the same answer
  as ``lex`` at half the work.

Every value only grows along a plan, which makes pruning by the best finished value exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tables import TOL, Tables, View, advance, advance_lex, focus, lex_min, make_view, window

MAX, ERR, LEX, LAT = "max", "err", "lex", "lat"
Values = tuple[np.ndarray, ...]  # one array (max, err, lat) or two (lex: error units, latency)


@dataclass(frozen=True)
class Layer:
    """All partial plans using k devices: one row per multiset of classes used (``counts``). Per
    kind g of the last stage, ``parts[g] = (rows, values)``: values[.][i, y, j] = best value of row
    rows[i] with segments [0, j) placed, the last stage on kind g sending its output in codec y.
    Kept per kind (only the rows a kind reached) because most (row, kind) pairs are empty."""

    codes: np.ndarray  # (m,) mixed-radix code of each row's multiset, sorted
    counts: np.ndarray  # (m, C)
    parts: dict[int, tuple[np.ndarray, Values]]  # kind -> (sorted rows, values each (rows, X, S+1))

    def value(self, row: int, g: int) -> Values | None:
        """The (X, S+1) values of one row for kind g, or None if the kind did not reach it."""
        if g not in self.parts:
            return None
        rows, values = self.parts[g]
        i = int(np.searchsorted(rows, row))
        if i == len(rows) or rows[i] != row:
            return None
        return tuple(v[i] for v in values)


@dataclass(frozen=True)
class Final:
    value: tuple[float, ...]
    layer: int  # devices used
    row: int
    kind: int


@dataclass(frozen=True)
class StageChoice:
    """A stage as the programme chose it."""

    kind: int
    first: int
    end: int
    codec_out: int  # index into Tables.codecs
    variant: int  # index into Tables.variants


def _strides(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[1], np.cumprod(counts[:-1] + 1)]).astype(np.int64)


def lattice_states(t: Tables) -> int:
    """Size of the programme: every multiset of classes times the kind and output codec of the
    last stage."""
    multisets = int(np.prod((t.counts + 1).astype(np.float64)))
    return multisets * max(1, len(t.kinds)) * len(t.codecs)


# --- the mode algebra ----------------------------------------------------------------------------


def _combine(mode: str, a: Values, b: Values) -> Values:
    if mode == MAX:
        return (np.maximum(a[0], b[0]),)
    if mode in (ERR, LAT):
        return (a[0] + b[0],)
    return (a[0] + b[0], a[1] + b[1])


def _minimum(mode: str, a: Values, b: Values) -> Values:
    return lex_min(a, b) if mode == LEX else (np.minimum(a[0], b[0]),)  # type: ignore[arg-type]


def _advance(mode: str, entry: Values, band: Values, lengths: np.ndarray, span: tuple[int, int]) -> Values:
    if mode == MAX:
        return (advance(entry[0], band[0], np.maximum, lengths, span),)
    if mode in (ERR, LAT):
        return (advance(entry[0], band[0], np.add, lengths, span),)
    return advance_lex((entry[0], entry[1]), (band[0], band[1]), lengths, span)


def _band(mode: str, view: View, g: int, x: int, y: int, v: int) -> Values:
    if mode == MAX:
        return (view.own(g, x, y, v),)
    if mode == ERR:
        return (view.err(g, x, y, v),)
    if mode == LAT:
        return (view.lat(g, x, y, v),)
    return (view.err(g, x, y, v), view.lat(g, x, y, v))


def _hop(mode: str, view: View, x: int, ga: int, gb: int) -> Values:
    step = view.hop(x, ga, gb)
    if mode == MAX:
        return (step,)
    if mode == LAT:
        return (view.hop_lat(x, ga, gb),)
    zero = np.where(np.isfinite(step), 0.0, np.inf)
    return (zero,) if mode == ERR else (zero, view.hop_lat(x, ga, gb))


def _client(mode: str, seconds: float) -> tuple[float, ...]:
    if mode in (MAX, LAT):
        return (seconds,)
    zero = 0.0 if math.isfinite(seconds) else math.inf
    return (zero,) if mode == ERR else (zero, seconds)


def _inf(mode: str, shape: tuple[int, ...]) -> Values:
    return tuple(np.full(shape, np.inf) for _ in range(2 if mode == LEX else 1))


# --- the programme -------------------------------------------------------------------------------


def run_lattice(
    t: Tables, view: View, mode: str, incumbent: tuple[float, ...] | None = None, keep_layers: bool = False,
    beam: int | None = None, stop_at: float | None = None,
) -> tuple[dict[int, Layer], list[Final]]:
    """Run the programme layer by layer. Returns the layers (if kept, for tracing back) and every
    finished plan. ``incumbent`` is a value no better than which a plan is of interest; ``stop_at``
    (err mode) ends the run as soon as a plan with at most that many error units is found."""
    n, g_count = t.n_segments, len(t.kinds)
    strides = _strides(t.counts)
    senders = _sender_groups(t, view, mode)
    pending: dict[int, list] = {}
    for gb, kind in enumerate(t.kinds):
        entry = _inf(mode, (1, n + 1))
        for a, s in zip(entry, _client(mode, view.client_in(gb)), strict=True):
            a[0, 0] = s
        out = _stage_values(t, view, mode, gb, {0: entry})
        if out is not None:
            pending.setdefault(kind.replicas, []).append((gb, np.zeros(1, dtype=np.int64),
                                                          np.zeros((1, len(t.classes)), dtype=np.int64), out))
    best = incumbent if incumbent is not None else tuple(math.inf for _ in range(2 if mode == LEX else 1))
    layers: dict[int, Layer] = {}
    finals: list[Final] = []
    cout = [_client(mode, view.client_out(g)) for g in range(g_count)]
    while pending:
        depth = min(pending)
        layer = _merge(pending.pop(depth), strides, t)
        if beam is not None and len(layer.codes) > beam:
            layer = _narrow(t, view, layer, beam)
        if not len(layer.codes):
            continue
        if keep_layers:
            layers[depth] = layer
        for g, (rows, values) in layer.parts.items():
            done = _combine(mode, tuple(v[:, 0, n] for v in values), tuple(np.array(c) for c in cout[g]))
            for i in np.flatnonzero(np.isfinite(done[0])):
                value = tuple(float(d[i]) for d in done)
                finals.append(Final(value, depth, int(rows[i]), g))
                if value < best:  # tuples compare lexicographically: the order of every mode
                    best = value
        if stop_at is not None and best[0] <= stop_at:
            break
        live = _Live(t, view, mode, layer, best)
        if not live.alive.any():
            continue
        for gb, kind in enumerate(t.kinds):
            b, r = kind.cls, kind.replicas
            rows = np.flatnonzero((layer.counts[:, b] + r <= t.counts[b]) & live.alive)
            if not len(rows):
                continue
            entries = {}
            for x in range(len(t.codecs)):
                entry = live.entry(senders[gb][x], x)
                if entry is not None:
                    entry = tuple(e[rows] for e in entry)
                    if np.isfinite(entry[0]).any():
                        entries[x] = entry
            out = _stage_values(t, view, mode, gb, entries)
            if out is None:
                continue
            keep = np.isfinite(out[0]).any(axis=(1, 2))
            if keep.any():
                pending.setdefault(depth + r, []).append(
                    (gb, layer.codes[rows[keep]], layer.counts[rows[keep]], tuple(v[keep] for v in out)))
    return layers, finals


def _stage_values(t: Tables, view: View, mode: str, gb: int, entries: dict[int, Values]) -> Values | None:
    """One more stage on kind gb from partial plans whose next stage starts at j with input codec x
    (``entries[x][.][row, j]``): values (rows, X, S+1) by output codec; None if nothing is reachable."""
    if not entries:
        return None
    rows, n1 = next(iter(entries.values()))[0].shape
    out = _inf(mode, (rows, len(t.codecs), n1))
    reached = False
    for y in range(len(t.codecs)):
        for v in range(len(t.variants)):
            for entry, band, valid in _advance_groups(t, view, mode, gb, entries, y, v):
                span = window(entry[0])
                lengths = _finite_lengths(valid, *span)
                if not len(lengths):
                    continue
                new = _advance(mode, entry, band, lengths, span)
                merged = _minimum(mode, tuple(o[:, y] for o in out), new) if reached else new
                for o, m in zip(out, merged, strict=True):
                    o[:, y] = m
                reached = True
    return out if reached else None


def _advance_groups(t: Tables, view: View, mode: str, gb: int, entries: dict[int, Values], y: int, v: int
                    ) -> list[tuple[Values, Values, np.ndarray]]:
    """(entry, band, valid cells) to advance for output codec y and variant v.

    In the bottleneck mode, one per input codec x: a stage's step mixes its receive cost with
    compute under a max. In the other modes the band is the same for every x up to where it is
    valid (the receive cost is added to the entry, at the stage's start), and advancing is linear
    in the entry for (min, +): input codecs whose cells are valid in the same places share one
    advance, of the minimum of their entries.
    """
    if mode == MAX:
        return [(entry, _band(mode, view, gb, x, y, v), view.valid(gb, x, y, v)) for x, entry in entries.items()]
    cls = t.kinds[gb].cls
    groups: dict[bytes, tuple[np.ndarray, Values]] = {}
    for x, entry in entries.items():
        valid = view.valid(gb, x, y, v)
        if not valid.any():
            continue
        if mode != ERR:  # the receive CPU of the input, in codec x, at the stage's start
            entry = (*entry[:-1], entry[-1] + t.recv[cls, x][None, :])
        key = valid.tobytes()
        if key in groups:
            groups[key] = (valid, _minimum(mode, groups[key][1], entry))
        else:
            groups[key] = (valid, entry)
    out = []
    for valid, entry in groups.values():
        if mode == ERR:
            band: Values = (np.where(valid, view.err_units(gb, y, v), np.inf),)
        elif mode == LAT:
            band = (np.where(valid, view.lat_out(gb, y, v), np.inf),)
        else:
            band = (np.where(valid, view.err_units(gb, y, v), np.inf), np.where(valid, view.lat_out(gb, y, v), np.inf))
        out.append((entry, band, valid))
    return out


def _finite_lengths(valid: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Stage lengths d with a valid cell for some start in [lo, hi]."""
    if hi < lo or not valid.shape[1]:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(valid[lo: hi + 1].any(axis=0)) + 1


class _Live:
    """A layer seen from the next stage: per group of sending kinds and codec, the lowest value of
    every row and position, with dead partial plans removed.

    Dead: a partial plan already as bad as the best finished one (its value only grows), or one
    whose unused devices cannot cover the rest of the model (``_can_finish``). The test is applied
    to the minimum over a group's kinds, which is exact: if the smallest of them is dead, all are.
    """

    def __init__(self, t: Tables, view: View, mode: str, layer: Layer, best: tuple[float, ...]) -> None:
        self.t, self.mode, self.layer, self.best = t, mode, layer, best
        self.finish = _can_finish(t, view, layer.counts)  # (m, S+1)
        self.finish[:, t.n_segments] = False  # a finished plan takes no more stages
        self.cache: dict = {}
        self.alive = np.zeros(len(layer.codes), dtype=bool)
        for rows, values in layer.parts.values():
            # Over the codecs, each array's own minimum: for (error, latency) pairs this can only
            # call more rows alive than are (extra work, never a lost plan).
            low = tuple(v.min(axis=1) for v in values)
            alive = np.isfinite(self._prune(low, rows)[0]).any(axis=1)
            self.alive[rows[alive]] = True

    def _prune(self, low: Values, rows: np.ndarray | None = None) -> Values:
        best, mode, t = self.best, self.mode, self.t
        finish = self.finish if rows is None else self.finish[rows]
        if mode == MAX:
            dead = low[0] >= best[0]  # cannot improve the bottleneck
        elif mode == ERR:
            dead = (low[0] >= best[0]) | (low[0] > t.budget)
        elif mode == LAT:
            dead = low[0] > best[0] * (1 + TOL)  # keep near-ties: fewer devices breaks them
        else:
            e, lat = low
            dead = (e > best[0]) | ((e == best[0]) & (lat > best[1] * (1 + TOL))) | (e > t.budget)
        return tuple(np.where(dead | ~finish, np.inf, v) for v in low)

    def entry(self, senders: _Senders, x: int) -> Values | None:
        """For every row: the best value of entering a stage after any of ``senders`` (groups of
        kinds with their hop column) through codec x. Receiving kinds with the same senders and
        columns share it, so it is computed once per layer."""
        key = ("entry", x, senders.key)
        if key not in self.cache:
            entry = None
            for group, column in senders.groups:
                low = self.lowest(group, x)
                if low is None:
                    continue
                cand = _combine(self.mode, low, column)
                entry = cand if entry is None else _minimum(self.mode, entry, cand)
            self.cache[key] = entry
        return self.cache[key]

    def lowest(self, group: tuple[int, ...], x: int) -> Values | None:
        key = (group, x)
        if key not in self.cache:
            present = [g for g in group if g in self.layer.parts]
            if not present:
                self.cache[key] = None
                return None
            shape = (len(self.layer.codes), self.t.n_segments + 1)
            low = _inf(self.mode, shape)
            for g in present:
                rows, values = self.layer.parts[g]
                merged = _minimum(self.mode, tuple(v[rows] for v in low), tuple(v[:, x] for v in values))
                for target, m in zip(low, merged, strict=True):
                    target[rows] = m
            self.cache[key] = self._prune(low)
        return self.cache[key]


def _sender_groups(t: Tables, view: View, mode: str) -> list[list[_Senders]]:
    """Per receiving kind gb and codec x: the sending kinds grouped by their hop column (usually
    one group per distinct link speed and replica count), each with that column."""
    out = []
    for gb in range(len(t.kinds)):
        per_codec = []
        for x in range(len(t.codecs)):
            groups: dict[bytes, tuple[list[int], Values]] = {}
            for ga in range(len(t.kinds)):
                column = _hop(mode, view, x, ga, gb)
                if not np.isfinite(column[0]).any():
                    continue
                key = b"".join(c.tobytes() for c in column)
                groups.setdefault(key, ([], column))[0].append(ga)
            found = [(tuple(members), column) for members, column in groups.values()]
            key = hash(tuple((m, k) for (m, _), k in zip(found, groups, strict=True)))
            per_codec.append(_Senders(tuple(found), key))
        out.append(per_codec)
    return out


@dataclass(frozen=True)
class _Senders:
    """The kinds that may precede a receiving kind through one codec, grouped by hop column; ``key``
    identifies the grouping, so receivers with the same senders share their entry values."""

    groups: tuple[tuple[tuple[int, ...], Values], ...]
    key: int


def _narrow(t: Tables, view: View, layer: Layer, beam: int) -> Layer:
    """Keep the ``beam`` rows with the most spare capacity: segments the unused devices could still
    cover (at their longest stage) minus the segments left after the row's furthest position."""
    reach = np.full(len(layer.codes), -1)
    positions = np.arange(t.n_segments + 1)
    for rows, values in layer.parts.values():
        furthest = np.where(np.isfinite(values[0]).any(axis=1), positions[None, :], -1).max(axis=1)
        np.maximum.at(reach, rows, furthest)
    spare = (t.counts[None, :] - layer.counts) @ view.capacity[:, 0] - (t.n_segments - reach)
    keep = np.sort(np.argpartition(-spare, beam - 1)[:beam])
    return _subset(layer, keep)


def _subset(layer: Layer, keep: np.ndarray) -> Layer:
    """The layer restricted to rows ``keep`` (sorted), renumbered."""
    new_index = np.full(len(layer.codes), -1)
    new_index[keep] = np.arange(len(keep))
    parts = {}
    for g, (rows, values) in layer.parts.items():
        mask = new_index[rows] >= 0
        if mask.any():
            parts[g] = (new_index[rows[mask]], tuple(v[mask] for v in values))
    return Layer(layer.codes[keep], layer.counts[keep], parts)


def _can_finish(t: Tables, view: View, used: np.ndarray) -> np.ndarray:
    """(m, S+1): whether the devices not yet used could cover segments [j, S) if each covered its
    longest stage within the view's bound, in every measure. Rows failing it are dead ends."""
    left = (t.counts[None, :] - used) @ view.capacity  # (m, K)
    need = view.measures[:, -1:] - view.measures  # (K, S+1)
    return (need[None, :, :] <= left[:, :, None] * (1 + TOL) + 1e-12).all(axis=1)


def _merge(parts: list, strides: np.ndarray, t: Tables) -> Layer:
    """Collect the rows reached by adding a stage of kind gb to source rows into one layer. Each
    (target row, kind) comes from exactly one source row (one source layer per kind)."""
    c_count = len(strides)
    if not parts:
        return Layer(np.zeros(0, dtype=np.int64), np.zeros((0, c_count), dtype=np.int64), {})
    shift = [(k.replicas * strides[k.cls]) for k in t.kinds]
    new_codes = np.concatenate([codes + shift[gb] for gb, codes, _, _ in parts])
    uniq, inverse = np.unique(new_codes, return_inverse=True)
    new_counts = np.zeros((len(uniq), c_count), dtype=np.int64)
    merged: dict[int, tuple[np.ndarray, Values]] = {}
    at = 0
    for gb, codes, counts, values in parts:
        idx = inverse[at: at + len(codes)]
        kind = t.kinds[gb]
        counts = counts.copy()
        counts[:, kind.cls] += kind.replicas
        new_counts[idx] = counts
        merged[gb] = (idx, values)  # idx is sorted: source codes are, and the shift is constant
        at += len(codes)
    return Layer(uniq, new_counts, merged)


# --- tracing back --------------------------------------------------------------------------------


def trace(t: Tables, view: View, mode: str, layers: dict[int, Layer], final: Final) -> list[StageChoice]:
    """Walk back from a finished state of a kept run, recomputing each step's argmin (vectorised
    over the previous kind and the stage length)."""
    strides = _strides(t.counts)
    g_count = len(t.kinds)
    stages: list[StageChoice] = []
    k, g, y, end = final.layer, final.kind, 0, t.n_segments
    code = int(layers[k].codes[final.row])
    while True:
        kind = t.kinds[g]
        prev_depth = k - kind.replicas
        best: tuple | None = None  # (value, previous kind, input codec, start, variant, previous row)
        if prev_depth == 0:
            start = np.array(_client(mode, view.client_in(g)))[:, None, None]
            prev = None
        else:
            prev = layers[prev_depth]
            prow = int(np.searchsorted(prev.codes, code - kind.replicas * strides[kind.cls]))
            previous = _row_values(t, mode, prev, prow)  # each (G, X, S+1)
        for x in range(len(t.codecs) if prev is not None else 1):
            if prev is not None:
                hops = [_hop(mode, view, x, ga, g) for ga in range(g_count)]
                hop = tuple(np.stack([h[c] for h in hops]) for c in range(len(hops[0])))  # each (G, S+1)
            for v in range(len(t.variants)):
                band = _band(mode, view, g, x, y, v)
                width = min(band[0].shape[1], end)
                if not width:
                    continue
                ds = np.arange(1, width + 1)
                js = end - ds
                here = tuple(b[js, ds - 1][None, :] for b in band)  # (1, w)
                if prev is None:
                    keep = js == 0
                    before = tuple(np.where(keep[None, :], start[c, 0], np.inf) for c in range(len(band)))
                    step = tuple(np.zeros_like(b) for b in before)
                else:
                    before = tuple(val[:, x, js] for val in previous)  # (G, w)
                    step = tuple(h[:, js] for h in hop)
                value = _combine(mode, _combine(mode, before, step), here)
                found = _argmin(value)
                if found is None:
                    continue
                ga, i = found
                cand = tuple(float(c[ga, i]) for c in value)
                if best is None or cand < best[0]:
                    best = (cand, ga, x, int(js[i]), v, prow if prev is not None else -1)
        if best is None:
            raise RuntimeError("trace: no predecessor found (the programme's layers are inconsistent)")
        _, ga, x, j, v, prow = best
        stages.append(StageChoice(g, j, end, y, v))
        if prev is None:
            break
        code = int(prev.codes[prow])
        k, g, y, end = prev_depth, ga, x, j
    return stages[::-1]


def _row_values(t: Tables, mode: str, layer: Layer, row: int) -> Values:
    """All kinds' values of one row of a layer, (G, X, S+1) each, inf where a kind did not reach it."""
    out = _inf(mode, (len(t.kinds), len(t.codecs), t.n_segments + 1))
    for g in layer.parts:
        found = layer.value(row, g)
        if found is not None:
            for target, v in zip(out, found, strict=True):
                target[g] = v
    return out


def _argmin(value: Values) -> tuple[int, int] | None:
    """Index of the smallest entry (lexicographic over the arrays), or None if all are inf."""
    first = value[0]
    if not np.isfinite(first).any():
        return None
    mask = first == first.min()
    if len(value) > 1:
        second = np.where(mask, value[1], np.inf)
        flat = int(np.argmin(second))
    else:
        flat = int(np.argmax(mask))
    return int(flat // first.shape[1]), int(flat % first.shape[1])


# --- the solves ----------------------------------------------------------------------------------


def min_bottleneck(t: Tables, upper: float, beam: int | None = None, lower: float = 0.0) -> float:
    """The smallest bottleneck below ``upper`` of any plan using every option individually within
    the budget (the sum of errors is not checked here); inf when there is none below ``upper``.
    ``lower``, a bound no plan's bottleneck is below, lets dominated replica groups go."""
    t, view = focus(t, upper, theta=lower)
    _, finals = run_lattice(t, view, MAX, incumbent=(upper,), beam=beam)
    return min([math.inf, *(f.value[0] for f in finals)])


def min_error(t: Tables, bound: float, stop_at: float | None = None, beam: int | None = None) -> float:
    """The fewest error units of any plan whose every step is within ``bound`` (inf: none)."""
    t, view = focus(t, bound)
    _, finals = run_lattice(t, view, ERR, beam=beam, stop_at=stop_at)
    return min([math.inf, *(f.value[0] for f in finals)])


def best_plan(t: Tables, bound: float, beam: int | None = None
              ) -> tuple[Tables, Final, list[StageChoice]] | None:
    """Among plans whose every step is within ``bound``: the least error, then the lowest latency
    (ties within TOL), then the fewest devices; walked back to its stages."""
    view = make_view(t, bound)
    mode = LEX if t.lossy else LAT
    layers, finals = run_lattice(t, view, mode, keep_layers=True, beam=beam)
    if mode == LAT:  # no lossy option: every plan has 0 error units
        finals = [Final((0.0, *f.value), f.layer, f.row, f.kind) for f in finals]
    finals = [f for f in finals if f.value[0] <= t.budget]
    if not finals:
        return None
    least = min(f.value[0] for f in finals)
    lowest = min(f.value[1] for f in finals if f.value[0] == least)
    ties = [f for f in finals if f.value[0] == least and f.value[1] <= lowest * (1 + TOL)]
    final = min(ties, key=lambda f: (f.layer, f.value[1]))
    return t, final, trace(t, view, mode, layers, final)


def step_values(t: Tables, lower: float, upper: float) -> np.ndarray:
    """Every distinct step time in [lower, upper): where the set of allowed steps changes, so the
    least error of plans within a bound only changes at these values."""
    view = make_view(t, upper, theta=0.0)  # every step, dominated replica groups too
    found = [np.array([lower])]
    for g in range(len(t.kinds)):
        for x in range(len(t.codecs)):
            for y in range(len(t.codecs)):
                for v in range(len(t.variants)):
                    own = view.own(g, x, y, v)
                    found.append(own[np.isfinite(own)])
            for ga in range(len(t.kinds)):
                hop = view.hop(x, ga, g)
                found.append(hop[np.isfinite(hop)])
    found += [t.client_in, t.client_out]
    values = np.unique(np.concatenate(found))
    return values[(values >= lower * (1 - TOL)) & (values <= upper * (1 + TOL))]
