"""The cost model (cost.py) as arrays, for the solvers.

Devices the cost model cannot tell apart form a *class*. A stage runs on a *kind*: r devices of one
class sharing its microbatches (r = 1: no replication). A stage's input arrives in a codec x (the
previous stage's output codec) and its output leaves in a codec y; its weights are a *variant*
(fp32, or int8 where the type and the segments have int8 figures). Per kind g = (class c, r),
segments [i, k), codecs x -> y and variant v:

    busy  = compute[c, v](i, k) + share[c] * (recv[c, x, i] + send[c, y, k])
    own   = max(busy, recv[c, x, i], send[c, y, k]) / r             (the stage's step)
    hop   = wire[y, k, c, c'] / min(r, r')                          (to the next kind (c', r'))
    lat   = compute + recv + send  (+ wire[y, k, c, c'] for the hop) (one microbatch, empty pipeline)
    error = cut_err[y, k] + (int8_err[k] - int8_err[i] if v is int8) (units of the error budget)

which is what cost.evaluate gives for the same placement (tests check both against an independent
reading of docs/planner.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .cost import comm_seconds, cut_bytes, link_lookup, memory_matrix
from .problem import (
    CODECS,
    ERROR_UNITS,
    Problem,
    ProblemError,
    error_units,
    int8_segment_seconds,
    segment_seconds,
)

TOL = 1e-9  # relative slack when comparing times: plans within it count as ties
Op = Callable[[np.ndarray, np.ndarray], np.ndarray]  # np.maximum (bottleneck) or np.add (latency)
VARIANTS = ("fp32", "int8")


@dataclass(frozen=True)
class DeviceClass:
    """Devices the cost model cannot tell apart; ``members`` in the order they were listed."""

    type: str
    memory_bytes: int
    bandwidth_mbps: float
    members: tuple[str, ...]


@dataclass(frozen=True)
class Kind:
    """What a stage runs on: ``replicas`` devices of class ``cls`` sharing its microbatches."""

    cls: int
    replicas: int


def device_classes(problem: Problem, names: Sequence[str] | None = None) -> tuple[DeviceClass, ...]:
    """Group devices (all, or ``names``) into classes of interchangeable devices."""
    devices = [problem.device(n) for n in names] if names is not None else list(problem.devices)
    link = link_lookup(problem)
    linked = {k.a for k in problem.links} | {k.b for k in problem.links}

    def interchangeable(x: str, y: str) -> bool:
        # Swapping x and y must change no link; devices without links of their own always qualify.
        if x not in linked and y not in linked:
            return True
        return all(link(x, z) == link(y, z) for z in (d.name for d in devices) if z not in (x, y))

    groups: list[list[str]] = []
    keys: list[tuple[str, int, float]] = []
    for d in devices:
        key = (d.type, d.memory_bytes, d.bandwidth_mbps)
        for k, group in zip(keys, groups, strict=True):
            if k == key and interchangeable(group[0], d.name):
                group.append(d.name)
                break
        else:
            keys.append(key)
            groups.append([d.name])
    return tuple(DeviceClass(k[0], k[1], k[2], tuple(g)) for k, g in zip(keys, groups, strict=True))


@dataclass(frozen=True)
class Tables:
    """The cost model as arrays over classes, kinds, codecs, variants and positions 0..S."""

    problem: Problem
    microbatch: int
    classes: tuple[DeviceClass, ...]
    counts: np.ndarray  # (C,) devices per class that can be used (at most S)
    kinds: tuple[Kind, ...]  # every (class, replicas) a stage may run on
    codecs: tuple[str, ...]  # codecs in play; index 0 is raw
    variants: tuple[str, ...]  # variants in play; index 0 is fp32
    prefix: np.ndarray  # (C, V, S+1) cumulative compute seconds; inf where the type lacks the variant
    stage_compute: np.ndarray  # (C, V, S+1, S+1) compute of [i, j) where i < j and it fits; inf elsewhere
    memory: np.ndarray  # (V, S+1, S+1) stage memory of [i, j), inf unless i < j
    capacity: np.ndarray  # (C,)
    recv: np.ndarray  # (C, X, S+1) CPU seconds to receive + decode cut j in codec x
    send_cpu: np.ndarray  # (C, X, S+1) CPU seconds to encode + send cut j in codec x; inf where x is unavailable
    share: np.ndarray  # (C,) fraction of comm CPU that lengthens compute
    wire: np.ndarray  # (X, S+1, C, C) seconds to send cut j in codec x from class a to b; inf at 0 and S
    wire_in_max: np.ndarray  # (X, C, S+1) the slowest finite wire time into class c at cut j
    wire_out_max: np.ndarray  # (X, C, S+1) the slowest finite wire time out of class c at cut j
    client_in: np.ndarray  # (C,)
    client_out: np.ndarray  # (C,)
    cut_err: np.ndarray  # (X, S+1) error units of sending cut j in codec x
    int8_err: np.ndarray  # (S+1,) cumulative error units of the segments' int8 weights (finite ones)
    int8_over: np.ndarray  # (S+1,) cumulative count of segments whose int8 weights alone exceed the budget
    budget: float  # error units available (0 without a budget)
    unusable: dict[str, str]  # devices with no compute figures at this microbatch -> why
    max_replicas: int = 1
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # derived arrays, built once

    @property
    def n_segments(self) -> int:
        return self.prefix.shape[2] - 1

    @property
    def lossy(self) -> bool:
        """Whether any lossy choice (a codec, int8 weights) is in play."""
        return len(self.codecs) > 1 or len(self.variants) > 1

    def compute(self, c: int, v: int = 0) -> np.ndarray:
        """(S+1, S+1): seconds of segments [i, j) on class c in variant v (meaningful for i < j)."""
        p = self.prefix[c, v]
        with np.errstate(invalid="ignore"):
            return p[None, :] - p[:, None]

    def fits(self, c: int, v: int = 0) -> np.ndarray:
        return self.memory[v] <= self.capacity[c]

    def lossless(self) -> Tables:
        """The tables without lossy choices: raw hops and fp32 weights only."""
        if len(self.codecs) == 1 and len(self.variants) == 1:
            return self
        return replace(
            self, codecs=self.codecs[:1], variants=self.variants[:1], prefix=self.prefix[:, :1],
            stage_compute=self.stage_compute[:, :1], memory=self.memory[:1], recv=self.recv[:, :1],
            send_cpu=self.send_cpu[:, :1], wire=self.wire[:1], wire_in_max=self.wire_in_max[:1],
            wire_out_max=self.wire_out_max[:1], cut_err=self.cut_err[:1], cache={},
        )

    def measures(self) -> np.ndarray:
        """(K, S+1): cumulative per-segment weights the pruning and the bound count coverage in:
        segments, and each class's fp32 seconds (duplicates removed)."""
        if "measures" not in self.cache:
            n = self.n_segments
            self.cache["measures"] = np.unique(np.vstack([np.arange(n + 1, dtype=np.float64), self.prefix[:, 0, :]]),
                                               axis=0)
        return self.cache["measures"]

    def kind_index(self, cls: int, replicas: int) -> int:
        return self.kinds.index(Kind(cls, replicas))

    def quickest(self) -> np.ndarray:
        """(C,): per class, the fastest stage it can hold in any variant, shared by as many of its
        devices as a stage may have: a class slower than a bound on this has no use under it."""
        group = np.ones(len(self.classes))
        for k in self.kinds:
            group[k.cls] = max(group[k.cls], k.replicas)
        return self.stage_compute.min(axis=(1, 2, 3)) / group


