"""The offline text corpus: Python's own reference documentation, as bytes.

Source: ``pydoc_data.topics.topics``, the dict of ~80 Language Reference / library topics
("assignment", "exceptions", "formatstrings", ...) that ships inside every CPython install
(Lib/pydoc_data/topics.py, generated from the CPython docs, PSF licence). Under Python 3.11.7
it holds 466,273 bytes (UTF-8) of English technical prose with code. It needs no network and no
download; it changes only with the Python version, whose version string ``corpus_info``
reports alongside a SHA-256 of the text so a figure can name exactly what it was measured on.

Gathering: the topics are joined in sorted key order with blank lines, encoded as UTF-8 and
read as bytes (the model's vocabulary is the 256 byte values). The last 5% is held out for
validation.
"""

from __future__ import annotations

import hashlib
import platform

import torch

VALIDATION_FRACTION = 0.05


def corpus_bytes() -> bytes:
    """The whole corpus, deterministic for a given Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def corpus_info() -> dict[str, str | int]:
    data = corpus_bytes()
    return {"source": "pydoc_data.topics (CPython standard library)", "python": platform.python_version(),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def corpus_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte streams as long tensors."""
    data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
    cut = int(len(data) * (1 - VALIDATION_FRACTION))
    return data[:cut], data[cut:]


def text_batch(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream: inputs (B, L) and next-byte targets (B, L)."""
    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    windows = torch.stack([stream[s : s + length + 1] for s in starts.tolist()])  # (B, L + 1)
    return windows[:, :-1], windows[:, 1:]
