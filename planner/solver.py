"""The solver: which devices, in which order and groups, run which segments, how each hop travels
and which stages use int8 weights.

Objective, in this order (docs/planner.md, "The objective"):
1. the highest throughput within the error budget, up to ``throughput_slack`` (plans within that
   fraction of the best count as equally fast);
2. the least error (lossy choices are made only where they buy throughput);
3. the lowest latency;
4. the fewest devices.

Devices that are interchangeable for the cost model form a class; a stage runs on a *kind*, r
devices of one class sharing its microbatches. The exact solver is a dynamic programme over
(segments placed, multiset of classes used, kind and output codec of the last stage), in layers
of devices used (lattice.py). It runs: once for the smallest bottleneck with every lossy option
allowed on its own; when the budget is in play, the least-error programme decides whether that
bottleneck is reachable within the budget, else a binary search over the step times finds the
smallest one that is; then once for (error, latency) at that bottleneck. Above
``max_exact_states`` the solver uses a heuristic and reports its gap to a lower bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .cost import Placement, make_plan
from .heuristic import class_orders, relaxed_bound
from .lattice import (
    MAX,
    StageChoice,
    best_plan,
    lattice_states,
    min_bottleneck,
    min_error,
    run_lattice,
    step_values,
    trace,
)
from .plan import Plan
from .problem import Problem, ProblemError, profiled_microbatches
from .tables import TOL, Kind, Tables, build_tables, make_view
from .units import format_bytes, format_seconds

DEFAULT_MAX_EXACT_STATES = 350_000
DEFAULT_THROUGHPUT_SLACK = 0.01
BEAM_WIDTH = 256  # rows kept per layer by the heuristic's beam search
GUESS_ABOVE_BOUND = 1.02  # the first bottleneck programme runs under the lower bound times this


class InfeasibleError(ValueError):
    """No plan runs the model on these devices (memory, missing compute figures, the budget)."""


@dataclass(frozen=True)
class _Fastest:
    """Step 1 at one microbatch size: the smallest bottleneck within the budget."""

    tables: Tables  # all classes (each pass drops the classes too slow for its own bound)
    bottleneck: float
    lower_bound: float
    exact: bool
    plain: tuple[float, list] | None  # the class-order heuristic's plain plan (a fallback)
    width: int | None  # the beam width, when the heuristic ran


def solve(
    problem: Problem,
    *,
    method: str = "auto",
    max_exact_states: int = DEFAULT_MAX_EXACT_STATES,
    max_replicas: int | None = None,
    throughput_slack: float = DEFAULT_THROUGHPUT_SLACK,
) -> Plan:
    """The best plan for ``problem`` under the cost model (see the module docstring).

    ``method``: "exact" always runs the exact programme, "heuristic" never does, "auto" runs it
    when its state count is at most ``max_exact_states``. ``max_replicas`` caps the devices per
    stage (None: as many as a class has; 1: no replication). With ``problem.microbatch`` None every
    profiled size is tried. Raises InfeasibleError when no plan fits, ProblemError when microbatch
    is null and nothing is profiled to choose from.
    """
    if method not in ("auto", "exact", "heuristic"):
        raise ValueError(f"method must be 'auto', 'exact' or 'heuristic', got {method!r}")
    if not (throughput_slack >= 0 and math.isfinite(throughput_slack)):
        raise ValueError(f"throughput_slack must be a number >= 0, got {throughput_slack!r}")
    if max_replicas is not None and max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas!r}")
    started = time.perf_counter()
    if problem.microbatch is not None:
        sizes: tuple[int, ...] = (problem.microbatch,)
    else:
        sizes = profiled_microbatches(problem)
        if not sizes:
            raise ProblemError("microbatch: null, but no size is profiled for every device type; give one")
    fastest, errors = {}, []
    for mb in sizes:
        try:
            fastest[mb] = _fastest(problem, mb, method, max_exact_states, max_replicas)
        except InfeasibleError as exc:
            errors.append((mb, exc))
    if not fastest:
        if len(errors) == 1:
            raise errors[0][1]
        why = "; ".join(f"{mb}: {e}" for mb, e in errors)
        raise InfeasibleError(f"no microbatch size gives a plan: {why}")
    # The best throughput over all sizes; each size then gets the bound that keeps its plans
    # within the slack of it (sizes that cannot get there drop out).
    rate = max(_rate(mb, f.bottleneck) for mb, f in fastest.items())
    plans = []
    for mb, f in fastest.items():
        bound = mb * (1 + throughput_slack) / rate if math.isfinite(rate) else f.bottleneck
        if math.isinf(rate) and f.bottleneck > 0:
            continue
        if bound < f.bottleneck * (1 - TOL):
            continue
        plans.append(_finish(problem, mb, f, max(bound, f.bottleneck), throughput_slack))
    return replace(_pick(plans), solve_time_s=time.perf_counter() - started)


def _pick(plans: list[tuple[tuple, Plan]]) -> Plan:
    """Across microbatch sizes: the least error, then latency (ties within TOL), then fewest devices."""
    least = min(key[0] for key, _ in plans)
    plans = [(key, plan) for key, plan in plans if key[0] == least]
    lowest = min(key[1] for key, _ in plans)
    ties = [(key, plan) for key, plan in plans if key[1] <= lowest * (1 + TOL)]
    return min(ties, key=lambda kp: (kp[0][2], kp[0][1]))[1]


def _rate(mb: int, bottleneck: float) -> float:
    return mb / bottleneck if bottleneck > 0 else math.inf


def _fastest(problem: Problem, microbatch: int, method: str, max_exact_states: int,
             max_replicas: int | None) -> _Fastest:
    t = build_tables(problem, microbatch, max_replicas)
    if not t.classes:
        raise InfeasibleError(_why_infeasible(t))
    lower = relaxed_bound(t)
    if not t.lossy and method != "heuristic" and math.isfinite(lower):
        # The relaxed bound is usually within a few per cent of the optimum: the programme under a
        # bound just above it has narrow bands and needs no heuristic's plan to prune with. It is
        # exact whenever it finds a plan (nothing faster can exist below the bound).
        guess = lower * GUESS_ABOVE_BOUND
        if method == "exact" or lattice_states(_pruned(t, guess)) <= max_exact_states:
            found = min_bottleneck(t, guess, lower=lower)
            if math.isfinite(found):
                return _Fastest(t, found, found, True, None, None)
    # A plain plan (one device per stage, raw, fp32) is within any budget: an upper bound for
    # every step below, and the classes that have no stage within it can be dropped.
    quick = class_orders(t, budget=6)
    upper = quick[0] if quick else math.inf
    exact = method == "exact" or (method == "auto" and lattice_states(_pruned(t, upper)) <= max_exact_states)
    if exact:
        incumbent = upper
        if lattice_states(_pruned(t, upper)) > 100_000:
            # A tighter incumbent prunes a large programme harder; a narrow beam finds one cheaply
            # (with every lossy option allowed on its own: it bounds the relaxed programme only).
            incumbent = min(upper, _beam_search(t, upper, lower, 32, budgeted=False))
        if incumbent <= lower * (1 + TOL):
            relaxed = incumbent  # the bound proves the heuristic's plan optimal
        else:
            relaxed = min(incumbent, min_bottleneck(t, incumbent, lower=lower))
        if not math.isfinite(relaxed):
            raise InfeasibleError(_why_infeasible(t))
        bottleneck = _within_budget(t, relaxed, upper)
        return _Fastest(t, bottleneck, bottleneck, True, quick, None)
    lower = relaxed_bound(t)
    found = class_orders(t, budget=300)
    upper = found[0] if found else math.inf
    # A row holds every kind's values, so a layer costs ~ kinds² x width: narrow the beam for many
    # kinds (devices made distinct by their links, replica groups) to keep the solve in seconds.
    width = min(BEAM_WIDTH, max(16, int(BEAM_WIDTH * (8 / len(t.kinds)) ** 2)))
    bottleneck = min(upper, _beam_search(t, upper, lower, width, budgeted=True))
    if not math.isfinite(bottleneck):
        if math.isinf(lower):
            raise InfeasibleError(_why_infeasible(t))
        raise InfeasibleError(
            f"the heuristic found no plan and the problem is too large for the exact solver "
            f"({lattice_states(t)} states > {max_exact_states}); try method='exact'"
        )
    return _Fastest(t, bottleneck, lower, False, found, width)


def _within_budget(t: Tables, relaxed: float, upper: float) -> float:
    """The smallest bottleneck of a plan within the error budget, given the smallest with every
    lossy option allowed on its own (``relaxed``) and a plain plan's (``upper``, inf if none).

    The least error of plans within a bound only falls as the bound grows, and changes only at
    step times; a lossless plan is within any budget. So the answer is the first step time in
    [relaxed, lossless optimum] whose least error fits the budget: a binary search over that
    bracket (a probe that fits stops at its first plan within the budget).
    """
    if not t.lossy or _min_error(t, relaxed) <= t.budget:
        return relaxed
    top = min(upper, min_bottleneck(t.lossless(), upper, lower=relaxed)) if math.isfinite(upper) else math.inf
    values = step_values(t, relaxed, top)
    lo, hi = 0, len(values) - 1  # values[lo] is known not to fit; values[hi] fits (checked below if unsure)
    if not math.isfinite(top) and _min_error(t, float(values[hi])) > t.budget:
        budget = t.problem.max_error
        raise InfeasibleError(f"no plan fits within the error budget ({budget.describe() if budget else 'none'})")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _min_error(t, float(values[mid])) <= t.budget:
            hi = mid
        else:
            lo = mid
    return float(values[hi])


def _min_error(t: Tables, bound: float) -> float:
    return min_error(t, bound * (1 + TOL), stop_at=t.budget)


def _beam_search(t: Tables, upper: float, lower: float, width: int, budgeted: bool) -> float:
    """The smallest step time T in [lower, upper) for which the beam finds a plan within T (and,
    if ``budgeted``, within the error budget): a binary search over the step times; inf if none."""
    if not math.isfinite(lower):
        return math.inf
    values = step_values(t, lower, upper)
    if math.isfinite(upper):
        values = values[values < upper * (1 - TOL)]
    best = math.inf
    lo, hi = 0, len(values) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        bound = float(values[mid]) * (1 + TOL)
        if budgeted and t.lossy:
            ok = min_error(t, bound, stop_at=t.budget, beam=width) <= t.budget
        else:
            ok = math.isfinite(min_bottleneck(t, bound, beam=width))
        if ok:
            best, hi = float(values[mid]), mid - 1
        else:
            lo = mid + 1
    return best


def _finish(problem: Problem, microbatch: int, f: _Fastest, bound: float, slack: float) -> tuple[tuple, Plan]:
    """The plan at one size: least error, then latency, then devices, among plans within ``bound``.
    Returns (sort key across sizes, plan)."""
    started = time.perf_counter()
    t = f.tables
    found = best_plan(t, bound * (1 + TOL), beam=f.width)
    if found is not None:
        t, final, choices = found
        key = (final.value[0], final.value[1], final.layer)
    elif f.width is not None:
        choices = _any_plan(t, bound * (1 + TOL), f.width) or _plain_choices(t, f.plain)
        key = (math.inf, math.inf, math.inf)
    else:
        raise InfeasibleError(_why_infeasible(t))
    placements = _assign(t, choices)
    used = {d for p in placements for d in p.devices}
    plan = make_plan(
        problem, microbatch, placements, solver="exact-dp" if f.exact else "heuristic",
        optimal=f.exact or f.bottleneck <= f.lower_bound * (1 + TOL), lower_bound_s=f.lower_bound,
        solve_time_s=time.perf_counter() - started, left_out=_left_out(f.tables, used, f.bottleneck, f.exact),
        throughput_slack=slack,
    )
    if found is None:
        key = (math.inf, plan.latency_s, len(plan.devices))
    return key, plan


def _any_plan(t: Tables, bound: float, width: int) -> list[StageChoice] | None:
    """Any plan the beam finds within ``bound`` ignoring the error sum (the heuristic's fallback
    when its (error, latency) pass loses every plan); None if the beam finds none or if lossy
    options are in play (the plain plan is the safe fallback then)."""
    if t.lossy:
        return None
    view = make_view(t, bound)
    layers, finals = run_lattice(t, view, MAX, keep_layers=True, beam=width)
    if not finals:
        return None
    return trace(t, view, MAX, layers, min(finals, key=lambda f: (f.value, f.layer)))


def _plain_choices(t: Tables, plain: tuple[float, list] | None) -> list[StageChoice]:
    if plain is None:
        raise InfeasibleError(_why_infeasible(t))
    return [StageChoice(t.kind_index(c, 1), first, end, 0, 0) for c, first, end in plain[1]]


def _pruned(t: Tables, upper: float) -> Tables:
    """Classes with no stage within a known plan's bottleneck, on any kind, can never be in a
    better plan (to size the programme before running it)."""
    counts = np.where(t.quickest() <= upper, t.counts, 0)
    return replace(t, counts=counts, kinds=tuple(k for k in t.kinds if k.replicas <= counts[k.cls]))


def _assign(t: Tables, stages: list[StageChoice]) -> list[Placement]:
    """Kind stages -> device stages; a class's devices are taken in the order they were listed."""
    taken = [0] * len(t.classes)
    out = []
    for s in stages:
        kind: Kind = t.kinds[s.kind]
        members = t.classes[kind.cls].members[taken[kind.cls]: taken[kind.cls] + kind.replicas]
        taken[kind.cls] += kind.replicas
        out.append(Placement(members, s.first, s.end, t.codecs[s.codec_out], t.variants[s.variant] == "int8",
                             tuple(1.0 / kind.replicas for _ in members)))
    return out


