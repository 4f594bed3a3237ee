"""A picture of a run: the stage records every result carries, as a Chrome/Perfetto trace.

``edgepipe-submit ... --trace run.json`` writes a JSON trace-event file (open it in
https://ui.perfetto.dev or chrome://tracing, or draw it with tools/plot_trace.py):

- one *process* track per stage, named ``stage K (device)``, and one for the client;
- on a stage's track, per microbatch: ``receive`` (from the upstream's send, or the client's
  submit, until this stage took the message off its socket: transfer and socket queueing),
  ``wait`` (decoding and the input queue, until compute started), ``compute`` (ONNX Runtime) and
  ``send`` (until the sender thread took the result). Slices that overlap in time (a pipelined
  stage receives microbatch k+1 while computing k) go to separate lanes (threads) of the track;
  ``compute`` is always one lane;
- on the client's track: a ``submit`` and a ``result`` instant per microbatch, and the request's
  life (``in flight``) between them.

Clocks. Each stage stamps its records with its own clock (``time.time()`` on its device); the
client stamps submit and result with its own. All times are put on the client's clock by one offset
per stage (``align``): if the recorded times already respect causality everywhere (the client sends
before stage 0 receives, each stage sends before the next receives, the last stage sends before the
client receives: same machine, or clocks synchronised better than a hop's transit), they are kept
as recorded ("as recorded"). Otherwise each stage's clock is shifted so that the fastest transfer
into it takes zero time ("aligned: zero minimum transit"): stage 0 against the client's submits,
each later stage against its upstream's sends. Transfers are then lower bounds, and everything a
stage does is still exact relative to itself (only differences within one device's clock are used
for durations).

The file also carries the raw records (``edgepipe`` key, format "edgepipe.run", version 1: per
microbatch its sequence number, samples, client times and stage records on their own clocks, plus
the offsets applied and, with ``--report PLAN``, the plan itself), so a run can be analysed again
(``edgepipe-compile ... --from-run run.json``). Readers ignore the key; Perfetto shows the trace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.agent.formats.wire import StageRecord

RUN_FORMAT = "edgepipe.run"
RUN_VERSION = 1
CLIENT_PID = 0
KINDS = ("receive", "wait", "compute", "send")
AS_RECORDED = "as recorded"
ALIGNED = "aligned: zero minimum transit"


class TraceError(ValueError):
    """A trace or run file cannot be read, or a run cannot be drawn; names the file or the fault."""


@dataclass(frozen=True)
class ClientTimes:
    """When the client first sent a request and when its result arrived (client clock, seconds)."""

    sent: float
    received: float
    exact: bool = True  # False: derived from when the result was handed over (see client_times)


@dataclass(frozen=True)
class Microbatch:
    """One request's journey: stage records on their devices' clocks, client times on its own."""

    seq: int
    samples: int
    stages: tuple[StageRecord, ...]
    client: ClientTimes | None = None


@dataclass(frozen=True)
class Run:
    """What a trace is drawn from and what ``--from-run`` analyses."""

    microbatches: tuple[Microbatch, ...]
    batch: int
    stage_devices: tuple[str, ...] = ()  # from the plan, when known
    plan: dict[str, Any] | None = None

    @property
    def stage_count(self) -> int:
        return max((len(m.stages) for m in self.microbatches), default=0)


@dataclass(frozen=True)
class Alignment:
    offsets: tuple[float, ...]  # added to each stage's times to put them on the client's clock
    mode: str  # AS_RECORDED or ALIGNED


def client_times(result: Any, handed_at: float | None = None) -> ClientTimes | None:
    """The client's times of a ``Result``: its ``sent_at``/``received_at`` if the client records
    them; otherwise derived from the time it was handed over (``handed_at``, an upper bound of
    the arrival) and its latency."""
    sent, received = getattr(result, "sent_at", None), getattr(result, "received_at", None)
    if sent and received:  # 0.0: not recorded
        return ClientTimes(float(sent), float(received))
    if handed_at is None:
        return None
    return ClientTimes(handed_at - float(result.latency_s), handed_at, exact=False)


def run_from_results(results: Sequence[Any], batch: int, handed_at: Sequence[float] | None = None,
                     plan: dict[str, Any] | None = None) -> Run:
    """A Run from the client's ``Result`` objects (their ``trace``, ``seq``, outputs' batch)."""
    microbatches = []
    for i, result in enumerate(results):
        samples = next((int(a.shape[0]) for a in result.outputs.values() if getattr(a, "ndim", 0)), batch)
        stamp = handed_at[i] if handed_at is not None and i < len(handed_at) else None
        microbatches.append(Microbatch(seq=int(result.seq), samples=samples, stages=tuple(result.trace),
                                       client=client_times(result, stamp)))
    devices = tuple(str(s.get("device", "")) for s in plan.get("stages", ())) if plan else ()
    return Run(tuple(microbatches), batch, devices, plan)


# ---- clocks ------------------------------------------------------------------------------------------

def align(run: Run) -> Alignment:
    """One offset per stage putting its records on the client's clock (module docstring)."""
    n = run.stage_count
    complete = [m for m in run.microbatches if len(m.stages) == n]
    if n == 0 or not complete:
        return Alignment((0.0,) * n, AS_RECORDED)
    # derived client times are too loose to test the stages' clocks against
    with_client = [m for m in complete if m.client is not None and m.client.exact]
    # lower bound of offset(k) - offset(k-1) (for k = 0: of offset(0) against the client)
    bounds = []
    for k in range(n):
        if k == 0:
            gaps = [m.client.sent - m.stages[0].recv for m in with_client]  # type: ignore[union-attr]
        else:
            gaps = [m.stages[k - 1].send - m.stages[k].recv for m in complete]
        bounds.append(max(gaps) if gaps else -math.inf)
    upper = min((m.client.received - m.stages[-1].send for m in with_client), default=math.inf)  # type: ignore[union-attr]
    if all(b <= 0 for b in bounds) and upper >= 0:
        return Alignment((0.0,) * n, AS_RECORDED)
    offsets, total = [], 0.0
    for bound in bounds:
        total += bound if math.isfinite(bound) else 0.0  # no exact client times: stage 0 keeps its clock
        offsets.append(total)
    return Alignment(tuple(offsets), ALIGNED)


