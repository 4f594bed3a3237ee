"""How faithfully the testbed emulates what a cluster file says: TCP throughput against the configured
bandwidth (device to device, through both devices' tbf), and CPU share of a busy loop against `cpu`.

    sudo .venv/bin/python tools/bench_testbed.py --json build/bench-testbed.json

Every rate and share is measured on one testbed in one run; the table gives medians of --repeats and
the ratio to what was configured. Needs root (network namespaces and cgroups).
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
from typing import Any

import emulate
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from testbed import ClusterSpec, DeviceSpec, Testbed, TestbedError

RECEIVER = r"""
import json, socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
total, first = 0, None
while chunk := conn.recv(1 << 20):
    first = first or time.perf_counter()
    total += len(chunk)
print(json.dumps({"bytes": total, "seconds": time.perf_counter() - first}), flush=True)
"""
SENDER = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
left, block = int(sys.argv[3]), memoryview(b"x" * 65536)
while left:
    conn.sendall(block[:left])
    left -= min(left, len(block))
conn.close()
"""
BUSY = "print('busy', flush=True)\nwhile True: pass\n"
MBIT = 1_000_000


def _start(bed: Testbed, where: str, argv: list[str]) -> subprocess.Popen:
    """`argv` in a device, or in the root namespace (the client) for where == "client"."""
    kwargs: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True}
    return subprocess.Popen(argv, **kwargs) if where == "client" else bed.run_in(where, argv, **kwargs)


def _address(bed: Testbed, where: str) -> str:
    return bed.client_address if where == "client" else bed.address(where)


def tcp_throughput_mbps(bed: Testbed, src: str, dst: str, nbytes: int, port: int) -> float:
    """Mbit/s of one TCP stream of `nbytes` from `src` to `dst` ("client" = the root namespace),
    timed by the receiver from its first byte to the sender's close."""
    receiver = _start(bed, dst, [sys.executable, "-c", RECEIVER, _address(bed, dst), str(port)])
    try:
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError(f"receiver in {dst} did not start")
        sender = _start(bed, src, [sys.executable, "-c", SENDER, _address(bed, dst), str(port), str(nbytes)])
        if sender.wait(timeout=300) != 0:
            raise RuntimeError(f"sender in {src} failed with exit code {sender.returncode}")
        result = json.loads(receiver.stdout.readline())
        receiver.wait(timeout=30)
    finally:
        receiver.kill()
        receiver.wait()
    if result["bytes"] != nbytes:
        raise RuntimeError(f"{src} -> {dst}: sent {nbytes} bytes, received {result['bytes']}")
    return result["bytes"] * 8 / result["seconds"] / MBIT


