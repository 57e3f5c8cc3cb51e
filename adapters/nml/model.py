"""The NML/EM model (seed 003): a sequence model whose memories are written while it runs.

Read top to bottom, in dependency order:

    NMLConfig            hyperparameters, with their defaults explained
    PMNeuromodulator     decides when/how strongly/how much decay/which slot for one PM instance
    ProceduralMemory     r fast low-rank slots (key, value, strength) + eligibility traces
    NMLLayer             affine recurrence h_t = a_t * h_{t-1} + b_t (parallel scan) + its PM
    WorkingMemory        sliding-window attention over the last W tokens
    EMNeuromodulator     decides which tokens become episodic items and how much to decay
    EpisodicMemory       M items (key, value, strength) per block; top-k retrieval as latent tokens
    NMLBlock             L NML layers -> working memory -> episodic memory
    NMLModel             embedding -> blocks -> tied LM head; owns the recurrent state

All per-stream state (recurrent states, PM slots and traces, WM cache, EM items) lives in a
flat ``dict[str, Tensor]`` that ``forward`` takes and returns: training carries it (detached)
across TBPTT segments, the per-user store saves it to disk. Parameters never change outside
training; "learning while it runs" is only ever a change of that state.

Plasticity boundaries fall every ``plasticity_span`` tokens of the stream (absolute positions,
so they do not depend on how the stream is cut into segments). Between two boundaries the
memories are read-only; at a boundary the neuromodulators may commit. Commit gates are hard
(0 or 1) in the forward pass and pass gradients straight through to their probabilities; in
training they open with their probability (exploration), in eval mode when it exceeds 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapters.nml.scan import scan

State = dict[str, torch.Tensor]


@dataclass
class NMLConfig:
    vocab_size: int = 256  # byte-level tokens: no tokenizer download, any text works
    d_model: int = 512  # residual width D (defaults: the seed's GPU size; CPU runs use presets)
    n_blocks: int = 4  # B: blocks; each has its own working memory and episodic memory
    n_layers: int = 8  # L: NML layers per block; each owns one PM instance (B x L = 32 instances)
    d_hidden: int = 512  # D_h: width of an NML layer's recurrent state and of its PM slots
    n_heads: int = 8  # working-memory attention heads
    window: int = 256  # W: tokens the working memory attends to (itself included)
    mlp_mult: int = 2  # feed-forward width after each NML layer, times D
    plasticity_span: int = 16  # P: tokens between plasticity boundaries
    pm_slots: int = 8  # r: procedural slots per instance
    pm_topk: int = 2  # slots one PM commit writes (softmax-weighted top-k)
    em_items: int = 256  # M: episodic items per block
    em_topk: int = 4  # k_ret: items each token retrieves, read as latent tokens
    em_dim: int = 128  # key/value width of episodic items
    em_writes_per_span: int = 8  # most EM items one boundary can write (the gate picks fewer)
    max_decay: float = 0.2  # upper bound of the neuromodulated strength decay per boundary
    pm_min_strength: float = 0.5  # lower bound of a PM commit's write strength (see PMNeuromodulator)
    neuromod_hidden: int = 64  # width of the neuromodulator MLPs
    pm_enabled: bool = True  # build procedural memory
    em_enabled: bool = True  # build episodic memory
    use_decay: bool = True  # ablation: False -> strengths never decay
    use_commit_gate: bool = True  # ablation: False -> commit at every boundary / write every candidate
    use_eligibility: bool = True  # ablation: False -> commits see only the boundary token's activity
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if not 1 <= self.pm_topk <= self.pm_slots:
            raise ValueError("pm_topk must be in [1, pm_slots]")
        if not 0 <= self.pm_min_strength <= 1:
            raise ValueError("pm_min_strength must be in [0, 1]")
        if not 1 <= self.em_topk <= self.em_items:
            raise ValueError("em_topk must be in [1, em_items]")


@dataclass
class Step:
    """What every module of one forward pass shares."""

    pos: int  # stream position of the first token
    spans: list[tuple[int, int, bool]]  # (start, end, ends at a plasticity boundary)
    pm: bool  # use procedural memory (False: as if it did not exist; its state passes through)
    em: bool  # use episodic memory (likewise)
    plastic: bool  # allow commits at boundaries
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float32)
        self.stats[name] = self.stats[name] + value if name in self.stats else value


def plasticity_spans(pos: int, steps: int, span: int) -> list[tuple[int, int, bool]]:
    """Cuts [0, steps) at plasticity boundaries: a boundary follows absolute position p when
    (p + 1) % span == 0. The last piece may end without a boundary."""
    out, start = [], 0
    for t in range(steps):
        if (pos + t + 1) % span == 0:
            out.append((start, t + 1, True))
            start = t + 1
    if start < steps:
        out.append((start, steps, False))
    return out


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last dim, smooth at 0 (F.normalize's gradient is NaN at a zero vector,
    e.g. an empty slot or the zero "previous token" at the start of a stream)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + 1e-6)


def straight_through(p: torch.Tensor, sample: bool) -> torch.Tensor:
    """A hard 0/1 gate in the forward pass whose gradient is that of p (straight-through).
    sample=True (training) opens it with probability p, so a write the controller has learnt to
    skip still happens now and then and can prove useful again; otherwise it opens when p > 0.5."""
    hard = torch.bernoulli(p.detach()) if sample else (p > 0.5).to(p.dtype)
    return hard + p - p.detach()


def shift_right(u: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's features at every position. u: (B, T, D), prev: (B, D) -> (B, T, D)."""
    return torch.cat([prev.unsqueeze(1).to(u.dtype), u[:, :-1]], dim=1)


