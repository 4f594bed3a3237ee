"""Draw a run's trace (``edgepipe-submit --trace FILE``) as a PNG timeline.

One row per stage (and one for the client, on top); time runs left to right. In a stage's row the
tall bar is ONNX Runtime computing a microbatch (labelled with its number, one colour per
microbatch, so a microbatch can be followed down the pipeline); the three thin bands under it are
when microbatches were arriving (receive), queued before compute (wait) and waiting for the
sender thread (send). The client's row shows each request in flight, from submit to result.

    .venv/bin/python tools/plot_trace.py run.json -o docs/img/trace.png --title "ViT-B, 4 stages"
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer

BANDS = {"receive": (0.04, 0.12), "wait": (0.16, 0.12), "send": (0.30, 0.12)}  # y offset, height in a row
COMPUTE = (0.46, 0.5)
BAND_COLOURS = {"receive": "#7f7f7f", "wait": "#f2b134", "send": "#4c9be8"}


class PlotError(ValueError):
    """The file is not a trace this tool can draw."""


def read_trace(path: Path) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """(pid -> track name, complete and instant events) of a Chrome trace-event JSON file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlotError(f"{path}: cannot read: {exc}") from None
    events = raw.get("traceEvents") if isinstance(raw, dict) else raw
    if not isinstance(events, list):
        raise PlotError(f"{path}: no traceEvents")
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    drawn = [e for e in events if e.get("ph") in ("X", "i")]
    if not drawn:
        raise PlotError(f"{path}: the trace has no events to draw")
    return names, drawn


def plot(path: Path, out: Path, title: str | None = None, width: float = 14.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names, events = read_trace(path)
    pids = sorted(names) or sorted({e["pid"] for e in events})
    row = {pid: len(pids) - 1 - i for i, pid in enumerate(pids)}  # client (pid 0) on top
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(width, 0.9 * len(pids) + 1.4))
    lanes: dict[tuple[int, str], int] = defaultdict(int)
    for e in sorted(events, key=lambda e: e["ts"]):
        pid, kind = e["pid"], e.get("name", "")
        start = e["ts"] / 1e6
        mb = e.get("args", {}).get("microbatch", 0)
        colour = palette(mb % 10)
        y = row[pid]
        if e["ph"] == "i":
            marker = "v" if kind == "submit" else "^"
            ax.plot([start], [y + (0.9 if kind == "submit" else 0.1)], marker=marker, color=colour, markersize=5)
            continue
        dur = e["dur"] / 1e6
        if kind == "compute":
            ax.broken_barh([(start, dur)], (y + COMPUTE[0], COMPUTE[1]), facecolors=colour, edgecolor="black",
                           linewidth=0.4)
            if dur > 0:
                ax.text(start + dur / 2, y + COMPUTE[0] + COMPUTE[1] / 2, str(mb), ha="center", va="center",
                        fontsize=7, color="white", clip_on=True)
        elif kind in BANDS:
            offset, height = BANDS[kind]
            ax.broken_barh([(start, dur)], (y + offset, height), facecolors=BAND_COLOURS[kind], alpha=0.45)
        elif kind == "in flight":
            lane = e["tid"] % 10
            lanes[(pid, kind)] = max(lanes[(pid, kind)], lane + 1)
            ax.broken_barh([(start, dur)], (y + 0.2 + 0.6 * lane / 8, 0.05), facecolors=colour)
    ax.set_yticks([row[p] + 0.5 for p in pids])
    ax.set_yticklabels([names.get(p, f"track {p}") for p in pids])
    ax.set_ylim(0, len(pids))
    ax.set_xlabel("time since the first submit (s)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(facecolor=palette(0), edgecolor="black", label="compute (number = microbatch)")]
    handles += [Patch(facecolor=c, alpha=0.45, label=k) for k, c in BAND_COLOURS.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    ax.set_title(title or Path(path).name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(trace: Path = typer.Argument(..., help="A trace written by edgepipe-submit --trace."),
         out: Path = typer.Option(Path("trace.png"), "--out", "-o", help="PNG to write."),
         title: str | None = typer.Option(None, "--title", help="Title above the plot [the file name]."),
         width: float = typer.Option(14.0, "--width", min=4, help="Figure width in inches.")) -> None:
    """Draw a run's trace as a timeline PNG: one row per stage, one for the client.

    Example: .venv/bin/python tools/plot_trace.py run.json -o docs/img/trace.png --title "ViT-B, 4 stages"
    """
    try:
        written = plot(trace, out, title, width)
    except PlotError as exc:
        typer.echo(f"plot_trace: error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {written}")


if __name__ == "__main__":
    typer.run(main)
