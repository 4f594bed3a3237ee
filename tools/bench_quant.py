"""Int8 weights and activation compression, measured on this machine (issue 13).

    stage     a ViT-B stage with int8 weights against its fp32 twin: median ms per microbatch
              (the two sessions timed alternately in one process), resident memory after load and
              after the runs (each variant in its own fresh process), and output error (the stage's
              own output, and the model's when only this stage is int8)
    codecs    every candidate cut of ViT-B sent as fp16 / int8, and every segment with int8
              weights, each alone: the model outputs' error against fp32 (table + plot)
    lossless  zlib / lz4 / zstandard (optionally after a byte shuffle) on real activations, fp32
              and fp16, at ViT-B and ViT-H sizes: ratio and CPU time, and when it pays on a link
    all       the three above

    flock /work/notes/bench.lock .venv/bin/python tools/bench_quant.py all --json build/bench-quant.json
    .venv/bin/python tools/bench_quant.py stage --checkpoint my_vitb.pth     # a user's weights

Random weights unless --checkpoint: the numbers say what quantization costs in speed and memory;
output errors of a trained model differ (measure yours with edgepipe-compile --calibration).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console(width=150)
RESULTS: dict[str, Any] = {}
BASE = "vit_base_patch16_224"


# --- a quantized stage against its fp32 twin ----------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_memory(bundle: Path, microbatch: int, threads: int, runs: int) -> dict[str, int]:
    """In this (fresh) process: RSS before, after loading the stage as an agent does, after runs."""
    from edgepipe.agent.device.profiler import random_feeds
    from edgepipe.agent.device.session import create_session
    from edgepipe.agent.formats.bundle import load_bundle

    manifest = load_bundle(bundle)
    feeds = random_feeds(manifest.inputs, microbatch)
    before = _rss_bytes()
    session = create_session(bundle, manifest, threads)
    loaded = _rss_bytes()
    for _ in range(runs):
        session.run(None, feeds)
    return {"rss_before": before, "rss_after_load": loaded, "rss_after_runs": _rss_bytes()}


@app.command("memory-child", hidden=True)
def memory_child(bundle: Path, microbatch: int, threads: int, runs: int) -> None:
    print(json.dumps(measure_memory(bundle, microbatch, threads, runs)))


def memory_in_fresh_process(bundle: Path, microbatch: int, threads: int, runs: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, __file__, "memory-child", str(bundle), str(microbatch), str(threads),
                           str(runs)], capture_output=True, text=True, check=True, timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_alternately(bundles: dict[str, Path], microbatch: int, threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per run of each bundle's session, runs alternating so load bursts hit both alike."""
    from edgepipe.agent.device.profiler import random_feeds
    from edgepipe.agent.device.session import create_session
    from edgepipe.agent.formats.bundle import load_bundle

    sessions, feeds = {}, {}
    for name, bundle in bundles.items():
        manifest = load_bundle(bundle)
        sessions[name] = create_session(bundle, manifest, threads)
        feeds[name] = random_feeds(manifest.inputs, microbatch)
        for _ in range(2):
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in bundles}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return times


