"""The LLM extractor: what it sends, how it validates and filters, and a broken-JSON teacher
end to end (retried, dead-lettered, visible through the API and the CLI; the chat unharmed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import respx

from learner import ExtractionError, LLMExtractor, OpenAICompatibleCompleter
from learner.extractor import ExtractedFact
from learner.llm_extract import post_filter, visible_user_text

TEACHER = "http://teacher.test/v1"


def answer(content: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                  "finish_reason": "stop"}]})


def fact(statement: str, evidence: str, **kw) -> dict:
    return {"statement": statement, "subject": "user", "relation": "r", "object": "o", "memory_type": "fact",
            "truth_category": "CONTEXTUAL", "confidence": 0.8, "domains": ["health"], "entities": [],
            "evidence": evidence, **kw}


def extractor() -> LLMExtractor:
    return LLMExtractor(OpenAICompatibleCompleter(TEACHER, "gpt-4o-mini", api_key="sk-teacher",
                                                  client=httpx.Client()))


@respx.mock(assert_all_called=True)
def test_only_the_users_turn_without_the_injected_block_reaches_the_teacher(respx_mock):
    text = ("Things the user has told you in earlier conversations, remembered by memlane.\n"
            "<user_profile>\n  <memory>The user lives in Paris.</memory>\n</user_profile>\n"
            "I am allergic to peanuts.\n```\nI am a code comment\n```")
    route = respx_mock.post(f"{TEACHER}/chat/completions").mock(return_value=answer(json.dumps(
        {"facts": [fact("The user is allergic to peanuts.", "I am allergic to peanuts.")]})))
    facts = extractor().extract(text)
    assert [(f.statement, f.memory_type.value, f.domains) for f in facts] == [
        ("The user is allergic to peanuts.", "FACT", ("health",))]
    sent = json.loads(route.calls[0].request.content)
    assert route.calls[0].request.headers["authorization"] == "Bearer sk-teacher"
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert "peanuts" in sent["messages"][1]["content"]
    for absent in ("Paris", "user_profile", "remembered by memlane", "code comment"):
        assert absent not in sent["messages"][1]["content"]


@respx.mock(assert_all_called=True)
def test_invalid_output_is_asked_again_then_raised_without_its_text(respx_mock):
    route = respx_mock.post(f"{TEACHER}/chat/completions").mock(
        side_effect=[answer('{"facts": [{"statement": "The user'), answer('{"facts": [{"statement": 3}]}')])
    with pytest.raises(ExtractionError, match="invalid output from llm:gpt-4o-mini after 2 tries") as info:
        extractor().extract("I keep bees.")
    assert route.call_count == 2
    repair = json.loads(route.calls[1].request.content)["messages"]
    assert repair[-1]["role"] == "user" and "not valid" in repair[-1]["content"]
    assert "bees" not in str(info.value)


@respx.mock(assert_all_called=True)
def test_a_valid_retry_is_used(respx_mock):
    respx_mock.post(f"{TEACHER}/chat/completions").mock(side_effect=[
        answer("Sure! Here you go"), answer(json.dumps({"facts": [fact("The user keeps bees.", "I keep bees")]}))])
    assert [f.statement for f in extractor().extract("I keep bees.")] == ["The user keeps bees."]


@respx.mock(assert_all_called=True)
def test_an_unreachable_teacher_is_an_extraction_error(respx_mock):
    respx_mock.post(f"{TEACHER}/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ExtractionError, match="unreachable"):
        extractor().extract("I keep bees.")


def test_an_empty_turn_after_stripping_asks_nothing():
    assert extractor().extract("<user_profile><memory>The user keeps bees.</memory></user_profile>") == []
    assert visible_user_text("```\nI am code\n```") == ""


@pytest.mark.parametrize(("text", "statement", "evidence"), [
    ("What am I allergic to?", "The user is allergic to something.", "What am I allergic to"),
    ("If I were rich I would buy a boat.", "The user would buy a boat.", "I would buy a boat"),
    ("My sister is a nurse.", "The user is a nurse.", "My sister is a nurse"),
    ('She told me "I love opera" yesterday.', "The user loves opera.", "I love opera"),
    ("Tom lives in Rome.", "The user's friend lives in Rome.", "Tom lives in Rome"),
    ("I keep bees.", "The user lives in Paris.", "I live in Paris"),  # not in the text
])
def test_the_post_filter_drops_what_the_user_did_not_say_about_themselves(text, statement, evidence):
    assert post_filter([ExtractedFact(statement=statement, evidence=evidence)], text) == []


def test_the_post_filter_keeps_first_person_facts_and_their_things():
    facts = [ExtractedFact(statement="The user keeps bees.", evidence="I keep bees"),
             ExtractedFact(statement="The user's dog is a beagle.", subject="user.dog", evidence="my dog is a beagle")]
    assert post_filter(facts, "I keep bees, and my dog is a beagle.") == facts
    other = ExtractedFact(statement="The user's sister is a nurse.", subject="sister", evidence="my sister is a nurse")
    assert post_filter([other], "My sister is a nurse.") == []


def test_the_schema_rejects_statements_not_about_the_user():
    with pytest.raises(ValueError):
        ExtractedFact(statement="Paris is the capital of France.")
    with pytest.raises(ValueError):
        ExtractedFact(statement="The user likes what?")


# -- end to end: a real server, the fake OpenAI upstream on loopback as the teacher ----------


@pytest.fixture
def fake_upstream():
    from tests.e2e.fake_upstream import FakeUpstream

    with FakeUpstream() as fake:
        yield fake


@pytest.mark.slow
def test_a_teacher_sending_broken_json_dead_letters_the_job_and_the_chat_is_unharmed(tmp_path, fake_upstream):
    from openai import OpenAI

    from tests.e2e.conftest import start_server, upstream_config

    server = start_server(tmp_path, config=upstream_config(fake_upstream), env={
        "OPENAI_API_KEY": "sk-upstream-test", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false",
        "MEMLANE_LEARNER_EXTRACTOR": "llm", "MEMLANE_LEARNER_LLM_MODEL": "gpt-4o-mini",
        "MEMLANE_LEARNER_MAX_ATTEMPTS": "3", "MEMLANE_LEARNER_BACKOFF_S": "0.05",
    })
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        text = 'I wrote {"facts": [broken} in my notes.'
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "system", "content": "Be terse."}, {"role": "user", "content": text}])
        assert reply.choices[0].message.content == f"You said: {text}"  # the fake upstream's echo

        dead = []
        deadline = time.monotonic() + 60
        while not dead and time.monotonic() < deadline:
            dead = httpx.get(f"{server.base_url}/learner/jobs", params={"state": "dead"}).json()["data"]
            time.sleep(0.2)
        assert len(dead) == 1, server.logs()[-3000:]
        job = dead[0]
        assert job["attempts"] == 3 and "invalid output from llm:gpt-4o-mini" in job["last_error"]
        assert "input" not in job  # a listing does not carry the user's words
        teacher_calls = [r for r in fake_upstream.state.requests
                         if r["messages"][0]["content"].startswith("You extract durable facts")]
        assert len(teacher_calls) >= 6  # 3 attempts x (1 + 1 repair)
        assert all("Be terse" not in json.dumps(r) and "You said" not in r["messages"][1]["content"]
                   for r in teacher_calls)
        assert client.chat.completions.create(  # the learner's trouble never reached the client
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content

        env = {**os.environ, "MEMLANE_EMBEDDER": "hash", "COLUMNS": "200"}
        shown = subprocess.run([sys.executable, "-m", "proxy.cli", "learner", "dead-letters", "--db", str(server.db),
                                "--url", server.url], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert shown.returncode == 0 and job["id"] in shown.stdout and "invalid output" in shown.stdout
        retried = httpx.post(f"{server.base_url}/learner/jobs/{job['id']}/retry")
        assert retried.status_code == 200 and retried.json()["state"] == "pending"
        assert retried.json()["attempts"] == 0
        again = httpx.post(f"{server.base_url}/learner/jobs/{job['id']}/retry")
        assert again.status_code in (200, 409)
    finally:
        server.terminate()
