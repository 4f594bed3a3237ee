"""A transformer end to end: bert_tiny (random weights) compiled into 4 stages, served by 4 agent
processes (torch and onnx unimportable, as on a device), driven by the Client and by edgepipe-submit
with token ids and attention masks; outputs equal the unsplit model's."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from agent_testlib import blocked_imports_env
from edgepipe.agent.client.inputs import ModelInputs, inputs_from_bundle, random_inputs
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.local import LocalPipeline

TOLERANCE = 1e-4
SUBMIT = str(Path(sys.executable).parent / "edgepipe-submit")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    from edgepipe.compiler.build import compile_model

    return compile_model("bert_tiny", tmp_path_factory.mktemp("bert_tiny_4"), stages=4)


@pytest.fixture(scope="module")
def bert_pipeline(bert, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPipeline]:
    tmp = tmp_path_factory.mktemp("bert_agents")
    with LocalPipeline(bert.bundle_dirs, env=blocked_imports_env(tmp), log_dir=tmp / "logs") as pipe:
        yield pipe


def whole_model(bert) -> ort.InferenceSession:
    return ort.InferenceSession(str(bert.model_path), providers=["CPUExecutionProvider"])


def test_four_agents_match_the_whole_model_with_padded_masks(bert, bert_pipeline: LocalPipeline) -> None:
    # The later stages rebuild the attention mask from the forwarded model input.
    assert any(read_manifest(d).forwarded == ("attention_mask",) for d in bert.bundle_dirs[1:])
    inputs = inputs_from_bundle(bert.bundle_dirs[0])
    rng = np.random.default_rng(3)
    batches = [random_inputs(inputs, n, rng, padded_masks=True) for n in (2, 1, 3, 4)]
    with bert_pipeline.client(window=3) as client:
        results = list(client.results(batches))
    whole = whole_model(bert)
    for batch, result in zip(batches, results, strict=True):
        (want,) = whole.run(None, batch)
        got = result.outputs["logits"]
        assert got.shape == want.shape == (batch["input_ids"].shape[0], 2)
        assert float(np.abs(got - want).max()) <= TOLERANCE
        assert [r.stage for r in result.trace] == [0, 1, 2, 3]
    # The mask matters: the same ids with every token attended give other logits.
    padded = batches[3]
    unpadded = {**padded, "attention_mask": np.ones_like(padded["attention_mask"])}
    with bert_pipeline.client() as client:
        changed = client.run(unpadded)["logits"]
    assert float(np.abs(changed - results[3].outputs["logits"]).max()) > 1e-6


def _submit(pipe: LocalPipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, *pipe.submit_args(), *args], capture_output=True, text=True, timeout=120)


def test_submit_random_sends_ids_within_the_vocabulary(bert, bert_pipeline: LocalPipeline) -> None:
    proc = _submit(bert_pipeline, "--bundle", str(bert.bundle_dirs[0]), "--random", "-b", "2", "-n", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["requests"], report["samples"], report["failed"]) == (3, 6, 0)


def _token_data(bert, samples: int = 5) -> dict[str, np.ndarray]:
    inputs = inputs_from_bundle(bert.bundle_dirs[0])
    return random_inputs(inputs, samples, np.random.default_rng(11), padded_masks=True)


def test_submit_named_npy_inputs_and_npz_match_the_whole_model(bert, bert_pipeline: LocalPipeline,
                                                               tmp_path: Path) -> None:
    data = _token_data(bert)
    np.save(tmp_path / "ids.npy", data["input_ids"])
    np.save(tmp_path / "mask.npy", data["attention_mask"])
    np.savez(tmp_path / "both.npz", **data)
    (want,) = whole_model(bert).run(None, data)
    for args in (["--input", f"input_ids={tmp_path / 'ids.npy'}", "--input", f"attention_mask={tmp_path / 'mask.npy'}"],
                 ["--input", str(tmp_path / "both.npz")]):
        out = tmp_path / "out.npz"
        proc = _submit(bert_pipeline, "--bundle", str(bert.bundle_dirs[0]), *args, "-b", "2", "--save", str(out),
                       "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["samples"] == 5  # 2 + 2 + 1
        np.testing.assert_allclose(np.load(out)["logits"], want, atol=TOLERANCE)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d, t: ["--input", f"input_idz={t / 'ids.npy'}", "--input", f"attention_mask={t / 'mask.npy'}"],
     "no model input named 'input_idz'; the model takes input_ids, attention_mask"),
    (lambda d, t: ["--input", f"input_ids={t / 'ids.npy'}"], "missing input 'attention_mask'"),
    (lambda d, t: ["--input", f"input_ids={t / 'float_ids.npy'}", "--input", f"attention_mask={t / 'mask.npy'}"],
     "input 'input_ids' is float32, the model takes int64"),
    (lambda d, t: ["--input", f"input_ids={t / 'short_ids.npy'}", "--input", f"attention_mask={t / 'mask.npy'}"],
     "input 'input_ids' has shape [5, 64], the model takes ['N', 128]"),
    (lambda d, t: ["--input", f"input_ids={t / 'big_ids.npy'}", "--input", f"attention_mask={t / 'mask.npy'}"],
     "99999]; the model takes token ids in [0, 30522)"),
    (lambda d, t: ["--npy", str(t / "ids.npy"), "--npy", str(t / "mask.npy")], "--npy given 2 times"),
    (lambda d, t: ["--npy", str(t / "ids.npy")], "the model takes 2 inputs (input_ids, attention_mask); name each"),
    (lambda d, t: ["--input", str(t / "ids.npy")], "expected NAME=FILE.npy or FILE.npz"),
    (lambda d, t: ["--input", str(t / "broken.npz")], "not a readable .npz file"),
    (lambda d, t: ["--input", f"input_ids={t / 'ids.npy'}", "--input", str(t / "both.npz")],
     "input 'input_ids' is given twice"),
])
def test_submit_wrong_name_dtype_shape_or_file_is_one_line(bert, bert_pipeline: LocalPipeline, tmp_path: Path,
                                                           make, message: str) -> None:
    data = _token_data(bert)
    np.save(tmp_path / "ids.npy", data["input_ids"])
    np.save(tmp_path / "mask.npy", data["attention_mask"])
    np.save(tmp_path / "float_ids.npy", data["input_ids"].astype(np.float32))
    np.save(tmp_path / "short_ids.npy", data["input_ids"][:, :64])
    big = data["input_ids"].copy()
    big[0, 0] = 99999
    np.save(tmp_path / "big_ids.npy", big)
    np.savez(tmp_path / "both.npz", **data)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    proc = _submit(bert_pipeline, "--bundle", str(bert.bundle_dirs[0]), *make(data, tmp_path))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("edgepipe-submit: error: ") and message in line, line


def test_model_inputs_without_values_default_to_safe_ranges() -> None:
    from edgepipe.agent.formats.bundle import TensorSpec

    inputs = ModelInputs((TensorSpec("ids", "int64", ("batch", 4)), TensorSpec("x", "float32", ("batch", 2))))
    made = random_inputs(inputs, 3, np.random.default_rng(0))
    assert made["ids"].dtype == np.int64 and set(np.unique(made["ids"])) <= {0, 1}
    assert made["x"].dtype == np.float32 and made["x"].shape == (3, 2)


def test_fixed_batch_models_get_their_batch_and_refuse_others() -> None:
    from edgepipe.agent.client.inputs import InputError, requests_from
    from edgepipe.agent.formats.bundle import TensorSpec

    fixed = ModelInputs((TensorSpec("x", "float32", (1, 4)),), fixed_batch=1)
    assert [r["x"].shape for r in requests_from(fixed, None, None, 3)] == [(1, 4)] * 3  # -b defaults to 1
    with pytest.raises(InputError, match="fixed batch size of 1; use -b 1"):
        requests_from(fixed, None, 8, 3)
    data = {"x": np.zeros((3, 4), np.float32)}
    assert len(requests_from(fixed, data, None, None)) == 3
    free = ModelInputs((TensorSpec("x", "float32", ("batch", 4)),))
    assert [r["x"].shape[0] for r in requests_from(free, data, 2, None)] == [2, 1]
