"""Per-user NML state: feeds persist PM/EM commits, save/restore is exact, users are isolated,
state size does not grow with the stream; the served chat model reads a user's memories."""

from __future__ import annotations

import torch

from adapters import GenerationParams
from adapters.nml.model import NMLConfig, NMLModel
from adapters.nml.serve import NMLChatModel
from adapters.nml.user_state import UserStateStore, encode

TEXT = "My name is Ada. I live in Lyon and I prefer green tea over coffee. " * 3


def tiny_model(seed: int = 0) -> NMLModel:
    torch.manual_seed(seed)
    cfg = NMLConfig(d_model=32, n_blocks=1, n_layers=2, d_hidden=16, n_heads=2, window=16,
                    plasticity_span=8, pm_slots=4, em_items=16, em_dim=8, em_writes_per_span=4,
                    neuromod_hidden=16)
    return NMLModel(cfg).eval()


def test_feed_persists_and_restores_to_identical_outputs(tmp_path):
    model = tiny_model()
    store = UserStateStore(model, tmp_path, segment_len=32)
    result = store.feed("ada", TEXT)
    assert result.tokens + result.pending == len(encode(TEXT)) and result.pending < 8
    assert result.em_writes > 0 and result.pm_commits > 0

    reopened = UserStateStore(tiny_model(), tmp_path, segment_len=32)  # a new process, same weights
    saved, restored = store.model_state("ada"), reopened.model_state("ada")
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    probe = torch.tensor([encode("I live in")])
    with torch.no_grad():
        fresh = model(probe).logits
        remembered = model(probe, saved).logits
        assert torch.equal(remembered, reopened.model(probe, restored).logits)
    assert not torch.allclose(fresh, remembered)  # the feed changed what the model predicts


def test_feeding_in_pieces_equals_feeding_at_once(tmp_path):
    """Compared through what the user gets, the predictions, not tensor by tensor: when two PM
    slots hold the same key, which of them takes more of a later write is decided by the
    slot-choice read-match, and that amplifies float rounding (cut points change the scans'
    rounding), so such slot pairs can split a write differently and answer the same."""
    model = tiny_model()
    store = UserStateStore(model, tmp_path, segment_len=32)
    store.feed("whole", TEXT)
    for piece in (TEXT[:13], TEXT[13:70], TEXT[70:]):
        store.feed("pieces", piece)
    whole, pieces = store.model_state("whole"), store.model_state("pieces")
    assert int(whole["pos"]) == int(pieces["pos"])
    probe = torch.tensor([encode("I live in")])
    with torch.no_grad():
        fresh, after_whole, after_pieces = (model(probe, s).logits.softmax(-1) for s in (None, whole, pieces))
    effect = (after_whole - fresh).abs().max()  # what the fed memories change
    assert (after_pieces - after_whole).abs().max() < 0.1 * effect


def test_users_are_isolated_and_forgettable(tmp_path):
    store = UserStateStore(tiny_model(), tmp_path)
    store.feed("alice", TEXT)
    before = store.path("alice").read_bytes()
    store.feed("bob", "Bob likes chess. " * 10)
    assert store.path("alice").read_bytes() == before
    assert store.path("alice") != store.path("bob") and "alice" not in store.path("alice").name
    assert store.forget("alice") and not store.path("alice").exists()
    assert int(store.load("alice")["pos"]) == 0  # a forgotten user starts from nothing


def test_state_file_size_does_not_grow_with_the_stream(tmp_path):
    store = UserStateStore(tiny_model(), tmp_path, segment_len=64)
    store.feed("u", TEXT)
    small = store.path("u").stat().st_size
    for _ in range(5):
        store.feed("u", TEXT * 4)
    assert abs(store.path("u").stat().st_size - small) < 256  # header digits only


def test_state_from_another_configuration_is_refused(tmp_path):
    UserStateStore(tiny_model(), tmp_path).feed("u", TEXT)
    other = NMLModel(NMLConfig(d_model=32, n_blocks=1, n_layers=1, d_hidden=16, n_heads=2, window=16,
                               plasticity_span=8, pm_slots=4, em_items=16, em_dim=8))
    try:
        UserStateStore(other, tmp_path).load("u")
    except ValueError as exc:
        assert "configuration" in str(exc)
    else:
        raise AssertionError("a state written for another configuration was accepted")


async def test_served_model_streams_text_and_reads_user_memory(tmp_path):
    served = NMLChatModel(model=tiny_model(), name="nml-tiny", store_root=tmp_path)
    assert served.loaded and served.loadable() == (True, "memory")
    messages = [{"role": "user", "content": "hi"}]
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    plain = served.generate(messages, params)
    text = await plain.text()
    assert plain.completion_tokens == 12 and plain.finish_reason == "length"
    assert served.prompt_tokens(messages) == len(encode("user: hi\nassistant: "))
    assert served.feed("ada", TEXT * 3).tokens > 0
    again = await served.generate(messages, params).text()
    assert again == text  # greedy and no user: deterministic
    with_memory = served.generate(messages, params, user_id="ada")
    await with_memory.text()
    assert with_memory.completion_tokens == 12
    served.close()
