"""Sample inputs on which the compiler measures what lossy choices do to a model's outputs.

Errors are measured on the model's own outputs against fp32, which needs no labels, only inputs
that look like what the model will see. Three sources, in order of preference:

- ``--calibration FILE|DIR``, the user's own data: a ``.npy`` array (one model input; first axis =
  samples), an ``.npz`` archive (one array per model input, by name), or a folder of images (one
  float (3, H, W) input: resized, centre-cropped and normalised the way the model's timm
  configuration says, ImageNet statistics otherwise);
- the registry's example inputs (deterministic noise), for a registry model;
- deterministic noise from the graph's input specs, for an ONNX file.

Random weights and random inputs are what tests and benchmarks have; a user's checkpoint and images
go through exactly the same code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgepipe.agent.formats.bundle import TensorSpec

DEFAULT_SAMPLES = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CalibrationError(ValueError):
    """Calibration data that does not fit the model; the message names the file and the mismatch."""


@dataclass(frozen=True)
class Calibration:
    feeds: Mapping[str, np.ndarray]  # model input name -> (samples, ...) array
    source: str  # what the samples are, for reports ("registry example inputs", a path)
    digest: str  # sha256 of names, dtypes, shapes and bytes: part of the measurement cache key

    @property
    def samples(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0]) if self.feeds else 0


@dataclass(frozen=True)
class ImageNorm:
    """How images become the model's input: crop fraction and per-channel mean/std (on [0, 1] values)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875


def make_calibration(feeds: Mapping[str, np.ndarray], source: str) -> Calibration:
    digest = hashlib.sha256()
    for name in sorted(feeds):
        arr = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        digest.update(arr.tobytes())
    return Calibration(dict(feeds), source, digest.hexdigest())


def noise_calibration(specs: Sequence[TensorSpec], samples: int = DEFAULT_SAMPLES, seed: int = 0) -> Calibration:
    """Deterministic noise shaped like ``specs`` (what the profiler feeds pieces)."""
    from edgepipe.agent.device.profiler import random_feeds

    return make_calibration(random_feeds(specs, samples, seed), f"{samples} random samples (seed {seed})")


def registry_calibration(model_name: str, samples: int = DEFAULT_SAMPLES) -> Calibration:
    """The registry's example inputs for ``model_name``, ``samples`` of them."""
    from edgepipe.models import registry

    entry = registry.get_model(model_name)
    tensors = registry.example_inputs(entry, samples)  # one tensor per input (text models: ids and mask)
    feeds = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
    return make_calibration(feeds, f"{samples} registry example inputs of {model_name}")


def file_calibration(path: Path, specs: Sequence[TensorSpec], samples: int | None = None,
                     norm: ImageNorm | None = None) -> Calibration:
    """Samples from the user's ``path`` (.npy, .npz or an image folder), checked against ``specs``;
    at most ``samples`` of them (None: all)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"--calibration {path}: no such file or directory")
    if path.is_dir():
        feeds = _images(path, specs, samples, norm or ImageNorm())
    elif path.suffix == ".npy":
        feeds = _npy(path, specs)
    elif path.suffix == ".npz":
        feeds = _npz(path, specs)
    else:
        raise CalibrationError(f"--calibration {path}: use a .npy or .npz file or a folder of images")
    feeds = {name: arr[:samples] if samples else arr for name, arr in feeds.items()}
    counts = {arr.shape[0] for arr in feeds.values()}
    if len(counts) != 1:
        raise CalibrationError(f"--calibration {path}: inputs hold different sample counts {sorted(counts)}")
    if counts == {0}:
        raise CalibrationError(f"--calibration {path}: holds no samples")
    return make_calibration(feeds, str(path))


def timm_norm(model_name: str) -> ImageNorm | None:
    """The mean/std/crop a timm model was trained with (its pretrained config, read offline)."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # not a timm name, or timm missing: the caller uses ImageNet statistics
        return None
    if cfg is None or getattr(cfg, "mean", None) is None:
        return None
    return ImageNorm(tuple(cfg.mean), tuple(cfg.std), float(cfg.crop_pct or 0.875))


def fit_input(arr: np.ndarray, spec: TensorSpec, source: str) -> np.ndarray:
    """``arr`` as a (samples, ...) array of ``spec``'s dtype; a single sample gains the batch axis.
    Fixed axes must match; values that would not survive the dtype change are refused."""
    sample = spec.shape[1:]
    if arr.ndim == len(sample):
        arr = arr[None]
    if arr.ndim != len(spec.shape):
        raise CalibrationError(f"{source}: input {spec.name!r} has shape {list(arr.shape)}, the model expects "
                               f"(samples, {', '.join(map(str, sample))})")
    for axis, (got, want) in enumerate(zip(arr.shape[1:], sample), start=1):
        if isinstance(want, int) and got != want:
            raise CalibrationError(f"{source}: input {spec.name!r} axis {axis} is {got}, the model expects {want}")
    if arr.dtype == np.dtype(spec.dtype):
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating) != (np.dtype(spec.dtype).kind == "f"):
        raise CalibrationError(f"{source}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
    return np.ascontiguousarray(arr.astype(spec.dtype))


def _npy(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise CalibrationError(f"{path}: the model has {len(specs)} inputs ({names}); give an .npz with one "
                               f"array per input name")
    return {specs[0].name: fit_input(_load_array(path), specs[0], str(path))}


def _npz(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz archive: {exc}") from None
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(f"{path}: no array for model input(s) {missing} (it holds {sorted(arrays)})")
    return {s.name: fit_input(arrays[s.name], s, f"{path}[{s.name}]") for s in specs}


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npy array: {exc}") from None


def _images(folder: Path, specs: Sequence[TensorSpec], samples: int | None, norm: ImageNorm) -> dict[str, np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    image_inputs = [s for s in specs if len(s.shape) == 4 and s.shape[1] == 3 and s.dtype.startswith("float")]
    if len(specs) != 1 or not image_inputs:
        raise CalibrationError(f"{folder}: an image folder calibrates a model with one (batch, 3, H, W) float "
                               f"input; this one has {[(s.name, list(s.shape)) for s in specs]}")
    spec = image_inputs[0]
    height, width = (d if isinstance(d, int) else 224 for d in spec.shape[2:])
    batch = np.stack([image_array(p, height, width, norm) for p in files[:samples]])
    return {spec.name: batch.astype(spec.dtype)}


def image_array(path: Path, height: int, width: int, norm: ImageNorm) -> np.ndarray:
    """One image as a normalised (3, height, width) float32 array: the shorter side resized to
    size / crop_pct (bicubic), then centre-cropped, the usual evaluation transform."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise CalibrationError(f"{path}: not a readable image: {exc}") from None
    scale = max(height, width) / norm.crop_pct / min(rgb.size)
    resized = rgb.resize((max(width, round(rgb.size[0] * scale)), max(height, round(rgb.size[1] * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (resized.size[0] - width) // 2, (resized.size[1] - height) // 2
    cropped = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    normalised = (cropped - np.array(norm.mean, np.float32)) / np.array(norm.std, np.float32)
    return normalised.transpose(2, 0, 1)
