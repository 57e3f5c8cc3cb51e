"""Serving the personal model: the local model runtime with each user's live adapter.

`PersonalModel` is the embedded local model (same loading, cache, worker thread, token loop,
streaming and cancellation) whose torch model is wrapped in PEFT with a blank adapter. Each
generation carries the (user, version) whose adapter it needs; the worker thread, which runs
generations one at a time, activates that adapter just before decoding (loading and
decrypting it on first use) and the blank one for users without an adapter. So adapters
swap per request without a restart, and a newly accepted version (or a rollback) is served
from the next request on: the registry is read when a request arrives.

Up to `max_adapters` adapters stay loaded (least recently used evicted); one SmolLM2 adapter
at r=16 is ~20 MB of weights.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from adapters.local_model import Generation, GenerationParams, LocalModel, _Job
from adapters.plm.model import BLANK_ADAPTER, LoRAConfig
from adapters.plm.registry import AdapterRegistry

log = structlog.get_logger("memlane.plm.serve")


def adapter_name(user_id: str, version: int) -> str:
    """A PEFT adapter name (no dots: it becomes a module key) unique per user and version."""
    return f"u{hashlib.sha256(user_id.encode()).hexdigest()[:16]}_v{version}"


class PersonalModel(LocalModel):
    """A LocalModel that answers each user with their own adapter (`generate(..., user_id=)`)."""

    def __init__(
        self, *, registry: AdapterRegistry, cache_dir: Path, model_dir: Path | None = None,
        name: str | None = None, device: str = "cpu", lora: LoRAConfig | None = None, max_adapters: int = 8,
    ) -> None:
        super().__init__(cache_dir=cache_dir, model_dir=model_dir, name=name, device=device)
        self.registry = registry
        self.lora = lora or LoRAConfig()
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, None] = OrderedDict()  # loaded, least recently used first

    def _install(self, model: Any, tokenizer: Any) -> None:
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        super()._install(get_peft_model(model, self.lora.peft(), adapter_name=BLANK_ADAPTER), tokenizer)

    def generate(self, messages: list[dict], params: GenerationParams, *, user_id: str | None = None) -> Generation:
        """Without a user, or for a user with no live adapter, the base model answers."""
        live = self.registry.live(user_id) if user_id is not None else None
        generation = super().generate(messages, params)
        if live is not None:
            generation._job.adapter = (user_id, live.version)  # type: ignore[attr-defined]
        return generation

    def adapter_for(self, user_id: str) -> int | None:
        """The version a request of this user is answered with now (None: the base)."""
        live = self.registry.live(user_id)
        return live.version if live else None

    # -- worker thread ---------------------------------------------------------------------------

    def _decode(self, job: _Job) -> None:
        self._activate(getattr(job, "adapter", None))
        super()._decode(job)

    def _activate(self, wanted: tuple[str, int] | None) -> None:
        from peft import set_peft_model_state_dict

        model = self._model
        if wanted is None:
            model.set_adapter(BLANK_ADAPTER)
            return
        user_id, version = wanted
        name = adapter_name(user_id, version)
        if name not in self._adapters:
            weights = self.registry.load_weights(user_id, version)  # decrypts with the user's key
            model.add_adapter(name, self.lora.peft())
            set_peft_model_state_dict(model, weights, adapter_name=name)
            model.eval()  # the new adapter's dropout layers start in training mode
            self._adapters[name] = None
            self._evict()
            log.info("plm_adapter_loaded", adapter=name, loaded=len(self._adapters))
        self._adapters.move_to_end(name)
        model.set_adapter(name)

    def _evict(self) -> None:
        while len(self._adapters) > self.max_adapters:
            old, _ = self._adapters.popitem(last=False)
            self._model.set_adapter(BLANK_ADAPTER)
            self._model.delete_adapter(old)

    def unload_user(self, user_id: str) -> None:
        """Drops a user's loaded adapters (after a wipe). Safe only between generations: it is
        queued on the worker thread like a generation."""
        prefix = adapter_name(user_id, 0).rsplit("_v", 1)[0] + "_v"

        def drop() -> None:
            for name in [n for n in self._adapters if n.startswith(prefix)]:
                del self._adapters[name]
                self._model.set_adapter(BLANK_ADAPTER)
                self._model.delete_adapter(name)

        if self._model is not None:
            with self._executor_lock:
                executor = self._executor
            if executor is not None:
                executor.submit(drop).result()
            else:
                drop()
