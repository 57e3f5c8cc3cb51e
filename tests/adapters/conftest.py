"""Fixtures shared by the personal-model tests: a tiny random Llama standing in for SmolLM2.

A module that needs another base (the real SmolLM2, another size) defines its own `runtime`,
which takes precedence over this one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.plm import BaseSpec, PLMRuntime
from tests.adapters.plm_helpers import tiny_llama_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_cache_dir) -> Path:
    torch.set_num_threads(1)
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny"), Path(model_cache_dir))


@pytest.fixture(scope="module")
def runtime(tiny, model_cache_dir) -> PLMRuntime:
    return PLMRuntime.load(BaseSpec(cache_dir=Path(model_cache_dir), model_dir=tiny, name="tiny"))
