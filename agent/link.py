"""Reliable hops: what a sender keeps, when it may send and when it sends again; what we know about
each neighbour. Shared by the stage runtime (device/stage.py) and the client (client/client.py).

Everything here belongs to one thread (the one that owns the sockets); nothing is locked.

- ``Neighbour``: a peer's incarnation, generation, last time heard from, up/down. A peer silent for
  longer than the detection timeout (3 heartbeat intervals) is declared down; a heartbeat with a
  new incarnation means it restarted; hearing from a peer that was down means it is back.
- ``Outbox``: the sending side of one hop towards one or more replicas of the next stage (or
  towards the entries, for a client). Every message sent stays in the outbox (custody) until the
  receiver says ``done``; sending is limited by the credit (messages and bytes) each replica grants
  in its heartbeats. Messages are sent again, at once, when a replica restarts (everything it had),
  comes back after being down (what it never acknowledged), reports a gap (a message sent before
  a heartbeat it has seen but never acknowledged) or is declared down while another replica is up
  (everything it had moves to the others). Receivers de-duplicate by request id.
- ``RateLimitedLog``: a warning that may repeat at most once per interval per key, counting what it
  suppressed, so a flood cannot flood the log too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq
from edgepipe.agent.formats.wire import (
    Ack,
    Header,
    Heartbeat,
    Limits,
    ProtocolError,
    RequestId,
    encode_heartbeat,
    pack_header,
    parse,
)
from edgepipe.agent.transport import recv_frames

DETECT_FACTOR = 3.0  # a neighbour silent for 3 heartbeat intervals is declared down
# A neighbour that was declared down but came back as the same process gets 1.5x that silence as its
# limit from then on (slow links), never more than this.
MAX_PATIENCE_S = 10.0
HELLO_S = 0.05  # heartbeats to a neighbour we have not heard from (yet, or since it went down)
READ_BATCH = 256  # messages read from one socket before the loop looks at the others
CONTROL_LIMITS = Limits(max_tensors=0)  # acks, heartbeats, refusals: one frame


@dataclass
class Neighbour:
    """What one side of a hop knows about the other. Times are time.monotonic()."""

    role: str  # "upstream", "downstream" or "client": what the neighbour is to us
    where: str  # the endpoint we connect to, or the peer's key on a socket we bind
    key: str | None = None  # the Z85 key it authenticated with (None on an insecure hop)
    inc: str | None = None
    device: str = ""
    stage: int | None = None
    client: str = ""
    dep: str = ""
    gen: int = 0
    last_seen: float = 0.0
    up: bool = False
    heard_once: bool = False
    down_since: float | None = None
    restarts_seen: int = 0
    down_events: int = 0
    patience_s: float = 0.0  # a longer silence limit, learnt from a silence this neighbour survived
    created: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        """How logs name it: 'stage 2 on dev2 (tcp://dev2:5550)' or 'client ws1-42-ab (key Ab3...)'."""
        if self.stage is not None:
            who = f"stage {self.stage}" + (f" on {self.device}" if self.device else "")
        elif self.client:
            who = f"client {self.client}"
        else:
            who = f"{self.role} peer"
        where = self.where if "://" in self.where else (f"key {self.where[:8]}..." if self.where else "")
        return f"{who} ({where})" if where else who

    def heard(self, now: float, restarted: bool = False) -> str | None:
        """Any message from the neighbour. Returns "back" when it had been declared down."""
        silence, self.last_seen = now - self.last_seen, now
        if self.up:
            return None
        if self.heard_once and not restarted:
            # The same process was there all along: the hop is slower than the limit assumed (a
            # heartbeat queued behind megabytes on a 5 Mbps link, say). Wait that long next time,
            # within a bound, so that a real failure is still noticed in seconds.
            self.patience_s = min(MAX_PATIENCE_S, max(self.patience_s, 1.5 * silence))
        self.up = True
        if not self.heard_once:
            self.heard_once = True
            return None
        return "back"

    def heartbeat(self, hb: Heartbeat, now: float) -> str | None:
        """Returns "restarted" (a new incarnation), "back", "first" (first contact) or None."""
        restarted = self.inc is not None and hb.inc != self.inc
        first = self.inc is None
        self.inc, self.device, self.stage, self.client = hb.inc, hb.device, hb.stage, hb.client
        self.dep, self.gen = hb.dep, hb.gen
        back = self.heard(now, restarted)
        if restarted:
            self.restarts_seen += 1
            return "restarted"
        if first:
            return "first"
        return back

    def check_silence(self, now: float, timeout_s: float) -> bool:
        """True the moment the neighbour is declared down (silent for more than ``timeout_s``, or the
        longer patience it earned)."""
        if self.up and now - self.last_seen > max(timeout_s, self.patience_s):
            self.up = False
            self.down_since = now
            self.down_events += 1
            return True
        return False

    def status(self, now: float) -> dict[str, Any]:
        return {"role": self.role, "label": self.name, "key": self.key, "device": self.device,
                "stage": self.stage, "incarnation": self.inc, "generation": self.gen,
                "state": "up" if self.up else "down",
                "last_seen_s": round(now - self.last_seen, 3) if self.heard_once else None,
                "restarts_seen": self.restarts_seen, "down_events": self.down_events,
                "patience_s": round(self.patience_s, 3)}


class RateLimitedLog:
    """``warn(key, message)`` logs at most once per ``interval_s`` per key, then says how many
    similar lines it left out."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, key: str, message: str | Callable[[], str]) -> None:
        """``message`` may be a function, called only when the line is written (a flood of
        suppressed lines then costs no formatting)."""
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if callable(message):
            message = message()
        if len(self._last) > 4096:  # keys are bounded by peers, but never let the table grow unbounded
            self._last.clear()
            self._suppressed.clear()
        skipped = self._suppressed.pop(key, 0)
        self._last[key] = now
        self.logger.log(level, "%s%s", message, f" ({skipped} similar in the last {self.interval_s:g} s not logged)"
                        if skipped else "")


