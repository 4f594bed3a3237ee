"""Plot the emulated-cluster benchmarks as PNG files for the docs: tools/bench_cluster.py --json
(scaling, hetero, bandwidth) and tools/bench_features.py --json (issue 13: features.png).

    .venv/bin/python tools/plot_bench.py build/bench-cluster.json -o docs/img
    .venv/bin/python tools/plot_bench.py build/bench-features.json -o docs/img
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    results: Annotated[Path, typer.Argument(help="JSON written by bench_cluster.py --json.")],
    out: Annotated[Path, typer.Option("-o", help="Directory for the PNG files.")] = Path("docs/img"),
) -> None:
    """One PNG per benchmark part found in the results: measured and predicted side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "scaling" in data:
        rows = data["scaling"]
        n = [r["devices"] for r in rows]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(n, [r["ideal"] for r in rows], "k--", label="ideal (N × one device)")
        ax.plot(n, [r["pipeline"]["measured_throughput"] for r in rows], "o-", label="pipeline, measured")
        ax.plot(n, [r["pipeline"]["predicted_throughput"] for r in rows], "x:", label="pipeline, predicted")
        ax.set(xlabel="devices (sharing 2 cores)", ylabel="samples/s", xticks=n,
               title=f"Scaling: {data['model']}, microbatch {data['microbatch']}")
        ax.legend()
        written.append(_save(fig, out / "scaling.png"))
    for key, title, label in (("hetero", "Heterogeneous devices", lambda r: r["solver"]),
                              ("bandwidth", "Bandwidth sweep (4 devices)", lambda r: r["bandwidth"])):
        rows = [r for r in data.get(key, []) if r.get("fits")]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.0, 3.6))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["predicted_throughput"] for r in rows], 0.4, label="predicted")
        ax.bar([x + 0.2 for x in xs], [r["measured_throughput"] for r in rows], 0.4, label="measured")
        ax.set_xticks(list(xs), [f"{label(r)}\n{r['stages']} stages" for r in rows], fontsize=8)
        ax.set(ylabel="samples/s", title=f"{title}: {data['model']}")
        ax.legend()
        written.append(_save(fig, out / f"{key}.png"))
    if data.get("rows") and not data.get("plan_only"):
        written.append(_features(plt, data, out / "features.png"))
    for path in written:
        print(path)


def _features(plt, data: dict, path: Path) -> Path:
    """bench_features: measured (and predicted) samples/s of every configuration, one group per scenario."""
    rows = [r for r in data["rows"] if "measured_throughput" in r]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(3.2 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        group = [r for r in rows if r["scenario"] == scenario]
        xs = range(len(group))
        bars = ax.bar([x - 0.2 for x in xs], [r["measured_throughput"] for r in group], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r["predicted_throughput"] for r in group], 0.4, label="predicted",
               color="lightgray", edgecolor="gray")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(list(xs), [_short(r["label"]) for r in group], fontsize=7, rotation=30, ha="right")
        ax.set_title(scenario, fontsize=9)
    axes[0][0].set_ylabel("samples/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Issue 13 on the emulated testbed: {data['model']}, microbatch {data['microbatch']}", fontsize=10)
    return _save(fig, path)


def _short(label: str) -> str:
    for long, short in ((" (best plan, no lossy choice)", ""), ("--max-error ", ""), ("(pipeline, fp32)", "fp32"),
                        ("ours + replicas + ", "ours + repl. + ")):
        label = label.replace(long, short)
    return label


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    app()
