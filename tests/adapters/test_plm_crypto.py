"""Personal adapters at rest: sealed with a per-user key, unreadable without it, gone with it."""

from __future__ import annotations

import stat
import threading

import pytest
import torch

from adapters.plm.crypto import (
    AdapterCryptoError,
    DecryptionError,
    KeyNotFoundError,
    Keyring,
    KeyringError,
    decrypt_bytes,
    encrypt_bytes,
    encrypted_metadata,
    load_encrypted_state_dict,
    save_encrypted_state_dict,
)


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(16, 64, generator=g),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 16, generator=g),
    }


def test_adapter_round_trips_with_its_key_and_is_not_plaintext_on_disk(tmp_path):
    keys = Keyring(tmp_path / "keys")
    key = keys.key_for("alice")
    path = tmp_path / "adapters" / "alice-v1.bin"
    tensors = _adapter()
    save_encrypted_state_dict(tensors, path, key, "alice/v1", metadata={"version": "1"})

    loaded = load_encrypted_state_dict(path, key, "alice/v1")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    assert encrypted_metadata(path, key, "alice/v1") == {"version": "1"}
    raw = path.read_bytes()
    assert b"lora_A" not in raw and tensors[next(iter(tensors))].numpy().tobytes()[:64] not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_wrong_key_does_not_load(tmp_path):
    keys = Keyring(tmp_path / "keys")
    path = tmp_path / "alice.bin"
    save_encrypted_state_dict(_adapter(), path, keys.key_for("alice"), "alice/v1")
    with pytest.raises(DecryptionError):
        load_encrypted_state_dict(path, keys.key_for("bob"), "alice/v1")


def test_adapter_moved_to_another_user_or_version_does_not_load(tmp_path):
    key = Keyring(tmp_path / "keys").key_for("alice")
    path = tmp_path / "alice.bin"
    save_encrypted_state_dict(_adapter(), path, key, "alice/v1")
    with pytest.raises(DecryptionError):
        load_encrypted_state_dict(path, key, "alice/v2")


@pytest.mark.parametrize("where", ["header", "nonce", "middle", "tag", "truncate"])
def test_tampering_is_detected(tmp_path, where):
    key = Keyring(tmp_path / "keys").key_for("alice")
    blob = bytearray(encrypt_bytes(b"x" * 1000, key, b"alice/v1"))
    if where == "truncate":
        blob = blob[:-1]
    else:
        at = {"header": 0, "nonce": 6, "middle": len(blob) // 2, "tag": len(blob) - 1}[where]
        blob[at] ^= 0x01
    with pytest.raises(DecryptionError):
        decrypt_bytes(bytes(blob), key, b"alice/v1")


def test_every_encryption_uses_a_fresh_nonce(tmp_path):
    key = Keyring(tmp_path / "keys").key_for("alice")
    blobs = [encrypt_bytes(b"same adapter bytes", key, b"a") for _ in range(200)]
    nonces = {b[4:16] for b in blobs}
    assert len(nonces) == 200
    assert len(set(blobs)) == 200
    assert all(decrypt_bytes(b, key, b"a") == b"same adapter bytes" for b in blobs)


def test_keys_are_per_user_stable_and_private(tmp_path):
    root = tmp_path / "keys"
    keys = Keyring(root)
    alice = keys.key_for("alice")
    assert len(alice) == 32
    assert keys.key_for("alice") == alice
    assert Keyring(root).key_for("alice") == alice  # survives a restart
    assert keys.key_for("bob") != alice
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for entry in root.iterdir():
        assert stat.S_IMODE(entry.stat().st_mode) == 0o600
        assert "alice" not in entry.name and "bob" not in entry.name


def test_forget_removes_the_key_and_old_adapters_stay_sealed(tmp_path):
    keys = Keyring(tmp_path / "keys")
    old_key = keys.key_for("alice")
    path = tmp_path / "alice.bin"
    save_encrypted_state_dict(_adapter(), path, old_key, "alice/v1")

    assert keys.forget("alice") is True
    assert not keys.has_key("alice")
    assert list((tmp_path / "keys").iterdir()) == []
    with pytest.raises(KeyNotFoundError):
        keys.key_for("alice", create=False)
    assert keys.forget("alice") is False
    new_key = keys.key_for("alice")  # a later adapter gets a new key; the old file stays closed
    assert new_key != old_key
    with pytest.raises(DecryptionError):
        load_encrypted_state_dict(path, new_key, "alice/v1")


def test_no_key_without_create(tmp_path):
    keys = Keyring(tmp_path / "keys")
    with pytest.raises(KeyNotFoundError):
        keys.key_for("carol", create=False)
    assert not (tmp_path / "keys").exists()


def test_master_key_wraps_user_keys(tmp_path):
    root = tmp_path / "keys"
    wrapped = Keyring(root, master_key="correct horse battery staple 42")
    key = wrapped.key_for("alice")
    entry = next(root.iterdir()).read_bytes()
    assert key not in entry  # the keyring folder alone does not hold the key
    assert Keyring(root, master_key="correct horse battery staple 42").key_for("alice") == key
    with pytest.raises(KeyringError, match="MEMLANE_ADAPTER_MASTER_KEY"):
        Keyring(root).key_for("alice")
    with pytest.raises(KeyringError, match="MEMLANE_ADAPTER_MASTER_KEY"):
        Keyring(root, master_key="another master key of length").key_for("alice")


def test_short_master_key_is_refused(tmp_path):
    with pytest.raises(AdapterCryptoError, match="at least"):
        Keyring(tmp_path, master_key="short")


def test_concurrent_first_use_agrees_on_one_key(tmp_path):
    root = tmp_path / "keys"
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(Keyring(root).key_for("alice"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    assert len([p for p in root.iterdir() if p.suffix == ".key"]) == 1
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_bad_key_length_is_refused():
    with pytest.raises(AdapterCryptoError):
        encrypt_bytes(b"data", b"short", b"aad")
