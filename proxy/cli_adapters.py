"""``memlane adapters list | rollback | evaluate | update``: each user's personal adapters.

`list` and `rollback` work on the adapter registry folder (``plm_dir``) alone, also while a
server runs: the server reads the registry per request, so a rollback is served from the next
request on. `evaluate` and `update` also read the user's memories, so they open the database
file, which a running server holds: stop it first (or let the learner's training requests
drive updates inside the server).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from proxy.auth import OPEN_MODE_USER
from proxy.cli_memories import ConfigOpt, DbOpt, console, fail, load_settings
from proxy.settings import Settings

adapters = typer.Typer(help="Each user's personal adapters (the PLM): versions, rollback, evaluation.",
                       no_args_is_help=True)

UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id (default: 'default').")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _registry(settings: Settings) -> Any:
    from adapters.plm import AdapterRegistry

    key = settings.adapter_master_key.get_secret_value() if settings.adapter_master_key else None
    return AdapterRegistry(settings.plm_dir, master_key=key)


@contextmanager
def _store(settings: Settings) -> Any:
    import duckdb

    from memory import HashEmbedder
    from proxy.app import open_store

    if not Path(settings.database).exists():
        raise fail(f"no database at {settings.database} (set --db or MEMLANE_DATABASE)")
    try:  # nothing is embedded here: the lexical embedder spares loading MiniLM
        store = open_store(settings, HashEmbedder())
    except duckdb.IOException as exc:
        raise fail(f"{settings.database} is held by a running server; stop it first") from exc
    try:
        yield store
    finally:
        store.close()


def _runtime(settings: Settings) -> Any:
    from adapters.plm import BaseSpec, PLMRuntime

    return PLMRuntime.load(BaseSpec(cache_dir=settings.model_cache, model_dir=settings.local_model_dir,
                                    name=settings.local_model_name, device=settings.plm_device))


@adapters.command("list")
def list_versions(user: UserOpt = OPEN_MODE_USER, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The user's adapter versions: status, gate figures, which one is live."""
    settings = load_settings(config)
    registry = _registry(settings)
    versions, live = registry.versions(user), registry.live(user)
    if as_json:
        console.print_json(json.dumps({"user": user, "live": live.version if live else None,
                                       "versions": [_row(v) for v in versions]}))
        return
    if not versions:
        console.print(f"no adapters for {user}: the base model answers")
        return
    table = Table("version", "status", "live", "stale", "created", "memories", "fact recall", "ppl drift",
                  "size", "reasons")
    for v in versions:
        r = _row(v)
        table.add_row(str(v.version), v.status, "*" if live and live.version == v.version else "",
                      "stale" if v.stale else "", v.created_at, str(len(v.memory_ids)), r["fact_recall"],
                      r["ppl_drift"], f"{v.bytes / 1e6:.1f} MB" if v.bytes else "-", "; ".join(v.reasons))
    console.print(table)


def _row(v: Any) -> dict[str, Any]:
    report = v.report or {}
    recall, drift = report.get("fact_recall"), report.get("ppl_drift")
    return {"version": v.version, "status": v.status, "stale": v.stale, "created_at": v.created_at,
            "memories": len(v.memory_ids), "parent": v.parent, "bytes": v.bytes, "reasons": v.reasons,
            "fact_recall": "-" if recall is None else f"{recall:.0%}",
            "ppl_drift": "-" if drift is None else f"{drift:+.2%}"}


@adapters.command()
def rollback(
    user: UserOpt = OPEN_MODE_USER, config: ConfigOpt = None,
    to: Annotated[int | None, typer.Option("--to", help="Version to serve; 0: the base model. "
                                           "Default: the usable version before the live one.")] = None,
) -> None:
    """Serve an earlier adapter version (or the base model)."""
    from adapters.plm import RegistryError

    try:
        now = _registry(load_settings(config)).rollback(user, to)
    except RegistryError as exc:
        raise fail(str(exc)) from exc
    console.print(f"{user}: now serving {'version ' + str(now.version) if now else 'the base model'}")


@adapters.command()
def evaluate(
    user: UserOpt = OPEN_MODE_USER, db: DbOpt = None, config: ConfigOpt = None,
    version: Annotated[int | None, typer.Option("--version", help="Version to test (default: the live one; "
                                                "0: the base model).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the user's regression tests (facts, corrections, perplexity drift) on a version."""
    from adapters.plm import GateConfig, RegistryError
    from adapters.plm import evaluate as run_gate
    from adapters.plm.facts import corrections_of, fact_of

    settings = load_settings(config, database=db)
    registry = _registry(settings)
    if version is None:
        live = registry.live(user)
        version = live.version if live else 0
    with _store(settings) as store:
        current = store.list(user, limit=2000)
        history = store.list(user, limit=2000, include_history=True)
    runtime = _runtime(settings)
    adapter = None
    if version:
        try:
            runtime.load_adapter("evaluated", registry.load_weights(user, version))
        except RegistryError as exc:
            raise fail(str(exc)) from exc
        adapter = "evaluated"
    facts = [f for f in (fact_of(m) for m in current) if f is not None]
    report = run_gate(runtime, adapter, facts, corrections_of(current, history), GateConfig())
    if as_json:
        console.print_json(json.dumps({"user": user, "version": version, **report.to_dict()}))
        return
    console.print(f"{user} version {version or 'base'}: {'PASS' if report.passed else 'FAIL'}")
    console.print(f"  facts known {report.facts_known}/{report.facts} ({report.fact_recall:.0%}), "
                  f"corrections failed {len(report.corrections_failed)}/{report.corrections}, "
                  f"perplexity {report.ppl_base:.2f} -> {report.ppl_adapted:.2f} ({report.ppl_drift:+.2%})")
    for reason in report.reasons:
        console.print(f"  [red]{reason}[/red]")
    if not report.passed:
        raise typer.Exit(1)


@adapters.command()
def update(
    user: Annotated[str | None, typer.Option("--user", "-u", help="Train this user now (default: "
                                             "serve the learner's pending training requests).")] = None,
    db: DbOpt = None, config: ConfigOpt = None,
) -> None:
    """Train, gate and register a new adapter version."""
    from adapters.plm import run_requested_updates, run_update

    settings = load_settings(config, database=db)
    registry = _registry(settings)
    with _store(settings) as store, _training_progress() as on_step:
        runtime = _runtime(settings)
        if user is not None:
            results = [run_update(store, user, runtime=runtime, registry=registry, on_step=on_step)]
        else:
            results = run_requested_updates(store, runtime=runtime, registry=registry, on_step=on_step)
    if not results:
        console.print("no pending training requests")
    for r in results:
        what = f"version {r.version.version} {r.version.status}" if r.version else "nothing to train on"
        console.print(f"{r.user_id}: {what} in {r.seconds:.0f} s" + (f" ({'; '.join(r.reasons)})" if r.reasons and r.version else ""))


@contextmanager
def _training_progress() -> Iterator[Callable[[int, int], None]]:
    """A rich bar of optimizer steps on stderr, one task per adapter trained; off a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    columns = (TextColumn("training adapter"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task: list[Any] = []

        def on_step(done: int, total: int) -> None:
            if done == 1 or not task:
                task[:] = [bar.add_task("training", total=total)]
            bar.update(task[0], completed=done, total=total)

        yield on_step
