"""Submit batches to a supervised deployment and follow it across failovers (tests and benchmarks).

``Client.from_endpoints(path)`` follows a deployment by itself: when its entry or exit stops
answering it re-reads the endpoints file, which the supervisor rewrites with the next generation,
then reconnects and sends everything outstanding again (the stages de-duplicate; the client gives
each result to the caller once). This helper adds the record a benchmark needs: when each result
arrived and from which generation.

    run = follow(Path("build/endpoints.json"), batches, client_keypair)
    run.outputs[i], run.arrivals  # [(time.time(), batch index, generation)]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgepipe.agent.client import Client, ClientError, Result
from edgepipe.agent.formats.endpoints import load_endpoints
from edgepipe.agent.formats.keys import KeyPair


@dataclass
class FollowRun:
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)  # (time.time(), batch, generation)
    errors: dict[int, str] = field(default_factory=dict)  # batches answered with an error, or never
    late: int = 0  # results that arrived again and were dropped by the client (duplicates)
    generations: list[int] = field(default_factory=list)  # every generation the client was on


def follow(endpoints: Path, batches: Sequence[np.ndarray], keypair: KeyPair | None, *, window: int = 4,
           pace_s: float = 0.0, on_result: Callable[[int, int], None] | None = None) -> FollowRun:
    """Every batch through the deployment named by the endpoints file ``endpoints``, in order."""
    run = FollowRun()
    name = load_endpoints(endpoints).inputs[0].name
    with Client.from_endpoints(endpoints, keypair, window=window) as client:
        run.generations.append(client.generation)
        for index, outcome in enumerate(client.results(_paced(({name: b} for b in batches), pace_s),
                                                       errors="return")):
            if client.generation != run.generations[-1]:
                run.generations.append(client.generation)
            if isinstance(outcome, Result):
                run.outputs[index] = next(iter(outcome.outputs.values())).copy()
                run.arrivals.append((time.time(), index, client.generation))
                if on_result is not None:
                    on_result(index, client.generation)
            else:
                run.errors[index] = str(outcome)
        run.late = client.duplicates
    for index in range(len(batches)):
        if index not in run.outputs and index not in run.errors:
            run.errors[index] = "no result"
    return run


def _paced(items, pace_s: float):
    for item in items:
        yield item
        if pace_s:
            time.sleep(pace_s)


__all__ = ["ClientError", "FollowRun", "follow"]
