"""Service settings: one frozen object, built once in ``main()`` and passed down.

Sources, lowest to highest priority: defaults, an optional TOML config file, ``MEMLANE_*``
environment variables, then explicit overrides (CLI flags). Upstream API keys are never part of
the config file: a route names the environment variable that holds its key (``api_key_env``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

Provider = Literal["openai", "anthropic", "ollama", "local", "plm"]
LOCAL_MODEL_NAME = "smollm2-135m-instruct"


# "sha256:<64 hex>" or "scrypt:<n>:<r>:<p>:<salt hex>:<derived key hex>" (`memlane keys hash`).
KEY_HASH_PATTERN = r"^(sha256:[0-9a-f]{64}|scrypt:[0-9]{1,8}:[0-9]{1,3}:[0-9]{1,3}:[0-9a-f]{16,128}:[0-9a-f]{32,128})$"


class KeyConfig(BaseModel):
    """A proxy API key and the user it stands for.

    Only a hash of the key is kept: a plain ``key`` is hashed (SHA-256) while the settings load
    and is not stored; ``key_sha256`` is the same hash given directly; ``key_hash`` takes either
    form with its algorithm named (``sha256:...`` or ``scrypt:...``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user: str = Field(min_length=1, max_length=128, pattern=r"^[^\s/]+$")  # "/" is reserved for sub-users
    key_hash: str = Field(pattern=KEY_HASH_PATTERN)
    sub_users: bool = False  # may pick a sub-user with `user` or X-Memlane-User
    rate_limit_rpm: int | None = Field(default=None, ge=0)  # this key's own limit; 0 = unlimited
    rate_limit_burst: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _hash_plain_key(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = [name for name in ("key", "key_sha256", "key_hash") if data.get(name) is not None]
        if len(given) != 1:
            raise ValueError(f"key for user {data.get('user')!r}: set exactly one of key, key_sha256 or key_hash")
        plain, digest = data.pop("key", None), data.pop("key_sha256", None)
        if plain is not None:
            plain = plain.get_secret_value() if isinstance(plain, SecretStr) else plain
            if not isinstance(plain, str) or not plain.strip():
                raise ValueError(f"key for user {data.get('user')!r}: a key is a non-empty string")
            data["key_hash"] = "sha256:" + hashlib.sha256(plain.encode()).hexdigest()
        elif digest is not None:
            data["key_hash"] = f"sha256:{str(digest).lower()}"
        elif isinstance(data["key_hash"], str) and data["key_hash"].startswith("sha256:"):
            data["key_hash"] = data["key_hash"].lower()
        return data


class RouteConfig(BaseModel):
    """Send models whose name matches ``match`` (a glob) to one upstream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str
    provider: Provider
    api_base: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    api_key: SecretStr | None = None  # resolved from api_key_env, never read from a file
    strip_prefix: str | None = None  # e.g. "ollama/" -> upstream sees "llama3"
    models: tuple[str, ...] = ()  # advertised by /v1/models

    def matches(self, model: str) -> bool:
        return fnmatch.fnmatchcase(model, self.match)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEMLANE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database: Path = Path("memlane.duckdb")
    model_cache: Path = Path.home() / ".cache" / "memlane" / "models"
    local_model_dir: Path | None = None  # any HF causal-LM folder; default: SmolLM2 GGUF
    local_model_name: str = LOCAL_MODEL_NAME
    preload_local_model: bool = True  # load in the background at start-up
    # torch intra-op threads for the embedder and the local model. One thread per op measured
    # best for a server on 2 cores: a query embedding took 9.6 ms of CPU with 1 thread and
    # 26 ms with 2 (idle threads spin), and concurrent requests keep the cores busy anyway.
    torch_threads: int = Field(default=1, ge=1, le=256)
    # How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
    # Learning runs and view builds run Python on background threads; at 5 ms every request
    # the event loop serves meanwhile waited in 5 ms steps.
    switch_interval_ms: float = Field(default=1.0, gt=0, le=100)
    # A trained NML/EM checkpoint (`memlane nml train`): served as the local model instead of
    # SmolLM2, and fed every interaction so its memories persist per user under nml_state_dir.
    nml_checkpoint: Path | None = None
    nml_state_dir: Path = Path("nml-state")

    keys: tuple[KeyConfig, ...] = ()  # empty: open mode, single local user "default"
    # Per-key token bucket: sustained requests a minute (0: no limit) and burst (default: rpm).
    rate_limit_rpm: int = Field(default=0, ge=0)
    rate_limit_burst: int | None = Field(default=None, ge=1)
    # Which sensitivity labels may reach which providers, e.g. "health,finance:local" (see proxy/egress.py);
    # credentials reach none unless a rule names them.
    egress_policy: str = ""
    routes: tuple[RouteConfig, ...] = ()  # empty: built from OPENAI_API_KEY etc.

    memory: bool = True
    memory_top_k: int = Field(default=5, ge=0, le=50)
    memory_min_score: float = Field(default=0.2, ge=-1.0, le=1.0)
    memory_token_cap: int = Field(default=400, ge=0)
    memory_budget_ms: int = Field(default=2000, ge=1)  # retrieval slower than this: answer without memory
    # The learner's preloaded context of the user's frequent domains (learner/dream.py): "fallback"
    # injects it when retrieval fails or runs past the budget; "serve" also answers a query in a
    # preloaded domain from it without embedding or search; "off" never reads it.
    memory_preload: Literal["off", "fallback", "serve"] = "fallback"
    # The personal model (PLM) writes a short context for the target model from the retrieved
    # memories; slower than the budget, the request goes on with plain retrieval (x-memlane-plm).
    plm_context: Literal["off", "on"] = "off"
    plm_context_budget_ms: int = Field(default=150, ge=1, le=60_000)
    # Wraps every user's adapter key (adapters/plm/crypto.py); at least 16 characters.
    adapter_master_key: SecretStr | None = Field(default=None, min_length=16)
    # The personal language model (docs/plm.md): the local model with each user's LoRA adapter,
    # served as `plm/<local_model_name>`; adapters, their registry and keys live under plm_dir.
    plm: bool = False
    plm_dir: Path = Path("plm-adapters")
    plm_device: str = "cpu"  # "cuda": bf16 on the GPU
    # With `plm` on, the server trains and gates the learner's training requests itself, in the
    # background (adapters/plm/scheduler.py): one update at a time, on plm_update_threads torch
    # threads, each user at most once per plm_update_min_gap_s; pending requests are looked for
    # every plm_update_poll_s. plm_training overrides the update's hyperparameters
    # (adapters.plm.UpdateConfig, with `train` and `gate` tables).
    plm_auto_update: bool = True
    plm_update_threads: int = Field(default=1, ge=1, le=256)
    plm_update_min_gap_s: float = Field(default=1800.0, ge=0)
    plm_update_poll_s: float = Field(default=5.0, gt=0)
    plm_training: dict[str, Any] = Field(default_factory=dict)
    embedder: Literal["minilm", "hash"] = "minilm"  # "hash" is lexical, for tests only
    # MiniLM's runtime: ONNX Runtime (exported once into model_cache; same vectors, ~2.5x less CPU
    # per query) or sentence-transformers on torch. "auto" falls back to torch if ONNX fails.
    embedder_backend: Literal["auto", "onnx", "torch"] = "auto"
    # Encrypts the database file (DuckDB AES-GCM); the same key opens it again. Without an
    # HNSW index (vss cannot store one in an encrypted file) vector search scans exactly.
    database_key: SecretStr | None = None
    short_term_ttl_hours: float = Field(default=72.0, ge=24.0, le=72.0)
    # Memories held in RAM views for retrieval (memory/views.py; ~3 KB each with the search
    # legs); a user with more than this many is read from DuckDB.
    memory_view_rows: int = Field(default=196_608, ge=0)
    # At start, build the views of the users active most recently (as many as fit), so that
    # their first searches after a restart do not read DuckDB.
    memory_view_preload: bool = True
    maintenance_interval_s: float = Field(default=600.0, gt=0)  # promotion, expiry, decay
    # The background learner (docs/learner.md): "inprocess" runs the jobs in the server;
    # "external": a `memlane learner --url` process leases them over HTTP, the server still writes.
    learner: Literal["inprocess", "external"] = "inprocess"
    learner_extractor: Literal["rules", "llm"] = "rules"
    learner_llm_model: str = f"local/{LOCAL_MODEL_NAME}"  # routed like a chat model
    learner_max_attempts: int = Field(default=5, ge=1, le=100)  # then the job is dead-lettered
    learner_backoff_s: float = Field(default=5.0, gt=0)  # before the 2nd attempt, doubling after
    learner_lease_s: float = Field(default=120.0, gt=0)  # a job held longer is leased again
    learner_token: SecretStr | None = None  # required to lease jobs over HTTP when keys are set
    # Done jobs are deleted by the maintenance pass once this old (dead letters stay).
    learner_keep_done_hours: float = Field(default=1.0, ge=0)
    learn_every: int = Field(default=10, ge=1)  # interactions learned per user between runs
    learn_period_hours: float = Field(default=24.0, gt=0)  # or this long, with any learned
    learn_min_gap_s: float = Field(default=60.0, ge=0)  # at most one run per user this often

    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    log_queue_size: int = Field(default=10_000, gt=0)
    upstream_timeout_s: float = Field(default=600.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=10.0, gt=0)
    # Extra attempts when an upstream connection fails before any response (never once bytes flowed).
    upstream_retries: int = Field(default=1, ge=0, le=5)
    # On SIGTERM, open streams get this long to finish; then they end with an error event.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("plm_training")
    @classmethod
    def _plm_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value:  # imported only when set: the settings module stays light
            from adapters.plm.update import UpdateConfig

            try:
                UpdateConfig.from_dict(value)
            except TypeError as exc:
                raise ValueError(f"not an update setting: {exc}") from exc
        return value

    @field_validator("egress_policy")
    @classmethod
    def _egress_policy(cls, value: str) -> str:
        # Imported here: proxy.egress imports memory, and the settings module stays light.
        from proxy.egress import EgressPolicy

        EgressPolicy.parse(value)
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources):  # type: ignore[override]
        # Only explicit data: `from_env` decides what the environment contributes.
        return (init_settings,)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        *,
        config_file: Path | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from a mapping (``os.environ`` in production, a dict in tests)."""
        data: dict[str, Any] = {}
        if config_file is not None:
            try:
                data.update(tomllib.loads(Path(config_file).read_text()))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"config file {config_file}: {exc}") from exc
        try:
            data.update(_MappingEnvSource(cls, env)())
        except ValueError as exc:  # pydantic-settings' own parse errors (bad JSON, bad nesting)
            raise SettingsError(f"environment: {exc}") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        routes = data.get("routes") or default_routes(env)
        data["routes"] = [_resolve_key(r, env) for r in routes]
        if str(data.get("plm", "")).lower() in ("true", "1", "yes", "on") and not any(
            (r.provider if isinstance(r, RouteConfig) else r.get("provider")) == "plm" for r in data["routes"]
        ):
            data["routes"].append({"match": "plm/*", "provider": "plm", "strip_prefix": "plm/"})
        try:
            return cls(**data)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from exc

    @property
    def open_mode(self) -> bool:
        return not self.keys

    def route_for(self, model: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.matches(model)), None)


