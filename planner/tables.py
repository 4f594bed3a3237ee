"""The cost model as arrays, for the solvers: device classes, per-class compute prefix sums,
stage memory, send times between classes, and the same with every step over a bound removed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .cost import cut_bytes, link_lookup, memory_matrix
from .problem import Problem, ProblemError, segment_seconds

TOL = 1e-9  # relative slack when comparing times: plans within it count as ties
Op = Callable[[np.ndarray, np.ndarray], np.ndarray]  # np.maximum (bottleneck) or np.add (latency)


@dataclass(frozen=True)
class DeviceClass:
    """Devices the cost model cannot tell apart; ``members`` in the order they were listed."""

    type: str
    memory_bytes: int
    bandwidth_mbps: float
    members: tuple[str, ...]


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
    """The cost model as arrays over classes and positions 0..S (a position is a cut)."""

    problem: Problem
    microbatch: int
    classes: tuple[DeviceClass, ...]
    counts: np.ndarray  # (C,) devices per class that can be used (at most S)
    prefix: np.ndarray  # (C, S+1) cumulative compute seconds
    memory: np.ndarray  # (S+1, S+1) stage memory of [i, j), inf unless i < j
    capacity: np.ndarray  # (C,)
    send: np.ndarray  # (S+1, C, C) seconds to send the cut at j from class a to class b; inf at 0 and S
    client_in: np.ndarray  # (C,)
    client_out: np.ndarray  # (C,)
    unusable: dict[str, str]  # devices with no compute figures at this microbatch -> why

    @property
    def n_segments(self) -> int:
        return self.prefix.shape[1] - 1

    def compute(self, c: int) -> np.ndarray:
        """(S+1, S+1): seconds of segments [i, j) on class c (meaningful for i < j)."""
        return self.prefix[c][None, :] - self.prefix[c][:, None]

    def fits(self, c: int) -> np.ndarray:
        return self.memory <= self.capacity[c]


def build_tables(problem: Problem, microbatch: int) -> Tables:
    n = len(problem.model.segments)
    seconds, unusable = {}, {}
    for d in problem.devices:
        if d.type in seconds:
            continue
        try:
            seconds[d.type] = segment_seconds(problem, d.type, microbatch)
        except ProblemError as exc:
            seconds[d.type] = None
            reason = f"no compute figures for microbatch {microbatch}: {exc}"
            unusable.update({e.name: reason for e in problem.devices if e.type == d.type})
    usable = [d.name for d in problem.devices if seconds[d.type] is not None]
    classes = device_classes(problem, usable)
    c_count = len(classes)
    cuts = cut_bytes(problem) * microbatch
    link = link_lookup(problem)
    send = np.full((n + 1, c_count, c_count), np.inf)
    for a, ca in enumerate(classes):
        for b, cb in enumerate(classes):
            if a == b and len(ca.members) < 2:
                # Never used (a class of one cannot follow itself); the NIC rule keeps the column
                # uniform so the programme can share work between senders.
                bw, lat = ca.bandwidth_mbps, 0.0
            else:
                bw, lat = link(ca.members[0], cb.members[1 if a == b else 0])
            send[1:n, a, b] = lat + cuts[1:n] * 8.0 / (bw * 1e6)
    client = problem.client_bandwidth_mbps
    nic = np.array([c.bandwidth_mbps for c in classes])
    if client is None:
        client_in, client_out = np.zeros(c_count), np.zeros(c_count)
    else:
        rate = np.minimum(client, nic)
        client_in = cuts[0] * 8.0 / (rate * 1e6)
        client_out = cuts[n] * 8.0 / (rate * 1e6)
    prefix = np.zeros((c_count, n + 1))
    for c, cls in enumerate(classes):
        prefix[c, 1:] = np.cumsum(seconds[cls.type])
    return Tables(
        problem=problem,
        microbatch=microbatch,
        classes=classes,
        counts=np.array([min(len(c.members), n) for c in classes], dtype=np.int64),
        prefix=prefix,
        memory=memory_matrix(problem, microbatch),
        capacity=np.array([c.memory_bytes for c in classes], dtype=np.float64),
        send=send,
        client_in=client_in,
        client_out=client_out,
        unusable=unusable,
    )


@dataclass(frozen=True)
class View:
    """The tables with every step slower than ``bound`` removed (set to inf).

    bands[c][i, d-1] = compute of segments [i, i+d) on class c when that stage fits in memory and
    takes at most ``bound``; the band is as wide as the longest such stage.
    """

    bound: float
    bands: tuple[np.ndarray, ...]
    send: np.ndarray
    client_in: np.ndarray
    client_out: np.ndarray
    # For pruning: measures[k] are cumulative per-segment weights (segment count, each class's
    # seconds); capacity[c, k] is the most of measure k one device of class c can cover in a stage.
    measures: np.ndarray  # (K, S+1)
    capacity: np.ndarray  # (C, K)


def make_view(t: Tables, bound: float) -> View:
    n = t.n_segments
    bands = []
    for c in range(len(t.classes)):
        comp = t.compute(c)
        valid = t.fits(c) & (comp <= bound)
        ii, jj = np.nonzero(valid)
        width = int((jj - ii).max()) if len(ii) else 0
        start = np.arange(n + 1)[:, None]
        end = start + np.arange(1, width + 1)[None, :]
        inside = end <= n
        end = np.minimum(end, n)
        bands.append(np.where(inside & valid[start, end], comp[start, end], np.inf))
    measures = np.unique(np.vstack([np.arange(n + 1, dtype=np.float64), t.prefix]), axis=0)  # one per type
    capacity = np.zeros((len(t.classes), len(measures)))
    for c, band in enumerate(bands):
        ii, dd = np.nonzero(np.isfinite(band))
        if len(ii):
            capacity[c] = (measures[:, ii + dd + 1] - measures[:, ii]).max(axis=1)
    mask = lambda x: np.where(x <= bound, x, np.inf)  # noqa: E731
    return View(bound, tuple(bands), mask(t.send), mask(t.client_in), mask(t.client_out), measures, capacity)


def advance(entry: np.ndarray, band: np.ndarray, op: Op) -> np.ndarray:
    """out[m, k] = min over d of op(entry[m, k-d], band[k-d, d-1]): one more stage on a class.

    ``entry[m, j]`` is the value of a partial plan whose next stage starts at position j.
    """
    n = entry.shape[1]
    out = np.full(entry.shape, np.inf)
    for d in range(1, band.shape[1] + 1):
        np.minimum(out[:, d:], op(entry[:, : n - d], band[: n - d, d - 1]), out=out[:, d:])
    return out
