"""Hosting stages on a device: ``edgepipe-agent serve`` child processes, kept running.

The device daemon decides *what* should run (a set of ``StageLaunch``, one per stage instance);
``StageHost`` makes it so and keeps it so, on one supervisor thread that owns every child process
and every socket it uses (the daemon's control thread only queues commands and reads snapshots):

- an instance whose launch is unchanged keeps running; a changed one is stopped (drained, or
  killed when the caller says so) and started again with the new launch; a removed one is stopped;
- a stage that exits while it should run is restarted after a backoff (0.5 s, doubling to 10 s;
  back to 0.5 s once it has run for 30 s). One that fails three times in a row before it is ready
  with exit code 2 (a bad bundle or option: restarting will not help) is left ``failed``;
- a stage is ``ready`` once it wrote its ready file; from then on its control endpoint (loopback
  only) is asked for ``status`` every 0.5 s. One that stops answering for ``hang_s`` while its
  process exists (stopped by a signal, deadlocked, swapping to death) is killed and restarted;
- before every start the bundle's manifest is hashed again and compared with the manifest sha256
  the workstation deployed, so a bundle changed on disk after deploy never starts.

The one place a ``serve`` command line is built is ``stage_command``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from edgepipe.agent.formats.bundle import MANIFEST_NAME, BundleError, read_manifest, sha256_file
from edgepipe.agent.formats.control import CONTROL_VERSION, Ports, StageStatus
from edgepipe.agent.transport import INSECURE, close_context, connect_control, new_context

log = logging.getLogger("edgepipe.agent.device.host")

TICK_S = 0.1
POLL_S = 0.5  # how often a ready stage's control endpoint is asked for status
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
HEALTHY_AFTER_S = 30.0  # a stage that ran this long starts its next backoff from the minimum again
GIVE_UP_AFTER = 3  # consecutive start-up failures with exit code 2
DEFAULT_HANG_S = 10.0
DEFAULT_DRAIN_S = 10.0
LOG_ROTATE_BYTES = 8 * 2**20
THROUGHPUT_KEYS = ("requests_out", "computed", "sent")  # the first counter found is "requests done"
# Whether stage_command gives the stages CurveZMQ data sockets (it does, unless the daemon is insecure).
SECURE_DATA_PLANE = True


class LaunchError(ValueError):
    """A launch asks for something this device's ``serve`` cannot do."""


