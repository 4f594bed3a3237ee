"""Messages over the testbed's shaped links: what a hop really carries, against bytes / bandwidth.

A sender device streams messages of a given size to a receiver device over one TCP connection,
keeping at most `--window` messages unacknowledged (the runtime's credit: `serve --credit`, 4 by
default), the receiver acknowledging each message once it has all of it. Each configuration runs
side by side in one testbed: the sender's link rate and the receiver's are set separately (the
testbed shapes each device's egress and ingress to its `bandwidth`). Reported per configuration:
messages/s and Mbps, the cost model's prediction (message bytes / the slower link), and what the
kernel saw: packets the tbf qdiscs dropped and TCP retransmission timeouts in the sender.

    flock /work/notes/bench.lock .venv/bin/python tools/bench_links.py --json build/bench-links.json

Needs root (namespaces, tc). Plain sockets, no EdgePipe code: this measures the emulated network.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

sys.path.insert(0, str(Path(__file__).parent))
from edgepipe.planner.console import console_for_output
from edgepipe.planner.units import parse_mbps
from rich.table import Table
from testbed import Testbed

PORT = 5700
RECEIVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
size = int(sys.argv[2])
while True:
    got = 0
    while got < size:
        chunk = conn.recv(min(1 << 20, size - got))
        if not chunk:
            sys.exit(0)
        got += len(chunk)
    conn.sendall(b"a")
"""
SENDER = r"""
import json, socket, sys, time
host, port, size, count, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sock = socket.create_connection((host, port)); sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
payload = b"x" * size
sent = acked = 0
start = time.perf_counter()
while acked < count:
    while sent < count and sent - acked < window:
        sock.sendall(payload); sent += 1
    acked += len(sock.recv(window))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _netstat(bed: Testbed, device: str) -> dict[str, int]:
    """TCP counters of a device's namespace (/proc/net/netstat and /proc/net/snmp, Tcp lines)."""
    out = subprocess.run(["ip", "netns", "exec", bed.state.device(device).netns, "cat", "/proc/net/netstat",
                          "/proc/net/snmp"], check=True, capture_output=True, text=True).stdout.splitlines()
    counters: dict[str, int] = {}
    for names, values in zip(out[::2], out[1::2], strict=False):
        if names.split(":")[0] in ("TcpExt", "Tcp"):
            counters.update({k: int(v) for k, v in zip(names.split()[1:], values.split()[1:], strict=False)
                             if v.lstrip("-").isdigit()})
    return counters


def _drops(bed: Testbed) -> int:
    """Packets dropped by every tbf of the testbed (devices' egress and the bridge side's)."""
    total = 0
    for device in bed.state.devices:
        for netns, dev in ((device.netns, "eth0"), (None, device.veth)):
            cmd = ["tc", "-s", "-j", "qdisc", "show", "dev", dev]
            if netns is not None:
                cmd = ["ip", "netns", "exec", netns, *cmd]
            for q in json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout or "[]"):
                if q.get("kind") == "tbf":
                    total += int(q.get("drops", 0))
    return total


def run_case(sender_rate: str, receiver_rate: str, size: int, count: int, window: int) -> dict[str, Any]:
    toml = (f'[cluster]\nname = "links{os.getpid() % 1000}"\n[[type]]\nname = "b"\ngflops = 1.0\n'
            f'[[device]]\nname = "src"\ntype = "b"\nmemory = "1 GiB"\nbandwidth = "{sender_rate}"\n'
            f'[[device]]\nname = "dst"\ntype = "b"\nmemory = "1 GiB"\nbandwidth = "{receiver_rate}"\n')
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "links.toml"
        path.write_text(toml)
        with Testbed(path) as bed:
            receiver = bed.run_in("dst", [sys.executable, "-c", RECEIVER, str(PORT), str(size)],
                                  stdout=subprocess.PIPE, text=True)
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            before, drops = _netstat(bed, "src"), _drops(bed)
            sender = bed.run_in("src", [sys.executable, "-c", SENDER, bed.address("dst"), str(PORT), str(size),
                                        str(count), str(window)], stdout=subprocess.PIPE, text=True)
            out, _ = sender.communicate(timeout=600)
            after, drops = _netstat(bed, "src"), _drops(bed) - drops
            receiver.wait(timeout=10)
    seconds = json.loads(out)["seconds"]
    rate = min(parse_mbps(sender_rate), parse_mbps(receiver_rate))
    predicted = rate * 1e6 / 8 / size
    return {"sender": sender_rate, "receiver": receiver_rate, "message_bytes": size, "window": window,
            "messages": count, "seconds": seconds, "msgs_per_s": count / seconds,
            "mbps": count * size * 8 / seconds / 1e6, "predicted_msgs_per_s": predicted,
            "measured_vs_predicted": count / seconds / predicted, "tbf_drops": drops,
            "tcp_timeouts": after.get("TCPTimeouts", 0) - before.get("TCPTimeouts", 0),
            "retransmitted_segments": after.get("RetransSegs", 0) - before.get("RetransSegs", 0)}


def main(
    sizes: str = typer.Option("38600,154000", help="Message sizes in bytes, comma-separated (default: a "
                                                   "vit_tiny activation per sample in int8, and in fp32)."),
    slow: str = typer.Option("5 Mbps", help="The slow link."),
    fast: str = typer.Option("1 Gbps", help="The fast link."),
    window: int = typer.Option(4, help="Messages unacknowledged at most (the runtime's default credit)."),
    seconds: float = typer.Option(8.0, help="Rough duration of each configuration at its predicted rate."),
    repeats: int = typer.Option(1, help="Runs of each configuration (medians reported)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results here."),
) -> None:
    """Message throughput over shaped testbed links: fast -> slow, slow -> slow, slow -> fast."""
    console = console_for_output()
    pairs = [(fast, slow), (slow, slow), (slow, fast)]
    rows = []
    for size in (int(s) for s in sizes.split(",")):
        for src, dst in pairs:
            count = max(8, int(seconds * min(parse_mbps(src), parse_mbps(dst)) * 1e6 / 8 / size))
            runs = [run_case(src, dst, size, count, window) for _ in range(repeats)]
            best = sorted(runs, key=lambda r: r["msgs_per_s"])[len(runs) // 2]
            best["msgs_per_s_runs"] = [r["msgs_per_s"] for r in runs]
            rows.append(best)
            console.print(f"{src} -> {dst}, {size} B: {best['msgs_per_s']:.2f} msgs/s "
                          f"(predicted {best['predicted_msgs_per_s']:.2f}), drops {best['tbf_drops']}, "
                          f"timeouts {best['tcp_timeouts']}")
    table = Table(title=f"Messages over shaped links, window {window} (median of {repeats})")
    for col in ("sender link", "receiver link", "message", "msgs/s", "predicted", "measured ÷ predicted",
                "tbf drops", "TCP timeouts", "retransmitted segments"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["sender"], r["receiver"], f"{r['message_bytes']} B", f"{r['msgs_per_s']:.2f}",
                      f"{r['predicted_msgs_per_s']:.2f}", f"{r['measured_vs_predicted']:.2f}", str(r["tbf_drops"]),
                      str(r["tcp_timeouts"]), str(r["retransmitted_segments"]))
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps({"command": " ".join(sys.argv), "load_average": os.getloadavg(),
                                        "median_of": repeats, "rows": rows,
                                        "spread": {f"{r['sender']}->{r['receiver']}/{r['message_bytes']}":
                                                   statistics.pstdev(r["msgs_per_s_runs"]) for r in rows}},
                                       indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
