"""Join a model's segments, a cluster file and measured device profiles into a plan.

The planner is pure and knows nothing of files the devices wrote; this is where measured
profiles (``edgepipe-agent profile``, one per device) become per-type compute times and (once the
planner's device types have the fields) communication costs. Devices of one declared type are
meant to be alike; the type's time per segment is the median over its profiled devices, so one
noisy device does not skew the rest.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgepipe.agent.client.trace import Run
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.agent.formats.profiles import (
    DeviceProfile,
    Learned,
    ProfileError,
    check_profile_matches,
    load_profile,
    save_profile,
)
from edgepipe.compiler.quantize import int8_speed  # light: no onnx_ir at import
from edgepipe.planner.cluster import Cluster
from edgepipe.planner.cost import evaluate, placements_of
from edgepipe.planner.plan import Plan
from edgepipe.planner.problem import ModelSpec, Problem


def profile_path(profiles_dir: Path, device: str) -> Path:
    return Path(profiles_dir) / f"{device}.json"


def load_device_profiles(profiles_dir: Path, cluster: Cluster, spec: ModelSpec) -> tuple[list[DeviceProfile],
                                                                                       dict[str, str]]:
    """The usable profiles in ``profiles_dir`` (``<device>.json``) and, per device without one, why."""
    usable, missing = [], {}
    for device in cluster.devices:
        path = profile_path(profiles_dir, device.name)
        if not path.is_file():
            missing[device.name] = f"no profile ({path})"
            continue
        try:
            profile = load_profile(path)
            check_profile_matches(profile, model_sha256=spec.model_sha256, device=device.name, source=str(path))
            check_segments(profile, spec, str(path))
        except ProfileError as exc:
            missing[device.name] = str(exc)
            continue
        usable.append(profile)
    return usable, missing


def check_segments(profile: DeviceProfile, spec: ModelSpec, source: str) -> None:
    names = tuple(s.name for s in spec.segments)
    if profile.segment_names != names:
        raise ProfileError(
            f"{source}: profiled {len(profile.segment_names)} segments, the plan uses {len(names)}; "
            f"profile with the same --max-tensors as you plan with"
        )


def apply_profiles(cluster: Cluster, profiles: list[DeviceProfile]) -> Cluster:
    """``cluster`` with each profiled type's compute times replaced by its devices' median."""
    type_of = {d.name: d.type for d in cluster.devices}
    by_type: dict[str, list[DeviceProfile]] = {}
    for profile in profiles:
        by_type.setdefault(type_of[profile.device], []).append(profile)
    types = []
    for device_type in cluster.device_types:
        measured = by_type.get(device_type.name)
        if not measured:
            types.append(device_type)
            continue
        sizes = set.intersection(*(set(p.seconds) for p in measured))
        table = {
            mb: tuple(statistics.median(p.seconds[mb][i] for p in measured)
                      for i in range(len(measured[0].segment_names)))
            for mb in sorted(sizes)
        }
        int8 = int8_speed(measured)  # compiler/quantize.py: int8-weights times, when profiled
        types.append(dataclasses.replace(device_type, profiles=table, **comm_fields(device_type, measured),
                                         **({} if int8 is None else {"int8": int8})))
    return dataclasses.replace(cluster, device_types=tuple(types))


def comm_fields(device_type: object, profiles: list[DeviceProfile]) -> dict[str, object]:
    """The planner's communication fields for a type, from its devices' profiles: per (codec,
    security) the median of each coefficient, and the median share. Empty when the planner's
    DeviceType has no such fields yet (planner v1) or no profile measured them."""
    names = {f.name for f in dataclasses.fields(device_type)}  # type: ignore[arg-type]
    measured = [p.comm for p in profiles if p.comm is not None]
    if not measured or not {"comm", "comm_share"} <= names:
        return {}
    from edgepipe.planner import problem as planner_problem

    make = getattr(planner_problem, "CommCost", None)
    if make is None:
        return {}
    keys = sorted({(c.codec, c.secure) for m in measured for c in m.costs})
    costs = []
    for codec, secure in keys:
        found = [c for m in measured if (c := m.cost(codec, secure)) is not None]
        costs.append(make(codec=codec, secure=secure,
                          **{k: statistics.median(getattr(c, k) for c in found) for k in COMM_COEFFICIENTS}))
    return {"comm": tuple(costs), "comm_share": statistics.median(m.share for m in measured)}


COMM_COEFFICIENTS = ("recv_per_message_s", "recv_per_byte_s", "send_per_message_s", "send_per_byte_s")


def profile_warnings(profiles: list[DeviceProfile], microbatch: int) -> list[str]:
    """One line per profile too noisy to plan on (see profiler.spread_warning), and per profile
    without communication costs (version 1: the planner then treats moving tensors as free)."""
    from edgepipe.agent.device.profiler import spread_warning

    lines = [w for p in profiles if (w := spread_warning(p, microbatch))]
    old = sorted(p.device for p in profiles if p.comm is None)
    if old:
        lines.append(f"{', '.join(old)}: profile has no communication costs (format version 1 or --no-comm); "
                     f"re-profile with --profile to include them")
    return lines


def usable_devices(cluster: Cluster, microbatch: int) -> tuple[Cluster, dict[str, str]]:
    """``cluster`` without devices whose type has no way to time ``microbatch`` (no profile at that
    size, no gflops, no reference that has one), and why each was left out."""
    types = {t.name: t for t in cluster.device_types}

    def timed(name: str, seen: frozenset[str] = frozenset()) -> bool:
        t = types[name]
        if microbatch in t.profiles or t.gflops is not None:
            return True
        return t.reference is not None and t.reference not in seen and timed(t.reference, seen | {name})

    kept = tuple(d for d in cluster.devices if timed(d.type))
    left_out = {d.name: f"type {d.type!r} has no profile at microbatch {microbatch} and no gflops"
                for d in cluster.devices if not timed(d.type)}
    return dataclasses.replace(cluster, devices=kept), left_out


# ---- learning from runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageObservation:
    """What a run measured for one stage, beside what its device's profile predicted."""

    stage: int
    device: str
    first_segment: int
    end_segment: int
    microbatch: int
    measured_s: float  # mean compute per microbatch, outliers rejected (as the profiler does)
    profiled_s: float | None  # the stored profile's sum over the stage's segments; None: no profile
    updated: bool
    reason: str  # why the profile was or was not updated