def _left_out(t: Tables, used: set[str], bottleneck: float, exact: bool) -> dict[str, str]:
    reasons = dict(t.unusable)
    for c, cls in enumerate(t.classes):
        fits = [t.fits(c, v) & np.isfinite(t.compute(c, v)) for v in range(len(t.variants))]
        for name in cls.members:
            if name in used:
                continue
            if not any(f.any() for f in fits):
                need = t.memory[t.memory < np.inf].min()
                reasons[name] = (f"too little memory: the smallest stage needs {format_bytes(need)}, "
                                 f"it has {format_bytes(t.capacity[c])}")
                continue
            quickest = min(float(t.compute(c, v)[fits[v]].min()) for v in range(len(t.variants)) if fits[v].any())
            group = len(cls.members) if t.max_replicas > 1 else 1
            if quickest / group > bottleneck * (1 + TOL):
                shared = f" (even shared by all {group} of its kind)" if group > 1 else ""
                reasons[name] = (f"too slow: its quickest stage takes {format_seconds(quickest / group)}{shared}, "
                                 f"above the bottleneck {format_seconds(bottleneck)}")
            elif exact:
                reasons[name] = ("not needed: plans that use it are no faster (within the throughput slack), "
                                 "and none has less error or lower latency")
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
    smallest = t.memory.min(axis=0)  # the smaller of the fp32 and int8 needs
    for s in range(n):
        need = float(smallest[: s + 1, s + 1:].min())
        if need > largest:
            return (f"segment {segs[s].name!r} needs at least {format_bytes(need)} in any stage, more than "
                    f"the largest device memory ({format_bytes(largest)})")
    if t.problem.max_error is not None and t.lossy:
        return (f"no plan fits the devices' memory within the error budget ({t.problem.max_error.describe()}); "
                "a looser --max-error may allow int8 weights on more stages")
    return ("the devices' memory cannot hold the model: no arrangement of them fits every stage "
            f"(total memory {format_bytes(float(t.capacity @ t.counts))}, "
            f"weights {format_bytes(sum(s.weight_bytes for s in segs))})")


def lower_bound(problem: Problem, microbatch: int | None = None, max_replicas: int | None = None) -> float:
    """A bound below which no plan's bottleneck can go (seconds per microbatch)."""
    mb = microbatch or problem.microbatch
    if mb is None:
        raise ValueError("give a microbatch size")
    return relaxed_bound(build_tables(problem, mb, max_replicas))
