"""The README's Python snippet runs as written (issue 15, item 3) against a real 3-stage vit_tiny
pipeline: only its example endpoints are replaced, its key files are where it says they are (the
devices' public keys beside it, the client's secret key in the key directory), and what it prints
is the unsplit model's answer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepipe.agent.local import LocalPipeline

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python() -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return snippet


def test_readme_snippet_defines_its_batches_and_prints_the_models_answers(vit_tiny_build, tmp_path: Path) -> None:
    snippet = readme_python()
    assert "batches = " in snippet  # defined, not left to the reader
    run_dir = tmp_path / "client"
    run_dir.mkdir()
    with LocalPipeline(vit_tiny_build.bundle_dirs, log_dir=tmp_path / "logs") as pipe:
        keys = tmp_path / "logs" / "keys"
        shutil.copy(keys / "stage0-0.key", run_dir / "dev0.key")
        shutil.copy(keys / "stage2-0.key", run_dir / "dev2.key")
        code = snippet.replace("tcp://dev0:5550", pipe.entry).replace("tcp://dev2:5551", pipe.exit)
        proc = subprocess.run([sys.executable, "-c", code], cwd=run_dir, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "EDGEPIPE_KEYS": str(keys)})
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()

    whole = ort.InferenceSession(str(vit_tiny_build.model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)  # the snippet's batches, made again
    batches = [rng.standard_normal((8, 3, 224, 224), dtype=np.float32) for _ in range(4)]
    assert printed == [str(whole.run(None, {"pixels": x})[0].argmax(axis=1)) for x in batches]
