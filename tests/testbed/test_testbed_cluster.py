"""The testbed's reading of the cluster file and its naming plan: pure, no root needed."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import tomllib
from edgepipe.planner.cluster import load_cluster as planner_load_cluster
from testbed_helpers import ROOT, cluster_toml, emulate, testbed

TestbedError, load_cluster, parse_cluster = testbed.TestbedError, testbed.load_cluster, testbed.parse_cluster


def spec_of(devices: list[dict], extra: str = "") -> testbed.ClusterSpec:
    return parse_cluster(tomllib.loads(cluster_toml("c1", devices, extra)), "c1.toml")


def test_device_keys_become_limits():
    spec = spec_of([
        {"name": "fast-1", "memory": "1 GiB", "bandwidth": "100 Mbps", "cpu": 0.5, "cpuset": "1",
         "address": "tcp://10.0.0.2:5555"},
        {"name": "slow-1", "memory": 2**29, "bandwidth": 5, "cpu": 2},
        {"name": "free"},
    ])
    assert spec.name == "c1"
    assert spec.devices[0] == testbed.DeviceSpec("fast-1", 0.5, "1", 2**30, 100_000_000)
    # Plain numbers mean bytes and Mbps, as in the planner's reading of the same file.
    assert spec.devices[1] == testbed.DeviceSpec("slow-1", 2.0, None, 2**29, 5_000_000)
    assert spec.devices[2] == testbed.DeviceSpec("free", None, None, None, None)
    assert spec.warnings == ()


def test_the_planners_example_cluster_reads_as_a_testbed():
    spec = load_cluster(ROOT / "planner" / "examples" / "paper-testbed.toml")
    planned = planner_load_cluster(ROOT / "planner" / "examples" / "paper-testbed.toml")
    assert [d.name for d in spec.devices] == [d.name for d in planned.devices]
    for ours, theirs in zip(spec.devices, planned.devices, strict=True):
        assert ours.memory_bytes == theirs.memory_bytes
        assert ours.bandwidth_bps == round(theirs.bandwidth_mbps * 1e6)
        assert ours.cpu is None


def test_what_cannot_be_emulated_is_warned_about():
    spec = spec_of([{"name": "a", "cpus": 2}],
                   extra='\n[[link]]\na = "a"\nb = "a"\nbandwidth = "5 Mbps"\nlatency = "2 ms"\n')
    text = "\n".join(spec.warnings)
    assert "[[device]] 'a': unknown field(s) cpus ignored" in text
    assert "[[link]] entries (bandwidth, latency) are not emulated" in text
    head = tomllib.loads(cluster_toml("c1", [{"name": "a"}]).replace('name = "c1"', 'name = "c1"\n'
                                                                        'client_bandwidth = "1 Gbps"'))
    assert "client_bandwidth is not emulated" in parse_cluster(head, "c1.toml").warnings[0]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ([], "no [[device]] entries"),
        ([{"name": "a"}, {"name": "a"}], "[[device]] 'a': name appears twice"),
        ([{"name": "a/b"}], "[[device]] #1.name: expected 1-64 letters"),
        ([{"name": "a", "cpu": -1}], "[[device]] 'a'.cpu: must be > 0 for the testbed, got -1"),
        ([{"name": "a", "cpu": "half"}], "[[device]] 'a'.cpu: expected a fraction of one core"),
        ([{"name": "a", "memory": "lots"}], "[[device]] 'a'.memory: expected a size like '8 GiB'"),
        ([{"name": "a", "bandwidth": 0}], "[[device]] 'a'.bandwidth: must be > 0 for the testbed, got 0"),
        ([{"name": "a", "bandwidth": "fast"}], "[[device]] 'a'.bandwidth: expected a rate like '1 Gbps'"),
        ([{"name": "a", "cpuset": "1-0"}], "[[device]] 'a'.cpuset: bad cpu list '1-0'"),
        ([{"name": "a", "cpuset": 1.5}], "[[device]] 'a'.cpuset: expected a cpu list"),
    ],
)
def test_bad_cluster_files_get_one_clear_error(devices, message):
    with pytest.raises(TestbedError) as info:
        spec_of(devices)
    assert message in str(info.value)
    assert str(info.value).startswith("c1.toml: ")


def test_load_cluster_names_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(TestbedError, match=re.escape("missing.toml: cannot read cluster file")):
        load_cluster(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[cluster\n")
    with pytest.raises(TestbedError, match=re.escape("broken.toml: not valid TOML")):
        load_cluster(broken)


def test_plan_state_names_fit_the_kernel_limits():
    spec = spec_of([{"name": f"device-with-a-long-name-{i}"} for i in range(200)])
    state = testbed.plan_state(spec, "c1", "a1b2c3", ipaddress.IPv4Network("10.213.7.0/24"), (123, 456))
    assert state.client_address == "10.213.7.1"
    assert state.bridge == "ep-a1b2c3-br"
    assert [d.address for d in state.devices[:2]] == ["10.213.7.10", "10.213.7.11"]
    assert state.devices[-1].address == "10.213.7.209"
    assert state.devices[0].netns == "ep-a1b2c3-device-with-a-long-name-0"
    # Interface names are limited to 15 bytes by the kernel.
    assert max(len(d.veth) for d in state.devices) <= 15
    assert len({d.veth for d in state.devices}) == 200
    assert all(testbed.RESOURCE_PATTERN.match(n) for d in state.devices for n in (d.netns, d.veth, d.cgroup))


def test_state_round_trips_through_json():
    spec = spec_of([{"name": "a", "cpu": 0.5, "memory": "64 MiB", "bandwidth": 20}])
    state = testbed.plan_state(spec, "c1", "abcdef", ipaddress.IPv4Network("10.213.0.0/24"), None)
    assert testbed.TestbedState.from_json(state.to_json()) == state
    with pytest.raises(TestbedError, match=re.escape("not a edgepipe.testbed-state v1 file")):
        testbed.TestbedState.from_json('{"format": "other"}', "x.json")
    with pytest.raises(TestbedError, match=re.escape("x.json: corrupt testbed state")):
        testbed.TestbedState.from_json("{nope", "x.json")
    with pytest.raises(TestbedError, match=re.escape("has no device 'b' (devices: a)")):
        state.device("b")


def test_free_subnet_skips_every_taken_network():
    assert testbed.free_subnet([]) == ipaddress.IPv4Network("10.213.0.0/24")
    taken = ["10.213.0.0/24", "10.213.1.5/32", "192.0.2.2/24"]
    assert testbed.free_subnet(taken) == ipaddress.IPv4Network("10.213.2.0/24")
    with pytest.raises(TestbedError, match="no free /24"):
        testbed.free_subnet(["10.0.0.0/8"])


def test_tbf_bucket_holds_a_gso_packet_and_ten_milliseconds():
    assert emulate.tbf_args(20_000_000)[:4] == ["tbf", "rate", "20000000bit", "burst"]
    assert int(emulate.tbf_args(20_000_000)[4]) == 64 * 1024
    assert int(emulate.tbf_args(1_000_000_000)[4]) == 1_250_000
    with pytest.raises(emulate.EmulationError, match="must be positive"):
        emulate.tbf_args(0)


def test_cpu_lists_parse_like_the_kernel():
    assert emulate.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert emulate.parse_cpu_list("1") == {1}
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(emulate.EmulationError, match="bad cpu list"):
            emulate.parse_cpu_list(bad)


def test_confined_command_keeps_its_arguments_verbatim():
    argv = emulate.confine_argv("ep-abcdef-a", [Path("/sys/fs/cgroup/cpu/x/cgroup.procs")],
                                ["python", "-c", "print('$HOME \"--\"')", "--"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["ep-run", "ep-abcdef-a", "/sys/fs/cgroup/cpu/x/cgroup.procs", "--",
                        "python", "-c", "print('$HOME \"--\"')", "--"]
