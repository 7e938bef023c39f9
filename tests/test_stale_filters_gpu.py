"""The folded-weights guard on a GPU: under mode="reduce-overhead" (the inner compiler returns a
cudagraph-tree callable, which the guard wraps) and on the serving path, a filter weight changed
after compiling must reach the answer, with a warning, on the call after the change."""
import warnings

import pytest
import torch
from torch import nn

import lcsm_compile

pytestmark = pytest.mark.gpu
DEV = "cuda"
D, MAX_LEN = 8, 512


class LongConv(nn.Module):
    """A causal FFT long conv with its filter a parameter, and a pointwise skip around it."""

    def __init__(self):
        super().__init__()
        self.h = nn.Parameter(torch.randn(D, MAX_LEN) * 0.1)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        n = x.size(1)
        u = self.proj(x).transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n) * torch.fft.rfft(self.h[:, :n], n=2 * n), n=2 * n)[..., :n]
        return x + y.transpose(1, 2)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _stale_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "changed after compiling" in str(w.message)]


@torch.no_grad()
def test_changed_weight_under_reduce_overhead():
    torch.manual_seed(0)
    model = LongConv().to(DEV).eval()
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", mode="reduce-overhead")
    x = torch.randn(2, 300, D, device=DEV)
    for _ in range(3):  # warm-up, record, replay
        assert _rel(fast(x).clone(), model(x)) <= 1e-5
    assert lcsm_compile.counters["rewrite"]["fft"] == 1
    model.h.mul_(-2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = fast(x).clone()
    assert _rel(after, model(x)) <= 1e-5
    for _ in range(2):  # and on the calls after it
        assert _rel(fast(x).clone(), model(x)) <= 1e-5
    assert _stale_warnings(caught)
    assert lcsm_compile.counters["graphs"]["stale_filter_fallbacks"] == 1


@torch.no_grad()
def test_changed_weight_while_serving_prefix_extensions():
    torch.manual_seed(1)
    model = LongConv().to(DEV).eval()
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", options={"decode": True, "max_len": 256, "inner_backend": "eager"})
    x = torch.randn(3, 200, D, device=DEV)
    for n in range(20, 40):
        assert _rel(fast(x[:, :n]), model(x[:, :n])) <= 1e-5
    assert lcsm_compile.counters["decode"]["serving_step_positions"] >= 15
    model.h.mul_(0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(x[:, :41])
    assert _rel(got, model(x[:, :41])) <= 1e-5
    assert _rel(fast(x[:, :42]), model(x[:, :42])) <= 1e-5
    assert _stale_warnings(caught)
