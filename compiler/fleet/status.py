"""``edgepipe-fleet status``: every device and stage of a deployment, as the daemons report them.

One ``status`` request per device (in parallel, short timeout): the daemon's own facts (uptime,
store, which deployment and generation it runs) and per hosted stage its state, process, restarts,
hangs, last exit and last error, heartbeat age (since its control endpoint last answered) and the
stage runtime's own counters (requests done, queue depths, ...) with a throughput computed from
them. An unreachable device is a row saying so, not an error.
"""

from __future__ import annotations

import time
from typing import Any

from edgepipe.agent.formats.control import StageStatus
from edgepipe.compiler.fleet.deploy import Fleet
from edgepipe.compiler.fleet.state import DeploymentState

STATUS_TIMEOUT_S = 3.0
# Counter names the stage runtime may report, first match wins (see /work/notes/interfaces.md).
DONE_KEYS = ("requests_out", "computed", "sent")
QUEUE_KEYS = ("queue_msgs", "queue_in", "queue")
ERROR_KEYS = ("failed", "rejected", "dropped")  # summed


def collect(state: DeploymentState, fleet: Fleet, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """The status document (what ``status --json`` prints)."""
    devices = list(state.devices) + [d for d in state.lost if d not in state.devices]
    replies, errors = fleet.each([d for d in devices if d in fleet.targets],
                                 lambda d: fleet.request(d, {"cmd": "status"}, timeout_s))
    rows = []
    for d in devices:
        expected = [] if state.stopped else [p for p in state.placements if p.device == d]
        if d not in replies:
            rows.append({"device": d, "reachable": False, "lost": d in state.lost,
                         "error": errors.get(d, f"{d}: not in the cluster file"),
                         "expected": [p.instance for p in expected], "stages": []})
            continue
        reply = replies[d]
        dep = reply.get("deployment") or {}
        stages = [_stage_row(StageStatus.from_dict(s)) for s in reply.get("stages", [])]
        rows.append({
            "device": d, "reachable": True, "lost": d in state.lost, "error": None,
            "uptime_s": reply.get("uptime_s"), "secure": reply.get("secure"),
            "deployment": dep.get("id"), "generation": dep.get("generation"), "running": dep.get("running"),
            "foreign": bool(dep.get("id")) and dep.get("id") != state.deployment,
            "store": reply.get("store"), "expected": [p.instance for p in expected], "stages": stages})
    return {"deployment": state.deployment, "generation": state.generation, "model_id": state.model_id,
            "stopped": state.stopped, "lost": list(state.lost), "insecure": state.insecure, "time": time.time(),
            "devices": rows}


def _stage_row(s: StageStatus) -> dict[str, Any]:
    counters = s.counters
    return {
        "id": s.id, "state": s.state, "generation": s.generation, "stage": s.stage_index, "of": s.stage_count,
        "model_id": s.model_id, "pid": s.pid, "restarts": s.restarts, "hangs": s.hangs,
        "uptime_s": None if s.started_at is None or s.state not in ("ready", "starting")
        else round(time.time() - s.started_at, 1),
        "requests": _first(counters, DONE_KEYS), "throughput": s.throughput,
        "queue": _first(counters, QUEUE_KEYS), "errors": _sum(counters, ERROR_KEYS),
        "neighbours_down": [n.get("label") for n in counters.get("neighbours", []) or []
                            if isinstance(n, dict) and n.get("state") == "down"],
        "heartbeat_age_s": s.heartbeat_age_s, "last_exit": s.last_exit, "last_error": s.last_error,
        "ports": s.ports.to_dict(), "counters": counters}


def _first(counters: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in counters:
            return counters[key]
    return None


def _sum(counters: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    found = [counters[k] for k in keys if isinstance(counters.get(k), int)]
    return sum(found) if found else None


def healthy(doc: dict[str, Any]) -> bool:
    """Every expected stage instance is ready on a reachable device."""
    for row in doc["devices"]:
        if row["lost"]:
            continue
        states = {s["id"]: s["state"] for s in row["stages"]}
        if not row["reachable"] or any(states.get(i) != "ready" for i in row["expected"]):
            return False
    return True