def stage_benchmark(model: str, checkpoint: Path | None, stages: int, stage: int, microbatch: int,
                    threads: list[int], rounds: int, samples: int, out: Path) -> dict[str, Any]:
    import shutil

    from edgepipe.agent.device.profiler import random_feeds
    from edgepipe.agent.formats.bundle import load_bundle
    from edgepipe.compiler.build import compile_model
    from edgepipe.compiler.calibration import registry_calibration
    from edgepipe.compiler.compression import cpu_session, output_error
    from edgepipe.compiler.plan_check import StageChoice, check_deployed
    from edgepipe.compiler.quantize import quantize_bundle

    built = compile_model(model, out / "fp32", stages=stages, checkpoint=checkpoint)
    fp32 = built.bundle_dirs[stage]
    int8 = out / "int8" / fp32.name
    shutil.rmtree(int8, ignore_errors=True)
    shutil.copytree(fp32, int8)
    quantize_bundle(int8)
    m32, m8 = load_bundle(fp32), load_bundle(int8)
    # the stage's own output: same input to both
    feeds = random_feeds(m32.inputs, microbatch, seed=1)
    ref = cpu_session(fp32 / "stage.onnx").run(None, feeds)
    got = cpu_session(int8 / "stage.onnx").run(None, feeds)
    stage_error = output_error(ref, got, classifier=False)
    # the model's outputs when only this stage is int8 (registry example inputs)
    int8_chain = [int8 if k == stage else b for k, b in enumerate(built.bundle_dirs)]
    choices = [StageChoice(int8_weights=k == stage) for k in range(len(int8_chain))]
    model_error = check_deployed(built.model_path, int8_chain, choices, registry_calibration(model, samples)).measured
    rows = []
    for t in threads:
        times = time_alternately({"fp32": fp32, "int8": int8}, microbatch, t, rounds)
        mem = {name: memory_in_fresh_process(b, microbatch, t, rounds) for name, b in (("fp32", fp32), ("int8", int8))}
        med = {name: statistics.median(v) * 1000 for name, v in times.items()}
        rows.append({"threads": t, "median_ms": med, "speedup": med["fp32"] / med["int8"], "memory": mem,
                     "spread": {name: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) * 1000
                                for name, v in times.items()}})
    return {
        "model": model, "checkpoint": None if checkpoint is None else str(checkpoint),
        "stage": f"{stage}/{stages} ({m32.cut_in} -> {m32.cut_out})", "microbatch": microbatch, "rounds": rounds,
        "weight_bytes": {"fp32": m32.weight_bytes, "int8": m8.weight_bytes},
        "data_file_bytes": {"fp32": m32.files["stage.onnx.data"].bytes, "int8": m8.files["stage.onnx.data"].bytes},
        "stage_output_error": stage_error.to_dict(), "model_output_error": model_error.to_dict(),
        "samples": samples, "runs": rows,
    }


def print_stage(r: dict[str, Any]) -> None:
    mib = 2**20
    table = Table(title=f"{r['model']} stage {r['stage']}, microbatch {r['microbatch']}: int8 weights vs fp32 "
                        f"({r['rounds']} alternating runs each)")
    for col in ("threads", "fp32 ms", "int8 ms", "speed-up", "fp32 RSS load/runs MiB", "int8 RSS load/runs MiB"):
        table.add_column(col, justify="right")
    for row in r["runs"]:
        m = row["memory"]
        table.add_row(str(row["threads"]), f"{row['median_ms']['fp32']:.1f}", f"{row['median_ms']['int8']:.1f}",
                      f"{row['speedup']:.2f}x",
                      f"{m['fp32']['rss_after_load'] / mib:.0f} / {m['fp32']['rss_after_runs'] / mib:.0f}",
                      f"{m['int8']['rss_after_load'] / mib:.0f} / {m['int8']['rss_after_runs'] / mib:.0f}")
    console.print(table)
    w = r["weight_bytes"]
    console.print(f"weights {w['fp32'] / mib:.1f} MiB -> {w['int8'] / mib:.1f} MiB "
                  f"({w['fp32'] / w['int8']:.2f}x smaller)")
    s, m = r["stage_output_error"], r["model_output_error"]
    console.print(f"stage output vs fp32: max|Δ| {s['max_abs_diff']:.4g}, cosine {s['cosine']:.6f}; model logits "
                  f"with only this stage int8 ({r['samples']} samples): max|Δ| {m['max_abs_diff']:.4g}, cosine "
                  f"{m['cosine']:.6f}, top-1 agreement {m['top1_agreement']:.0%}")


# --- per-cut codec errors -----------------------------------------------------------------------


