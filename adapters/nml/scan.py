"""Parallel scans for the affine recurrence h_t = a_t * h_{t-1} + b_t (elementwise).

Three implementations of the same map ``(a, b, h0) -> h``, all over tensors shaped (B, T, D):

- ``scan_reference``: a float64 loop over time. Slow; the oracle tests compare against.
- ``scan_doubling``: Hillis-Steele doubling in log2(T) steps. Each step composes every
  position with the one ``offset`` before it: (A, B) o (A', B') = (A * A', A * B' + B).
  Only products and sums of the inputs appear (no logs, no divisions), so it stays exact in
  spirit at fast decay (a -> 0: products underflow to 0, which is the right answer) and at
  slow decay (a -> 1: nothing is divided by a vanishing cumulative product).
- ``scan_chunked``: for long segments. T is cut into n chunks of C ~ sqrt(T) steps; a C-step
  loop scans all chunks at once, a doubling scan carries chunk-end states across chunks, and
  one pass broadcasts them back: h = A_in * h_start + B_in. C + log2(n) sequential steps, about
  as much arithmetic as the loop (plain doubling does log2(T) full passes, which on CPU costs
  more memory traffic than it saves once B * D is large).

``scan`` picks doubling up to ``DOUBLING_MAX`` steps and chunked beyond; it always computes in
float32 (under autocast too) and returns float32. Everything is differentiable by autograd.
"""

from __future__ import annotations

import math

import torch

DOUBLING_MAX = 512  # segments up to this length use the plain doubling scan


def scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: a sequential loop in float64. a, b: (B, T, D); h0: (B, D) or None -> (B, T, D)."""
    a64, b64 = a.double(), b.double()
    h = torch.zeros_like(b64[:, 0]) if h0 is None else h0.double()  # (B, D)
    out = []
    for t in range(a64.shape[1]):
        h = a64[:, t] * h + b64[:, t]
        out.append(h)
    return torch.stack(out, dim=1)  # (B, T, D)


def scan_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The same loop in the inputs' dtype: the baseline the parallel scans are timed against."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)  # (B, D)
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)  # (B, T, D)


def _fold_h0(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """b with the initial state folded into the first step: b_0 + a_0 * h0."""
    if h0 is None:
        return b
    first = b[:, :1] + a[:, :1] * h0.unsqueeze(1)  # (B, 1, D)
    return torch.cat([first, b[:, 1:]], dim=1)  # (B, T, D)


def _doubling(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim 1 of (a, b): returns the cumulative (A, B) at every step."""
    steps = a.shape[1]
    offset = 1
    while offset < steps:
        b = torch.cat([b[:, :offset], a[:, offset:] * b[:, :-offset] + b[:, offset:]], dim=1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
        offset *= 2
    return a, b


def scan_doubling(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Doubling scan. a, b: (B, T, D); h0: (B, D) or None -> h (B, T, D)."""
    _, h = _doubling(a, _fold_h0(a, b, h0))
    return h


def scan_chunked(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Chunked scan for long segments. a, b: (B, T, D); h0: (B, D) or None -> h (B, T, D).

    Inside chunks a short loop runs over the C positions of all n chunks at once (work-efficient:
    C steps on (B, n, D) slices); a doubling scan carries the chunk-end states across chunks.
    """
    batch, steps, dim = a.shape
    chunk = chunk or max(8, 1 << (math.ceil(math.log2(max(steps, 2))) // 2))  # ~sqrt(T)
    b = _fold_h0(a, b, h0)
    pad = (-steps) % chunk
    if pad:  # identity steps (a = 1, b = 0) at the end leave the earlier states unchanged
        a = torch.cat([a, a.new_ones(batch, pad, dim)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, dim)], dim=1)
    n = a.shape[1] // chunk
    a, b = a.reshape(batch, n, chunk, dim), b.reshape(batch, n, chunk, dim)  # (B, n, C, D)
    acc_a, acc_b = a[:, :, 0], b[:, :, 0]  # (B, n, D): each chunk from a zero start
    cum_a, cum_b = [acc_a], [acc_b]
    for c in range(1, chunk):
        acc_b = a[:, :, c] * acc_b + b[:, :, c]
        acc_a = a[:, :, c] * acc_a
        cum_a.append(acc_a)
        cum_b.append(acc_b)
    a_in, b_in = torch.stack(cum_a, dim=2), torch.stack(cum_b, dim=2)  # (B, n, C, D)
    _, ends = _doubling(a_in[:, :, -1], b_in[:, :, -1])  # true state at every chunk end: (B, n, D)
    starts = torch.cat([ends.new_zeros(batch, 1, dim), ends[:, :-1]], dim=1)  # (B, n, D)
    h = a_in * starts.unsqueeze(2) + b_in  # (B, n, C, D)
    return h.reshape(batch, n * chunk, dim)[:, :steps]


def scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t in float32, whatever autocast is doing. (B, T, D) -> (B, T, D)."""
    device_type = a.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        a, b = a.float(), b.float()
        h0 = None if h0 is None else h0.float()
        if a.shape[1] <= DOUBLING_MAX:
            return scan_doubling(a, b, h0)
        return scan_chunked(a, b, h0)
