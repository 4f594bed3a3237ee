"""Fixtures for the planner tests (helpers live in planner_testlib.py, beside this file)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # planner_testlib, whatever pytest's import mode

from edgepipe.planner.cluster import load_cluster, problem_for
from edgepipe.planner.problem import Problem
from planner_testlib import EXAMPLES, vit_like


@pytest.fixture(scope="session")
def paper_problem() -> Problem:
    """A 24-block ViT-like model (96 segments) on the paper-like 16-device testbed."""
    cluster = load_cluster(EXAMPLES / "paper-testbed.toml")
    return problem_for(cluster, vit_like(blocks=24, width=256, tokens=65), 8)


@pytest.fixture(scope="session")
def home_problem() -> Problem:
    """A small ViT-like model on the 4-device home lab with Wi-Fi links."""
    return problem_for(load_cluster(EXAMPLES / "home-lab.toml"), vit_like(blocks=8, width=512, tokens=65), 8)
