"""The device's bundle store on its own (agent/device/store.py): an upload resumed after a daemon
restart, making room by evicting least recently used objects that nothing needs (never pinned ones
or the ones in use), and the numbers in a refusal."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from edgepipe.agent.device.store import BundleStore, StoreError

MIB = 2**20


def blob(n: int, seed: int) -> tuple[bytes, str]:
    data = os.urandom(n) if seed < 0 else bytes([seed]) * n
    return data, hashlib.sha256(data).hexdigest()


def test_an_upload_resumes_after_a_restart(tmp_path: Path) -> None:
    data, sha = blob(3 * MIB, -1)
    store = BundleStore(tmp_path, reserve_bytes=0)
    assert store.put(sha, len(data), 0, data[:MIB]) == (MIB, False)
    again = BundleStore(tmp_path, reserve_bytes=0)  # a new daemon: no running hash in memory
    assert again.received(sha) == MIB
    assert again.put(sha, len(data), MIB, data[MIB:]) == (len(data), True)
    assert again.has(sha) and (tmp_path / "objects" / sha).read_bytes() == data
    assert not (tmp_path / "partial" / sha).exists()


def test_room_is_made_from_unused_objects_oldest_first(tmp_path: Path) -> None:
    store = BundleStore(tmp_path, quota_bytes=4 * MIB, reserve_bytes=0)
    names = []
    for seed in range(3):  # three 1 MiB objects, oldest first
        data, sha = blob(MIB, seed)
        store.put(sha, len(data), 0, data)
        os.utime(tmp_path / "objects" / sha, (time.time() - 100 + seed, time.time() - 100 + seed))
        names.append(sha)
    store.pin([names[0]])  # a standby file: kept although it is the oldest
    data, sha = blob(2 * MIB, 9)
    store.put(sha, len(data), 0, data, keep=frozenset({names[2]}))  # names[2] is in use
    assert store.has(names[0]) and not store.has(names[1]) and store.has(names[2]) and store.has(sha)

    data, sha = blob(3 * MIB, 10)
    with pytest.raises(StoreError, match=r"not enough disk space: 3.0 MiB needed, .* free .* store limit 4.0 MiB"):
        store.put(sha, len(data), 0, data, keep=frozenset(store_objects(tmp_path)))
    assert store.received(sha) == 0  # refused before a byte was written


def store_objects(root: Path) -> list[str]:
    return [p.name for p in (root / "objects").iterdir()]


def test_partial_uploads_are_dropped_on_release(tmp_path: Path) -> None:
    store = BundleStore(tmp_path, reserve_bytes=0)
    data, sha = blob(2 * MIB, 3)
    other, other_sha = blob(2 * MIB, 4)
    store.put(sha, len(data), 0, data[:MIB])
    store.put(other_sha, len(other), 0, other[:MIB])
    store.drop_partial(keep=frozenset({other_sha}))
    assert store.received(sha) == 0 and store.received(other_sha) == MIB
