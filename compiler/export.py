"""Export a registry model to ONNX, cached by everything that changes the result.

The dynamo exporter at opset 20 gives real ``Gelu``/``LayerNormalization`` ops and per-node
``name_scopes`` metadata (which cut discovery uses for labels). Weights always go to external data:
ViT-Huge is 2.5 GB, past protobuf's 2 GB limit, and ONNX Runtime memory-maps external weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from edgepipe.models.registry import ModelEntry, ModelError, build_module, example_input

DEFAULT_OPSET = 20
# Bump when the export recipe changes so stale cache entries are not reused.
EXPORT_RECIPE = 1
MODEL_FILE = "model.onnx"


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
        "exporter": "torch.onnx dynamo",
        "torch": version("torch"),
        "timm": version("timm"),
        "onnxscript": version("onnxscript"),
        "recipe": EXPORT_RECIPE,
    }


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
    import torch

    module = build_module(entry, checkpoint)
    example = example_input(entry, batch=2)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=[entry.input_name],
                output_names=[entry.output_name],
                dynamic_shapes=({0: "batch"},),
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"exporting {entry.name} failed: {type(exc).__name__}: {exc}") from exc
    if program is None:
        raise ExportError(f"exporting {entry.name} returned no program")
    program.save(str(out), external_data=True)
    if not (out.parent / (out.name + ".data")).is_file():
        # Tiny models can come out inline; keep one layout so every later step can rely on it.
        import onnx_ir as ir

        model = ir.load(out)
        ir.save(model, out, external_data=out.name + ".data")


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
