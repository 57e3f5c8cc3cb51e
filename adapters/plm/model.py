"""The Personal Language Model: a base causal LM with one small LoRA adapter per user.

The base is the embedded local model (SmolLM2-135M-Instruct from its GGUF, cached as
safetensors by `adapters.local_model`) or any Hugging Face causal-LM folder. It is never
changed: a user's knowledge lives in a LoRA adapter (~20 MB at r=16 on SmolLM2) that PEFT
adds on top, so "forget me" is deleting one file and the base can serve everyone else.

This module holds the model side: the LoRA hyperparameters, loading the base for training and
evaluation, wrapping it in a PEFT model, turning chat turns into token ids with the answer as
the only supervised span, and (de)serialising an adapter's weights as safetensors bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from adapters.local_model import LocalModel, LocalModelError

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("memlane.plm")

IGNORE = -100  # label of a position that carries no loss (prompt tokens, padding)
BLANK_ADAPTER = "blank"  # a zero-initialised adapter: the PEFT model then computes the base exactly


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Shape of every personal adapter (PEFT LoRA)."""

    r: int = 16  # rank of the update B @ A
    alpha: int = 32  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input, training only
    # attention (q, k, v, o) and the SwiGLU MLP (gate, up, down) of every decoder layer
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    def peft(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return cls(r=int(data["r"]), alpha=int(data["alpha"]), dropout=float(data["dropout"]),
                   target_modules=tuple(data["target_modules"]))


@dataclass(frozen=True, slots=True)
class BaseSpec:
    """Which base model: the default SmolLM2 GGUF, or a Hugging Face causal-LM folder."""

    cache_dir: Path  # where the dequantized SmolLM2 is cached (shared with the local model)
    model_dir: Path | None = None  # any HF causal-LM folder; None: SmolLM2-135M-Instruct
    name: str | None = None  # defaults to the folder's (or GGUF's) name
    device: str = "cpu"  # "cuda" runs in bf16

    def local_model(self) -> LocalModel:
        return LocalModel(cache_dir=self.cache_dir, model_dir=self.model_dir, name=self.name,
                          device=self.device)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def base_folder(spec: BaseSpec) -> Path:
    """The folder holding the base's safetensors, building the SmolLM2 cache if needed."""
    runtime = spec.local_model()
    ok, how = runtime.loadable()
    if not ok:
        raise LocalModelError(how)
    if how == "gguf":  # first use: dequantize once; the local model writes the cache
        runtime.load()
        runtime.close()
    return spec.model_dir if how == "folder" and spec.model_dir is not None else runtime.cache_path


class PLMRuntime:
    """The base model and tokenizer, loaded once, for training and evaluating adapters.

    `peft_model` wraps the base in PEFT with a zero adapter; `fresh_adapter` and
    `load_adapter` add named adapters next to it. The base weights are frozen throughout.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, lora: LoRAConfig | None = None) -> None:
        self.base = model
        self.tokenizer = tokenizer
        self.name = name
        self.lora = lora or LoRAConfig()
        self._peft: Any = None

    @classmethod
    def load(cls, spec: BaseSpec, *, lora: LoRAConfig | None = None) -> PLMRuntime:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        folder = base_folder(spec)
        cuda = spec.device.startswith("cuda")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=torch.bfloat16 if cuda else torch.float32
            )
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
            raise LocalModelError(f"could not load the PLM base from {folder}: {exc}") from exc
        model = model.to(spec.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        name = spec.local_model().name
        log.info("plm_base_loaded", name=name, device=spec.device,
                 seconds=round(time.perf_counter() - started, 2))
        return cls(model, tokenizer, name=name, lora=lora)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def peft_model(self) -> Any:
        if self._peft is None:
            from peft import get_peft_model

            self._peft = get_peft_model(self.base, self.lora.peft(), adapter_name=BLANK_ADAPTER)
            self._peft.eval()
        return self._peft

    def fresh_adapter(self, name: str, *, seed: int = 0) -> Any:
        """A new trainable adapter (B = 0: starts as the base), made the active one."""
        import torch

        model = self.peft_model
        self.drop_adapter(name)
        torch.manual_seed(seed)  # LoRA's A is drawn at random
        model.add_adapter(name, self.lora.peft())
        model.set_adapter(name)
        model.eval()  # a new adapter's dropout layers start in training mode
        return model

    def load_adapter(self, name: str, weights: dict[str, torch.Tensor], lora: LoRAConfig | None = None) -> Any:
        """Adds an adapter from its state dict (see `adapter_bytes`) and activates it."""
        from peft import set_peft_model_state_dict

        model = self.peft_model
        self.drop_adapter(name)
        model.add_adapter(name, (lora or self.lora).peft())
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if missing:
            raise ValueError(f"adapter weights lack {len(missing)} LoRA tensors, e.g. {missing[0]}")
        model.set_adapter(name)
        model.eval()
        return model

    def drop_adapter(self, name: str) -> None:
        model = self.peft_model
        if name in model.peft_config:
            model.set_adapter(BLANK_ADAPTER)
            model.delete_adapter(name)
        model.set_adapter(BLANK_ADAPTER)

    def adapter_weights(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# -- adapter weights as bytes ---------------------------------------------------------------------


def adapter_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """An adapter's state dict as one safetensors blob (what is encrypted and stored)."""
    from safetensors.torch import save

    return save(weights)


def adapter_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)


# -- chat turns as token ids ----------------------------------------------------------------------


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template up to and including the assistant's header."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The assistant's answer followed by the end-of-turn token the template puts after it."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def supervised_pair(tokenizer: Any, messages: list[dict[str, str]], answer: str,
                    *, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE on the prompt, the answer ids on the answer.

    A long prompt is cut from the left (the question is at its end); the answer is kept whole
    up to max_tokens.
    """
    prompt, reply = prompt_ids(tokenizer, messages), answer_ids(tokenizer, answer)
    reply = reply[:max_tokens]
    prompt = prompt[-max(max_tokens - len(reply), 1):]
    return [*prompt, *reply], [IGNORE] * len(prompt) + reply
