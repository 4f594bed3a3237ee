"""Models EdgePipe compiles by name. Add one in registry.py."""

from edgepipe.models.registry import REGISTRY, ModelEntry, ModelError, build_module, example_input, get_model

__all__ = ["REGISTRY", "ModelEntry", "ModelError", "build_module", "example_input", "get_model"]
