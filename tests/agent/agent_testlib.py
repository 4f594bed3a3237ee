"""Helpers for the runtime tests: hand-built stage bundles (tiny ONNX graphs made with onnx.helper,
weights as external data) that build in milliseconds and let tests trigger ONNX Runtime failures.

The toy pipeline (3 stages, F=16 features):
    stage 0: x[b,16] -> a = x @ W, b = x + 1            (two tensors cross the first cut)
    stage 1: a, b -> c = a * b + table[int(b[:, 0])]    (table is 1000 zeros: fails if b[:, 0] >= 1000)
    stage 2: c -> out = tanh(c), label = argmax(c, 1)  (float32 and int64 outputs)
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import onnx
import zmq
from edgepipe.agent.formats.bundle import (
    DATA_NAME,
    GRAPH_NAME,
    StageManifest,
    TensorSpec,
    file_entries,
    write_manifest,
)
from edgepipe.agent.formats.keys import KeyPair
from edgepipe.agent.formats.wire import (
    PROTOCOL_VERSION,
    Header,
    Heartbeat,
    Limits,
    ProtocolError,
    ack_messages,
    data_header,
    decode,
    encode,
    encode_heartbeat,
    parse,
)
from edgepipe.agent.transport import INSECURE, ClientAuth, connect_data, connect_results
from onnx import TensorProto, helper, numpy_helper

F = 16
TABLE = 1000
POISON = 5000.0  # x[:, 0] = POISON makes stage 1 index past its table: an ORT run-time failure
ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


def toy_weight() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((F, F)).astype(np.float32) / 4


def toy_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    a = x @ toy_weight()
    c = a * (x + 1)
    return {"out": np.tanh(c), "label": np.argmax(c, axis=1)}


def toy_input(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, F), dtype=np.float32)


def _vi(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, ONNX_TYPES[spec.dtype], list(spec.shape))


def write_bundle(out: Path, nodes: list, inits: list, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 index: int, count: int, *, model_id: str = "toy",
                 manifest_inputs: list[TensorSpec] | None = None) -> Path:
    """Save a graph as stage.onnx + stage.onnx.data and write a manifest with real hashes.
    ``manifest_inputs`` lets a test write a manifest that disagrees with its graph."""
    out.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(nodes, f"{model_id}_stage{index}", [_vi(t) for t in inputs],
                              [_vi(t) for t in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(out / GRAPH_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=64)  # shape inputs stay inline
    names = [GRAPH_NAME] + ([DATA_NAME] if (out / DATA_NAME).exists() else [])
    manifest = StageManifest(
        model_id=model_id, model_sha256="0" * 64, stage_index=index, stage_count=count,
        inputs=tuple(manifest_inputs or inputs), outputs=tuple(outputs), files=file_entries(out, names),
        cut_in=None if index == 0 else f"cut{index}",
        cut_out=None if index == count - 1 else f"cut{index + 1}",
        weight_bytes=sum(numpy_helper.to_array(t).nbytes for t in inits),
    )
    write_manifest(out, manifest)
    return out


def build_toy(root: Path) -> list[Path]:
    b_ = "batch"
    x = TensorSpec("x", "float32", (b_, F))
    a, b = TensorSpec("a", "float32", (b_, F)), TensorSpec("b", "float32", (b_, F))
    c = TensorSpec("c", "float32", (b_, F))
    out, label = TensorSpec("out", "float32", (b_, F)), TensorSpec("label", "int64", (b_,))
    ones = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    s0 = write_bundle(
        root / "stage-0",
        [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Add", ["x", "one"], ["b"])],
        [numpy_helper.from_array(toy_weight(), "W"), ones], [x], [a, b], 0, 3)
    s1 = write_bundle(
        root / "stage-1",
        [helper.make_node("Slice", ["b", "s_start", "s_end", "s_axes"], ["b0"]),
         helper.make_node("Cast", ["b0"], ["idx"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),  # [batch, 1]
         helper.make_node("Mul", ["a", "b"], ["ab"]),
         helper.make_node("Add", ["ab", "g"], ["c"])],
        [numpy_helper.from_array(np.zeros((TABLE,), np.float32), "table"),
         numpy_helper.from_array(np.array([0], np.int64), "s_start"),
         numpy_helper.from_array(np.array([1], np.int64), "s_end"),
         numpy_helper.from_array(np.array([1], np.int64), "s_axes")],
        [a, b], [c], 1, 3)
    s2 = write_bundle(
        root / "stage-2",
        [helper.make_node("Tanh", ["c"], ["out"]),
         helper.make_node("ArgMax", ["c"], ["label"], axis=1, keepdims=0)],
        [], [c], [out, label], 2, 3)
    return [s0, s1, s2]


def decode_reply(frames: list) -> tuple[Header, list[np.ndarray]]:
    return decode(frames, Limits())


def raw_header_frames(raw: dict, arrays: list) -> list:
    """Frames with a hand-written header dict (to break the protocol on purpose)."""
    return [msgpack.packb(raw), *arrays]


def toy_frames(client: str, seq: int, x: np.ndarray) -> list:
    return encode(data_header(client, seq, {"x": x}), [x])


def blocked_imports_env(tmp_path: Path) -> dict[str, str]:
    """Environment in which `import torch` / `import onnx` (and friends) raise ImportError: shadow
    modules come first on PYTHONPATH. Proves the agent runs on a device without them."""
    shadow = tmp_path / "blocked_modules"
    shadow.mkdir(exist_ok=True)
    for mod in ("torch", "onnx", "onnxscript", "onnx_ir", "timm", "torchvision"):
        (shadow / f"{mod}.py").write_text(f"raise ImportError('{mod} is blocked in this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), env.get("PYTHONPATH", "")) if p)
    return env


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def build_identity_chain(root: Path, stages: int, sample_shape: tuple[int, ...]) -> list[Path]:
    """``stages`` bundles that each compute y = x + 0 on float32 [batch, *sample_shape]."""
    dirs = []
    for k in range(stages):
        spec_in = TensorSpec(f"t{k}", "float32", ("batch", *sample_shape))
        spec_out = TensorSpec(f"t{k + 1}", "float32", ("batch", *sample_shape))
        node = helper.make_node("Add", [f"t{k}", "zero"], [f"t{k + 1}"])
        dirs.append(write_bundle(root / f"stage-{k}", [node],
                                 [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")],
                                 [spec_in], [spec_out], k, stages, model_id="identity"))
    return dirs


def build_slow_pipeline(root: Path, matmuls: int = 12, size: int = 1024) -> list[Path]:
    """Two stages; stage 0 returns x unchanged but first runs ``matmuls`` size x size matrix products
    that depend on x (so ONNX Runtime cannot fold them away): a stage that takes a while."""
    x, y = TensorSpec("x", "float32", ("batch", F)), TensorSpec("y", "float32", ("batch", F))
    z = TensorSpec("z", "float32", ("batch", F))
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["s0"]), helper.make_node("Add", ["eye", "s0"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "eye"], [f"h{i + 1}"]) for i in range(matmuls)]
    nodes += [helper.make_node("ReduceSum", [f"h{matmuls}"], ["t"], keepdims=0),
              helper.make_node("Mul", ["t", "zero"], ["t0"]), helper.make_node("Add", ["x", "t0"], ["y"])]
    inits = [numpy_helper.from_array(np.eye(size, dtype=np.float32), "eye"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    s0 = write_bundle(root / "stage-0", nodes, inits, [x], [y], 0, 2, model_id="slow")
    s1 = write_bundle(root / "stage-1", [helper.make_node("Add", ["y", "zero"], ["z"])],
                      [numpy_helper.from_array(np.zeros((1,), np.float32), "zero")], [y], [z], 1, 2,
                      model_id="slow")
    return [s0, s1]


# ---- raw v2 peers: what an attacker or a buggy client can send ---------------------------------

class RawPeer:
    """A DEALER speaking the wire protocol by hand to a stage's --listen (or, ``results=True``, to
    the last stage's --results), for messages the Client would never produce. ``keypair`` None
    connects in plaintext (to an --insecure stage, or to see a secure one refuse it)."""

    def __init__(self, endpoint: str, *, keypair: KeyPair | None = None, server_key: str | bytes | None = None,
                 results: bool = False, client_id: str = "raw", insecure: bool = False) -> None:
        self.ctx = zmq.Context()
        auth = INSECURE if insecure or keypair is None else ClientAuth(
            keypair, server_key.encode() if isinstance(server_key, str) else server_key)
        self.sock = (connect_results if results else connect_data)(self.ctx, endpoint, auth=auth)
        self.client_id = client_id
        self.inc = f"raw{id(self):x}"[:12]
        self.credit: tuple[int, int] | None = None
        self.tx = 0

    def hello(self, timeout_s: float = 10.0) -> bool:
        """Heartbeat until the other side answers with one (False if it never does)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.heartbeat()
            for message in self.messages(0.05):
                if isinstance(message, Heartbeat):
                    self.credit = message.credit
                    return True
        return False

    def heartbeat(self, txs: int = 0) -> None:
        hb = Heartbeat(self.inc, "client", None, "", self.client_id, "", 0, None, self.tx, txs)
        with contextlib.suppress(zmq.Again):
            self.sock.send(encode_heartbeat(hb), zmq.NOBLOCK)

    def send(self, frames: list) -> bool:
        """False if nothing could take it (no completed connection, or a full pipe)."""
        try:
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.tx += 1
        return True

    def ack(self, rids: list) -> None:
        for message in ack_messages(rids, []):
            with contextlib.suppress(zmq.Again):
                self.sock.send(message, zmq.NOBLOCK)

    def messages(self, timeout_s: float) -> list:
        """Every message that arrives within ``timeout_s`` (parsed; raw frames if unparseable)."""
        out = []
        deadline = time.monotonic() + timeout_s
        while True:
            wait = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(wait):
                return out
            frames = self.sock.recv_multipart(copy=False)
            try:
                out.append(parse(frames, Limits(max_tensors=64)))
            except ProtocolError:
                out.append(frames)

    def data(self, timeout_s: float, count: int = 1) -> list[tuple[Header, list[np.ndarray]]]:
        """The first ``count`` data or error messages within ``timeout_s`` (heartbeats are answered)."""
        found: list = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            for message in self.messages(0.1):
                if isinstance(message, tuple):
                    found.append(message)
            self.heartbeat()
        return found

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def v2_frames(client: str, seq: int, x: np.ndarray, **overrides: object) -> list:
    """A request as a client sends it, with header fields overridden by hand."""
    raw = {"v": PROTOCOL_VERSION, "kind": "data", "client": client, "seq": seq,
           "tensors": [["x", str(x.dtype), list(x.shape)]], "trace": []}
    raw.update(overrides)
    return [msgpack.packb(raw), x]


def free_endpoint() -> str:
    """A loopback endpoint nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def exit_counts(log_text: str) -> dict[str, int]:
    """The counters of the last ``exit ...`` line of an agent's log (one incarnation's lifetime)."""
    lines = [ln for ln in log_text.splitlines() if " exit requests_in=" in ln]
    if not lines:
        return {}
    return {k: int(v) for k, v in (kv.split("=") for kv in lines[-1].split(" exit ", 1)[1].split())}
