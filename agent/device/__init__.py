"""Runs on a device: the stage runtime (``stage.py``), its ONNX Runtime session, the device daemon
(``daemon.py``) and the profiler. Nothing here imports torch or onnx."""