class SettingsError(ValueError):
    """A bad configuration value; the message names the key."""


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment parsing, over a mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def default_routes(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Routes implied by the usual provider environment variables; ``local/*`` always."""
    routes: list[dict[str, Any]] = [
        {"match": "local/*", "provider": "local", "strip_prefix": "local/"},
    ]
    if env.get("OLLAMA_HOST") or env.get("OLLAMA_API_BASE"):
        base = env.get("OLLAMA_API_BASE") or env["OLLAMA_HOST"]
        if not base.startswith("http"):
            base = f"http://{base}"
        if httpx.URL(base).port is None:  # no port given: Ollama's default
            base = str(httpx.URL(base).copy_with(port=11434)).rstrip("/")
        routes.append({"match": "ollama/*", "provider": "ollama", "api_base": base, "strip_prefix": "ollama/"})
    if env.get("ANTHROPIC_API_KEY"):
        routes.append(
            {
                "match": "claude-*",
                "provider": "anthropic",
                "api_base": env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
                "api_key_env": "ANTHROPIC_API_KEY",
            }
        )
    if env.get("OPENAI_API_KEY"):
        base = env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        for pattern in ("gpt-*", "o[0-9]*", "chatgpt-*"):
            routes.append({"match": pattern, "provider": "openai", "api_base": base, "api_key_env": "OPENAI_API_KEY"})
    return routes


def _resolve_key(route: Any, env: Mapping[str, str]) -> Any:
    if isinstance(route, RouteConfig):
        route = route.model_dump()
    route = dict(route)
    if "api_key" in route and route.get("api_key") is not None and not route.get("api_key_env"):
        raise SettingsError(f"route {route.get('match')!r}: put the key in the environment and name it in api_key_env")
    name = route.get("api_key_env")
    if name:
        route["api_key"] = env.get(name)
    return route


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        name = ".".join(loc) or "settings"
        env_name = "MEMLANE_" + "__".join(p.upper() for p in loc)
        parts.append(f"{name} ({env_name}): {err['msg']}")
    return "invalid settings: " + "; ".join(parts)
