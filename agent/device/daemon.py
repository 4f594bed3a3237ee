"""The device daemon: one long-lived process per device that the workstation operates.

``edgepipe-agent daemon`` (alias ``control``) binds a ROUTER socket owned by one thread and speaks
the control protocol (docs/formats/control.md; messages in formats/control.py):

- **Secure by default.** A CurveZMQ server with the device's key; only the workstation keys in
  its ``authorized_keys`` (operators) get a handshake, plus the client keys (``route``, ``ping``)
  and peer device keys (``echo``) that an operator listed. Nothing from anyone else reaches this
  code. ``--insecure`` (by name, with a warning) accepts anyone as an operator.
- **Bundle store** (store.py): ``have``/``put`` upload files by sha256 in chunks, checked on
  arrival, after a free-space check; nothing already there is sent again.
- **Deployments**: ``prepare`` builds and verifies the stage bundles of a new generation from
  the store (the manifest sha256 comes with the request, over the authenticated channel) and
  reserves their ports; ``start`` makes the prepared generation run (unchanged instances keep
  running), ``stop`` drains and stops, ``revert`` goes back to the previous generation (the
  workstation's rollback), ``publish`` stores the deployment's endpoints and ``route`` hands them
  to clients that lost their entry or exit. A device serves one deployment at a time: another
  deployment is refused unless it asks to replace it.
- **Stages** run as ``edgepipe-agent serve`` children (host.py): restarted when they crash,
  killed and restarted when they hang, reported by ``status``.
- ``profile``, ``probe``, ``echo``: measuring the device and its links for the planner.

Slow commands (``prepare``, ``profile``, ``probe``) run on a worker thread, one at a time, so
``ping`` and ``status`` are answered within milliseconds even while a bundle is being hashed: the
workstation's supervisor declares a device lost after 1.5 s of silence. A bad or failing request
gets an error reply; nothing a peer sends stops the daemon. The deployment state is kept in
``STATE_DIR/state.json``, so a restarted daemon (reboot, upgrade) starts its stages again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import queue
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack
import onnxruntime as ort
import zmq
from edgepipe.agent.device.host import (
    DEFAULT_DRAIN_S,
    DEFAULT_HANG_S,
    SECURE_DATA_PLANE,
    LaunchError,
    StageHost,
    StageLaunch,
)
from edgepipe.agent.device.profiler import host_facts, profile_bundle
from edgepipe.agent.device.session import SessionError
from edgepipe.agent.device.store import DEFAULT_RESERVE_BYTES, BundleStore, StoreError, link_or_copy
from edgepipe.agent.formats.bundle import BundleError, load_bundle
from edgepipe.agent.formats.control import (
    CLIENT,
    COMMANDS,
    CONTROL_VERSION,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_CHUNK_BYTES,
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_KEYS,
    MAX_LOG_LINES,
    MAX_MICROBATCH,
    MAX_PROBE_BYTES,
    MAX_PROBE_COUNT,
    MAX_PROBE_SECONDS,
    MAX_REPEATS,
    MAX_STAGES,
    OPERATOR,
    PEER,
    TINY_BYTES,
    BadRequest,
    Ports,
    StageBundleRef,
    StageWiring,
    check_role,
    float_in,
    int_in,
    key_list,
    name_field,
    parse_request,
    sha256_hex,
    sha256_list,
)
from edgepipe.agent.formats.keys import KeyPair, load_key_list
from edgepipe.agent.formats.profiles import ProfileError, load_profile_bundle, profile_to_dict
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    ServerAuth,
    allow_keys,
    bind_control,
    bound_endpoint,
    close_context,
    connect_control,
    new_context,
    peer_key,
    recv_frames,
)

log = logging.getLogger("edgepipe.agent.device.daemon")

STATE_FORMAT = "edgepipe.daemon-state"
STATE_VERSION = 1
SLOW_COMMANDS = frozenset({"prepare", "profile", "probe"})
MAX_QUEUED_SLOW = 4
DEFAULT_DATA_PORTS = (5550, 5599)


# -- the stage's own control endpoint (``serve --control``) ------------------------------------------

@dataclass(frozen=True)
class ControlConfig:
    """A plain control endpoint without store or stages: what ``edgepipe-agent serve --control``
    answers (status, probe, echo) about the running stage. ``stage_status`` gives the stage
    runtime's counters, sent under ``stage`` in the status reply."""

    listen: str
    device: str
    threads: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ready_file: Path | None = None
    commands: tuple[str, ...] = ("status", "ping", "probe", "echo")
    stage_status: Callable[[], dict[str, Any]] | None = None  # a serving agent's counters


def start_control_thread(config: ControlConfig, stop: threading.Event) -> threading.Thread:
    """Bind now (a bad address raises TransportError here) and answer in a daemon thread until
    ``stop`` is set. Plaintext: the device daemon asks it over loopback."""
    ctx = new_context()
    try:
        sock = bind_control(ctx, config.listen, auth=INSECURE, max_frame_bytes=config.max_request_bytes)
    except BaseException:
        close_context(ctx)
        raise
    if config.ready_file is not None:
        _write_json(config.ready_file, {"pid": os.getpid(), "listen": bound_endpoint(sock)})

    def answer(frames: list[zmq.Frame]) -> list[bytes]:
        return handle(config, ctx, frames)

    thread = threading.Thread(target=_serve_plain, args=(ctx, sock, stop, answer), name="control", daemon=True)
    thread.start()
    return thread


