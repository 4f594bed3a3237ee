"""A neighbour declared down that comes back as the same process was only slow (a heartbeat queued
behind megabytes on a slow link): from then on it is given that much more silence, within a bound.
A restarted neighbour teaches nothing. (agent/link.py's Neighbour is pure bookkeeping: no sockets.)"""

from __future__ import annotations

from edgepipe.agent.formats.wire import Heartbeat
from edgepipe.agent.link import MAX_PATIENCE_S, Neighbour


def beat(inc: str) -> Heartbeat:
    return Heartbeat(inc=inc, role="stage", stage=1, device="dev1")


def test_a_slow_but_live_neighbour_earns_patience() -> None:
    peer = Neighbour("downstream", "tcp://dev1:5550")
    assert peer.heartbeat(beat("a"), 0.0) == "first"
    assert peer.check_silence(1.6, 1.5)  # 1.6 s of silence: declared down
    assert peer.heartbeat(beat("a"), 4.0) == "back"  # the same process, 4 s after its last message
    assert peer.patience_s == 6.0
    assert not peer.check_silence(4.0 + 5.9, 1.5)  # the same silence again is not a failure
    assert peer.check_silence(4.0 + 6.1, 1.5)  # a longer one still is


def test_patience_is_bounded_and_a_restart_teaches_nothing() -> None:
    peer = Neighbour("upstream", "key")
    peer.heartbeat(beat("a"), 0.0)
    assert peer.check_silence(2.0, 1.5)
    peer.heartbeat(beat("a"), 60.0)  # paused for a minute
    assert peer.patience_s == MAX_PATIENCE_S
    other = Neighbour("upstream", "key")
    other.heartbeat(beat("a"), 0.0)
    assert other.check_silence(2.0, 1.5)
    assert other.heartbeat(beat("b"), 5.0) == "restarted"
    assert other.patience_s == 0.0 and other.check_silence(5.0 + 1.6, 1.5)
