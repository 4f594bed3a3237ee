"""Small configurations of every model family compile into balanced, verified 4-stage splits, with a
single-activation cut at every transformer block and CNN stage boundary. Real exports (cached for
the run), real ONNX Runtime verification."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from edgepipe.agent.formats.bundle import InputValues, load_bundle
from edgepipe.compiler.build import CompileResult, candidate_cuts, compile_model, load_model
from edgepipe.models.registry import REGISTRY, build_module, get_model

STAGES = 4
# Block and stage boundaries each architecture must offer as one-tensor cuts (label patterns).
BOUNDARIES = {
    "bert_tiny": [r"bert\.encoder\.layer\.[01]"],
    "gpt2_tiny": [r"transformer\.h\.[01]"],
    "convnext_atto": [r"stages\.[1-3]", r"stages\.\d\.blocks\.\d"],
    "resnet10t": [r"layer[2-4]\.0"],
}
BLOCKS = {"bert_tiny": 2, "gpt2_tiny": 2, "convnext_atto": 3 + 2 + 2 + 6 + 2, "resnet10t": 3}


@pytest.fixture(scope="module", params=sorted(BOUNDARIES))
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    return compile_model(request.param, tmp_path_factory.mktemp(request.param), stages=STAGES)


def test_four_stages_are_balanced_and_verified(compiled: CompileResult) -> None:
    assert len(compiled.bundle_dirs) == STAGES
    assert compiled.verification is not None and compiled.verification.passed, compiled.verification
    balance = compiled.balance
    assert balance is not None and balance.balanced, balance.warnings
    # Each stage within 2x of the mean stage's FLOPs, both ways.
    assert balance.worst_ratio <= 2.0 and balance.least_ratio >= 0.5, balance.stage_flops
    assert all(len(c.tensors) == 1 for c in compiled.cuts)  # one activation per cut


def test_every_block_boundary_is_a_single_activation_cut(compiled: CompileResult) -> None:
    loaded = load_model(compiled.model_id)
    labels = {c.label: c for c in candidate_cuts(loaded)}
    patterns = BOUNDARIES[compiled.model_id]
    matching = [c for label, c in labels.items() if any(re.fullmatch(p, label) for p in patterns)]
    assert len({c.label for c in matching}) >= BLOCKS[compiled.model_id] - 1, sorted(labels)
    assert all(len(c.tensors) == 1 for c in matching)
    entry = get_model(compiled.model_id)
    if entry.family in ("bert", "gpt2"):
        # The mask is rebuilt behind every layer boundary from the forwarded attention_mask.
        layer_cuts = [c for c in matching if not c.label.endswith("ln_2")]
        assert all(c.forwarded == ("attention_mask",) and c.rebuilt for c in layer_cuts)
        # Honest bytes: the hidden state (128 tokens x 128 floats) plus the mask (128 int64 per sample).
        assert all(c.bytes_per_sample == 128 * 128 * 4 + 128 * 8 for c in layer_cuts)


def test_manifests_say_what_the_model_takes_and_what_is_forwarded(compiled: CompileResult) -> None:
    manifests = [load_bundle(d) for d in compiled.bundle_dirs]
    entry = get_model(compiled.model_id)
    assert [i.name for i in manifests[0].inputs] == [i.name for i in entry.inputs]
    assert manifests[0].input_values == entry.input_values
    assert all(m.format_version == 2 and m.fixed_batch is None for m in manifests)
    for upstream, downstream in itertools.pairwise(manifests):
        assert upstream.outputs == downstream.inputs
        for name in downstream.forwarded:
            assert downstream.input_values[name] == entry.input_values[name]
    if entry.family == "bert":
        assert manifests[0].input_values["input_ids"] == InputValues("index", 30522)
        assert any("attention_mask" in m.forwarded for m in manifests[1:])


def test_text_models_take_ids_within_their_vocabulary_and_masks() -> None:
    for name, vocab in (("bert_base", 30522), ("gpt2", 50257), ("bert_tiny", 30522)):
        entry = REGISTRY[name]
        assert entry.source == "transformers" and entry.exporter == "dynamo"
        assert entry.input_values == {"input_ids": InputValues("index", vocab), "attention_mask": InputValues("mask")}


def test_transformers_checkpoint_is_loaded_from_a_local_file(tmp_path: Path) -> None:
    """A local state dict (what a fine-tuned checkpoint is) replaces the random weights; nothing is fetched."""
    import torch
    from edgepipe.models.registry import example_inputs

    entry = get_model("bert_tiny")
    module = build_module(entry)
    state = module.state_dict()
    state["classifier.bias"] = torch.tensor([5.0, -5.0])
    torch.save(state, tmp_path / "bert.pth")
    loaded = build_module(entry, tmp_path / "bert.pth")
    with torch.no_grad():
        logits = loaded(**example_inputs(entry), return_dict=False)[0]
    assert (logits[:, 0] > logits[:, 1]).all()  # the +5/-5 bias dominates random logits
    bad = tmp_path / "bad.pth"
    torch.save({"classifier.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(Exception, match="does not fit bert_tiny"):
        build_module(entry, bad)
