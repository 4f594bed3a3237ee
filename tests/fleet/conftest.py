"""Fixtures for the fleet tests: keys, two vit_tiny builds that differ in one cut, and a factory of
real device daemons on loopback that are stopped after each test."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fleet_testlib, whatever pytest's import mode

from fleet_testlib import TINY, Daemon, Keys, make_keys, start_daemon, stop_daemon


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("fleet-keys"))


@pytest.fixture(scope="session")
def build_a(vit_tiny_build) -> Path:
    """vit_tiny in 3 stages cut at blocks.4 and blocks.8 (the suite's shared build; copy before changing)."""
    return vit_tiny_build.out_dir


@pytest.fixture(scope="session")
def build_b(tmp_path_factory: pytest.TempPathFactory, vit_tiny_build) -> Path:
    """vit_tiny in 3 stages cut at blocks.4 and blocks.9: stage 0 is byte for byte build_a's."""
    from edgepipe.compiler.build import compile_model

    return compile_model(TINY, tmp_path_factory.mktemp("vit_tiny_b"), cuts=["blocks.4", "blocks.9"]).out_dir


@pytest.fixture
def daemons(keys: Keys, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(name, *extra_args, **kwargs) -> a running daemon; all are stopped after the test."""
    started: list[Daemon] = []

    def start(name: str, *extra: str, **kwargs) -> Daemon:
        daemon = start_daemon(keys, tmp_path, name, *extra, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        stop_daemon(daemon)
