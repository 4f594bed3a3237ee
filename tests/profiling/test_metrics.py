"""The optional Prometheus endpoint: `edgepipe-agent metrics --control ENDPOINT` publishes a serving
stage's counters (fields as the data plane's `status` reply defines them)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from edgepipe.agent.control_client import request_status
from edgepipe.agent.device.metrics import render
from edgepipe.agent.local import LocalPipeline
from edgepipe.agent.transport import INSECURE
from profiling_testlib import BIN, TINY, cli, dead_endpoint

STATUS = {  # a status reply with the `stage` field as the data plane defines it (docs/profiling.md)
    "device": "pi-a", "ort_version": "1.32.0",
    "stage": {"stage_index": 1, "stage_count": 3, "model_id": "vit", "device": "pi-a", "role": "middle",
              "codec": "fp16", "secure": True, "incarnation": "ab12", "deployment": "d", "generation": 2,
              "uptime_s": 12.5, "busy": 0.75, "requests_in": 40, "requests_out": 38, "computed": 39, "failed": 1,
              "errors_out": 1, "rejected": 0, "dropped": 2, "duplicates": 0, "resends": 3, "held": 0,
              "undeliverable": 0, "bytes_in": 123456, "bytes_out": 65432, "queue_msgs": 2, "queue_bytes": 4096,
              "inflight_msgs": 1, "inflight_bytes": 2048, "peers_down": 1,
              "neighbours": [{"role": "upstream", "label": "s0", "key": None, "device": "pi-z", "stage": 0,
                              "incarnation": "x", "state": "up", "last_seen_s": 0.2, "restarts_seen": 1,
                              "down_events": 0, "inflight_msgs": 0},
                             {"role": "downstream", "label": "s2", "key": None, "device": "pi-b", "stage": 2,
                              "incarnation": "y", "state": "down", "last_seen_s": 1.7, "restarts_seen": 0,
                              "down_events": 1, "inflight_msgs": 1}]},
}


def test_render_publishes_counters_gauges_and_neighbours() -> None:
    text = render(STATUS)
    labels = 'device="pi-a",model="vit",stage="1"'
    for line in ("edgepipe_up 1.0", f"edgepipe_stage_requests_in_total{{{labels}}} 40.0",
                 f"edgepipe_stage_failed_total{{{labels}}} 1.0", f"edgepipe_stage_bytes_out_total{{{labels}}} 65432.0",
                 f"edgepipe_stage_busy_ratio{{{labels}}} 0.75", f"edgepipe_stage_queue_messages{{{labels}}} 2.0",
                 "# TYPE edgepipe_stage_requests_in_total counter", "# TYPE edgepipe_stage_busy_ratio gauge"):
        assert line in text, line
    assert ('edgepipe_neighbour_up{device="pi-a",label="s2",model="vit",peer_device="pi-b",peer_stage="2",'
            'role="downstream",stage="1"} 0.0') in text
    assert 'codec="fp16"' in text and 'ort_version="1.32.0"' in text  # the info series
    assert render(None).strip().splitlines()[-1] == "edgepipe_up 0.0"


@pytest.fixture(scope="module")
def served(vit_tiny_build, tmp_path_factory: pytest.TempPathFactory):
    """A one-stage vit_tiny pipeline answering status on a control endpoint, and its exporter."""
    root = tmp_path_factory.mktemp("metrics")
    result = cli("edgepipe-compile", TINY, "--stages", "1", "-o", str(root / "b"), "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    control = dead_endpoint()
    with LocalPipeline([root / "b" / "stage-0"], log_dir=root / "logs", agent_args=["--control", control]) as pipe:
        ready = root / "metrics.json"
        exporter = subprocess.Popen([str(BIN / "edgepipe-agent"), "metrics", "--control", control, "--listen",
                                     "127.0.0.1:0", "--ready-file", str(ready)], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (ready.exists() and ready.read_text()):
                assert exporter.poll() is None, exporter.stderr.read() if exporter.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield pipe, control, json.loads(ready.read_text())["url"], root
        finally:
            exporter.terminate()
            exporter.wait(10)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def test_exporter_serves_a_live_stage(served) -> None:
    _pipe, _control, url, _root = served
    text = scrape(url)
    assert "edgepipe_up 1.0" in text
    assert 'ort_version="' in text


def test_exporter_counts_requests_of_a_live_stage(served) -> None:
    pipe, control, url, root = served
    assert "stage" in request_status(control, auth=INSECURE), "the serving agent's status must carry `stage` counters"
    result = cli("edgepipe-submit", *pipe.submit_args(), "--bundle", str(root / "b" / "stage-0"), "-b", "2",
                 "-n", "5", "--warmup", "0", "--json")
    assert result.returncode == 0, result.stderr
    text = scrape(url)
    line = next(x for x in text.splitlines() if x.startswith("edgepipe_stage_computed_total{"))
    assert float(line.split()[-1]) >= 5
    assert "edgepipe_stage_bytes_in_total{" in text and "edgepipe_stage_busy_ratio{" in text


def test_exporter_says_down_when_the_stage_is_gone(tmp_path: Path) -> None:
    ready = tmp_path / "m.json"
    proc = subprocess.Popen([str(BIN / "edgepipe-agent"), "metrics", "--control", dead_endpoint(), "--listen",
                             "127.0.0.1:0", "--ready-file", str(ready)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert "edgepipe_up 0.0" in scrape(json.loads(ready.read_text())["url"])
    finally:
        proc.terminate()
        proc.wait(10)
