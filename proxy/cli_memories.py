"""``memlane memories list | search | get | add | patch | forget | export | import | wipe``.

Each command opens the database file directly. DuckDB lets one process hold a file, so when a
running server holds it they go through that server's ``/v1/memories`` API instead (``--url``,
``MEMLANE_API_KEY``), with the same validation and the same results. Also here: the settings
loader and options that ``memlane serve`` shares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Self

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from memory import (
    DuplicateContentError,
    ImportFormatError,
    MemoryType,
    Sensitivity,
    Tier,
    TruthCategory,
    edit_memory,
    entry_to_dict,
    export_jsonl,
    export_parquet,
    import_jsonl,
    import_parquet,
)
from proxy.auth import OPEN_MODE_USER
from proxy.errors import ProxyError
from proxy.memories_api import action_of, label_memory, parse_changes, parse_new
from proxy.settings import Settings, SettingsError

memories = typer.Typer(help="Inspect and edit one user's memories.", no_args_is_help=True)
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True, dir_okay=False)]
DbOpt = Annotated[Path | None, typer.Option("--db", help="DuckDB file (default: MEMLANE_DATABASE or memlane.duckdb).")]
UserOpt = Annotated[
    str | None, typer.Option("--user", "-u", help="User id (default: 'default'; through a server: the key's user).")
]
UrlOpt = Annotated[
    str | None, typer.Option("--url", help="Server to use when it holds the database (default: host and port from settings).")
]
TagsOpt = Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeat for several).")]
DomainsOpt = Annotated[list[str] | None, typer.Option("--domain", help="A domain, e.g. 'health' (repeat for several).")]
TypeOpt = Annotated[MemoryType | None, typer.Option("--type", case_sensitive=False, help="Memory type.")]
TruthOpt = Annotated[TruthCategory | None, typer.Option("--truth", case_sensitive=False, help="Truth category.")]
SensitivityOpt = Annotated[Sensitivity | None, typer.Option(
    "--sensitivity", case_sensitive=False, help="Egress label: none, personal, health, finance or credentials.")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="jsonl or parquet (default: from the file's suffix).")]
SCORE_PARTS = ("vector", "text", "recency", "importance", "confidence", "frequency", "tier", "link")


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return Settings.from_env(os.environ, config_file=config, **overrides)
    except SettingsError as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/red]")
    return typer.Exit(1)


class _Memories:
    """Direct file access, or the running server's API when it holds the file."""

    def __init__(self, db: Path | None, config: Path | None, url: str | None, user: str | None,
                 *, create: bool = False) -> None:
        self.settings = load_settings(config, database=db)
        self.url = (url or f"http://{self.settings.host}:{self.settings.port}").rstrip("/")
        self.user = user  # None: the key's own user through a server, "default" in direct mode
        self.store = None
        if not create and not Path(self.settings.database).exists():
            raise fail(f"no database at {self.settings.database} (set --db or MEMLANE_DATABASE)")
        try:
            import duckdb

            from proxy.app import build_embedder, open_store

            self.store = open_store(self.settings, build_embedder(self.settings))
        except duckdb.IOException:
            console.print(f"[dim]{self.settings.database} is held by a running server; using {self.url}[/dim]")

    @property
    def user_id(self) -> str:
        """The user in direct mode."""
        return self.user or OPEN_MODE_USER

    @property
    def who(self) -> str:
        if self.user or self.store is not None:
            return self.user_id
        return "of the API key"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"x-memlane-user": self.user} if self.user else {}
        key = os.environ.get("MEMLANE_API_KEY")
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            response = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kw)
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise fail(f"{response.status_code}: {message}")
        return response