def build_tables(problem: Problem, microbatch: int, max_replicas: int | None = None) -> Tables:
    """The arrays for one microbatch size. ``max_replicas`` caps the devices per stage (None: a
    whole class; 1: no replication)."""
    n = len(problem.model.segments)
    seconds, int8_seconds, unusable = {}, {}, {}
    for d in problem.devices:
        if d.type in seconds:
            continue
        try:
            seconds[d.type] = segment_seconds(problem, d.type, microbatch)
            int8_seconds[d.type] = int8_segment_seconds(problem, d.type, microbatch)
        except ProblemError as exc:
            seconds[d.type] = None
            reason = f"no compute figures for microbatch {microbatch}: {exc}"
            unusable.update({e.name: reason for e in problem.devices if e.type == d.type})
    usable = [d.name for d in problem.devices if seconds[d.type] is not None]
    classes = device_classes(problem, usable)
    c_count = len(classes)
    largest = max((len(c.members) for c in classes), default=1)
    most = largest if max_replicas is None else max(1, min(max_replicas, largest))
    # At most S stages, each on at most ``most`` devices: more devices of a class are never useful.
    counts = np.array([min(len(c.members), n * most) for c in classes], dtype=np.int64)
    kinds = tuple(Kind(c, r) for c in range(c_count) for r in range(1, min(most, int(counts[c])) + 1))

    budget = problem.max_error
    codecs = ["raw"]
    cut_err_rows = [np.zeros(n + 1)]
    for codec in CODECS[1:]:
        row = np.full(n + 1, np.inf)
        for j in range(1, n):
            entry = problem.model.segments[j - 1].codec(codec)
            if entry is not None and budget is not None:
                row[j] = error_units(entry.effect, budget)
        if np.isfinite(row).any():
            codecs.append(codec)
            cut_err_rows.append(row)
    int8_units = np.zeros(n)
    for s, seg in enumerate(problem.model.segments):
        if seg.int8 is not None:
            int8_units[s] = np.inf if budget is None else error_units(seg.int8.effect, budget)
    # Prefix sums of the finite units, and of how many segments are over the budget on their own
    # (inf - inf would be nan): a stage's int8 units are inf if it holds one of those.
    int8_err = np.concatenate([[0.0], np.cumsum(np.where(np.isfinite(int8_units), int8_units, 0.0))])
    int8_over = np.concatenate([[0], np.cumsum(~np.isfinite(int8_units))])
    int8_ok = budget is not None and any(s.int8 is not None for s in problem.model.segments) and any(
        int8_seconds.get(c.type) is not None for c in classes)
    variants = VARIANTS if int8_ok else VARIANTS[:1]

    cuts = cut_bytes(problem) * microbatch
    x_count = len(codecs)
    # An int8 stage quantizes the segments that have an int8 variant; the others run as they are.
    has_int8 = np.array([s.int8 is not None for s in problem.model.segments])
    prefix = np.full((c_count, len(variants), n + 1), np.inf)
    recv = np.zeros((c_count, x_count, n + 1))
    send_cpu = np.zeros((c_count, x_count, n + 1))
    for c, cls in enumerate(classes):
        prefix[c, 0, 0] = 0.0
        prefix[c, 0, 1:] = np.cumsum(seconds[cls.type])
        if len(variants) > 1 and int8_seconds[cls.type] is not None:
            prefix[c, 1, 0] = 0.0
            prefix[c, 1, 1:] = np.cumsum(np.where(has_int8, int8_seconds[cls.type], seconds[cls.type]))
        for x, codec in enumerate(codecs):
            for j in range(n + 1):
                recv[c, x, j], send_cpu[c, x, j] = comm_seconds(problem, cls.type, codec, float(cuts[j]))
    share = np.array([problem.device_type(c.type).comm_share for c in classes])
    cut_err = np.vstack(cut_err_rows)
    # A lossy codec cannot cross the client hops (positions 0 and S) nor a cut that does not offer it.
    send_cpu[:, 1:, :] = np.where(np.isfinite(cut_err[None, 1:, :]), send_cpu[:, 1:, :], np.inf)

    link = link_lookup(problem)
    wire = np.full((x_count, n + 1, c_count, c_count), np.inf)
    for x, codec in enumerate(codecs):
        if codec == "raw":
            size = cut_bytes(problem)
        else:
            size = np.array([np.nan, *(np.nan if (c := s.codec(codec)) is None else c.out_bytes
                                       for s in problem.model.segments)], dtype=np.float64)
        size = np.where(np.isfinite(cut_err[x]), size * microbatch, np.nan)
        for a, ca in enumerate(classes):
            for b, cb in enumerate(classes):
                if a == b and len(ca.members) < 2:
                    # Never used (a class of one cannot follow itself); the NIC rule keeps the column
                    # uniform so the programme can share work between senders.
                    bw, lat = ca.bandwidth_mbps, 0.0
                else:
                    bw, lat = link(ca.members[0], cb.members[1 if a == b else 0])
                times = lat + size[1:n] * 8.0 / (bw * 1e6)
                wire[x, 1:n, a, b] = np.where(np.isnan(times), np.inf, times)
    finite = np.where(np.isfinite(wire), wire, -np.inf)
    wire_in_max = np.moveaxis(finite.max(axis=2, initial=-np.inf), 2, 1)  # over senders a
    wire_out_max = np.moveaxis(finite.max(axis=3, initial=-np.inf), 2, 1)  # over receivers b
    client = problem.client_bandwidth_mbps
    nic = np.array([c.bandwidth_mbps for c in classes])
    if client is None:
        client_in, client_out = np.zeros(c_count), np.zeros(c_count)
    else:
        rate = np.minimum(client, nic)
        client_in = cuts[0] * 8.0 / (rate * 1e6)
        client_out = cuts[n] * 8.0 / (rate * 1e6)
    memory = np.stack([memory_matrix(problem, microbatch, int8=(v == "int8")) for v in variants])
    upper = np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None]
    capacity = np.array([c.memory_bytes for c in classes], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        comp = prefix[:, :, None, :] - prefix[:, :, :, None]
        ok = upper & (memory[None] <= capacity[:, None, None, None]) & np.isfinite(comp)
    stage_compute = np.where(ok, comp, np.inf)
    return Tables(
        problem=problem,
        microbatch=microbatch,
        classes=classes,
        counts=counts,
        kinds=kinds,
        codecs=tuple(codecs),
        variants=variants,
        prefix=prefix,
        stage_compute=stage_compute,
        memory=memory,
        capacity=capacity,
        recv=recv,
        send_cpu=send_cpu,
        share=share,
        wire=wire,
        wire_in_max=wire_in_max,
        wire_out_max=wire_out_max,
        client_in=client_in,
        client_out=client_out,
        cut_err=cut_err,
        int8_err=int8_err,
        int8_over=int8_over,
        budget=float(ERROR_UNITS) if budget is not None else 0.0,
        unusable=unusable,
        max_replicas=most,
    )


# --- views: the tables under a bound on every step ---------------------------------------------


@dataclass(frozen=True)
class View:
    """The tables with every step slower than ``bound`` removed.

    ``comp[g][v][i, d-1]`` = compute of segments [i, i+d) in variant v on one device of kind g's
    class, when that stage fits in memory and its compute alone, shared by the kind's replicas, is
    within the bound (``band`` adds the comm terms and applies the bound exactly); the band is as
    wide as the longest such stage.
    """

    tables: Tables
    bound: float
    # Dominance threshold: a group of r devices is dropped from a stage (and its hops) that r - 1 of
    # them would also run within theta. Exact as long as theta is at most the bottleneck of every
    # plan the pass considers: the bound itself in the bounded passes, a lower bound in the
    # bottleneck pass (docs/planner.md, "Replication").
    theta: float
    comp: tuple[tuple[np.ndarray, ...], ...]  # per kind, per variant: (S+1, w)
    # For pruning: measures[k] are cumulative per-segment weights (segment count, each class's fp32
    # seconds); capacity[c, k] is the most of measure k one device of class c can cover.
    measures: np.ndarray  # (K, S+1)
    capacity: np.ndarray  # (C, K)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def own(self, g: int, x: int, y: int, v: int) -> np.ndarray:
        """(S+1, w): the stage step of kind g on [i, i+d), input codec x, output codec y, variant v;
        inf where invalid or over the bound."""
        key = ("own", g, x, y, v)
        if key not in self.cache:
            t, kind = self.tables, self.tables.kinds[g]
            comp = self.comp[g][v]
            recv, send = self._comm(kind.cls, x, y, comp.shape[1])
            comm = recv + send  # inf where the output codec is not offered (and 0 * inf would be nan)
            busy = np.where(np.isfinite(comm), comp + t.share[kind.cls] * np.where(np.isfinite(comm), comm, 0.0),
                            np.inf)
            cycle = np.maximum(np.maximum(busy, recv), send)
            step = cycle / kind.replicas
            keep = step <= self.bound
            if kind.replicas > 1:
                keep &= ~self._fewer_suffice(kind, x, y, cycle)
            self.cache[key] = np.where(keep, step, np.inf)
        return self.cache[key]

    def _fewer_suffice(self, kind: Kind, x: int, y: int, cycle: np.ndarray) -> np.ndarray:
        """(S+1, w): cells where r - 1 devices would run the stage and both its hops within theta
        (whoever the neighbours are), so a plan with r there is never better than one with r - 1."""
        t, fewer = self.tables, kind.replicas - 1
        start, end = _band_positions(t.n_segments, cycle.shape[1])
        hop_in = np.where(start > 0, t.wire_in_max[x, kind.cls][start], 0.0)
        hop_out = np.where(end < t.n_segments, t.wire_out_max[y, kind.cls][end], 0.0)
        return (cycle / fewer <= self.theta) & (hop_in / fewer <= self.theta) & (hop_out / fewer <= self.theta)

    def valid(self, g: int, x: int, y: int, v: int) -> np.ndarray:
        """(S+1, w) bool: where ``own`` is finite."""
        key = ("valid", g, x, y, v)
        if key not in self.cache:
            self.cache[key] = np.isfinite(self.own(g, x, y, v))
        return self.cache[key]

    def lat_out(self, g: int, y: int, v: int) -> np.ndarray:
        """(S+1, w): compute + send CPU of the stage (its latency share without the receive, which
        depends only on where the stage starts and is added to the entry instead); not masked."""
        key = ("lat_out", g, y, v)
        if key not in self.cache:
            kind = self.tables.kinds[g]
            comp = self.comp[g][v]
            _, send = self._comm(kind.cls, 0, y, comp.shape[1])
            self.cache[key] = comp + send
        return self.cache[key]

    def err_units(self, g: int, y: int, v: int) -> np.ndarray:
        """(S+1, w): error units of the stage (its int8 weights, its output codec); not masked by
        ``own`` (inf where over the budget)."""
        key = ("err_units", g, y, v)
        if key not in self.cache:
            t = self.tables
            width = self.comp[g][v].shape[1]
            start, end = _band_positions(t.n_segments, width)
            units = t.cut_err[y][end]
            if t.variants[v] == "int8":
                over = t.int8_over[end] > t.int8_over[start]
                units = np.where(over, np.inf, units + (t.int8_err[end] - t.int8_err[start]))
            self.cache[key] = np.where(units <= t.budget, units, np.inf)
        return self.cache[key]

    def lat(self, g: int, x: int, y: int, v: int) -> np.ndarray:
        """(S+1, w): compute + recv + send of the stage (its share of one microbatch's latency);
        inf where ``own`` is."""
        key = ("lat", g, x, y, v)
        if key not in self.cache:
            kind = self.tables.kinds[g]
            comp = self.comp[g][v]
            recv, send = self._comm(kind.cls, x, y, comp.shape[1])
            own = self.own(g, x, y, v)
            self.cache[key] = np.where(np.isfinite(own), comp + recv + send, np.inf)
        return self.cache[key]

    def err(self, g: int, x: int, y: int, v: int) -> np.ndarray:
        """(S+1, w): error units of the stage (its int8 weights, its output codec); inf where
        ``own`` is."""
        key = ("err", g, x, y, v)
        if key not in self.cache:
            self.cache[key] = np.where(self.valid(g, x, y, v), self.err_units(g, y, v), np.inf)
        return self.cache[key]

    def hop(self, x: int, ga: int, gb: int) -> np.ndarray:
        """(S+1,): the hop step from kind ga to kind gb at each cut in codec x; inf over the bound."""
        key = ("hop", x, ga, gb)
        if key not in self.cache:
            t = self.tables
            ka, kb = t.kinds[ga], t.kinds[gb]
            step = t.wire[x, :, ka.cls, kb.cls] / min(ka.replicas, kb.replicas)
            self.cache[key] = np.where(step <= self.bound, step, np.inf)
        return self.cache[key]

    def hop_lat(self, x: int, ga: int, gb: int) -> np.ndarray:
        """(S+1,): one microbatch's wire time on that hop (not shared out); inf where ``hop`` is."""
        t = self.tables
        ka, kb = t.kinds[ga], t.kinds[gb]
        return np.where(np.isfinite(self.hop(x, ga, gb)), t.wire[x, :, ka.cls, kb.cls], np.inf)

    def client_in(self, g: int) -> float:
        v = float(self.tables.client_in[self.tables.kinds[g].cls])
        return v if v <= self.bound else np.inf

    def client_out(self, g: int) -> float:
        v = float(self.tables.client_out[self.tables.kinds[g].cls])
        return v if v <= self.bound else np.inf

    def _comm(self, c: int, x: int, y: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tables
        start, end = _band_positions(t.n_segments, width)
        return t.recv[c, x][start], t.send_cpu[c, y][end]


def _band_positions(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(S+1, w) start and (clipped) end positions of the band cells [i, i+d)."""
    start = np.broadcast_to(np.arange(n + 1)[:, None], (n + 1, width))
    end = np.minimum(start + np.arange(1, width + 1)[None, :], n)
    return start, end


@dataclass(frozen=True)
class Reach:
    """Every stage one device of a class can hold in one variant, sorted by compute: what fits
    under any compute limit is a prefix of it, so views at many bounds cost a binary search."""

    comps: np.ndarray  # sorted compute of every stage [i, j) that fits
    width: np.ndarray  # running max of j - i along that order
    spans: np.ndarray  # (K, len): running max of the stage's span in each measure


def reach(t: Tables, c: int, v: int) -> Reach:
    key = ("reach", c, v)
    if key not in t.cache:
        comp = t.stage_compute[c, v]
        ii, jj = np.nonzero(np.isfinite(comp))
        order = np.argsort(comp[ii, jj], kind="stable")
        ii, jj = ii[order], jj[order]
        measures = t.measures()
        if len(ii):
            width = np.maximum.accumulate(jj - ii)
            spans = np.maximum.accumulate(measures[:, jj] - measures[:, ii], axis=1)
        else:
            width, spans = np.zeros(0, dtype=np.int64), np.zeros((len(measures), 0))
        t.cache[key] = Reach(comp[ii, jj], width, spans)
    return t.cache[key]


def make_view(t: Tables, bound: float, only: Sequence[int] | None = None, theta: float | None = None) -> View:
    """The view at ``bound``; ``only``: build the bands of these kinds only (others stay empty);
    ``theta``: the dominance threshold (default: the bound)."""
    n = t.n_segments
    measures = t.measures()
    capacity = np.zeros((len(t.classes), len(measures)))
    start = np.arange(n + 1)[:, None]
    comp_bands = []
    for g, kind in enumerate(t.kinds):
        if only is not None and g not in only:
            comp_bands.append(tuple(np.zeros((n + 1, 0)) for _ in t.variants))
            continue
        limit = bound * kind.replicas
        per_variant = []
        for v in range(len(t.variants)):
            r = reach(t, kind.cls, v)
            k = int(np.searchsorted(r.comps, limit, side="right"))
            width = int(r.width[k - 1]) if k else 0
            end = start + np.arange(1, width + 1)[None, :]
            comp = t.stage_compute[kind.cls, v][start, np.minimum(end, n)]
            per_variant.append(np.where((end <= n) & (comp <= limit), comp, np.inf))
            if k:
                # A device in a group of r covers 1/r of the group's stage, in every measure.
                capacity[kind.cls] = np.maximum(capacity[kind.cls], r.spans[:, k - 1] / kind.replicas)
        comp_bands.append(tuple(per_variant))
    return View(t, bound, bound if theta is None else min(theta, bound), tuple(comp_bands), measures, capacity)


def focus(t: Tables, bound: float, theta: float | None = None) -> tuple[Tables, View]:
    """The tables and view for a pass at ``bound``, without what cannot take part: classes with no
    stage within the bound even shared by all their devices, and kinds (replica groups) that have
    no stage left once the bound and the dominance threshold are applied."""
    usable = t.quickest() <= bound
    counts = np.where(usable, t.counts, 0)
    t = replace(t, counts=counts, kinds=tuple(k for k in t.kinds if k.replicas <= counts[k.cls]))
    view = make_view(t, bound, theta=theta)
    active = [g for g in range(len(t.kinds))
              if any(np.isfinite(view.own(g, x, y, v)).any() for x in range(len(t.codecs))
                     for y in range(len(t.codecs)) for v in range(len(t.variants)))]
    if len(active) == len(t.kinds):
        return t, view
    focused = replace(t, kinds=tuple(t.kinds[g] for g in active))
    return focused, View(focused, view.bound, view.theta, tuple(view.comp[g] for g in active), view.measures,
                         view.capacity)


def window(entry: np.ndarray) -> tuple[int, int]:
    """(lo, hi): the positions where some row of ``entry`` is finite lie in [lo, hi] (lo > hi: none).
    Layers reach only a window of positions, so each advance works on that window."""
    finite = np.flatnonzero(np.isfinite(entry).any(axis=0))
    return (int(finite[0]), int(finite[-1])) if len(finite) else (0, -1)


def _gather(entry_lo: int, entry_hi: int, n: int, band: np.ndarray, lengths: np.ndarray | None
            ) -> tuple[int, np.ndarray, np.ndarray] | None:
    """For one advance: the first output position k0, the start position j = k - d of every output
    k >= k0 and length d (K, D), and the band cell of each (K, D; inf where j is outside the
    entry's window or the stage would end past S)."""
    ds = np.arange(1, band.shape[1] + 1) if lengths is None else np.asarray(lengths)
    ds = ds[ds <= n - 1 - entry_lo]
    if not len(ds) or entry_hi < entry_lo:
        return None
    k0, k1 = entry_lo + int(ds[0]), min(entry_hi + int(ds[-1]), n - 1)
    ks = np.arange(k0, k1 + 1)
    js = ks[:, None] - ds[None, :]
    inside = (js >= entry_lo) & (js <= entry_hi)
    js = np.where(inside, js, entry_lo)
    cells = np.where(inside, band[js, ds[None, :] - 1], np.inf)
    return k0, js, cells


def advance(entry: np.ndarray, band: np.ndarray, op: Op, lengths: np.ndarray | None = None,
            span: tuple[int, int] | None = None) -> np.ndarray:
    """out[m, k] = min over d of op(entry[m, k-d], band[k-d, d-1]): one more stage.

    ``entry[m, j]`` is the value of a partial plan whose next stage starts at position j. ``span``
    (the entry's ``window``) and ``lengths`` (the d worth trying) only save work. All lengths are
    done at once: the entry is gathered at every (k, d) and reduced over d.
    """
    n = entry.shape[1]
    out = np.full(entry.shape, np.inf)
    lo, hi = window(entry) if span is None else span
    found = _gather(lo, hi, n, band, lengths)
    if found is None:
        return out
    k0, js, cells = found
    out[:, k0: k0 + len(js)] = op(entry[:, js], cells[None]).min(axis=2)
    return out


def advance_lex(entry: tuple[np.ndarray, np.ndarray], band: tuple[np.ndarray, np.ndarray],
                lengths: np.ndarray | None = None, span: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """``advance`` for (error, latency) pairs, both added, compared error first. Errors are whole
    units in float64, so their sums and comparisons are exact."""
    e_in, l_in = entry
    n = e_in.shape[1]
    e_out, l_out = np.full(e_in.shape, np.inf), np.full(e_in.shape, np.inf)
    lo, hi = window(e_in) if span is None else span
    found = _gather(lo, hi, n, band[0], lengths)
    if found is None:
        return e_out, l_out
    k0, js, e_cells = found
    _, _, l_cells = _gather(lo, hi, n, band[1], lengths)
    e = e_in[:, js] + e_cells[None]
    lat = l_in[:, js] + l_cells[None]
    least = e.min(axis=2)
    lat = np.where(e == least[:, :, None], lat, np.inf).min(axis=2)
    e_out[:, k0: k0 + len(js)] = least
    l_out[:, k0: k0 + len(js)] = np.where(np.isfinite(least), lat, np.inf)
    return e_out, l_out


def lex_min(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise lexicographic minimum of two (error, latency) pairs of arrays."""
    better = (b[0] < a[0]) | ((b[0] == a[0]) & (b[1] < a[1]))
    return np.where(better, b[0], a[0]), np.where(better, b[1], a[1])


# --- the plain projection, for the class-order heuristic ----------------------------------------


@dataclass(frozen=True)
class PlainView:
    """The view restricted to one device per stage, raw hops and fp32 weights: what the class-order
    heuristic searches (any plan it finds is feasible, so it bounds the optimum from above)."""

    bound: float
    bands: tuple[np.ndarray, ...]  # per class: (S+1, w) stage step
    lat: tuple[np.ndarray, ...]  # per class: (S+1, w) the stage's latency share
    send: np.ndarray  # (S+1, C, C)
    client_in: np.ndarray
    client_out: np.ndarray


def plain_view(t: Tables, bound: float) -> PlainView:
    singles = [t.kind_index(c, 1) for c in range(len(t.classes))]
    view = make_view(t, bound, only=singles)
    send = np.where(t.wire[0] <= bound, t.wire[0], np.inf)
    mask = lambda x: np.where(x <= bound, x, np.inf)  # noqa: E731
    return PlainView(bound, tuple(view.own(g, 0, 0, 0) for g in singles), tuple(view.lat(g, 0, 0, 0) for g in singles),
                     send, mask(t.client_in), mask(t.client_out))
