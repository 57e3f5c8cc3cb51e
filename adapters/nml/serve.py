"""The NML model as a local chat model the proxy can serve.

``NMLChatModel`` has the surface ``proxy/local.py`` uses of ``adapters.LocalModel``: ``name``,
``loaded``, ``load()``, ``loadable()``, ``prompt_tokens(messages)``,
``generate(messages, params) -> Generation`` and ``close()``; it reuses that module's
``Generation`` (the async iterator of text deltas) and its stop-string handling, so streaming,
cancellation and finish reasons behave the same. Generation runs on one worker thread.

Messages become bytes with a plain template ("system: ...\\nuser: ...\\nassistant: "). With a
``UserStateStore`` and a ``user_id`` the prompt is read in that user's state (their PM and EM
memories), read-only: generation never commits; the learner's ``feed`` is what writes.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import structlog
import torch

from adapters.local_model import (
    _END,
    Generation,
    GenerationParams,
    LocalModelError,
    _Job,
    _pick_token,
    _StopMatcher,
    chat_messages,
)
from adapters.nml.model import NMLModel
from adapters.nml.user_state import UserStateStore, encode

log = structlog.get_logger(__name__)

CONTEXT_BYTES = 8192  # prompt bytes read; older ones are dropped (the memories hold the past)


def format_prompt(messages: list[dict]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in chat_messages(messages)]
    return "\n".join(lines) + "\nassistant: "


class _ByteDecoder:
    """Bytes -> text deltas that never split a UTF-8 character."""

    def __init__(self) -> None:
        self.buffer = b""

    def push(self, byte: int) -> str:
        self.buffer += bytes([byte])
        try:
            text, self.buffer = self.buffer.decode("utf-8"), b""
            return text
        except UnicodeDecodeError:
            if len(self.buffer) >= 4:  # not a character: drop it
                self.buffer = b""
            return ""


class NMLChatModel:
    """A trained NML checkpoint served as a chat model; loads on ``load()``."""

    def __init__(self, *, checkpoint: Path | None = None, model: NMLModel | None = None, name: str = "nml",
                 store_root: Path | None = None, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        self._checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._model = model.to(device).eval() if model is not None else None
        self._store_root = store_root
        self.store = UserStateStore(self._model, store_root) if self._model is not None and store_root else None
        self._load_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def loadable(self) -> tuple[bool, str]:
        if self._model is not None:
            return True, "memory"
        if self._checkpoint is not None and self._checkpoint.exists():
            return True, "checkpoint"
        return False, f"no NML checkpoint at {self._checkpoint}: train one with `memlane nml train`"

    def load(self) -> None:
        from adapters.nml.train import load_checkpoint

        with self._load_lock:
            if self._model is not None:
                return
            ok, why = self.loadable()
            if not ok:
                raise LocalModelError(why)
            self._model = load_checkpoint(self._checkpoint, self.device)
            if self._store_root is not None:
                self.store = UserStateStore(self._model, self._store_root)
            log.info("nml_model_loaded", name=self.name, parameters=self._model.num_parameters())

    def feed(self, user_id: str, text: str):
        """Streams one interaction into the user's memories (what the learner calls); returns a
        ``FeedResult``. Needs ``store_root``."""
        self.load()
        if self.store is None:
            raise LocalModelError("this NML model was built without store_root: it keeps no per-user state")
        return self.store.feed(user_id, text)

    def prompt_tokens(self, messages: list[dict]) -> int:
        return min(len(encode(format_prompt(messages))), CONTEXT_BYTES)

    def generate(self, messages: list[dict], params: GenerationParams, *, user_id: str | None = None) -> Generation:
        self.load()
        ids = encode(format_prompt(messages))[-CONTEXT_BYTES:]
        job = _Job(ids, params, params.max_new_tokens)
        job.user_id = user_id  # type: ignore[attr-defined]
        return Generation(self, job)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _submit(self, job: _Job) -> concurrent.futures.Future[None]:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nml")
            future = self._executor.submit(self._run, job)
        future.add_done_callback(lambda f: job.post(_END) if f.cancelled() else None)
        return future

    def _run(self, job: _Job) -> None:
        started = time.perf_counter()
        try:
            if not job.cancel.is_set():
                self._decode(job)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises LocalModelError from it
            job.post(exc)
        finally:
            log.info("nml_generation_done", name=self.name, prompt_tokens=len(job.prompt_ids),
                     completion_tokens=job.completion_tokens, seconds=round(time.perf_counter() - started, 3))
            job.post(_END)

    @torch.no_grad()
    def _decode(self, job: _Job) -> None:
        model, params = self._model, job.params
        assert model is not None
        user_id = getattr(job, "user_id", None)
        state = self.store.model_state(user_id) if self.store is not None and user_id else None
        device = next(model.parameters()).device
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        out = model(torch.tensor([job.prompt_ids], device=device), state, plastic=False)
        decoder, stops = _ByteDecoder(), _StopMatcher(params.stop)
        for _ in range(job.max_new_tokens):
            if job.cancel.is_set():
                return
            token = _pick_token(out.logits[0, -1], params, generator)
            job.completion_tokens += 1
            text, stopped = stops.feed(decoder.push(token))
            if text:
                job.post(text)
            if stopped:
                job.finish_reason = "stop"
                return
            out = model(torch.tensor([[token]], device=device), out.state, plastic=False)
        job.finish_reason = "length"
        if tail := stops.flush():
            job.post(tail)