def topk_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the k largest logits, zeros elsewhere. (B, r) -> (B, r)."""
    top, idx = logits.topk(k, dim=-1)  # (B, k)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of x by index. x: (B, M, E), idx: (B, ...) -> (B, ..., E)."""
    flat = idx.reshape(idx.shape[0], -1)  # (B, N)
    rows = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, E)
    return rows.reshape(*idx.shape, x.shape[-1])


def read_slots(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, strength: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Attention over memory entries plus a null entry (logit 0). Strength enters twice: as a
    log prior on the logits (an empty entry, strength 0, is never read) and as the scale of the
    value read, so the gradient that says "this write helped" does not vanish once the softmax
    has settled on the entry. q: (B, t, E); keys, values: (B, t, n, E) or (B, n, E);
    strength: same minus E -> (B, t, E)."""
    if keys.dim() == 3:  # shared by every query: (B, n, E)
        scores = torch.einsum("bte,bne->btn", q, keys.to(q.dtype))  # (B, t, n)
        strength = strength.unsqueeze(1).expand(-1, q.shape[1], -1)  # (B, t, n)
        values = values.unsqueeze(1)  # (B, 1, n, E)
    else:
        scores = torch.einsum("bte,btne->btn", q, keys.to(q.dtype))  # (B, t, n)
    logits = beta * scores + torch.log(strength.to(scores.dtype) + 1e-6)  # (B, t, n)
    logits = torch.cat([logits, logits.new_zeros(*logits.shape[:2], 1)], dim=-1)  # (B, t, n + 1)
    weights = torch.softmax(logits.float(), dim=-1)[..., :-1] * strength  # (B, t, n): null dropped
    return torch.einsum("btn,btne->bte", weights, values.expand(-1, q.shape[1], -1, -1).float())


class PMNeuromodulator(nn.Module):
    """Per PM instance: from the eligibility traces, the span and the slots, decides whether to
    commit (probability), how strongly, how much the slots decay, and which slots to write.

    The write strength is bounded below by ``pm_min_strength``: a commit is a real write. With
    strengths free down to 0 the controller learnt (on the assoc benchmark) to skip filler
    boundaries by committing at strength ~0.03 with the gate left near 0.5: "no write" was
    invisible to the commit count and to its cost, and the gate opened on 13-25% of filler
    boundaries at eval. Now the only way not to write is to close the gate, which is what the
    commit cost charges for."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        dp, r = cfg.d_hidden, cfg.pm_slots
        self.mlp = nn.Sequential(
            nn.Linear(2 * dp + cfg.d_model + 2 * r, cfg.neuromod_hidden), nn.GELU(),
            nn.Linear(cfg.neuromod_hidden, 3 + r),
        )
        self.match_weight = nn.Parameter(torch.tensor(4.0))  # prefer the slot already holding this key
        self.weak_weight = nn.Parameter(torch.tensor(4.0))  # ... else the weakest slot
        self.min_strength = cfg.pm_min_strength
        self.reset_biases()

    def reset_biases(self) -> None:
        with torch.no_grad():  # commit often, nearly replacing the slot, and decay little at first
            self.mlp[-1].bias.zero_()
            self.mlp[-1].bias[:3].copy_(torch.tensor([1.0, 3.0, -4.0]))

    def forward(
        self, ek: torch.Tensor, ev: torch.Tensor, summary: torch.Tensor, strength: torch.Tensor,
        match: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ek, ev: (B, Dp); summary: (B, D); strength, match: (B, r) ->
        commit prob (B,), write strength (B,), decay logit (B,), slot logits (B, r)."""
        out = self.mlp(torch.cat([ek, ev, summary, strength, match], dim=-1).float())  # (B, 3 + r)
        slot_logits = out[:, 3:] + self.match_weight * match - self.weak_weight * strength  # (B, r)
        alpha = self.min_strength + (1 - self.min_strength) * torch.sigmoid(out[:, 1])  # (B,)
        return torch.sigmoid(out[:, 0]), alpha, out[:, 2], slot_logits


class ProceduralMemory(nn.Module):
    """r fast low-rank slots: y = sum_i s_i softmax_i(beta k_i.q + log s_i) v_i, O(r * D_h) per token.

    Every token adds its pre activity (key of the previous token) and post activity (value of
    this token) to eligibility traces e = rho * e + (1 - rho) * x (the same affine scan as the
    layer). At a boundary the neuromodulator may commit the traces into its top-k slots:
    k <- k + eta (e_k / |e_k| - k), v <- v + eta (e_v - v), s <- s + eta (1 - s), with
    eta = commit * strength * slot weight, after all strengths decayed by (1 - decay). Keys are
    normalized when read, not when stored: renormalizing an untouched empty slot at every
    boundary would multiply its gradient by 1/eps each time.
    """

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dp = cfg.d_hidden
        self.key = nn.Linear(cfg.d_model, dp, bias=False)  # shared by queries and stored keys
        self.value = nn.Linear(cfg.d_model, dp, bias=False)
        self.out = nn.Linear(dp, cfg.d_model, bias=False)
        self.trace_logit = nn.Parameter(torch.full((dp,), -1.0))  # rho = sigmoid(.) per channel, ~0.27
        self.beta = nn.Parameter(torch.tensor(30.0))  # sharpness of slot matching (keys are unit vectors)
        self.neuromod = PMNeuromodulator(cfg)

    def init_state(self, batch: int, device: torch.device) -> State:
        r, dp = self.cfg.pm_slots, self.cfg.d_hidden
        zeros = torch.zeros
        return {
            "pm_k": zeros(batch, r, dp, device=device), "pm_v": zeros(batch, r, dp, device=device),
            "pm_s": zeros(batch, r, device=device),
            "pm_ek": zeros(batch, dp, device=device), "pm_ev": zeros(batch, dp, device=device),
        }

    def traces(self, u: torch.Tensor, prev: torch.Tensor, state: State, p: str):
        """Eligibility traces at every position: (B, T, Dp) twice."""
        ck = unit(self.key(shift_right(u, prev)).float())  # pre: (B, T, Dp)
        cv = self.value(u).float()  # post: (B, T, Dp)
        if not self.cfg.use_eligibility:  # ablation: only the boundary token's own activity
            return unit(self.key(u).float()), cv
        rho = torch.sigmoid(self.trace_logit).expand_as(ck)  # (B, T, Dp)
        ek = scan(rho, (1 - rho) * ck, state[p + "pm_ek"])  # (B, T, Dp)
        ev = scan(rho, (1 - rho) * cv, state[p + "pm_ev"])  # (B, T, Dp)
        return ek, ev

    def match(self, ek: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """How much each slot would answer the trace's key if it were read now: the read's own
        attention (beta-sharp, strength prior, null entry). Raw cosine similarity is not enough to
        choose the slot to update: trace keys share a component (a new pair's largest cosine to
        the unrelated stored keys was 0.75-0.83 on the assoc benchmark), so a new pair was drawn
        onto a slot holding another pair and erased it.
        ek: (B, Dp); k: (B, r, Dp); s: (B, r) -> (B, r) in [0, 1]."""
        logits = self.beta * torch.einsum("brd,bd->br", unit(k), unit(ek)) + torch.log(s + 1e-6)  # (B, r)
        logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=-1)  # (B, r + 1): null
        return torch.softmax(logits, dim=-1)[:, :-1]

    def commit(self, ek, ev, summary, k, v, s, step: Step):
        """One boundary: returns the new (k, v, s). ek, ev: (B, Dp); k, v: (B, r, Dp); s: (B, r)."""
        commit, alpha, decay_logit, slot_logits = self.neuromod(ek, ev, summary, s, self.match(ek, k, s))
        step.add("pm_commit_prob", commit.sum())
        gate = straight_through(commit, self.training) if self.cfg.use_commit_gate else torch.ones_like(commit)
        step.add("pm_commits", gate.detach().sum())
        step.add("pm_boundaries", float(commit.shape[0]))
        if self.cfg.use_decay:
            s = s * (1 - self.cfg.max_decay * torch.sigmoid(decay_logit)).unsqueeze(-1)  # (B, r)
        eta = (gate * alpha).unsqueeze(-1) * topk_weights(slot_logits, self.cfg.pm_topk)  # (B, r)
        k = k + eta.unsqueeze(-1) * (unit(ek).unsqueeze(1) - k)  # (B, r, Dp), normalized when read
        v = v + eta.unsqueeze(-1) * (ev.unsqueeze(1) - v)  # (B, r, Dp)
        s = s + eta * (1 - s)  # (B, r)
        return k, v, s

    def forward(self, u: torch.Tensor, prev: torch.Tensor, state: State, p: str, step: Step,
                new: State) -> torch.Tensor:
        """u: (B, T, D) normalized layer input -> PM read-out (B, T, D); new slots into ``new``."""
        k, v, s = state[p + "pm_k"], state[p + "pm_v"], state[p + "pm_s"]
        ek, ev = self.traces(u, prev, state, p)  # (B, T, Dp) x 2
        q = unit(self.key(u).float())  # (B, T, Dp)
        reads = []
        for start, end, boundary in step.spans:
            reads.append(read_slots(q[:, start:end], unit(k), v, s, self.beta))  # (B, t, Dp)
            if boundary and step.plastic:
                summary = u[:, start:end].mean(dim=1).float()  # (B, D)
                k, v, s = self.commit(ek[:, end - 1], ev[:, end - 1], summary, k, v, s, step)
        new.update({p + "pm_k": k, p + "pm_v": v, p + "pm_s": s})
        if self.cfg.use_eligibility:
            new.update({p + "pm_ek": ek[:, -1], p + "pm_ev": ev[:, -1]})
        return self.out(torch.cat(reads, dim=1).to(u.dtype))  # (B, T, D)


class NMLLayer(nn.Module):
    """Neural Memory Layer: a gated affine recurrence (parallel scan, fp32) + procedural memory,
    then a feed-forward. a_t = sigmoid(W_a u + c) sets per-channel decay; c starts the channels
    at time scales log-spaced from 2 to 1000 tokens."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dh = cfg.d_hidden
        self.norm = nn.LayerNorm(cfg.d_model)
        self.in_proj = nn.Linear(cfg.d_model, 3 * dh)  # decay, input, output gate
        self.out = nn.Linear(dh, cfg.d_model, bias=False)
        timescale = torch.logspace(math.log10(2), 3, dh)
        self.decay_bias = nn.Parameter(torch.log(timescale - 1))  # sigmoid(c) = 1 - 1/timescale
        self.pm = ProceduralMemory(cfg) if cfg.pm_enabled else None
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model), nn.GELU(),
            nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model),
        )

    def init_state(self, batch: int, device: torch.device) -> State:
        state = {"h": torch.zeros(batch, self.cfg.d_hidden, device=device),
                 "prev": torch.zeros(batch, self.cfg.d_model, device=device)}
        if self.pm is not None:
            state.update(self.pm.init_state(batch, device))
        return state

    def forward(self, x: torch.Tensor, state: State, p: str, step: Step, new: State) -> torch.Tensor:
        u = self.norm(x)  # (B, T, D)
        a_logit, b_in, gate = self.in_proj(u).chunk(3, dim=-1)  # (B, T, Dh) x 3
        a = torch.sigmoid(a_logit.float() + self.decay_bias)  # (B, T, Dh), fp32
        h = scan(a, (1 - a) * b_in.float(), state[p + "h"])  # (B, T, Dh), fp32
        y = self.out(h.to(u.dtype) * F.silu(gate))  # (B, T, D)
        new[p + "h"] = h[:, -1]
        if self.pm is not None:
            if step.pm:
                y = y + self.pm(u, state[p + "prev"], state, p, step, new)
            else:
                new.update({key: state[key] for key in state if key.startswith(p + "pm_")})
        new[p + "prev"] = u[:, -1].float()
        x = x + y
        return x + self.mlp(self.norm2(x))  # (B, T, D)