@dataclass(frozen=True)
class RunComparison:
    """The run's plan and the best plan, both predicted from the learned profiles."""

    measured_throughput: float  # steady state of the run
    run_plan_throughput: float  # the run's plan re-predicted
    best_throughput: float
    best_plan: Plan
    faster_pct: float  # (best / run's plan - 1) * 100


def observe_run(run: Run, profiles_dir: Path, model_sha256: str,
                ort_versions: dict[str, str | None]) -> list[StageObservation]:
    """Per stage of ``run`` (which must carry its plan: ``edgepipe-submit --report PLAN --trace``),
    the measured compute and whether the device's stored profile may learn from it.

    Key rules, as for reuse: same model hash (run's plan, profile and the model planned now), same
    device, the run's microbatch among the profile's sizes, float32, and the ONNX Runtime version the
    device reports now (``ort_versions``; None: not reachable, so not confirmed, so not updated)."""
    from edgepipe.agent.device.profiler import robust_summary

    plan = run.plan
    if not plan or plan.get("format") != "edgepipe.plan":
        raise ProfileError("the run has no plan: record it with edgepipe-submit --report PLAN.json --trace FILE")
    if plan.get("model_sha256") != model_sha256:
        raise ProfileError(f"the run's plan is for model {str(plan.get('model_sha256'))[:12]}, "
                           f"not {model_sha256[:12]}")
    microbatch = int(plan["microbatch"])
    complete = [m for m in run.microbatches if len(m.stages) == len(plan["stages"])]
    if len(complete) < 3:
        raise ProfileError(f"the run has {len(complete)} complete microbatches; learning needs at least 3")
    found = []
    for k, stage in enumerate(plan["stages"]):
        device, first, end = str(stage["device"]), int(stage["first_segment"]), int(stage["end_segment"])
        measured = robust_summary([m.stages[k].compute_s for m in complete]).mean
        path = profile_path(profiles_dir, device)
        profiled, updated, reason = None, False, ""
        try:
            profile = load_profile(path)
            check_profile_matches(profile, model_sha256=model_sha256, device=device, source=str(path))
            if microbatch not in profile.seconds:
                raise ProfileError(f"{path}: no timings at microbatch {microbatch}")
            profiled = math.fsum(profile.seconds[microbatch][first:end])
            if run.batch != microbatch:
                reason = f"the run used microbatch {run.batch}, its plan {microbatch}"
            elif profile.dtype != "float32":
                reason = f"profile is for {profile.dtype}"
            elif ort_versions.get(device) is None:
                reason = "ONNX Runtime version not confirmed (device not reachable)"
            elif ort_versions[device] != profile.ort_version:
                reason = f"device now runs ONNX Runtime {ort_versions[device]}, profile {profile.ort_version}"
            else:
                updated, reason = True, f"x{measured / profiled:.3f}" if profiled > 0 else "updated"
        except ProfileError as exc:
            reason = str(exc)
        found.append(StageObservation(k, device, first, end, microbatch, measured, profiled, updated, reason))
    return found


