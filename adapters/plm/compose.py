"""Three-layer composition at inference (seed 000): base + community adapter + personal adapter.

    W_final = W_base + w_c * dW_community + w_p * dW_personal,   dW = (alpha / r) * B @ A

Two ways to get it, both exact:

- ``compose`` loads each layer as a named PEFT LoRA adapter on one ``PeftModel`` and makes them
  active together. A LoRA layer then adds every active adapter's ``scaling * B(A(x))`` to the base
  output, so nothing is merged: the base weights stay untouched and shared, and one user's
  personal layer is swapped for another's with ``swap_layer`` (one small state dict load).
- ``merge_layers`` folds the active layers into the base weights (``merge_and_unload``): a plain
  model with no adapter overhead per token, for a user served long enough to pay for the merge.

The per-layer weight scales that adapter's LoRA ``scaling`` in every layer it touches; 1.0 keeps
the adapter as trained. A layer's state dict is PEFT's (``get_peft_model_state_dict``), as the
personal adapters are stored (and as ``load_encrypted_state_dict`` returns them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel

log = structlog.get_logger(__name__)

__all__ = ["COMMUNITY", "PERSONAL", "AdapterLayer", "CompositionError", "active_layers", "compose",
           "merge_layers", "swap_layer"]

COMMUNITY = "community"
PERSONAL = "personal"
_TRAINED = "_memlane_trained_scaling"  # per LoRA module: adapter name -> its scaling as loaded


class CompositionError(Exception):
    """Layers that cannot be composed: duplicate names, an unknown layer, a mismatched state dict."""


@dataclass(frozen=True)
class AdapterLayer:
    name: str  # the PEFT adapter name: COMMUNITY, PERSONAL, or e.g. "personal:alice"
    config: LoraConfig
    state_dict: Mapping[str, torch.Tensor]  # PEFT's form, without the adapter name in the keys
    weight: float = 1.0  # multiplies the adapter's alpha / r

    @classmethod
    def from_pretrained(cls, folder: Path | str, name: str, *, weight: float = 1.0) -> AdapterLayer:
        """A folder written by PEFT's ``save_pretrained`` (adapter_config.json + safetensors)."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = LoraConfig(**_config_fields(json.loads((folder / "adapter_config.json").read_text())))
            state = load_file(folder / "adapter_model.safetensors")
        except (OSError, ValueError, TypeError) as exc:
            raise CompositionError(f"{folder} is not a readable LoRA adapter folder: {exc}") from exc
        return cls(name, config, state, weight)


def _config_fields(data: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import fields

    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig)}
    return {k: v for k, v in data.items() if k in known and k not in ("peft_type", "task_type")}


def compose(base: torch.nn.Module, layers: Sequence[AdapterLayer]) -> PeftModel:
    """The base model with every layer loaded and active together, in eval mode.

    ``base`` is wrapped in place (PEFT injects LoRA modules into it); keep one composed model
    per base and swap layers on it rather than composing the same base twice.
    """
    from peft import get_peft_model

    if not layers:
        raise CompositionError("compose needs at least one adapter layer")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise CompositionError(f"adapter layer names must differ, got {names}")
    first, *rest = layers
    model = get_peft_model(base, first.config, adapter_name=first.name)
    _load_weights(model, first)
    for layer in rest:
        model.add_adapter(layer.name, layer.config)
        _load_weights(model, layer)
    _activate(model, [(layer.name, layer.weight) for layer in layers])
    log.info("adapters_composed", layers=names)
    return model.eval()


def swap_layer(model: PeftModel, layer: AdapterLayer, *, replaces: str | None = None) -> None:
    """Load ``layer`` and make it active in place of ``replaces`` (default: the layer of the same
    name), keeping the other active layers as they are. The old adapter's weights are freed."""
    old = replaces or layer.name
    active = dict(active_layers(model))
    if old not in active:
        raise CompositionError(f"no active adapter layer named {old!r}; active: {sorted(active)}")
    if old == layer.name:
        model.base_model.set_adapter([n for n in active if n != old])  # delete_adapter refuses an active one
    model.delete_adapter(old)
    for module in _lora_modules(model):
        module.__dict__.get(_TRAINED, {}).pop(old, None)
    model.add_adapter(layer.name, layer.config)
    _load_weights(model, layer)
    weights = [(n, w) for n, w in active.items() if n != old]
    at = list(active).index(old)
    weights.insert(at, (layer.name, layer.weight))
    _activate(model, weights)
    model.eval()


def merge_layers(model: PeftModel) -> torch.nn.Module:
    """The base model with the active layers (at their weights) folded into its weights."""
    names = [name for name, _ in active_layers(model)]
    return model.merge_and_unload(adapter_names=names)


def active_layers(model: PeftModel) -> list[tuple[str, float]]:
    """(name, weight) of each active layer, in composition order."""
    weights: dict[str, float] = getattr(model, "_memlane_layer_weights", {})
    return [(name, weights.get(name, 1.0)) for name in model.base_model.active_adapters]


def _load_weights(model: PeftModel, layer: AdapterLayer) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(layer.state_dict), adapter_name=layer.name)
    missing = [k for k in result.missing_keys if f".{layer.name}." in k and "lora_" in k]
    if missing:
        raise CompositionError(f"adapter layer {layer.name!r} lacks {len(missing)} LoRA weights, e.g. {missing[0]}")
    if result.unexpected_keys:
        raise CompositionError(
            f"adapter layer {layer.name!r} has weights for modules the model lacks, e.g. {result.unexpected_keys[0]}"
        )


def _lora_modules(model: PeftModel) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _activate(model: PeftModel, weights: Sequence[tuple[str, float]]) -> None:
    """Make these adapters active together, each at ``weight`` times its trained alpha / r."""
    model.base_model.set_adapter([name for name, _ in weights], inference_mode=True)
    for module in _lora_modules(model):
        trained = module.__dict__.setdefault(_TRAINED, {})  # alpha / r as PEFT set it at load
        for name, weight in weights:
            if name in module.scaling:
                module.scaling[name] = trained.setdefault(name, module.scaling[name]) * weight
    model._memlane_layer_weights = dict(weights)
