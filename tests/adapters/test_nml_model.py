"""The NML/EM model on CPU with tiny configurations: shapes, state handling, bounded memory,
commits, gradients to the neuromodulators, training and checkpoints."""

from __future__ import annotations

import pytest
import torch

from adapters.nml.model import (
    NMLConfig,
    NMLModel,
    detach_state,
    memory_footprint,
    plasticity_spans,
)
from adapters.nml.train import (
    TrainConfig,
    load_checkpoint,
    phase_at,
    save_checkpoint,
    train,
    write_penalty,
)


def tiny(**overrides) -> NMLConfig:
    base = {"d_model": 32, "n_blocks": 2, "n_layers": 2, "d_hidden": 16, "n_heads": 2, "window": 16,
            "plasticity_span": 8, "pm_slots": 4, "pm_topk": 2, "em_items": 12, "em_topk": 3, "em_dim": 8,
            "em_writes_per_span": 3, "neuromod_hidden": 16}
    return NMLConfig(**{**base, **overrides})


@pytest.fixture
def model() -> NMLModel:
    torch.manual_seed(0)
    return NMLModel(tiny()).eval()


def tokens(batch: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, steps), generator=torch.Generator().manual_seed(seed))


def test_plasticity_spans_follow_absolute_positions():
    assert plasticity_spans(0, 20, 8) == [(0, 8, True), (8, 16, True), (16, 20, False)]
    assert plasticity_spans(5, 6, 8) == [(0, 3, True), (3, 6, False)]


def test_forward_shapes_and_state_keys(model):
    out = model(tokens(3, 24))
    assert out.logits.shape == (3, 24, 256)
    assert set(out.state) == set(model.init_state(3))
    assert out.state["b1.em_k"].shape == (3, 12, 8) and out.state["b0.l1.pm_k"].shape == (3, 4, 16)
    assert int(out.state["pos"]) == 24


@torch.no_grad()
def test_memory_stays_bounded_over_a_long_stream(model):
    state = model.init_state(2)
    size = memory_footprint(state)
    for i in range(40):  # 40 segments x 24 tokens: far more tokens than EM items or PM slots
        state = model(tokens(2, 24, seed=i), state).state
        assert memory_footprint(state) == size
    assert state["b0.wm_k"].shape[2] == model.cfg.window - 1
    for i in range(2):
        strengths = torch.cat([state[f"b{i}.em_s"].flatten(), state[f"b{i}.l0.pm_s"].flatten()])
        assert strengths.min() >= 0 and strengths.max() <= 1
    assert (state["b0.em_s"] > 0).sum() > 0  # something was written


@torch.no_grad()
def test_segments_cut_at_boundaries_match_one_pass(model):
    x = tokens(2, 48)
    whole = model(x).logits
    first = model(x[:, :16])
    second = model(x[:, 16:], first.state)
    assert torch.allclose(torch.cat([first.logits, second.logits], dim=1), whole, atol=1e-4)


@torch.no_grad()
def test_memory_off_ignores_whatever_the_memories_hold(model):
    adapted = model(tokens(1, 96, seed=1)).state
    fresh = model.init_state(1)
    wiped = {k: (fresh[k] if "pm_" in k or "em_" in k else v) for k, v in adapted.items()}
    probe = tokens(1, 16, seed=2)
    off = model(probe, adapted, pm=False, em=False)
    assert torch.equal(off.logits, model(probe, wiped, pm=False, em=False).logits)
    assert torch.equal(off.state["b0.em_k"], adapted["b0.em_k"])  # passed through untouched
    assert not torch.allclose(model(probe, adapted).logits, model(probe, wiped).logits)