def _checked(parse: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The API's validation, applied in direct mode too."""
    try:
        return parse(body)
    except ProxyError as exc:
        raise fail(exc.message) from exc


def _table(rows: list[dict], *, scored: bool = False, explain: bool = False) -> None:
    columns = ["id", "content", "tier", "created"]
    if scored:
        columns.append("score")
    if explain:
        columns += list(SCORE_PARTS)
    table = Table(*columns)
    for r in rows:
        score = r.get("score") or {}
        cells = [r["id"], r["content"], r["tier"], str(r["created_at"])[:19]]
        if scored:
            cells.append(f"{score.get('total', 0):.3f}")
        if explain:
            cells += [f"{score.get(part, 0):.3f}" for part in SCORE_PARTS]
        table.add_row(*cells)
    console.print(table)


@contextmanager
def _progress(description: str) -> Iterator[None]:
    """A transient spinner and pulsing bar while a file is written or read; off when not a TTY."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        progress.add_task(description, total=None)
        yield


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or ("parquet" if path.suffix.lower() in (".parquet", ".pq") else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise fail(f"unknown format {fmt!r}: use jsonl or parquet")
    return fmt


@memories.command("list")
def list_memories(
    user: UserOpt = None, limit: int = 100, offset: int = 0,
    tier: Annotated[Tier | None, typer.Option(case_sensitive=False, help="Only this tier.")] = None,
    history: Annotated[bool, typer.Option("--history", help="Also superseded memories.")] = False,
    db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """List a user's memories, newest first."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            found = m.store.list(m.user_id, limit=limit, offset=offset, tier=tier, include_history=history)
            rows = [entry_to_dict(x) for x in found]
        else:
            params: dict[str, Any] = {"limit": limit, "offset": offset, "include_history": history}
            if tier is not None:
                params["tier"] = tier.value
            rows = m.call("GET", "/v1/memories", params=params).json()["data"]
        _table(rows)


@memories.command("search")
def search_memories(
    query: str, user: UserOpt = None, k: Annotated[int, typer.Option("--k", "-k", help="How many.")] = 5,
    tier: Annotated[list[Tier] | None, typer.Option(case_sensitive=False, help="Only these tiers.")] = None,
    domain: DomainsOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Show each part of the score.")] = False,
    db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Search a user's memories by meaning and words; --explain shows why each was found."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            found = m.store.search_text(m.user_id, query, k=k, tiers=tier or None, domains=domain or None, touch=False)
            rows = [entry_to_dict(x) for x in found]
        else:
            params = {"q": query, "limit": k, "tier": [t.value for t in tier or ()], "domain": domain or []}
            rows = m.call("GET", "/v1/memories", params=params).json()["data"]
        _table(rows, scored=True, explain=explain)


@memories.command("get")
def get_memory(memory_id: str, user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None,
               url: UrlOpt = None) -> None:
    """Show every field of one memory as JSON."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            found = m.store.get(m.user_id, memory_id)
            if found is None:
                raise fail(f"no memory {memory_id} for user {m.user_id}")
            row = entry_to_dict(found)
        else:
            row = m.call("GET", f"/v1/memories/{memory_id}").json()
        console.print_json(json.dumps(row))


@memories.command("add")
def add_memory(
    content: str, user: UserOpt = None, tag: TagsOpt = None, domain: DomainsOpt = None,
    memory_type: TypeOpt = None, truth: TruthOpt = None,
    importance: Annotated[float | None, typer.Option(help="0 to 1 (default 0.5).")] = None,
    sensitivity: SensitivityOpt = None,
    db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Add a memory for a user (e.g. 'The user is allergic to peanuts.')."""
    body = _present(content=content, tags=tag, domains=domain, memory_type=memory_type,
                    truth_category=truth, importance=importance, sensitivity=sensitivity)
    with _Memories(db, config, url, user, create=True) as m:
        if m.store is not None:
            fields = _checked(parse_new, body)
            label = fields.pop("sensitivity", None)
            memory, created = m.store.add(m.user_id, fields.pop("content"), source="cli", **fields)
            memory = label_memory(m.store, m.user_id, memory, label) or memory
            memory_id, action, supersedes = memory.id, action_of(memory, created), memory.supersedes
        else:
            row = m.call("POST", "/v1/memories", json=body).json()
            memory_id, action, supersedes = row["id"], row["action"], row["supersedes"]
        if action == "corroborated":
            console.print(f"already known: {memory_id}")
        else:
            console.print(f"added: {memory_id}" + (f" (supersedes {supersedes})" if supersedes else ""))


@memories.command("patch")
def patch_memory(
    memory_id: str, user: UserOpt = None,
    content: Annotated[str | None, typer.Option(help="New content (re-embedded).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Replace the tags (repeat for several).")] = None,
    domain: Annotated[list[str] | None, typer.Option("--domain", help="Replace the domains.")] = None,
    importance: Annotated[float | None, typer.Option(help="0 to 1.")] = None,
    validated: Annotated[bool | None, typer.Option("--validated/--not-validated")] = None,
    tier: Annotated[Tier | None, typer.Option(case_sensitive=False)] = None,
    memory_type: TypeOpt = None, truth: TruthOpt = None, sensitivity: SensitivityOpt = None,
    db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Change fields of one memory."""
    body = _present(content=content, tags=tag, domains=domain, importance=importance, validated=validated,
                    tier=tier, memory_type=memory_type, truth_category=truth, sensitivity=sensitivity)
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            changes = _checked(parse_changes, body)
            label = changes.pop("sensitivity", None)
            try:
                found = edit_memory(m.store, m.user_id, memory_id, **changes)
            except DuplicateContentError as exc:
                raise fail(f"memory {exc.existing_id} already holds this content") from exc
            found = label_memory(m.store, m.user_id, found, label)
            if found is None:
                raise fail(f"no memory {memory_id} for user {m.user_id}")
        else:
            m.call("PATCH", f"/v1/memories/{memory_id}", json=body)
        console.print(f"updated: {memory_id}")


@memories.command("forget")
def forget_memory(memory_id: str, user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None,
                  url: UrlOpt = None) -> None:
    """Delete one of a user's memories, and the memories derived from it, for good."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            deleted = m.store.delete_entries(m.user_id, [memory_id])
            if not deleted:
                raise fail(f"no memory {memory_id} for user {m.user_id}")
            derived = [i for i in deleted if i != memory_id]
        else:
            derived = m.call("DELETE", f"/v1/memories/{memory_id}").json()["derived"]
        console.print(f"forgotten: {memory_id}")
        for other in derived:
            console.print(f"forgotten (derived from it): {other}")


@memories.command("export")
def export_memories(path: Path, user: UserOpt = None, fmt: FormatOpt = None, db: DbOpt = None,
                    config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Write all of a user's memories, history included, to a JSONL or Parquet file."""
    fmt = _format_of(path, fmt)
    with _Memories(db, config, url, user) as m:
        with _progress(f"exporting to {path}"):
            if m.store is not None:
                count = (export_jsonl if fmt == "jsonl" else export_parquet)(m.store, m.user_id, path)
            else:
                count = None
                path.write_bytes(m.call("GET", "/v1/memories/export", params={"format": fmt}).content)
        console.print(f"exported {count} memories to {path}" if count is not None else f"exported to {path}")


@memories.command("import")
def import_memories(path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)], user: UserOpt = None,
                    fmt: FormatOpt = None, db: DbOpt = None, config: ConfigOpt = None,
                    url: UrlOpt = None) -> None:
    """Import a file written by `export` into a user's memories (ids already stored are skipped)."""
    fmt = _format_of(path, fmt)
    with _Memories(db, config, url, user, create=True) as m:
        with _progress(f"importing {path}"):
            if m.store is not None:
                try:
                    report = (import_jsonl if fmt == "jsonl" else import_parquet)(m.store, m.user_id, path)
                except (ImportFormatError, UnicodeDecodeError) as exc:
                    raise fail(f"{path} is not a memlane {fmt} export: {exc}") from exc
                imported, skipped = report.imported, report.skipped
            else:
                row = m.call("POST", "/v1/memories/import", params={"format": fmt}, content=path.read_bytes()).json()
                imported, skipped = row["imported"], row["skipped"]
        console.print(f"imported {imported} memories, skipped {skipped} already stored")


@memories.command("wipe")
def wipe_user(user: UserOpt = None,
              yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
              db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Delete all of a user's memories and logged interactions, for good."""
    with _Memories(db, config, url, user) as m:
        if not yes:
            typer.confirm(f"Delete all memories and logged interactions of user {m.who}?", abort=True)
        if m.store is not None:
            who, counts = m.user_id, m.store.wipe_user(m.user_id)
        else:
            row = m.call("POST", "/v1/memories/wipe", json={"confirm": True}).json()
            who, counts = row["user"], row["deleted"]
        console.print(f"wiped {who}: {counts['memories']} memories, {counts['interactions']} interactions")


def _present(**fields: Any) -> dict[str, Any]:
    """The options given, as an API body (enums as their values)."""
    return {name: getattr(value, "value", value) for name, value in fields.items() if value is not None}
