"""The ``memlane`` command: ``serve``, and the ``memories`` commands of `proxy.cli_memories`
(which open the database file directly, or use a running server's ``/v1/memories`` API when
that server holds the file).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from adapters.nml.cli import app as nml_app
from proxy.cli_adapters import adapters
from proxy.cli_learner import learn_command, learner
from proxy.cli_learning import register as register_learning
from proxy.cli_memories import ConfigOpt, DbOpt, load_settings, memories
from proxy.doctor import doctor

app = typer.Typer(help="memlane: a memory layer for any OpenAI-compatible client.", no_args_is_help=True)
app.add_typer(memories, name="memories")
app.add_typer(learner, name="learner")
app.command("learn")(learn_command)
app.add_typer(nml_app, name="nml")
app.add_typer(adapters, name="adapters")
app.command("doctor")(doctor)
register_learning(app)  # feedback, domains, datasets, dream
keys = typer.Typer(help="Proxy API keys.", no_args_is_help=True)
app.add_typer(keys, name="keys")


@keys.command("hash")
def hash_key_command(
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help="scrypt (default) or sha256.")] = "scrypt",
    stdin: Annotated[bool, typer.Option("--stdin", help="Read the key from standard input.")] = False,
) -> None:
    """Print the key_hash to configure for a key (the key is asked for, never taken as an argument)."""
    from proxy.auth import hash_key

    key = sys.stdin.readline().strip() if stdin else typer.prompt("Key", hide_input=True, confirmation_prompt=True)
    if not key:
        raise typer.BadParameter("the key is empty")
    try:
        typer.echo(hash_key(key, algorithm=algorithm))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--algorithm") from exc


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
    from proxy.shutdown import Draining

    settings = load_settings(config, host=host, port=port, database=db, log_format=log_format)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(settings.torch_threads)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    # numpy's OpenBLAS starts one thread per core, and its idle threads spin: with several
    # searches in flight they took a core from the requests. The same budget as torch's.
    threadpool_limits(limits=settings.torch_threads, user_api="blas")
    _arrow_system_pool()
    draining = Draining(settings.shutdown_grace_s)
    server_config = uvicorn.Config(
        create_app(settings, draining=draining),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # memlane ends streams still open after shutdown_grace_s itself, with an error event;
        # uvicorn's own cut-off is only the backstop.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        lifespan="on",
    )
    _server(server_config, on_exit=draining.begin).run()


def _arrow_system_pool() -> None:
    """Give pyarrow the system allocator unless ARROW_DEFAULT_MEMORY_POOL names one.

    The store moves rows between DuckDB and Python through Arrow on many threads (the request
    pool, the learner, view builds). pyarrow's default, mimalloc, held on to memory they freed:
    over 10 minutes at c=64 the server's RSS drifted +18.8% with it and +6.6% and +10.9% (two
    runs) with glibc's malloc, which also served 8-11% more requests (docs/reliability.md,
    section 9).
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def _server(config, *, on_exit):  # type: ignore[no-untyped-def]
    """uvicorn's server, telling memlane (`on_exit`) when a stop signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # type: ignore[no-untyped-def]
            on_exit()
            super().handle_exit(sig, frame)

    return Server(config)


if __name__ == "__main__":  # pragma: no cover
    app()