@torch.no_grad()
def test_running_the_model_never_changes_parameters(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = None
    for i in range(5):
        state = model(tokens(1, 32, seed=i), state).state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@torch.no_grad()
def test_without_commit_gate_every_boundary_commits():
    torch.manual_seed(0)
    model = NMLModel(tiny(use_commit_gate=False)).eval()
    stats = model(tokens(2, 32)).stats  # 4 boundaries x 2 streams x 4 PM instances
    assert stats["pm_commits"] == stats["pm_boundaries"] == 32
    assert stats["em_writes"] == 4 * 2 * 2 * 3  # boundaries x streams x blocks x writes per span
    plastic_off = model(tokens(2, 32), plastic=False).stats
    assert "pm_commits" not in plastic_off and "em_writes" not in plastic_off


@torch.no_grad()
@pytest.mark.parametrize("min_strength", [0.5, 0.0])
def test_an_open_pm_commit_writes_at_least_the_minimum_strength(min_strength):
    torch.manual_seed(0)
    model = NMLModel(tiny(pm_min_strength=min_strength, em_enabled=False)).eval()
    for block in model.blocks:
        for layer in block.layers:  # gate wide open, write strength pushed to its floor
            layer.pm.neuromod.mlp[-1].bias[:2].copy_(torch.tensor([20.0, -20.0]))
    state = model(tokens(2, 8)).state  # one boundary from empty slots
    written = state["b0.l0.pm_s"].sum(dim=-1)  # the slot weights of one commit sum to 1
    assert torch.allclose(written, torch.full((2,), min_strength), atol=1e-4)


def test_a_commit_matches_the_slot_that_holds_its_key_not_merely_a_similar_one():
    torch.manual_seed(0)
    pm = NMLModel(tiny()).blocks[0].layers[0].pm
    e, f = torch.eye(16)[0], torch.eye(16)[1]
    keys = torch.stack([0.8 * e + 0.6 * f, f, e, torch.zeros(16)]).unsqueeze(0)  # cosines 0.8, 0, 1, -
    match = pm.match(e.unsqueeze(0), keys, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert match[0, 2] > 0.99 and match[0, 0] < 0.01 and match[0, 3] < 1e-3


def test_gradients_reach_the_neuromodulators_through_the_lm_loss():
    torch.manual_seed(0)
    model = NMLModel(tiny(plasticity_span=4))
    x = tokens(2, 32)
    state = model(x[:, :16]).state  # memories written with autograd history
    out = model(x[:, 16:], state)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 16:].roll(-1, 1).flatten()).backward()
    pm_mod = model.blocks[0].layers[0].pm.neuromod
    em_mod = model.blocks[0].em.neuromod
    for module in (pm_mod.mlp, em_mod.write, em_mod.decay):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_detach_state_cuts_history(model):
    out = NMLModel(tiny())(tokens(1, 16))
    assert any(v.requires_grad for v in out.state.values())
    assert not any(v.requires_grad for v in detach_state(out.state).values())


def test_phases_follow_the_schedule():
    spec = "A:0.2,B:0.2,C:0.2,D:0.2,E:0.2"
    names = [phase_at(s, 100, spec).name for s in (0, 25, 45, 65, 85, 99)]
    assert names == ["A", "B", "C", "D", "E", "E"]
    assert (phase_at(0, 100, spec).pm, phase_at(0, 100, spec).em) == (False, False)
    assert phase_at(70, 100, spec).cost_scale == pytest.approx(0.5)
    with pytest.raises(ValueError):
        phase_at(0, 10, "Z:1")


def test_training_lowers_the_loss_and_checkpoints_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NMLModel(tiny())
    pattern = torch.arange(64).repeat(8)  # a repeating sequence the model can learn quickly

    def source(gen: torch.Generator):
        start = int(torch.randint(0, 64, (1,), generator=gen))
        window = pattern[start : start + 33].repeat(4, 1)
        return window[:, :-1], window[:, 1:]

    cfg = TrainConfig(steps=30, segment_len=16, lr=1e-2, warmup=5, phases="A:0.3,C:0.3,D:0.4", log_every=10)
    history = train(model, source, cfg, checkpoint=tmp_path / "nml.pt")
    assert history[-1]["loss"] < history[0]["loss"] * 0.7
    restored = load_checkpoint(tmp_path / "nml.pt")
    x = tokens(1, 24)
    with torch.no_grad():
        assert torch.equal(restored(x).logits, model(x).logits)
    save_checkpoint(tmp_path / "again.pt", restored, cfg, 30)
    assert (tmp_path / "again.pt").exists()


@torch.no_grad()
def test_gates_sample_in_training_and_are_deterministic_in_eval():
    torch.manual_seed(0)
    model = NMLModel(tiny())
    x = tokens(4, 64)
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.logits, second.logits)
    model.train()
    counts = {float(model(x).stats["em_writes"]) for _ in range(5)}
    assert len(counts) > 1  # writes open with their probability while training


def test_write_budget_costs_nothing_within_it_and_the_overrun_beyond():
    cfg = TrainConfig(pm_commit_budget=0.1, em_write_budget=0.05)
    within = {"pm_commit_prob": torch.tensor(1.0), "pm_boundaries": torch.tensor(20.0),
              "em_write_prob": torch.tensor(2.0), "em_tokens": torch.tensor(100.0)}
    assert float(write_penalty(within, cfg)) == 0.0
    over = {**within, "em_write_prob": torch.tensor(30.0)}
    assert float(write_penalty(over, cfg)) == pytest.approx(0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_uses_bf16_autocast_with_an_fp32_scan():
    torch.manual_seed(0)
    model = NMLModel(tiny())
    x = tokens(2, 32)
    cfg = TrainConfig(steps=3, segment_len=16, warmup=1, phases="E:1", log_every=1, device="cuda")
    history = train(model, lambda gen: (x, x.roll(-1, 1)), cfg)
    assert next(model.parameters()).is_cuda and all(h["loss"] == h["loss"] for h in history)  # no NaN
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.cuda())
    assert out.state["b0.l0.h"].dtype == torch.float32  # the recurrence ran in fp32
