"""`memlane doctor`: each check run for real in a tmp dir, and the command through CliRunner."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from memory import HashEmbedder, MemoryStore
from proxy import doctor as d
from proxy.cli import app
from proxy.settings import Settings

SECRET = "sk-doctor-secret-value-1234"
runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("MEMLANE_") or name in (
            "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OLLAMA_HOST", "OLLAMA_API_BASE", "OPENAI_BASE_URL",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    data: dict[str, Any] = {"database": tmp_path / "memlane.duckdb", "model_cache": tmp_path / "models",
                            "port": free_port()}
    data.update(overrides)
    return Settings.from_env(env or {}, **data)


def by_name(checks: list[d.Check]) -> dict[str, d.Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def upstream():
    """A loopback HTTP server: /v1/models answers 200 with the right key, 401 otherwise."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            good = self.headers.get("authorization") == "Bearer sk-good"
            self.send_response(200 if good else 401)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


# -- python, packages, extensions, models ------------------------------------------------------


def test_python_version():
    assert d.check_python().status == "ok"
    old = d.check_python((3, 10, 4))
    assert old.failed and "3.10.4" in old.detail and "python3.11" in old.fix


def test_packages_installed_with_versions_and_a_missing_one_named():
    checks = d.check_packages()
    assert all(c.status == "ok" for c in checks), [c for c in checks if c.failed]
    duckdb = by_name(checks)["package duckdb"]
    import duckdb as real

    assert duckdb.detail == real.__version__
    missing = d.check_packages({"memlane-no-such-dist": "memlane_no_such_dist"})[0]
    assert missing.failed and "memlane-no-such-dist" in missing.fix


def test_duckdb_extensions_load():
    checks = d.check_extensions()
    assert [c.name for c in checks] == ["duckdb extension vss", "duckdb extension fts", "duckdb extension httpfs"]
    assert all(c.status == "ok" and "loads" in c.detail for c in checks), checks


def test_missing_extension_names_the_wheel_to_install():
    check = d.check_extensions(("nosuchext",))[0]
    assert check.failed and "duckdb-extension-nosuchext==" in check.fix


def test_embedding_model_present(tmp_path):
    check = d.check_embedder(settings(tmp_path))
    assert check.status == "ok" and "MiniLM" in check.detail
    assert d.check_embedder(settings(tmp_path, embedder="hash")).status == "warn"


@pytest.mark.timeout(300)
def test_embedding_model_deep_embeds_one_sentence(tmp_path):
    check = d.check_embedder(settings(tmp_path), deep=True)
    assert check.status == "ok" and "384 dims" in check.detail


def test_local_model_loadable_and_cache_not_built_in_a_fresh_cache_dir(tmp_path):
    checks = by_name(d.check_local_model(settings(tmp_path)))
    assert checks["local model"].status == "ok" and "loadable" in checks["local model"].detail
    assert checks["local model cache"].status == "warn"
    assert str(tmp_path / "models") in checks["local model cache"].detail


def test_local_model_missing_folder_fails_with_a_fix(tmp_path):
    check = d.check_local_model(settings(tmp_path, local_model_dir=tmp_path / "nope"))[0]
    assert check.failed and "config.json" in check.detail and check.fix


# -- database ----------------------------------------------------------------------------------


def test_database_dir_writable_missing_or_not_a_directory(tmp_path):
    assert d.check_database_dir(settings(tmp_path)).status == "ok"
    missing = d.check_database_dir(settings(tmp_path, database=tmp_path / "no" / "db.duckdb"))
    assert missing.failed and "mkdir -p" in missing.fix and "MEMLANE_DATABASE" in missing.fix
    (tmp_path / "afile").write_text("x")
    not_dir = d.check_database_dir(settings(tmp_path, database=tmp_path / "afile" / "db.duckdb"))
    assert not_dir.failed and "not a directory" in not_dir.detail and "MEMLANE_DATABASE" in not_dir.fix


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_database_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        check = d.check_database_dir(settings(tmp_path, database=locked / "db.duckdb"))
    finally:
        locked.chmod(0o755)
    assert check.failed and "not writable" in check.detail and "chmod u+w" in check.fix


def test_database_absent_then_present_and_current(tmp_path):
    s = settings(tmp_path)
    assert d.check_database(s)[0].status == "ok"
    MemoryStore.open(s.database, embedder=HashEmbedder()).close()
    check = d.check_database(s)[0]
    assert check.status == "ok" and "is current" in check.detail and "0 memories" in check.detail


