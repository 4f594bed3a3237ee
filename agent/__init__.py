"""Everything a device installs; it needs nothing else of ours and nothing heavy (no torch, no onnx).

- ``formats/``: what crosses the disk or the wire (bundles, messages, keys, endpoints, profiles);
- ``device/``: runs on a device (stage runtime, daemon, profiler);
- ``client/``: runs where requests are submitted (``Client``, ``edgepipe-submit``);
- ``transport.py``: every ZeroMQ socket, for all roles; ``control_client.py``: the asking side of
  the control protocol (the workstation, a client after a failover, a device probing a peer);
- ``local.py``: a pipeline of agent processes on this machine (demo, tests, benchmarks);
- ``cli.py``: ``edgepipe-agent``.

The workstation's side of the fleet (compile, plan, deploy) lives in ``compiler/``.
"""
