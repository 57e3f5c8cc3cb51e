"""The proxy serves the NML model through its local upstream, unchanged: an OpenAI chat
completion, streamed or not, from a tiny untrained NML model."""

from __future__ import annotations

import json

import torch

from adapters.nml.model import NMLConfig, NMLModel
from adapters.nml.serve import NMLChatModel


def _served() -> NMLChatModel:
    torch.manual_seed(0)
    cfg = NMLConfig(d_model=32, n_blocks=1, n_layers=1, d_hidden=16, n_heads=2, window=16, plasticity_span=8,
                    pm_slots=4, em_items=16, em_dim=8, neuromod_hidden=16)
    return NMLChatModel(model=NMLModel(cfg), name="nml-tiny")


async def test_proxy_serves_the_nml_model_as_its_local_model(tmp_path):
    from memory import HashEmbedder
    from proxy import create_app
    from tests.proxy.conftest import make_settings, running

    settings = make_settings(tmp_path, routes=[{"match": "local/*", "provider": "local", "strip_prefix": "local/"}])
    app = create_app(settings, embedder=HashEmbedder(), local_model=_served())
    async with running(app) as client:
        body = {"model": "local/nml-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
        r = await client.post("/v1/chat/completions", json={**body, "stream": True})
        events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == reply["choices"][0]["message"]["content"]  # greedy: the same bytes
