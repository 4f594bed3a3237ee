"""Export a registry model to ONNX, cached by everything that changes the result.

The dynamo exporter at opset 20 gives real ``Gelu``/``LayerNormalization`` ops and per-node
``name_scopes`` metadata (which cut discovery uses for labels); it is used for every registry model
that it can trace (all of them today). An entry may ask for the legacy TorchScript exporter
(``exporter="torchscript"``): no module metadata, so its cuts are labelled by node names.
Weights always go to external data: ViT-Huge is 2.5 GB, past protobuf's 2 GB limit, and ONNX
Runtime memory-maps external weights.

Every input gets one shared dynamic batch axis. The exported graph is tidied before it is saved:
the batch symbol is called ``batch`` everywhere (the exporter may call it ``s43``), and symbolic
dimension expressions that are really constants are folded (compiler/shapes.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgepipe.compiler.shapes import dim_of, fold_constant_dims
from edgepipe.models.registry import ModelEntry, ModelError, build_module, example_inputs

DEFAULT_OPSET = 20
# Bump when the export recipe changes so stale cache entries are not reused.
# 2: several inputs, exporter per entry, tidied shapes.
EXPORT_RECIPE = 2
MODEL_FILE = "model.onnx"
BATCH = "batch"
EXPORTERS = {"dynamo": "torch.onnx dynamo", "torchscript": "torch.onnx torchscript (legacy)"}


class ExportError(RuntimeError):
    """The exporter failed; the message carries its reason."""


@dataclass(frozen=True)
class ExportedModel:
    path: Path  # model.onnx; its weights are in model.onnx.data beside it
    model_sha256: str
    cached: bool  # True when the export was reused from the cache
    settings: dict  # what the export depended on (recorded in every stage manifest)


def cache_root() -> Path:
    """$EDGEPIPE_CACHE, else ~/.cache/edgepipe."""
    return Path(os.environ.get("EDGEPIPE_CACHE") or Path.home() / ".cache" / "edgepipe")


def export_settings(entry: ModelEntry, checkpoint: Path | None, opset: int) -> dict:
    # Versions from package metadata: importing torch costs seconds, and a cached compile needs none.
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"checkpoint {checkpoint} does not exist")
    return {
        "model": entry.name,
        "checkpoint_sha256": sha256_files([Path(checkpoint)]) if checkpoint else None,
        "opset": opset,
        "exporter": EXPORTERS[entry.exporter],
        "torch": version("torch"),
        entry.source: _package_version(entry.source),
        "onnxscript": version("onnxscript"),
        "recipe": EXPORT_RECIPE,
    }


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def export_model(
    entry: ModelEntry, checkpoint: Path | None = None, opset: int = DEFAULT_OPSET, cache_dir: Path | None = None
) -> ExportedModel:
    """Export ``entry`` (or reuse the cached export with identical settings)."""
    settings = export_settings(entry, checkpoint, opset)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    target = (cache_dir or cache_root()) / "exports" / f"{entry.name}-{key}"
    meta_path = target / "export.json"
    if meta_path.is_file() and (target / MODEL_FILE).is_file():
        meta = json.loads(meta_path.read_text())
        return ExportedModel(target / MODEL_FILE, meta["model_sha256"], True, settings)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Export into a scratch dir and rename at the end, so an interrupted export never looks cached.
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        _run_exporter(entry, checkpoint, opset, scratch / MODEL_FILE)
        digest = sha256_files([scratch / MODEL_FILE, scratch / (MODEL_FILE + ".data")])
        (scratch / "export.json").write_text(json.dumps({"settings": settings, "model_sha256": digest}, indent=2))
        if target.exists():  # a concurrent compile finished first; keep theirs
            shutil.rmtree(scratch)
        else:
            scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ExportedModel(target / MODEL_FILE, digest, False, settings)


def _run_exporter(entry: ModelEntry, checkpoint: Path | None, opset: int, out: Path) -> None:
    import onnx_ir as ir
    import torch

    module = build_module(entry, checkpoint)
    examples = example_inputs(entry, batch=2)
    try:
        with _quiet(), torch.no_grad():
            if entry.exporter == "torchscript":
                _export_torchscript(module, entry, examples, opset, out)
                model = ir.load(out)
            else:
                model = _export_dynamo(module, entry, examples, opset)
    except ModelError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {entry.name} failed: {type(exc).__name__}: {exc}") from exc
    tidy_exported(model)
    ir.save(model, out, external_data=out.name + ".data")


def _export_dynamo(module: Any, entry: ModelEntry, examples: dict[str, Any], opset: int) -> Any:
    import torch

    batch = torch.export.Dim(BATCH)
    names = [i.name for i in entry.inputs]
    if entry.source == "timm":  # positional: forward(x)
        args, kwargs = tuple(examples[n] for n in names), None
        dynamic: Any = tuple({0: batch} for _ in names)
    else:  # keyword: forward(input_ids=..., attention_mask=..., logits_to_keep=1)
        args, kwargs = (), {**examples, **dict(entry.call)}
        dynamic = {**{n: {0: batch} for n in names}, **{k: None for k, _ in entry.call}}
    program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, input_names=names,
                                output_names=list(entry.output_names), dynamic_shapes=dynamic,
                                opset_version=opset, verbose=False)
    if program is None:
        raise ExportError(f"exporting {entry.name} returned no program")
    return program.model


def _export_torchscript(module: Any, entry: ModelEntry, examples: dict[str, Any], opset: int, out: Path) -> None:
    import torch

    names = [i.name for i in entry.inputs]
    torch.onnx.export(module, tuple(examples[n] for n in names), str(out), dynamo=False, input_names=names,
                      output_names=list(entry.output_names), opset_version=opset,
                      dynamic_axes={n: {0: BATCH} for n in [*names, *entry.output_names]})


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, warnings and constant-folding notes; a compile shows its own
    progress instead. Errors still surface as exceptions."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tidy_exported(model: Any) -> None:
    """Call the first input's batch symbol ``batch`` everywhere and fold constant dimension
    expressions (see the module doc)."""
    import onnx_ir as ir

    graph = model.graph
    values = [*graph.inputs, *(out for node in graph for out in node.outputs), *graph.outputs]
    first = graph.inputs[0].shape if graph.inputs and graph.inputs[0].shape else None
    symbol = dim_of(first[0]) if first else None
    if isinstance(symbol, str) and symbol != BATCH:
        word = re.compile(rf"\b{re.escape(symbol)}\b")  # also inside expressions: 128*s43 -> 128*batch
        for value in values:
            if value.shape is not None and any(isinstance(dim_of(d), str) and word.search(dim_of(d))
                                               for d in value.shape):
                value.shape = ir.Shape([word.sub(BATCH, dim_of(d)) if isinstance(dim_of(d), str) else d
                                        for d in value.shape])
    fold_constant_dims(values)


def sha256_files(paths: list[Path]) -> str:
    """One digest over the contents of several files (missing files are skipped)."""
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            continue
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