def learn(observations: list[StageObservation], profiles_dir: Path, source: str) -> list[DeviceProfile]:
    """Scale each updatable stage's segments in its device's profile so they sum to what the run
    measured (their relative split is kept); record the update in the profile's ``learned`` list."""
    written = []
    for obs in observations:
        if not obs.updated or not obs.profiled_s:
            continue
        path = profile_path(profiles_dir, obs.device)
        profile = load_profile(path)
        scale = obs.measured_s / obs.profiled_s
        times = list(profile.seconds[obs.microbatch])
        times[obs.first_segment:obs.end_segment] = [t * scale for t in times[obs.first_segment:obs.end_segment]]
        note = Learned(source=source, microbatch=obs.microbatch, first_segment=obs.first_segment,
                       end_segment=obs.end_segment, scale=scale,
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        updated = dataclasses.replace(profile, seconds={**profile.seconds, obs.microbatch: tuple(times)},
                                      learned=(*profile.learned, note))
        save_profile(path, updated)
        written.append(updated)
    return written


def compare_with_run(problem: Problem, run: Run, best: Plan) -> RunComparison:
    """The run's plan and ``best`` predicted under ``problem`` (built from the learned profiles)."""
    from edgepipe.agent.client.report import steady_throughput

    # The whole plan as it ran: every replica with its weight, each hop's codec, int8 stages (a
    # version 1 plan reads as one device per stage, raw, fp32).
    ran = Plan.from_dict(run.plan or {}, "the run's plan")
    again = evaluate(problem, ran.microbatch, placements_of(ran))
    last = [m.stages[-1] for m in run.microbatches if m.stages]
    measured = steady_throughput(last, run.batch)
    faster = (best.throughput / again.throughput - 1) * 100 if again.throughput > 0 else math.nan
    return RunComparison(measured_throughput=measured, run_plan_throughput=again.throughput,
                         best_throughput=best.throughput, best_plan=best, faster_pct=faster)


def device_ort_versions(cluster: Cluster, timeout_s: float = 3.0, keypair: KeyPair | None = None,
                        ) -> dict[str, str | None]:
    """The ONNX Runtime version each device reports now (``status`` on its control endpoint: an
    idle daemon or a serving agent's ``--control``), asked with the workstation's ``keypair`` (None:
    insecure mode); None for a device that does not answer."""
    from edgepipe.agent.control_client import request_status
    from edgepipe.agent.formats.control import ControlError
    from edgepipe.compiler.remote_profile import cluster_access, control_endpoint

    versions: dict[str, str | None] = {d.name: None for d in cluster.devices}
    try:
        access = cluster_access(cluster, keypair)
    except ControlError:
        return versions
    for device in cluster.devices:
        try:
            status = request_status(control_endpoint(device, access), auth=access.auth(device.name),
                                    timeout_s=timeout_s)
            versions[device.name] = str(status["ort_version"])
        except (ControlError, KeyError, TypeError):
            versions[device.name] = None
    return versions


def learn_from_run(run_path: Path, cluster: Cluster, spec: ModelSpec, profiles_dir: Path,
                   keypair: KeyPair | None = None) -> tuple[Run, list[StageObservation]]:
    """``edgepipe-compile ... --from-run RUN.json``: read the run, update the profiles it may update."""
    from edgepipe.agent.client.trace import TraceError, load_run

    try:
        run = load_run(run_path)
    except TraceError as exc:
        raise ProfileError(str(exc)) from None
    observations = observe_run(run, profiles_dir, spec.model_sha256, device_ort_versions(cluster, keypair=keypair))
    learn(observations, profiles_dir, str(run_path))
    return run, observations


def comparison_lines(comparison: RunComparison, tolerance_pct: float = 1.0) -> list[str]:
    """What the run says about its plan, for the user."""
    c = comparison
    lines = [f"the run measured {c.measured_throughput:.3g} samples/s; its plan, predicted from the learned "
             f"profiles: {c.run_plan_throughput:.3g} samples/s"]
    if c.faster_pct > tolerance_pct:
        stages = ", ".join(_stage_label(s) for s in c.best_plan.stages)
        lines.append(f"another plan would be {c.faster_pct:.1f}% faster: {c.best_throughput:.3g} samples/s on "
                     f"{stages} (written to plan.json)")
    else:
        lines.append(f"the run's plan is still the best (the best plan predicts {c.best_throughput:.3g} "
                     f"samples/s, {c.faster_pct:+.1f}%)")
    return lines


def _stage_label(stage) -> str:
    """``pi-a[0:12]``; with replicas, a codec on its output hop or int8 weights, those too."""
    from edgepipe.planner.explain import devices_label

    extras = [f"{stage.codec_out} out"] if stage.codec_out != "raw" else []
    extras += ["int8 weights"] if stage.int8_weights else []
    return f"{devices_label(stage)}[{stage.first_segment}:{stage.end_segment}]" + (
        f" ({', '.join(extras)})" if extras else "")
