"""The learner's HTTP surface: external-learner leases, completions and failures, the jobs
listing with its dead letters, who may see what."""

from __future__ import annotations

import httpx
import pytest

from tests.proxy.conftest import (
    KEYS,
    PROXY_KEY,
    UPSTREAM,
    chat_body,
    completion_json,
    running,
)

TOKEN = "learner-secret"


@pytest.mark.respx(assert_all_called=True)
async def test_an_external_learner_leases_extracts_elsewhere_and_the_server_writes(app_factory, store, respx_mock):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    async with running(app_factory(learner="external")) as client:
        r = await client.post("/v1/chat/completions", json=chat_body("I keep bees."))
        request_id = r.headers["x-request-id"]
        for _ in range(200):  # written by the writer thread, never run by the server
            if store.get_job(request_id) is not None:
                break
            await _sleep()
        assert store.get_job(request_id).state == "pending" and store.list("default") == []

        leased = (await client.post("/v1/learner/jobs/lease", json={"owner": "w1", "limit": 4})).json()["data"]
        assert [(j["id"], j["input"], j["attempts"]) for j in leased] == [(request_id, "I keep bees.", 1)]
        bad = await client.post(f"/v1/learner/jobs/{request_id}/complete", json={
            "owner": "w1", "extractor": "llm:x", "facts": [{"statement": "Bees are insects."}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "facts.0.statement"
        fact = {"statement": "The user keeps bees.", "memory_type": "FACT", "domains": ["hobbies"],
                "evidence": "I keep bees"}
        wrong_owner = await client.post(f"/v1/learner/jobs/{request_id}/complete",
                                        json={"owner": "w2", "extractor": "llm:x", "facts": [fact]})
        assert wrong_owner.status_code == 409 and wrong_owner.json()["error"]["code"] == "lease_lost"
        done = await client.post(f"/v1/learner/jobs/{request_id}/complete",
                                 json={"owner": "w1", "extractor": "llm:x", "facts": [fact]})
        assert done.status_code == 200 and done.json()["state"] == "done"
        again = await client.post(f"/v1/learner/jobs/{request_id}/complete",
                                  json={"owner": "w1", "extractor": "llm:x", "facts": [fact]})
        assert again.status_code == 409  # a second completion changes nothing
    (memory,) = store.list("default")
    assert memory.content == "The user keeps bees." and memory.domains == ("hobbies",)
    assert [(s.ref, s.extractor) for s in memory.sources] == [(request_id, "llm:x")]


@pytest.mark.respx(assert_all_called=True)
async def test_failures_reported_by_an_external_learner_are_retried_then_dead(app_factory, store, respx_mock):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    async with running(app_factory(learner="external", learner_max_attempts=2, learner_backoff_s=0.001)) as client:
        await client.post("/v1/chat/completions", json=chat_body("I keep bees."))
        for attempt in (1, 2):
            for _ in range(200):
                leased = (await client.post("/v1/learner/jobs/lease", json={"owner": "w"})).json()["data"]
                if leased:
                    break
                await _sleep()
            (job,) = leased
            failed = await client.post(f"/v1/learner/jobs/{job['id']}/fail",
                                       json={"owner": "w", "error": "ExtractionError: broken JSON"})
            assert failed.json()["state"] == ("pending" if attempt == 1 else "dead")
        dead = (await client.get("/v1/learner/jobs", params={"state": "dead"})).json()
        assert [j["id"] for j in dead["data"]] == [job["id"]] and dead["counts"]["dead"] == 1
        assert dead["data"][0]["last_error"] == "ExtractionError: broken JSON"
        one = await client.get(f"/v1/learner/jobs/{job['id']}")
        assert one.json()["attempts"] == 2
        retried = await client.post(f"/v1/learner/jobs/{job['id']}/retry")
        assert retried.json()["state"] == "pending"
        assert (await client.post(f"/v1/learner/jobs/{job['id']}/retry")).status_code == 200
        missing = await client.post("/v1/learner/jobs/nope/retry")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        bad = await client.get("/v1/learner/jobs", params={"state": "sleeping"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "state"
        metrics = (await client.get("/metrics")).text
        assert 'memlane_learner_jobs_total{outcome="pending"} 1.0' in metrics
        assert 'memlane_learner_jobs_total{outcome="dead"} 1.0' in metrics


@pytest.mark.respx(assert_all_called=True)
async def test_with_user_keys_leasing_needs_the_learner_token_and_users_see_their_own_jobs(app_factory, respx_mock):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    app = app_factory(keys=KEYS, learner="external", learner_token=TOKEN)
    async with running(app) as client:
        auth = {"authorization": f"Bearer {PROXY_KEY}"}
        await client.post("/v1/chat/completions", json=chat_body("I keep bees."), headers=auth)
        refused = await client.post("/v1/learner/jobs/lease", json={"owner": "w"}, headers=auth)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "learner_token_required"
        token = {"x-memlane-learner-token": TOKEN}
        for _ in range(200):
            everyone = (await client.get("/v1/learner/jobs", headers=token)).json()["data"]
            if everyone:
                break
            await _sleep()
        assert [j["user_id"] for j in everyone] == ["alice"]
        team = (await client.get("/v1/learner/jobs", headers={"authorization": "Bearer sk-memlane-team"})).json()
        assert team["data"] == [] and "counts" not in team
        own = (await client.get("/v1/learner/jobs", headers=auth)).json()["data"]
        assert [j["user_id"] for j in own] == ["alice"]
        assert (await client.get("/v1/learner/jobs")).status_code == 401
        leased = await client.post("/v1/learner/jobs/lease", json={"owner": "w"}, headers=token)
        assert leased.status_code == 200 and len(leased.json()["data"]) == 1


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.02)
