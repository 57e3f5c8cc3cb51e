"""Personal adapters at rest: AES-256-GCM with one key per user, kept in a keyring folder.

A sealed blob is ``MAGIC | nonce (12 bytes) | ciphertext | tag (16 bytes)``. The nonce is random
for every encryption (96 bits: safe for far more writes than one user's adapters will see); the
caller's ``aad`` (for an adapter, e.g. ``"<user>/<version>"``) is authenticated with the blob, so a
file copied onto another user's or another version's name does not open either.

The keyring holds one 32-byte key per user in its own file (mode 0600, folder 0700), named by a
hash of the user id so file names reveal nobody. With a master key (``MEMLANE_ADAPTER_MASTER_KEY``)
new user keys are themselves sealed with a key derived from it (HKDF-SHA256), so the keyring
folder alone opens nothing. Forgetting a user deletes their key: whatever adapters remain on disk,
on a backup or elsewhere, can no longer be decrypted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

__all__ = [
    "KEY_BYTES",
    "AdapterCryptoError",
    "DecryptionError",
    "KeyNotFoundError",
    "Keyring",
    "KeyringError",
    "decrypt_bytes",
    "encrypt_bytes",
    "encrypted_metadata",
    "load_encrypted_state_dict",
    "save_encrypted_state_dict",
]

MAGIC = b"MLA1"  # memlane adapter, format 1
KEY_MAGIC = b"MLK1"  # a keyring entry, format 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
_RAW, _WRAPPED = 0, 1  # how a keyring entry holds its key
MIN_MASTER_KEY_CHARS = 16


class AdapterCryptoError(Exception):
    """Base class: an adapter or a key cannot be sealed or opened."""


class DecryptionError(AdapterCryptoError):
    """A blob did not open: wrong key, wrong ``aad``, or tampered or truncated bytes."""


class KeyNotFoundError(AdapterCryptoError):
    """The user has no key (never created, or forgotten)."""


class KeyringError(AdapterCryptoError):
    """A keyring entry is unreadable: corrupt, or wrapped by a master key that is missing or wrong."""


def _aad_bytes(aad: bytes | str) -> bytes:
    return MAGIC + (aad.encode() if isinstance(aad, str) else bytes(aad))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise AdapterCryptoError(f"an adapter key is {KEY_BYTES} bytes")


def encrypt_bytes(data: bytes, key: bytes, aad: bytes | str) -> bytes:
    """Seal ``data``: a fresh random nonce each call, so equal inputs never give equal blobs."""
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(data), _aad_bytes(aad))


def decrypt_bytes(blob: bytes, key: bytes, aad: bytes | str) -> bytes:
    """Open a blob from ``encrypt_bytes``; raises DecryptionError on any mismatch."""
    _check_key(key)
    if len(blob) < len(MAGIC) + NONCE_BYTES + TAG_BYTES or not blob.startswith(MAGIC):
        raise DecryptionError("not a memlane encrypted adapter (bad header or truncated)")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(bytes(key)).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], _aad_bytes(aad))
    except InvalidTag as exc:
        raise DecryptionError("the adapter did not decrypt: wrong key, or the file was altered") from exc


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temp file in the same folder, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_encrypted_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: Path | str, key: bytes, aad: bytes | str,
    *, metadata: Mapping[str, str] | None = None,
) -> int:
    """Serialise tensors as safetensors bytes, seal them, write ``path`` (0600). Returns its size."""
    from safetensors.torch import save

    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    blob = encrypt_bytes(save(tensors, metadata=dict(metadata) if metadata else None), key, aad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, blob)
    return len(blob)


def load_encrypted_state_dict(path: Path | str, key: bytes, aad: bytes | str) -> dict[str, torch.Tensor]:
    """The tensors of a file from ``save_encrypted_state_dict``; DecryptionError if it does not open."""
    from safetensors.torch import load

    return load(decrypt_bytes(Path(path).read_bytes(), key, aad))


def encrypted_metadata(path: Path | str, key: bytes, aad: bytes | str) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an encrypted file, read from its header (no tensors)."""
    raw = decrypt_bytes(Path(path).read_bytes(), key, aad)
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, then JSON
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except ValueError as exc:
        raise DecryptionError("the decrypted adapter is not a safetensors file") from exc
    return dict(header.get("__metadata__") or {})


