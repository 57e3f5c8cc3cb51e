"""``memlane feedback``, ``memlane domains``, ``memlane datasets export`` and ``memlane dream``.

Like the ``memories`` commands, they open the database file directly, or go through a running
server's API when that server holds the file (``--url``, ``MEMLANE_API_KEY``); ``dream`` needs
the file itself (it compacts it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from learner import (
    PreloadCache,
    UnknownResponse,
    build_dataset,
    domain_report,
    dream,
    give_feedback,
)
from proxy.cli_memories import (
    ConfigOpt,
    DbOpt,
    UrlOpt,
    UserOpt,
    _Memories,
    console,
    fail,
)
from proxy.errors import ProxyError
from proxy.feedback_api import parse_feedback

__all__ = ["register"]

datasets = typer.Typer(help="Training datasets for the personal model.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("feedback")(feedback)
    app.command("domains")(domains)
    app.command("dream")(dream_command)
    app.add_typer(datasets, name="datasets")


def feedback(
    response_id: Annotated[str, typer.Argument(help="The x-request-id returned with the answer.")],
    good: Annotated[bool, typer.Option("--good", help="The answer was good (x1.5).")] = False,
    bad: Annotated[bool, typer.Option("--bad", help="The answer was bad (x0.5).")] = False,
    correction: Annotated[str | None, typer.Option("--correction", help="What the answer should have said (x3.0); "
                                                   "also corrects the memories involved.")] = None,
    user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Rate an answer, or correct it."""
    if good and bad:
        raise fail("choose one of --good and --bad")
    body = {"response_id": response_id, "rating": "good" if good else "bad" if bad else None,
            "correction": correction}
    body = {k: v for k, v in body.items() if v is not None}
    try:
        response_id, rating, correction = parse_feedback(body)
    except ProxyError as exc:
        raise fail(exc.message) from exc
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            try:
                result = give_feedback(m.store, m.user_id, response_id, rating=rating, correction=correction)
            except UnknownResponse as exc:
                raise fail(f"no response {response_id} for user {m.user_id}") from exc
            weight, created, superseded = result.weight, result.created, result.superseded
        else:
            row = m.call("POST", "/v1/feedback", json=body).json()
            weight = row["weight"]
            created, superseded = row["memories"]["created"], row["memories"]["superseded"]
        console.print(f"feedback recorded: weight x{weight}")
        for memory_id in created:
            console.print(f"remembered from the correction: {memory_id}")
        for memory_id in superseded:
            console.print(f"corrected (superseded): {memory_id}")


def domains(user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The knowledge domains a user's requests and memories touch, most used first."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            rows = [s.as_dict() for s in domain_report(m.store, m.user_id)]
        else:
            rows = m.call("GET", "/v1/domains").json()["data"]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("domain", "retrieval", "memory", "total", "share", "decision")
    for r in rows:
        table.add_row(r["domain"], str(r["retrieval"]), str(r["memory"]), str(r["total"]),
                      f"{r['share']:.1%}", r["decision"])
    console.print(table)


@datasets.command("export")
def export_dataset(
    path: Path, user: UserOpt = None, seed: Annotated[int, typer.Option(help="Paraphrase choice seed.")] = 0,
    db: DbOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
) -> None:
    """Write a user's distillation dataset as JSONL (the same store gives the same bytes)."""
    with _Memories(db, config, url, user) as m:
        if m.store is not None:
            dataset = build_dataset(m.store, m.user_id, seed=seed)
            count, version = dataset.to_jsonl(path), dataset.version
        else:
            response = m.call("GET", "/v1/datasets/export", params={"seed": seed})
            path.write_bytes(response.content)
            count, version = response.headers["x-memlane-dataset-examples"], response.headers["x-memlane-dataset-version"]
    console.print(f"exported {count} examples to {path} (version {version})")


def dream_command(user: UserOpt = None, db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Run the dream agents for a user: consolidate, forget, preload, optimize."""
    with _Memories(db, config, None, user) as m:
        if m.store is None:
            raise fail("the database is held by a running server; stop it to run the dream agents")
        report = dream(m.store, m.user_id, cache=PreloadCache())
    console.print_json(json.dumps(asdict(report), default=str))
