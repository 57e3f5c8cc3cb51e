import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from memory import BatchingEmbedder, HashEmbedder, MemoryStore, MiniLMEmbedder


class GatedEmbedder:
    """HashEmbedder that records each batch and can hold the model busy."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.inner = HashEmbedder()
        self.dim = self.inner.dim
        self.batches: list[list[str]] = []
        self.busy = threading.Event()  # set while a batch is inside the model
        self.release = threading.Event()
        self.release.set()
        self.fail_with = fail_with

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.busy.set()
        self.release.wait(timeout=5)
        if self.fail_with is not None:
            raise self.fail_with
        return self.inner.embed(texts)


async def wait_until_busy(model: GatedEmbedder) -> None:
    assert await asyncio.to_thread(model.busy.wait, 5)


# -- HashEmbedder -------------------------------------------------------------


def test_hash_embedder_is_deterministic_unit_vectors_ranking_by_word_overlap() -> None:
    embedder = HashEmbedder()
    texts = ["The user is allergic to peanuts.", "Allergic to PEANUTS", "I like sailing", "!!!"]
    vectors = embedder.embed(texts)

    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(vectors, HashEmbedder().embed(texts))
    assert vectors[0] @ vectors[1] > 0.5 > abs(vectors[0] @ vectors[2])
    assert HashEmbedder(dim=16).embed(["x"]).shape == (1, 16)
    assert HashEmbedder().embed([]).shape == (0, 384)


def test_minilm_embedder_does_not_load_on_construction() -> None:
    embedder = MiniLMEmbedder()
    assert embedder.dim == 384 and embedder.loaded is False
    assert embedder.embed([]).shape == (0, 384)
    assert embedder.loaded is False


# -- BatchingEmbedder ----------------------------------------------------------


async def test_calls_arriving_while_the_model_is_busy_share_one_batch() -> None:
    model = GatedEmbedder()
    batcher = BatchingEmbedder(model)
    model.release.clear()

    first = asyncio.create_task(batcher.embed_one("first"))
    await wait_until_busy(model)  # the first call started a batch on its own
    texts = [f"text {i}" for i in range(10)]
    rest = [asyncio.create_task(batcher.embed_one(t)) for t in texts]
    await asyncio.sleep(0.05)
    model.release.set()
    results = await asyncio.gather(first, *rest)

    assert model.batches == [["first"], texts]
    assert batcher.batches_run == 2 < len(results)
    expected = HashEmbedder().embed(["first", *texts])
    for got, want in zip(results, expected):
        assert got.shape == (384,) and got.dtype == np.float32
        assert np.array_equal(got, want)


async def test_concurrent_callers_need_fewer_model_calls_than_callers() -> None:
    model = GatedEmbedder()
    batcher = BatchingEmbedder(model)
    texts = [f"memory {i}" for i in range(40)]

    results = await asyncio.gather(*(batcher.embed_one(t) for t in texts))

    assert len(model.batches) < len(texts)
    assert np.array_equal(np.stack(results), HashEmbedder().embed(texts))


async def test_batches_are_capped_at_max_batch() -> None:
    model = GatedEmbedder()
    batcher = BatchingEmbedder(model, max_batch=4)
    model.release.clear()
    first = asyncio.create_task(batcher.embed_one("first"))
    await wait_until_busy(model)
    rest = [asyncio.create_task(batcher.embed_one(f"t{i}")) for i in range(10)]
    await asyncio.sleep(0.05)
    model.release.set()
    await asyncio.gather(first, *rest)

    assert [len(batch) for batch in model.batches] == [1, 4, 4, 2]


async def test_a_failing_batch_raises_in_every_caller_and_the_next_call_works() -> None:
    model = GatedEmbedder(fail_with=RuntimeError("model crashed"))
    batcher = BatchingEmbedder(model)

    outcomes = await asyncio.gather(
        *(batcher.embed_one(f"t{i}") for i in range(5)), return_exceptions=True
    )
    assert len(outcomes) == 5
    assert all(isinstance(o, RuntimeError) and str(o) == "model crashed" for o in outcomes)

    model.fail_with = None
    assert (await batcher.embed_one("again")).shape == (384,)


async def test_a_cancelled_caller_does_not_break_the_others() -> None:
    model = GatedEmbedder()
    batcher = BatchingEmbedder(model)
    model.release.clear()
    first = asyncio.create_task(batcher.embed_one("first"))
    await wait_until_busy(model)
    doomed = asyncio.create_task(batcher.embed_one("doomed"))
    kept = asyncio.create_task(batcher.embed_one("kept"))
    await asyncio.sleep(0)
    doomed.cancel()
    model.release.set()

    assert (await kept).shape == (384,) and (await first).shape == (384,)
    assert model.batches == [["first"], ["kept"]]
    assert doomed.cancelled()


def test_batching_embedder_built_outside_a_loop_serves_successive_loops() -> None:
    batcher = BatchingEmbedder(HashEmbedder())

    async def one(text: str) -> np.ndarray:
        return await batcher.embed_one(text)

    assert asyncio.run(one("a")).shape == (384,)
    assert np.array_equal(asyncio.run(one("b")), HashEmbedder().embed(["b"])[0])


# -- the real model ------------------------------------------------------------


@pytest.mark.slow
def test_minilm_ranks_the_peanut_allergy_first_for_a_food_question(tmp_path: Path) -> None:
    embedder = MiniLMEmbedder()
    with MemoryStore.open(tmp_path / "m.duckdb", embedder=embedder) as store:
        for content in [
            "The user is allergic to peanuts.",
            "The user lives in Berlin.",
            "The user works as a software engineer.",
            "The user's favourite colour is blue.",
            "The user has a daughter named Emma.",
        ]:
            store.add("alice", content, source="test")
        assert embedder.loaded

        results = store.search_text("alice", "What food should I avoid?", k=5, min_score=-1.0)

    print(f"\nMiniLM cosines for 'What food should I avoid?': "
          + ", ".join(f"{m.content!r}={m.score.total:.3f}" for m in results))
    assert results[0].content == "The user is allergic to peanuts."
    assert results[0].score.total > results[1].score.total


# -- MiniLM through ONNX Runtime -----------------------------------------------

TEXTS = [
    "I'm allergic to peanuts.",
    "What should I cook tonight?",
    "My dog is called Biscuit and he hates the vacuum cleaner.",
    "tabs",
    " ".join(["I keep a diary of every trip I have taken across Europe and Asia."] * 40),  # > 256 tokens
]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export for the module (~8 s)."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    embedder = MiniLMEmbedder(cache_dir=cache, backend="onnx")
    embedder.load()
    return cache


def test_onnx_embeddings_are_sentence_transformers_embeddings(onnx_cache: Path) -> None:
    onnx = MiniLMEmbedder(cache_dir=onnx_cache, backend="onnx")
    torch_ = MiniLMEmbedder(backend="torch")
    got, expected = onnx.embed(TEXTS), torch_.embed(TEXTS)
    assert onnx.runtime == "onnx" and torch_.runtime == "torch"
    assert got.shape == (5, 384) and got.dtype == np.float32
    assert np.min(np.sum(got * expected, axis=1)) > 0.9999
    # padding inside a batch changes nothing: each text alone gives the same vector
    alone = np.stack([onnx.embed([t])[0] for t in TEXTS])
    assert np.allclose(alone, got, atol=1e-5)


def test_a_second_load_reuses_the_export_and_a_damaged_one_is_exported_again(onnx_cache: Path) -> None:
    graph = onnx_cache / "all-minilm-l6-v2-onnx" / "model.onnx"
    before = graph.stat().st_mtime_ns
    MiniLMEmbedder(cache_dir=onnx_cache, backend="onnx").embed(["hello"])
    assert graph.stat().st_mtime_ns == before

    graph.write_bytes(b"not a graph")
    embedder = MiniLMEmbedder(cache_dir=onnx_cache, backend="onnx")
    vector = embedder.embed(["I'm allergic to peanuts."])[0]
    assert embedder.runtime == "onnx" and graph.stat().st_size > 1_000_000
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_auto_without_a_cache_runs_on_torch_and_onnx_without_one_refuses() -> None:
    auto = MiniLMEmbedder()
    auto.load()
    assert auto.runtime == "torch" and "cache_dir" in auto.backend_note
    with pytest.raises(RuntimeError, match="cache_dir"):
        MiniLMEmbedder(backend="onnx").load()
    with pytest.raises(ValueError):
        MiniLMEmbedder(backend="tensorflow")


def test_onnx_runs_stay_within_the_token_budget_and_give_the_same_vectors(onnx_cache: Path) -> None:
    """A burst of queries (the batching embedder sends up to 64 at once) is split into runs of at
    most MAX_RUN_TOKENS padded tokens, which bounds what ONNX Runtime's arena keeps; the vectors
    are those of each text embedded alone, in the caller's order."""
    from memory.embed_onnx import MAX_RUN_TOKENS

    embedder = MiniLMEmbedder(cache_dir=onnx_cache, backend="onnx")
    embedder.load()
    model = embedder._model
    shapes: list[tuple[int, int]] = []
    run = model._session.run

    def recording_run(outputs, feed):  # type: ignore[no-untyped-def]
        shapes.append(feed["input_ids"].shape)
        return run(outputs, feed)

    model._session = type("Recording", (), {"run": staticmethod(recording_run)})()
    texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(64)]
    got = embedder.embed(texts)
    assert len(shapes) > 1 and all(rows * width <= MAX_RUN_TOKENS or rows == 1 for rows, width in shapes)
    assert sum(rows for rows, _ in shapes) == 64
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    assert np.allclose(alone, got, atol=1e-5)


def test_the_onnx_arena_has_its_full_size_after_load_and_does_not_step_up_under_load(onnx_cache: Path) -> None:
    """ONNX Runtime's CPU arena keeps the largest buffers a run ever needed. The embedder runs the
    largest shape once at load, so a later burst of long texts (the largest runs there can be)
    does not grow the process's heap: memory after start-up is what it stays at."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2

    def heap_in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    embedder = MiniLMEmbedder(cache_dir=onnx_cache, backend="onnx")
    embedder.load()
    embedder.embed(["a first short query"])
    before = heap_in_use()
    long_text = " ".join(["The user keeps a long diary of every trip across Europe."] * 40)
    for rows in (2, 4, 8, 64):
        embedder.embed([f"{long_text} {i}" for i in range(rows)])
    embedder.embed([f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(64)])
    assert heap_in_use() - before < 16 * 2**20  # without the warm-up: +64 MiB here