def cpu_share(bed: Testbed, device: str, seconds: float = 1.0) -> float:
    """Cores used by a busy loop in `device` over `seconds`, from the device's cpuacct counter."""
    busy = bed.run_in(device, [sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        if busy.stdout.readline().strip() != "busy":
            raise RuntimeError(f"busy loop in {device} did not start")
        cpu0, wall0 = bed.cpu_time_ns(device), time.monotonic()
        time.sleep(seconds)
        return (bed.cpu_time_ns(device) - cpu0) / 1e9 / (time.monotonic() - wall0)
    finally:
        busy.kill()
        busy.wait()


def bench_cluster(rates_mbps: list[float], shares: list[float]) -> ClusterSpec:
    devices = [DeviceSpec(f"{side}-{rate:g}", None, None, None, round(rate * MBIT))
               for rate in rates_mbps for side in ("tx", "rx")]
    devices += [DeviceSpec("tx-free", None, None, None, None), DeviceSpec("rx-free", None, None, None, None)]
    devices += [DeviceSpec(f"cpu-{share:g}", share, None, None, None) for share in shares]
    return ClusterSpec("bench-testbed", "bench_testbed.py", tuple(devices), ())


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def run_bench(rates_mbps: list[float], shares: list[float], repeats: int, seconds: float,
              unshaped_bytes: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    work = len(rates_mbps) + 1 + len(shares)
    with Testbed(bench_cluster(rates_mbps, shares), name=f"bench-testbed-{os.getpid()}") as bed, \
            Progress(transient=True) as progress:
        task = progress.add_task("measuring", total=work * repeats)
        for rate in rates_mbps:
            nbytes = max(1 << 20, round(rate * MBIT / 8 * seconds))
            got = []
            for _ in range(repeats):
                got.append(tcp_throughput_mbps(bed, f"tx-{rate:g}", f"rx-{rate:g}", nbytes, 7300))
                progress.advance(task)
            rows.append({"what": "tcp Mbit/s", "configured": rate, "median": statistics.median(got),
                         "min": min(got), "max": max(got), "samples": got})
        got = []
        for _ in range(repeats):
            got.append(tcp_throughput_mbps(bed, "tx-free", "rx-free", unshaped_bytes, 7301))
            progress.advance(task)
        rows.append({"what": "tcp Mbit/s", "configured": None, "median": statistics.median(got),
                     "min": min(got), "max": max(got), "samples": got})
        for share in shares:
            got = []
            for _ in range(repeats):
                got.append(cpu_share(bed, f"cpu-{share:g}", seconds))
                progress.advance(task)
            rows.append({"what": "cpu cores", "configured": share, "median": statistics.median(got),
                         "min": min(got), "max": max(got), "samples": got})
    for row in rows:
        row["ratio"] = None if row["configured"] is None else row["median"] / row["configured"]
    # Other work on the machine competes with the devices' CPU shares: say how much there was.
    load = {"before": load_before, "after": os.getloadavg()[0]}
    return {"machine": machine(), "command": " ".join([sys.executable, *sys.argv]), "repeats": repeats,
            "seconds_per_sample": seconds, "load_average_1min": load, "rows": rows}


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise typer.BadParameter(f"expected numbers > 0, got {text!r}")
    return values


def main(rates: str = typer.Option("1000,100,20,5", help="Bandwidths to check, Mbit/s, comma-separated."),
         cpu: str = typer.Option("0.25,0.5,1", help="CPU shares to check, cores, comma-separated."),
         repeats: int = typer.Option(3, min=1, help="Samples per row; the table shows their median."),
         seconds: float = typer.Option(2.0, min=0.2, help="Length of each sample at the configured rate."),
         unshaped_mb: int = typer.Option(256, min=1, help="MiB sent per unshaped sample."),
         json_out: Path = typer.Option(None, "--json", help="Also write the results here as JSON.")) -> None:
    """Measure the testbed's shaping and CPU quota against what was configured.

    \b
    Example: sudo .venv/bin/python tools/bench_testbed.py --repeats 3 --json build/bench-testbed.json
    """
    console = Console()
    problem = emulate.host_problem()
    if problem is not None:
        Console(stderr=True).print(f"error: {problem}", markup=False, highlight=False)
        raise typer.Exit(2)
    try:
        result = run_bench(_floats(rates), _floats(cpu), repeats, seconds, unshaped_mb << 20)
    except (TestbedError, emulate.EmulationError, RuntimeError) as exc:
        Console(stderr=True).print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    m = result["machine"]
    load = result["load_average_1min"]
    table = Table(title=f"testbed fidelity: {m['cpu_model']}, {m['cpus']} cpus, kernel {m['kernel']}, "
                        f"median of {repeats}, load average {load['before']:.1f} -> {load['after']:.1f}")
    for column in ("measured", "configured", "median", "min", "max", "median / configured"):
        table.add_column(column, justify="left" if column == "measured" else "right")
    for row in result["rows"]:
        table.add_row(row["what"], "unshaped" if row["configured"] is None else f"{row['configured']:g}",
                      f"{row['median']:.3g}", f"{row['min']:.3g}", f"{row['max']:.3g}",
                      "-" if row["ratio"] is None else f"{row['ratio']:.3f}")
    console.print(table)
    console.print(f"command: {result['command']}", markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
