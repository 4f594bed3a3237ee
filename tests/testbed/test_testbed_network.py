"""Real namespaces and real TCP: shaping in both directions, isolation, servers inside devices.

The rate checks are functional checks of `tc tbf` (is the device shaped at all, and at about the right
rate?), with a generous band; measuring speed is the benchmarks' job, not these tests'.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from bench_testbed import tcp_throughput_mbps
from testbed_helpers import cluster_toml, emulate, needs_host, testbed

pytestmark = [pytest.mark.root, needs_host]

MBIT = 1_000_000
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as exc:
    print(exc.errno)
"""


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.toml"
    path.write_text(cluster_toml("pytest-net", [
        {"name": "a", "bandwidth": "20 Mbps"},
        {"name": "b", "bandwidth": "10 Mbps"},
        {"name": "free1"},
        {"name": "free2"},
    ]))
    with testbed.Testbed(path, name=f"pytest-net-{uuid.uuid4().hex[:8]}") as bed:
        yield bed


@pytest.mark.parametrize(
    ("src", "dst", "limit_mbps"),
    [
        ("a", "free1", 20),  # a's egress
        ("client", "a", 20),  # a's ingress, shaped on the bridge side of its veth
        ("a", "b", 10),  # a link runs at the smaller end
        ("b", "client", 10),
    ],
)
def test_shaped_rate_is_near_the_limit(bed, src, dst, limit_mbps):
    rate = tcp_throughput_mbps(bed, src, dst, nbytes=limit_mbps * MBIT // 8, port=7100)
    assert 0.5 * limit_mbps <= rate <= 1.3 * limit_mbps, f"{src}->{dst}: {rate:.1f} Mbit/s"


def test_unshaped_devices_are_far_faster_than_the_shaped_ones(bed):
    rate = tcp_throughput_mbps(bed, "free1", "free2", nbytes=8 * 2**20, port=7101)
    assert rate > 5 * 20, f"unshaped: {rate:.1f} Mbit/s"


def test_qdiscs_carry_the_configured_rates(bed):
    a = bed.state.device("a")
    assert emulate.egress_rate_bps(emulate.DEVICE_IF, a.netns) == 20 * MBIT
    assert emulate.egress_rate_bps(a.veth) == 20 * MBIT
    free = bed.state.device("free1")
    assert emulate.egress_rate_bps(emulate.DEVICE_IF, free.netns) is None


def test_device_has_only_the_test_subnet(bed):
    netns = bed.state.device("a").netns
    routes = emulate.routes(netns)
    assert [r["dst"] for r in routes] == [bed.state.subnet]
    assert emulate.ipv4_addresses(netns) == ["127.0.0.1/8", f"{bed.address('a')}/24"]
    assert emulate.run(["ip", "-n", netns, "-6", "addr", "show", "dev", "eth0"]).strip() == ""
    with pytest.raises(emulate.EmulationError, match="Network is unreachable"):
        emulate.run(["ip", "-n", netns, "route", "get", "192.0.2.77"])
    # The root namespace never forwards what a device sends it.
    assert Path(f"/proc/sys/net/ipv4/conf/{bed.state.bridge}/forwarding").read_text().strip() == "0"


def test_device_cannot_reach_the_hosts_own_addresses(bed):
    testbed_net = bed.state.subnet
    host_addresses = [a.split("/")[0] for a in emulate.ipv4_addresses()
                      if not a.startswith("127.") and not a.startswith(testbed_net.rsplit(".", 1)[0] + ".")]
    if not host_addresses:
        pytest.skip("this host has no address outside loopback and the testbed")
    for host_address in host_addresses:
        probe = bed.run_in("a", [sys.executable, "-c", CONNECT, host_address, "22"], stdout=subprocess.PIPE,
                           text=True)
        out, _ = probe.communicate(timeout=30)
        assert out.strip() == str(errno.ENETUNREACH), f"device reached {host_address}: {out}"


def test_server_in_a_device_serves_the_client_and_other_devices(bed, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from a device\n")
    server = bed.run_in("free1", [sys.executable, "-u", "-m", "http.server", "--bind", bed.address("free1"),
                                  "--directory", str(tmp_path), "7102"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "Serving HTTP" in server.stdout.readline()
        url = f"http://{bed.address('free1')}:7102/hello.txt"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == b"hello from a device\n"
        fetch = bed.run_in("free2", [sys.executable, "-c",
                                     f"import urllib.request; print(urllib.request.urlopen({url!r}).read())"],
                           stdout=subprocess.PIPE, text=True)
        assert fetch.communicate(timeout=30)[0].strip() == "b'hello from a device\\n'"
        # From inside the device its own address is local and the client is reachable.
        probe = bed.run_in("free1", [sys.executable, "-c", CONNECT, bed.client_address, "7103"],
                           stdout=subprocess.PIPE, text=True)
        assert probe.communicate(timeout=30)[0].strip() == str(errno.ECONNREFUSED)
    finally:
        server.terminate()
        server.wait(timeout=10)

