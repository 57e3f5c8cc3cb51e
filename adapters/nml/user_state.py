"""Per-user NML state: each user's interactions stream through the model, so that PM commits
and EM writes accumulate in that user's state, which is saved after every feed and restored
before the next. Parameters are never touched: adapting to a user is only a change of state.

One file per user, ``<root>/<sha256(user_id)[:32]>.pt``: a dict of tensors (the model's state:
PM slots and traces, EM items, recurrent states, working-memory cache, stream position) plus a
small header, written atomically and read with ``torch.load(weights_only=True)``. The state's
size is fixed by the config (M items, r slots, W cached tokens), whatever the user's history.

Text becomes bytes (the model's vocabulary); a feed's tail that does not fill a plasticity span
is kept as pending bytes and fed first next time, so commits fall on the same boundaries
however the stream is cut into feeds.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from adapters.nml.model import NMLModel, State

log = structlog.get_logger(__name__)

FORMAT = 1
_PENDING = "__pending__"  # bytes fed but not yet run (less than a plasticity span)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@dataclass(frozen=True)
class FeedResult:
    tokens: int  # bytes run through the model by this feed
    pending: int  # bytes held back until a plasticity span is full
    pm_commits: int
    em_writes: int


class UserStateStore:
    """Loads, saves and advances per-user model state. Thread-safe (one lock per store)."""

    def __init__(self, model: NMLModel, root: Path, *, segment_len: int = 256) -> None:
        self.model = model.eval()  # eval mode: gates open when p > 0.5, never by sampling
        self.root = Path(root)
        span = model.cfg.plasticity_span
        self.segment_len = max(span, segment_len - segment_len % span)  # whole spans per segment
        self._lock = threading.Lock()

    def path(self, user_id: str) -> Path:
        return self.root / f"{hashlib.sha256(user_id.encode()).hexdigest()[:32]}.pt"

    def _config_tag(self) -> str:
        return hashlib.sha256(repr(sorted(vars(self.model.cfg).items())).encode()).hexdigest()[:16]

    def load(self, user_id: str) -> State:
        """The user's saved state, or a fresh one (batch of 1) for a new user."""
        device = next(self.model.parameters()).device
        path = self.path(user_id)
        if not path.exists():
            state = self.model.init_state(1, device)
            state[_PENDING] = torch.zeros(0, dtype=torch.long, device=device)
            return state
        payload = torch.load(path, map_location=device, weights_only=True)
        if payload.get("format") != FORMAT or payload.get("config") != self._config_tag():
            raise ValueError(f"state file {path.name} was written for another model configuration")
        return payload["state"]

    def save(self, user_id: str, state: State) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(user_id)
        tmp = path.with_suffix(".tmp")
        payload = {"format": FORMAT, "config": self._config_tag(),
                   "state": {k: v.detach().cpu().clone() for k, v in state.items()}}  # clone: no view saves its base
        torch.save(payload, tmp)
        tmp.replace(path)

    def forget(self, user_id: str) -> bool:
        """Deletes the user's state; True when there was one."""
        with self._lock:
            path = self.path(user_id)
            existed = path.exists()
            path.unlink(missing_ok=True)
            return existed

    @torch.no_grad()
    def feed(self, user_id: str, text: str) -> FeedResult:
        """Streams ``text`` through the model in the user's state and saves the result."""
        with self._lock:
            state = self.load(user_id)
            device = state["pos"].device
            pending = state.pop(_PENDING)
            tokens = torch.cat([pending, torch.tensor(encode(text), dtype=torch.long, device=device)])
            span = self.model.cfg.plasticity_span
            ready = len(tokens) - len(tokens) % span
            commits = writes = 0
            for start in range(0, ready, self.segment_len):
                chunk = tokens[start : min(start + self.segment_len, ready)].unsqueeze(0)  # (1, T)
                out = self.model(chunk, state)
                state = out.state
                commits += int(out.stats.get("pm_commits", torch.zeros(())))
                writes += int(out.stats.get("em_writes", torch.zeros(())))
            state[_PENDING] = tokens[ready:]
            self.save(user_id, state)
        log.info("nml_user_fed", user_hash=self.path(user_id).stem[:12], tokens=ready,
                 pending=len(tokens) - ready, pm_commits=commits, em_writes=writes)
        return FeedResult(ready, len(tokens) - ready, commits, writes)

    def model_state(self, user_id: str) -> State:
        """The user's state as the model takes it (pending bytes left out)."""
        with self._lock:
            state = self.load(user_id)
        state.pop(_PENDING, None)
        return state
