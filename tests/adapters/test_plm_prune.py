"""Structured pruning, distillation recovery and int8 quantization, on a tiny random Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adapters.plm.prune import (
    PruneConfig,
    PruneError,
    PrunePlan,
    apply_plan,
    blend,
    distill,
    measure_importance,
    model_bytes,
    perplexity,
    plan_pruning,
    prune_for_user,
    quantize_int8,
)

HD = 8  # head_dim
HEADS, KV = 6, 2  # three query heads per KV group
INTER = 48


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HEADS * HD, intermediate_size=INTER, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def batches(seed: int, n: int = 4, length: int = 16, vocab: range = range(64)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = vocab.start, vocab.stop
    return [torch.randint(lo, hi, (1, length), generator=g) for _ in range(n)]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_importance_has_one_score_per_head_and_neuron(base):
    imp = measure_importance(base, batches(1))
    assert [h.shape for h in imp.heads] == [(HEADS,), (HEADS,)]
    assert [n.shape for n in imp.neurons] == [(INTER,), (INTER,)]
    assert imp.tokens == 4 * 16
    assert all((h > 0).all() for h in imp.heads)


def test_units_that_contribute_nothing_are_pruned_first_and_output_is_unchanged(base):
    model = copy.deepcopy(base)
    dead_heads, dead_neurons = [1, 5], list(range(0, INTER, 4))  # head 1 in group 0, head 5 in group 1
    with torch.no_grad():
        for layer in model.model.layers:
            for h in dead_heads:
                layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
            layer.mlp.down_proj.weight[:, dead_neurons] = 0
    imp = measure_importance(model, batches(2))
    for heads, neurons in zip(imp.heads, imp.neurons):
        assert heads[dead_heads].max() == 0 and neurons[dead_neurons].max() == 0
    plan = plan_pruning(model, blend(imp, None, 0), PruneConfig(head_keep=2 / 3, neuron_keep=0.75))
    assert all(set(dead_heads).isdisjoint(kept) and len(kept) == 4 for kept in plan.heads)
    assert all(set(dead_neurons).isdisjoint(kept) and len(kept) == 36 for kept in plan.neurons)

    ids = batches(3)[0]
    before = logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(logits(pruned, ids), before, rtol=1e-4, atol=1e-5)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * HD and attn.o_proj.in_features == 4 * HD
    assert attn.num_key_value_groups == 2
    assert pruned.model.layers[0].mlp.down_proj.in_features == 36
    params = sum(p.numel() for p in pruned.parameters())
    assert params < sum(p.numel() for p in model.parameters())
    # generation with the KV cache still works on the pruned shapes
    out = pruned.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_user_text_decides_what_is_kept(base):
    """Neurons a user's text uses survive; with general text mixed in, the plan changes."""
    user = measure_importance(base, batches(4, vocab=range(16)))  # a 'domain': a corner of the vocabulary
    general = measure_importance(base, batches(5, vocab=range(16, 64)))
    only_user = plan_pruning(base, blend(user, None, 0), PruneConfig(neuron_keep=0.5))
    mixed = plan_pruning(base, blend(user, general, 0.9), PruneConfig(neuron_keep=0.5))
    assert only_user.neurons != mixed.neurons
    top = torch.topk(user.neurons[0], 5).indices.tolist()
    assert set(top) <= set(only_user.neurons[0])


def test_distillation_recovers_the_pruned_model(base):
    data = batches(6, n=3)
    pruned = apply_plan(copy.deepcopy(base), plan_pruning(base, blend(measure_importance(base, data), None, 0),
                                                           PruneConfig(head_keep=1 / 3, neuron_keep=0.5)))
    embeddings = pruned.get_input_embeddings().weight.clone()
    losses = distill(pruned, base, data, steps=30, lr=3e-3)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert torch.equal(pruned.get_input_embeddings().weight, embeddings)  # frozen
    assert not pruned.training


def test_plan_round_trips_as_json_and_rebuilds_the_model(base):
    data = batches(7)
    pruned, plan, losses = prune_for_user(base, data[:2], data[2:], PruneConfig(distill_steps=3))
    assert len(losses) == 3
    again = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    rebuilt = apply_plan(copy.deepcopy(base), again)
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(logits(rebuilt, data[0]), logits(pruned, data[0]))
    # the original model was left whole
    assert base.model.layers[0].self_attn.q_proj.out_features == HEADS * HD


def test_plans_that_do_not_fit_are_refused(base):
    with pytest.raises(PruneError, match="KV group"):
        apply_plan(copy.deepcopy(base), PrunePlan([[0, 1, 3], [0, 3]], [[0], [0]]))
    with pytest.raises(PruneError, match="layers"):
        apply_plan(copy.deepcopy(base), PrunePlan([[0, 3]], [[0]]))
    with pytest.raises(PruneError):
        measure_importance(torch.nn.Linear(2, 2), [])
    with pytest.raises(ValueError):
        PruneConfig(neuron_keep=0)


def test_int8_quantization_shrinks_the_model_and_keeps_its_predictions(base):
    quantized = quantize_int8(base)
    assert model_bytes(quantized) < 0.7 * model_bytes(base)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert isinstance(quantized.model.layers[1].mlp.up_proj, Int8Linear)
    assert isinstance(quantized.model.layers[1].self_attn.o_proj, Int8Linear)
    assert type(quantized.model.layers[1].mlp.down_proj) is torch.nn.Linear  # outlier inputs: kept fp32
    assert type(quantized.lm_head) is torch.nn.Linear  # tied to the embeddings: left as it is
    everything = quantize_int8(base, keep_fp32=())
    assert isinstance(everything.model.layers[0].mlp.down_proj, Int8Linear)
    ids = batches(8)[0]
    ref, got = logits(base, ids), logits(quantized, ids)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    data = batches(9)
    assert perplexity(quantized, data) == pytest.approx(perplexity(base, data), rel=0.05)
    assert type(base.model.layers[0].mlp.down_proj) is torch.nn.Linear  # the original is untouched
