"""The control daemon (`edgepipe-agent control`, alias of `daemon`) as a real process on loopback,
secure by default: status, profile over the wire, refusals that leave it answering, and link probes
between two daemons that authenticate each other."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq
from edgepipe.agent.control_client import (
    bundle_files,
    control_request,
    request_probe,
    request_profile,
    request_status,
)
from edgepipe.agent.formats.control import CONTROL_VERSION, ControlError
from edgepipe.agent.formats.keys import new_keypair
from edgepipe.agent.formats.profiles import load_profile_bundle
from edgepipe.agent.transport import INSECURE
from profiling_testlib import DAEMON_KEYS, auth, dead_endpoint


def raw_request(endpoint: str, frames: list[bytes], timeout_s: float = 10.0) -> dict:
    """Send frames exactly as given (after the routing envelope), authenticated as the tests'
    workstation, and decode the reply header."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    a = auth(endpoint)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = a.keypair.secret, a.keypair.public, a.server_key
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), "no reply"
        return msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
    finally:
        sock.close()
        ctx.term()


def test_status_names_device_and_runtime(daemons: dict[str, str]) -> None:
    import onnxruntime as ort

    status = request_status(daemons["d0"], auth=auth(daemons["d0"]))
    assert status["ok"] is True and status["device"] == "d0" and status["secure"] is True
    assert status["ort_version"] == ort.__version__
    assert status["cores"] >= 1 and status["host"]["cores"] == status["cores"]
    assert status["edgepipe_version"] and status["max_request_bytes"] > 0


def test_profile_over_the_wire(daemons: dict[str, str], profile_bundle_dir: Path) -> None:
    profile = request_profile(daemons["d1"], profile_bundle_dir, "d1", microbatches=(2,), repeats=1, warmup=0,
                              auth=auth(daemons["d1"]))
    bundle = load_profile_bundle(profile_bundle_dir)
    assert profile.device == "d1" and profile.model_sha256 == bundle.model_sha256
    assert profile.segment_names == bundle.segment_names
    assert list(profile.seconds) == [2] and all(t > 0 for t in profile.seconds[2])
    assert profile.repeats == 1 and profile.warmup == 0 and profile.threads == 1