def codec_benchmark(model: str, checkpoint: Path | None, samples: int, plot: Path | None) -> dict[str, Any]:
    from edgepipe.compiler.build import candidate_cuts, load_model
    from edgepipe.compiler.calibration import registry_calibration
    from edgepipe.compiler.compression import measure_lossy

    loaded = load_model(model, checkpoint=checkpoint)
    cuts = candidate_cuts(loaded)
    start = time.perf_counter()
    measured = measure_lossy(loaded.model, cuts, registry_calibration(model, samples), loaded.identity.model_sha256,
                             use_cache=False)
    seconds = time.perf_counter() - start
    rows = []
    for k, seg in enumerate(measured.segments):
        row: dict[str, Any] = {"segment": seg.name, "cut_after": cuts[k].label if k < len(cuts) else None,
                               "raw_bytes": cuts[k].bytes_per_sample if k < len(cuts) else None}
        for c in seg.codecs:
            row[c.codec] = {"out_bytes": c.out_bytes, **c.error.to_dict()}
        if seg.int8 is not None:
            row["int8_weights"] = {"weight_bytes": seg.int8.weight_bytes, "nodes": seg.int8.quantized_nodes,
                                   **seg.int8.error.to_dict()}
        rows.append(row)
    result = {"model": model, "samples": samples, "cuts": len(cuts), "measure_seconds": seconds, "rows": rows}
    if plot is not None:
        plot_codecs(result, plot)
        result["plot"] = str(plot)
    return result


def print_codecs(r: dict[str, Any]) -> None:
    table = Table(title=f"{r['model']}: each cut compressed alone / each segment int8 alone ({r['samples']} samples; "
                        f"measured in {r['measure_seconds']:.0f} s)")
    for col in ("cut", "raw KiB", "fp16 max|Δ|", "fp16 cos", "int8 max|Δ|", "int8 cos", "int8 top-1",
                "segment", "int8-w max|Δ|", "int8-w cos"):
        table.add_column(col, justify="right")
    for row in r["rows"]:
        fp16, int8, w = row.get("fp16"), row.get("int8"), row.get("int8_weights")
        table.add_row(
            row["cut_after"] or "(output)", "-" if row["raw_bytes"] is None else f"{row['raw_bytes'] / 1024:.0f}",
            *(["-", "-"] if fp16 is None else [f"{fp16['max_abs_diff']:.2e}", f"{fp16['cosine']:.7f}"]),
            *(["-", "-", "-"] if int8 is None else [f"{int8['max_abs_diff']:.2e}", f"{int8['cosine']:.6f}",
                                                    f"{int8['top1_agreement']:.0%}"]),
            row["segment"],
            *(["-", "-"] if not w or not w["nodes"] else [f"{w['max_abs_diff']:.2e}", f"{w['cosine']:.6f}"]))
    console.print(table)


def plot_codecs(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in r["rows"] if "fp16" in row]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.semilogy(x, [row["fp16"]["max_abs_diff"] for row in rows], "o-", label="fp16 hop (2 B/value)")
    ax.semilogy(x, [row["int8"]["max_abs_diff"] for row in rows], "s-", label="int8 hop (1 B/value + row scales)")
    weights = [(i, row["int8_weights"]["max_abs_diff"]) for i, row in enumerate(rows)
               if row.get("int8_weights", {}).get("nodes")]
    ax.semilogy([i for i, _ in weights], [v for _, v in weights], "^", label="int8 weights of the segment before")
    ax.set_xticks(x[::2], [row["cut_after"] for row in rows][::2], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max |Δ| of the logits vs fp32")
    ax.set_title(f"{r['model']} (random weights): one lossy choice at a time, {r['samples']} samples")
    ax.grid(True, which="both", alpha=0.3)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 8)  # room for the legend above the points
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- lossless compression -----------------------------------------------------------------------


def real_activations(model: str, labels: list[str], samples: int) -> dict[str, np.ndarray]:
    """The tensors crossing ``labels`` for ``samples`` registry example inputs: the prefix of the
    model up to the last label, run once."""
    import tempfile

    import onnx_ir as ir
    from edgepipe.compiler.build import candidate_cuts, load_model
    from edgepipe.compiler.calibration import registry_calibration
    from edgepipe.compiler.compression import cpu_session
    from edgepipe.compiler.cuts import resolve_cuts
    from edgepipe.compiler.slicing import extract_stage

    loaded = load_model(model)
    cuts = resolve_cuts(loaded.index, candidate_cuts(loaded), labels)
    names = [t for c in cuts for t in c.tensors]
    feeds = dict(registry_calibration(model, samples).feeds)
    prefix = extract_stage(loaded.model, list(feeds), names, 0)
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as scratch:
        path = Path(scratch) / "prefix.onnx"
        ir.save(prefix, path, external_data="prefix.onnx.data")
        del prefix
        values = cpu_session(path).run(names, feeds)
    return {f"{model}@{c.label}": v for c, v in zip(cuts, values)}


