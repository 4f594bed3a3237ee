"""The model registry: the one place to add a model EdgePipe can compile by name.

Each entry says how to build the PyTorch module (random weights, the same on every build; a local
checkpoint file may be loaded on top; nothing is ever downloaded), what its inputs look like and
which values they take, which exporter turns it into ONNX, and which of the graph's cut labels are
its natural pipeline boundaries. Any other network goes through ``edgepipe-compile --onnx FILE``.

Two sources, both built from code and configuration only:

- ``timm``: vision models by their timm name (ViT, DeiT, ResNet, ConvNeXt, EfficientNet, ...).
- ``transformers``: text models built from a config class (``BertConfig``, ``GPT2Config``) with the
  sizes of the published models, so no hub access is involved (the environment sets
  ``HF_HUB_OFFLINE=1`` anyway while building).

To add a model: append an entry to ``_ENTRIES`` below (``_timm(...)`` or ``_text(...)``). torch,
timm and transformers are imported lazily so that listing the registry stays cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.agent.formats.bundle import InputValues

# Text models take token ids and an attention mask of this many tokens (PipeEdge's BERT setting).
SEQUENCE_LENGTH = 128
# Pipelines are cut between the elements of a module list (blocks.3, layer2.1, encoder.layer.7,
# stages.2): the blocks of a transformer or the stages of a CNN.
CONTAINER_ELEMENTS = r".+\.\d+"


REAL = InputValues("real")  # images and other float inputs: any value


class ModelError(ValueError):
    """Unknown model name or unusable checkpoint; the message says which and why."""


@dataclass(frozen=True)
class ModelInput:
    """One model input: its name, one sample's shape (no batch axis), dtype and what values it takes."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    values: InputValues = REAL


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the name users type
    family: str  # "vit", "deit", "cnn", "swin", "bert", "gpt2"
    inputs: tuple[ModelInput, ...]
    source: str = "timm"  # "timm" or "transformers"
    architecture: str = ""  # timm model name, or the transformers model class (BertForSequenceClassification)
    config_class: str = ""  # transformers: the config class (BertConfig) ...
    config: tuple[tuple[str, Any], ...] = ()  # ... and its settings
    call: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of forward() (logits_to_keep=1)
    output_names: tuple[str, ...] = ("logits",)
    # "dynamo" (torch.onnx.export(dynamo=True): per-node module metadata, readable cut labels) or
    # "torchscript" (the legacy exporter, for architectures dynamo cannot trace).
    exporter: str = "dynamo"
    # Cut labels (see compiler/cuts.py) that are this architecture's natural stage boundaries, used
    # when the user asks for N stages without a plan.
    natural_cuts: str = CONTAINER_ELEMENTS
    description: str = ""

    @property
    def input_values(self) -> dict[str, InputValues]:
        return {i.name: i.values for i in self.inputs}


def _timm(name: str, description: str, family: str, image: int = 224, exporter: str = "dynamo",
          natural_cuts: str = CONTAINER_ELEMENTS) -> ModelEntry:
    return ModelEntry(name=name, family=family, inputs=(ModelInput("pixels", (3, image, image)),),
                      architecture=name, exporter=exporter, description=description,
                      natural_cuts=natural_cuts)


def _text_inputs(vocab: int) -> tuple[ModelInput, ...]:
    return (ModelInput("input_ids", (SEQUENCE_LENGTH,), "int64", InputValues("index", vocab)),
            ModelInput("attention_mask", (SEQUENCE_LENGTH,), "int64", InputValues("mask")))


def _bert(name: str, description: str, layers: int, hidden: int, heads: int) -> ModelEntry:
    # Sequence classification (two labels) like PipeEdge's BERT; vocabulary of bert-base-uncased.
    config = (("num_hidden_layers", layers), ("hidden_size", hidden),
              ("num_attention_heads", heads), ("intermediate_size", 4 * hidden), ("vocab_size", 30522),
              ("num_labels", 2), ("use_cache", False))
    return ModelEntry(name=name, family="bert", inputs=_text_inputs(30522), source="transformers",
                      architecture="BertForSequenceClassification", config_class="BertConfig", config=config,
                      description=description)


def _gpt2(name: str, description: str, layers: int, hidden: int, heads: int) -> ModelEntry:
    # Next-token logits for the last position only (logits_to_keep=1): what generation needs from a
    # prompt, without 128 x 50257 logits per sample on the wire back to the client.
    config = (("n_layer", layers), ("n_embd", hidden), ("n_head", heads),
              ("vocab_size", 50257), ("n_positions", 1024), ("use_cache", False))
    return ModelEntry(name=name, family="gpt2", inputs=_text_inputs(50257), source="transformers",
                      architecture="GPT2LMHeadModel", config_class="GPT2Config", config=config,
                      call=(("logits_to_keep", 1),), description=description)


def _vit(name: str, description: str, family: str = "vit") -> ModelEntry:
    return _timm(name, description, family)


