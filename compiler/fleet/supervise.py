"""Keep a deployment running: heartbeat every device, fail over when one is lost, take it back.

``edgepipe-fleet supervise BUILD`` (or ``deploy --watch``):

1. makes the standby bundles for every single-device loss in the background (standby.py) and
   pre-sends them, so a failover transfers no bulk data;
2. pings every device's daemon every 0.25 s over a lasting connection; a device silent for
   ``loss_s`` (1.5 s) is **lost**: it is named, the deployment is redeployed without it (the
   standby plan for that loss, or a fresh re-plan for a second loss) with a higher generation,
   replaced stages are killed rather than drained (their in-flight work is the client's to
   resend), and endpoints.json and the daemons' ``route`` answer the new generation, which is
   how clients find it;
3. when a lost device answers again for ``take_back_after_s``, its stale stages are stopped and,
   with ``take_back``, the deployment goes back to the plan that uses it.

Events (lost, failover, back, taken back, standby ready) are logged as lines and, with
``events``, appended as JSON lines (what the benchmark reads).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from edgepipe.agent.control_client import ControlConnection
from edgepipe.agent.formats.control import ControlError
from edgepipe.compiler.fleet.build import Build, BuildError, load_build
from edgepipe.compiler.fleet.deploy import DeployError, DeployOptions, Fleet, deploy
from edgepipe.compiler.fleet.standby import (
    Standby,
    StandbyError,
    load_standby,
    make_standby,
    presend,
    write_ready,
)
from edgepipe.compiler.fleet.state import DeploymentState, load_state

LOSS_S = 1.5
PING_S = 0.25
TAKE_BACK_AFTER_S = 5.0


class SuperviseError(RuntimeError):
    """The deployment cannot be supervised (nothing deployed, no problem to re-plan from)."""


@dataclass(frozen=True)
class SuperviseOptions:
    cluster: Path | None = None
    loss_s: float = LOSS_S
    ping_s: float = PING_S
    standby: bool = True
    verify_standby: bool = True
    take_back: bool = True
    take_back_after_s: float = TAKE_BACK_AFTER_S
    threads: int = 1
    max_batch: int = 256
    ready_timeout_s: float = 120.0
    events: Path | None = None  # JSON lines


class _Events:
    def __init__(self, path: Path | None, log: Callable[[str], None]) -> None:
        self.path, self.log = path, log
        self.lock = threading.Lock()

    def __call__(self, event: str, line: str, **fields: Any) -> None:
        stamp = time.time()
        self.log(f"{time.strftime('%H:%M:%S')} {line}")
        if self.path is not None:
            with self.lock, open(self.path, "a") as fh:
                fh.write(json.dumps({"t": stamp, "event": event, **fields}) + "\n")


def supervise(build_dir: Path, fleet: Fleet, options: SuperviseOptions = SuperviseOptions(),
              log: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Supervise until ``stop`` is set (or forever). See the module docstring."""
    stop = stop or threading.Event()
    emit = _Events(options.events, log)
    state = load_state(build_dir)
    if state is None or state.stopped:
        raise SuperviseError(f"{build_dir}: nothing deployed from here; run edgepipe-fleet deploy first")
    original = load_build(build_dir, cluster_path=options.cluster, devices=_original_devices(build_dir, state),
                          insecure=fleet.insecure)
    standbys: dict[tuple[str, ...], Standby] = {}
    if options.standby:
        threading.Thread(target=_prepare_standbys, name="standby", daemon=True,
                         args=(original, fleet, options, standbys, emit, stop)).start()
    watched = {d: _Watch(d) for d in (*state.devices, *state.lost)}
    conns: dict[str, ControlConnection] = {}
    emit("supervising", f"supervising {state.deployment} generation {state.generation} on "
         f"{', '.join(state.devices)} (lost after {options.loss_s:g} s of silence)",
         deployment=state.deployment, generation=state.generation)
    try:
        while not stop.is_set():
            _ping_round(fleet, watched, conns, options.ping_s)
            now = time.monotonic()
            for w in watched.values():
                if w.device not in state.lost:
                    continue
                if now - w.last_seen > options.loss_s:
                    w.back_since = None
                elif w.back_since is None:
                    w.back_since = now
                    emit("back", f"{w.device} answers again", device=w.device)
                    _release(fleet, w.device, state)
            silent = [w for w in watched.values()
                      if w.device in state.devices and w.device not in state.lost
                      and now - w.last_seen > options.loss_s]
            if silent:
                state = _fail_over(build_dir, fleet, original, standbys, state, silent, options, emit)
                _resume(watched, state)
            if options.take_back:
                back = [w for w in watched.values() if w.device in state.lost and w.back_since is not None
                        and time.monotonic() - w.back_since >= options.take_back_after_s]
                if back:
                    taken = _take_back(build_dir, fleet, original, standbys, state, [w.device for w in back],
                                       options, emit)
                    if taken is None:
                        for w in back:
                            w.back_since = time.monotonic()  # try again later
                    else:
                        state = taken
                        _resume(watched, state)
    finally:
        for conn in conns.values():
            conn.close()


