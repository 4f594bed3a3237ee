"""ONNX Runtime session for one stage: created from the bundle's path and checked against its manifest.

Settings follow docs/operations.md: an explicit intra-op thread count (agents often share a board
with other work, and ORT's default of one thread per core oversubscribes it), no spinning (an agent
waits on the network between requests; spinning threads would burn the cores the other stages
need), sequential execution (a ViT stage is a chain), all graph optimisations. The session is
created from the file path so ORT memory-maps the external weight file instead of copying it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepipe.agent.formats.bundle import GRAPH_NAME, StageManifest, TensorSpec

# ONNX Runtime type strings -> the dtype names used in manifests and on the wire.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


# ORT would print its own multi-line, coloured error for a failing run; the agent logs one line instead.
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4


class SessionError(RuntimeError):
    """The stage graph cannot be loaded, or does not match its manifest. One line, names the file."""


def session_options(threads: int = 1, profile_prefix: str | None = None) -> ort.SessionOptions:
    if threads < 1:
        raise SessionError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # ORT warnings would break the one-line-per-event log
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def create_session(bundle_dir: Path | str, manifest: StageManifest, threads: int = 1) -> ort.InferenceSession:
    """Load ``bundle_dir/stage.onnx`` on the CPU and check it agrees with ``manifest``."""
    path = Path(bundle_dir) / GRAPH_NAME
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SessionError(f"{path}: ONNX Runtime cannot load the stage: {first}") from None
    check_session(session, manifest, path)
    return session


def check_session(session: ort.InferenceSession, manifest: StageManifest,
                  path: Path | str = GRAPH_NAME) -> None:
    """Raise SessionError unless the graph's inputs and outputs are the manifest's (names, dtypes, ranks,
    fixed axes). An agent must not start with a manifest that lies about its graph: it validates every
    request against the manifest."""
    _compare(session.get_inputs(), manifest.inputs, "input", path)
    _compare(session.get_outputs(), manifest.outputs, "output", path)


def run_stage(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """One forward pass. ORT's output arrays are returned as they are (no copy), in graph order."""
    return session.run(None, dict(feed), _QUIET_RUN)


def _compare(nodes: Sequence[ort.NodeArg], specs: Sequence[TensorSpec], what: str, path: Path | str) -> None:
    graph = {n.name: n for n in nodes}
    if sorted(graph) != sorted(s.name for s in specs):
        raise SessionError(f"{path}: graph {what}s {sorted(graph)} differ from manifest {what}s "
                           f"{sorted(s.name for s in specs)}")
    for spec in specs:
        node = graph[spec.name]
        dtype = ORT_DTYPES.get(node.type, node.type)
        if dtype != spec.dtype:
            raise SessionError(f"{path}: {what} {spec.name!r} is {dtype} in the graph, "
                               f"{spec.dtype} in the manifest")
        shape = list(node.shape) if node.shape is not None else None
        if shape is None:
            continue  # rank unknown to ORT; the manifest is the contract
        if len(shape) != len(spec.shape):
            raise SessionError(f"{path}: {what} {spec.name!r} has shape {shape} in the graph, "
                               f"{list(spec.shape)} in the manifest")
        fixed_batch = isinstance(shape[0], int) and not isinstance(spec.shape[0], int) if shape else False
        for got, want in zip(shape, spec.shape, strict=True):
            if fixed_batch or (isinstance(got, int) and isinstance(want, int) and got != want):
                raise SessionError(f"{path}: {what} {spec.name!r} has shape {shape} in the graph, "
                                   f"{list(spec.shape)} in the manifest")
