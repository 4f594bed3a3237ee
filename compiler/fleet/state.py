"""The workstation's record of a deployment (``BUILD/deployment.json``, format
"edgepipe.deployment" version 1, docs/formats/deployment.md): its id and generation, which stage
instance runs where and at which endpoints, which devices were lost. Written after every successful
deploy, redeploy, failover and stop; read by status, stop, redeploy and the supervisor.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgepipe.deployment"
FORMAT_VERSION = 1
STATE_FILE = "deployment.json"


class StateError(ValueError):
    """The deployment record is unreadable; the message names the file."""


@dataclass(frozen=True)
class Placement:
    """One running stage instance."""

    stage: int
    device: str
    instance: str
    manifest: str
    listen: str  # tcp://host:port, as peers and clients reach it
    results: str | None = None


@dataclass(frozen=True)
class DeploymentState:
    deployment: str
    generation: int
    model_id: str
    bundles: str  # the directory of the stage bundles this generation runs (the build, or a standby)
    devices: tuple[str, ...]  # devices with a part in this generation
    placements: tuple[Placement, ...]
    insecure: bool = False
    lost: tuple[str, ...] = ()  # devices dropped by a failover, not yet taken back
    stopped: bool = False
    updated: float = field(default_factory=time.time)

    def stage_count(self) -> int:
        return 1 + max((p.stage for p in self.placements), default=-1)

    def at(self, stage: int) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.stage == stage)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "deployment": self.deployment,
                "generation": self.generation, "model_id": self.model_id, "bundles": self.bundles,
                "devices": list(self.devices), "insecure": self.insecure, "lost": list(self.lost),
                "stopped": self.stopped, "updated": self.updated,
                "placements": [{"stage": p.stage, "device": p.device, "instance": p.instance,
                                "manifest": p.manifest, "listen": p.listen, "results": p.results}
                               for p in self.placements]}

    @staticmethod
    def from_dict(raw: Any, source: str) -> DeploymentState:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise StateError(f"{source}: not an {FORMAT} version {FORMAT_VERSION} file")
        try:
            return DeploymentState(
                deployment=str(raw["deployment"]), generation=int(raw["generation"]), model_id=str(raw["model_id"]),
                bundles=str(raw["bundles"]), devices=tuple(raw["devices"]), insecure=bool(raw["insecure"]),
                lost=tuple(raw.get("lost", ())), stopped=bool(raw.get("stopped", False)),
                updated=float(raw.get("updated", 0.0)),
                placements=tuple(Placement(int(p["stage"]), str(p["device"]), str(p["instance"]), str(p["manifest"]),
                                           str(p["listen"]), p.get("results")) for p in raw["placements"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{source}: malformed field: {exc!r}") from None


def state_path(build_dir: Path) -> Path:
    return Path(build_dir) / STATE_FILE


def load_state(build_dir: Path) -> DeploymentState | None:
    path = state_path(build_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StateError(f"{path}: unreadable: {exc}") from None
    return DeploymentState.from_dict(raw, str(path))


def save_state(build_dir: Path, state: DeploymentState) -> Path:
    path = state_path(build_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def new_deployment_id(model_id: str) -> str:
    """``<model>-<6 hex>``: readable in logs, unique enough that two builds never collide."""
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in model_id)[:48].strip("-._") or "model"
    return f"{stem}-{secrets.token_hex(3)}"
