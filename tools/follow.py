"""Submit batches to a supervised deployment and follow it across failovers (tests and benchmarks).

A stand-in for the client-side generation following that belongs in ``edgepipe.agent.client``:
it uses the documented Client, and when requests stop coming back it asks the deployment's daemons
for a newer generation (``find_route``) and resends every batch that has no result yet to the new
entry. Each batch is delivered to the caller exactly once (the first result kept), and every result
is tagged with the generation that produced it, for timing a failover.

    with open("endpoints.json") ...:
        run = follow(Path("build/endpoints.json"), batches, client_key)
        run.outputs[i], run.arrivals  # [(time.time(), batch index, generation)]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgepipe.agent.client import Client, ClientError, Result
from edgepipe.agent.control_client import find_route
from edgepipe.agent.formats.endpoints import Endpoints, load_endpoints
from edgepipe.agent.formats.keys import KeyPair


@dataclass
class FollowRun:
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)  # (time.time(), batch, generation)
    switches: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), new generation)
    resent: int = 0  # batches sent again to a newer generation
    late: int = 0  # results that arrived for a batch already answered (dropped)


def follow(endpoints: Path | Endpoints, batches: Sequence[np.ndarray], keypair: KeyPair | None, *,
           window: int = 4, pace_s: float = 0.0, give_up_s: float = 120.0,
           on_result: Callable[[int, int], None] | None = None) -> FollowRun:
    """Every batch through the deployment, following it to newer generations (module docstring).
    ``pace_s`` spaces submissions (a steady request stream during a fault)."""
    ep = load_endpoints(endpoints) if isinstance(endpoints, Path) else endpoints
    run = FollowRun()
    pending = dict(enumerate(batches))
    latencies: list[float] = []
    deadline = time.monotonic() + give_up_s
    while pending:
        if time.monotonic() > deadline:
            raise ClientError(f"{len(pending)} batch(es) without a result after {give_up_s:g} s")
        # A timeout well above a healthy request's latency, so only a broken pipeline trips it.
        timeout = max(1.0, 4 * statistics.median(latencies)) if latencies else 30.0
        name = ep.inputs[0].name
        order = sorted(pending)
        try:
            with Client(ep.entry[0].endpoint, ep.exit[0].endpoint, timeout_s=timeout, retries=0,
                        window=window) as client:
                for index, outcome in zip(order, client.results(_paced(({name: pending[i]} for i in order), pace_s),
                                                                errors="return")):
                    if isinstance(outcome, Result):
                        if index in run.outputs:
                            run.late += 1
                            continue
                        run.outputs[index] = next(iter(outcome.outputs.values()))
                        run.arrivals.append((time.time(), index, ep.generation))
                        latencies.append(outcome.latency_s)
                        # the Client reads timeout_s at every wait: tighten it as healthy latencies come in
                        client.timeout_s = max(1.0, 4 * statistics.median(latencies[-20:]))
                        del pending[index]
                        if on_result is not None:
                            on_result(index, ep.generation)
                    else:
                        break  # the pipeline stopped answering: look for a newer generation
        except ClientError:
            pass  # the entry took nothing: the same
        if not pending:
            break
        newer = _await_newer(ep, keypair, endpoints if isinstance(endpoints, Path) else None)
        if newer is not None:
            ep = newer
            run.switches.append((time.time(), ep.generation))
            run.resent += len(pending)
            latencies.clear()
    return run


def _paced(items, pace_s: float):
    for item in items:
        yield item
        if pace_s:
            time.sleep(pace_s)


def _await_newer(ep: Endpoints, keypair: KeyPair | None, path: Path | None, wait_s: float = 3.0) -> Endpoints | None:
    """A newer generation from the daemons (or the endpoints file), polling for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        newer = find_route(ep, keypair, timeout_s=0.5)
        if newer is None and path is not None:
            try:
                on_disk = load_endpoints(path)
                newer = on_disk if on_disk.generation > ep.generation else None
            except Exception:
                newer = None
        if newer is not None or time.monotonic() > deadline:
            return newer
        time.sleep(0.1)
