"""Figures of the benchmarks, drawn from their JSON results (`--out`) as PNG files.

Each benchmark script takes `--plot DIR` and calls these itself; from a saved JSON file:

    python -m tests.benchmarks.plots latency bench-latency.json --out docs/images
    python -m tests.benchmarks.plots quality quality.json --out docs/images
    python -m tests.benchmarks.plots nml bench-nml.json --out docs/images

matplotlib is imported only here and draws off screen (Agg), so the scripts need no display.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LATENCY_PNG = "bench-latency.png"
RECALL_PNG = "bench-recall-at-k.png"
CURVES_PNG = "bench-nml-learning-curves.png"
RANKERS = ("bm25", "vector", "rrf", "memlane")  # the baselines the issue names, then memlane
CURVES = {"mqar": "EM: associative recall (mqar)", "assoc": "PM: associative retrieval (assoc)",
          "stability": "text model (stability)"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return path


def latency(results: dict, out_dir: Path) -> Path:
    """p50 and p99 latency against concurrency: straight to the upstream and through memlane,
    memory off and on (bench_latency's results)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    styles = {"memory off": "tab:blue", "memory on": "tab:orange"}
    for ax, pct in zip(axes, ("p50", "p99"), strict=True):
        direct_drawn = False
        for setting, by_c in results["settings"].items():
            levels = sorted((int(c), r) for c, r in by_c.items() if "crashed" not in r)
            if not levels:
                continue
            cs = [c for c, _ in levels]
            color = styles.get(setting, None)
            ax.plot(cs, [r["proxied"][pct] * 1000 for _, r in levels], marker="o", color=color,
                    label=f"through memlane, {setting}")
            if not direct_drawn:  # the direct side is the same upstream in both settings
                ax.plot(cs, [r["direct"][pct] * 1000 for _, r in levels], marker="s", color="gray",
                        linestyle="--", label="straight to the upstream")
                direct_drawn = True
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.set_title(f"{pct} latency")
    axes[0].set_ylabel("ms (log scale)")
    axes[0].legend(fontsize=8)
    quick = " (quick run)" if results.get("plan", {}).get("quick") else ""
    fig.suptitle(f"Latency against concurrency, fake upstream answering instantly{quick}")
    return _save(fig, out_dir / LATENCY_PNG)


def recall(results: dict, out_dir: Path) -> Path:
    """Evidence recall@k against k for each ranker, over all questions (bench_retrieval_quality):
    the whole scale on the left, the close race at the top on the right."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    summary = results["summary"]
    ks = sorted(int(key[2:]) for key in next(iter(summary.values()))["all"] if key.startswith("r@"))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for i, (method, rows) in enumerate(summary.items()):
            values = [rows["all"][f"r@{k}"] for k in ks]
            if zoom and min(values) < 0.7:
                continue
            diagnostic = method not in RANKERS
            ax.plot(ks, values, marker="o", color=f"C{i}", label=method + (" (diagnostic)" if diagnostic else ""),
                    linestyle=":" if diagnostic else "-", linewidth=2.2 if method == "memlane" else 1.2,
                    alpha=0.7 if diagnostic else 1.0)
        ax.set_xticks(ks)
        ax.set_xlabel("k (memories retrieved)")
        ax.set_ylabel("evidence recall@k")
        if not zoom:
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title("all rankers")
    axes[1].set_title("zoom: rankers above 0.7")
    n = next(iter(summary.values()))["all"]["n"]
    fig.suptitle(f"Recall against k: {n} questions, seed {results['seed']}, {results['embedder']} embeddings")
    return _save(fig, out_dir / RECALL_PNG)


def learning_curves(results: dict, out_dir: Path) -> Path | None:
    """Training loss against step for the NML benchmarks that recorded a `learning_curve`."""
    runs = {name: results[name]["learning_curve"] for name in CURVES
            if isinstance(results.get(name), dict) and results[name].get("learning_curve")}
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 3.2), squeeze=False)
    for ax, (name, curve) in zip(axes[0], runs.items(), strict=True):
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", color="tab:purple")
        for step, phase in _phase_starts(curve):
            ax.axvline(step, color="gray", linewidth=0.6, linestyle=":")
            ax.annotate(phase, (step, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        va="top", ha="left", color="gray")
        ax.set_title(CURVES[name], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
    quick = " (quick run)" if results.get("quick") else ""
    fig.suptitle(f"NML/EM learning curves, tiny CPU models{quick}")
    return _save(fig, out_dir / CURVES_PNG)


def _phase_starts(curve: list[dict]) -> list[tuple[int, str]]:
    """Where the training phase (A-E) changes along a logged curve: (first logged step, phase)."""
    out, last = [], None
    for point in curve:
        if point.get("phase") != last:
            out.append((point["step"], str(point.get("phase"))))
            last = point.get("phase")
    return out


DRAW = {"latency": latency, "quality": recall, "nml": learning_curves}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.plots", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=sorted(DRAW))
    p.add_argument("results", type=Path, help="the benchmark's --out JSON file")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG file")
    args = p.parse_args(argv)
    path = DRAW[args.kind](json.loads(args.results.read_text()), args.out)
    print(path if path else "nothing to draw: the results hold no learning curves")


if __name__ == "__main__":
    main()
