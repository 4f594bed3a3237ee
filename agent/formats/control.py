"""The control protocol (version 2): requests to a device daemon and their replies.

One definition, shared by the daemon (device/daemon.py), the stage's own control endpoint
(``edgepipe-agent serve --control``) and the asking side (control_client.py: the workstation's
``edgepipe-fleet`` and ``edgepipe-compile --profile``, clients looking up a deployment's current
endpoints, devices probing their peers). Documented in docs/formats/control.md.

A request is ``["", header, raw frame...]`` (the DEALER envelope), a reply ``["", header]``; headers
are msgpack maps with ``v`` (this version), ``cmd``, ``id`` (echoed). Who may send what depends on
the key the asker authenticated with (CurveZMQ, ZAP User-Id):

- an **operator** (a workstation key in the device's ``authorized_keys``): everything;
- a **client** (a key the operator listed as an authorised client of the deployment): ``route`` and
  ``ping``, so it can follow the deployment to a new generation;
- a **peer** (another device of the deployment, listed by the operator): ``echo``, the target of a
  link probe.

In insecure mode (``--insecure``, by name only) every asker is an operator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

CONTROL_VERSION = 2

OPERATOR, CLIENT, PEER = "operator", "client", "peer"
# Every command the device daemon knows, and the subset each role may send.
COMMANDS = ("status", "ping", "profile", "probe", "echo", "peers", "have", "put", "pin", "prepare", "start",
            "stop", "revert", "publish", "route", "logs")
ROLE_COMMANDS = {
    OPERATOR: frozenset(COMMANDS),
    CLIENT: frozenset({"route", "ping"}),
    PEER: frozenset({"echo"}),
}

DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20  # a ViT-Large profiling bundle is ~300 MiB
MAX_HEADER_BYTES = 256 * 1024
MAX_FILES = 256
MAX_MICROBATCH = 1024
MAX_REPEATS = 1000
MAX_PROBE_BYTES = 64 * 2**20
MAX_PROBE_COUNT = 100
MAX_PROBE_SECONDS = 30.0
TINY_BYTES = 64  # latency is timed with round trips this small

CHUNK_BYTES = 4 * 2**20  # what the workstation sends per ``put``; large enough to amortise a round trip
MAX_CHUNK_BYTES = 16 * 2**20  # the most a ``put`` may carry
MAX_FILE_BYTES = 64 * 2**30
MAX_HAVE = 4096  # hashes per ``have`` / ``pin``
MAX_STAGES = 16  # stage instances per ``prepare`` / ``start``
MAX_KEYS = 1024  # client or peer keys per deployment
MAX_NEXT = 16  # downstream replicas per stage
MAX_LOG_LINES = 500

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class ControlError(RuntimeError):
    """A control request failed: the device said why, or did not answer in time."""


class BadRequest(ValueError):
    """The request is malformed or not allowed; its message goes back in the error reply."""


def parse_request(frames: Sequence[Any]) -> tuple[dict[str, Any], list[bytes]]:
    """The header and the raw frames of a request (after the envelope). Raises BadRequest."""
    if not frames:
        raise BadRequest("empty request")
    if len(frames) > MAX_FILES + 1:
        raise BadRequest(f"too many frames (at most {MAX_FILES + 1})")
    head = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise BadRequest(f"header of {len(head)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(head, raw=False, max_bin_len=0, max_ext_len=0, max_array_len=MAX_HAVE * 2,
                                 max_map_len=MAX_HAVE * 2, max_str_len=MAX_HEADER_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map")
    if header.get("v") != CONTROL_VERSION:
        raise BadRequest(f"control protocol version {header.get('v')!r} is not supported "
                         f"(supports {CONTROL_VERSION})")
    if header.get("cmd") not in COMMANDS:
        raise BadRequest(f"unknown command {header.get('cmd')!r} (known: {', '.join(COMMANDS)})")
    raw = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames[1:]]
    return header, raw


def check_role(role: str, command: str) -> None:
    if command not in ROLE_COMMANDS.get(role, frozenset()):
        raise BadRequest(f"command {command!r} is not allowed for a {role} key "
                         f"(allowed: {', '.join(sorted(ROLE_COMMANDS.get(role, ())))})")


# -- field checks shared by the daemon's handlers ---------------------------------------------------

def int_in(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer in {lo}..{hi}, got {_short(value)}")
    return value


def float_in(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number in {lo:g}..{hi:g}, got {_short(value)}")
    return float(value)


def sha256_hex(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise BadRequest(f"'{name}' must be a sha256 in lower-case hex (64 characters), got {_short(value)}")
    return value


def sha256_list(value: Any, name: str, limit: int = MAX_HAVE) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise BadRequest(f"'{name}' must be a list of at most {limit} sha256 hashes")
    return tuple(sha256_hex(v, name) for v in value)


def name_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadRequest(f"'{name}' must be 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit), "
                         f"got {_short(value)}")
    return value


def key_list(value: Any, name: str, limit: int = MAX_KEYS) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(k, str) and _Z85.match(k)
                                                                    for k in value):
        raise BadRequest(f"'{name}' must be a list of at most {limit} Z85 public keys (40 characters)")
    return tuple(value)


def endpoint_list(value: Any, name: str, limit: int = MAX_NEXT) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > limit or not all(
            isinstance(e, str) and e.startswith("tcp://") and 6 < len(e) <= 255 for e in value):
        raise BadRequest(f"'{name}' must be a list of at most {limit} tcp:// endpoints")
    return tuple(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- stage instances --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageBundleRef:
    """A stage bundle by content: the sha256 of its manifest (``stage.json``) and of every file the
    manifest lists. Sent by ``prepare``; the daemon builds the bundle from its store and refuses it
    unless the manifest hashes to ``manifest`` (this is what ties what runs to what the
    workstation compiled: the hash arrives over the authenticated channel)."""

    id: str  # the instance's name on the device, e.g. "stage-1"
    manifest: str
    files: tuple[tuple[str, str], ...]  # (file name, sha256), sorted by name; stage.json excluded
    results: bool = False  # the last stage: also bind a results socket for clients

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "manifest": self.manifest, "files": dict(self.files), "results": self.results}

    @staticmethod
    def from_dict(raw: Any) -> StageBundleRef:
        if not isinstance(raw, dict):
            raise BadRequest("each 'stages' entry must be a map")
        files = raw.get("files")
        if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
            raise BadRequest(f"'files' must map 1..{MAX_FILES} file names to sha256 hashes")
        pairs = []
        for name, sha in files.items():
            if not isinstance(name, str) or not _FILE_NAME.match(name) or name == "stage.json":
                raise BadRequest(f"file name {_short(name)}: must be a plain name inside the bundle "
                                 "(no directories), not stage.json")
            pairs.append((name, sha256_hex(sha, f"files[{name}]")))
        results = raw.get("results", False)
        if not isinstance(results, bool):
            raise BadRequest("'results' must be true or false")
        return StageBundleRef(name_field(raw.get("id"), "id"), sha256_hex(raw.get("manifest"), "manifest"),
                              tuple(sorted(pairs)), results)

    @property
    def all_hashes(self) -> tuple[str, ...]:
        return (self.manifest, *(sha for _, sha in self.files))


@dataclass(frozen=True)
class StageWiring:
    """How a prepared stage instance runs: its neighbours and their keys, and serve options. Sent by
    ``start``. An instance whose bundle, ports and wiring are all unchanged keeps running."""

    id: str
    next: tuple[str, ...] = ()  # downstream data endpoints; several = replicas; none on the last stage
    next_keys: tuple[str, ...] = ()  # their public keys, in the same order
    next_weights: tuple[float, ...] = ()  # their shares of the work (the plan's replica weights); () = equal
    upstream_keys: tuple[str, ...] = ()  # who may send data in (the previous stage; clients at the entry)
    client_keys: tuple[str, ...] = ()  # who may read results (the last stage)
    threads: int = 1
    max_batch: int = 256
    codec: str | None = None  # the output hop's activation codec (raw, fp16, int8)
    cpus: str | None = None  # taskset list
    generation: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "next": list(self.next), "next_keys": list(self.next_keys),
                "next_weights": list(self.next_weights), "upstream_keys": list(self.upstream_keys),
                "client_keys": list(self.client_keys),
                "threads": self.threads, "max_batch": self.max_batch, "codec": self.codec, "cpus": self.cpus,
                "generation": self.generation}

    @staticmethod
    def from_dict(raw: Any) -> StageWiring:
        if not isinstance(raw, dict):
            raise BadRequest("each 'stages' entry must be a map")
        codec = raw.get("codec")
        if codec is not None and codec not in ("raw", "fp16", "int8"):
            raise BadRequest(f"'codec' must be raw, fp16 or int8, got {_short(codec)}")
        weights = raw.get("next_weights") or []
        if not isinstance(weights, list) or len(weights) > MAX_NEXT:
            raise BadRequest(f"'next_weights' must be a list of at most {MAX_NEXT} numbers")
        cpus = raw.get("cpus")
        if cpus is not None and (not isinstance(cpus, str) or not re.fullmatch(r"[0-9,\-]{1,64}", cpus)):
            raise BadRequest(f"'cpus' must be a CPU list like 0,2-3, got {_short(cpus)}")
        wiring = StageWiring(
            id=name_field(raw.get("id"), "id"),
            next=endpoint_list(raw.get("next"), "next"),
            next_keys=key_list(raw.get("next_keys"), "next_keys", MAX_NEXT),
            next_weights=tuple(float_in(w, "next_weights", 1e-6, 1e6) for w in weights),
            upstream_keys=key_list(raw.get("upstream_keys"), "upstream_keys"),
            client_keys=key_list(raw.get("client_keys"), "client_keys"),
            threads=int_in(raw.get("threads", 1), "threads", 1, 256),
            max_batch=int_in(raw.get("max_batch", 256), "max_batch", 1, 65536),
            codec=codec, cpus=cpus,
            generation=int_in(raw.get("generation", 1), "generation", 1, 2**62),
        )
        if wiring.next_keys and len(wiring.next_keys) != len(wiring.next):
            raise BadRequest("'next_keys' must give one key per 'next' endpoint")
        if wiring.next_weights and len(wiring.next_weights) != len(wiring.next):
            raise BadRequest("'next_weights' must give one weight per 'next' endpoint")
        return wiring


@dataclass(frozen=True)
class Ports:
    """The TCP ports a stage instance binds on its device (kept for the instance's life, also across
    restarts, so neighbours and clients never need rewiring after a crash)."""

    listen: int
    results: int | None = None
    control: int = 0  # loopback only: the daemon's health checks and counters

    def to_dict(self) -> dict[str, Any]:
        return {"listen": self.listen, "results": self.results, "control": self.control}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> Ports:
        return Ports(int(raw["listen"]), None if raw.get("results") is None else int(raw["results"]),
                     int(raw.get("control", 0)))


# -- states -----------------------------------------------------------------------------------------

STAGE_STATES = ("starting", "ready", "restarting", "stopping", "stopped", "failed")


@dataclass(frozen=True)
class StageStatus:
    """What the daemon reports about one hosted stage instance (``status`` reply, ``stages``)."""

    id: str
    state: str  # one of STAGE_STATES
    generation: int
    manifest: str
    model_id: str
    stage_index: int
    stage_count: int
    ports: Ports
    next: tuple[str, ...]
    pid: int | None = None
    restarts: int = 0
    hangs: int = 0
    started_at: float | None = None  # time.time() of the current process's start
    ready_at: float | None = None
    last_exit: str | None = None  # how the previous process ended, e.g. "exit code 1", "killed (hung)"
    last_error: str | None = None  # the last WARNING/ERROR line of its log
    heartbeat_age_s: float | None = None  # since its control endpoint last answered
    counters: dict[str, Any] = field(default_factory=dict)  # the stage's own ``stage`` status field
    throughput: float | None = None  # requests per second over the last polls, from the counters
    launch: str = ""  # fingerprint of how it was launched; ``start`` replies with the new ones

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "launch": self.launch, "state": self.state, "generation": self.generation,
                "manifest": self.manifest, "model_id": self.model_id, "stage_index": self.stage_index,
                "stage_count": self.stage_count, "ports": self.ports.to_dict(), "next": list(self.next),
                "pid": self.pid, "restarts": self.restarts, "hangs": self.hangs, "started_at": self.started_at,
                "ready_at": self.ready_at, "last_exit": self.last_exit, "last_error": self.last_error,
                "heartbeat_age_s": self.heartbeat_age_s, "counters": self.counters, "throughput": self.throughput}

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> StageStatus:
        return StageStatus(
            id=str(raw["id"]), state=str(raw["state"]), generation=int(raw["generation"]),
            manifest=str(raw["manifest"]), model_id=str(raw["model_id"]), stage_index=int(raw["stage_index"]),
            stage_count=int(raw["stage_count"]), ports=Ports.from_dict(raw["ports"]),
            next=tuple(raw.get("next") or ()), pid=raw.get("pid"), restarts=int(raw.get("restarts", 0)),
            hangs=int(raw.get("hangs", 0)), started_at=raw.get("started_at"), ready_at=raw.get("ready_at"),
            last_exit=raw.get("last_exit"), last_error=raw.get("last_error"),
            heartbeat_age_s=raw.get("heartbeat_age_s"), counters=dict(raw.get("counters") or {}),
            throughput=raw.get("throughput"), launch=str(raw.get("launch", "")))
