"""Measure, on the device itself, what each segment of a model costs: time, memory, communication.

Runs every piece of a profiling bundle with ONNX Runtime exactly as the agent would run a stage
(same session settings, same thread count), at each requested microbatch size.

Robust to a busy device: every piece is loaded first (peak memory is the growth of the process's
high-water mark, reset through /proc/self/clear_refs, while the piece's session is created and
warmed up at every size); then the timed runs go round-robin, one run of each (piece, size) per
round, so a burst of other load lands on one sample of many pieces instead of on every sample of
one. Per (piece, size), samples further than ``OUTLIER_MADS`` robust deviations from the median are
rejected; the profile keeps the mean of the rest (a pipeline's throughput follows the mean time, not
the median), their relative spread and the number rejected.

With ``comm``, the runtime's own communication costs are measured too (agent/device/commcost.py).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepipe.agent.device.session import create_session
from edgepipe.agent.formats.bundle import StageManifest, TensorSpec, load_bundle
from edgepipe.agent.formats.profiles import CommProfile, DeviceProfile, load_profile_bundle

OUTLIER_MADS = 3.0  # a sample this many robust standard deviations from the median is an outlier
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
SPREAD_WARNING = 0.10  # a segment whose relative spread is above this is too noisy to plan on
SIGNIFICANT = 0.01  # segments below this fraction of the model's time are not warned about
MAX_COMM_MESSAGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Robust:
    """Summary of one (piece, size)'s timed runs after rejecting outliers."""

    mean: float  # of the kept samples
    median: float  # of all samples
    spread: float  # MAD_TO_SIGMA * MAD / median: a relative standard deviation that ignores outliers
    rejected: int


def robust_summary(samples: Sequence[float], mads: float = OUTLIER_MADS) -> Robust:
    """Median and MAD of ``samples``; drop those further than ``mads`` robust sigmas; mean of the rest."""
    if not samples:
        raise ValueError("no samples")
    median = statistics.median(samples)
    sigma = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in samples)
    kept = [x for x in samples if abs(x - median) <= mads * sigma] if sigma > 0 else list(samples)
    kept = kept or [median]
    return Robust(mean=statistics.fmean(kept), median=median, spread=sigma / median if median > 0 else 0.0,
                  rejected=len(samples) - len(kept))


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


def round_robin(pieces: int, sizes: Sequence[int], rounds: int) -> list[tuple[int, int]]:
    """The order of timed runs: each round runs every (piece, size) once, starting one piece later
    than the round before, so no piece is always timed right after the same other one."""
    order = []
    for r in range(rounds):
        for k in range(pieces):
            piece = (k + r) % pieces
            order += [(piece, mb) for mb in sizes]
    return order


