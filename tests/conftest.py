"""Shared fixtures. Expensive artefacts (the vit_tiny export and its bundles) are built once per run.

EDGEPIPE_CACHE points at a per-run directory so the suite is hermetic, and subprocess CLIs started
by tests share the same export cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

TINY = "vit_tiny_patch16_224"


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("EDGEPIPE_CACHE"):
        os.environ["EDGEPIPE_CACHE"] = tempfile.mkdtemp(prefix="edgepipe-test-cache-")


@pytest.fixture(scope="session")
def vit_tiny_build(tmp_path_factory: pytest.TempPathFactory):
    """vit_tiny (random weights) compiled into 3 verified stage bundles; a CompileResult."""
    from edgepipe.compiler.build import compile_model

    return compile_model(TINY, tmp_path_factory.mktemp("vit_tiny_3"), stages=3)


@pytest.fixture(scope="session")
def vit_tiny_model(vit_tiny_build) -> Path:
    """The whole exported vit_tiny ONNX model (weights in model.onnx.data beside it)."""
    return vit_tiny_build.model_path
