"""Standby bundles: the plan and stage bundles for each single-device loss, made before any loss.

For every device D of the deployed plan, the planner re-plans the stored problem
(``BUILD/problem.json``) over the cluster's other devices, and the compiler slices the model at
that plan's cuts into ``BUILD/standby/<D>/stage-K`` (with ``plan.json``), verified against the
whole model like any compile. Then every device receives the files of every standby plan it has a
part in (content-addressed: nothing it has is sent again) and pins them, so that after a loss the
failover sends no bulk data: it prepares, starts and rewires.

Slicing needs the compiler's ONNX tools (onnx_ir); they are imported only here, when standby
bundles are made.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgepipe.agent.control_client import FileToSend, upload
from edgepipe.compiler.fleet.build import PLAN_FILE, PROBLEM_FILE, Build, BuildError, load_build
from edgepipe.compiler.fleet.deploy import Fleet
from edgepipe.planner.plan import Plan, save_plan
from edgepipe.planner.problem import Problem, ProblemError, load_problem

STANDBY_DIR = "standby"
READY_FILE = "ready.json"


class StandbyError(RuntimeError):
    """A standby plan or its bundles could not be made; the message says for which loss and why."""


@dataclass(frozen=True)
class Standby:
    lost: tuple[str, ...]  # the devices this plan does without
    dir: Path
    plan: Plan


def standby_dir(build_dir: Path, lost: Iterable[str]) -> Path:
    return Path(build_dir) / STANDBY_DIR / "+".join(sorted(lost))


def problem_of(build_dir: Path) -> Problem:
    path = Path(build_dir) / PROBLEM_FILE
    if not path.is_file():
        raise StandbyError(f"{path}: missing; compile with --cluster (it writes the problem a failover re-plans "
                           "from)")
    try:
        return load_problem(path)
    except ProblemError as exc:
        raise StandbyError(str(exc)) from None


def replan(problem: Problem, without: Iterable[str], reachable: Iterable[str]) -> Plan:
    """The best plan over the problem's devices that have a daemon, minus ``without``."""
    from edgepipe.planner.solver import InfeasibleError, solve

    gone = set(without)
    keep = {d.name for d in problem.devices if d.name not in gone and d.name in set(reachable)}
    if not keep:
        raise StandbyError(f"no device left to re-plan on without {', '.join(sorted(gone))}")
    try:
        smaller = dataclasses.replace(
            problem, devices=tuple(d for d in problem.devices if d.name in keep),
            links=tuple(k for k in problem.links if k.a in keep and k.b in keep))
        return solve(smaller)
    except (InfeasibleError, ProblemError) as exc:
        raise StandbyError(f"without {', '.join(sorted(gone))}: {exc}") from None


def make_standby(build: Build, lost: tuple[str, ...], *, verify: bool = True,
                 log: Callable[[str], None] = lambda _line: None) -> Standby:
    """The plan and verified bundles for losing ``lost`` (reused when already made for the same
    problem)."""
    problem = problem_of(build.dir)
    out = standby_dir(build.dir, lost)
    plan = replan(problem, lost, build.devices)
    if _fresh(out, plan):
        return Standby(lost, out, plan)
    log(f"standby for losing {', '.join(lost)}: slicing {len(plan.stages)} stage(s) on "
        f"{', '.join(plan.devices)}")
    _slice(build.dir, out, plan, verify)
    save_plan(plan, out / PLAN_FILE)
    return Standby(lost, out, plan)


def _fresh(out: Path, plan: Plan) -> bool:
    """Bundles already made for exactly this plan."""
    try:
        existing = Plan.from_json((out / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return False
    same = [(s.device, s.cut_in, s.cut_out) for s in existing.stages] == \
           [(s.device, s.cut_in, s.cut_out) for s in plan.stages]
    return same and existing.model_sha256 == plan.model_sha256 and all(
        (out / f"stage-{k}" / "stage.json").is_file() for k in range(len(plan.stages)))


def _slice(build_dir: Path, out: Path, plan: Plan, verify: bool) -> None:
    from edgepipe.compiler.build import CompileError, compile_model
    from edgepipe.models.registry import REGISTRY

    try:
        summary = json.loads((Path(build_dir) / "compile.json").read_text())
    except (OSError, ValueError) as exc:
        raise StandbyError(f"{build_dir}/compile.json: unreadable ({exc}); recompile") from None
    model_id, model_path = summary["model_id"], Path(summary["model_path"])
    try:
        if model_id in REGISTRY:  # the cached export, with the registry's name in the manifests
            try:
                compile_model(model_id, out, plan=plan, verify=verify)
                return
            except CompileError:
                if not model_path.is_file():
                    raise
        compile_model(None, out, onnx=model_path, plan=plan, verify=verify)  # an ONNX file, or a checkpoint's export
    except Exception as exc:  # the compiler raises many kinds; the supervisor reports and keeps watching
        raise StandbyError(f"standby bundles for {out.name}: {type(exc).__name__}: {exc}") from None


def load_standby(build_dir: Path, standby: Standby, cluster_path: Path | None = None) -> Build:
    try:
        return load_build(build_dir, cluster_path=cluster_path, bundle_root=standby.dir,
                          plan_path=standby.dir / PLAN_FILE)
    except BuildError as exc:
        raise StandbyError(str(exc)) from None


def presend(fleet: Fleet, builds: Iterable[Build], *, log: Callable[[str], None] = lambda _line: None
            ) -> dict[str, tuple[int, int]]:
    """Send every device the files of every build it has a part in, and pin them all there (they
    survive store evictions). Returns per device (bytes sent, bytes it already had); a device that
    cannot be reached is logged and skipped (its standby files are sent at failover, if ever)."""
    files: dict[str, dict[str, FileToSend]] = {}
    for build in builds:
        for k, devices in enumerate(build.placement):
            for d in devices:
                for f in build.stages[k].all_files():
                    files.setdefault(d, {})[f.sha256] = FileToSend(f.sha256, f.path, f.size)

    def send(device: str) -> tuple[int, int]:
        with fleet.connect(device) as conn:
            sent, cached = upload(conn, list(files[device].values()))
            conn.request({"cmd": "pin", "files": sorted(files[device])}, timeout_s=30.0)
        return sent, cached

    done, errors = fleet.each([d for d in files if d in fleet.targets], send)
    for error in errors.values():
        log(f"standby files not pre-sent: {error}")
    return done


def write_ready(build_dir: Path, standbys: Iterable[Standby], sent: dict[str, tuple[int, int]]) -> Path:
    path = Path(build_dir) / STANDBY_DIR / READY_FILE
    path.write_text(json.dumps({"losses": [list(s.lost) for s in standbys],
                                "sent": {d: {"sent": a, "cached": b} for d, (a, b) in sent.items()}}, indent=2))
    return path
