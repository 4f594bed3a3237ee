"""CurveZMQ key files: one keypair per device, workstation and client; lists of public keys allowed
to connect. Documented in docs/security.md.

A keypair is two files in ZeroMQ's certificate format (what ``zmq.auth.load_certificate`` reads):
``NAME.key`` holds the public key and may be copied anywhere; ``NAME.key_secret`` holds both keys,
is created with mode 0600 and never leaves the machine it was made on. Keys are Z85 text, 40
characters (32 bytes).

A *key list* names the peers a socket accepts. It is read from a file with one entry per line: a
Z85 public key, optionally followed by a space and a comment (lines starting with ``#`` and blank
lines are skipped), or
the path of a ``.key`` file; from a directory, every ``*.key`` file in it; or from a Z85 key given
inline. ``authorized_keys`` in a device's key directory is the list of workstations allowed to
operate it.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq

KEY_DIR_ENV = "EDGEPIPE_KEYS"
DEFAULT_KEY_DIR = Path("~/.config/edgepipe/keys")
AUTHORIZED_KEYS = "authorized_keys"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class KeyFileError(ValueError):
    """A key or key file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ keypair, both keys as Z85 bytes (40 characters)."""

    public: bytes
    secret: bytes

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")

    def __repr__(self) -> str:  # never print the secret key by accident
        return f"KeyPair(public={self.public_text!r})"


def key_dir(explicit: Path | str | None = None) -> Path:
    """Where keys live: ``explicit``, else $EDGEPIPE_KEYS, else ~/.config/edgepipe/keys."""
    chosen = explicit or os.environ.get(KEY_DIR_ENV) or DEFAULT_KEY_DIR
    return Path(chosen).expanduser()


def is_public_key(text: str) -> bool:
    return bool(_Z85_KEY.match(text))


def new_keypair() -> KeyPair:
    """A fresh keypair held in memory only (the demo's and tests' ephemeral keys)."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def generate_keypair(directory: Path, name: str, *, overwrite: bool = False) -> tuple[KeyPair, Path, Path]:
    """Create NAME.key and NAME.key_secret (0600) in ``directory``; return the pair and both paths.

    Refuses to replace an existing secret key unless ``overwrite``: losing it locks the owner out
    of every pipeline that trusts the old public key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise KeyFileError(f"key name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if secret_path.exists() and not overwrite:
        raise KeyFileError(f"{secret_path} exists; keep it, or pass --force to replace it (peers that trust "
                        "the old public key will refuse the new one)")
    pair = new_keypair()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_key_file(public_path, pair, stamp, with_secret=False, mode=0o644)
    _write_key_file(secret_path, pair, stamp, with_secret=True, mode=0o600)
    return pair, public_path, secret_path


def load_keypair(path: Path | str) -> KeyPair:
    """Read a ``.key_secret`` file. A secret file others can read is refused, as ssh does."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeyFileError(f"{path}: no such secret key file (create one with `edgepipe-agent keygen`)")
    public, secret = _read_key_file(path)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (is it the public .key file?)")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path}: secret key is readable by other users; run: chmod 600 {path}")
    return KeyPair(public, secret)


def load_public_key(source: str | Path) -> bytes:
    """One public key: Z85 text itself, or a ``.key``/``.key_secret`` file holding it."""
    text = str(source).strip()
    if is_public_key(text):
        return text.encode("ascii")
    path = Path(text).expanduser()
    if not path.is_file():
        raise KeyFileError(f"{text!r} is neither a 40-character Z85 public key nor a key file")
    return _read_key_file(path)[0]


def load_key_list(sources: Iterable[str | Path]) -> frozenset[bytes]:
    """Public keys from key-list sources (see the module docstring); empty if none are given."""
    keys: set[bytes] = set()
    for source in sources:
        text = str(source).strip()
        path = Path(text).expanduser()
        if is_public_key(text):
            keys.add(text.encode("ascii"))
        elif path.is_dir():
            keys.update(_read_key_file(p)[0] for p in sorted(path.glob(f"*{PUBLIC_SUFFIX}")))
        elif path.is_file() and path.suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
            keys.add(_read_key_file(path)[0])
        elif path.is_file():
            keys.update(_read_list_file(path))
        else:
            raise KeyFileError(f"{text!r}: not a Z85 public key, a key file, a key list file or a directory")
    return frozenset(keys)


def _read_list_file(path: Path) -> set[bytes]:
    keys = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):  # not after a key: '#' is a Z85 character
            continue
        first = entry.split()[0]
        if is_public_key(first):
            keys.add(first.encode("ascii"))
            continue
        ref = Path(first).expanduser()
        if not ref.is_absolute():
            ref = path.parent / ref
        if not ref.is_file():
            raise KeyFileError(f"{path}:{number}: {first!r} is neither a Z85 public key nor a key file")
        keys.add(_read_key_file(ref)[0])
    return keys


def _read_key_file(path: Path) -> tuple[bytes, bytes | None]:
    public = secret = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc}") from None
    for line in lines:
        key, _, value = line.strip().partition("=")
        value = value.strip().strip("'\"")
        if key.strip() == "public-key":
            public = value
        elif key.strip() == "secret-key":
            secret = value
    if public is None or not is_public_key(public):
        raise KeyFileError(f"{path}: no valid public-key line (not a ZeroMQ certificate file)")
    if secret is not None and not is_public_key(secret):
        raise KeyFileError(f"{path}: malformed secret-key line")
    return public.encode("ascii"), None if secret is None else secret.encode("ascii")


def _write_key_file(path: Path, pair: KeyPair, stamp: str, *, with_secret: bool, mode: int) -> None:
    what = "secret (keep it on this machine)" if with_secret else "public"
    lines = [f"#   EdgePipe CurveZMQ {what} key, created {stamp}",
             "#   ZeroMQ certificate format (zmq.auth.load_certificate reads it)",
             "metadata", "curve", f'    public-key = "{pair.public_text}"']
    if with_secret:
        lines.append(f'    secret-key = "{pair.secret.decode("ascii")}"')
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)  # never world-readable, not even briefly
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(tmp, mode)
    tmp.replace(path)
