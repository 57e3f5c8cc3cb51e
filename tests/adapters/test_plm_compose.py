"""Three-layer composition: base + community + personal LoRA, on a tiny randomly initialised Llama.

The composed model must answer differently from the base and from either adapter alone, and
exactly like a base model whose weights were merged by hand: W + sum(w * alpha/r * B @ A).
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.plm.compose import (
    COMMUNITY,
    PERSONAL,
    AdapterLayer,
    CompositionError,
    active_layers,
    compose,
    merge_layers,
    swap_layer,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = [*ATTN, "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def make_layer(base, name: str, *, r: int, alpha: int, targets: list[str], seed: int, weight: float = 1.0):
    """A trained-looking LoRA: random A and non-zero B (a fresh LoRA has B = 0 and does nothing)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(seed)
    donor = get_peft_model(copy.deepcopy(base), config)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(donor).items()}
    return AdapterLayer(name, config, state, weight)


def hand_merged(base, layers) -> torch.nn.Module:
    """The base with each layer's weighted delta added to its weights, by hand."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for layer in layers:
        scale = layer.config.lora_alpha / layer.config.r * layer.weight
        for key, a in layer.state_dict.items():
            if ".lora_A." not in key:
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = layer.state_dict[key.replace(".lora_A.", ".lora_B.")]
            with torch.no_grad():
                modules[path].weight += scale * (b @ a)  # (out, r) @ (r, in) -> (out, in)
    return merged


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits  # (B, T, V)


@pytest.fixture
def layers(base):
    community = make_layer(base, COMMUNITY, r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"], seed=10)
    personal = make_layer(base, PERSONAL, r=8, alpha=16, targets=ALL, seed=20)
    return community, personal


def test_composed_output_differs_from_each_layer_alone_and_equals_merged_weights(base, tokens, layers):
    community, personal = layers
    plain = logits(base, tokens)
    only_community = logits(compose(copy.deepcopy(base), [community]), tokens)
    only_personal = logits(compose(copy.deepcopy(base), [personal]), tokens)
    composed_model = compose(copy.deepcopy(base), [community, personal])
    composed = logits(composed_model, tokens)

    for other in (plain, only_community, only_personal):
        assert (composed - other).abs().max() > 1e-3
    expected = logits(hand_merged(base, [community, personal]), tokens)
    torch.testing.assert_close(composed, expected, rtol=1e-4, atol=1e-5)
    assert active_layers(composed_model) == [(COMMUNITY, 1.0), (PERSONAL, 1.0)]

    # folding the layers into the weights gives the same model, weight for weight
    merged = merge_layers(composed_model)
    want = hand_merged(base, [community, personal]).state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_base_weights_are_not_touched_by_composition(base, tokens, layers):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = copy.deepcopy(base)
    model = compose(wrapped, list(layers))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, tokens), logits(base, tokens))
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])


def test_layer_weights_scale_their_delta(base, tokens):
    community = make_layer(base, COMMUNITY, r=4, alpha=8, targets=ATTN, seed=11, weight=0.5)
    personal = make_layer(base, PERSONAL, r=8, alpha=16, targets=ALL, seed=21, weight=1.5)
    composed = logits(compose(copy.deepcopy(base), [community, personal]), tokens)
    torch.testing.assert_close(composed, logits(hand_merged(base, [community, personal]), tokens),
                               rtol=1e-4, atol=1e-5)


def test_swapping_the_personal_layer_serves_another_user(base, tokens, layers):
    community, alice = layers
    bob = make_layer(base, PERSONAL, r=8, alpha=16, targets=ALL, seed=30)
    model = compose(copy.deepcopy(base), [community, alice])
    swap_layer(model, bob)
    torch.testing.assert_close(logits(model, tokens), logits(hand_merged(base, [community, bob]), tokens),
                               rtol=1e-4, atol=1e-5)
    carol = make_layer(base, "personal:carol", r=4, alpha=4, targets=ATTN, seed=40, weight=0.7)
    swap_layer(model, carol, replaces=PERSONAL)
    assert [n for n, _ in active_layers(model)] == [COMMUNITY, "personal:carol"]
    assert PERSONAL not in model.peft_config
    torch.testing.assert_close(logits(model, tokens), logits(hand_merged(base, [community, carol]), tokens),
                               rtol=1e-4, atol=1e-5)


def test_adapter_folder_from_save_pretrained_composes(base, tokens, layers, tmp_path):
    from peft import get_peft_model, set_peft_model_state_dict

    community, personal = layers
    saved = get_peft_model(copy.deepcopy(base), personal.config)
    set_peft_model_state_dict(saved, dict(personal.state_dict))
    saved.save_pretrained(tmp_path / "alice")
    loaded = AdapterLayer.from_pretrained(tmp_path / "alice", PERSONAL)
    torch.testing.assert_close(logits(compose(copy.deepcopy(base), [community, loaded]), tokens),
                               logits(hand_merged(base, [community, personal]), tokens), rtol=1e-4, atol=1e-5)


def test_bad_compositions_are_refused(base, layers, tmp_path):
    community, personal = layers
    with pytest.raises(CompositionError):
        compose(copy.deepcopy(base), [])
    with pytest.raises(CompositionError, match="differ"):
        compose(copy.deepcopy(base), [community, AdapterLayer(COMMUNITY, personal.config, personal.state_dict)])
    partial = {k: v for k, v in personal.state_dict.items() if "layers.1." not in k}
    with pytest.raises(CompositionError, match="lacks"):
        compose(copy.deepcopy(base), [AdapterLayer(PERSONAL, personal.config, partial)])
    with pytest.raises(CompositionError, match="not a readable"):
        AdapterLayer.from_pretrained(tmp_path / "missing", PERSONAL)
    model = compose(copy.deepcopy(base), [community])
    with pytest.raises(CompositionError, match="no active"):
        swap_layer(model, personal)
