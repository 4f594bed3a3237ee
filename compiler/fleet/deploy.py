"""Deploy a build onto its devices, redeploy a changed one, stop a deployment.

    contact every device (status)  ->  send what each lacks (have/put, content-addressed)
      ->  prepare (each device builds and verifies its bundles, reserves ports)
      ->  start, last stage first (unchanged stages keep running)  ->  wait until every stage is ready
      ->  publish the endpoints to the daemons, write endpoints.json and deployment.json

Nothing is started before every device is reachable, free of other deployments, has every file
and has verified every bundle; an attempt that fails after that is rolled back on every device
it touched (``revert``: the previous generation runs again, or nothing when there was none). Each
error names the device and what went wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepipe.agent.control_client import ControlConnection, FileToSend, auth_for, upload
from edgepipe.agent.formats.control import ControlError, Ports, StageStatus, StageWiring
from edgepipe.agent.formats.endpoints import FILE_NAME, DaemonRef, Endpoints, Peer, save_endpoints
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.compiler.fleet.build import Build, BuildError, DeviceTarget, instance_id
from edgepipe.compiler.fleet.state import DeploymentState, Placement, load_state, new_deployment_id, save_state

CONTACT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0  # prepare hashes every file of a bundle: seconds on a slow board
READY_TIMEOUT_S = 180.0
POLL_S = 0.2


class DeployError(RuntimeError):
    """A deploy, redeploy or stop failed; the message names the device and the cause, and what was
    undone."""


@dataclass
class DeviceProgress:
    """One device's part of a deploy, updated as it goes (the CLI draws it)."""

    device: str
    stages: tuple[int, ...]
    total_bytes: int = 0
    sent: int = 0
    cached: int = 0
    state: str = "waiting"  # contacting, sending, prepared, starting, ready, stopping, stopped, failed
    actions: dict[str, str] = field(default_factory=dict)  # instance -> kept, started, stopped
    error: str | None = None

    def copy(self) -> DeviceProgress:
        return replace(self, actions=dict(self.actions))


Progress = Callable[[DeviceProgress], None]


@dataclass(frozen=True)
class DeployOptions:
    replace: bool = False  # take over devices that serve another deployment
    drain: bool = True  # replaced stages send on their in-flight work before they stop
    threads: int = 1
    max_batch: int = 256
    codec: str | None = None
    ready_timeout_s: float = READY_TIMEOUT_S
    contact_timeout_s: float = CONTACT_TIMEOUT_S
    endpoints_path: Path | None = None  # default BUILD/endpoints.json
    lost: tuple[str, ...] = ()  # devices a failover dropped (recorded in the state)


@dataclass(frozen=True)
class DeployOutcome:
    state: DeploymentState
    endpoints: Endpoints
    endpoints_path: Path
    devices: tuple[DeviceProgress, ...]
    seconds: float
    timings: dict[str, float]


