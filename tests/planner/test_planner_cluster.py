"""Cluster TOML files: units, the shipped examples, and errors that name file, entry and field."""

from __future__ import annotations

import textwrap

import pytest
from edgepipe.planner.cluster import ClusterError, load_cluster, problem_for
from edgepipe.planner.problem import int8_segment_seconds, segment_seconds
from edgepipe.planner.units import format_bytes, format_seconds, parse_bytes, parse_mbps, parse_seconds
from planner_testlib import EXAMPLES, vit_like


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (parse_bytes, "8 GiB", 8 * 2**30), (parse_bytes, "2 GB", 2 * 10**9), (parse_bytes, "512MiB", 512 * 2**20),
        (parse_bytes, 1024, 1024), (parse_bytes, "1.5 kib", 1536),
        (parse_mbps, "1 Gbps", 1000.0), (parse_mbps, "5 Mbps", 5.0), (parse_mbps, "250 kbit/s", 0.25),
        (parse_mbps, 100, 100.0),
        (parse_seconds, "2 ms", 0.002), (parse_seconds, "0.5 s", 0.5), (parse_seconds, "250 us", 0.00025),
        (parse_seconds, 3, 3.0),
    ],
)
def test_units(parse, text, value) -> None:
    assert parse(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["8 GB/s", "lots", "-1 GiB", True, "1e400 B"])
def test_bad_units(text) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes(text)


def test_formatting() -> None:
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(100) == "100 B"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(2.5) == "2.50 s"


def test_paper_testbed_example() -> None:
    cluster = load_cluster(EXAMPLES / "paper-testbed.toml")
    assert len(cluster.devices) == 16
    assert {t.name for t in cluster.device_types} == {"rcc-ve", "minnow", "rcc-ve-50", "rcc-ve-25"}
    assert {d.bandwidth_mbps for d in cluster.devices} == {1000.0}
    assert {d.memory_bytes for d in cluster.devices if d.type == "minnow"} == {2 * 2**30}
    problem = problem_for(cluster, vit_like(), 8)
    fast = segment_seconds(problem, "rcc-ve", 8)
    assert segment_seconds(problem, "rcc-ve-25", 8) == pytest.approx(fast * 4)
    assert problem.client_bandwidth_mbps == 1000.0
    assert all(d.address.startswith("tcp://") for d in problem.devices)


def test_throttled_testbed_matches_the_paper_testbed_but_for_links() -> None:
    fast, slow = load_cluster(EXAMPLES / "paper-testbed.toml"), load_cluster(EXAMPLES / "paper-testbed-5mbps.toml")
    assert [d.name for d in slow.devices] == [d.name for d in fast.devices]
    assert {d.bandwidth_mbps for d in slow.devices} == {5.0}
    assert [(d.type, d.memory_bytes) for d in slow.devices] == [(d.type, d.memory_bytes) for d in fast.devices]


def test_home_lab_example_links() -> None:
    cluster = load_cluster(EXAMPLES / "home-lab.toml")
    pair = next(k for k in cluster.links if {k.a, k.b} == {"pi-b", "laptop"})
    assert pair.bandwidth_mbps == 60.0 and pair.latency_s == pytest.approx(0.004)
    problem_for(cluster, vit_like(), None)  # valid with the planner choosing the microbatch