class Keyring:
    """One AES key per user under ``root_dir``; thread- and process-safe creation.

    ``master_key``: a secret string (at least 16 characters; a random one of 32+ is right). When
    set, keys created from now on are stored wrapped by it; keys created before stay readable.
    """

    def __init__(self, root_dir: Path | str, *, master_key: str | bytes | None = None) -> None:
        self.root = Path(root_dir)
        self._wrap_key = _derive_wrap_key(master_key) if master_key else None
        self._lock = threading.Lock()

    def path_for(self, user_id: str) -> Path:
        digest = hashlib.sha256(f"memlane-adapter-key\x00{user_id}".encode()).hexdigest()[:40]
        return self.root / f"{digest}.key"

    def has_key(self, user_id: str) -> bool:
        return self.path_for(user_id).exists()

    def key_for(self, user_id: str, *, create: bool = True) -> bytes:
        """The user's key; made (and stored) on first use unless ``create`` is False."""
        path = self.path_for(user_id)
        with self._lock:
            try:
                return self._read(path, user_id)
            except FileNotFoundError:
                if not create:
                    raise KeyNotFoundError("this user has no adapter key (never created, or forgotten)") from None
            self._ensure_root()
            key = os.urandom(KEY_BYTES)
            fd, tmp = tempfile.mkstemp(prefix=".new.", suffix=".tmp", dir=self.root)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(self._entry(key, user_id))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # fails if another process made the key first: use theirs
                except FileExistsError:
                    return self._read(path, user_id)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            log.info("adapter_key_created", wrapped=self._wrap_key is not None)
            return key

    def forget(self, user_id: str) -> bool:
        """Delete the user's key (overwritten first); True if there was one."""
        path = self.path_for(user_id)
        with self._lock:
            try:
                size = path.stat().st_size
                with open(path, "r+b") as f:  # best effort: a copy-on-write disk may keep old blocks
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
                path.unlink()
            except FileNotFoundError:
                return False
        log.info("adapter_key_forgotten")
        return True

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _entry(self, key: bytes, user_id: str) -> bytes:
        if self._wrap_key is None:
            return KEY_MAGIC + bytes([_RAW]) + key
        return KEY_MAGIC + bytes([_WRAPPED]) + encrypt_bytes(key, self._wrap_key, _key_aad(user_id))

    def _read(self, path: Path, user_id: str) -> bytes:
        data = path.read_bytes()
        if not data.startswith(KEY_MAGIC) or len(data) < len(KEY_MAGIC) + 1:
            raise KeyringError("a keyring entry is corrupt")
        kind, payload = data[len(KEY_MAGIC)], data[len(KEY_MAGIC) + 1 :]
        if kind == _RAW and len(payload) == KEY_BYTES:
            return payload
        if kind != _WRAPPED:
            raise KeyringError("a keyring entry is corrupt")
        if self._wrap_key is None:
            raise KeyringError("this user's key is wrapped by a master key: set MEMLANE_ADAPTER_MASTER_KEY")
        try:
            return decrypt_bytes(payload, self._wrap_key, _key_aad(user_id))
        except DecryptionError as exc:
            raise KeyringError("this user's key did not unwrap: MEMLANE_ADAPTER_MASTER_KEY is not the one "
                               "it was created with, or the entry was altered") from exc


def _key_aad(user_id: str) -> bytes:
    return b"memlane-adapter-key\x00" + user_id.encode()


def _derive_wrap_key(master_key: str | bytes) -> bytes:
    secret = master_key.encode() if isinstance(master_key, str) else bytes(master_key)
    if len(secret) < MIN_MASTER_KEY_CHARS:
        raise AdapterCryptoError(f"the adapter master key needs at least {MIN_MASTER_KEY_CHARS} characters")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=b"memlane-adapter-keyring", info=b"wrap v1")
    return hkdf.derive(secret)
