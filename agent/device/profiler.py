"""Measure, on the device itself, what each segment of a model costs: time and memory.

Runs every piece of a profiling bundle with ONNX Runtime exactly as the agent would run a stage
(same session settings, same thread count), at each requested microbatch size: a few warm-up runs,
then the median of ``repeats`` timed runs. Peak memory is the growth of the process's high-water
mark (reset through /proc/self/clear_refs) while the piece's session is loaded and run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepipe.agent.device.session import create_session
from edgepipe.agent.formats.bundle import TensorSpec, load_bundle
from edgepipe.agent.formats.profiles import DeviceProfile, load_profile_bundle


def random_feeds(specs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``specs``; symbolic axes (the batch) become ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else batch for d in spec.shape)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return feeds


def profile_bundle(
    root: Path | str,
    device: str,
    microbatches: Sequence[int] = (1, 8),
    threads: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    on_piece: Callable[[int, int], None] | None = None,
) -> DeviceProfile:
    """Time every piece of the profiling bundle at ``root``; one DeviceProfile for this device."""
    root = Path(root)
    bundle = load_profile_bundle(root)
    piece_seconds: list[dict[int, float]] = []
    piece_memory: list[int] = []
    for piece in range(bundle.piece_count):
        piece_dir = bundle.piece_dir(root, piece)
        manifest = load_bundle(piece_dir)
        baseline = _reset_peak_rss()
        session = create_session(piece_dir, manifest, threads=threads)
        timings = {}
        for mb in sorted(microbatches):
            feeds = random_feeds(manifest.inputs, mb)
            timings[mb] = time_runs(session, feeds, repeats, warmup)
        piece_memory.append(max(_peak_rss() - baseline, 0))
        piece_seconds.append(timings)
        del session
        if on_piece is not None:
            on_piece(piece, bundle.piece_count)
    return DeviceProfile(
        model_id=bundle.model_id,
        model_sha256=bundle.model_sha256,
        device=device,
        dtype="float32",
        ort_version=ort.__version__,
        threads=threads,
        segment_names=bundle.segment_names,
        seconds={mb: tuple(piece_seconds[p][mb] for p in bundle.segment_pieces) for mb in sorted(microbatches)},
        peak_memory_bytes=tuple(piece_memory[p] for p in bundle.segment_pieces),
        repeats=repeats,
        warmup=warmup,
        host=host_facts(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        int8_seconds={mb: tuple(piece_seconds[p][mb] for p in bundle.int8_segment_pieces)
                      for mb in sorted(microbatches)} if bundle.int8_segment_pieces else {},
        int8_peak_memory_bytes=tuple(piece_memory[p] for p in bundle.int8_segment_pieces),
    )


def time_runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int, warmup: int) -> float:
    """Median wall time of one ``session.run`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def host_facts() -> dict[str, object]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "machine": platform.machine(), "hostname": platform.node()}


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (VmHWM) and return the current RSS."""
    # Not Linux, or not permitted: the peak then includes earlier pieces (an overestimate).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")