def stamped(header: Header, sent: float) -> Header:
    """The header with its last trace record's ``send`` set: when the message first left."""
    *earlier, last = header.trace
    return replace(header, trace=(*earlier, replace(last, send=sent)))


def forgive_own_pause(neighbours: Sequence[Neighbour], gap_s: float) -> None:
    """This process was stopped or starved for ``gap_s``: the silence of everyone else over that
    time says nothing about them, so it is not counted."""
    for peer in neighbours:
        peer.last_seen += gap_s


# ---- the sending side -------------------------------------------------------------------------

@dataclass
class Parcel:
    """A message in our custody on its way downstream (or a client's request on its way in)."""

    rid: RequestId
    header: Header  # everything but ``ls``, which each send sets
    frames: list[Any]  # the tensor frames, already encoded
    nbytes: int  # bytes on the wire (header estimate + tensor frames): what credit counts
    order: int = 0  # submission order: resends go out oldest first
    replica: int = -1  # the replica holding it, -1 while it waits in the queue
    ls: int = 0
    received: bool = False  # the replica said "recv"
    settled: bool = False  # its outcome is known (a client has the result): never send it again
    stamp_send: bool = False  # set the last trace record's ``send`` to the time it first leaves
    sends: int = 0
    first_sent: float = 0.0  # time.time() of the first send


@dataclass
class Replica:
    """One receiver of a hop: a replica of the next stage, or one entry of a pipeline."""

    sock: zmq.Socket
    peer: Neighbour
    weight: float = 1.0
    credit: tuple[int, int] = (0, 0)  # (messages, bytes) it lets us have in flight; 0 until it says
    tx: int = 0  # link sequence number of the last message sent to it
    parcels: dict[RequestId, Parcel] = field(default_factory=dict)
    used_bytes: int = 0
    next_hb: float = 0.0
    blocked_until: float = 0.0  # its socket refused a message (not connected); try again later

    def fits(self, parcel: Parcel) -> bool:
        msgs, nbytes = self.credit
        if len(self.parcels) >= msgs:
            return False
        return not self.parcels or self.used_bytes + parcel.nbytes <= nbytes

    def attach(self, parcel: Parcel, index: int) -> None:
        parcel.replica = index
        self.parcels[parcel.rid] = parcel
        self.used_bytes += parcel.nbytes

    def detach(self, parcel: Parcel) -> None:
        if self.parcels.pop(parcel.rid, None) is not None:
            self.used_bytes -= parcel.nbytes
        parcel.replica = -1


@dataclass(frozen=True)
class Identity:
    """Who we are, in every heartbeat we send."""

    inc: str
    role: str  # "stage" or "client"
    stage: int | None = None
    device: str = ""
    client: str = ""
    dep: str = ""
    gen: int = 0


