"""The Personal Language Model: per-user LoRA adapters on the local model, trained from the
learner's datasets (in the server as the learner asks, `scheduler`), kept encrypted, composed
with a community adapter, used in the request path, pruned and compressed.

Only the names in ``__all__`` are public. torch, transformers and peft are imported inside the
functions that need them, so importing this package stays cheap.
"""

from adapters.plm.compose import (
    AdapterLayer,
    CompositionError,
    compose,
    merge_layers,
    swap_layer,
)
from adapters.plm.context import (
    LocalContextGenerator,
    PLMContext,
    QueryAnalyser,
    QueryAnalysis,
)
from adapters.plm.crypto import (
    AdapterCryptoError,
    DecryptionError,
    KeyNotFoundError,
    Keyring,
    KeyringError,
    decrypt_bytes,
    encrypt_bytes,
    load_encrypted_state_dict,
    save_encrypted_state_dict,
)
from adapters.plm.data import LocalTeacher, SoftTargets
from adapters.plm.facts import Fact, fact_of
from adapters.plm.gate import GateConfig, GateReport, evaluate
from adapters.plm.model import BaseSpec, LoRAConfig, PLMRuntime
from adapters.plm.prune import PruneConfig, PrunePlan, prune_for_user, quantize_int8
from adapters.plm.registry import (
    AdapterRegistry,
    AdapterVersion,
    RegistryError,
    follow_store,
    reconcile,
)
from adapters.plm.scheduler import UpdateObserver, UpdateScheduler
from adapters.plm.serve import PersonalModel
from adapters.plm.train import TrainConfig
from adapters.plm.update import (
    UpdateCancelled,
    UpdateConfig,
    UpdateResult,
    run_request,
    run_requested_updates,
    run_update,
)

__all__ = [
    "AdapterCryptoError",
    "AdapterLayer",
    "AdapterRegistry",
    "AdapterVersion",
    "BaseSpec",
    "CompositionError",
    "DecryptionError",
    "Fact",
    "GateConfig",
    "GateReport",
    "KeyNotFoundError",
    "Keyring",
    "KeyringError",
    "LoRAConfig",
    "LocalContextGenerator",
    "LocalTeacher",
    "PLMContext",
    "PLMRuntime",
    "PersonalModel",
    "PruneConfig",
    "PrunePlan",
    "QueryAnalyser",
    "QueryAnalysis",
    "RegistryError",
    "SoftTargets",
    "TrainConfig",
    "UpdateCancelled",
    "UpdateConfig",
    "UpdateObserver",
    "UpdateResult",
    "UpdateScheduler",
    "compose",
    "decrypt_bytes",
    "encrypt_bytes",
    "evaluate",
    "fact_of",
    "follow_store",
    "load_encrypted_state_dict",
    "merge_layers",
    "prune_for_user",
    "quantize_int8",
    "reconcile",
    "run_request",
    "run_requested_updates",
    "run_update",
    "save_encrypted_state_dict",
    "swap_layer",
]
