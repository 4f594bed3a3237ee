"""Calibration samples from a user's files (.npy, .npz, images), the registry, or noise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from edgepipe.agent.formats.bundle import TensorSpec
from edgepipe.compiler.calibration import (
    CalibrationError,
    ImageNorm,
    file_calibration,
    noise_calibration,
    registry_calibration,
    timm_norm,
)

PIXELS = TensorSpec("pixels", "float32", ("batch", 3, 224, 224))


def test_npy_samples_and_a_single_sample(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((5, 3, 224, 224))  # float64: cast to the input's float32
    np.save(tmp_path / "x.npy", data)
    cal = file_calibration(tmp_path / "x.npy", [PIXELS], samples=3)
    assert cal.samples == 3 and cal.feeds["pixels"].dtype == np.float32
    assert cal.source == str(tmp_path / "x.npy")
    np.save(tmp_path / "one.npy", data[0])
    assert file_calibration(tmp_path / "one.npy", [PIXELS]).samples == 1


@pytest.mark.parametrize(("name", "array", "message"), [
    ("wrong.npy", np.zeros((2, 3, 32, 32), np.float32), "axis 2 is 32, the model expects 224"),
    ("ints.npy", np.zeros((2, 3, 224, 224), np.int64), "is int64, the model expects float32"),
    ("flat.npy", np.zeros((2, 10), np.float32), "has shape [2, 10]"),
])
def test_npy_that_does_not_fit_is_refused_with_the_reason(tmp_path: Path, name, array, message) -> None:
    np.save(tmp_path / name, array)
    with pytest.raises(CalibrationError, match=re.escape(message)):
        file_calibration(tmp_path / name, [PIXELS])


def test_npz_by_input_name(tmp_path: Path) -> None:
    specs = [TensorSpec("input_ids", "int64", ("batch", 16)), TensorSpec("attention_mask", "int64", ("batch", 16))]
    np.savez(tmp_path / "text.npz", input_ids=np.arange(32).reshape(2, 16), attention_mask=np.ones((2, 16), int))
    cal = file_calibration(tmp_path / "text.npz", specs)
    assert sorted(cal.feeds) == ["attention_mask", "input_ids"] and cal.samples == 2
    np.savez(tmp_path / "partial.npz", input_ids=np.zeros((2, 16), int))
    with pytest.raises(CalibrationError, match=r"no array for model input\(s\) \['attention_mask'\]"):
        file_calibration(tmp_path / "partial.npz", specs)
    with pytest.raises(CalibrationError, match=r"give an \.npz"):
        np.save(tmp_path / "one.npy", np.zeros((2, 16), int))
        file_calibration(tmp_path / "one.npy", specs)


def test_image_folder_is_resized_cropped_and_normalised(tmp_path: Path) -> None:
    from PIL import Image

    for i, size in enumerate([(320, 240), (200, 400), (224, 224)]):
        Image.new("RGB", size, color=(255, 0, 128 + i)).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    norm = ImageNorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cal = file_calibration(tmp_path, [PIXELS], norm=norm)
    x = cal.feeds["pixels"]
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    assert np.allclose(x[:, 0], 1.0) and np.allclose(x[:, 1], -1.0)  # red 255 -> +1, green 0 -> -1
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(CalibrationError, match=r"bad\.png: not a readable image"):
        file_calibration(tmp_path, [PIXELS])


def test_missing_or_unknown_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no such file"):
        file_calibration(tmp_path / "nope.npy", [PIXELS])
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(CalibrationError, match=r"use a \.npy or \.npz"):
        file_calibration(tmp_path / "x.csv", [PIXELS])


def test_registry_and_noise_samples_are_deterministic() -> None:
    a, b = registry_calibration("vit_tiny_patch16_224", 3), registry_calibration("vit_tiny_patch16_224", 3)
    assert a.digest == b.digest and a.feeds["pixels"].shape == (3, 3, 224, 224)
    n = noise_calibration([PIXELS], 2)
    assert n.samples == 2 and n.digest != a.digest
    assert timm_norm("vit_base_patch16_224") == ImageNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9)