class Fleet:
    """How the workstation reaches the daemons: its keypair (None in insecure mode) and each
    device's endpoint and key. Connections are made per use, one per thread."""

    def __init__(self, keypair: KeyPair | None, targets: dict[str, DeviceTarget]) -> None:
        self.keypair = keypair
        self.targets = targets

    @property
    def insecure(self) -> bool:
        return self.keypair is None

    def connect(self, device: str) -> ControlConnection:
        target = self.targets[device]
        return ControlConnection(target.control, auth_for(self.keypair, target.public_key))

    def request(self, device: str, header: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        try:
            with self.connect(device) as conn:
                return conn.request(header, timeout_s=timeout_s)
        except ControlError as exc:
            raise ControlError(self.name(device, exc)) from None

    def name(self, device: str, exc: BaseException) -> str:
        """``device: message``, without the endpoint the connection put in front."""
        text = str(exc)
        target = self.targets.get(device)
        if target is not None and text.startswith(f"{target.control}: "):
            text = text[len(target.control) + 2:]
        return text if text.startswith(f"{device}: ") else f"{device}: {text}"

    def each(self, devices: Sequence[str], work: Callable[[str], Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """``work(device)`` on every device in parallel: results and, per failed device, why."""
        results: dict[str, Any] = {}
        errors: dict[str, str] = {}
        if not devices:
            return results, errors

        def one(device: str) -> None:
            try:
                results[device] = work(device)
            except (ControlError, OSError, KeyError, TypeError, ValueError) as exc:
                errors[device] = self.name(device, exc)

        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            list(pool.map(one, devices))
        return results, errors


# -- deploy ----------------------------------------------------------------------------------------

def deploy(build: Build, fleet: Fleet, options: DeployOptions = DeployOptions(),
           progress: Progress | None = None, prior: DeploymentState | None = None) -> DeployOutcome:
    """Deploy ``build`` (a new generation of its deployment, or the first). See the module docstring."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    prior = prior if prior is not None else load_state(build.dir)
    deployment = prior.deployment if prior is not None else new_deployment_id(build.model_id)
    generation = prior.generation + 1 if prior is not None else 1
    n = len(build.stages)
    used = build.used_devices()
    stages_of = {d: tuple(k for k in range(n) if d in build.placement[k]) for d in used}
    reports = {d: DeviceProgress(d, stages_of[d], sum(build.stages[k].bytes for k in stages_of[d])) for d in used}
    lock = threading.Lock()

    def report(device: str, **changes: Any) -> None:
        with lock:
            for key, value in changes.items():
                setattr(reports[device], key, value)
            if progress is not None:
                progress(reports[device].copy())

    # 1. contact: everyone reachable, nobody serving someone else's deployment
    t0 = time.perf_counter()
    for d in used:
        report(d, state="contacting")
    statuses, errors = fleet.each(used, lambda d: fleet.request(d, {"cmd": "status"}, options.contact_timeout_s))
    for d, error in errors.items():
        report(d, state="failed", error=error)
    if errors:
        raise DeployError(_unreachable(errors, fleet) + "; nothing was changed")
    for d, status in statuses.items():
        other = status.get("deployment")
        if other and other.get("id") != deployment and other.get("running") and not options.replace:
            report(d, state="failed", error="busy")
            raise DeployError(f"{d} already serves deployment {other.get('id')!r} "
                              f"(generation {other.get('generation')}); stop that deployment "
                              "(edgepipe-fleet stop ITS_BUILD) or deploy with --replace; nothing was changed")
    secure_data = all(s.get("secure_data") for s in statuses.values())
    if secure_data and not build.client_keys:
        raise BuildError(f"{build.cluster.source}: [cluster].clients lists no client key, so no client could submit "
                         "requests or read results; add their public keys (edgepipe-agent keygen --name client)")
    timings["contact_s"] = time.perf_counter() - t0

    # 2. send what each device lacks
    t0 = time.perf_counter()

    def send(device: str) -> tuple[int, int]:
        files = {f.sha256: FileToSend(f.sha256, f.path, f.size)
                 for k in stages_of[device] for f in build.stages[k].all_files()}
        report(device, state="sending")

        def on_bytes(count: int) -> None:
            report(device, sent=reports[device].sent + count)

        with fleet.connect(device) as conn:
            sent, cached = upload(conn, list(files.values()), on_bytes=on_bytes)
        report(device, cached=cached)
        return sent, cached

    _, errors = fleet.each(used, send)
    if errors:
        for d, error in errors.items():
            report(d, state="failed", error=error)
        raise DeployError("; ".join(errors.values()) + "; nothing was started")
    timings["send_s"] = time.perf_counter() - t0

    # 3. prepare: bundles built from the store and verified against the manifest sha256 sent here
    t0 = time.perf_counter()
    peers = sorted({t.public_key for t in (build.devices[d] for d in used) if t.public_key})

    def prepare(device: str) -> dict[str, Ports]:
        refs = [build.stages[k].ref(results=k == n - 1).to_dict() for k in stages_of[device]]
        reply = fleet.request(device, {"cmd": "prepare", "deployment": deployment, "generation": generation,
                                       "replace": options.replace, "stages": refs, "clients": list(build.client_keys),
                                       "peers": peers})
        report(device, state="prepared")
        return {iid: Ports.from_dict(p) for iid, p in reply["ports"].items()}

    ports, errors = fleet.each(used, prepare)
    if errors:
        undone = _rollback(fleet, list(ports), deployment, generation)
        for d, error in errors.items():
            report(d, state="failed", error=error)
        raise DeployError("; ".join(errors.values()) + f"; nothing was started{undone}")
    timings["prepare_s"] = time.perf_counter() - t0

    # 4. wiring, then start from the last stage to the first
    t0 = time.perf_counter()
    listen = {(k, d): f"tcp://{build.devices[d].host}:{ports[d][instance_id(k)].listen}"
              for k in range(n) for d in build.placement[k]}
    results = {d: f"tcp://{build.devices[d].host}:{ports[d][instance_id(n - 1)].results}" for d in build.placement[-1]}
    wirings = {d: [_wiring(build, k, d, listen, generation, options).to_dict() for k in stages_of[d]] for d in used}
    launches: dict[tuple[str, str], str] = {}
    touched: list[str] = []
    try:
        for k in reversed(range(n)):
            for d in build.placement[k]:
                if d in touched:
                    continue
                report(d, state="starting")
                touched.append(d)
                reply = fleet.request(d, {"cmd": "start", "deployment": deployment, "generation": generation,
                                          "stages": wirings[d], "drain": options.drain})
                actions = {i: "kept" for i in reply.get("kept", [])}
                actions.update({i: _started_as(i, d, build, prior) for i in reply.get("started", [])})
                actions.update({i: "stopped" for i in reply.get("stopped", []) if i not in actions})
                report(d, actions=actions)
                launches.update({(d, i): fp for i, fp in reply.get("launches", {}).items()})
        timings["start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _wait_ready(fleet, launches, options.ready_timeout_s, lambda d: report(d, state="ready"))
        timings["ready_s"] = time.perf_counter() - t0
    except (ControlError, DeployError) as exc:
        undone = _rollback(fleet, used, deployment, generation)
        raise DeployError(f"{exc}{undone}") from None

    # 5. publish and record
    endpoints = Endpoints(
        deployment=deployment, generation=generation, model_id=build.model_id,
        entry=tuple(Peer(listen[(0, d)], build.devices[d].public_key) for d in build.placement[0]),
        exit=tuple(Peer(results[d], build.devices[d].public_key) for d in build.placement[-1]),
        inputs=build.inputs, outputs=build.outputs,
        daemons=tuple(DaemonRef(d, build.devices[d].control, build.devices[d].public_key) for d in used),
        insecure=fleet.insecure or not secure_data)
    _, errors = fleet.each(used, lambda d: fleet.request(d, {"cmd": "publish", "deployment": deployment,
                                                             "generation": generation,
                                                             "endpoints": endpoints.to_dict()}))
    endpoints_path = save_endpoints(options.endpoints_path or build.dir / FILE_NAME, endpoints)
    placements = tuple(Placement(k, d, instance_id(k), build.stages[k].manifest_sha256, listen[(k, d)],
                                 results.get(d) if k == n - 1 else None) for k in range(n) for d in build.placement[k])
    state = DeploymentState(deployment, generation, build.model_id, str(build.stages[0].dir.parent), used, placements,
                            insecure=fleet.insecure, lost=options.lost)
    save_state(build.dir, state)
    # 6. devices the new plan no longer uses stop their stages and forget the deployment
    if prior is not None and not prior.stopped:
        dropped = [d for d in prior.devices if d not in used and d in fleet.targets and d not in options.lost]
        fleet.each(dropped, lambda d: fleet.request(d, {"cmd": "stop", "deployment": deployment, "release": True,
                                                        "drain": options.drain}, options.contact_timeout_s))
    if errors:
        for d, error in errors.items():
            report(d, error=f"endpoints not published: {error}")
    return DeployOutcome(state, endpoints, endpoints_path, tuple(r.copy() for r in reports.values()),
                         time.perf_counter() - started, timings)


def _started_as(instance: str, device: str, build: Build, prior: DeploymentState | None) -> str:
    """How a (re)started instance differs from what ran there: "replaced" (a new bundle), "rewired"
    (the same bundle, other neighbours or options) or "started" (nothing ran there)."""
    if prior is None or prior.stopped:
        return "started"
    before = next((p for p in prior.placements if p.device == device and p.instance == instance), None)
    if before is None:
        return "started"
    k = int(instance.rsplit("-", 1)[1])
    return "rewired" if before.manifest == build.stages[k].manifest_sha256 else "replaced"


def _wiring(build: Build, k: int, device: str, listen: dict[tuple[int, str], str], generation: int,
            options: DeployOptions) -> StageWiring:
    n = len(build.stages)
    nxt = build.placement[k + 1] if k + 1 < n else ()
    prev = build.placement[k - 1] if k > 0 else ()
    key = {d: build.devices[d].public_key for d in build.used_devices()}
    weights = build.weights[k + 1] if k + 1 < n else ()
    return StageWiring(
        id=instance_id(k),
        next=tuple(listen[(k + 1, d)] for d in nxt),
        next_keys=tuple(key[d] for d in nxt if key[d]) if all(key[d] for d in nxt) else (),
        next_weights=weights if len(nxt) > 1 and len(weights) == len(nxt) else (),
        upstream_keys=tuple(key[d] for d in prev if key[d]) if k > 0 else build.client_keys,
        client_keys=build.client_keys if k == n - 1 else (),
        threads=options.threads, max_batch=options.max_batch,
        codec=options.codec or (build.codecs[k] if k + 1 < n and build.codecs[k] != "raw" else None),
        generation=generation)


def _wait_ready(fleet: Fleet, launches: dict[tuple[str, str], str], timeout_s: float,
                on_ready: Callable[[str], None]) -> None:
    """Until every (device, instance) runs the expected launch and is ready; DeployError naming the
    first that failed, with its last log lines, or the ones still not ready at the deadline."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(launches)
    conns = {d: fleet.connect(d) for d in {d for d, _ in launches}}
    try:
        while waiting:
            for d in sorted({d for d, _ in waiting}):
                try:
                    status = conns[d].request({"cmd": "status"}, timeout_s=CONTACT_TIMEOUT_S)
                except ControlError as exc:
                    raise DeployError(f"{d}: lost while starting: {exc}") from None
                stages = {s["id"]: StageStatus.from_dict(s) for s in status.get("stages", [])}
                for (dev, iid), fp in list(waiting.items()):
                    if dev != d:
                        continue
                    st = stages.get(iid)
                    if st is None or st.launch != fp:
                        continue
                    if st.state == "ready":
                        del waiting[(dev, iid)]
                    elif st.state == "failed" or (st.last_exit and st.restarts >= 2 and st.state != "ready"):
                        tail = conns[d].request({"cmd": "logs", "stage": iid, "lines": 3}).get("lines", [])
                        why = st.last_error or st.last_exit or "failed"
                        raise DeployError(f"{d}: {iid} did not start: {why}" + (f" (log: {' | '.join(tail)})"
                                                                                 if tail else ""))
                if not any(dev == d for dev, _ in waiting):
                    on_ready(d)
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{i} on {d}" for d, i in sorted(waiting))
                raise DeployError(f"not ready after {timeout_s:g} s: {names}")
            time.sleep(POLL_S)
    finally:
        for conn in conns.values():
            conn.close()


def _rollback(fleet: Fleet, devices: Sequence[str], deployment: str, generation: int) -> str:
    """Undo ``generation`` on ``devices``; a note for the error message."""
    if not devices:
        return ""
    _, errors = fleet.each(list(devices), lambda d: fleet.request(
        d, {"cmd": "revert", "deployment": deployment, "generation": generation}, CONTACT_TIMEOUT_S))
    if errors:
        return f"; rolled back on {len(devices) - len(errors)} device(s), NOT on: " + "; ".join(errors.values())
    return f"; rolled back on {', '.join(devices)}"


def _unreachable(errors: dict[str, str], fleet: Fleet) -> str:
    parts = []
    for d, error in errors.items():
        hint = " (is `edgepipe-agent daemon` running there, and does it list this workstation's key?)" \
            if "no answer" in error else ""
        parts.append(f"cannot reach {d} at {fleet.targets[d].control}: {error.removeprefix(f'{d}: ')}{hint}")
    return "; ".join(parts)


# -- stop ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopOutcome:
    stopped: tuple[str, ...]
    unreachable: dict[str, str]
    seconds: float


def stop(state: DeploymentState, fleet: Fleet, build_dir: Path, *, drain: bool = True, timeout_s: float = 60.0,
         progress: Progress | None = None, endpoints_path: Path | None = None) -> StopOutcome:
    """Stop the deployment stage by stage from the first to the last, each draining its in-flight
    work into the next (still running) one; the devices forget the deployment. Unreachable devices
    are reported, the others still stopped."""
    started = time.perf_counter()
    unreachable: dict[str, str] = {}
    stopped: list[str] = []
    order: list[str] = []
    for k in range(state.stage_count()):
        order += [p.device for p in state.at(k) if p.device not in order]
    order += [d for d in state.devices if d not in order and d not in state.lost]
    for d in order:
        if d not in fleet.targets:
            unreachable[d] = f"{d}: not in the cluster file any more"
            continue
        if progress is not None:
            progress(DeviceProgress(d, (), state="stopping"))
        try:
            with fleet.connect(d) as conn:
                conn.request({"cmd": "stop", "deployment": state.deployment, "release": True, "drain": drain},
                             timeout_s=CONTACT_TIMEOUT_S)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    status = conn.request({"cmd": "status"}, timeout_s=CONTACT_TIMEOUT_S)
                    if not status.get("stages") and not status.get("stopping") and not status.get("busy"):
                        break
                    time.sleep(POLL_S)
                else:
                    raise ControlError(f"stages still running after {timeout_s:g} s")
            stopped.append(d)
            if progress is not None:
                progress(DeviceProgress(d, (), state="stopped"))
        except ControlError as exc:
            unreachable[d] = fleet.name(d, exc)
            if progress is not None:
                progress(DeviceProgress(d, (), state="failed", error=unreachable[d]))
    save_state(build_dir, replace(state, stopped=True, updated=time.time()))
    Path(endpoints_path or Path(build_dir) / FILE_NAME).unlink(missing_ok=True)
    return StopOutcome(tuple(stopped), unreachable, time.perf_counter() - started)
