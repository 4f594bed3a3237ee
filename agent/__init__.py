"""Everything a device installs, plus what talks to devices.

- ``formats/``: what crosses the disk or the wire (bundles, profiles, messages);
- ``device/``: runs on a device (stage runtime, daemon, profiler);
- ``client/``: runs where requests are submitted (``Client``, ``edgepipe-submit``);
- ``workstation/``: runs on the machine that operates the fleet;
- ``transport.py``: every ZeroMQ socket, for all three; ``cli.py``: ``edgepipe-agent``.
"""
