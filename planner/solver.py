"""The solver: which devices, in which order, run which segments.

Objective, in this order: the smallest bottleneck (slowest stage, so the highest throughput); then
the lowest latency among plans whose every stage is within that bottleneck; then fewest devices.

Devices that are interchangeable for the cost model (same type, memory, NIC, and the same links
to every other device) form a class. The exact solver is a dynamic programme over
(segments placed, multiset of classes used, class of the last device), in layers of devices used,
vectorised over the multisets of a layer and over segment positions. It runs twice: once for the
bottleneck T*, once for the latency with every stage capped at T*. Its size is
prod(count_c + 1) * classes states. Above ``max_exact_states`` the solver uses a heuristic: the
same programme restricted to fixed sequences of class blocks, then the full programme with each
layer cut to its most promising rows (a beam), binary-searched over the bottleneck; it reports
its gap to a lower bound. See docs/planner.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from .cost import make_plan
from .heuristic import class_orders, relaxed_bound
from .lattice import beam_search, lattice_states, solve_exact
from .plan import Plan
from .problem import Problem, ProblemError, profiled_microbatches
from .tables import TOL, Tables, build_tables, make_view
from .units import format_bytes, format_seconds

DEFAULT_MAX_EXACT_STATES = 350_000
BEAM_WIDTH = 256  # rows kept per layer by the heuristic's beam search


class InfeasibleError(ValueError):
    """No plan runs the model on these devices (memory, or missing compute figures)."""


def solve(
    problem: Problem,
    *,
    method: str = "auto",
    max_exact_states: int = DEFAULT_MAX_EXACT_STATES,
) -> Plan:
    """The best plan for ``problem`` under the cost model (see the module docstring).

    ``method``: "exact" always runs the exact programme, "heuristic" never does, "auto" runs it
    when its state count is at most ``max_exact_states``. With ``problem.microbatch`` None every
    profiled size is tried and the one with the highest throughput wins.
    Raises InfeasibleError when no plan fits, ProblemError when microbatch is null and nothing
    is profiled to choose from.
    """
    if method not in ("auto", "exact", "heuristic"):
        raise ValueError(f"method must be 'auto', 'exact' or 'heuristic', got {method!r}")
    started = time.perf_counter()
    if problem.microbatch is not None:
        sizes: tuple[int, ...] = (problem.microbatch,)
    else:
        sizes = profiled_microbatches(problem)
        if not sizes:
            raise ProblemError("microbatch: null, but no size is profiled for every device type; give one")
    plans, errors = [], []
    for mb in sizes:
        try:
            plans.append(_solve_at(problem, mb, method, max_exact_states))
        except InfeasibleError as exc:
            errors.append(exc)
    if not plans:
        if len(errors) == 1:
            raise errors[0]
        why = "; ".join(f"{mb}: {e}" for mb, e in zip(sizes, errors, strict=True))
        raise InfeasibleError(f"no microbatch size gives a plan: {why}")
    best = plans[0]
    for plan in plans[1:]:
        if _better_plan(plan, best):
            best = plan
    return replace(best, solve_time_s=time.perf_counter() - started)


def _better_plan(a: Plan, b: Plan) -> bool:
    """Throughput first, then latency, then fewer devices (ties within TOL)."""
    if a.throughput > b.throughput * (1 + TOL):
        return True
    if b.throughput > a.throughput * (1 + TOL):
        return False
    if a.latency_s < b.latency_s * (1 - TOL):
        return True
    if b.latency_s < a.latency_s * (1 - TOL):
        return False
    return len(a.stages) < len(b.stages)


def _solve_at(problem: Problem, microbatch: int, method: str, max_exact_states: int) -> Plan:
    started = time.perf_counter()
    t = build_tables(problem, microbatch)
    if not t.classes:
        raise InfeasibleError(_why_infeasible(t))
    quick = class_orders(t, budget=6)
    upper = quick[0] if quick else math.inf
    pruned = _without_slow_classes(t, upper)
    exact = method == "exact" or (method == "auto" and lattice_states(pruned.counts) <= max_exact_states)
    if exact:
        if lattice_states(pruned.counts) > 100_000:
            # A tighter incumbent prunes a large programme harder; a narrow beam finds one cheaply.
            narrow = beam_search(t, upper, relaxed_bound(t), 32)
            upper = narrow[0] if narrow else upper
            pruned = _without_slow_classes(t, upper)
        found = solve_exact(pruned, upper)
        if found is None:
            raise InfeasibleError(_why_infeasible(t))
        bottleneck, stages = found
        lower, optimal, solver = bottleneck, True, "exact-dp"
    else:
        lower = relaxed_bound(t)
        found = class_orders(t, budget=300)
        # A row holds every class's values, so a layer costs ~ classes² x width: narrow the beam
        # for many classes (devices made distinct by their links) to keep the solve in seconds.
        width = min(BEAM_WIDTH, max(16, int(BEAM_WIDTH * (8 / len(t.classes)) ** 2)))
        refined = beam_search(t, found[0] if found else math.inf, lower, width)
        if refined is not None and (found is None or refined[0] < found[0] * (1 - TOL)):
            found = refined
        if found is None:
            if math.isinf(lower):
                raise InfeasibleError(_why_infeasible(t))
            raise InfeasibleError(
                f"the heuristic found no plan and the problem is too large for the exact solver "
                f"({lattice_states(t.counts)} states > {max_exact_states}); try method='exact'"
            )
        bottleneck, stages = found
        optimal, solver = bottleneck <= lower * (1 + TOL), "heuristic"
    placements = _assign(t, stages)
    used = {name for name, _, _ in placements}
    return make_plan(
        problem, microbatch, placements, solver=solver, optimal=optimal, lower_bound_s=lower,
        solve_time_s=time.perf_counter() - started, left_out=_left_out(t, used, bottleneck, exact),
    )


def _without_slow_classes(t: Tables, upper: float) -> Tables:
    """Classes with no stage within a known plan's bottleneck can never be in a better plan."""
    usable = np.array([band.shape[1] > 0 for band in make_view(t, upper).bands])
    return replace(t, counts=np.where(usable, t.counts, 0))


