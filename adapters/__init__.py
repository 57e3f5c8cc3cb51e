"""The models that learn and the runtime that serves them.

Only the names in ``__all__`` are public; other packages import from ``adapters``, not its modules.
"""

from adapters.local_model import (
    ContextLengthError,
    Generation,
    GenerationParams,
    LocalModel,
    LocalModelError,
)

__all__ = [
    "ContextLengthError",
    "Generation",
    "GenerationParams",
    "LocalModel",
    "LocalModelError",
]