def test_corrupted_piece_is_refused_and_daemon_still_answers(daemons: dict[str, str], profile_bundle_dir: Path,
                                                             tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(profile_bundle_dir, broken)
    data = max(broken.glob("piece-*/*.data"), key=lambda p: p.stat().st_size)  # a piece with weights
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the request's own sha256 will match; the bundle manifest's will not
    data.write_bytes(bytes(raw))
    with pytest.raises(ControlError, match=rf"profiling bundle refused: .*{data.parent.name}"):
        request_profile(daemons["d0"], broken, "d0", microbatches=(1,), repeats=1, warmup=0, auth=auth(daemons["d0"]))
    assert request_status(daemons["d0"], auth=auth(daemons["d0"]))["device"] == "d0"


def test_transfer_damage_is_caught_by_the_request_hashes(daemons: dict[str, str], profile_bundle_dir: Path) -> None:
    entries, frames = bundle_files(profile_bundle_dir)
    frames[0] = frames[0] + b" "
    with pytest.raises(ControlError, match="sha256 does not match"):
        control_request(daemons["d0"], {"cmd": "profile", "files": entries, "microbatches": [1]}, frames,
                        auth=auth(daemons["d0"]))
    assert request_status(daemons["d0"], auth=auth(daemons["d0"]))["ok"]


def test_oversize_request_gets_a_clear_error(start_control: Callable[..., str]) -> None:
    endpoint = start_control("small", "--max-request-mb", "0.5")
    chunk = b"\0" * 200_000  # three frames, each under the limit, together over it
    entries = [{"path": f"f{i}", "sha256": hashlib.sha256(chunk).hexdigest()} for i in range(3)]
    with pytest.raises(ControlError, match="over this device's limit of 524288 bytes"):
        control_request(endpoint, {"cmd": "profile", "files": entries, "microbatches": [1]}, [chunk] * 3,
                        auth=auth(endpoint))
    assert request_status(endpoint, auth=auth(endpoint))["device"] == "small"


@pytest.mark.parametrize(("frames", "message"), [
    ([b"", b"\xc1not msgpack"], "header is not msgpack"),
    ([b"", msgpack.packb([1, 2])], "must be a msgpack map"),
    ([b"", msgpack.packb({"v": 99, "cmd": "status"})], "version 99 is not supported"),
    ([b"", msgpack.packb({"v": CONTROL_VERSION, "cmd": "reboot"})], "unknown command 'reboot'"),
    ([msgpack.packb({"v": CONTROL_VERSION, "cmd": "status"})], "expected an empty delimiter"),
    ([b"", msgpack.packb({"v": CONTROL_VERSION, "cmd": "profile", "files": [{"path": "../x", "sha256": ""}],
                          "microbatches": [1]}), b"x"], "must be relative and stay inside"),
    ([b"", msgpack.packb({"v": CONTROL_VERSION, "cmd": "profile", "files": [], "microbatches": [0]})],
     "'microbatches' must be an integer in 1..1024"),
    ([b"", msgpack.packb({"v": CONTROL_VERSION, "cmd": "probe", "peer": "ipc:///tmp/x"})], "tcp:// control"),
])
def test_malformed_requests_get_error_replies(daemons: dict[str, str], frames: list[bytes], message: str) -> None:
    reply = raw_request(daemons["d0"], frames)
    assert reply["ok"] is False and message in reply["error"]
    assert request_status(daemons["d0"], auth=auth(daemons["d0"]))["ok"]


def test_probe_between_two_daemons_that_trust_each_other(daemons: dict[str, str]) -> None:
    d0, d1 = daemons["d0"], daemons["d1"]
    for endpoint in (d0, d1):  # what probe_links does first: each daemon accepts the others' echoes
        control_request(endpoint, {"cmd": "peers", "keys": [DAEMON_KEYS[d0], DAEMON_KEYS[d1]]}, auth=auth(endpoint))
    reply = request_probe(d0, d1, tensor_bytes=1 << 20, count=4, seconds=5, auth=auth(d0), peer_key=DAEMON_KEYS[d1])
    assert reply["peer"] == d1
    assert reply["bandwidth_mbps"] > 0 and reply["latency_s"] > 0
    assert 1 <= reply["samples"] <= 4


def test_a_secure_daemon_probes_only_peers_it_can_authenticate(daemons: dict[str, str]) -> None:
    d0 = daemons["d0"]
    with pytest.raises(ControlError, match=r"'peer_key'.* is required"):
        request_probe(d0, daemons["d1"], tensor_bytes=1024, count=2, seconds=1, auth=auth(d0))
    # a key the peer does not hold: the handshake fails, no echo is ever answered
    with pytest.raises(ControlError, match="did not answer an echo"):
        request_probe(d0, daemons["d1"], tensor_bytes=1024, count=2, seconds=1, auth=auth(d0),
                      peer_key=new_keypair().public_text)
    assert request_status(d0, auth=auth(d0))["ok"]


def test_probe_to_a_dead_peer_is_an_error_not_a_hang(daemons: dict[str, str]) -> None:
    with pytest.raises(ControlError, match="did not answer an echo"):
        request_probe(daemons["d0"], dead_endpoint(), tensor_bytes=1024, count=2, seconds=1, auth=auth(daemons["d0"]),
                      peer_key=new_keypair().public_text)
    assert request_status(daemons["d0"], auth=auth(daemons["d0"]))["ok"]


def test_unreachable_daemon_times_out_by_name() -> None:
    endpoint = dead_endpoint()
    with pytest.raises(ControlError, match=re.escape(f"{endpoint}: no answer to 'status'")):
        request_status(endpoint, auth=INSECURE, timeout_s=0.5)


def test_serving_agent_answers_status_and_probes_but_not_profile(vit_tiny_build, start_control,
                                                                 profile_bundle_dir: Path) -> None:
    from edgepipe.agent.local import LocalPipeline

    control = dead_endpoint()
    open_daemon = start_control("open", "--insecure")  # the stage's control endpoint is plaintext (loopback)
    with LocalPipeline([vit_tiny_build.bundle_dirs[0]], agent_args=["--control", control]) as pipe:
        status = request_status(control, auth=INSECURE, timeout_s=30)
        assert status["commands"] == ["status", "probe", "echo"]
        with pytest.raises(ControlError, match=r"command '(have|profile)' is not offered here"):
            request_profile(control, profile_bundle_dir, "serving", microbatches=(1,), repeats=1, warmup=0,
                            auth=INSECURE)
        assert request_probe(open_daemon, control, tensor_bytes=64 * 1024, count=2,
                             auth=INSECURE)["bandwidth_mbps"] > 0
        assert pipe.agents[0].process.poll() is None
