"""Model coverage: each model exported, its candidate cuts found, compiled into 4 stages, verified.

Per model (each in a fresh process, so times and memory are its own): which exporter made it, the
number of single-activation candidate cuts (how many of them forward a model input such as an
attention mask, how many rebuild values), the balance of a ``--stages 4`` split (largest and
smallest stage's estimated FLOPs over the mean stage's), the largest |difference| between the
chained stages and the whole model in ONNX Runtime, and the time to export and to compile (cuts,
slicing, verification). A row is OK when every stage is within 2x of the mean and the stages verify.

``NAME@torchscript`` exports a registry model with the legacy TorchScript exporter and compiles the
resulting file through ``--onnx`` (an ONNX file from elsewhere: no module metadata).

    .venv/bin/python tools/bench_models.py --markdown build/models.md --json build/models.json
    .venv/bin/python tools/bench_models.py --models bert_tiny,gpt2_tiny --stages 4
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
DEFAULT_MODELS = ",".join([
    "resnet50", "mobilenetv3_large_100", "efficientnet_b0", "swin_tiny_patch4_window7_224", "regnety_016",
    "resnet18@torchscript", "convnext_tiny", "bert_base", "gpt2", "bert_large", "gpt2_medium",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "deit_base_patch16_224",
    "vit_large_patch16_224",
])
MAX_OVER_MEAN = 2.0  # the acceptance bound: every stage within 2x of the mean stage's FLOPs


def measure(spec: str, stages: int, out_dir: Path) -> dict:
    """Runs inside the child process: export (timed), find cuts, compile, verify."""
    from edgepipe.compiler.build import candidate_cuts, compile_model, load_model
    from edgepipe.compiler.export import export_model
    from edgepipe.models.registry import get_model

    name, _, exporter = spec.partition("@")
    entry = get_model(name)
    if exporter:
        entry = dataclasses.replace(entry, exporter=exporter)
    start = time.perf_counter()
    exported = export_model(entry)
    export_s = time.perf_counter() - start
    onnx = exported.path if exporter else None  # another exporter's file goes in as any ONNX file

    start = time.perf_counter()
    loaded = load_model(None if onnx else name, onnx=onnx)
    cuts = candidate_cuts(loaded)
    cuts_s = time.perf_counter() - start
    start = time.perf_counter()
    result = compile_model(None if onnx else name, out_dir, onnx=onnx, stages=stages)
    compile_s = time.perf_counter() - start
    balance = result.balance
    assert balance is not None and result.verification is not None
    weights = (exported.path.parent / (exported.path.name + ".data")).stat().st_size
    return {
        "model": spec, "family": entry.family, "exporter": exported.settings["exporter"],
        "export_cached": exported.cached, "weights_bytes": weights,
        "candidate_cuts": len(cuts),
        "cuts_forwarding": sum(1 for c in cuts if c.forwarded),
        "cuts_rebuilding": sum(1 for c in cuts if c.rebuilt),
        "labelled_cuts": sum(1 for c in cuts if not c.label.startswith("@")),
        "stages": stages, "chosen": [c.label for c in result.cuts],
        "stage_gflop": [f / 1e9 for f in balance.stage_flops],
        "max_over_mean": balance.worst_ratio, "min_over_mean": balance.least_ratio,
        "warnings": list(balance.warnings),
        "max_abs_diff": result.verification.worst, "verified": result.verification.passed,
        "export_s": export_s, "cuts_s": cuts_s, "compile_s": compile_s,
        "balanced": balance.worst_ratio <= MAX_OVER_MEAN and balance.least_ratio >= 1 / MAX_OVER_MEAN,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    head = ("| model | exporter | weights | candidate cuts (forward mask / rebuild) | 4-stage split: "
            "largest / smallest stage vs mean | max \\|Δ\\| | export s | compile s | OK |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        exporter = "torchscript (legacy), as ONNX file" if "torchscript" in r["exporter"] else "dynamo"
        export = f"{r['export_s']:.0f}" + (" (cached)" if r["export_cached"] else "")
        ok = "yes" if r["balanced"] and r["verified"] else "**no**"
        lines.append(f"| {r['model']} | {exporter} | {r['weights_bytes'] / 2**20:.0f} MiB | {r['candidate_cuts']} "
                     f"({r['cuts_forwarding']} / {r['cuts_rebuilding']}) | {r['max_over_mean']:.2f}x / "
                     f"{r['min_over_mean']:.2f}x | {r['max_abs_diff']:.2g} | {export} | {r['compile_s']:.1f} | {ok} |")
    return (head + "\n".join(lines) + f"\n\nMachine: {meta['machine']}. Command: `{meta['command']}`. "
            f"Date: {meta['date']}. Load average before the run: {meta['load_before']}.\n")


def run_all(specs: list[str], stages: int, cache_dir: Path) -> list[dict]:
    """Measure each model in its own process, exporting into ``cache_dir``."""
    env = {**os.environ, "EDGEPIPE_CACHE": str(cache_dir)}
    console = Console(stderr=True)
    rows: list[dict] = []
    for spec in specs:
        with tempfile.TemporaryDirectory(prefix="bench-models-") as out:
            console.print(f"{spec} ...", highlight=False)
            proc = subprocess.run([sys.executable, __file__, "--child", f"{spec}|{stages}|{out}"],
                                  capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            console.print(f"[red]{spec} failed:[/red] {tail}", highlight=False)
            rows.append({"model": spec, "error": tail})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


@app.command()
def main(
    models: Annotated[str, typer.Option(help="Comma-separated registry names (NAME@torchscript: legacy exporter).")]
    = DEFAULT_MODELS,
    stages: Annotated[int, typer.Option(min=2, help="Stages per split.")] = 4,
    cache: Annotated[Path | None, typer.Option(help=(
        "Export cache [a fresh temporary one, so export times are real; pass $EDGEPIPE_CACHE to reuse]."))] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Also write a Markdown table here.")] = None,
    child: Annotated[str, typer.Option(hidden=True)] = "",
) -> None:
    """Compile every model into N stages and report cuts, balance, verification and times."""
    if child:
        spec, n, out = child.split("|")
        print(json.dumps(measure(spec, int(n), Path(out))))
        return
    from edgepipe.agent.device.profiler import host_facts

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-models-cache-") as scratch:  # GBs of exports: not kept
        rows = run_all(models.split(","), stages, Path(cache) if cache else Path(scratch))
    facts = host_facts()
    meta = {
        "machine": f"{os.cpu_count()} vCPU {facts['cpu']}, {platform.machine()}, Python {platform.python_version()}",
        "command": " ".join(["tools/bench_models.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before,
    }
    good = [r for r in rows if "error" not in r]
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    if markdown_out:
        Path(markdown_out).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_out).write_text(markdown(good, meta))
    table = Table(title=f"Model coverage: {stages}-stage splits")
    for col in ("model", "exporter", "cuts", "fwd/rebuild", "max/mean", "min/mean", "max |Δ|", "export s",
                "compile s", "OK"):
        table.add_column(col, justify="left" if col in ("model", "exporter") else "right")
    for r in good:
        table.add_row(r["model"], r["exporter"], str(r["candidate_cuts"]),
                      f"{r['cuts_forwarding']}/{r['cuts_rebuilding']}", f"{r['max_over_mean']:.2f}",
                      f"{r['min_over_mean']:.2f}", f"{r['max_abs_diff']:.2g}", f"{r['export_s']:.0f}",
                      f"{r['compile_s']:.1f}", "yes" if r["balanced"] and r["verified"] else "NO")
    Console(width=200).print(table)
    Console(width=200).print(f"machine: {meta['machine']}; load before: {load_before}")
    raise typer.Exit(0 if len(good) == len(rows) and all(r["balanced"] and r["verified"] for r in good) else 1)


if __name__ == "__main__":
    app()
