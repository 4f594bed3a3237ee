"""Values a later stage rebuilds for itself (masks, shape scalars), on hand-built graphs whose right
answers are known, sliced and run in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from compiler_testlib import WIDTH, masked_layers_model, skip_to_end_model
from edgepipe.agent.formats.bundle import load_bundle
from edgepipe.agent.formats.wire import check_against_inputs, describe
from edgepipe.compiler.balance import check_balance
from edgepipe.compiler.cuts import FORWARD_FRACTION, find_cuts, resolve_cuts
from edgepipe.compiler.graph import index_graph, tidy_shapes
from edgepipe.compiler.shapes import constant_value, per_sample_elements
from edgepipe.compiler.slicing import ModelIdentity, slice_model
from edgepipe.compiler.verify import run_chain, verify_chain


def load_index(path: Path):
    model = ir.load(path)
    tidy_shapes(model.graph)
    return model, index_graph(model.graph)


@pytest.fixture
def masked(tmp_path: Path) -> Path:
    return masked_layers_model(tmp_path / "masked.onnx")


def test_mask_and_batch_scalar_are_rebuilt_so_every_layer_boundary_is_a_single_tensor_cut(masked: Path) -> None:
    _, index = load_index(masked)
    by_tensor = {c.tensors: c for c in find_cuts(index)}
    for layer in range(3):  # in front of each layer (the input x for layer 0 is a model input, no cut)
        if layer == 0:
            continue
        cut = by_tensor[(f"h{layer - 1}",)]
        assert cut.forwarded == ("mask",)
        # The expanded mask and the batch vector are rebuilt, not sent.
        assert {"bias", "batch_vec"} <= set(cut.rebuilt)
        # Bytes: the activation (8 x 16 floats) and the forwarded mask (8 int64), nothing else.
        assert cut.bytes_per_sample == 8 * WIDTH * 4 + 8 * 8
    head = by_tensor[("h2",)]
    assert head.forwarded == () and head.rebuilt == ("batch_vec",)  # the mask's last use is behind


def test_rebuilt_stages_reproduce_the_whole_model_exactly(masked: Path, tmp_path: Path) -> None:
    model, index = load_index(masked)
    cuts = resolve_cuts(index, find_cuts(index), ["h0", "h1", "h2"])
    dirs = slice_model(model, cuts, tmp_path / "out", ModelIdentity("masked", "0" * 64, {}))
    manifests = [load_bundle(d) for d in dirs]
    assert [m.forwarded for m in manifests] == [(), ("mask",), ("mask",), ()]
    # A stage that needs the mask itself receives it, and passes it on while a later stage needs it.
    assert [o.name for o in manifests[1].outputs] == ["h1", "mask"]
    assert [i.name for i in manifests[3].inputs] == ["h2"]
    result = verify_chain(masked, dirs, batch=3)
    assert result.max_abs_diff == {"y": 0.0}
    # The graph is left as it was loaded: slicing again gives the same stages.
    again = slice_model(model, cuts, tmp_path / "again", ModelIdentity("masked", "0" * 64, {}))
    assert [(d / "stage.onnx").read_bytes() for d in again] == [(d / "stage.onnx").read_bytes() for d in dirs]


def test_masked_positions_change_the_output_through_every_stage(masked: Path, tmp_path: Path) -> None:
    """The forwarded mask really drives the rebuilt values: masking a token changes y."""
    model, index = load_index(masked)
    dirs = slice_model(model, resolve_cuts(index, find_cuts(index), ["h0", "h1"]), tmp_path / "out",
                       ModelIdentity("masked", "0" * 64, {}))
    x = np.random.default_rng(1).standard_normal((2, 8, WIDTH)).astype(np.float32)
    ones = np.ones((2, 8), np.int64)
    padded = ones.copy()
    padded[:, 6:] = 0
    full = run_chain(dirs, {"x": x, "mask": ones})["y"]
    masked_out = run_chain(dirs, {"x": x, "mask": padded})["y"]
    assert np.abs(full - masked_out).max() > 1.0


def test_forwarding_an_input_that_costs_more_than_the_activation_sends_the_value_instead(tmp_path: Path) -> None:
    """With a 2-wide activation, the 8-value mask would cost 4x the activation: over FORWARD_FRACTION,
    so the expanded mask is sent as a second tensor and only --max-tensors 2 finds the cut."""
    path = masked_layers_model(tmp_path / "narrow.onnx", width=2)
    _, index = load_index(path)
    assert FORWARD_FRACTION * (8 * 2 * 4) < 8 * 8
    narrow = {c.tensors: c for c in find_cuts(index)}
    assert ("h0",) not in narrow
    wide = [c for c in find_cuts(index, max_tensors=2) if "h0" in c.tensors]
    assert wide and all(c.forwarded == () and "bias" in c.tensors for c in wide)


def test_fixed_batch_model_is_verified_and_served_at_its_batch_only(tmp_path: Path) -> None:
    path = masked_layers_model(tmp_path / "fixed.onnx", batch=1)
    model, index = load_index(path)
    assert index.batch_dim == 1
    cuts = resolve_cuts(index, find_cuts(index), ["h1"])
    dirs = slice_model(model, cuts, tmp_path / "out", ModelIdentity("fixed", "0" * 64, {}))
    manifests = [load_bundle(d) for d in dirs]
    assert [m.fixed_batch for m in manifests] == [1, 1]
    result = verify_chain(path, dirs, batch=2)
    assert result.batch == 1 and result.passed  # verified at the batch it accepts, and says so
    h1 = {"h1": np.zeros((1, 8, WIDTH), np.float32), "mask": np.ones((1, 8), np.int64)}
    check_against_inputs(describe(h1), manifests[1].inputs, max_batch=8)
    h1_batch2 = {k: np.concatenate([v, v]) for k, v in h1.items()}
    with pytest.raises(ValueError, match="batch 2, but the stage takes only batch 1"):
        check_against_inputs(describe(h1_batch2), manifests[1].inputs, max_batch=8)


def test_a_tensor_that_crosses_everything_is_named_when_a_stage_gets_too_much(tmp_path: Path) -> None:
    """An early activation used only at the end blocks every cut in between: a 3-stage split leaves one
    stage with nearly all the work, and the warning names that tensor and --max-tensors 2."""
    path = skip_to_end_model(tmp_path / "skip.onnx")
    _, index = load_index(path)
    cuts = find_cuts(index)
    balance = check_balance(index, cuts[:1] + cuts[-1:], max_tensors=1)
    assert not balance.balanced
    assert any("tensor early" in w and "--max-tensors 2" in w for w in balance.warnings)


@pytest.mark.parametrize(("expression", "value"), [("((32*batch)//batch)", 32), ("batch - batch + 7", 7),
                                                   ("batch//64", None), ("128*batch", None), ("batch", None)])
def test_constant_dimension_expressions_are_recognised(expression: str, value: int | None) -> None:
    assert constant_value(expression) == value


def test_per_sample_elements_find_a_batch_merged_into_another_axis() -> None:
    assert per_sample_elements(("batch", 197, 192), "batch") == 197 * 192
    assert per_sample_elements(("128*batch", 768), "batch") == 128 * 768
    assert per_sample_elements((1, 3, 4), 1) == 12
    assert per_sample_elements(("batch", "seq"), "batch") is None