@dataclass(frozen=True)
class StageLaunch:
    """Everything that decides how one stage instance runs. Two equal launches are the same running
    stage: applying an equal launch again leaves the process alone."""

    id: str
    bundle_dir: Path
    manifest: str  # sha256 of stage.json, checked before every start
    generation: int
    ports: Ports
    bind_host: str  # "*" or an address of this device
    device: str = ""  # this device's name (the stage's heartbeats, logs and status)
    deployment: str = ""
    next: tuple[str, ...] = ()  # downstream data endpoints; several are replicas
    next_keys: tuple[str, ...] = ()  # their public keys, in the same order
    next_weights: tuple[float, ...] = ()  # their shares of the work (the plan's replica weights)
    upstream_keys: tuple[str, ...] = ()  # who may send data in: the previous stage(s), or the clients
    client_keys: tuple[str, ...] = ()  # last stage: who may read results
    key_file: Path | None = None  # the device's secret key; None: the daemon runs --insecure, so do the stages
    threads: int = 1
    max_batch: int = 256
    codec: str | None = None
    cpus: str | None = None
    log_level: str = "info"
    drain_timeout_s: float = DEFAULT_DRAIN_S

    @property
    def fingerprint(self) -> str:
        """Short, stable identity of this launch (status reports it; ``start`` returns it)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]

    @property
    def listen(self) -> str:
        return f"tcp://{self.bind_host}:{self.ports.listen}"

    @property
    def results(self) -> str | None:
        return None if self.ports.results is None else f"tcp://{self.bind_host}:{self.ports.results}"

    @property
    def control(self) -> str:
        return f"tcp://127.0.0.1:{self.ports.control}"


def stage_command(launch: StageLaunch, ready_file: Path, parent_pid: int,
                  python: str = sys.executable) -> list[str]:
    """The ``edgepipe-agent serve`` command line for ``launch``: the only place it is built.

    Secure unless the daemon itself runs insecure: the stage uses the device's key, accepts data
    only from its upstream's key(s) (the clients' at stage 0), sends only to the next stage's
    key(s), and the last stage gives results only to the clients' keys."""
    if launch.next_keys and len(launch.next_keys) != len(launch.next):
        raise LaunchError(f"{launch.id}: {len(launch.next)} downstream endpoints but {len(launch.next_keys)} keys")
    if launch.key_file is not None and launch.next and len(launch.next_keys) != len(launch.next):
        raise LaunchError(f"{launch.id}: a secure stage needs the public key of every downstream endpoint")
    if launch.next_weights and len(launch.next_weights) != len(launch.next):
        raise LaunchError(f"{launch.id}: {len(launch.next)} downstream endpoints "
                          f"but {len(launch.next_weights)} weights")
    cmd = [python, "-m", "edgepipe.agent.cli", "serve", str(launch.bundle_dir), "--listen", launch.listen,
           "--control", launch.control, "--ready-file", str(ready_file), "--threads", str(launch.threads),
           "--max-batch", str(launch.max_batch), "--log-level", launch.log_level,
           "--drain-timeout-s", f"{launch.drain_timeout_s:g}", "--parent-pid", str(parent_pid),
           "--generation", str(launch.generation)]
    if launch.device:
        cmd += ["--device", launch.device]
    if launch.deployment:
        cmd += ["--deployment", launch.deployment]
    if launch.key_file is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--key", str(launch.key_file)]
        for key in launch.upstream_keys:
            cmd += ["--allow", key]
        for key in launch.client_keys:
            cmd += ["--allow-client", key]
    for i, endpoint in enumerate(launch.next):
        cmd += ["--next", endpoint]
        if launch.key_file is not None:
            cmd += ["--next-key", launch.next_keys[i]]
        if launch.next_weights:
            cmd += ["--next-weight", f"{launch.next_weights[i]:g}"]
    if launch.results is not None:
        cmd += ["--results", launch.results]
    if launch.codec:
        cmd += ["--codec", launch.codec]
    if launch.cpus:
        cmd += ["--cpus", launch.cpus]
    return cmd


@dataclass
class _Instance:
    """One stage instance's mutable record; only the supervisor thread touches it."""

    launch: StageLaunch
    model_id: str = "?"
    stage_index: int = -1
    stage_count: int = 0
    state: str = "starting"
    proc: subprocess.Popen | None = None
    restarts: int = 0
    hangs: int = 0
    failures: int = 0  # consecutive exits before ready
    backoff_s: float = BACKOFF_MIN_S
    start_at: float = 0.0  # monotonic time of the next start attempt
    started_at: float | None = None
    started_mono: float = 0.0
    ready_at: float | None = None
    last_exit: str | None = None
    last_error: str | None = None
    sock: zmq.Socket | None = None
    asked_at: float | None = None  # monotonic time of the outstanding status request
    answered_at: float | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    samples: deque = field(default_factory=lambda: deque(maxlen=20))  # (monotonic, requests done)
    killed_for: str | None = None


@dataclass
class _Retiring:
    id: str
    proc: subprocess.Popen
    kill_at: float
    ports: frozenset[int]


def _ports(launch: StageLaunch) -> frozenset[int]:
    return frozenset(p for p in (launch.ports.listen, launch.ports.results, launch.ports.control) if p)


