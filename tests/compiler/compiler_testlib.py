"""ONNX graphs built by hand for the compiler tests, whose right answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 16


def masked_layers_model(path: Path, layers: int = 3, batch: int | str = "batch", width: int = WIDTH) -> Path:
    """A transformer in miniature: ``x [B, 8, W]`` and ``mask [B, 8]`` (int64, 1 = attend).

    The mask is expanded once at the start (Cast, Unsqueeze, Sub, Mul: ``bias [B, 1, 8]``) and every
    layer reads it: ``h = h + Relu(h @ w_i) + ReduceMean(bias)``. The head reshapes with the batch
    size read from ``Shape(x)`` at the very start: ``y = Reshape(h, [B, -1]) @ w_out``. So ``bias`` and
    the batch scalar cross every layer boundary, exactly as in BERT and ConvNeXt exports.
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 4, f"w{i}")
             for i in range(layers)]
    inits += [numpy_helper.from_array(rng.standard_normal((8 * width, 3)).astype(np.float32) / 8, "w_out"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(-100.0, np.float32), "big_negative")]
    nodes = [
        helper.make_node("Shape", ["x"], ["batch_vec"], name="batch_of_x", start=0, end=1),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis1"], ["mask_u"], name="mask_unsqueeze"),
        helper.make_node("Sub", ["one", "mask_u"], ["inverted"], name="mask_invert"),
        helper.make_node("Mul", ["inverted", "big_negative"], ["bias"], name="mask_bias"),
    ]
    h = "x"
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], name=f"layer{i}_matmul"),
            helper.make_node("Relu", [f"mm{i}"], [f"relu{i}"], name=f"layer{i}_relu"),
            helper.make_node("ReduceMean", ["bias"], [f"bias_mean{i}"], name=f"layer{i}_bias_mean", keepdims=1),
            helper.make_node("Add", [f"relu{i}", f"bias_mean{i}"], [f"branch{i}"], name=f"layer{i}_add_bias"),
            helper.make_node("Add", [h, f"branch{i}"], [f"h{i}"], name=f"layer{i}_residual"),
        ]
        h = f"h{i}"
    nodes += [
        helper.make_node("Concat", ["batch_vec", "minus_one"], ["flat_shape"], name="head_shape", axis=0),
        helper.make_node("Reshape", [h, "flat_shape"], ["flat"], name="head_flatten"),
        helper.make_node("MatMul", ["flat", "w_out"], ["y"], name="head_matmul"),
    ]
    graph = helper.make_graph(
        nodes, "masked_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, width]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        initializer=inits,
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=64)
    return path


def skip_to_end_model(path: Path, width: int = 16, chain: int = 6) -> Path:
    """x -> a = x@w0 -> early = Relu(a); h = a@w1 @ ... (chain MatMuls); y = (h + early) @ w_out.
    ``early`` crosses every position of the chain, so the only one-tensor cuts are {a} and {h + early}."""
    rng = np.random.default_rng(0)
    names = [f"w{i}" for i in range(chain + 1)] + ["w_out"]
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 4, n) for n in names]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["early"], name="early_relu")]
    h = "a"
    for i in range(1, chain + 1):
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"h{i}"], name=f"chain{i}"))
        h = f"h{i}"
    nodes += [helper.make_node("Add", [h, "early"], ["s"], name="join"),
              helper.make_node("MatMul", ["s", "w_out"], ["y"], name="last")]
    graph = helper.make_graph(nodes, "skip_to_end",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                              initializer=inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=64)
    return path
