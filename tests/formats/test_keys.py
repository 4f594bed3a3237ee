"""Key files and CurveZMQ sockets: a key not on the list never gets a message through, an
allowed one does and is named on every frame, and the list can change while the socket lives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth
from edgepipe.agent.formats import keys
from edgepipe.agent.transport import (
    INSECURE,
    ClientAuth,
    ServerAuth,
    allow_keys,
    bind_pull,
    bound_endpoint,
    close_context,
    connect_push,
    new_context,
    peer_key,
    recv_frames,
)


def test_generate_load_and_permissions(tmp_path: Path) -> None:
    pair, public, secret = keys.generate_keypair(tmp_path / "k", "device")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert keys.load_keypair(secret) == pair
    assert keys.load_public_key(public) == pair.public
    assert keys.load_public_key(pair.public_text) == pair.public
    assert zmq.auth.load_certificate(secret) == (pair.public, pair.secret)  # pyzmq reads our files
    assert pair.secret.decode() not in repr(pair)
    with pytest.raises(keys.KeyFileError, match="exists"):
        keys.generate_keypair(tmp_path / "k", "device")
    os.chmod(secret, 0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load_keypair(secret)
    with pytest.raises(keys.KeyFileError, match="no secret key"):
        keys.load_keypair(public)


def test_key_lists(tmp_path: Path) -> None:
    a = keys.generate_keypair(tmp_path / "dir", "a")[0]
    b = keys.generate_keypair(tmp_path / "dir", "b")[0]
    c = keys.new_keypair()
    listing = tmp_path / "authorized_keys"
    listing.write_text(f"# workstations\n{c.public_text} laptop\n\ndir/a.key\n")
    assert keys.load_key_list([listing]) == {c.public, a.public}
    assert keys.load_key_list([tmp_path / "dir"]) == {a.public, b.public}
    assert keys.load_key_list([b.public_text]) == {b.public}
    listing.write_text("not-a-key\n")
    with pytest.raises(keys.KeyFileError, match="authorized_keys:1"):
        keys.load_key_list([listing])


def _pair(server_allowed: frozenset[bytes], client: keys.KeyPair, server: keys.KeyPair):
    ctx = new_context()
    pull = bind_pull(ctx, "tcp://127.0.0.1:0", auth=ServerAuth(server, server_allowed), max_frame_bytes=None)
    push = connect_push(ctx, bound_endpoint(pull), auth=ClientAuth(client, server.public))
    return ctx, pull, push


def test_curve_refuses_unknown_keys_and_names_the_sender() -> None:
    server, friend, stranger = keys.new_keypair(), keys.new_keypair(), keys.new_keypair()
    ctx, pull, push = _pair(frozenset({friend.public}), stranger, server)
    try:
        plain = connect_push(ctx, bound_endpoint(pull), auth=INSECURE)
        for sock in (push, plain):
            sock.send(b"let me in", zmq.NOBLOCK) if sock.poll(0, zmq.POLLOUT) else None
        assert not pull.poll(1500), "an unknown key or a plaintext peer got a message through"
        allow_keys(pull, {friend.public, stranger.public})
        push.close(0)
        push = connect_push(ctx, bound_endpoint(pull), auth=ClientAuth(stranger, server.public))
        push.send(b"now allowed")
        assert pull.poll(5000)
        frame = recv_frames(pull, 1)[0]
        assert frame.bytes == b"now allowed" and peer_key(frame) == stranger.public_text
        plain.close(0)
    finally:
        push.close(0)
        pull.close(0)
        close_context(ctx)


def test_insecure_socket_has_no_peer_key() -> None:
    ctx = new_context()
    pull = bind_pull(ctx, "tcp://127.0.0.1:0", auth=INSECURE, max_frame_bytes=None)
    push = connect_push(ctx, bound_endpoint(pull), auth=INSECURE)
    try:
        push.send(b"x")
        assert pull.poll(5000)
        assert peer_key(recv_frames(pull, 1)[0]) is None
    finally:
        push.close(0)
        pull.close(0)
        close_context(ctx)


def test_auth_is_required_and_typed() -> None:
    ctx = new_context()
    try:
        with pytest.raises(TypeError):
            bind_pull(ctx, "tcp://127.0.0.1:0", auth=None, max_frame_bytes=None)  # type: ignore[arg-type]
    finally:
        close_context(ctx)


def test_keygen_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "edgepipe.agent.cli", "keygen", "--dir", str(tmp_path), "--name", "pi-a", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert keys.load_keypair(out["secret_file"]).public_text == out["public_key"]
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