# ---- the trace ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slice:
    kind: str
    stage: int  # -1: the client
    seq: int
    start: float  # seconds on the client's clock
    end: float


def slices(run: Run, alignment: Alignment) -> list[Slice]:
    """Every slice of the run, on the client's clock; zero-length slices are kept (a stage that
    waited for nothing still shows its microbatch in order)."""
    out: list[Slice] = []
    for m in run.microbatches:
        previous_send = m.client.sent if m.client is not None else None
        for k, rec in enumerate(m.stages):
            d = alignment.offsets[k] if k < len(alignment.offsets) else 0.0
            recv, start, end, send = rec.recv + d, rec.compute_start + d, rec.compute_end + d, rec.send + d
            if previous_send is not None:
                out.append(Slice("receive", k, m.seq, min(previous_send, recv), recv))
            out += [Slice("wait", k, m.seq, recv, max(start, recv)), Slice("compute", k, m.seq, start, end),
                    Slice("send", k, m.seq, end, max(send, end))]
            previous_send = send
        if m.client is not None:
            out.append(Slice("in flight", -1, m.seq, m.client.sent, m.client.received))
    return out


def lanes(items: Sequence[Slice]) -> list[int]:
    """Greedy interval partitioning: the lane of each slice (in the given order) such that slices of
    one lane never overlap; lane 0 is filled first."""
    ends: list[float] = []
    assigned = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda j: (items[j].start, items[j].end)):
        s = items[i]
        lane = next((k for k, e in enumerate(ends) if e <= s.start), None)
        if lane is None:
            lane = len(ends)
            ends.append(s.end)
        else:
            ends[lane] = s.end
        assigned[i] = lane
    return assigned


LANE_BASE = {"compute": 1, "wait": 10, "receive": 20, "send": 30, "in flight": 10}


