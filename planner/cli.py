"""edgepipe-plan: choose devices and cuts for a model, and say why."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .baselines import all_baselines
from .cluster import ClusterError, load_cluster, problem_for
from .console import HelpCommand, console_for_output
from .cost import make_plan, placements_of
from .explain import explain, explain_dict
from .plan import Plan, PlanError, load_plan, save_plan
from .problem import Problem, ProblemError, load_problem, parse_error_budget
from .simulate import Simulation, simulate
from .solver import DEFAULT_MAX_EXACT_STATES, DEFAULT_THROUGHPUT_SLACK, InfeasibleError, solve

app = typer.Typer(add_completion=False, rich_markup_mode="markdown", pretty_exceptions_enable=False)


@app.command(cls=HelpCommand)
def plan_command(
    problem_file: Path = typer.Argument(
        None, metavar="PROBLEM.json", show_default=False,
        help="Problem file (format edgepipe.problem): the model's segments and the devices.",
    ),
    problem_option: Path = typer.Option(None, "--problem", show_default=False, help="Same as PROBLEM.json."),
    output: Path = typer.Option(None, "-o", "--output", show_default=False, help="Write the plan here."),
    cluster: Path = typer.Option(
        None, "--cluster", show_default=False,
        help="Plan for the devices of this cluster TOML instead of the problem's own.",
    ),
    microbatch: str = typer.Option(
        None, "--microbatch", show_default=False,
        help="Microbatch size N, or 'auto' to choose among the profiled sizes. Default: the problem's.",
    ),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Compare other partitioners."),
    existing: Path = typer.Option(
        None, "--plan", show_default=False,
        help="What-if: judge this saved plan under PROBLEM (e.g. with a slower link) instead of solving.",
    ),
    simulate_n: int = typer.Option(
        0, "--simulate", metavar="N", help="Also play N microbatches through the plan's queues and report.",
    ),
    max_error: str = typer.Option(
        None, "--max-error", metavar="SPEC", show_default=False,
        help="Allow lossy choices (compressed hops, int8 weights) within this error of the model's outputs: "
             "`0.05` (max |Δ|) or `max_abs=0.05,cosine=0.999,top1=0.99`. Default: the problem's (usually none).",
    ),
    max_replicas: int = typer.Option(
        None, "--max-replicas", metavar="N", show_default=False,
        help="At most N identical devices share one stage's microbatches (1: pipeline only). Default: no limit.",
    ),
    throughput_slack: float = typer.Option(
        DEFAULT_THROUGHPUT_SLACK, "--throughput-slack", metavar="F",
        help="Plans within this fraction of the best throughput count as equally fast; then less error, "
             "lower latency and fewer devices decide. 0: the highest throughput, whatever it costs.",
    ),
    method: str = typer.Option("auto", "--method", help="auto, exact or heuristic."),
    max_exact_states: int = typer.Option(
        DEFAULT_MAX_EXACT_STATES, "--max-exact-states",
        help="Above this many solver states 'auto' uses the heuristic and reports its gap to a lower bound.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (plan, explanation) instead."),
) -> None:
    """Find the plan with the highest throughput for a model on a set of devices, and explain it.

    Plans within the throughput slack (1%) of the best count as equally fast; among them it picks
    the least output error, then the lowest latency, then the fewest devices. Identical devices
    may share a stage (replicas); with --max-error, hops may be compressed (fp16, int8) and
    stages may run int8 weights, where the problem file has the compiler's measurements. The
    table shows each stage's devices, segments, compute, comm and send time, how its output
    travels and memory, marks the bottleneck, lists the devices left out and why, and compares
    other partitioners.

    Solve and save a plan:

        edgepipe-plan vith.problem.json -o plan.json

    The same model on the devices of a cluster file:

        edgepipe-plan vith.problem.json --cluster planner/examples/paper-testbed.toml

    Trade accuracy for speed on slow links (the problem must carry codec measurements):

        edgepipe-plan vitl.problem.json --cluster planner/examples/paper-testbed-5mbps.toml --max-error 0.05

    What-if: the saved plan with slower links, played through the runtime's queues:

        edgepipe-plan slow-links.problem.json --plan plan.json --simulate 64
    """
    err = Console(stderr=True)
    try:
        problem = _load(problem_file or problem_option, cluster, microbatch, max_error)
        if existing is not None:
            plan = _what_if(problem, load_plan(existing))
        else:
            if method not in ("auto", "exact", "heuristic"):
                raise ProblemError(f"--method: expected auto, exact or heuristic, got {method!r}")
            if max_replicas is not None and max_replicas < 1:
                raise ProblemError(f"--max-replicas: expected an integer >= 1, got {max_replicas}")
            if not throughput_slack >= 0:
                raise ProblemError(f"--throughput-slack: expected a fraction >= 0, got {throughput_slack}")
            with err.status("solving…", spinner="dots") if not as_json else nullcontext():
                plan = solve(problem, method=method, max_exact_states=max_exact_states, max_replicas=max_replicas,
                             throughput_slack=throughput_slack)
        others = all_baselines(problem, plan.microbatch) if baselines else {}
        simulation = simulate(problem, plan, simulate_n) if simulate_n > 0 else None
    except (ProblemError, ClusterError, PlanError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except InfeasibleError as exc:
        err.print(f"[red]no plan:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if output is not None:
        try:
            save_plan(plan, output)
        except OSError as exc:
            err.print(f"[red]error:[/red] cannot write {output}: {exc.strerror or exc}", highlight=False)
            raise typer.Exit(2) from None
    if as_json:
        doc: dict[str, Any] = {"plan": plan.to_dict(), "explain": explain_dict(problem, plan, others)}
        if simulation is not None:
            doc["simulation"] = _simulation_dict(simulation)
        typer.echo(json.dumps(doc, indent=2, allow_nan=False))
        return
    out = console_for_output()
    out.print(explain(problem, plan, others))
    if simulation is not None:
        out.print(
            f"Simulated {simulation.n_microbatches} microbatches with queues of {simulation.queue_depth}: "
            f"{simulation.throughput:.3g} samples/s, median latency {simulation.latency_s:.3g} s "
            f"(max {simulation.latency_max_s:.3g} s), all done after {simulation.makespan_s:.3g} s."
        )
    if output is not None:
        out.print(f"Plan written to {output}")


def _load(path: Path | None, cluster: Path | None, microbatch: str | None, max_error: str | None) -> Problem:
    if path is None:
        raise ProblemError("give a problem file: edgepipe-plan PROBLEM.json (see --help)")
    problem = load_problem(path)
    if max_error is not None:
        problem = replace(problem, max_error=parse_error_budget(max_error))
    size = problem.microbatch
    if microbatch is not None:
        if microbatch == "auto":
            size = None
        elif microbatch.isdigit() and int(microbatch) >= 1:
            size = int(microbatch)
        else:
            raise ProblemError(f"--microbatch: expected a positive integer or 'auto', got {microbatch!r}")
    if cluster is not None:
        return problem_for(load_cluster(cluster), problem.model, size, max_error=problem.max_error,
                           secure=problem.secure)
    return replace(problem, microbatch=size) if size != problem.microbatch else problem


def _what_if(problem: Problem, plan: Plan) -> Plan:
    """The saved plan's stages, re-costed under ``problem``."""
    n = len(problem.model.segments)
    if plan.stages[-1].end_segment != n:
        covered = plan.stages[-1].end_segment
        raise PlanError(f"--plan: the plan covers {covered} segments, the problem has {n}")
    names = [d.name for d in problem.devices]
    for device in plan.devices:
        if device not in names:
            raise PlanError(f"--plan: device {device!r} of the plan is not in the problem")
    left_out = {d: "not in the plan" for d in names if d not in plan.devices}
    solver = f"what-if: {plan.solver}"
    try:
        return make_plan(problem, plan.microbatch, placements_of(plan), solver=solver, left_out=left_out,
                         throughput_slack=plan.throughput_slack)
    except PlanError as exc:
        raise PlanError(f"--plan: {exc}") from None


def _simulation_dict(sim: Simulation) -> dict[str, Any]:
    return dataclasses.asdict(sim)


def main() -> None:
    app()
