"""The product in its smallest complete form: offline, no upstream, no API key.

A user tells memlane a fact in one conversation and, in a later separate conversation, the
embedded SmolLM2 answers with it. Real everything: uvicorn on loopback, the openai SDK,
DuckDB with HNSW, all-MiniLM-L6-v2 embeddings and the local model.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.slow
MODEL = "local/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory, model_cache_dir) -> Server:
    server = start_server(tmp_path_factory.mktemp("offline"), config="", env={"MEMLANE_MODEL_CACHE": str(model_cache_dir)},
                          ready_timeout=240)
    yield server
    server.terminate()


def wait_for_memory(server: Server, user: str, needle: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = httpx.get(f"{server.base_url}/memories", headers={"x-memlane-user": user}).json()["data"]
        if any(needle in m["content"] for m in data):
            return data
        time.sleep(0.2)
    raise AssertionError(f"no memory with {needle!r} for {user} after {timeout}s")


def ask(client: openai.OpenAI, text: str, user: str) -> str:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], user=user, max_tokens=40, temperature=0)
    return answer.choices[0].message.content or ""


def test_models_list_offers_the_local_model(offline: Server):
    client = openai.OpenAI(base_url=offline.base_url, api_key="unused")
    assert MODEL in [m.id for m in client.models.list()]


def test_a_fact_told_once_is_used_in_a_later_conversation(offline: Server):
    client = openai.OpenAI(base_url=offline.base_url, api_key="unused", max_retries=0)
    ask(client, "I'm allergic to peanuts.", user="ada")
    memories = wait_for_memory(offline, "ada", "peanuts")
    assert [m["content"] for m in memories] == ["The user is allergic to peanuts."]
    later = ask(client, "What am I allergic to?", user="ada")
    assert "peanut" in later.lower(), later


def test_memories_do_not_cross_users_and_streaming_works(offline: Server):
    client = openai.OpenAI(base_url=offline.base_url, api_key="unused", max_retries=0)
    ask(client, "My dog is called Biscuit.", user="grace")
    wait_for_memory(offline, "grace", "Biscuit")

    def streamed(user: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is my dog's name?"}], user=user,
            max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens > 0
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert "Biscuit" in streamed("grace")
    assert "Biscuit" not in streamed("linus")  # another user never sees grace's memory
