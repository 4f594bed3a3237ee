"""The model registry: the one place to add a model EdgePipe can compile by name.

Each entry says how to build the PyTorch module (random weights; a local checkpoint file may be
loaded on top, nothing is ever downloaded), what one example input looks like, and which of the
graph's cut labels are its natural pipeline boundaries. Any other network goes through
``edgepipe-compile --onnx FILE`` instead.

To add a model: append a ``ModelEntry`` to ``_ENTRIES`` below. torch and timm are imported lazily
so that listing the registry stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """Unknown model name or unusable checkpoint; the message says which and why."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the name users type; for timm models also the timm architecture name
    family: str  # "vit" / "deit"
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    input_name: str = "pixels"
    output_name: str = "logits"
    # Cut labels (see compiler/cuts.py) that are this architecture's natural stage boundaries:
    # the input of every transformer block. Used when the user asks for N stages without a plan.
    natural_cuts: str = r"blocks\.\d+"
    description: str = ""


def _vit(name: str, description: str, image: int = 224, family: str = "vit") -> ModelEntry:
    return ModelEntry(name=name, family=family, input_shape=(3, image, image), description=description)


_ENTRIES: tuple[ModelEntry, ...] = (
    _vit("vit_tiny_patch16_224", "ViT-Ti/16, 5.7 M params, 12 blocks x 192 (tests)"),
    _vit("vit_small_patch16_224", "ViT-S/16, 22 M params, 12 blocks x 384"),
    _vit("vit_base_patch16_224", "ViT-B/16, 86 M params, 12 blocks x 768"),
    _vit("vit_large_patch16_224", "ViT-L/16, 304 M params, 24 blocks x 1024"),
    _vit("vit_huge_patch14_224", "ViT-H/14, 632 M params, 32 blocks x 1280 (2.5 GB fp32)"),
    _vit("deit_tiny_patch16_224", "DeiT-Ti/16, 5.7 M params", family="deit"),
    _vit("deit_small_patch16_224", "DeiT-S/16, 22 M params", family="deit"),
    _vit("deit_base_patch16_224", "DeiT-B/16, 86 M params", family="deit"),
)

REGISTRY: dict[str, ModelEntry] = {entry.name: entry for entry in _ENTRIES}


def get_model(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ModelError(f"unknown model {name!r}; known models: {known} (or pass --onnx FILE)") from None


def build_module(entry: ModelEntry, checkpoint: Path | None = None) -> Any:
    """The PyTorch module in eval mode, random weights unless ``checkpoint`` is given.

    The checkpoint is a local ``.pth``/``.pt`` (a state dict, or a dict holding one under
    ``state_dict``/``model``) or ``.safetensors`` file; keys must match the architecture exactly.
    """
    import timm
    import torch

    torch.manual_seed(0)  # random weights, but the same ones on every compile
    module = timm.create_model(entry.name, pretrained=False)
    if checkpoint is not None:
        module.load_state_dict(_read_state_dict(Path(checkpoint)), strict=True)
    return module.eval()


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"checkpoint {path} could not be read: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise ModelError(f"checkpoint {path} holds {type(raw).__name__}, not a state dict")
    return raw


def example_input(entry: ModelEntry, batch: int = 2) -> Any:
    """A deterministic example batch. Batch 2, not 1: the exporter may specialise a size-1 axis."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *entry.input_shape), generator=generator)
