"""`memlane nml train | eval` from the command line: a checkpoint comes out and loads."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from proxy.cli import app


def test_nml_train_writes_a_checkpoint_that_eval_reads(tmp_path: Path) -> None:
    out = tmp_path / "nml.pt"
    runner = CliRunner()
    trained = runner.invoke(app, ["nml", "train", "--preset", "tiny", "--task", "text", "--steps", "4",
                                  "--seq-len", "64", "--segment-len", "32", "--batch-size", "2",
                                  "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    last = json.loads(trained.output.strip().splitlines()[-1])
    assert last["step"] == 4 and last["loss"] > 0
    assert out.is_file()

    evaluated = runner.invoke(app, ["nml", "eval", "--checkpoint", str(out), "--task", "text", "--tokens", "512"])
    assert evaluated.exit_code == 0, evaluated.output