class WorkingMemory(nn.Module):
    """Sliding-window causal attention: each token sees itself and the W - 1 before it, across
    segment edges through a fixed-size cache of the last W - 1 keys and values (entries from
    before the stream started are masked out)."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def init_state(self, batch: int, device: torch.device) -> State:
        hd = self.cfg.d_model // self.cfg.n_heads
        empty = torch.zeros(batch, self.cfg.n_heads, self.cfg.window - 1, hd, device=device)
        return {"wm_k": empty, "wm_v": empty.clone()}

    def forward(self, x: torch.Tensor, state: State, p: str, step: Step, new: State) -> torch.Tensor:
        bsz, steps, dim = x.shape
        heads = self.cfg.n_heads
        q, k, v = self.qkv(self.norm(x)).view(bsz, steps, 3, heads, dim // heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        k = torch.cat([state[p + "wm_k"].to(k.dtype), k], dim=2)  # (B, H, c + T, hd)
        v = torch.cat([state[p + "wm_v"].to(v.dtype), v], dim=2)
        cached = k.shape[2] - steps
        i = torch.arange(steps, device=x.device).unsqueeze(1) + cached  # (T, 1) query positions
        j = torch.arange(k.shape[2], device=x.device).unsqueeze(0)  # (1, c + T) key positions
        mask = (j <= i) & (j > i - self.cfg.window) & (j >= cached - step.pos)  # (T, c + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        keep = self.cfg.window - 1
        new[p + "wm_k"], new[p + "wm_v"] = k[:, :, -keep:].float(), v[:, :, -keep:].float()
        return self.out(y.transpose(1, 2).reshape(bsz, steps, dim))  # (B, T, D)


class EMNeuromodulator(nn.Module):
    """Per block: a write probability for every token (from the token, the one before it and
    how novel its key is) and a decay for the store at each boundary."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.write = nn.Sequential(
            nn.Linear(2 * cfg.d_model + 1, cfg.neuromod_hidden), nn.GELU(),
            nn.Linear(cfg.neuromod_hidden, 1),
        )
        self.decay = nn.Linear(cfg.d_model + 1, 1)
        self.reset_biases()

    def reset_biases(self) -> None:
        with torch.no_grad():  # write often at first (the write cost teaches restraint), decay little
            self.write[-1].bias.fill_(1.0)
            self.decay.bias.fill_(-4.0)

    def forward(self, u: torch.Tensor, u_prev: torch.Tensor, novelty: torch.Tensor):
        """u, u_prev: (B, P, D); novelty: (B, P) -> write prob (B, P), decay logit (B,)."""
        feats = torch.cat([u, u_prev, novelty.unsqueeze(-1)], dim=-1).float()  # (B, P, 2D + 1)
        write = torch.sigmoid(self.write(feats).squeeze(-1))  # (B, P)
        summary = torch.cat([u.mean(dim=1).float(), write.mean(dim=1, keepdim=True)], dim=-1)
        return write, self.decay(summary).squeeze(-1)


