"""The systemd unit that runs the device daemon, shipped as package data (edgepipe-agent.service)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

UNIT_PATH = Path("/etc/systemd/system/edgepipe-agent.service")


def unit_template() -> str:
    return files("edgepipe.agent.device").joinpath("edgepipe-agent.service").read_text()


def render_unit(*, executable: Path, user: str, state_dir: Path, key_dir: Path, listen: str, device: str) -> str:
    """The unit with paths filled in. systemd creates the state directory (owned by ``user``) only
    under /var/lib; elsewhere it must exist beforehand, so those lines are dropped."""
    text = unit_template().format(executable=executable, user=user, state_dir=state_dir, key_dir=key_dir,
                                  listen=listen, device=device, state_name=state_dir.name)
    if state_dir.parent != Path("/var/lib"):
        text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("StateDirectory"))
    return text
