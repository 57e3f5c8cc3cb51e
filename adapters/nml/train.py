"""Training: one optimizer for every parameter (neuromodulators included), the main LM loss,
truncated backprop through time with the state carried (detached) across segments, bf16
autocast on CUDA (the scan stays fp32), a phased schedule and checkpoints.

The phased schedule (phases A-E, fractions of the run; names follow the seed's Phases A-E):

    A  core          PM and EM off: slow weights, recurrence and working memory learn the data
    B  procedural    + PM (reads and commits)
    C  episodic      + EM
    D  neuromodulate all on, the write cost ramps from 0 to ``write_cost``
    E  consolidate   all on, full write cost, learning rate decays to 10%

The write cost adds ``write_cost * (overrun of the mean PM commit probability over its budget
+ overrun of the mean EM write probability over its budget)`` to the loss: the only explicit
pressure toward sparse writes. Everything else the neuromodulators learn
comes from the LM loss through the differentiable commits (straight-through gates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F

from adapters.nml.model import NMLConfig, NMLModel, State, detach_state

log = structlog.get_logger(__name__)

Source = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # -> inputs, targets (B, L)
PHASE_FLAGS = {"A": (False, False), "B": (True, False), "C": (True, True), "D": (True, True), "E": (True, True)}


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps are per segment; a step here is one batch
    segment_len: int = 256  # TBPTT segment; the state crosses segment edges detached
    lr: float = 3e-3
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    write_cost: float = 0.05  # weight of the write-budget overrun in the loss
    pm_commit_budget: float = 0.05  # mean PM commit probability allowed for free
    em_write_budget: float = 0.05  # mean EM write probability allowed for free
    phases: str = "A:0.2,B:0.15,C:0.15,D:0.25,E:0.25"  # name:fraction; "E:1" trains all at once
    carry_state: bool = True  # memories persist from batch to batch, as in a user's stream
    device: str = "auto"  # "auto": cuda when present, else cpu
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end (when a path is given)


@dataclass(frozen=True)
class Phase:
    name: str
    pm: bool
    em: bool
    cost_scale: float  # multiplies write_cost


def parse_phases(spec: str) -> list[tuple[str, float]]:
    phases = []
    for part in spec.split(","):
        name, _, frac = part.strip().partition(":")
        if name not in PHASE_FLAGS or not frac:
            raise ValueError(f"bad phase {part!r}: use NAME:FRACTION with NAME in A-E")
        phases.append((name, float(frac)))
    total = sum(f for _, f in phases)
    return [(n, f / total) for n, f in phases]


def phase_at(step: int, total_steps: int, spec: str) -> Phase:
    """Which phase a step falls in, and how far the write cost has ramped."""
    t = step / max(total_steps, 1)
    start = 0.0
    for name, frac in parse_phases(spec):
        if t < start + frac or math.isclose(start + frac, 1.0):
            pm, em = PHASE_FLAGS[name]
            scale = {"D": min(1.0, (t - start) / frac), "E": 1.0}.get(name, 0.0)
            return Phase(name, pm, em, scale)
        start += frac
    raise AssertionError("phases cover [0, 1]")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over targets != -100 divided by their count, and the count."""
    count = int((targets != -100).sum())
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss / max(count, 1), count


def write_penalty(stats: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """How far the mean PM commit probability and the mean EM write probability run over their
    budgets (0 when within them, or when neither memory ran). A budget rather than a plain cost:
    a plain cost keeps pushing useful writes below the gate, where only a weak gradient can
    bring them back, and training collapses."""
    total = torch.zeros(())
    if "pm_boundaries" in stats:
        rate = stats["pm_commit_prob"].cpu() / stats["pm_boundaries"].cpu()
        total = total + torch.relu(rate - cfg.pm_commit_budget)
    if "em_tokens" in stats:
        rate = stats["em_write_prob"].cpu() / stats["em_tokens"].cpu()
        total = total + torch.relu(rate - cfg.em_write_budget)
    return total


def train(model: NMLModel, source: Source, cfg: TrainConfig, *, checkpoint: Path | None = None) -> list[dict]:
    """Trains in place; returns the logged history. One AdamW over all parameters."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    state: State | None = None
    history, started = [], time.perf_counter()
    for step in range(cfg.steps):
        phase = phase_at(step, cfg.steps, cfg.phases)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        inputs, targets = (t.to(device) for t in source(gen))
        if state is None or not cfg.carry_state or state["b0.l0.h"].shape[0] != inputs.shape[0]:
            state = model.init_state(inputs.shape[0], device)
        state, losses = _train_batch(model, opt, inputs, targets, state, phase, cfg, device)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "phase": phase.name, **losses, "seconds": round(time.perf_counter() - started, 1)}
            history.append(entry)
            log.info("nml_train", **entry)
        if checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(checkpoint, model, cfg, step + 1, opt)
    if checkpoint:
        save_checkpoint(checkpoint, model, cfg, cfg.steps, opt)
    model.eval()
    return history


def _train_batch(model, opt, inputs, targets, state, phase: Phase, cfg: TrainConfig, device):
    """TBPTT over one batch: an optimizer step per segment, the state detached between them."""
    lm_total = cost_total = 0.0
    segments = 0
    for start in range(0, inputs.shape[1], cfg.segment_len):
        seg = slice(start, start + cfg.segment_len)
        with autocast(device):
            out = model(inputs[:, seg], state, pm=phase.pm, em=phase.em)
        loss, count = lm_loss(out.logits, targets[:, seg])
        cost = write_penalty(out.stats, cfg).to(device)
        total = loss + cfg.write_cost * phase.cost_scale * cost
        opt.zero_grad(set_to_none=True)
        if count or total.requires_grad:
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        state = detach_state(out.state)
        lm_total, cost_total, segments = lm_total + loss.item(), cost_total + cost.item(), segments + 1
    return state, {"loss": round(lm_total / segments, 4), "write_overrun": round(cost_total / segments, 4)}


def save_checkpoint(path: Path, model: NMLModel, cfg: TrainConfig, step: int, opt=None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(model.cfg), "train": asdict(cfg), "step": step, "model": model.state_dict()}
    if opt is not None:
        payload["optimizer"] = opt.state_dict()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    log.info("nml_checkpoint", path=str(path), step=step)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> NMLModel:
    payload = torch.load(Path(path), map_location=device, weights_only=True)
    model = NMLModel(NMLConfig(**payload["config"]))
    model.load_state_dict(payload["model"])
    return model.to(device).eval()


@torch.no_grad()
def perplexity(model: NMLModel, stream: torch.Tensor, *, segment_len: int = 256, tokens: int = 8192,
               state: State | None = None, pm: bool = True, em: bool = True, plastic: bool = True) -> float:
    """Byte-level perplexity over the first ``tokens`` of a stream, read as one stream in
    segments with the state carried (a fresh state when None)."""
    device = next(model.parameters()).device
    data = stream[: tokens + 1].to(device).unsqueeze(0)  # (1, N + 1)
    total = count = 0.0
    for start in range(0, data.shape[1] - 1, segment_len):
        inputs = data[:, start : start + segment_len]
        targets = data[:, start + 1 : start + segment_len + 1]
        inputs = inputs[:, : targets.shape[1]]
        out = model(inputs, state, pm=pm, em=em, plastic=plastic)
        state = out.state
        loss, n = lm_loss(out.logits, targets)
        total, count = total + float(loss) * n, count + n
    return math.exp(total / max(count, 1))