class EpisodicMemory(nn.Module):
    """M items per block. Each token reads its top-k items (by key match) as k latent tokens it
    attends to, with a null option. At a boundary the neuromodulator picks up to
    ``em_writes_per_span`` tokens of the span as candidates; each whose gate is open replaces
    one of the weakest items with (key of the previous token, value of this token) and its
    write probability as strength. Strengths decay at each boundary. M is fixed, so memory
    stays bounded."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.em_dim, bias=False)  # shared by queries and keys
        self.value = nn.Linear(cfg.d_model, cfg.em_dim, bias=False)
        self.out = nn.Linear(cfg.em_dim, cfg.d_model, bias=False)
        self.beta = nn.Parameter(torch.tensor(30.0))  # sharpness of key matching
        self.neuromod = EMNeuromodulator(cfg)

    def init_state(self, batch: int, device: torch.device) -> State:
        m, e = self.cfg.em_items, self.cfg.em_dim
        return {"em_k": torch.zeros(batch, m, e, device=device), "em_v": torch.zeros(batch, m, e, device=device),
                "em_s": torch.zeros(batch, m, device=device),
                "em_prev": torch.zeros(batch, self.cfg.d_model, device=device)}

    def read(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """q: (B, t, E) against the store -> (B, t, E) from its top-k items."""
        scores = torch.einsum("bte,bme->btm", q, k)  # (B, t, M)
        top = scores.topk(self.cfg.em_topk, dim=-1).indices  # (B, t, k)
        return read_slots(q, gather_rows(k, top), gather_rows(v, top), torch.gather(s, 1, top.flatten(1)).view_as(top),
                          self.beta)

    def write(self, u, u_prev, ck, cv, k, v, s, step: Step):
        """One boundary over a span of P tokens: u, u_prev: (B, P, D); ck, cv: (B, P, E)."""
        novelty = 1 - (torch.einsum("bpe,bme->bpm", ck, k) * (s > 0).unsqueeze(1)).amax(-1)  # (B, P)
        prob, decay_logit = self.neuromod(u, u_prev, novelty)  # (B, P), (B,)
        step.add("em_write_prob", prob.sum())
        step.add("em_tokens", float(prob.numel()))
        n = min(self.cfg.em_writes_per_span, prob.shape[1])
        top_p, top_i = prob.topk(n, dim=-1)  # (B, n)
        gate = straight_through(top_p, self.training) if self.cfg.use_commit_gate else torch.ones_like(top_p)
        step.add("em_writes", gate.detach().sum())
        if self.cfg.use_decay:
            s = s * (1 - self.cfg.max_decay * torch.sigmoid(decay_logit)).unsqueeze(-1)  # (B, M)
        slots = s.topk(n, dim=-1, largest=False).indices  # (B, n): the weakest items
        # an open gate replaces a weakest item, with strength gate * p: the gate's gradient acts
        # through the strength; a closed gate leaves that item as it was
        opened = gate.detach()  # (B, n) of 0/1
        old_k, old_v, old_s = gather_rows(k, slots), gather_rows(v, slots), torch.gather(s, 1, slots)
        new_k = old_k + opened.unsqueeze(-1) * (gather_rows(ck, top_i) - old_k)  # (B, n, E)
        new_v = old_v + opened.unsqueeze(-1) * (gather_rows(cv, top_i) - old_v)
        new_s = old_s + opened * (gate * top_p - old_s)  # (B, n)
        index = slots.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        return k.scatter(1, index, new_k), v.scatter(1, index, new_v), s.scatter(1, slots, new_s)

    def forward(self, x: torch.Tensor, state: State, p: str, step: Step, new: State) -> torch.Tensor:
        u = self.norm(x)  # (B, T, D)
        u_prev = shift_right(u, state[p + "em_prev"])  # (B, T, D)
        q = unit(self.key(u).float())  # (B, T, E)
        ck = unit(self.key(u_prev).float())  # (B, T, E): key = the token before
        cv = self.value(u).float()  # (B, T, E)
        k, v, s = state[p + "em_k"], state[p + "em_v"], state[p + "em_s"]
        reads = []
        for start, end, boundary in step.spans:
            reads.append(self.read(q[:, start:end], k, v, s))  # (B, t, E)
            if boundary and step.plastic:
                span = slice(start, end)
                k, v, s = self.write(u[:, span], u_prev[:, span], ck[:, span], cv[:, span], k, v, s, step)
        new.update({p + "em_k": k, p + "em_v": v, p + "em_s": s, p + "em_prev": u[:, -1].float()})
        return self.out(torch.cat(reads, dim=1).to(u.dtype))  # (B, T, D)


class NMLBlock(nn.Module):
    """L NML layers (each with its PM), then working memory, then episodic memory."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NMLLayer(cfg) for _ in range(cfg.n_layers))
        self.wm = WorkingMemory(cfg)
        self.em = EpisodicMemory(cfg) if cfg.em_enabled else None

    def init_state(self, batch: int, device: torch.device) -> State:
        state: State = {}
        for j, layer in enumerate(self.layers):
            state.update({f"l{j}.{k}": v for k, v in layer.init_state(batch, device).items()})
        state.update(self.wm.init_state(batch, device))
        if self.em is not None:
            state.update(self.em.init_state(batch, device))
        return state

    def forward(self, x: torch.Tensor, state: State, p: str, step: Step, new: State) -> torch.Tensor:
        for j, layer in enumerate(self.layers):
            x = layer(x, state, f"{p}l{j}.", step, new)
        x = x + self.wm(x, state, p, step, new)
        if self.em is not None:
            if step.em:
                x = x + self.em(x, state, p, step, new)
            else:
                new.update({key: state[key] for key in state if key.startswith(p + "em_")})
        return x  # (B, T, D)


