"""Each user's adapter versions: files, metadata, which one is live, which are stale.

Layout under the registry root (one folder per user, named by a hash of the user id):

    <root>/<user-hash>/registry.json     the versions' metadata and the live pointer
    <root>/<user-hash>/v0003.adapter     AES-GCM sealed safetensors (per-user key, `crypto`)
    <root>/keys/<...>.key                the keyring (`adapters.plm.crypto.Keyring`)

A version records the memory ids it was trained on, its parent, the gate's report, and its
status: "accepted" (passed the gate; the newest accepted one is live unless rolled back) or
"rejected" (failed the gate; its weights are not kept, the reason is). Deleting a memory marks
every version trained on it stale: a stale version is never served nor trained from again, and
if the live one turns stale the registry rolls back at once to the newest accepted version that
never saw the memory (or to the base model). The next update retrains without it.

registry.json is replaced atomically (temp file + rename), so a reader in another process (the
CLI beside a running server) sees the old or the new metadata, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from adapters.plm.crypto import (
    Keyring,
    load_encrypted_state_dict,
    save_encrypted_state_dict,
)

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("memlane.plm.registry")

ACCEPTED, REJECTED = "accepted", "rejected"


class RegistryError(Exception):
    """A version does not exist or cannot be used as asked (rollback to a stale one, ...)."""


@dataclass
class AdapterVersion:
    version: int
    created_at: str  # ISO 8601, UTC
    status: str  # "accepted" | "rejected"
    base: str  # the base model's name
    memory_ids: list[str]  # the memories it was trained on
    parent: int | None = None  # the version it was trained from
    reasons: list[str] = field(default_factory=list)  # why it was rejected
    stale: bool = False  # trained on a memory since deleted
    stale_since: str | None = None
    report: dict[str, Any] = field(default_factory=dict)  # the gate's GateReport
    training: dict[str, Any] = field(default_factory=dict)  # config, steps, seconds, examples
    lora: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0  # size of the sealed file; 0 when not kept
    teacher_requests: list[str] = field(default_factory=list)  # logged interactions it distilled

    @property
    def usable(self) -> bool:
        return self.status == ACCEPTED and not self.stale and self.bytes > 0


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class AdapterRegistry:
    def __init__(self, root: Path | str, *, master_key: str | None = None) -> None:
        self.root = Path(root)
        self.keyring = Keyring(self.root / "keys", master_key=master_key)
        self._lock = threading.Lock()

    # -- paths and metadata --------------------------------------------------------------------

    def user_dir(self, user_id: str) -> Path:
        digest = hashlib.sha256(f"memlane-adapters\x00{user_id}".encode()).hexdigest()[:32]
        return self.root / "users" / digest

    def _meta_path(self, user_id: str) -> Path:
        return self.user_dir(user_id) / "registry.json"

    def _file(self, user_id: str, version: int) -> Path:
        return self.user_dir(user_id) / f"v{version:04d}.adapter"

    def _read(self, user_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self._meta_path(user_id).read_text())
        except FileNotFoundError:
            return {"user_id": user_id, "live": None, "history": [], "versions": []}
        data["versions"] = [AdapterVersion(**v) for v in data["versions"]]
        return data

    def _write(self, user_id: str, data: dict[str, Any]) -> None:
        folder = self.user_dir(user_id)
        folder.mkdir(parents=True, exist_ok=True)
        payload = dict(data, versions=[asdict(v) for v in data["versions"]])
        fd, tmp = tempfile.mkstemp(prefix=".registry.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, self._meta_path(user_id))

    def _event(self, data: dict[str, Any], action: str, **fields: Any) -> None:
        data.setdefault("history", []).append({"at": _now(), "action": action, **fields})

    # -- reads -----------------------------------------------------------------------------------

    def users(self) -> list[str]:
        folder = self.root / "users"
        out = []
        for meta in sorted(folder.glob("*/registry.json")) if folder.is_dir() else []:
            try:
                out.append(json.loads(meta.read_text())["user_id"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    def versions(self, user_id: str) -> list[AdapterVersion]:
        return self._read(user_id)["versions"]

    def get(self, user_id: str, version: int) -> AdapterVersion:
        for v in self.versions(user_id):
            if v.version == version:
                return v
        raise RegistryError(f"user has no adapter version {version}")

    def live(self, user_id: str) -> AdapterVersion | None:
        """The version served for the user; None: the base model."""
        data = self._read(user_id)
        return next((v for v in data["versions"] if v.version == data["live"]), None)

    def history(self, user_id: str) -> list[dict[str, Any]]:
        return self._read(user_id).get("history", [])

    def load_weights(self, user_id: str, version: int) -> dict[str, torch.Tensor]:
        """The version's LoRA tensors, decrypted with the user's key."""
        record = self.get(user_id, version)
        if record.bytes == 0 or record.stale:
            why = "is stale (trained on a deleted memory)" if record.stale else f"was {record.status}"
            raise RegistryError(f"version {version} {why}; its weights are not kept")
        key = self.keyring.key_for(user_id, create=False)
        return load_encrypted_state_dict(self._file(user_id, version), key, _aad(user_id, version))

    # -- writes ----------------------------------------------------------------------------------

    def add(self, user_id: str, record: AdapterVersion, weights: dict[str, torch.Tensor] | None) -> AdapterVersion:
        """Stores a new version (weights only when accepted) and, if accepted, makes it live."""
        with self._lock:
            data = self._read(user_id)
            record.version = max((v.version for v in data["versions"]), default=0) + 1
            record.created_at = _now()
            if record.status == ACCEPTED:
                assert weights is not None
                key = self.keyring.key_for(user_id)
                record.bytes = save_encrypted_state_dict(
                    weights, self._file(user_id, record.version), key, _aad(user_id, record.version)
                )
                data["live"] = record.version
            data["versions"].append(record)
            self._event(data, record.status, version=record.version, reasons=record.reasons)
            self._write(user_id, data)
        log.info("plm_adapter_added", version=record.version, status=record.status, bytes=record.bytes)
        return record

    def rollback(self, user_id: str, to: int | None = None) -> AdapterVersion | None:
        """Serve an earlier usable version (default: the newest one before the live one), or the
        base model with `to=0`. Returns the version now live (None: the base)."""
        with self._lock:
            data = self._read(user_id)
            usable = [v for v in data["versions"] if v.usable]
            if to == 0:
                target = None
            elif to is None:
                before = [v for v in usable if data["live"] is None or v.version < data["live"]]
                if not before and data["live"] is None:
                    raise RegistryError("nothing to roll back: the base model is already serving")
                target = before[-1] if before else None
            else:
                target = next((v for v in usable if v.version == to), None)
                if target is None:
                    raise RegistryError(f"version {to} is not a usable adapter (missing, rejected or stale)")
            data["live"] = target.version if target else None
            self._event(data, "rollback", version=data["live"])
            self._write(user_id, data)
        return target

    def mark_stale(self, user_id: str, memory_ids: Iterable[str]) -> list[int]:
        """Marks the versions trained on any of these memories stale; rolls back the live one if
        it is among them. Returns the versions marked."""
        deleted = set(memory_ids)
        with self._lock:
            data = self._read(user_id)
            marked = []
            for v in data["versions"]:
                if not v.stale and deleted & set(v.memory_ids):
                    v.stale, v.stale_since = True, _now()
                    marked.append(v.version)
            if not marked:
                return []
            if data["live"] in marked:
                usable = [v for v in data["versions"] if v.usable]
                data["live"] = usable[-1].version if usable else None
                self._event(data, "rollback", version=data["live"], why="live adapter trained on a deleted memory")
            for version in marked:  # nobody may load them again: drop the weights too
                self._file(user_id, version).unlink(missing_ok=True)
            self._event(data, "stale", versions=marked)
            self._write(user_id, data)
        log.info("plm_adapters_stale", versions=marked)
        return marked

    def forget_user(self, user_id: str) -> None:
        """Deletes every adapter of the user and their key."""
        with self._lock:
            shutil.rmtree(self.user_dir(user_id), ignore_errors=True)
            self.keyring.forget(user_id)
        log.info("plm_user_forgotten")


def _aad(user_id: str, version: int) -> str:
    return f"{user_id}/{version}"


def follow_store(store: Any, registry: AdapterRegistry, *, on_wipe: Any = None) -> None:
    """Keeps the registry in step with the memory store: a deleted memory marks the adapters
    trained on it stale; wiping a user deletes their adapters and key (then calls `on_wipe`)."""

    def wiped(user_id: str) -> None:
        registry.forget_user(user_id)
        if on_wipe is not None:
            on_wipe(user_id)

    store.delete_hooks.append(registry.mark_stale)
    store.wipe_hooks.append(wiped)


def reconcile(store: Any, registry: AdapterRegistry, user_id: str) -> list[int]:
    """Marks stale the versions trained on memories that no longer exist (deleted while nothing
    was listening, e.g. by the CLI on the database file). Returns the versions marked."""
    trained = {m for v in registry.versions(user_id) if not v.stale for m in v.memory_ids}
    if not trained:
        return []
    present = {e.id for e in store.get_many(user_id, sorted(trained), relations=False)}
    return registry.mark_stale(user_id, trained - present)