class StageHost:
    """Runs stage instances as child processes. Thread-safe front: ``apply``, ``stop_all``,
    ``snapshot``; everything else happens on the thread started by ``start``."""

    def __init__(self, run_dir: Path, *, hang_s: float = DEFAULT_HANG_S, python: str = sys.executable) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "ready").mkdir(parents=True, exist_ok=True)
        self.hang_s = hang_s
        self.python = python
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._snapshot: dict[str, StageStatus] = {}
        self._retiring_view: list[dict[str, Any]] = []
        self._pending = 0  # commands queued but not applied yet (status must not look idle meanwhile)
        self._instances: dict[str, _Instance] = {}
        self._retiring: list[_Retiring] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None

    # -- front (any thread) -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stage-host", daemon=True)
        self._thread.start()

    def apply(self, launches: Mapping[str, StageLaunch], *, drain: bool = True) -> None:
        """Make exactly ``launches`` run (see the module docstring). Returns at once."""
        for launch in launches.values():
            stage_command(launch, Path("/"), 0)  # refuse what serve cannot do now, not on the thread
        self._queue(("apply", dict(launches), drain))

    def stop_all(self, *, drain: bool = True) -> None:
        self._queue(("apply", {}, drain))

    def _queue(self, command: tuple) -> None:
        with self._lock:
            self._pending += 1
        self._commands.put(command)

    @property
    def busy(self) -> bool:
        """Commands queued, or processes still stopping."""
        with self._lock:
            return self._pending > 0 or bool(self._retiring_view)

    def shutdown(self, *, drain: bool = True, timeout_s: float = 60.0) -> None:
        """Stop every stage and the supervisor thread (the daemon is exiting)."""
        if self._thread is None:
            return
        self.stop_all(drain=drain)
        self._commands.put(("quit",))
        self._thread.join(timeout_s)

    def snapshot(self) -> dict[str, StageStatus]:
        with self._lock:
            return dict(self._snapshot)

    def stopping(self) -> list[dict[str, Any]]:
        """Processes still stopping (draining) after being replaced or removed: ``[{id, pid}]``."""
        with self._lock:
            return list(self._retiring_view)

    def log_tail(self, instance_id: str, lines: int) -> list[str]:
        return _tail_lines(self._log_path(instance_id), lines)

    # -- the supervisor thread --------------------------------------------------------------------

    def _run(self) -> None:
        self._ctx = new_context()
        quitting = False
        try:
            while True:
                try:
                    command = self._commands.get(timeout=TICK_S)
                except queue.Empty:
                    command = None
                if command is not None and command[0] == "apply":
                    self._apply(command[1], command[2])
                    with self._lock:
                        self._pending -= 1
                elif command is not None and command[0] == "quit":
                    quitting = True
                self._tick()
                if quitting and not self._instances and not self._retiring:
                    return
        except Exception:  # a bug here must not leave stages unsupervised silently
            log.exception("stage host failed; stopping every stage")
            self._kill_everything()
        finally:
            for inst in self._instances.values():
                self._close_sock(inst)
            close_context(self._ctx)

    def _apply(self, launches: dict[str, StageLaunch], drain: bool) -> None:
        for iid in list(self._instances):
            inst = self._instances[iid]
            if launches.get(iid) == inst.launch:
                continue  # unchanged: leave it alone
            self._retire(inst, drain, "replaced" if iid in launches else "removed")
            del self._instances[iid]
        now = time.monotonic()
        for iid, launch in launches.items():
            if iid not in self._instances:
                self._instances[iid] = _Instance(launch, start_at=now)
        self._publish()

    def _retire(self, inst: _Instance, drain: bool, why: str) -> None:
        self._close_sock(inst)
        if inst.proc is None or inst.proc.poll() is not None:
            return
        log.info("stopping %s (pid %d, %s%s)", inst.launch.id, inst.proc.pid, why, ", draining" if drain else "")
        _signal(inst.proc, signal.SIGTERM if drain else signal.SIGKILL)
        grace = inst.launch.drain_timeout_s + 5.0 if drain else 5.0
        self._retiring.append(_Retiring(inst.launch.id, inst.proc, time.monotonic() + grace, _ports(inst.launch)))

    def _tick(self) -> None:
        now = time.monotonic()
        for r in list(self._retiring):
            if r.proc.poll() is not None:
                self._retiring.remove(r)
                log.info("%s (pid %d) stopped: %s", r.id, r.proc.pid, _describe_exit(r.proc.returncode))
            elif now >= r.kill_at:
                log.warning("%s (pid %d) did not stop in time; killing it", r.id, r.proc.pid)
                _signal(r.proc, signal.SIGKILL)
                r.kill_at = now + 5.0
        held = frozenset().union(*(r.ports for r in self._retiring))
        for inst in self._instances.values():
            self._watch(inst, now, held)
        self._publish()

    def _watch(self, inst: _Instance, now: float, held: frozenset[int]) -> None:
        proc = inst.proc
        if proc is None:
            if inst.state == "failed" or now < inst.start_at or _ports(inst.launch) & held:
                return  # a stopping process still holds one of its ports
            self._spawn(inst, now)
            return
        code = proc.poll()
        if code is not None:
            self._exited(inst, code, now)
            return
        if inst.state == "starting" and self._ready_file(inst.launch.id).exists():
            inst.state, inst.ready_at, inst.failures = "ready", time.time(), 0
            inst.answered_at = now
            log.info("%s ready (pid %d, generation %d)", inst.launch.id, proc.pid, inst.launch.generation)
        if inst.state == "ready":
            self._health(inst, now)

    def _spawn(self, inst: _Instance, now: float) -> None:
        launch = inst.launch
        ready = self._ready_file(launch.id)
        ready.unlink(missing_ok=True)
        try:
            _check_manifest(launch)
            manifest = read_manifest(launch.bundle_dir)
            inst.model_id, inst.stage_index, inst.stage_count = (manifest.model_id, manifest.stage_index,
                                                                 manifest.stage_count)
            cmd = stage_command(launch, ready, os.getpid(), self.python)
            log_path = self._log_path(launch.id)
            _rotate(log_path)
            with open(log_path, "ab") as fh:
                fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} edgepipe-agent daemon starts "
                         f"{launch.id} (generation {launch.generation}): {' '.join(cmd)}\n".encode())
                fh.flush()
                inst.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        except (BundleError, LaunchError, OSError) as exc:
            inst.state, inst.last_error, inst.last_exit = "failed", str(exc), "not started"
            log.error("%s cannot start: %s", launch.id, exc)
            return
        inst.state, inst.started_at, inst.started_mono, inst.ready_at = "starting", time.time(), now, None
        inst.asked_at = inst.answered_at = None
        inst.killed_for = None
        log.info("started %s (pid %d): stage %d/%d of %s, listen %s%s", launch.id, inst.proc.pid,
                 inst.stage_index, inst.stage_count, inst.model_id, launch.listen,
                 f", next {','.join(launch.next)}" if launch.next else f", results {launch.results}")

    def _exited(self, inst: _Instance, code: int, now: float) -> None:
        self._close_sock(inst)
        was_ready = inst.state == "ready"
        how = inst.killed_for or _describe_exit(code)
        inst.proc, inst.last_exit = None, how
        inst.last_error = _last_error(self._log_path(inst.launch.id)) or inst.last_error
        if not was_ready:
            inst.failures += 1
        if code == 2 and inst.failures >= GIVE_UP_AFTER:
            inst.state = "failed"
            log.error("%s failed %d times before it was ready (%s); giving up: %s", inst.launch.id,
                      inst.failures, how, inst.last_error)
            return
        delay = BACKOFF_MIN_S if now - inst.started_mono >= HEALTHY_AFTER_S else inst.backoff_s
        inst.backoff_s = min(delay * 2, BACKOFF_MAX_S)
        inst.restarts += 1
        inst.state, inst.start_at = "restarting", now + delay
        log.warning("%s (generation %d) %s; restarting in %.1f s (restart %d)%s", inst.launch.id,
                    inst.launch.generation, how, delay, inst.restarts,
                    f": {inst.last_error}" if inst.last_error else "")

    def _health(self, inst: _Instance, now: float) -> None:
        """Ask the stage for status every POLL_S; kill it if it has not answered for hang_s."""
        if inst.sock is None:
            inst.sock = connect_control(self._ctx, inst.launch.control, auth=INSECURE)
        if inst.asked_at is not None and inst.sock.poll(0, zmq.POLLIN):
            try:
                reply = msgpack.unpackb(inst.sock.recv_multipart()[-1], raw=False)
            except Exception:  # a garbled reply counts as no reply
                reply = None
            if isinstance(reply, dict) and reply.get("ok"):
                inst.answered_at, inst.asked_at = now, None
                stage = reply.get("stage")
                if isinstance(stage, dict):
                    inst.counters = stage
                    done = next((stage[k] for k in THROUGHPUT_KEYS if isinstance(stage.get(k), int)), None)
                    if done is not None:
                        inst.samples.append((now, done))
        silent = now - (inst.answered_at or inst.started_mono)
        if silent > self.hang_s and inst.proc is not None:
            inst.hangs += 1
            inst.killed_for = f"killed: hung (control endpoint silent for {silent:.1f} s)"
            log.warning("%s (pid %d) hung: its control endpoint has not answered for %.1f s; killing it",
                        inst.launch.id, inst.proc.pid, silent)
            _signal(inst.proc, signal.SIGKILL)
            return
        if inst.asked_at is None and now - (inst.answered_at or 0) >= POLL_S:
            try:
                inst.sock.send_multipart([b"", msgpack.packb({"v": CONTROL_VERSION, "cmd": "status", "id": 0})],
                                         flags=zmq.NOBLOCK)
                inst.asked_at = now
            except zmq.Again:
                pass

    def _close_sock(self, inst: _Instance) -> None:
        if inst.sock is not None:
            inst.sock.close(0)
            inst.sock = None
        inst.asked_at = None

    def _kill_everything(self) -> None:
        for inst in self._instances.values():
            if inst.proc is not None:
                _signal(inst.proc, signal.SIGKILL)
        for r in self._retiring:
            _signal(r.proc, signal.SIGKILL)

    def _publish(self) -> None:
        now = time.monotonic()
        snap = {}
        for iid, inst in self._instances.items():
            l_ = inst.launch
            snap[iid] = StageStatus(
                id=iid, state=inst.state, generation=l_.generation, manifest=l_.manifest, model_id=inst.model_id,
                stage_index=inst.stage_index, stage_count=inst.stage_count, ports=l_.ports, next=l_.next,
                pid=inst.proc.pid if inst.proc is not None else None, restarts=inst.restarts, hangs=inst.hangs,
                started_at=inst.started_at, ready_at=inst.ready_at, last_exit=inst.last_exit,
                last_error=inst.last_error,
                heartbeat_age_s=None if inst.answered_at is None else round(now - inst.answered_at, 3),
                counters=dict(inst.counters), throughput=_rate(inst.samples), launch=l_.fingerprint)
        retiring = [{"id": r.id, "pid": r.proc.pid} for r in self._retiring]
        with self._lock:
            self._snapshot = snap
            self._retiring_view = retiring

    def _ready_file(self, instance_id: str) -> Path:
        return self.run_dir / "ready" / f"{instance_id}.json"

    def _log_path(self, instance_id: str) -> Path:
        return self.run_dir / "logs" / f"{instance_id}.log"


def _check_manifest(launch: StageLaunch) -> None:
    actual = sha256_file(launch.bundle_dir / MANIFEST_NAME)
    if actual != launch.manifest:
        raise BundleError(f"{launch.bundle_dir / MANIFEST_NAME}: hashes to {actual[:12]}, the workstation "
                          f"deployed {launch.manifest[:12]}: changed on this device; not started")


def _rate(samples: Iterable[tuple[float, int]]) -> float | None:
    points = list(samples)
    if len(points) < 2 or points[-1][0] - points[0][0] < 0.5:
        return None
    (t0, n0), (t1, n1) = points[0], points[-1]
    return max(0.0, (n1 - n0) / (t1 - t0))


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
        if signum == signal.SIGKILL:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    except (ProcessLookupError, OSError):
        pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _rotate(path: Path) -> None:
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass


def _tail_lines(path: Path, lines: int, max_bytes: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def _last_error(path: Path) -> str | None:
    for line in reversed(_tail_lines(path, 40)):
        if " ERROR " in line or " WARNING " in line or "error:" in line:
            return line.strip()[-300:]
    return None