def _serve_plain(ctx: zmq.Context, sock: zmq.Socket, stop: threading.Event,
                 answer: Callable[[list[zmq.Frame]], list[bytes]]) -> None:
    try:
        while not stop.is_set():
            if not sock.poll(200, zmq.POLLIN):
                continue
            frames = recv_frames(sock, MAX_FILES + 3)
            reply = _envelope_error(frames) or answer(frames[2:])
            _send_reply(sock, frames[0], reply)
    finally:
        sock.close()
        close_context(ctx)


def handle(config: ControlConfig, ctx: zmq.Context, frames: Sequence[Any]) -> list[bytes]:
    """One request to a plain control endpoint in, one reply out; every failure is an error reply."""
    request_id = None
    try:
        header, raw = parse_request(frames)
        request_id = header.get("id")
        command = header["cmd"]
        if command not in config.commands:
            raise BadRequest(f"command {command!r} is not offered here (offered: {', '.join(config.commands)})")
        if command in ("status", "ping"):
            body = status_facts(config.device, config.threads, config.max_request_bytes, config.commands)
            if config.stage_status is not None:
                body["stage"] = config.stage_status()
        elif command == "echo":
            body = {"bytes": sum(len(f) for f in raw)}
        else:
            body = _probe(ctx, header, None)
        return [_ok(request_id, body)]
    except BadRequest as exc:
        return [_error(request_id, str(exc))]
    except Exception as exc:  # a failing request never takes the endpoint down
        log.exception("control request failed")
        return [_error(request_id, f"{type(exc).__name__}: {exc}")]


# -- the device daemon ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DaemonConfig:
    listen: str
    device: str
    state_dir: Path
    keypair: KeyPair | None  # None: insecure mode (the user asked for it by name)
    authorized_keys: tuple[str, ...] = ()  # key-list sources of the operators (re-read on SIGHUP)
    key_file: Path | None = None  # the secret key file, handed to stages for their data sockets
    threads: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ready_file: Path | None = None
    data_bind: str = "*"
    data_ports: tuple[int, int] | None = DEFAULT_DATA_PORTS  # None: ports the OS picks
    hang_s: float = DEFAULT_HANG_S
    drain_timeout_s: float = DEFAULT_DRAIN_S
    store_quota_bytes: int | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    stage_log_level: str = "info"

    @property
    def secure(self) -> bool:
        return self.keypair is not None


@dataclass(frozen=True)
class Instance:
    """A stage instance of a generation: its bundle (by content), ports, and (once started) wiring."""

    ref: StageBundleRef
    ports: Ports
    bundle_dir: str
    wiring: StageWiring | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref.to_dict(), "ports": self.ports.to_dict(), "bundle_dir": self.bundle_dir,
                "wiring": None if self.wiring is None else self.wiring.to_dict()}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Instance:
        return Instance(StageBundleRef.from_dict(raw["ref"]), Ports.from_dict(raw["ports"]), str(raw["bundle_dir"]),
                        None if raw.get("wiring") is None else StageWiring.from_dict(raw["wiring"]))


@dataclass(frozen=True)
class Generation:
    deployment: str
    generation: int
    instances: tuple[Instance, ...]
    clients: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "generation": self.generation,
                "instances": [i.to_dict() for i in self.instances], "clients": list(self.clients),
                "peers": list(self.peers)}

    @staticmethod
    def from_dict(raw: dict[str, Any] | None) -> Generation | None:
        if raw is None:
            return None
        return Generation(str(raw["deployment"]), int(raw["generation"]),
                          tuple(Instance.from_dict(i) for i in raw["instances"]),
                          tuple(raw.get("clients", ())), tuple(raw.get("peers", ())))

    def hashes(self) -> frozenset[str]:
        return frozenset(h for i in self.instances for h in i.ref.all_hashes)


@dataclass(frozen=True)
class DaemonState:
    """What survives a daemon restart (STATE_DIR/state.json)."""

    current: Generation | None = None
    previous: Generation | None = None  # what ``revert`` goes back to
    running: bool = False
    operator: str | None = None  # the key that deployed the current generation
    since: float | None = None
    endpoints: dict[str, Any] | None = None  # published for ``route``
    pins: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()  # peer device keys set outside a deployment (profiling)

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                "current": None if self.current is None else self.current.to_dict(),
                "previous": None if self.previous is None else self.previous.to_dict(),
                "running": self.running, "operator": self.operator, "since": self.since,
                "endpoints": self.endpoints, "pins": list(self.pins), "peers": list(self.peers)}

    @staticmethod
    def from_dict(raw: Any) -> DaemonState:
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT or raw.get("format_version") != STATE_VERSION:
            raise ValueError("not an edgepipe daemon state file of this version")
        return DaemonState(Generation.from_dict(raw.get("current")), Generation.from_dict(raw.get("previous")),
                           bool(raw.get("running")), raw.get("operator"), raw.get("since"), raw.get("endpoints"),
                           tuple(raw.get("pins", ())), tuple(raw.get("peers", ())))