def _write(tmp_path, body: str):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    [cluster]
    name = "t"
    [[type]]
    name = "board"
    gflops = 5
    [[device]]
    name = "b1"
    type = "board"
    memory = "2 GiB"
    bandwidth = "1 Gbps"
    """


DEVICE = '[[device]]\nname = "b2"\ntype = "board"\nmemory = 1\nbandwidth = 10\n'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (DEVICE.replace('"board"', '"boar"'), r"\[\[device\]\] 'b2'.type: no \[\[type\]\] 'boar' \(known: 'board'\)"),
        (DEVICE.replace("memory = 1", 'memory = "lots"'), r"\[\[device\]\] 'b2'.memory: expected a size like"),
        (DEVICE.replace("memory = 1\n", ""), r"\[\[device\]\] 'b2'.memory: missing"),
        (DEVICE.replace('"b2"', '"b1"'), r"\[\[device\]\] 'b1': defined twice"),
        (DEVICE + 'colour = "red"\n', r"\[\[device\]\] #2: unknown field 'colour'"),
        ('[[link]]\na = "b1"\nb = "b9"\nbandwidth = "1 Mbps"\n',
         r"\[\[link\]\] #1 \('b1' - 'b9'\): no \[\[device\]\] named 'b9'"),
        ('[[link]]\na = "b1"\nb = "b1"\nbandwidth = "1 Mbps"\n',
         r"\[\[link\]\] #1 .*: a link joins two different devices"),
        ('[[type]]\nname = "slow"\nreference = "nope"\nspeed = 0.5\n',
         r"\[\[type\]\] 'slow'.reference: no \[\[type\]\] named 'nope'"),
        ('[[type]]\nname = "slow"\nspeed = 0.5\ngflops = 1\n',
         r"\[\[type\]\] 'slow'.speed: is relative to a reference"),
        ('[[type]]\nname = "prof"\nprofile = "p.json"\n',
         r"\[\[type\]\] 'prof'.profile: measured profiles are not named in the cluster file; edgepipe-compile"),
        ('[[type]]\nname = "empty"\n', r"\[\[type\]\] 'empty': needs gflops, or reference \+ speed"),
        ('[[type]]\nname = "neg"\ngflops = -2\n', r"\[\[type\]\] 'neg'.gflops: expected a positive number"),
    ],
)
def test_bad_cluster_names_file_entry_and_field(tmp_path, extra, message) -> None:
    path = _write(tmp_path, GOOD + "\n" + extra)
    with pytest.raises(ClusterError, match=rf"^{path}: {message}"):
        load_cluster(path)


def test_cluster_file_errors(tmp_path) -> None:
    with pytest.raises(ClusterError, match="cannot read cluster file"):
        load_cluster(tmp_path / "nope.toml")
    with pytest.raises(ClusterError, match="not valid TOML"):
        load_cluster(_write(tmp_path, "[cluster\nname = 1"))
    with pytest.raises(ClusterError, match=r"\[cluster\]: unknown field 'nmae'"):
        load_cluster(_write(tmp_path, '[cluster]\nnmae = "x"\n'))
    with pytest.raises(ClusterError, match=r"no \[\[device\]\] entries"):
        load_cluster(_write(tmp_path, '[[type]]\nname = "x"\ngflops = 1\n'))


def test_cluster_settings_reach_the_problem(tmp_path) -> None:
    settings = 'runtime_overhead = "64 MiB"\nqueue_depth = 3\nclient_bandwidth = "100 Mbps"'
    body = GOOD.replace('name = "t"', f'name = "t"\n{settings}')
    cluster = load_cluster(_write(tmp_path, body))
    problem = problem_for(cluster, vit_like(), 4)
    assert problem.runtime_overhead_bytes == 64 * 2**20
    assert (problem.queue_depth, problem.client_bandwidth_mbps) == (3, 100.0)
    assert problem.microbatch == 4


def test_problem_for_reports_model_mismatch_with_the_cluster_file(tmp_path) -> None:
    cluster = load_cluster(_write(tmp_path, GOOD))
    flopless = vit_like()
    flopless = type(flopless)(flopless.model_id, flopless.model_sha256, flopless.input_bytes,
                              tuple(type(s)(s.name, s.weight_bytes, s.activation_bytes, s.out_bytes, 0.0)
                                    for s in flopless.segments))
    with pytest.raises(ClusterError, match=r"c.toml: model.segments: every flops figure is 0 but device type 'board'"):
        problem_for(cluster, flopless, 8)


def test_fast_and_slow_example_and_int8_speed(tmp_path) -> None:
    cluster = load_cluster(EXAMPLES / "fast-and-slow.toml")
    assert [d.type for d in cluster.devices] == ["fast", "slow", "slow", "slow"]
    problem = problem_for(cluster, vit_like(), 8)
    assert segment_seconds(problem, "slow", 8) == pytest.approx(segment_seconds(problem, "fast", 8) * 4)
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent("""
        [[type]]
        name = "board"
        gflops = 10.0
        int8_gflops = 15.0
        [[type]]
        name = "half"
        reference = "board"
        speed = 0.5
        [[device]]
        name = "b1"
        type = "half"
        memory = "1 GiB"
        bandwidth = "1 Gbps"
    """))
    problem = problem_for(load_cluster(path), vit_like(), 8)
    assert int8_segment_seconds(problem, "board", 8) == pytest.approx(segment_seconds(problem, "board", 8) / 1.5)
    assert int8_segment_seconds(problem, "half", 8) == pytest.approx(segment_seconds(problem, "board", 8) / 1.5 * 2)


def test_console_for_output_is_wide_when_piped(monkeypatch) -> None:
    from edgepipe.planner.console import PIPED_WIDTH, console_for_output

    monkeypatch.delenv("COLUMNS", raising=False)
    assert console_for_output().width == PIPED_WIDTH  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert console_for_output().width == 100