@dataclass
class _Watch:
    device: str
    last_seen: float = 0.0
    back_since: float | None = None
    asked: str | None = None  # id of the outstanding ping

    def __post_init__(self) -> None:
        self.last_seen = time.monotonic()


def _resume(watched: dict[str, _Watch], state: DeploymentState) -> None:
    """After a redeploy (seconds without pings): every device of it starts a fresh silence count."""
    now = time.monotonic()
    for d in (*state.devices, *state.lost):
        watched.setdefault(d, _Watch(d))
    for d in state.devices:
        watched[d].last_seen = max(watched[d].last_seen, now)


def _ping_round(fleet: Fleet, watched: dict[str, _Watch], conns: dict[str, ControlConnection], ping_s: float) -> None:
    """One ping to every device that has none outstanding; collect replies for ``ping_s``."""
    poller = zmq.Poller()
    by_socket = {}
    for w in watched.values():
        if w.device not in fleet.targets:
            continue
        conn = conns.get(w.device)
        if conn is None:
            try:
                conn = conns[w.device] = fleet.connect(w.device)
            except ControlError:
                continue
        if w.asked is None:
            try:
                w.asked = conn.send({"cmd": "ping"}, timeout_s=0)
            except (ControlError, zmq.ZMQError):
                w.asked = None
        poller.register(conn.socket, zmq.POLLIN)
        by_socket[conn.socket] = (w, conn)
    deadline = time.monotonic() + ping_s
    while (remaining := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(max(1, int(remaining * 1000))):
            w, conn = by_socket[sock]
            try:
                reply = conn.receive(0.0)
            except ControlError:
                continue
            if reply.get("id") == w.asked:
                w.asked, w.last_seen = None, time.monotonic()
    now = time.monotonic()
    for w in watched.values():
        # A ping unanswered for long: ask again on a new connection (a restarted daemon never answers
        # the old one, and a fresh connection does not wait behind a stuck one).
        if w.asked is not None and now - w.last_seen > 4 * ping_s and w.device in conns:
            conns.pop(w.device).close()
            w.asked = None


def _fail_over(build_dir: Path, fleet: Fleet, original: Build, standbys: dict[tuple[str, ...], Standby],
               state: DeploymentState, silent: list[_Watch], options: SuperviseOptions,
               emit: _Events) -> DeploymentState:
    now = time.monotonic()
    for w in silent:
        stages = [p.stage for p in state.placements if p.device == w.device]
        emit("lost", f"lost {w.device} (stage {', '.join(map(str, stages)) or '-'}): no answer for "
             f"{now - w.last_seen:.1f} s", device=w.device, silent_s=round(now - w.last_seen, 3), stages=stages)
    gone = (*state.lost, *(w.device for w in silent))
    started = time.monotonic()
    try:
        build, how = _build_without(build_dir, original, standbys, gone, options, emit)
        outcome = deploy(build, fleet, DeployOptions(drain=False, threads=options.threads, max_batch=options.max_batch,
                                                     ready_timeout_s=options.ready_timeout_s, lost=gone,
                                                     contact_timeout_s=2.0), prior=state)
    except (DeployError, StandbyError, BuildError, ControlError) as exc:
        emit("failover_failed", f"failover without {', '.join(gone)} failed: {exc}; still watching",
             devices=list(gone), error=str(exc))
        for w in silent:
            w.last_seen = time.monotonic()  # try again after another loss_s
        return state
    sent = sum(d.sent for d in outcome.devices)
    emit("failover", f"failed over to generation {outcome.state.generation} on {', '.join(outcome.state.devices)} "
         f"({how}, {sent / 2**20:.1f} MiB sent) in {time.monotonic() - started:.1f} s",
         generation=outcome.state.generation, devices=list(outcome.state.devices), lost=list(gone),
         seconds=round(time.monotonic() - started, 3), sent_bytes=sent, how=how)
    return outcome.state


def _take_back(build_dir: Path, fleet: Fleet, original: Build, standbys: dict[tuple[str, ...], Standby],
               state: DeploymentState, back: list[str], options: SuperviseOptions,
               emit: _Events) -> DeploymentState | None:
    still = tuple(d for d in state.lost if d not in back)
    try:
        build, how = (original, "the original plan") if not still else \
            _build_without(build_dir, original, standbys, still, options, emit)
        outcome = deploy(build, fleet, DeployOptions(threads=options.threads, max_batch=options.max_batch,
                                                     ready_timeout_s=options.ready_timeout_s, lost=still),
                         prior=state)
    except (DeployError, StandbyError, BuildError, ControlError) as exc:
        emit("take_back_failed", f"taking back {', '.join(back)} failed: {exc}", devices=back, error=str(exc))
        return None
    emit("taken_back", f"took back {', '.join(back)}: generation {outcome.state.generation} on "
         f"{', '.join(outcome.state.devices)} ({how})", devices=back, generation=outcome.state.generation)
    return outcome.state


def _build_without(build_dir: Path, original: Build, standbys: dict[tuple[str, ...], Standby],
                   gone: tuple[str, ...], options: SuperviseOptions, emit: _Events) -> tuple[Build, str]:
    key = tuple(sorted(gone))
    standby = standbys.get(key)
    how = "standby plan, made before the loss"
    if standby is None:
        how = "re-planned and sliced after the loss"
        standby = make_standby(original, key, verify=options.verify_standby, log=lambda line: emit("standby", line))
        standbys[key] = standby
    return load_standby(build_dir, standby, options.cluster), how


def _prepare_standbys(original: Build, fleet: Fleet, options: SuperviseOptions,
                      standbys: dict[tuple[str, ...], Standby], emit: _Events, stop: threading.Event) -> None:
    started = time.monotonic()
    made = []
    for device in original.used_devices():
        if stop.is_set():
            return
        try:
            standby = make_standby(original, (device,), verify=options.verify_standby,
                                   log=lambda line: emit("standby", line))
        except StandbyError as exc:
            emit("standby_failed", f"no standby for losing {device}: {exc}", device=device, error=str(exc))
            continue
        standbys[(device,)] = standby
        made.append(standby)
    builds = [original]
    for standby in made:
        try:
            builds.append(load_standby(original.dir, standby, options.cluster))
        except StandbyError as exc:
            emit("standby_failed", str(exc), error=str(exc))
    sent = presend(fleet, builds, log=lambda line: emit("standby", line))
    write_ready(original.dir, made, sent)
    emit("standby_ready", f"standby bundles for {len(made)} single-device loss(es) ready and pre-sent "
         f"({sum(a for a, _ in sent.values()) / 2**20:.1f} MiB sent) in {time.monotonic() - started:.1f} s",
         losses=[list(s.lost) for s in made], sent_bytes=sum(a for a, _ in sent.values()))


def _release(fleet: Fleet, device: str, state: DeploymentState) -> None:
    """A lost device came back: stop whatever stale stages it restored."""
    with contextlib.suppress(ControlError):
        fleet.request(device, {"cmd": "stop", "deployment": state.deployment, "release": True, "drain": False},
                      timeout_s=5.0)


def _original_devices(build_dir: Path, state: DeploymentState) -> list[str] | None:
    """The devices of a build deployed with --devices (no plan): where its stages run now."""
    if (Path(build_dir) / "plan.json").is_file():
        return None
    if state.lost:
        raise SuperviseError(f"{build_dir}: no plan.json, and the deployment already lost devices")
    return [p.device for p in sorted(state.placements, key=lambda p: p.stage)]