class DeviceDaemon:
    """The daemon's state and command handlers. ``run_daemon`` owns the socket and calls
    ``handle`` from its thread; slow commands run on its worker thread."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.started = time.time()
        self.store = BundleStore(config.state_dir / "store", quota_bytes=config.store_quota_bytes,
                                 reserve_bytes=config.reserve_bytes)
        self.host = StageHost(config.state_dir / "run", hang_s=config.hang_s)
        self.state_path = config.state_dir / "state.json"
        self.state = self._load_state()
        self.store.pin(self.state.pins)
        self.prepared: Generation | None = None
        self.preparing: frozenset[str] = frozenset()  # objects a running prepare reads: never evicted
        self.operators = self._load_operators()
        self.keys_changed = True
        self._request = threading.local()  # the asker's key, per thread (the loop and the slow worker)

    # -- lifetime -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.host.start()
        current = self.state.current
        if self.state.running and current is not None and all(i.wiring for i in current.instances):
            log.info("restoring deployment %r generation %d (%d stage(s))", current.deployment, current.generation,
                     len(current.instances))
            try:
                self.host.apply(self._launches(current))
            except ValueError as exc:
                log.error("cannot restore the stages: %s", exc)

    def shutdown(self, drain: bool = True) -> None:
        self.host.shutdown(drain=drain, timeout_s=self.config.drain_timeout_s + 15)

    def reload_operators(self) -> None:
        self.operators = self._load_operators()
        self.keys_changed = True
        log.info("authorized keys reloaded: %d operator key(s)", len(self.operators))

    def _load_operators(self) -> frozenset[bytes]:
        if not self.config.secure:
            return frozenset()
        return load_key_list(self.config.authorized_keys)

    def allowed_keys(self) -> frozenset[bytes]:
        extra = set(self.state.peers)
        if self.state.current is not None:
            extra |= set(self.state.current.clients) | set(self.state.current.peers)
        return self.operators | {k.encode() for k in extra}

    def role_of(self, key: str | None) -> str:
        if not self.config.secure:
            return OPERATOR
        if key is None:  # cannot happen on a CURVE socket; refuse rather than guess
            return "unknown"
        if key.encode() in self.operators:
            return OPERATOR
        current = self.state.current
        if current is not None and key in current.clients:
            return CLIENT
        if key in self.state.peers or (current is not None and key in current.peers):
            return PEER
        return "unknown"

    # -- requests -----------------------------------------------------------------------------------

    def handle(self, role: str, asker: str | None, header: dict[str, Any], raw: list[bytes],
               ctx: zmq.Context) -> dict[str, Any]:
        command = header["cmd"]
        check_role(role, command)
        self._request.asker = asker
        handler = getattr(self, f"_cmd_{command}")
        body = handler(header, raw, ctx) if command in ("profile", "probe") else handler(header, raw)
        if command in ("prepare", "start", "stop", "revert", "publish", "pin", "peers"):
            log.info("%s by %s: %s", command, _key_label(asker), _summary(command, header, body))
        return body

    def _cmd_status(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        usage = self.store.usage()
        current = self.state.current
        return {
            **status_facts(self.config.device, self.config.threads, self.config.max_request_bytes, COMMANDS),
            "secure": self.config.secure,
            "secure_data": self.config.secure and SECURE_DATA_PLANE,
            "public_key": None if self.config.keypair is None else self.config.keypair.public_text,
            "daemon_pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "store": {"objects": usage.objects, "bytes": usage.object_bytes, "partial_bytes": usage.partial_bytes,
                      "free_bytes": usage.free_bytes, "quota_bytes": usage.quota_bytes},
            "deployment": None if current is None else {
                "id": current.deployment, "generation": current.generation, "running": self.state.running,
                "operator": self.state.operator, "since": self.state.since,
                "published_generation": (self.state.endpoints or {}).get("generation")},
            "prepared": None if self.prepared is None else {"id": self.prepared.deployment,
                                                            "generation": self.prepared.generation},
            "stages": [s.to_dict() for s in self.host.snapshot().values()],
            "stopping": self.host.stopping(), "busy": self.host.busy,
        }

    def _cmd_ping(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        current = self.state.current
        return {"device": self.config.device, "time": time.time(),
                "deployment": None if current is None else current.deployment,
                "generation": None if current is None else current.generation, "running": self.state.running,
                "stages": {s.id: s.state for s in self.host.snapshot().values()}}

    def _cmd_echo(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        return {"bytes": sum(len(f) for f in raw)}

    def _cmd_profile(self, header: dict[str, Any], raw: list[bytes], ctx: zmq.Context) -> dict[str, Any]:
        return _profile(self.config.device, self.config.threads, self.config.max_request_bytes, header, raw,
                        self.store.objects)

    def _cmd_probe(self, header: dict[str, Any], raw: list[bytes], ctx: zmq.Context) -> dict[str, Any]:
        return _probe(ctx, header, self.config.keypair)

    def _cmd_have(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        files = sha256_list(header.get("files"), "files")
        missing = [sha for sha in files if not self.store.has(sha)]
        partial = {sha: n for sha in missing if (n := self.store.received(sha))}
        return {"missing": missing, "partial": partial, "free_bytes": self.store.usage().free_bytes}

    def _cmd_put(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        sha = sha256_hex(header.get("sha256"), "sha256")
        size = int_in(header.get("size"), "size", 0, MAX_FILE_BYTES)
        offset = int_in(header.get("offset"), "offset", 0, MAX_FILE_BYTES)
        if len(raw) != 1 or len(raw[0]) > MAX_CHUNK_BYTES:
            raise BadRequest(f"put carries exactly one raw frame of at most {MAX_CHUNK_BYTES} bytes")
        received, complete = self.store.put(sha, size, offset, raw[0], keep=self._in_use())
        return {"received": received, "complete": complete}

    def _cmd_pin(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        pins = sha256_list(header.get("files"), "files")
        self.state = replace(self.state, pins=pins)
        self.store.pin(pins)
        self._save_state()
        return {"pinned": len(pins)}

    def _cmd_peers(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        peers = key_list(header.get("keys"), "keys")
        self.state = replace(self.state, peers=peers)
        self.keys_changed = True
        self._save_state()
        return {"peers": len(peers)}

    def _in_use(self) -> frozenset[str]:
        gens = (self.state.current, self.state.previous, self.prepared)
        return frozenset().union(*(g.hashes() for g in gens if g is not None), self.preparing)

    def _cmd_prepare(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        """Build and verify a generation's bundles, reserve their ports; nothing starts yet."""
        deployment = name_field(header.get("deployment"), "deployment")
        generation = int_in(header.get("generation"), "generation", 1, 2**62)
        stages = header.get("stages")
        if not isinstance(stages, list) or not 0 < len(stages) <= MAX_STAGES:
            raise BadRequest(f"'stages' must list 1..{MAX_STAGES} stage bundles")
        refs = [StageBundleRef.from_dict(s) for s in stages]
        if len({r.id for r in refs}) != len(refs):
            raise BadRequest("stage ids must be unique")
        replace_other = header.get("replace", False) is True
        current = self.state.current
        if current is not None and current.deployment != deployment and self.state.running and not replace_other:
            stages = ", ".join(i.ref.id for i in current.instances)
            raise BadRequest(f"{self.config.device} already serves deployment {current.deployment!r} "
                             f"(generation {current.generation}, stages {stages}); stop it first "
                             "(edgepipe-fleet stop) or deploy with --replace")
        if current is not None and current.deployment == deployment and generation < current.generation:
            raise BadRequest(f"generation {generation} is older than the running generation {current.generation}")
        instances = []
        used: set[int] = set()
        same = current is not None and current.deployment == deployment
        for ref in refs:
            bundle_dir, _ = self.store.build_bundle(ref)
            old = next((i for i in current.instances if i.ref.id == ref.id), None) if same and current else None
            if old is not None and (old.ports.results is not None) == ref.results:
                ports = old.ports  # same instance name: same ports, so neighbours and clients need no rewiring
            else:
                ports = Ports(self._data_port(used), self._data_port(used) if ref.results else None, 0)
            ports = replace(ports, control=ports.control or _free_port("127.0.0.1", used))
            used |= {p for p in (ports.listen, ports.results, ports.control) if p}
            instances.append(Instance(ref, ports, str(bundle_dir)))
        self.prepared = Generation(deployment, generation, tuple(instances),
                                   key_list(header.get("clients"), "clients", MAX_KEYS),
                                   key_list(header.get("peers"), "peers", MAX_KEYS))
        return {"deployment": deployment, "generation": generation,
                "ports": {i.ref.id: i.ports.to_dict() for i in instances}}

    def _data_port(self, used: set[int]) -> int:
        current = self.state.current
        taken = used | {p for i in (current.instances if current else ()) for p in (i.ports.listen, i.ports.results)
                        if p}
        bind = "" if self.config.data_bind in ("*", "0.0.0.0") else self.config.data_bind
        if self.config.data_ports is None:
            port = _free_port(bind, taken)
            used.add(port)
            return port
        lo, hi = self.config.data_ports
        for port in range(lo, hi + 1):
            if port not in taken and _bindable(bind, port):
                used.add(port)
                return port
        raise BadRequest(f"no free data port in {lo}-{hi} on {self.config.device} (--data-ports)")

    def _cmd_start(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        """Run the prepared generation (or the current one again): unchanged stages keep running."""
        deployment = name_field(header.get("deployment"), "deployment")
        generation = int_in(header.get("generation"), "generation", 1, 2**62)
        drain = header.get("drain", True) is not False
        target = None
        for gen in (self.prepared, self.state.current):
            if gen is not None and (gen.deployment, gen.generation) == (deployment, generation):
                target = gen
                break
        if target is None:
            raise BadRequest(f"nothing prepared for deployment {deployment!r} generation {generation} "
                             "(prepare it first)")
        wirings = header.get("stages")
        if not isinstance(wirings, list):
            raise BadRequest("'stages' must list one wiring per prepared stage")
        by_id = {w.id: w for w in (StageWiring.from_dict(x) for x in wirings)}
        ids = {i.ref.id for i in target.instances}
        if set(by_id) != ids:
            raise BadRequest(f"'stages' must wire exactly the prepared stages {sorted(ids)}, got {sorted(by_id)}")
        old = self.state.current
        old_launches = self._launches(old) if old is not None and all(i.wiring for i in old.instances) else {}
        # An instance whose launch differs only in the generation it was made in is the same running
        # stage: it keeps its generation, so the host leaves it alone.
        wired = []
        for inst in target.instances:
            wiring = by_id[inst.ref.id]
            before = old_launches.get(inst.ref.id)
            if before is not None and \
                    self._launch(inst, replace(wiring, generation=before.generation), deployment) == before:
                wiring = replace(wiring, generation=before.generation)
            wired.append(replace(inst, wiring=wiring))
        started = replace(target, instances=tuple(wired))
        running = {s.id for s in self.host.snapshot().values() if s.state in ("ready", "starting")}
        launches = self._launches(started)
        try:
            self.host.apply(launches, drain=drain)
        except LaunchError as exc:
            raise BadRequest(str(exc)) from None
        kept = sorted(i for i in launches if self.state.running and i in running and old_launches.get(i) == launches[i])
        previous = old if old is not None and (old.deployment, old.generation) != (deployment, generation) \
            else self.state.previous
        self.state = replace(self.state, current=started, previous=previous, running=True,
                             operator=getattr(self._request, "asker", None),
                             since=time.time() if started is not old else self.state.since)
        if self.prepared is target:
            self.prepared = None
        self.keys_changed = True
        self._save_state()
        self._forget_unused_bundles()
        return {"kept": kept, "started": sorted(set(launches) - set(kept)),
                "stopped": sorted(set(old_launches) - set(launches)),
                "launches": {i: launch.fingerprint for i, launch in launches.items()}}

    def _launches(self, gen: Generation) -> dict[str, StageLaunch]:
        return {inst.ref.id: self._launch(inst, inst.wiring, gen.deployment) for inst in gen.instances}

    def _launch(self, inst: Instance, w: StageWiring | None, deployment: str) -> StageLaunch:
        assert w is not None
        return StageLaunch(
            id=inst.ref.id, bundle_dir=Path(inst.bundle_dir), manifest=inst.ref.manifest, generation=w.generation,
            ports=inst.ports, bind_host=self.config.data_bind, device=self.config.device,
            deployment=deployment, next=w.next, next_keys=w.next_keys, next_weights=w.next_weights,
            upstream_keys=w.upstream_keys, client_keys=w.client_keys, key_file=self.config.key_file,
            threads=w.threads, max_batch=w.max_batch, codec=w.codec, cpus=w.cpus,
            log_level=self.config.stage_log_level, drain_timeout_s=self.config.drain_timeout_s)

    def _cmd_stop(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        current = self.state.current
        deployment = header.get("deployment")
        if deployment is not None:
            name_field(deployment, "deployment")
            if current is not None and current.deployment != deployment:
                raise BadRequest(f"{self.config.device} serves deployment {current.deployment!r}, not {deployment!r}")
        drain = header.get("drain", True) is not False
        release = header.get("release", False) is True
        stopping = sorted(self.host.snapshot())
        self.host.stop_all(drain=drain)
        if release:
            self.state = replace(self.state, current=None, previous=None, running=False, endpoints=None,
                                 operator=None, since=None)
            self.prepared = None
            self.keys_changed = True
        else:
            self.state = replace(self.state, running=False)
        self._save_state()
        if release:
            self._forget_unused_bundles()
            self.store.drop_partial()  # unfinished uploads of a deployment that is over
        return {"stopping": stopping, "released": release}

    def _cmd_revert(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        """Undo one generation: drop it if only prepared, or go back to the previous generation if it
        was started (stop everything when there is none). The workstation's rollback."""
        deployment = name_field(header.get("deployment"), "deployment")
        generation = int_in(header.get("generation"), "generation", 1, 2**62)
        prepared, current = self.prepared, self.state.current
        if prepared is not None and (prepared.deployment, prepared.generation) == (deployment, generation):
            self.prepared = None
        if current is None or (current.deployment, current.generation) != (deployment, generation):
            return {"reverted_to": None if current is None else current.generation, "changed": False}
        previous = self.state.previous
        if previous is not None and all(i.wiring for i in previous.instances):
            self.host.apply(self._launches(previous), drain=False)
            self.state = replace(self.state, current=previous, previous=None, running=True)
        else:
            self.host.stop_all(drain=False)
            self.state = replace(self.state, current=None, previous=None, running=False, endpoints=None,
                                 operator=None, since=None)
        self.keys_changed = True
        self._save_state()
        self._forget_unused_bundles()
        return {"reverted_to": None if self.state.current is None else self.state.current.generation,
                "changed": True}

    def _cmd_publish(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        deployment = name_field(header.get("deployment"), "deployment")
        generation = int_in(header.get("generation"), "generation", 1, 2**62)
        endpoints = header.get("endpoints")
        current = self.state.current
        if current is None or current.deployment != deployment:
            raise BadRequest(f"{self.config.device} does not serve deployment {deployment!r}")
        if not isinstance(endpoints, dict) or endpoints.get("generation") != generation \
                or endpoints.get("deployment") != deployment:
            raise BadRequest("'endpoints' must be an endpoints document of this deployment and generation")
        old = (self.state.endpoints or {}).get("generation", 0)
        if isinstance(old, int) and generation < old:
            raise BadRequest(f"generation {generation} is older than the published generation {old}")
        self.state = replace(self.state, endpoints=endpoints)
        self._save_state()
        return {"published": generation}

    def _cmd_route(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        endpoints = self.state.endpoints
        return {"deployment": None if endpoints is None else endpoints.get("deployment"),
                "generation": None if endpoints is None else endpoints.get("generation"), "endpoints": endpoints}

    def _cmd_logs(self, header: dict[str, Any], raw: list[bytes]) -> dict[str, Any]:
        instance = name_field(header.get("stage"), "stage")
        lines = int_in(header.get("lines", 50), "lines", 1, MAX_LOG_LINES)
        return {"stage": instance, "lines": self.host.log_tail(instance, lines)}

    # -- persistence --------------------------------------------------------------------------------

    def _load_state(self) -> DaemonState:
        try:
            return DaemonState.from_dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return DaemonState()
        except (OSError, ValueError, KeyError, TypeError, BadRequest) as exc:
            log.error("%s is unreadable (%s); starting with no deployment", self.state_path, exc)
            return DaemonState()

    def _save_state(self) -> None:
        _write_json(self.state_path, self.state.to_dict())

    def _forget_unused_bundles(self) -> None:
        if self.preparing:
            return  # a prepare on the worker thread is building bundles right now; tidy up next time
        keep = [i.bundle_dir for g in (self.state.current, self.state.previous, self.prepared) if g is not None
                for i in g.instances]
        self.store.forget_bundles(keep)


def run_daemon(config: DaemonConfig, stop: threading.Event, reload: threading.Event | None = None,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until ``stop`` is set; then stop the stages (draining) and return. ``reload`` set
    (SIGHUP) re-reads the authorized keys."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    daemon = DeviceDaemon(config)
    if config.secure and not daemon.operators:
        raise BadRequest(f"no authorized workstation keys in {', '.join(config.authorized_keys) or '(none given)'}; "
                         "add the workstation's public key (edgepipe-agent keygen --name workstation on it) "
                         "or pass --insecure")
    ctx = new_context()
    try:
        auth = INSECURE if config.keypair is None else ServerAuth(config.keypair, daemon.allowed_keys())
        sock = bind_control(ctx, config.listen, auth=auth, max_frame_bytes=config.max_request_bytes)
    except BaseException:
        close_context(ctx)
        raise
    endpoint = bound_endpoint(sock)
    daemon.start()
    if config.ready_file is not None:
        _write_json(config.ready_file, {"pid": os.getpid(), "listen": endpoint, "public_key":
                                        None if config.keypair is None else config.keypair.public_text})
    if on_ready is not None:
        on_ready(endpoint)
    log.info("daemon for device %r on %s (%s, %d operator key(s), state in %s)", config.device, endpoint,
             "CurveZMQ" if config.secure else "INSECURE", len(daemon.operators), config.state_dir)
    worker = _SlowWorker(daemon, ctx)
    try:
        _answer_loop(daemon, sock, ctx, worker, stop, reload)
    finally:
        worker.stop()
        sock.close()
        daemon.shutdown(drain=True)
        close_context(ctx)
        log.info("daemon stopped")


class _SlowWorker:
    """Runs slow commands one at a time; their replies go back to the loop thread (which owns the
    socket) through ``done``."""

    def __init__(self, daemon: DeviceDaemon, ctx: zmq.Context) -> None:
        self.daemon, self.ctx = daemon, ctx
        self.todo: queue.Queue = queue.Queue(MAX_QUEUED_SLOW)
        self.done: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="control-worker", daemon=True)
        self.thread.start()

    def submit(self, route: zmq.Frame, role: str, asker: str | None, header: dict[str, Any], raw: list[bytes]) -> bool:
        stages = header.get("stages")
        if header["cmd"] == "prepare" and isinstance(stages, list):
            try:
                refs = [StageBundleRef.from_dict(s) for s in stages]
                # protected from eviction until the worker has nothing queued any more
                self.daemon.preparing = self.daemon.preparing | {h for r in refs for h in r.all_hashes}
            except BadRequest:
                pass  # the handler will say so
        try:
            self.todo.put_nowait((route, role, asker, header, raw))
            return True
        except queue.Full:
            return False

    def stop(self) -> None:
        self.todo.put(None)
        self.thread.join(5.0)

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            route, role, asker, header, raw = item
            reply = _dispatch(self.daemon, self.ctx, role, asker, header, raw)
            if self.todo.empty():
                self.daemon.preparing = frozenset()
            self.done.put((route, reply))


def _answer_loop(daemon: DeviceDaemon, sock: zmq.Socket, ctx: zmq.Context, worker: _SlowWorker,
                 stop: threading.Event, reload: threading.Event | None) -> None:
    """The only code that touches ``sock``."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if reload is not None and reload.is_set():
            reload.clear()
            daemon.reload_operators()
        if daemon.keys_changed and daemon.config.secure:
            allow_keys(sock, daemon.allowed_keys())
            daemon.keys_changed = False
        while True:
            try:
                route, reply = worker.done.get_nowait()
            except queue.Empty:
                break
            _send_reply(sock, route, [reply])
        if not poller.poll(50):
            continue
        frames = recv_frames(sock, MAX_FILES + 3)
        try:
            _answer_one(daemon, sock, ctx, worker, frames)
        except Exception:  # a gap in validation costs one request, never the daemon
            log.exception("request not handled")
            _send_reply(sock, frames[0], [_error(None, "internal error (logged on the device)")])


def _answer_one(daemon: DeviceDaemon, sock: zmq.Socket, ctx: zmq.Context, worker: _SlowWorker,
                frames: list[zmq.Frame]) -> None:
    error = _envelope_error(frames)
    if error:
        _send_reply(sock, frames[0], error)
        return
    asker = peer_key(frames[2])
    role = daemon.role_of(asker)
    try:
        header, raw = parse_request(frames[2:])
    except BadRequest as exc:
        _send_reply(sock, frames[0], [_error(None, str(exc))])
        return
    if header["cmd"] in SLOW_COMMANDS and role == OPERATOR:
        if not worker.submit(frames[0], role, asker, header, raw):
            _send_reply(sock, frames[0], [_error(header.get("id"), "busy: too many slow requests queued; try again")])
        return
    _send_reply(sock, frames[0], [_dispatch(daemon, ctx, role, asker, header, raw)])


def _dispatch(daemon: DeviceDaemon, ctx: zmq.Context, role: str, asker: str | None, header: dict[str, Any],
              raw: list[bytes]) -> bytes:
    request_id = header.get("id")
    try:
        return _ok(request_id, daemon.handle(role, asker, header, raw, ctx))
    except BadRequest as exc:
        log.warning("%s from %s refused: %s", header.get("cmd"), _key_label(asker), exc)
        return _error(request_id, str(exc))
    except Exception as exc:  # a failing request never takes the daemon down
        log.exception("%s request failed", header.get("cmd"))
        return _error(request_id, f"{type(exc).__name__}: {exc}")


# -- shared helpers -----------------------------------------------------------------------------------

def _envelope_error(frames: list[zmq.Frame]) -> list[bytes] | None:
    # [routing id, empty delimiter, header, raw frames...]: the envelope REQ and DEALER agree on
    if len(frames) < 3 or len(frames[1].bytes) != 0:
        return [_error(None, "expected an empty delimiter frame, then the header")]
    return None


def _send_reply(sock: zmq.Socket, route: zmq.Frame, reply: list[bytes]) -> None:
    try:
        sock.send_multipart([route, b"", *reply], flags=zmq.NOBLOCK, copy=False)
    except zmq.ZMQError as exc:  # the asker left or its queue is full; it will time out
        log.warning("reply dropped: %s", exc)


def _ok(request_id: Any, body: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": CONTROL_VERSION, "ok": True, "id": _safe_id(request_id), **body})


def _error(request_id: Any, message: str) -> bytes:
    return msgpack.packb({"v": CONTROL_VERSION, "ok": False, "id": _safe_id(request_id), "error": message[:2000]})


def _safe_id(request_id: Any) -> Any:
    return request_id if isinstance(request_id, (str, int)) and len(str(request_id)) <= 64 else None


def status_facts(device: str, threads: int, max_request_bytes: int, commands: Sequence[str]) -> dict[str, Any]:
    return {
        "device": device,
        "ort_version": ort.__version__,
        "cores": os.cpu_count(),
        "threads": threads,
        "host": host_facts(),
        "python": platform.python_version(),
        "edgepipe_version": _edgepipe_version(),
        "control_version": CONTROL_VERSION,
        "max_request_bytes": max_request_bytes,
        "commands": list(commands),
    }


def _profile(device_name: str, default_threads: int, max_request_bytes: int, header: dict[str, Any],
             raw: list[bytes], objects: Path | None = None) -> dict[str, Any]:
    """Profile a bundle sent in the request's frames or, with ``stored: true``, one whose files were
    uploaded to the store first (``have``/``put`` in chunks): a bundle of hundreds of MiB over a slow
    link would otherwise be one frame outliving the connection's heartbeat timeout."""
    total = sum(len(f) for f in raw)
    if total > max_request_bytes:
        raise BadRequest(f"request of {total} bytes is over this device's limit of "
                         f"{max_request_bytes} bytes (edgepipe-agent daemon --max-request-mb)")
    files = header.get("files")
    stored = header.get("stored", False) is True
    if stored and (raw or objects is None):
        raise BadRequest("'stored': true takes no raw frames, and needs a daemon with a store")
    if not isinstance(files, list) or len(files) > MAX_FILES or (not stored and len(files) != len(raw)):
        raise BadRequest(f"'files' must list one {{path, sha256}} per raw frame ({len(raw)} frames), "
                         "or, with 'stored': true, the stored files by sha256")
    microbatches = _int_list(header.get("microbatches", [1, 8]), "microbatches", MAX_MICROBATCH)
    repeats = int_in(header.get("repeats", 10), "repeats", 1, MAX_REPEATS)
    warmup = int_in(header.get("warmup", 2), "warmup", 0, MAX_REPEATS)
    threads = int_in(header.get("threads", default_threads), "threads", 1, 256)
    device = header.get("device", device_name)
    if not isinstance(device, str) or not device:
        raise BadRequest("'device' must be a non-empty name")
    with tempfile.TemporaryDirectory(prefix="edgepipe-profile-") as tmp:
        root = Path(tmp)
        if stored:
            assert objects is not None
            for entry in files:
                path = _safe_path(root, entry)
                obj = objects / sha256_hex(entry.get("sha256"), "sha256")
                if not obj.is_file():  # objects are checked on arrival, so present means intact
                    raise BadRequest(f"{entry['path']}: not in this device's store; upload it first (have/put)")
                path.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(obj, path)
        else:
            for entry, data in zip(files, raw, strict=True):
                path = _safe_path(root, entry)
                if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                    raise BadRequest(f"{entry.get('path')}: sha256 does not match its content")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        try:
            bundle = load_profile_bundle(root)
            for piece in range(bundle.piece_count):
                load_bundle(bundle.piece_dir(root, piece))
        except (ProfileError, BundleError) as exc:
            raise BadRequest(f"profiling bundle refused: {str(exc).replace(str(root) + os.sep, '')}") from None
        started = time.perf_counter()
        try:
            profile = profile_bundle(root, device, microbatches, threads, repeats, warmup)
        except (SessionError, BundleError, ProfileError) as exc:
            raise BadRequest(f"profiling failed: {exc}") from None
    log.info("profiled %d pieces for %r in %.1f s", bundle.piece_count, device, time.perf_counter() - started)
    return {"profile": profile_to_dict(profile)}


def _probe(ctx: zmq.Context, header: dict[str, Any], keypair: KeyPair | None) -> dict[str, Any]:
    peer = header.get("peer")
    if not isinstance(peer, str) or not peer.startswith("tcp://") or len(peer) > 255:
        raise BadRequest(f"'peer' must be a tcp:// control endpoint, got {peer!r}")
    size = int_in(header.get("bytes", 2**20), "bytes", 1, MAX_PROBE_BYTES)
    count = int_in(header.get("count", 5), "count", 1, MAX_PROBE_COUNT)
    seconds = float_in(header.get("seconds", 5.0), "seconds", 1e-3, MAX_PROBE_SECONDS)
    if keypair is None:
        return measure_link(ctx, peer, size, count, seconds, INSECURE)
    peer_keys = key_list([header.get("peer_key")] if header.get("peer_key") is not None else None, "peer_key", 1)
    if not peer_keys:
        raise BadRequest("'peer_key' (the peer daemon's public key) is required: this daemon only connects to "
                         "peers it can authenticate")
    return measure_link(ctx, peer, size, count, seconds, ClientAuth(keypair, peer_keys[0].encode()))


def measure_link(ctx: zmq.Context, peer: str, size: int, count: int, seconds: float,
                 auth: ClientAuth | Any = INSECURE) -> dict[str, Any]:
    """Round trips of ``size``-byte echoes to ``peer`` (bounded by ``count`` and ``seconds``).

    Latency is half the median tiny round trip; bandwidth counts the bytes one way over the median
    large round trip minus the tiny one (the echo's reply is a few bytes)."""
    sock = connect_control(ctx, peer, auth=auth)
    try:
        deadline = time.monotonic() + seconds
        tiny = _echo_times(sock, TINY_BYTES, count, deadline, peer)
        large = _echo_times(sock, size, count, deadline, peer)
    finally:
        sock.close(0)
    rtt_tiny, rtt_large = statistics.median(tiny), statistics.median(large)
    transfer = max(rtt_large - rtt_tiny, 1e-9)
    return {"peer": peer, "bandwidth_mbps": size * 8 / transfer / 1e6, "latency_s": rtt_tiny / 2,
            "bytes": size, "samples": len(large)}


def _echo_times(sock: zmq.Socket, size: int, count: int, deadline: float, peer: str) -> list[float]:
    payload = os.urandom(size)
    header = msgpack.packb({"v": CONTROL_VERSION, "cmd": "echo", "files": []})
    times = []
    for i in range(count):
        remaining = deadline - time.monotonic()
        if remaining <= 0 and times:
            break
        start = time.perf_counter()
        sock.send_multipart([b"", header, payload], copy=False)
        if not sock.poll(max(int(remaining * 1000), 1000), zmq.POLLIN):
            raise BadRequest(f"peer {peer} did not answer an echo in time (down, or it does not accept this "
                             "device's key)")
        sock.recv_multipart()
        if i or count == 1:  # the first round trip also sets up the connection
            times.append(time.perf_counter() - start)
    return times or [time.perf_counter() - start]


def _safe_path(root: Path, entry: Any) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise BadRequest("each 'files' entry must be a map with a 'path' and a 'sha256'")
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BadRequest(f"file path {entry['path']!r} must be relative and stay inside the bundle")
    return root.joinpath(*rel.parts)


def _int_list(value: Any, name: str, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise BadRequest(f"'{name}' must be a non-empty list of integers")
    return tuple(sorted({int_in(v, name, 1, hi) for v in value}))


def _free_port(host: str, taken: set[int] | frozenset[int] = frozenset()) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise BadRequest("no free port found")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _write_json(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader (or a crash) never sees half a file


def _key_label(key: str | None) -> str:
    return "an insecure peer" if key is None else f"key {key[:8]}…"


def _summary(command: str, header: dict[str, Any], body: dict[str, Any]) -> str:
    keep = {k: body[k] for k in ("generation", "kept", "started", "stopped", "stopping", "reverted_to",
                                 "published", "pinned", "peers") if k in body}
    return f"deployment {header.get('deployment')!r} generation {header.get('generation')} {keep}"


def _edgepipe_version() -> str:
    try:
        return version("edgepipe")
    except PackageNotFoundError:
        return "unknown"


__all__ = ["ControlConfig", "DaemonConfig", "DeviceDaemon", "StoreError", "run_daemon", "start_control_thread"]
