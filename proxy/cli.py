"""The ``memlane`` command: ``serve`` and ``memories list | search | add | forget``.

The memory commands open the database file directly. DuckDB lets one process hold a file, so
when a running server holds it they go through that server's ``/v1/memories`` API instead
(``--url``, ``MEMLANE_API_KEY``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from proxy.auth import OPEN_MODE_USER
from proxy.settings import Settings, SettingsError

app = typer.Typer(help="memlane: a memory layer for any OpenAI-compatible client.", no_args_is_help=True)
memories = typer.Typer(help="Inspect and edit one user's memories.", no_args_is_help=True)
app.add_typer(memories, name="memories")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True, dir_okay=False)]
DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: MEMLANE_DATABASE or memlane.duckdb).")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.from_env(os.environ, config_file=config, **overrides)
    except SettingsError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080).")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    log_format: Annotated[str | None, typer.Option(help="json (default) or console.")] = None,
) -> None:
    """Run the proxy."""
    import uvicorn

    from proxy.app import create_app
    from proxy.logs import configure_logging

    settings = _settings(config, host=host, port=port, database=db, log_format=log_format)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    import torch

    torch.set_num_threads(settings.torch_threads)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        lifespan="on",
    )


UserOpt = Annotated[
    str | None, typer.Option("--user", "-u", help="User id (default: 'default'; through a server: the key's user).")
]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Server to use when it holds the database (default: host and port from settings).")
]


class _Memories:
    """Direct file access, or the running server's API when it holds the file."""

    def __init__(self, db: Path | None, config: Path | None, url: str | None, *, create: bool = False) -> None:
        self.settings = _settings(config, database=db)
        self.url = (url or f"http://{self.settings.host}:{self.settings.port}").rstrip("/")
        self.store = None
        if not create and not Path(self.settings.database).exists():
            console.print(f"[red]no database at {self.settings.database}[/red] (set --db or MEMLANE_DATABASE)")
            raise typer.Exit(1)
        try:
            import duckdb

            from proxy.app import build_embedder, open_store

            self.store = open_store(self.settings, build_embedder(self.settings))
        except duckdb.IOException:
            console.print(f"[dim]{self.settings.database} is held by a running server; using {self.url}[/dim]")

    def __enter__(self) -> _Memories:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()

    def call(self, method: str, path: str, user: str | None, **kw: Any) -> Any:
        # Without --user the server uses the key's own user (or "default" in open mode).
        headers = {"x-memlane-user": user} if user else {}
        key = os.environ.get("MEMLANE_API_KEY")
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            response = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)
        except httpx.HTTPError as exc:
            console.print(f"[red]cannot reach {self.url}: {exc}[/red]")
            raise typer.Exit(1) from exc
        if response.status_code >= 400:
            console.print(f"[red]{response.status_code}: {response.json().get('error', {}).get('message')}[/red]")
            raise typer.Exit(1)
        self.status = response.status_code
        return response.json()


def _table(rows: list[dict], *, scored: bool = False) -> None:
    table = Table("id", "content", "tier", "created", *(["score"] if scored else []))
    for r in rows:
        score = (r.get("score") or {}).get("total")
        extra = [f"{score:.3f}"] if scored and score is not None else ([""] if scored else [])
        table.add_row(r["id"], r["content"], r["tier"], str(r["created_at"])[:19], *extra)
    console.print(table)


def _row(memory: Any) -> dict:
    from memory import entry_to_dict

    return entry_to_dict(memory)


@memories.command("list")
def list_memories(user: UserOpt = None, limit: int = 100, db: DbOpt = None, config: ConfigOpt = None,
                  url: UrlOpt = None) -> None:
    """List a user's memories, newest first."""
    with _Memories(db, config, url) as m:
        if m.store is not None:
            rows = [_row(x) for x in m.store.list(user or OPEN_MODE_USER, limit=limit)]
        else:
            rows = m.call("GET", "/v1/memories", user, params={"limit": limit})["data"]
        _table(rows)


@memories.command("search")
def search_memories(query: str, user: UserOpt = None, k: Annotated[int, typer.Option("--k", "-k", help="How many.")] = 5,
                    db: DbOpt = None, config: ConfigOpt = None,
                    url: UrlOpt = None) -> None:
    """Search a user's memories by meaning."""
    with _Memories(db, config, url) as m:
        if m.store is not None:
            rows = [_row(x) for x in m.store.search_text(user or OPEN_MODE_USER, query, k=k)]
        else:
            rows = m.call("GET", "/v1/memories", user, params={"q": query, "limit": k})["data"]
        _table(rows, scored=True)


@memories.command("add")
def add_memory(content: str, user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None,
               url: UrlOpt = None) -> None:
    """Add a memory for a user (e.g. 'The user is allergic to peanuts.')."""
    with _Memories(db, config, url, create=True) as m:
        if m.store is not None:
            memory, created = m.store.add(user or OPEN_MODE_USER, content, source="cli")
            memory_id = memory.id
        else:
            memory_id = m.call("POST", "/v1/memories", user, json={"content": content})["id"]
            created = m.status == 201
        console.print(f"{'added' if created else 'already known'}: {memory_id}")


@memories.command("forget")
def forget_memory(memory_id: str, user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None,
                  url: UrlOpt = None) -> None:
    """Delete one of a user's memories for good."""
    with _Memories(db, config, url) as m:
        if m.store is not None:
            if not m.store.forget(user or OPEN_MODE_USER, memory_id):
                console.print(f"[red]no memory {memory_id} for user {user or OPEN_MODE_USER}[/red]")
                raise typer.Exit(1)
        else:
            m.call("DELETE", f"/v1/memories/{memory_id}", user)
        console.print(f"forgotten: {memory_id}")


if __name__ == "__main__":  # pragma: no cover
    app()
