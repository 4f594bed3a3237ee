"""Models EdgePipe compiles by name. Add one in registry.py."""

from edgepipe.models.registry import (
    REGISTRY,
    ModelEntry,
    ModelError,
    ModelInput,
    build_module,
    example_input,
    example_inputs,
    get_model,
)

__all__ = ["REGISTRY", "ModelEntry", "ModelError", "ModelInput", "build_module", "example_input", "example_inputs",
           "get_model"]
