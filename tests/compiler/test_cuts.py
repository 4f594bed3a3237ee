"""Cut discovery on hand-built graphs whose right answers are known, and on a real ViT export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from edgepipe.compiler.cuts import CutError, find_cuts, resolve_cuts
from edgepipe.compiler.graph import index_graph
from edgepipe.compiler.slicing import ModelIdentity, slice_model
from edgepipe.compiler.verify import verify_chain
from onnx import TensorProto, helper, numpy_helper


def skip_branch_model(path: Path) -> Path:
    """x -> MatMul -> Relu -> (+x) -> MatMul -> {Sigmoid, Tanh} -> Add -> Mul(const) -> y.

    Crossing activations in front of each node (position):
      1 {x, a}   2 {x, b}   3 {c}   4 {d}   5 {d, e}   6 {e, f}   7 {g}
    The Constant k (a static value) never crosses anything.
    """
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w2")
    k = helper.make_tensor("k_value", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Constant", [], ["k"], name="const_k", value=k),
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Add", ["b", "x"], ["c"], name="skip_add"),
        helper.make_node("MatMul", ["c", "w2"], ["d"], name="mm2"),
        helper.make_node("Sigmoid", ["d"], ["e"], name="sig"),
        helper.make_node("Tanh", ["d"], ["f"], name="tanh"),
        helper.make_node("Add", ["e", "f"], ["g"], name="join"),
        helper.make_node("Mul", ["g", "k"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes, "skip_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w1, w2],
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.fixture
def skip_model(tmp_path: Path) -> Path:
    return skip_branch_model(tmp_path / "skip.onnx")


def test_single_tensor_cuts_are_exactly_the_known_ones(skip_model: Path) -> None:
    index = index_graph(ir.load(skip_model).graph)
    cuts = find_cuts(index, max_tensors=1)
    assert [(c.position, c.tensors) for c in cuts] == [(4, ("c",)), (5, ("d",)), (8, ("g",))]
    assert all(c.bytes_per_sample == 16 for c in cuts)
    # Without exporter metadata a cut is named after the first node behind it.
    assert [c.label for c in cuts] == ["@mm2", "@sig", "@scale"]


def test_two_tensor_cuts_count_residual_and_branch_bytes(skip_model: Path) -> None:
    index = index_graph(ir.load(skip_model).graph)
    wide = {c.position: c for c in find_cuts(index, max_tensors=2)}
    assert set(wide[2].tensors) == {"x", "a"}
    assert set(wide[3].tensors) == {"x", "b"}
    assert set(wide[7].tensors) == {"e", "f"}
    assert wide[7].bytes_per_sample == 32
    assert "k" not in {t for c in wide.values() for t in c.tensors}


def test_unclean_cut_is_refused_naming_the_missing_tensor(skip_model: Path) -> None:
    index = index_graph(ir.load(skip_model).graph)
    cuts = find_cuts(index)
    with pytest.raises(CutError, match=r"'b' is not clean.*\['x'\]"):
        resolve_cuts(index, cuts, ["b"])
    with pytest.raises(CutError, match="unknown cut 'nope'"):
        resolve_cuts(index, cuts, ["nope"])


def test_cut_by_tensor_name_slices_and_reproduces_the_model(skip_model: Path, tmp_path: Path) -> None:
    model = ir.load(skip_model)
    index = index_graph(model.graph)
    chosen = resolve_cuts(index, find_cuts(index), ["d", "c"])  # order given by the user does not matter
    assert [c.tensors for c in chosen] == [("c",), ("d",)]
    dirs = slice_model(model, chosen, tmp_path / "out", ModelIdentity("skip", "0" * 64, {}))
    assert len(dirs) == 3
    result = verify_chain(skip_model, dirs, batch=3)
    assert result.max_abs_diff == {"y": 0.0}


def test_branch_cut_slices_two_tensors_exactly(skip_model: Path, tmp_path: Path) -> None:
    model = ir.load(skip_model)
    index = index_graph(model.graph)
    wide = find_cuts(index, max_tensors=2)
    branch = next(c for c in wide if set(c.tensors) == {"e", "f"})
    dirs = slice_model(model, [branch], tmp_path / "out", ModelIdentity("skip", "0" * 64, {}))
    assert verify_chain(skip_model, dirs).max_abs_diff == {"y": 0.0}


def test_vit_cuts_are_block_boundaries_with_one_token_tensor(vit_tiny_model: Path) -> None:
    index = index_graph(ir.load(vit_tiny_model).graph)
    cuts = find_cuts(index)
    labels = [c.label for c in cuts]
    for block in range(12):
        assert f"blocks.{block}" in labels
        assert f"blocks.{block}.norm2" in labels
    block_cuts = [c for c in cuts if c.label.startswith("blocks.")]
    # 197 tokens x 192 channels x 4 bytes, one tensor each.
    assert {c.bytes_per_sample for c in block_cuts} == {197 * 192 * 4}
    assert all(len(c.tensors) == 1 for c in cuts)


def test_vit_sub_block_cuts_carry_residual_plus_branch(vit_tiny_model: Path) -> None:
    index = index_graph(ir.load(vit_tiny_model).graph)
    wide = {c.label: c for c in find_cuts(index, max_tensors=2)}
    attn = wide["blocks.3.attn"]
    assert len(attn.tensors) == 2 and attn.bytes_per_sample == 2 * 197 * 192 * 4
    fc2 = wide["blocks.3.mlp.fc2"]  # residual (192 wide) + hidden (768 wide)
    assert fc2.bytes_per_sample == 197 * (192 + 768) * 4