def build_trace(run: Run) -> dict[str, Any]:
    """The Chrome trace-event JSON object of ``run``."""
    if not run.microbatches:
        raise TraceError("no successful results to trace")
    alignment = align(run)
    all_slices = slices(run, alignment)
    t0 = min(s.start for s in all_slices)
    events: list[dict[str, Any]] = []
    named: set[tuple[int, int]] = set()

    def pid_of(stage: int) -> int:
        return CLIENT_PID if stage < 0 else stage + 1

    for k in range(-1, run.stage_count):
        pid = pid_of(k)
        device = run.stage_devices[k] if 0 <= k < len(run.stage_devices) else ""
        name = "client" if k < 0 else f"stage {k}" + (f" ({device})" if device else "")
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
    groups: dict[tuple[int, str], list[Slice]] = {}
    for s in all_slices:
        groups.setdefault((s.stage, s.kind), []).append(s)
    for (stage, kind), group in sorted(groups.items()):
        pid = pid_of(stage)
        for s, lane in zip(group, lanes(group)):
            tid = LANE_BASE[kind] + lane
            if (pid, tid) not in named:
                named.add((pid, tid))
                label = kind if lane == 0 else f"{kind} {lane + 1}"
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": label}})
                events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                               "args": {"sort_index": tid}})
            events.append({"ph": "X", "name": kind, "cat": kind, "pid": pid, "tid": tid,
                           "ts": _us(s.start - t0), "dur": _us(s.end - s.start),
                           "args": {"microbatch": s.seq}})
    for m in run.microbatches:
        if m.client is None:
            continue
        for name, when, tid in (("submit", m.client.sent, 1), ("result", m.client.received, 2)):
            events.append({"ph": "i", "s": "t", "name": name, "cat": name, "pid": CLIENT_PID, "tid": tid,
                           "ts": _us(when - t0), "args": {"microbatch": m.seq, "samples": m.samples}})
    for tid, label in ((1, "submit"), (2, "result")):
        events.append({"ph": "M", "name": "thread_name", "pid": CLIENT_PID, "tid": tid, "args": {"name": label}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "edgepipe": run_to_dict(run, alignment, t0)}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def run_to_dict(run: Run, alignment: Alignment, t0: float) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT, "format_version": RUN_VERSION, "batch": run.batch,
        "stage_devices": list(run.stage_devices), "clock_alignment": alignment.mode,
        "stage_offsets_s": list(alignment.offsets), "time_zero": t0,
        "microbatches": [
            {"seq": m.seq, "samples": m.samples,
             "client": None if m.client is None else [m.client.sent, m.client.received],
             "client_exact": m.client is None or m.client.exact,
             "stages": [[r.stage, r.recv, r.compute_start, r.compute_end, r.send] for r in m.stages]}
            for m in run.microbatches],
        "plan": run.plan,
    }


def write_trace(path: Path | str, run: Run) -> Path:
    """Write ``run``'s trace to ``path`` (written whole, then renamed: never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(build_trace(run)) + "\n")
    tmp.replace(path)
    return path


def load_run(path: Path | str) -> Run:
    """The run inside a trace written by ``write_trace``; TraceError naming the file otherwise."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc}") from None
    section = raw.get("edgepipe") if isinstance(raw, dict) else None
    if not isinstance(section, dict) or section.get("format") != RUN_FORMAT:
        raise TraceError(f"{path}: not an EdgePipe run trace (edgepipe-submit --trace writes one)")
    if section.get("format_version") != RUN_VERSION:
        raise TraceError(f"{path}: run format version {section.get('format_version')} is not supported "
                         f"(supports {RUN_VERSION})")
    try:
        microbatches = tuple(
            Microbatch(seq=int(m["seq"]), samples=int(m["samples"]),
                       stages=tuple(StageRecord(int(r[0]), *(float(x) for x in r[1:5])) for r in m["stages"]),
                       client=None if m.get("client") is None else ClientTimes(
                           *(float(x) for x in m["client"]), exact=bool(m.get("client_exact", True))))
            for m in section["microbatches"])
        plan = section.get("plan")
        return Run(microbatches, int(section["batch"]), tuple(str(d) for d in section.get("stage_devices", ())),
                   plan if isinstance(plan, dict) else None)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise TraceError(f"{path}: malformed run record: {exc!r}") from None


def write_traced_outcomes(path: Path | str, outcomes: Sequence[Any], handed_at: Sequence[float], batch: int,
                          plan_path: Path | str | None = None) -> Path:
    """``edgepipe-submit --trace``: the successful outcomes (``Result``; errors have no records)
    with the times they were handed over, and the plan file's contents if one was given."""
    plan = None
    if plan_path is not None:
        try:
            plan = json.loads(Path(plan_path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{plan_path}: cannot read the plan: {exc}") from None
    ok = [(o, t) for o, t in zip(outcomes, handed_at) if hasattr(o, "trace")]
    run = run_from_results([o for o, _ in ok], batch, [t for _, t in ok], plan)
    return write_trace(path, run)
