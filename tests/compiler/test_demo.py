"""`make demo`'s script end to end (vit_tiny, random weights): it checks the pipeline against the
unsplit model and says what one machine can and cannot show (issue 15, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "tools" / "demo.py"


def test_demo_checks_the_outputs_and_says_why_it_is_not_a_speed_test(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--model", "vit_tiny_patch16_224", "--stages", "3", "--batch", "2",
         "--count", "3", "--out", str(tmp_path / "demo"), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] <= result["tolerance"] and result["stages"] == 3
    assert result["cores"] == len(os.sched_getaffinity(0))
    words = " ".join(proc.stdout.split())
    assert "give the unsplit model's outputs" in words
    assert "What it cannot show on one machine: a speed-up." in words
    if result["cores"] < 3:  # this machine: 3 agents of one thread each on 2 cores
        assert f"the 3 agents (3 ONNX Runtime threads) share this machine's {result['cores']} core" in words
    assert "Pipelining pays when every stage has a device of its own" in words
