"""`memlane learner --url` beside a MEMLANE_LEARNER=external server: the server keeps the
database, the learner process leases over HTTP; SIGKILLed mid-batch, its leases run out and
every job still completes once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import start_server, upstream_config
from tests.e2e.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[2]
TOKEN = "learner-token-e2e"


def learner(url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLANE_")}
    env.update({"MEMLANE_LEARNER_TOKEN": TOKEN, "MEMLANE_LEARNER_LEASE_S": "1", "MEMLANE_LOG_FORMAT": "json",
                "MEMLANE_EMBEDDER": "hash", "HF_HUB_OFFLINE": "1"})
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "learner", "--url", url, "--until-idle",
                             "--batch", "8", "--poll", "0.2"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after(process: subprocess.Popen, jobs: int) -> int:
    seen = 0
    timer = threading.Timer(120, process.kill)
    timer.start()
    for line in process.stderr:  # type: ignore[union-attr]
        if '"job_done"' in line:
            seen += 1
            if seen >= jobs:
                process.send_signal(signal.SIGKILL)
                break
    timer.cancel()
    process.wait(30)
    return seen


@pytest.mark.slow
def test_an_external_learner_killed_mid_batch_leaves_every_job_done_once(tmp_path):
    with FakeUpstream() as fake:
        server = start_server(tmp_path, config=upstream_config(fake), env={
            "OPENAI_API_KEY": "sk-upstream-test", "MEMLANE_EMBEDDER": "hash",
            "MEMLANE_PRELOAD_LOCAL_MODEL": "false", "MEMLANE_LEARNER": "external",
            "MEMLANE_LEARNER_TOKEN": TOKEN, "MEMLANE_MEMORY": "false",
        })
        try:
            client = OpenAI(base_url=server.base_url, api_key="unused")
            words = [f"{a}{b}" for a in ("zor", "quen", "mar", "vak", "pel", "dru") for b in ("bix", "tul", "osk", "ane", "rim", "gat")]
            for word in words:
                client.chat.completions.create(model="gpt-4o-mini",
                                               messages=[{"role": "user", "content": f"I collect {word} shells."}])
            jobs_url, headers = f"{server.base_url}/learner/jobs", {"x-memlane-learner-token": TOKEN}
            counts: dict = {}
            for _ in range(100):  # logged by the server's writer thread
                counts = httpx.get(jobs_url, headers=headers).json()["counts"]
                if counts["pending"] == len(words):
                    break
                time.sleep(0.1)
            assert counts["pending"] == len(words) and counts["done"] == 0  # the server extracts nothing itself

            assert kill_after(learner(server.url), 10) == 10
            for _ in range(3):  # the killed learner's leases run out after 1 s
                time.sleep(1.2)
                finished = learner(server.url)
                _, err = finished.communicate(timeout=120)
                assert finished.returncode == 0, err[-2000:]
                counts = httpx.get(jobs_url, headers=headers).json()["counts"]
                if counts["done"] == len(words):
                    break
            assert counts == {"pending": 0, "leased": 0, "done": len(words), "dead": 0}
            memories = httpx.get(f"{server.base_url}/memories", params={"limit": 1000}).json()["data"]
            assert sorted(m["content"] for m in memories) == sorted(f"The user collects {w} shells." for w in words)
            assert all(len(m["sources"]) == 1 for m in memories)
        finally:
            server.terminate()