def shuffled(data: bytes, itemsize: int) -> bytes:
    """Byte shuffle (what blosc does): all first bytes, then all second bytes, ... of each value, so
    the slowly varying sign/exponent bytes sit together."""
    return np.frombuffer(data, np.uint8).reshape(-1, itemsize).T.tobytes()


def compressors() -> dict[str, tuple[Any, Any]]:
    import zlib

    found: dict[str, tuple[Any, Any]] = {"zlib-1": (lambda b: zlib.compress(b, 1), zlib.decompress)}
    try:
        import lz4.frame

        found["lz4"] = (lz4.frame.compress, lz4.frame.decompress)
    except ImportError:
        pass
    try:
        import zstandard

        for level in (1, 3):
            c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            found[f"zstd-{level}"] = (c.compress, d.decompress)
    except ImportError:
        pass
    return found


def lossless_benchmark(models: list[str], samples: int, repeats: int) -> dict[str, Any]:
    tensors: dict[str, np.ndarray] = {}
    for model in models:
        depth = {"vit_huge_patch14_224": 16}.get(model, 6)
        tensors.update(real_activations(model, ["blocks.2", f"blocks.{depth}"], samples))
    rows = []
    for name, arr in tensors.items():
        per_sample = arr[:1]  # one sample's message, the size a hop carries per sample
        for dtype in ("float32", "float16"):
            data = np.ascontiguousarray(per_sample.astype(dtype)).tobytes()
            for shuffle in (False, True):
                payload = shuffled(data, np.dtype(dtype).itemsize) if shuffle else data
                for cname, (compress, decompress) in compressors().items():
                    packed = compress(payload)
                    c_s = _median_time(compress, payload, repeats)
                    d_s = _median_time(decompress, packed, repeats)
                    rows.append({"tensor": name, "shape": list(per_sample.shape), "dtype": dtype, "shuffle": shuffle,
                                 "codec": cname, "bytes": len(data), "ratio": len(data) / len(packed),
                                 "compress_ms": c_s * 1000, "decompress_ms": d_s * 1000})
    return {"models": models, "rows": rows, "verdict": lossless_verdict(rows)}


