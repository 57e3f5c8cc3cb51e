"""The ``memlane`` command: ``serve``, and the ``memories`` commands of `proxy.cli_memories`
(which open the database file directly, or use a running server's ``/v1/memories`` API when
that server holds the file).
"""

from __future__ import annotations

from typing import Annotated

import typer

from adapters.nml.cli import app as nml_app
from proxy.cli_memories import ConfigOpt, DbOpt, load_settings, memories
from proxy.doctor import doctor

app = typer.Typer(help="memlane: a memory layer for any OpenAI-compatible client.", no_args_is_help=True)
app.add_typer(memories, name="memories")
app.add_typer(nml_app, name="nml")
app.command("doctor")(doctor)


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

    settings = load_settings(config, host=host, port=port, database=db, log_format=log_format)
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


if __name__ == "__main__":  # pragma: no cover
    app()
