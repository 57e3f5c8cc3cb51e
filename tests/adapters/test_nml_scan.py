"""The parallel scans against the float64 loop oracle."""

from __future__ import annotations

import pytest
import torch

from adapters.nml.scan import (
    scan,
    scan_chunked,
    scan_doubling,
    scan_loop,
    scan_reference,
)


def _inputs(steps: int, low: float, high: float, *, batch: int = 2, dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, steps, dim, generator=gen) * (high - low) + low
    b = torch.randn(batch, steps, dim, generator=gen)
    h0 = torch.randn(batch, dim, generator=gen)
    return a, b, h0


def _rel_err(h: torch.Tensor, ref: torch.Tensor) -> float:
    return float((h.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("steps", [1, 2, 7, 64, 100, 512])
@pytest.mark.parametrize("decay", [(0.0, 0.3), (0.999, 1.0), (0.0, 1.0)], ids=["fast", "slow", "mixed"])
def test_doubling_matches_float64_loop(steps, decay):
    a, b, h0 = _inputs(steps, *decay)
    assert _rel_err(scan_doubling(a, b, h0), scan_reference(a, b, h0)) < 1e-5


@pytest.mark.parametrize("steps", [513, 1000, 4096])
@pytest.mark.parametrize("decay", [(0.0, 0.3), (0.9995, 1.0), (0.0, 1.0)], ids=["fast", "slow", "mixed"])
def test_chunked_matches_float64_loop_on_long_segments(steps, decay):
    a, b, h0 = _inputs(steps, *decay)
    assert _rel_err(scan_chunked(a, b, h0), scan_reference(a, b, h0)) < 1e-5


def test_no_decay_is_a_running_sum_and_zero_decay_forgets():
    b = torch.randn(1, 300, 4)
    ones, zeros = torch.ones_like(b), torch.zeros_like(b)
    assert torch.allclose(scan(ones, b), b.cumsum(dim=1), rtol=1e-5, atol=1e-4)
    assert torch.equal(scan(zeros, b, torch.randn(1, 4)), b)


def test_scan_dispatch_returns_float32_and_matches_loop_gradients():
    a, b, h0 = _inputs(700, 0.5, 1.0, dim=4)
    grads = []
    for fn in (scan, scan_loop):
        leaves = [t.clone().requires_grad_() for t in (a, b, h0)]
        out = fn(*leaves)
        assert out.dtype == torch.float32 and out.shape == a.shape
        (out * torch.linspace(-1, 1, a.shape[1]).view(1, -1, 1)).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, loop in zip(*grads, strict=True):
        assert torch.allclose(ours, loop, rtol=1e-4, atol=1e-4)


def test_scan_stays_float32_under_bfloat16_autocast():
    a, b, h0 = _inputs(64, 0.9, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scan(a.bfloat16(), b.bfloat16(), h0)
    assert out.dtype == torch.float32
    assert _rel_err(out, scan_reference(a.bfloat16().float(), b.bfloat16().float(), h0)) < 1e-5
