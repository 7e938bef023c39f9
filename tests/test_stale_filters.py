"""Folded filters never give a silent wrong answer: changed weights and random filter ops.

A filter is folded once, at compile time, from the model's weights. A weight changed after that
(in place, load_state_dict, reassigned, a global mutated) must send the call to the unrewritten
graph with a warning; a filter path that draws random numbers (dropout in train mode) must not
be folded at all.
"""
import warnings

import pytest
import torch
from torch import nn

import lcsm_compile

D, MAX_LEN, L = 4, 64, 16
EAGER = {"inner_backend": "eager"}
GLOBAL_FILTER = torch.randn(D, MAX_LEN) * 0.3


def _fft_conv(x, h):
    """Causal long convolution of x (B, L, D) with h (D, >= L) through a zero-padded FFT."""
    n = x.size(1)
    u = x.transpose(1, 2)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n) * torch.fft.rfft(h[:, :n], n=2 * n), n=2 * n)[..., :n]
    return y.transpose(1, 2)


class LongConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.Parameter(torch.randn(D, MAX_LEN) * 0.3)

    def forward(self, x):
        return _fft_conv(x, self.h)


class GlobalLongConv(nn.Module):
    def forward(self, x):
        return _fft_conv(x, GLOBAL_FILTER)


class DroppedFilterConv(LongConv):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return _fft_conv(x, self.drop(self.h))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _change_in_place(m):
    m.h.mul_(-3.0)


def _load_state_dict(m):
    m.load_state_dict(LongConv().state_dict())


def _reassign(m):
    m.h = nn.Parameter(torch.randn(D, MAX_LEN))


def _mutate_global(_m):
    GLOBAL_FILTER.mul_(-1.0)


@pytest.mark.parametrize(
    "model_cls, change",
    [(LongConv, _change_in_place), (LongConv, _load_state_dict), (LongConv, _reassign),
     (GlobalLongConv, _mutate_global)],
    ids=["in_place", "load_state_dict", "reassign", "global"],
)
def test_changed_weight_runs_unrewritten_with_warning(model_cls, change):
    model = model_cls().eval()
    x = torch.randn(2, L, D)
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < 1e-5
        assert lcsm_compile.counters["rewrite"]["fft"] == 1  # the folded rewrite served that call
        change(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            after = fast(x)
        assert _rel(after, model(x)) < 1e-5
        assert _rel(fast(x), model(x)) < 1e-5  # and on every later call
    stale = [str(w.message) for w in caught if "changed after compiling" in str(w.message)]
    assert stale and "torch._dynamo.reset()" in stale[0]
    assert lcsm_compile.counters["graphs"]["stale_filter_fallbacks"] == 1


def test_unchanged_weights_keep_the_rewrite():
    model = LongConv().eval()
    x = torch.randn(2, L, D)
    fast = torch.compile(model, backend="lcsm", options=EAGER)
    lcsm_compile.counters.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no stale-filter warning when nothing changed
        for _ in range(3):
            assert _rel(fast(x), model(x)) < 1e-5
    assert lcsm_compile.counters["graphs"]["stale_filter_fallbacks"] == 0


def test_random_op_in_filter_path_is_refused():
    model = DroppedFilterConv().train()
    x = torch.randn(2, L, D)
    report = str(lcsm_compile.explain(model, x, inner_backend="eager"))
    assert "random op in the filter path" in report and "native_dropout" in report

    torch._dynamo.reset()
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "left unchanged" warning is expected
        first, second = fast(x), fast(x)
        torch.manual_seed(7)
        compiled = fast(x)
        torch.manual_seed(7)
        eager = model(x)
    assert sum(lcsm_compile.counters["rewrite"].values()) == 0
    assert _rel(first, second) > 1e-2  # a new dropout mask each call, as in eager
    assert _rel(compiled, eager) < 1e-5


def test_strict_raises_on_changed_weights():
    from lcsm_compile.backend import LcsmCompileError

    model = LongConv().eval()
    x = torch.randn(2, L, D)
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", options={**EAGER, "strict": True})
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < 1e-5
        compiled_h = model.h
        model.h = nn.Parameter(torch.randn(D, MAX_LEN))
        for _ in range(2):  # on every call while they differ, not once
            with pytest.raises(LcsmCompileError, match="changed after compiling.*strict"):
                fast(x)
        model.h = compiled_h  # the compiled tensor, unchanged: served by the rewrite again
        assert _rel(fast(x), model(x)) < 1e-5
        compiled_h.mul_(-3.0)
        with pytest.raises(LcsmCompileError, match="changed after compiling"):
            fast(x)
    assert lcsm_compile.counters["graphs"]["stale_filter_fallbacks"] == 0