def _median_time(fn: Any, arg: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lossless_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dtype, the option that pays on the fastest links: the most wire bits saved per CPU second
    (compress + decompress), which is the link speed below which it saves more wire time than it
    costs in CPU on this machine (edge CPUs are several times slower: the break-even drops by that
    factor there). Its ratio bounds what it can gain on a link-bound pipeline."""
    best: dict[str, Any] = {}
    for dtype in ("float32", "float16"):
        scored = []
        for r in (r for r in rows if r["dtype"] == dtype and r["ratio"] > 1.0):
            saved_bits = r["bytes"] * (1 - 1 / r["ratio"]) * 8
            cpu_s = (r["compress_ms"] + r["decompress_ms"]) / 1000
            scored.append((saved_bits / cpu_s / 1e6 if cpu_s > 0 else float("inf"), r))
        if not scored:
            continue
        pays, top = max(scored, key=lambda x: x[0])
        best[dtype] = {"codec": top["codec"], "shuffle": top["shuffle"], "ratio": top["ratio"],
                       "best_ratio_any_codec": max(r["ratio"] for _, r in scored),
                       "cpu_ms": top["compress_ms"] + top["decompress_ms"], "pays_below_mbps": pays}
    return best


def print_lossless(r: dict[str, Any]) -> None:
    table = Table(title="Lossless compression of one sample's activation (median CPU ms on this machine)")
    for col in ("tensor", "dtype", "shuffle", "codec", "KiB", "ratio", "compress ms", "decompress ms"):
        table.add_column(col, justify="right")
    for row in r["rows"]:
        table.add_row(row["tensor"], row["dtype"], "yes" if row["shuffle"] else "no", row["codec"],
                      f"{row['bytes'] / 1024:.0f}", f"{row['ratio']:.3f}", f"{row['compress_ms']:.2f}",
                      f"{row['decompress_ms']:.2f}")
    console.print(table)
    for dtype, v in r["verdict"].items():
        console.print(f"{dtype}: {v['codec']}{' + shuffle' if v['shuffle'] else ''} saves {1 - 1 / v['ratio']:.1%} "
                      f"of the bytes (best of any codec: {1 - 1 / v['best_ratio_any_codec']:.1%}) for "
                      f"{v['cpu_ms']:.2f} ms CPU per sample: worth it below {v['pays_below_mbps']:.0f} Mbps on this "
                      f"CPU; lossy fp16 saves 50%, int8 75%")


# --- commands -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg(), "python": platform.python_version()}


def _finish(as_json: Path | None) -> None:
    RESULTS["machine"] = machine()
    if as_json is not None:
        as_json.parent.mkdir(parents=True, exist_ok=True)
        as_json.write_text(json.dumps(RESULTS, indent=2) + "\n")
        console.print(f"results written to {as_json}")


ModelOpt = Annotated[str, typer.Option(help="Registry model.")]
CheckpointOpt = Annotated[Path | None, typer.Option(help="Local weights (.pth/.safetensors) instead of random ones.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")]
OutOpt = Annotated[Path, typer.Option(help="Build directory.")]


@app.command("stage")
def stage_cmd(model: ModelOpt = BASE, checkpoint: CheckpointOpt = None, stages: int = 3, stage: int = 1,
              microbatch: int = 8, threads: str = "1,2", rounds: int = 15, samples: int = 8,
              out: OutOpt = Path("build/bench-quant"), as_json: JsonOpt = None) -> None:
    """A stage with int8 weights against its fp32 twin: speed, memory, error."""
    RESULTS["stage"] = stage_benchmark(model, checkpoint, stages, stage, microbatch,
                                       [int(t) for t in threads.split(",")], rounds, samples, out)
    print_stage(RESULTS["stage"])
    _finish(as_json)


@app.command("codecs")
def codecs_cmd(model: ModelOpt = BASE, checkpoint: CheckpointOpt = None, samples: int = 8,
               plot: Annotated[Path | None, typer.Option(help="PNG plot")] = Path("docs/img/codec-errors-vitb.png"),
               as_json: JsonOpt = None) -> None:
    """Every cut in fp16 / int8 and every segment with int8 weights, each alone: output error."""
    RESULTS["codecs"] = codec_benchmark(model, checkpoint, samples, plot)
    print_codecs(RESULTS["codecs"])
    _finish(as_json)


@app.command("plot")
def plot_cmd(results: Annotated[Path, typer.Argument(help="JSON written by `codecs --json` or `all --json`.")],
             out: Path = Path("docs/img/codec-errors-vitb.png")) -> None:
    """Redraw the codec plot from saved results (no measuring)."""
    plot_codecs(json.loads(results.read_text())["codecs"], out)
    console.print(f"plot written to {out}")


@app.command("lossless")
def lossless_cmd(models: str = f"{BASE},vit_huge_patch14_224", samples: int = 2, repeats: int = 7,
                 as_json: JsonOpt = None) -> None:
    """Lossless compressors on real activations: ratio and CPU time."""
    RESULTS["lossless"] = lossless_benchmark(models.split(","), samples, repeats)
    print_lossless(RESULTS["lossless"])
    _finish(as_json)


@app.command("all")
def all_cmd(model: ModelOpt = BASE, checkpoint: CheckpointOpt = None, samples: int = 8,
            out: OutOpt = Path("build/bench-quant"), as_json: JsonOpt = None,
            lossless_models: str = f"{BASE},vit_huge_patch14_224") -> None:
    """stage, codecs and lossless, one after another."""
    RESULTS["stage"] = stage_benchmark(model, checkpoint, 3, 1, 8, [1, 2], 15, samples, out)
    print_stage(RESULTS["stage"])
    RESULTS["codecs"] = codec_benchmark(model, checkpoint, samples, Path("docs/img/codec-errors-vitb.png"))
    print_codecs(RESULTS["codecs"])
    RESULTS["lossless"] = lossless_benchmark(lossless_models.split(","), 2, 7)
    print_lossless(RESULTS["lossless"])
    _finish(as_json)


if __name__ == "__main__":
    app()
