"""Settings: file, environment and overrides, with errors that name the key."""

from __future__ import annotations

import pytest

from proxy.settings import Settings, SettingsError


def test_defaults_serve_the_local_model_only():
    s = Settings.from_env({})
    assert s.open_mode
    assert [(r.match, r.provider) for r in s.routes] == [("local/*", "local")]
    assert s.route_for("local/smollm2-135m-instruct").provider == "local"
    assert s.route_for("gpt-4o") is None


def test_provider_keys_from_the_environment_add_routes():
    s = Settings.from_env({"OPENAI_API_KEY": "sk-o", "ANTHROPIC_API_KEY": "sk-a", "OLLAMA_HOST": "127.0.0.1:11434"})
    assert s.route_for("gpt-4o-mini").provider == "openai"
    assert s.route_for("o3-mini").provider == "openai"
    assert s.route_for("claude-sonnet-4-5").provider == "anthropic"
    assert s.route_for("ollama/llama3").api_base == "http://127.0.0.1:11434"
    assert s.route_for("gpt-4o").api_key.get_secret_value() == "sk-o"
    assert "sk-o" not in repr(s)  # secrets never print


def test_file_then_env_then_overrides(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('port = 9000\nmemory_top_k = 3\n[[keys]]\nuser = "ada"\nkey = "sk-ada"\n')
    s = Settings.from_env({"MEMLANE_MEMORY_TOP_K": "7"}, config_file=cfg, port=9100)
    assert (s.port, s.memory_top_k) == (9100, 7)
    assert s.keys[0].user == "ada" and not s.open_mode


@pytest.mark.parametrize(("env", "key"), [
    ({"MEMLANE_PORT": "eighty"}, "MEMLANE_PORT"),
    ({"MEMLANE_MEMORY_TOP_K": "-1"}, "MEMLANE_MEMORY_TOP_K"),
    ({"MEMLANE_LOG_FORMAT": "xml"}, "MEMLANE_LOG_FORMAT"),
])
def test_bad_values_fail_at_start_naming_the_key(env, key):
    with pytest.raises(SettingsError, match=key):
        Settings.from_env(env)


def test_upstream_keys_may_not_live_in_the_config_file(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[routes]]\nmatch = "gpt-*"\nprovider = "openai"\napi_key = "sk-in-file"\n')
    with pytest.raises(SettingsError, match="api_key_env"):
        Settings.from_env({}, config_file=cfg)


def test_a_key_needs_exactly_one_secret():
    with pytest.raises(SettingsError):
        Settings.from_env({}, keys=[{"user": "ada"}])


def test_an_nml_checkpoint_replaces_the_local_model_and_feeds_the_learner(tmp_path):
    from adapters.nml import NMLChatModel
    from proxy.app import _local_model, _nml_feed

    settings = Settings.from_env({"MEMLANE_NML_CHECKPOINT": str(tmp_path / "nml.pt"),
                                  "MEMLANE_NML_STATE_DIR": str(tmp_path / "state")})
    model = _local_model(settings)
    assert isinstance(model, NMLChatModel)
    assert model.loadable() == (False, f"no NML checkpoint at {tmp_path / 'nml.pt'}: train one with `memlane nml train`")
    assert _nml_feed(model) == model.feed
    assert _nml_feed(_local_model(Settings.from_env({}))) is None


def test_serve_sets_the_gil_switch_interval_from_the_settings(tmp_path, monkeypatch):
    """Background threads (learning runs, view builds) hold the GIL in steps of this length
    while the event loop waits: `memlane serve` shortens CPython's 5 ms."""
    import sys

    from typer.testing import CliRunner

    import proxy.cli
    import proxy.logs  # patched below

    seen: list[float] = []

    class NotServing:
        def run(self) -> None:
            seen.append(sys.getswitchinterval())

    monkeypatch.setattr(proxy.cli, "_server", lambda config, on_exit: NotServing())
    monkeypatch.setattr("proxy.logs.configure_logging", lambda **kwargs: None)  # keep the suite's logging
    before = sys.getswitchinterval()
    monkeypatch.setenv("MEMLANE_PRELOAD_LOCAL_MODEL", "false")
    try:
        for env, expected in ((None, 0.001), ("2.5", 0.0025)):
            if env is not None:
                monkeypatch.setenv("MEMLANE_SWITCH_INTERVAL_MS", env)
            result = CliRunner().invoke(proxy.cli.app, ["serve", "--db", str(tmp_path / "m.duckdb")])
            assert result.exit_code == 0, result.output
            assert seen[-1] == pytest.approx(expected)
    finally:
        sys.setswitchinterval(before)


def test_the_store_keeps_done_learner_jobs_as_long_as_configured(tmp_path):
    from datetime import timedelta

    from memory import HashEmbedder
    from proxy.app import open_store

    s = Settings.from_env({"MEMLANE_LEARNER_KEEP_DONE_HOURS": "0.25", "MEMLANE_DATABASE": str(tmp_path / "m.duckdb")})
    with open_store(s, HashEmbedder()) as store:
        assert store.done_jobs_kept == timedelta(minutes=15)
    with pytest.raises(SettingsError, match="MEMLANE_LEARNER_KEEP_DONE_HOURS"):
        Settings.from_env({"MEMLANE_LEARNER_KEEP_DONE_HOURS": "-1"})
