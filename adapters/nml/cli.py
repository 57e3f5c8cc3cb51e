"""``memlane nml train | eval``: train the NML/EM model on the offline corpus or a synthetic
memory task, and evaluate a checkpoint.

Presets (model sizes):
    tiny   CPU tests and benchmarks: D=64, 1 block x 1 layer, ~0.1M parameters
    small  CPU text runs: D=128, 2 blocks x 2 layers
    base   the seed's GPU size: D=512, B=4 blocks x L=8 layers (32 PM instances), W=256,
           r=8, M=256, k=4 (see docs/nml.md for the documented GPU command)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The NML/EM neuromodulated model: train and evaluate.", no_args_is_help=True)

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_blocks": 1, "n_layers": 1, "d_hidden": 32, "n_heads": 2, "em_dim": 32},
    "small": {"d_model": 128, "n_blocks": 2, "n_layers": 2, "d_hidden": 128, "n_heads": 4, "em_dim": 64},
    "base": {"d_model": 512, "n_blocks": 4, "n_layers": 8, "d_hidden": 512, "n_heads": 8, "em_dim": 128},
}
TASKS = ("text", "mqar", "assoc")


def model_config(preset: str, **overrides):
    from adapters.nml.model import NMLConfig

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return NMLConfig(**{**PRESETS[preset], **overrides})


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write.")] = Path("nml.pt"),
    task: Annotated[str, typer.Option(help="text (offline corpus), mqar or assoc.")] = "text",
    preset: Annotated[str, typer.Option(help="tiny, small or base.")] = "small",
    steps: Annotated[int, typer.Option(help="Batches to train on.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (cut into TBPTT segments).")] = 1024,
    segment_len: Annotated[int, typer.Option(help="TBPTT segment length.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    phases: Annotated[str, typer.Option(help="Phased schedule, NAME:FRACTION for A-E.")] = "A:0.2,B:0.15,C:0.15,D:0.25,E:0.25",
    write_cost: Annotated[float, typer.Option(help="Weight of the write-probability cost.")] = 0.05,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    carry: Annotated[bool, typer.Option(help="Carry memories from batch to batch (a user's stream).")] = True,
    em_budget: Annotated[float, typer.Option(help="Mean EM write probability allowed for free.")] = 0.05,
    pm_budget: Annotated[float, typer.Option(help="Mean PM commit probability allowed for free.")] = 0.05,
    checkpoint_every: Annotated[int, typer.Option(help="Save every N batches (0: at the end).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train a model; writes a checkpoint with its config."""
    import torch

    from adapters.nml.model import NMLModel
    from adapters.nml.tasks import task_source
    from adapters.nml.train import TrainConfig
    from adapters.nml.train import train as run_training

    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = NMLModel(model_config(preset))
    cfg = TrainConfig(steps=steps, segment_len=segment_len, lr=lr, phases=phases, write_cost=write_cost,
                      carry_state=carry, em_write_budget=em_budget, pm_commit_budget=pm_budget,
                      device=device, seed=seed, checkpoint_every=checkpoint_every)
    source = task_source(task, batch_size, seq_len, span=model.cfg.plasticity_span)
    typer.echo(f"training {model.num_parameters():,} parameters on {task} for {steps} batches")
    history = _train_with_progress(run_training, model, source, cfg, out)
    typer.echo(json.dumps(history[-1]))


def _train_with_progress(run_training, model, source, cfg, out: Path) -> list[dict]:  # type: ignore[no-untyped-def]
    """Training with a rich bar on stderr (one step per batch drawn), off when not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        steps = bar.add_task("training", total=cfg.steps)

        def counted(gen):  # type: ignore[no-untyped-def]
            bar.advance(steps)
            return source(gen)

        return run_training(model, counted, cfg, checkpoint=out)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to evaluate.", exists=True, dir_okay=False)],
    task: Annotated[str, typer.Option(help="text (perplexity) or mqar / assoc / profile (recall).")] = "text",
    tokens: Annotated[int, typer.Option(help="Validation tokens for text.")] = 16384,
    batch_size: Annotated[int, typer.Option(help="Sequences for the recall tasks.")] = 64,
    delay: Annotated[int, typer.Option(help="Tokens between facts and questions (recall tasks).")] = 300,
    n_pairs: Annotated[int, typer.Option(help="Pairs / facts per sequence.")] = 8,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Evaluate with memory on and off; prints JSON."""
    import torch

    from adapters.nml import tasks
    from adapters.nml.corpus import corpus_split
    from adapters.nml.train import load_checkpoint, perplexity

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)
    result: dict[str, object] = {"checkpoint": str(checkpoint), "task": task}
    if task == "text":
        _, val = corpus_split()
        for on in (True, False):
            result[f"ppl_memory_{'on' if on else 'off'}"] = round(
                perplexity(model, val, tokens=tokens, pm=on, em=on), 4)
    else:
        gen = torch.Generator().manual_seed(1234)
        span = model.cfg.plasticity_span
        if task == "assoc":
            batch = tasks.assoc_retrieval(batch_size, n_pairs, span, delay, gen=gen)
        elif task in ("mqar", "profile"):
            batch = tasks.profile_facts(batch_size, n_pairs, delay, gen=gen)
        else:
            raise typer.BadParameter(f"unknown task {task!r}")
        for on in (True, False):
            acc, rates, _ = tasks.recall_accuracy(model, batch, segment_len=256, pm=on, em=on)
            result[f"accuracy_memory_{'on' if on else 'off'}"] = round(acc, 4)
            result.update({k: round(v, 4) for k, v in rates.items()} if on else {})
        result["chance"] = tasks.CHANCE
    typer.echo(json.dumps(result))
