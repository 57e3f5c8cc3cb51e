"""The benchmark figures are drawn from results shaped like each script's --out JSON."""

from __future__ import annotations

import json
import struct

import pytest

from tests.benchmarks import plots

pytest.importorskip("matplotlib")


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def side(p50: float, p99: float) -> dict:
    return {"n": 100, "p50": p50, "p99": p99}


def test_latency_figure_from_json_with_a_crashed_level(tmp_path):
    by_c = {"1": {"direct": side(0.001, 0.002), "proxied": side(0.002, 0.007)},
            "16": {"direct": side(0.009, 0.018), "proxied": side(0.03, 0.1)}}
    results = {"plan": {"quick": True}, "settings": {
        "memory off": by_c,
        "memory on": {**by_c, "64": {"crashed": {"returncode": -9, "at": 64}}}}}
    path = plots.latency(json.loads(json.dumps(results)), tmp_path / "out")  # keys as JSON has them
    assert path == tmp_path / "out" / plots.LATENCY_PNG
    width, height = png_size(path)
    assert width > height > 200


def test_recall_figure(tmp_path):
    def rows(r: float) -> dict:
        return {"all": {"n": 947, "r@5": r, "r@10": r + 0.05, "r@20": r + 0.08}}

    results = {"seed": 2, "embedder": "minilm", "summary": {
        "bm25": rows(0.5), "vector": rows(0.77), "rrf": rows(0.82), "memlane": rows(0.83),
        "rrf_current": rows(0.83)}}
    width, height = png_size(plots.recall(results, tmp_path))
    assert width > 400 and height > 200


def test_learning_curves_only_for_benchmarks_that_recorded_one(tmp_path):
    curve = [{"step": s, "phase": "C" if s < 20 else "D", "loss": 5.5 - s / 20} for s in range(2, 62, 2)]
    results = {"quick": True, "scan": {"speed_T1024": {}}, "mqar": {"learning_curve": curve},
               "stability": {"learning_curve": curve}}
    path = plots.learning_curves(results, tmp_path)
    assert png_size(path)[0] > 600  # two panels side by side
    assert plots.learning_curves({"scan": {}}, tmp_path / "none") is None
    assert plots._phase_starts(curve) == [(2, "C"), (20, "D")]
