"""pip-installable clients against a running memlane: LangChain's ChatOpenAI and litellm used as a
client, each with `base_url`/`api_base` pointing at memlane, streaming and not.

Each client works as its own memlane user (`X-Memlane-User`), holding one memory, so every test
also checks that the memory reached the upstream request: the client needs nothing but the URL.
"""

from __future__ import annotations

import httpx
import litellm
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from tests.e2e.conftest import Server
from tests.e2e.fake_upstream import FakeUpstream

FACTS = {"langchain-user": "The user keeps bees on a rooftop in Porto.",
         "litellm-user": "The user plays the cello in a string quartet."}


@pytest.fixture(scope="module", autouse=True)
def memories(proxied: Server) -> None:
    for user, fact in FACTS.items():
        r = httpx.post(f"{proxied.base_url}/memories", json={"content": fact}, headers={"x-memlane-user": user})
        assert r.status_code in (200, 201), r.text


def upstream_saw(fake: FakeUpstream, question: str) -> str:
    """The system text of the last upstream request that asked `question`."""
    for body in reversed(fake.state.requests):
        if any(m.get("content") == question for m in body["messages"] if m["role"] == "user"):
            return " ".join(str(m.get("content")) for m in body["messages"] if m["role"] == "system")
    raise AssertionError(f"the upstream never saw {question!r}")


def chat_model(server: Server, **options) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="unused", max_retries=0,
                      default_headers={"X-Memlane-User": "langchain-user"}, **options)


def test_langchain_invoke(proxied: Server, fake_upstream: FakeUpstream):
    question = "Which city has the rooftop where the user keeps bees?"
    answer = chat_model(proxied).invoke([SystemMessage("Answer briefly."), HumanMessage(question)])
    assert answer.content == f"You said: {question}"
    assert answer.usage_metadata["total_tokens"] == 15
    seen = upstream_saw(fake_upstream, question)
    assert "Answer briefly." in seen and FACTS["langchain-user"] in seen
    assert FACTS["litellm-user"] not in seen  # another user's memory stays out


def test_langchain_stream(proxied: Server, fake_upstream: FakeUpstream):
    question = "Tell me why the user keeps bees on a rooftop"
    chunks = list(chat_model(proxied, stream_usage=True).stream(question))
    assert "".join(c.content for c in chunks).strip() == f"You said: {question}"
    assert len(chunks) > 3  # it really streamed, word by word
    assert sum(c.usage_metadata["total_tokens"] for c in chunks if c.usage_metadata) == 15
    assert FACTS["langchain-user"] in upstream_saw(fake_upstream, question)


async def test_langchain_async_stream(proxied: Server):
    question = "bees async"
    text = "".join([c.content async for c in chat_model(proxied).astream(question)])
    assert text.strip() == f"You said: {question}"


def litellm_call(server: Server, question: str, **options):
    return litellm.completion(
        model="openai/gpt-4o-mini", api_base=server.base_url, api_key="unused",
        messages=[{"role": "user", "content": question}],
        extra_headers={"X-Memlane-User": "litellm-user"}, num_retries=0, **options)


def test_litellm_completion(proxied: Server, fake_upstream: FakeUpstream):
    question = "Does the user play the cello in a quartet?"
    answer = litellm_call(proxied, question)
    assert answer.choices[0].message.content == f"You said: {question}"
    assert answer.usage.total_tokens == 15
    seen = upstream_saw(fake_upstream, question)
    assert FACTS["litellm-user"] in seen and FACTS["langchain-user"] not in seen


def test_litellm_streaming(proxied: Server, fake_upstream: FakeUpstream):
    question = "Which string quartet does the user play the cello in?"
    chunks = list(litellm_call(proxied, question, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == f"You said: {question}"
    assert [c.usage.total_tokens for c in chunks if getattr(c, "usage", None)][-1] == 15
    assert FACTS["litellm-user"] in upstream_saw(fake_upstream, question)


async def test_litellm_async_streaming(proxied: Server):
    question = "cello async"
    stream = await litellm.acompletion(
        model="openai/gpt-4o-mini", api_base=proxied.base_url, api_key="unused", stream=True,
        messages=[{"role": "user", "content": question}], extra_headers={"X-Memlane-User": "litellm-user"})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.strip() == f"You said: {question}"


def test_litellm_sees_memlane_errors_as_openai_errors(proxied: Server):
    with pytest.raises(litellm.BadRequestError) as caught:
        litellm_call(proxied, "hi", temperature="hot")
    assert "temperature" in str(caught.value)