@dataclass
class NMLOutput:
    logits: torch.Tensor  # (B, T, V)
    state: State  # to pass to the next call; carries autograd history until detached
    stats: dict[str, torch.Tensor]  # commit counts and soft write probabilities (for the write cost)


class NMLModel(nn.Module):
    """Byte embedding -> NML blocks -> tied LM head, with explicit per-stream state."""

    def __init__(self, cfg: NMLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(NMLBlock(cfg) for _ in range(cfg.n_blocks))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        for module in self.modules():  # the neuromodulators' output biases set their starting behaviour
            if isinstance(module, PMNeuromodulator | EMNeuromodulator):
                module.reset_biases()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Empty memories and zero recurrent states for ``batch`` streams."""
        device = torch.device(device or self.embed.weight.device)
        state: State = {"pos": torch.zeros((), dtype=torch.long, device=device)}
        for i, block in enumerate(self.blocks):
            state.update({f"b{i}.{k}": v for k, v in block.init_state(batch, device).items()})
        return state

    def forward(
        self, tokens: torch.Tensor, state: State | None = None, *, pm: bool = True, em: bool = True,
        plastic: bool = True,
    ) -> NMLOutput:
        """tokens: (B, T) -> logits (B, T, V). ``pm=False`` / ``em=False`` run as if that memory
        did not exist (its state passes through untouched); ``plastic=False`` reads the memories
        but never commits."""
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        pos = int(state["pos"])
        spans = plasticity_spans(pos, tokens.shape[1], self.cfg.plasticity_span)
        step = Step(pos, spans, pm, em, plastic)
        new: State = {"pos": state["pos"] + tokens.shape[1]}
        x = self.embed(tokens)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, state, f"b{i}.", step, new)
        logits = F.linear(self.norm(x), self.embed.weight)  # (B, T, V), tied head
        for key, value in state.items():  # parts a switched-off path left as they were
            new.setdefault(key, value)
        return NMLOutput(logits, new, step.stats)


def detach_state(state: State) -> State:
    """The same state without autograd history: what TBPTT carries to the next segment.
    Cloned, so slices such as h[:, -1] stop holding their whole segment's tensor alive."""
    return {k: v.detach().clone() for k, v in state.items()}


def memory_footprint(state: State) -> int:
    """Numbers held in the state: constant in the length of the stream (bounded memory)."""
    return sum(v.numel() for v in state.values())
