"""Benchmark the compiler: export time, slicing time and slicing memory for big ViTs.

Each slicing run happens in a fresh subprocess so its peak memory is its own. Memory is reported
as peak anonymous RSS (heap: what slicing really allocates) and peak total RSS (which also counts
pages of the memory-mapped weight file that happen to be resident).

    .venv/bin/python tools/bench_compile.py                       # ViT-B/L/H x 4/8/16 stages
    .venv/bin/python tools/bench_compile.py --models vit_base_patch16_224 --stages 4 --json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
DEFAULT_MODELS = "vit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224"


def _peak_sampler(stop: threading.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        status = Path("/proc/self/status").read_text()
        for line in status.splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                peaks[key] = max(peaks.get(key, 0), int(rest.split()[0]) * 1024)
        stop.wait(0.005)


def slice_once(model_name: str, stages: int, out_dir: str) -> dict:
    """Runs inside the child: load the cached export, choose balanced cuts, slice. No verification."""
    from edgepipe.compiler.build import balanced_cuts, candidate_cuts, load_model
    from edgepipe.compiler.slicing import slice_model

    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_peak_sampler, args=(stop, peaks), daemon=True)
    sampler.start()
    start = time.perf_counter()
    loaded = load_model(model_name)
    cuts = balanced_cuts(loaded, stages, candidate_cuts(loaded))
    slice_model(loaded.model, cuts, Path(out_dir), loaded.identity)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {"slice_s": seconds, "peak_anon_bytes": peaks.get("RssAnon", 0), "peak_rss_bytes": peaks.get("VmRSS", 0)}


@app.command()
def main(
    models: Annotated[str, typer.Option(help="Comma-separated registry names.")] = DEFAULT_MODELS,
    stages: Annotated[str, typer.Option(help="Comma-separated stage counts.")] = "4,8,16",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    child: Annotated[str, typer.Option(hidden=True)] = "",
) -> None:
    """Time export (cached after the first) and slicing, and measure slicing's peak memory."""
    if child:
        name, n, out = child.split("|")
        print(json.dumps(slice_once(name, int(n), out)))
        return
    from edgepipe.agent.device.profiler import host_facts
    from edgepipe.compiler.export import export_model
    from edgepipe.models.registry import get_model

    rows = []
    for name in models.split(","):
        start = time.perf_counter()
        exported = export_model(get_model(name))
        export_s = time.perf_counter() - start
        weights = (exported.path.parent / "model.onnx.data").stat().st_size
        for n in (int(s) for s in stages.split(",")):
            with tempfile.TemporaryDirectory(prefix="bench-slice-") as out:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", f"{name}|{n}|{out}"],
                    capture_output=True, text=True, check=True,
                )
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"model": name, "weights_bytes": weights, "export_s": export_s,
                         "export_cached": exported.cached, "stages": n, **result})
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
               "processor": host_facts()["cpu"]}
    if as_json:
        print(json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=2))
        return
    table = Table(title="Compile benchmark (slicing in a fresh process per row)")
    for col in ("model", "weights", "export s", "stages", "slice s", "peak anon RSS", "peak RSS"):
        table.add_column(col, justify="right")
    for r in rows:
        export = f"{r['export_s']:.1f}" + (" (cached)" if r["export_cached"] else "")
        table.add_row(r["model"], f"{r['weights_bytes'] / 2**30:.2f} GiB", export, str(r["stages"]),
                      f"{r['slice_s']:.1f}", f"{r['peak_anon_bytes'] / 2**20:.0f} MiB",
                      f"{r['peak_rss_bytes'] / 2**20:.0f} MiB")
    Console().print(table)
    Console().print(f"machine: {machine}")


if __name__ == "__main__":
    app()
