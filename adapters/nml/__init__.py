"""The NML/EM neuromodulated sequence model (seed 003): memories written while it runs.

The public names load their module on first use (PEP 562), so importing ``adapters.nml`` (as
``memlane nml`` does to mount its commands) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NMLConfig": "adapters.nml.model",
    "NMLModel": "adapters.nml.model",
    "NMLChatModel": "adapters.nml.serve",
    "TrainConfig": "adapters.nml.train",
    "UserStateStore": "adapters.nml.user_state",
    "load_checkpoint": "adapters.nml.train",
}

__all__ = ["NMLChatModel", "NMLConfig", "NMLModel", "TrainConfig", "UserStateStore", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adapters.nml' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