class Outbox:
    """The sending side of a hop; see the module docstring. ``log`` receives (level, key, message)
    for neighbour events; counters are plain attributes."""

    def __init__(self, replicas: list[Replica], me: Identity, heartbeat_s: float,
                 log: Callable[[int, str, str], None]) -> None:
        if not replicas:
            raise ValueError("an outbox needs at least one replica")
        self.replicas, self.me, self.heartbeat_s, self._log = replicas, me, heartbeat_s, log
        self.timeout_s = DETECT_FACTOR * heartbeat_s
        self.queue: deque[Parcel] = deque()
        self.where: dict[RequestId, Parcel] = {}
        self.resends = 0
        self.sent = 0
        self.bytes_out = 0
        self.protocol_errors = 0
        self._order = 0
        self._rr = 0

    # -- what the owner does with it

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self.where

    @property
    def inflight_bytes(self) -> int:
        return sum(p.nbytes for p in self.where.values())

    def add(self, parcel: Parcel) -> None:
        """Take custody of a new message; ``pump`` sends it when a replica has credit."""
        self._order += 1
        parcel.order = self._order
        self.where[parcel.rid] = parcel
        self.queue.append(parcel)

    def resend(self, rid: RequestId) -> bool:
        """Send a message we still hold again (the client's last resort); False if we do not hold it."""
        parcel = self.where.get(rid)
        if parcel is None:
            return False
        if parcel.replica >= 0:
            self.replicas[parcel.replica].detach(parcel)
            self._requeue([parcel])
        return True

    def settle(self, rid: RequestId) -> None:
        """Its outcome is known: never send it again, but let it count against the replica's credit
        until the replica says done (the replica counts it until then too)."""
        parcel = self.where.get(rid)
        if parcel is None:
            return
        if parcel.replica == -1:
            self.drop(rid)
        else:
            parcel.settled = True

    def drop(self, rid: RequestId) -> Parcel | None:
        """Forget a message (done downstream, or answered some other way)."""
        parcel = self.where.pop(rid, None)
        if parcel is None:
            return None
        if parcel.replica >= 0:
            self.replicas[parcel.replica].detach(parcel)
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(parcel)
        return parcel

    def pump(self, now: float) -> int:
        """Send queued messages while some replica that is up has credit. Returns how many."""
        count = 0
        while self.queue:
            index = self._choose(self.queue[0], now)
            if index is None:
                break
            parcel = self.queue.popleft()
            if not self._send(index, parcel, now):
                self.queue.appendleft(parcel)
                continue  # that replica is now blocked; another may take it
            count += 1
        return count

    def read(self, index: int, now: float, answers: list[Header] | None = None
             ) -> tuple[list[RequestId], list[RequestId]]:
        """Read what replica ``index`` sent us (acks, heartbeats). Returns the request ids it newly
        acknowledged as received and as done (already dropped from the outbox). Error messages
        sent back to us (an entry refusing a client's request) go to ``answers`` if given; without
        it they are protocol violations."""
        replica = self.replicas[index]
        received: list[RequestId] = []
        done: list[RequestId] = []
        for _ in range(READ_BATCH):
            try:
                frames = recv_frames(replica.sock, 1, zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                message = parse(frames, CONTROL_LIMITS)
            except ProtocolError as exc:
                self.protocol_errors += 1
                self._log(logging.WARNING, f"bad-from-{index}", f"malformed message from {replica.peer.name}: {exc}")
                continue
            if isinstance(message, Heartbeat):
                self._heartbeat(index, message, now)
            elif isinstance(message, Ack):
                self._back(index, now, replica.peer.heard(now))
                self._ack(index, message, received, done)
            elif answers is not None and message[0].kind == "error":
                self._back(index, now, replica.peer.heard(now))
                answers.append(message[0])
            else:
                self.protocol_errors += 1
                self._log(logging.WARNING, f"data-from-{index}",
                          f"{replica.peer.name} sent a data message against the data direction; ignored")
        return received, done

    def tick(self, now: float) -> None:
        """Heartbeats that are due, and silence checks (failover to other replicas)."""
        for index, replica in enumerate(self.replicas):
            peer = replica.peer
            if peer.check_silence(now, self.timeout_s):
                moved = self._failover(index)
                self._log(logging.WARNING, f"down-{index}",
                          f"downstream {peer.name} silent for {now - peer.last_seen:.1f} s: declared down"
                          + (f"; {moved} messages moved to other replicas" if moved else
                             f"; holding {len(replica.parcels)} messages for it" if replica.parcels else ""))
            if now >= replica.next_hb:
                self._send_heartbeat(replica)
                replica.next_hb = now + (self.heartbeat_s if peer.up else HELLO_S)

    def status(self, now: float) -> list[dict[str, Any]]:
        return [{**r.peer.status(now), "inflight_msgs": len(r.parcels), "weight": r.weight,
                 "credit": list(r.credit)} for r in self.replicas]

    # -- internals

    def _choose(self, parcel: Parcel, now: float) -> int | None:
        """The replica with free credit and the least work per unit of weight (ties: round robin)."""
        best, best_score = None, 0.0
        n = len(self.replicas)
        for k in range(n):
            index = (self._rr + k) % n
            replica = self.replicas[index]
            if not replica.peer.up or replica.peer.inc is None or now < replica.blocked_until:
                continue
            if not replica.fits(parcel):
                continue
            score = (len(replica.parcels) + 1) / replica.weight
            if best is None or score < best_score:
                best, best_score = index, score
        if best is not None:
            self._rr = (best + 1) % n
        return best

    def _send(self, index: int, parcel: Parcel, now: float) -> bool:
        replica = self.replicas[index]
        replica.tx += 1
        if not parcel.first_sent:
            parcel.first_sent = time.time()
            if parcel.stamp_send and parcel.header.trace:
                parcel.header = stamped(parcel.header, parcel.first_sent)
        header = replace(parcel.header, ls=replica.tx)
        try:
            replica.sock.send_multipart([pack_header(header), *parcel.frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            replica.tx -= 1
            replica.blocked_until = now + HELLO_S
            return False
        parcel.ls = replica.tx
        parcel.received = False
        if parcel.sends:
            self.resends += 1
        parcel.sends += 1
        replica.attach(parcel, index)
        self.sent += 1
        self.bytes_out += parcel.nbytes
        return True

    def _send_heartbeat(self, replica: Replica) -> None:
        me = self.me
        hb = Heartbeat(me.inc, me.role, me.stage, me.device, me.client, me.dep, me.gen, None, replica.tx, 0)
        with contextlib.suppress(zmq.Again):  # not connected (yet): the next heartbeat tries again
            replica.sock.send(encode_heartbeat(hb), flags=zmq.NOBLOCK)

    def _back(self, index: int, now: float, event: str | None, was_down_for: float | None = None) -> None:
        """A replica that had been declared down is heard from again, as the same process. Nothing
        is sent again here: on a slow link what it has not acknowledged is mostly still on its way,
        and sending it twice would slow the link further. What was really lost (a broken connection)
        goes again as soon as its next heartbeat's ``txs`` shows the gap (``_heartbeat``)."""
        if event != "back":
            return
        replica = self.replicas[index]
        waiting = sum(1 for p in replica.parcels.values() if not p.received)
        down = f" after {was_down_for:.1f} s of silence" if was_down_for is not None else ""
        self._log(logging.WARNING, f"back-{index}", f"downstream {replica.peer.name} is back{down}; "
                  f"{waiting} unacknowledged messages are sent again only if its next heartbeat shows them lost")

    def _heartbeat(self, index: int, hb: Heartbeat, now: float) -> None:
        replica = self.replicas[index]
        peer = replica.peer
        was_down_for = now - peer.last_seen if peer.heard_once else 0.0
        event = peer.heartbeat(hb, now)
        if hb.credit is not None:
            replica.credit = hb.credit
        replica.blocked_until = 0.0
        if event == "restarted":
            lost = list(replica.parcels.values())
            for parcel in lost:
                replica.detach(parcel)
            replica.tx = 0  # a new incarnation numbers our link from scratch
            self._requeue(lost)
            self._log(logging.WARNING, f"restart-{index}",
                      f"downstream {peer.name} restarted (new incarnation {hb.inc}): "
                      f"sending {len(lost)} unacknowledged messages again")
        elif event == "back":
            self._back(index, now, event, was_down_for)
        elif event == "first":
            self._log(logging.INFO, f"first-{index}", f"downstream {peer.name} answered (incarnation {hb.inc})")
        if hb.txs:  # messages sent before the heartbeat it has seen, never acknowledged: lost on the way
            lost = [p for p in replica.parcels.values() if not p.received and p.ls <= hb.txs]
            for parcel in lost:
                replica.detach(parcel)
            if lost:
                self._requeue(lost)
                self._log(logging.WARNING, f"gap-{index}",
                          f"{len(lost)} messages to {peer.name} were lost on the way; sending them again")

    def _ack(self, index: int, ack: Ack, received: list[RequestId], done: list[RequestId]) -> None:
        replica = self.replicas[index]
        for rid in ack.recv:
            parcel = self.where.get(rid)
            if parcel is None or parcel.received:
                continue
            if parcel.replica == -1:  # we had given it up for lost, but it arrived: no resend needed
                with contextlib.suppress(ValueError):
                    self.queue.remove(parcel)
                replica.attach(parcel, index)
            parcel.received = True
            received.append(rid)
        for rid in ack.done:
            if self.drop(rid) is not None:
                done.append(rid)

    def _failover(self, index: int) -> int:
        """Move a down replica's messages to the queue when another replica is up to take them."""
        if not any(r.peer.up for k, r in enumerate(self.replicas) if k != index):
            return 0
        replica = self.replicas[index]
        moved = list(replica.parcels.values())
        for parcel in moved:
            replica.detach(parcel)
        self._requeue(moved)
        return len(moved)

    def _requeue(self, parcels: list[Parcel]) -> None:
        """Put messages back at the front of the queue, oldest first (settled ones are forgotten)."""
        for parcel in sorted(parcels, key=lambda p: p.order, reverse=True):
            if parcel.settled:
                self.where.pop(parcel.rid, None)
                continue
            parcel.received = False
            self.queue.appendleft(parcel)
