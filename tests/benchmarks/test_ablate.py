"""`bench_latency --without PART` really takes the part away inside a server's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.benchmarks.ablate.sitecustomize import PARTS
from tests.benchmarks.bench_latency import ABLATE_DIR, parse_args

# What each part replaces, as the server's interpreter sees it after start-up.
REPLACED = {
    "teacher-log": "learner.worker.LearnerWorker.submit",
    "learner-batches": "learner.worker.LearnerWorker._process",
    "log-writes": "memory.store.MemoryStore.log_interactions_and_jobs",
    "extraction": "learner.worker.LearnerWorker._settle",
}


def interpreter(tmp_path, part: str, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(ABLATE_DIR), "MEMLANE_BENCH_WITHOUT": part}
    # Started elsewhere than the repository: the module finds memlane by its own location.
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_part_has_what_it_replaces_listed():
    assert set(REPLACED) == set(PARTS)


@pytest.mark.parametrize("part", PARTS)
def test_the_named_part_is_a_no_op_and_the_others_are_untouched(tmp_path, part):
    code = (
        "import learner.worker, memory.store\n"
        f"for name in {sorted(REPLACED.values())!r}:\n"
        "    module, cls, attr = name.rsplit('.', 2)\n"
        "    import importlib\n"
        "    fn = getattr(getattr(importlib.import_module(module), cls), attr)\n"
        "    print(name, fn.__qualname__)\n"
    )
    done = interpreter(tmp_path, part, code)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(seen) == set(REPLACED.values())
    for name, qualname in seen.items():
        replaced = "<lambda>" in qualname
        assert replaced == (name == REPLACED[part]), f"--without {part}: {name} is {qualname}"


def test_an_unknown_part_stops_the_server_with_the_list(tmp_path):
    done = interpreter(tmp_path, "journal", "print('started')")
    assert done.returncode != 0
    assert "started" not in done.stdout
    assert "teacher-log" in done.stderr


def test_the_option_puts_the_module_on_memlanes_path_and_names_the_part():
    args = parse_args(["--without", "log-writes", "--settings", "off"])
    assert args.memlane_env == {"PYTHONPATH": str(ABLATE_DIR), "MEMLANE_BENCH_WITHOUT": "log-writes"}
    with pytest.raises(SystemExit):
        parse_args(["--without", "log-writes", "--memlane-env", "PYTHONPATH=/elsewhere"])