def _assign(t: Tables, stages: list[tuple[int, int, int]]) -> list[tuple[str, int, int]]:
    """Class stages -> device stages; a class's devices are taken in the order they were listed."""
    taken = [0] * len(t.classes)
    out = []
    for c, first, end in stages:
        out.append((t.classes[c].members[taken[c]], first, end))
        taken[c] += 1
    return out


def _left_out(t: Tables, used: set[str], bottleneck: float, exact: bool) -> dict[str, str]:
    reasons = dict(t.unusable)
    for c, cls in enumerate(t.classes):
        fits = t.fits(c)
        for name in cls.members:
            if name in used:
                continue
            if not fits.any():
                need = t.memory[np.isfinite(t.memory)].min()
                reasons[name] = (f"too little memory: the smallest stage needs {format_bytes(need)}, "
                                 f"it has {format_bytes(t.capacity[c])}")
                continue
            quickest = float(t.compute(c)[fits].min())
            if quickest > bottleneck * (1 + TOL):
                reasons[name] = (f"too slow: its quickest stage takes {format_seconds(quickest)}, "
                                 f"above the bottleneck {format_seconds(bottleneck)}")
            elif exact:
                reasons[name] = "not needed: plans that use it are no faster, and none has lower latency"
            else:
                reasons[name] = "not used by the heuristic plan"
    return {d.name: reasons[d.name] for d in t.problem.devices if d.name in reasons}


def _why_infeasible(t: Tables) -> str:
    if not t.classes:
        first = next(iter(t.unusable.values()), "no devices")
        return f"no device can be used: {first}"
    segs = t.problem.model.segments
    largest = float(t.capacity.max())
    n = len(segs)
    for s in range(n):
        need = float(t.memory[: s + 1, s + 1:].min())
        if need > largest:
            return (f"segment {segs[s].name!r} needs at least {format_bytes(need)} in any stage, more than "
                    f"the largest device memory ({format_bytes(largest)})")
    return ("the devices' memory cannot hold the model: no arrangement of them fits every stage "
            f"(total memory {format_bytes(float(t.capacity @ t.counts))}, "
            f"weights {format_bytes(sum(s.weight_bytes for s in segs))})")


def lower_bound(problem: Problem, microbatch: int | None = None) -> float:
    """A bound below which no plan's bottleneck can go (seconds per microbatch)."""
    mb = microbatch or problem.microbatch
    if mb is None:
        raise ValueError("give a microbatch size")
    return relaxed_bound(build_tables(problem, mb))
