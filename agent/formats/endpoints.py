"""The endpoints file: where a running deployment takes requests and gives results, and with which
keys. Written by ``edgepipe-fleet deploy`` (and rewritten on every redeploy or failover, with a
higher ``generation``); read by ``Client.from_endpoints`` and ``edgepipe-submit --endpoints`` so that
nobody types raw addresses. Format "edgepipe.endpoints", version 1, documented in
docs/formats/endpoints.md. This module is the one definition of the format.

``entry`` and ``exit`` are lists because the first or last stage may be replicated: a client sends
to any entry and reads results from every exit. ``daemons`` lets a client (or the fleet tools) ask
any device of the deployment for the current endpoints when its entry or exit stops answering.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.agent.formats.bundle import TensorSpec
from edgepipe.agent.formats.keys import is_public_key

FORMAT = "edgepipe.endpoints"
FORMAT_VERSION = 1
FILE_NAME = "endpoints.json"


class EndpointsError(ValueError):
    """An endpoints file is missing or malformed; the message names the field."""


@dataclass(frozen=True)
class Peer:
    """A socket to connect to: its address and, unless the deployment is insecure, the public key
    (Z85) it authenticates with."""

    endpoint: str
    public_key: str | None = None


@dataclass(frozen=True)
class DaemonRef:
    device: str
    control: str
    public_key: str | None = None


@dataclass(frozen=True)
class Endpoints:
    deployment: str  # the deployment id: stays the same across redeploys of one build
    generation: int  # 1 on the first deploy, +1 on every redeploy or failover
    model_id: str
    entry: tuple[Peer, ...]
    exit: tuple[Peer, ...]
    inputs: tuple[TensorSpec, ...]  # the model's inputs (the first stage's), batch axis free
    outputs: tuple[TensorSpec, ...]  # the model's outputs (the last stage's)
    daemons: tuple[DaemonRef, ...] = ()
    insecure: bool = False

    def __post_init__(self) -> None:
        if not self.entry or not self.exit:
            raise EndpointsError("endpoints need at least one entry and one exit")
        if self.generation < 1:
            raise EndpointsError(f"generation must be >= 1, got {self.generation}")
        for peer in (*self.entry, *self.exit, *self.daemons):
            key = peer.public_key
            if self.insecure:
                continue
            if key is None or not is_public_key(key):
                where = getattr(peer, "endpoint", None) or getattr(peer, "control", "?")
                raise EndpointsError(f"{where}: a secure deployment needs each peer's 40-character Z85 public key")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "deployment": self.deployment,
            "generation": self.generation,
            "model_id": self.model_id,
            "insecure": self.insecure,
            "entry": [_peer(p) for p in self.entry],
            "exit": [_peer(p) for p in self.exit],
            "inputs": [_spec(s) for s in self.inputs],
            "outputs": [_spec(s) for s in self.outputs],
            "daemons": [{"device": d.device, "control": d.control, "public_key": d.public_key}
                        for d in self.daemons],
        }

    @staticmethod
    def from_dict(raw: Any, source: str = FILE_NAME) -> Endpoints:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise EndpointsError(f"{source}: not an EdgePipe endpoints file (format must be {FORMAT!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise EndpointsError(f"{source}: endpoints format version {raw.get('format_version')!r} is not "
                                 f"supported (supports {FORMAT_VERSION}); upgrade edgepipe")
        try:
            return Endpoints(
                deployment=str(raw["deployment"]),
                generation=int(raw["generation"]),
                model_id=str(raw["model_id"]),
                insecure=bool(raw.get("insecure", False)),
                entry=tuple(Peer(str(p["endpoint"]), p.get("public_key")) for p in raw["entry"]),
                exit=tuple(Peer(str(p["endpoint"]), p.get("public_key")) for p in raw["exit"]),
                inputs=tuple(TensorSpec(str(s["name"]), str(s["dtype"]), tuple(s["shape"])) for s in raw["inputs"]),
                outputs=tuple(TensorSpec(str(s["name"]), str(s["dtype"]), tuple(s["shape"])) for s in raw["outputs"]),
                daemons=tuple(DaemonRef(str(d["device"]), str(d["control"]), d.get("public_key"))
                              for d in raw.get("daemons", [])),
            )
        except EndpointsError as exc:
            raise EndpointsError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise EndpointsError(f"{source}: malformed field: {exc!r}") from None


def save_endpoints(path: Path, endpoints: Endpoints) -> Path:
    """Write atomically: a client re-reading the file during a failover never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(endpoints.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_endpoints(path: Path | str) -> Endpoints:
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EndpointsError(f"{path}: no endpoints file (deploy with `edgepipe-fleet deploy` first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise EndpointsError(f"{path}: cannot read endpoints file: {exc}") from None
    return Endpoints.from_dict(raw, str(path))


def _peer(peer: Peer) -> dict[str, Any]:
    return {"endpoint": peer.endpoint, "public_key": peer.public_key}


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape)}
