"""Shared fixtures. Nothing here reaches the network: upstreams are respx routes or fake
servers on loopback, models load from installed packages."""

from __future__ import annotations

import os

import pytest

# Set before anything imports transformers, sentence-transformers or litellm.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DISABLE_AIOHTTP_TRANSPORT", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """One dequantized-weights cache for the whole run; MEMLANE_TEST_MODEL_CACHE reuses one across runs."""
    shared = os.environ.get("MEMLANE_TEST_MODEL_CACHE")
    if shared:
        return shared
    return tmp_path_factory.mktemp("model-cache")