def test_database_key_opens_or_is_reported(tmp_path):
    path = tmp_path / "enc.duckdb"
    MemoryStore.open(path, embedder=HashEmbedder(), encryption_key="right key").close()
    good = by_name(d.check_database(settings(tmp_path, database=path, database_key="right key")))
    assert good["database"].status == "ok" and good["database key"].status == "ok"
    wrong = d.check_database(settings(tmp_path, database=path, database_key="wrong key"))
    assert [c.name for c in wrong] == ["database key"] and wrong[0].failed
    assert "MEMLANE_DATABASE_KEY" in wrong[0].fix and "wrong key" not in wrong[0].detail + wrong[0].fix
    no_key = d.check_database(settings(tmp_path, database=path))[0]
    assert no_key.failed and "MEMLANE_DATABASE_KEY" in no_key.fix


def test_database_held_by_another_process_is_a_warning(tmp_path):
    s = settings(tmp_path)
    MemoryStore.open(s.database, embedder=HashEmbedder()).close()
    hold = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(s.database)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        check = d.check_database(s)[0]
    finally:
        holder.kill()
        holder.wait()
    assert check.status == "warn" and "held by another process" in check.detail


# -- upstreams and port ------------------------------------------------------------------------


def route(api_base: str, key_env: str | None = "DOCTOR_KEY") -> dict[str, Any]:
    return {"match": "gpt-*", "provider": "openai", "api_base": api_base, "api_key_env": key_env}


def test_unreachable_upstream_fails_with_a_fix(tmp_path):
    port = free_port()
    s = settings(tmp_path, {"DOCTOR_KEY": SECRET}, routes=[route(f"http://127.0.0.1:{port}/v1")])
    (check,) = d.check_routes(s)
    assert check.failed and "unreachable" in check.detail and check.fix
    assert SECRET not in check.detail + check.fix


def test_missing_key_env_var_is_named(tmp_path):
    (check,) = d.check_routes(settings(tmp_path, routes=[route("http://127.0.0.1:9/v1")]))
    assert check.failed and "DOCTOR_KEY" in check.detail and "export DOCTOR_KEY=" in check.fix


def test_reachable_upstream_and_a_rejected_key(tmp_path, upstream):
    ok = d.check_routes(settings(tmp_path, {"DOCTOR_KEY": "sk-good"}, routes=[route(upstream)]))[0]
    assert ok.status == "ok" and "HTTP 200" in ok.detail
    bad = d.check_routes(settings(tmp_path, {"DOCTOR_KEY": SECRET}, routes=[route(upstream)]))[0]
    assert bad.failed and "rejects the key in DOCTOR_KEY" in bad.detail
    assert SECRET not in bad.detail + bad.fix


def test_routes_sharing_an_upstream_are_checked_once(tmp_path, upstream):
    env = {"OPENAI_API_KEY": "sk-good", "OPENAI_BASE_URL": upstream}
    checks = d.check_routes(Settings.from_env(env, database=tmp_path / "x.duckdb"))
    assert len(checks) == 1 and checks[0].name == "upstream gpt-*, o[0-9]*, chatgpt-*"
    assert checks[0].status == "ok"


def test_port_free_and_in_use(tmp_path):
    s = settings(tmp_path)
    assert d.check_port(s).status == "ok"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", s.port))
        busy.listen()
        check = d.check_port(s)
    assert check.failed and str(s.port) in check.detail and "--port" in check.fix


# -- the command -------------------------------------------------------------------------------


def test_cli_all_good_in_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLANE_MODEL_CACHE", str(tmp_path / "models"))
    r = runner.invoke(app, ["doctor", "--db", str(tmp_path / "m.duckdb"), "--port", str(free_port())])
    assert r.exit_code == 0, r.output
    assert "✗" not in r.output and "✓" in r.output and "all good" in r.output


def test_cli_reports_failures_with_fixes_and_exits_1(tmp_path, monkeypatch):
    port = free_port()
    config = tmp_path / "memlane.toml"
    config.write_text(
        "[[routes]]\n"
        f'match = "gpt-*"\nprovider = "openai"\napi_base = "http://127.0.0.1:{port}/v1"\napi_key_env = "DOCTOR_KEY"\n'
        "[[routes]]\n"
        'match = "claude-*"\nprovider = "anthropic"\napi_base = "http://127.0.0.1:9"\napi_key_env = "MISSING_KEY"\n'
    )
    monkeypatch.setenv("DOCTOR_KEY", SECRET)
    monkeypatch.setenv("MEMLANE_MODEL_CACHE", str(tmp_path / "models"))
    r = runner.invoke(app, ["doctor", "-c", str(config), "--db", str(tmp_path / "m.duckdb"), "--port", str(free_port())])
    assert r.exit_code == 1, r.output
    assert "✗" in r.output and "unreachable" in r.output and "start the upstream" in r.output
    assert "MISSING_KEY is not set" in r.output and "export MISSING_KEY=" in r.output
    assert SECRET not in r.output
    assert "2 failed" in r.output


def test_cli_bad_configuration_is_a_failed_check(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLANE_MEMORY_TOP_K", "lots")
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 1 and "configuration" in r.output and "MEMLANE_MEMORY_TOP_K" in r.output