def profile_bundle(
    root: Path | str,
    device: str,
    microbatches: Sequence[int] = (1, 8),
    threads: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    on_piece: Callable[[int, int], None] | None = None,
    comm: bool = True,
) -> DeviceProfile:
    """Profile every piece of the profiling bundle at ``root``; one DeviceProfile for this device.

    ``repeats`` is the number of round-robin rounds (timed runs per piece and size); ``on_piece``
    is called with (steps done, total steps) as loading, rounds and the comm measurement finish."""
    root = Path(root)
    bundle = load_profile_bundle(root)
    sizes = sorted(set(microbatches))
    rounds = max(repeats, 1)
    total = bundle.piece_count + rounds + (1 if comm else 0)
    progress = on_piece or (lambda _done, _total: None)
    sessions, feeds, memory, manifests = [], [], [], []
    for piece in range(bundle.piece_count):
        piece_dir = bundle.piece_dir(root, piece)
        manifest = load_bundle(piece_dir)
        baseline = _reset_peak_rss()
        session = create_session(piece_dir, manifest, threads=threads)
        piece_feeds = {mb: random_feeds(manifest.inputs, mb) for mb in sizes}
        for mb in sizes:
            for _ in range(max(warmup, 1)):  # at least one run: the peak memory includes running
                session.run(None, piece_feeds[mb])
        memory.append(max(_peak_rss() - baseline, 0))
        sessions.append(session)
        feeds.append(piece_feeds)
        manifests.append(manifest)
        progress(piece + 1, total)
    samples: dict[tuple[int, int], list[float]] = {}
    order = round_robin(bundle.piece_count, sizes, rounds)
    per_round = len(order) // rounds
    for i, (piece, mb) in enumerate(order):
        samples.setdefault((piece, mb), []).append(time_run(sessions[piece], feeds[piece][mb]))
        if (i + 1) % per_round == 0:
            progress(bundle.piece_count + (i + 1) // per_round, total)
    stats = {key: robust_summary(values) for key, values in samples.items()}
    comm_profile = None
    if comm:
        comm_profile = measure_runtime_comm(manifests, sessions, feeds, sizes, stats, bundle.segment_pieces)
        progress(total, total)
    pieces = bundle.segment_pieces
    return DeviceProfile(
        model_id=bundle.model_id,
        model_sha256=bundle.model_sha256,
        device=device,
        dtype="float32",
        ort_version=ort.__version__,
        threads=threads,
        segment_names=bundle.segment_names,
        seconds={mb: tuple(stats[(p, mb)].mean for p in pieces) for mb in sizes},
        peak_memory_bytes=tuple(memory[p] for p in pieces),
        repeats=rounds,
        warmup=warmup,
        host=host_facts(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spread={mb: tuple(round(stats[(p, mb)].spread, 6) for p in pieces) for mb in sizes},
        outliers={mb: tuple(stats[(p, mb)].rejected for p in pieces) for mb in sizes},
        comm=comm_profile,
        int8_seconds={mb: tuple(stats[(p, mb)].mean for p in bundle.int8_segment_pieces) for mb in sizes}
        if bundle.int8_segment_pieces else {},
        int8_peak_memory_bytes=tuple(memory[p] for p in bundle.int8_segment_pieces),
    )


def measure_runtime_comm(manifests: Sequence[StageManifest], sessions: Sequence[ort.InferenceSession],
                         feeds: Sequence[dict[int, dict[str, np.ndarray]]], sizes: Sequence[int],
                         stats: dict[tuple[int, int], Robust], segment_pieces: Sequence[int]) -> CommProfile:
    """Communication costs with messages up to the largest activation a piece sends at the largest
    size, and their share of compute measured beside the piece that makes up most of the model's
    time (a transformer block's half: what stages are made of; a sub-millisecond piece would drown
    the measurement in timer noise)."""
    from edgepipe.agent.device.commcost import measure_comm

    mb = max(sizes)
    largest = max((spec.bytes_per_sample() or 0) * mb for m in manifests for spec in m.outputs)
    piece = max(range(len(sessions)), key=lambda p: stats[(p, mb)].mean * segment_pieces.count(p))
    session, feed = sessions[piece], feeds[piece][mb]
    return measure_comm(min(max(largest, 1 << 16), MAX_COMM_MESSAGE_BYTES), lambda: session.run(None, feed))


def time_run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    """Wall time of one ``session.run``."""
    start = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - start


def time_runs(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int, warmup: int) -> float:
    """Median wall time of one ``session.run`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    return statistics.median(time_run(session, feeds) for _ in range(max(repeats, 1)))


def noisy_segments(profile: DeviceProfile, microbatch: int | None = None,
                   limit: float = SPREAD_WARNING) -> list[tuple[str, int, float]]:
    """(segment, microbatch, spread) of every segment whose spread is above ``limit`` and that
    takes at least ``SIGNIFICANT`` of the model's time at that size (a sub-millisecond norm layer
    is noisy on any machine and moves no plan)."""
    found = []
    for mb, spreads in sorted(profile.spread.items()):
        if microbatch is not None and mb != microbatch:
            continue
        seconds = profile.seconds.get(mb, ())
        total = sum(seconds)
        found += [(name, mb, s) for name, s, t in zip(profile.segment_names, spreads, seconds)
                  if s > limit and t >= SIGNIFICANT * total]
    return found


def spread_warning(profile: DeviceProfile, microbatch: int | None = None, limit: float = SPREAD_WARNING) -> str | None:
    """One line for the user when some segment's timings were too noisy to plan on, else None."""
    noisy = noisy_segments(profile, microbatch, limit)
    if not noisy:
        return None
    worst = max(noisy, key=lambda n: n[2])
    return (f"{profile.device}: timings of {len(noisy)} segment(s) spread more than {limit:.0%} "
            f"(worst {worst[0]} at microbatch {worst[1]}: {worst[2]:.0%}); the device was busy while "
            f"profiling: plans from this profile may be off; re-profile when it is quiet")


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