_ENTRIES: tuple[ModelEntry, ...] = (
    _vit("vit_tiny_patch16_224", "ViT-Ti/16, 5.7 M params, 12 blocks x 192 (tests)"),
    _vit("vit_small_patch16_224", "ViT-S/16, 22 M params, 12 blocks x 384"),
    _vit("vit_base_patch16_224", "ViT-B/16, 86 M params, 12 blocks x 768"),
    _vit("vit_large_patch16_224", "ViT-L/16, 304 M params, 24 blocks x 1024"),
    _vit("vit_huge_patch14_224", "ViT-H/14, 632 M params, 32 blocks x 1280 (2.5 GB fp32)"),
    _vit("deit_tiny_patch16_224", "DeiT-Ti/16, 5.7 M params", family="deit"),
    _vit("deit_small_patch16_224", "DeiT-S/16, 22 M params", family="deit"),
    _vit("deit_base_patch16_224", "DeiT-B/16, 86 M params", family="deit"),
    _timm("swin_tiny_patch4_window7_224", "Swin-T, 28 M params, 4 stages of windowed attention", "swin"),
    _timm("resnet18", "ResNet-18, 11.7 M params", "cnn"),
    _timm("resnet50", "ResNet-50, 25.6 M params", "cnn"),
    _timm("resnet10t", "ResNet-10-T, 5.4 M params (tests)", "cnn"),
    _timm("convnext_atto", "ConvNeXt-Atto, 3.7 M params (tests)", "cnn"),
    _timm("convnext_tiny", "ConvNeXt-T, 28.6 M params", "cnn"),
    _timm("efficientnet_b0", "EfficientNet-B0, 5.3 M params", "cnn"),
    _timm("mobilenetv3_large_100", "MobileNetV3-Large, 5.5 M params", "cnn"),
    _timm("regnety_016", "RegNetY-1.6GF, 11.2 M params", "cnn", natural_cuts=r"s\d+(\.b\d+)?"),  # s3, s3.b7
    _bert("bert_tiny", "BERT-Tiny (L=2, H=128), 4.4 M params, seq 128 (tests)", 2, 128, 2),
    _bert("bert_base", "BERT-Base, 109 M params, 12 layers x 768, seq 128", 12, 768, 12),
    _bert("bert_large", "BERT-Large, 335 M params, 24 layers x 1024, seq 128", 24, 1024, 16),
    _gpt2("gpt2_tiny", "GPT-2 with 2 layers x 128, 6.7 M params, seq 128 (tests)", 2, 128, 2),
    _gpt2("gpt2", "GPT-2 small, 124 M params, 12 layers x 768, seq 128", 12, 768, 12),
    _gpt2("gpt2_medium", "GPT-2 medium, 355 M params, 24 layers x 1024, seq 128", 24, 1024, 16),
    _gpt2("gpt2_large", "GPT-2 large, 774 M params, 36 layers x 1280, seq 128", 36, 1280, 20),
    _gpt2("gpt2_xl", "GPT-2 XL, 1.56 B params, 48 layers x 1600, seq 128 (6.2 GB fp32)", 48, 1600, 25),
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
    import torch

    torch.manual_seed(0)  # random weights, but the same ones on every build
    module = _build_transformers(entry) if entry.source == "transformers" else _build_timm(entry)
    if checkpoint is not None:
        try:
            module.load_state_dict(_read_state_dict(Path(checkpoint)), strict=True)
        except RuntimeError as exc:  # missing/unexpected keys, wrong sizes
            first = str(exc).strip().splitlines()[0]
            raise ModelError(f"checkpoint {checkpoint} does not fit {entry.name}: {first}") from None
    return module.eval()


def _build_timm(entry: ModelEntry) -> Any:
    import timm

    return timm.create_model(entry.architecture, pretrained=False)


def _build_transformers(entry: ModelEntry) -> Any:
    # Nothing may be fetched: configs are built from code, weights are random or a local checkpoint.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{entry.name} needs the transformers package: pip install 'edgepipe[compile]'") from None
    config = getattr(transformers, entry.config_class)(**dict(entry.config))
    # Plain attention ops export everywhere and run in any ONNX Runtime (no fused SDPA kernels assumed).
    config._attn_implementation = "eager"
    return getattr(transformers, entry.architecture)(config)


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


def example_inputs(entry: ModelEntry, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """A deterministic example batch, one torch tensor per input. Batch 2, not 1: the exporter may
    specialise a size-1 axis. Token ids lie within the vocabulary; masks pad the end of every
    sample but the first (so the mask path is really exercised)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    made = {}
    for spec in entry.inputs:
        shape = (batch, *spec.shape)
        if spec.values.kind == "index":
            made[spec.name] = torch.randint(0, spec.values.high or 1, shape, generator=generator)
        elif spec.values.kind == "mask":
            made[spec.name] = padded_mask(batch, spec.shape, torch)
        else:
            made[spec.name] = torch.randn(shape, generator=generator)
    return made


def padded_mask(batch: int, shape: tuple[int, ...], xp: Any) -> Any:
    """Ones, with sample k's last k/(2*batch) of the positions masked out (xp: numpy or torch)."""
    mask = xp.ones((batch, *shape), dtype=xp.int64)
    length = shape[-1]
    for k in range(1, batch):
        mask[k, ..., length - max(1, length * k // (2 * batch)):] = 0
    return mask


def example_input(entry: ModelEntry, batch: int = 2) -> Any:
    """The first input of ``example_inputs`` (single-input models)."""
    return next(iter(example_inputs(entry, batch).values()))
