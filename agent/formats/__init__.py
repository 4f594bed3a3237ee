"""What crosses the disk or the wire, one versioned format per module: stage bundles, profiles,
data-plane messages (``wire.py``). Shared by the device, the workstation and the client."""
