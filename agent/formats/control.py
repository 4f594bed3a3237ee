"""The control protocol's messages: a device daemon's requests and replies (docs/formats/wire.md,
"Control protocol"). One definition, shared by the daemon (device/daemon.py) and the asking side
(control_client.py: the workstation, clients, devices probing their peers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

CONTROL_VERSION = 1
COMMANDS = ("status", "profile", "probe", "echo")
DEFAULT_MAX_REQUEST_BYTES = 512 * 2**20  # a ViT-Large profiling bundle is ~300 MiB
MAX_HEADER_BYTES = 256 * 1024
MAX_FILES = 256
MAX_MICROBATCH = 1024
MAX_REPEATS = 1000
MAX_PROBE_BYTES = 64 * 2**20
MAX_PROBE_COUNT = 100
MAX_PROBE_SECONDS = 30.0
TINY_BYTES = 64  # latency is timed with round trips this small


class ControlError(RuntimeError):
    """A control request failed: the device said why, or did not answer in time."""



class BadRequest(ValueError):
    """The request is malformed or not allowed; its message goes back in the error reply."""



def parse_request(frames: Sequence[Any]) -> tuple[dict[str, Any], list[bytes]]:
    if not frames:
        raise BadRequest("empty request")
    if len(frames) > MAX_FILES + 1:
        raise BadRequest(f"too many frames (at most {MAX_FILES + 1})")
    head = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise BadRequest(f"header of {len(head)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = msgpack.unpackb(head, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadRequest(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map")
    if header.get("v") != CONTROL_VERSION:
        raise BadRequest(f"control protocol version {header.get('v')!r} is not supported "
                          f"(supports {CONTROL_VERSION})")
    if header.get("cmd") not in COMMANDS:
        raise BadRequest(f"unknown command {header.get('cmd')!r} (known: {', '.join(COMMANDS)})")
    raw = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames[1:]]
    return header, raw


