"""Human units for sizes, rates and times: parsing what people write, formatting what they read."""

from __future__ import annotations

import math
import re
from typing import Any

_BYTES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MBPS = {"": 1.0, "bps": 1e-6, "kbps": 1e-3, "kbit/s": 1e-3, "mbps": 1.0, "mbit/s": 1.0,
         "gbps": 1e3, "gbit/s": 1e3}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")


def parse_bytes(value: Any) -> int:
    """ "8 GiB" -> 8589934592; "2 GB" -> 2000000000; a plain number is bytes."""
    return round(_parse(value, _BYTES, "a size like '8 GiB', '512 MiB' or a number of bytes"))


def parse_mbps(value: Any) -> float:
    """ "1 Gbps" -> 1000.0; "5 Mbps" -> 5.0; a plain number is Mbps."""
    return _parse(value, _MBPS, "a rate like '1 Gbps', '100 Mbps' or a number of Mbps")


def parse_seconds(value: Any) -> float:
    """ "2 ms" -> 0.002; a plain number is seconds."""
    return _parse(value, _SECONDS, "a time like '2 ms', '0.5 s' or a number of seconds")


def format_bytes(n: float) -> str:
    """2_147_483_648 -> '2.00 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float) -> str:
    """0.0123 -> '12.3 ms'; 2.5 -> '2.50 s'."""
    if not math.isfinite(s):
        return str(s)
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _parse(value: Any, units: dict[str, float], expected: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and (m := _QUANTITY.match(value)) and m.group(2).lower() in units:
        number = float(m.group(1)) * units[m.group(2).lower()]
    else:
        raise ValueError(f"expected {expected}, got {value!r}")
    if not 0 <= number < math.inf:
        raise ValueError(f"expected {expected}, got {value!r}")
    return number
