"""The learner's parts built from settings: its extractor, retry and trigger policies.

Shared by the server (`proxy.app`) and `memlane learner` (`proxy.cli_learner`), so both extract
the same way. The LLM extractor's model is routed like a chat model (`settings.route_for`), but
called directly rather than through the proxy, so the learner's own calls are never logged,
injected with memories or learned from.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from learner import (
    Extractor,
    LiteLLMCompleter,
    LLMExtractor,
    LocalModelCompleter,
    OpenAICompatibleCompleter,
    RulesExtractor,
    TriggerPolicy,
)
from memory import RetryPolicy
from proxy.settings import Settings, SettingsError

__all__ = ["build_extractor", "retry_policy", "trigger_policy"]


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(max_attempts=settings.learner_max_attempts,
                       backoff=timedelta(seconds=settings.learner_backoff_s))


def trigger_policy(settings: Settings) -> TriggerPolicy:
    return TriggerPolicy(every=settings.learn_every, period=timedelta(hours=settings.learn_period_hours),
                         min_gap=timedelta(seconds=settings.learn_min_gap_s))


def build_extractor(settings: Settings, local_model: Any = None) -> Extractor:
    """Rules, or an LLM extractor asking `learner_llm_model` through its route."""
    if settings.learner_extractor == "rules":
        return RulesExtractor()
    model = settings.learner_llm_model
    route = settings.route_for(model)
    if route is None:
        raise SettingsError(f"learner_llm_model (MEMLANE_LEARNER_LLM_MODEL): no route for {model!r}")
    name = model.removeprefix(route.strip_prefix) if route.strip_prefix else model
    key = route.api_key.get_secret_value() if route.api_key else None
    timeout = min(settings.upstream_timeout_s, 120.0)
    if route.provider == "local":
        if local_model is None:
            from adapters import LocalModel

            local_model = LocalModel(cache_dir=settings.model_cache, model_dir=settings.local_model_dir,
                                     name=settings.local_model_name)
        return LLMExtractor(LocalModelCompleter(local_model))
    if route.provider == "openai":
        base = route.api_base or "https://api.openai.com/v1"
        return LLMExtractor(OpenAICompatibleCompleter(base, name, api_key=key, timeout_s=timeout))
    return LLMExtractor(LiteLLMCompleter(route.provider, name, api_base=route.api_base, api_key=key,
                                         timeout_s=timeout))
