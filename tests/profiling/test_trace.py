"""`edgepipe-submit --trace FILE` on a real 4-stage vit_tiny pipeline: the written Chrome trace has
one track per stage and every microbatch's receive, wait, compute and send in order; the clock
alignment puts skewed device clocks back in causal order; tools/plot_trace.py draws it."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from edgepipe.agent.client.trace import (
    ALIGNED,
    AS_RECORDED,
    ClientTimes,
    Microbatch,
    Run,
    TraceError,
    align,
    build_trace,
    load_run,
    write_trace,
)
from edgepipe.agent.formats.wire import StageRecord
from edgepipe.agent.local import LocalPipeline
from profiling_testlib import TINY, cli

ROOT = Path(__file__).resolve().parents[2]
COUNT = 6


@pytest.fixture(scope="module")
def four_stages(vit_tiny_build, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("tiny4")
    result = cli("edgepipe-compile", TINY, "--stages", "4", "-o", str(out), "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    return sorted(out.glob("stage-*"))


@pytest.fixture(scope="module")
def traced(four_stages: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "run.json"
    with LocalPipeline(four_stages, log_dir=path.parent / "logs") as pipe:
        result = cli("edgepipe-submit", *pipe.submit_args(), "--bundle", str(four_stages[0]), "-b", "2",
                     "-n", str(COUNT), "--trace", str(path), "--json")
    assert result.returncode == 0, result.stderr
    return path


def complete_events(trace: dict) -> dict[int, dict[str, list[dict]]]:
    """pid -> kind -> 'X' events."""
    found: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            found[e["pid"]][e["name"]].append(e)
    return found


def test_trace_has_one_track_per_stage_and_every_microbatch_in_order(traced: Path) -> None:
    trace = json.loads(traced.read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    stage_tracks = sorted(pid for pid, name in names.items() if name.startswith("stage "))
    assert [names[p] for p in stage_tracks] == [f"stage {k}" for k in range(4)]
    assert names[0] == "client"
    events = complete_events(trace)
    seqs = None
    for pid in stage_tracks:
        by_kind = {kind: {e["args"]["microbatch"]: e for e in events[pid][kind]} for kind in
                   ("receive", "wait", "compute", "send")}
        assert all(len(v) == COUNT for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
        seqs = seqs or sorted(by_kind["compute"])
        assert all(sorted(v) == seqs for v in by_kind.values())
        for mb in seqs:
            chain = [by_kind[k][mb] for k in ("receive", "wait", "compute", "send")]
            for before, after in itertools.pairwise(chain):
                assert before["ts"] + before["dur"] <= after["ts"] + 1.0  # µs; rounding only
        computes = [by_kind["compute"][mb] for mb in seqs]  # one compute thread: in order, no overlap
        for a, b in itertools.pairwise(computes):
            assert a["ts"] + a["dur"] <= b["ts"] + 1.0
    for upstream, downstream in itertools.pairwise(stage_tracks):  # a microbatch moves down in order
        for mb in seqs:
            sent = {e["args"]["microbatch"]: e for e in events[upstream]["send"]}[mb]
            received = {e["args"]["microbatch"]: e for e in events[downstream]["receive"]}[mb]
            assert sent["ts"] + sent["dur"] <= received["ts"] + received["dur"] + 1.0
    client = [e for e in trace["traceEvents"] if e["pid"] == 0 and e["ph"] == "i"]
    assert sorted(e["args"]["microbatch"] for e in client if e["name"] == "submit") == seqs
    assert sorted(e["args"]["microbatch"] for e in client if e["name"] == "result") == seqs


def test_trace_keeps_the_raw_records_for_later_analysis(traced: Path) -> None:
    run = load_run(traced)
    assert len(run.microbatches) == COUNT and run.stage_count == 4 and run.batch == 2
    assert all(len(m.stages) == 4 and m.client is not None for m in run.microbatches)
    assert json.loads(traced.read_text())["edgepipe"]["clock_alignment"] == AS_RECORDED  # one host


def test_plot_trace_draws_a_png(traced: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_trace.py"), str(traced), "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def synthetic_run(skews: list[float]) -> Run:
    """3 stages, 4 microbatches, 10 ms per step and 1 ms per hop on one true clock; stage k's clock
    then reads ``skews[k]`` seconds ahead."""
    microbatches = []
    for m in range(4):
        sent = 100.0 + 0.01 * m
        t, stages = sent, []
        for k, skew in enumerate(skews):
            recv = t + 0.001
            start, end = recv + 0.002, recv + 0.012
            send = end + 0.001
            stages.append(StageRecord(k, recv + skew, start + skew, end + skew, send + skew))
            t = send
        microbatches.append(Microbatch(m, 2, tuple(stages), ClientTimes(sent, t + 0.001)))
    return Run(tuple(microbatches), 2)


def test_alignment_keeps_consistent_clocks_and_repairs_skewed_ones() -> None:
    assert align(synthetic_run([0.0, 0.0, 0.0])).mode == AS_RECORDED
    skewed = synthetic_run([5.0, -3.0, 0.25])
    alignment = align(skewed)
    assert alignment.mode == ALIGNED
    # the fastest hop into each stage takes 1 ms on the true clock; aligned, it takes zero
    assert alignment.offsets == pytest.approx([-5.0 - 0.001, 3.0 - 0.002, -0.25 - 0.003])
    trace = build_trace(skewed)
    events = complete_events(trace)
    for pid in (1, 2, 3):
        assert all(e["dur"] >= 0 for kind in events[pid].values() for e in kind)
    stage_computes = [sorted(e["ts"] for e in events[pid]["compute"]) for pid in (1, 2, 3)]
    for a, b in itertools.pairwise(stage_computes):  # each microbatch computes later downstream
        assert all(x < y for x, y in zip(a, b))


def test_load_run_refuses_other_files(tmp_path: Path) -> None:
    chrome = tmp_path / "other.json"
    chrome.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(TraceError, match="not an EdgePipe run trace"):
        load_run(chrome)
    written = write_trace(tmp_path / "run.json", synthetic_run([0.0, 0.0, 0.0]))
    assert load_run(written).stage_count == 3
