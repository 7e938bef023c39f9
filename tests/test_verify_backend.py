"""verify across lengths, filter extents that ignore FFT round-off, and dynamo's restart
exceptions passing through the backend."""
import math
import warnings

import pytest
import sympy
import torch
import torch.nn as nn

import lcsm_compile
import lcsm_compile.backend as backend
from lcsm_compile.passes.recheck_lengths import first_wrap_length
from lcsm_compile.passes.verify import filter_extent
from lcsm_compile.settings import Settings
from lcsm_compile.zoo import ZOO
from lcsm_compile.zoo.h3 import ShiftSSMKernel

EAGER = {"inner_backend": "eager"}
D = 8


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _rewrites():
    return sum(lcsm_compile.counters["rewrite"].values())


# --- 1. causality at lengths other than the capture length ------------------------------------


class FixedFilterAt2L(nn.Module):
    """A K-tap filter transformed at n = 2L (fla's LongConvolution spelling): circular, so
    non-causal, for L < K - 1; causal from there on."""

    def __init__(self, K: int = 48):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.h = nn.Parameter(torch.randn(D, K, generator=g) / math.sqrt(K))

    def forward(self, x):
        u = x.transpose(1, 2)
        L = u.shape[-1]
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h, n=n), n=n)[..., :L]
        return y.transpose(1, 2)


class FixedFFTSize(nn.Module):
    """FFT size from a buffer (N = 64) and a K-tap filter: causal while L + K - 1 <= N, circular
    (the last outputs wrap onto the first) for longer L."""

    def __init__(self, K: int = 16, N: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.h = nn.Parameter(torch.randn(D, K, generator=g) / math.sqrt(K))
        self.register_buffer("window", torch.ones(N), persistent=False)

    def forward(self, x):
        u = x.transpose(1, 2)
        L = u.shape[-1]
        n = self.window.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h, n=n), n=n)[..., :L]
        return y.transpose(1, 2)


class MarginFFTConv(nn.Module):
    """FFT size L + margin with a filter cut to L (max_len taps): linear while the filter has at
    most margin + 1 taps, i.e. L <= margin + 1; past that the last lags wrap onto the first
    outputs. Captured at L = 30, the verifier's sampled lengths (45, 20, 2) all fall below 66."""

    def __init__(self, margin: int = 64, max_len: int = 256, taps: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        t = torch.arange(max_len).float()
        h = torch.randn(D, max_len, generator=g) * torch.exp(-t / 200) / 4
        if taps is not None:
            h[:, taps:] = 0
        self.h, self.margin = nn.Parameter(h), margin

    def forward(self, x):
        u = x.transpose(1, 2)
        L = u.shape[-1]
        n = L + self.margin
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L]
        return y.transpose(1, 2)


def _reads_future(model, L) -> bool:
    """Whether changing the second half of the input changes the first half of the output."""
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(L))
    x2 = x.clone()
    x2[:, L // 2 :] += 1.0
    with torch.no_grad():
        return not torch.allclose(model(x)[:, : L // 2], model(x2)[:, : L // 2], atol=1e-6)


# (model, capture length where it is causal, another length the dynamic graph serves where it is
# not, the length verify finds it non-causal at)
CASES = {
    "fixed_filter_at_2L": (FixedFilterAt2L, 64, 40, 43),  # the shorter length re-checked, L - L // 3
    "fixed_fft_size": (FixedFFTSize, 40, 60, 60),  # the longer length re-checked, L + L // 2
    # the FFT's first wrap length, which no re-checked length (45, 20, 2) reaches
    "fft_size_with_a_margin": (MarginFFTConv, 30, 100, 66),
}


@pytest.mark.parametrize("name", list(CASES))
def test_causal_at_capture_length_but_not_at_another_is_not_rewritten(name):
    cls, L_capture, L_other, L_found = CASES[name]
    model = cls().eval()
    assert not _reads_future(model, L_capture) and _reads_future(model, L_other)  # the premise

    x = torch.randn(2, L_capture, D, generator=torch.Generator().manual_seed(0))
    report = lcsm_compile.explain(model, x)  # explain marks L dynamic
    assert not report.mixers, str(report)
    assert [u.reason for u in report.unsupported] == [f"non-causal at L={L_found}: reads future positions"], str(report)

    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "left unchanged" warning
        for L in (L_capture, L_other, L_capture):
            xl = torch.randn(2, L, D, generator=torch.Generator().manual_seed(L))
            torch._dynamo.mark_dynamic(xl, 1)
            assert _rel(compiled(xl), model(xl)) <= 1e-6, L
    assert _rewrites() == 0


def test_margin_enough_for_the_filter_still_rewritten():
    """The wrap length is where to look, not a verdict: a 40-tap filter never reaches the margin."""
    model = MarginFFTConv(taps=40).eval()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", dynamic=True, options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        for L in (30, 100, 200):
            x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(L))
            assert _rel(compiled(x), model(x)) <= 1e-5, L
    assert _rewrites() >= 1  # no fallback warning above: every graph was rewritten


@pytest.mark.parametrize("n, lower, upper, first", [
    ("L + 64", 2, 256, 66),     # 2L - 1 overtakes L + 64 at L = 66
    ("2*L", 2, 1 << 20, None),  # never short
    ("2*L - 1", 2, 1 << 20, None),
    ("64", 2, 1000, 33),        # a constant size: from n // 2 + 1 on
    ("64", 40, 1000, 40),       # already short at the least admitted length
    ("64", 2, 20, None),        # the guards stop L before it wraps
    ("L + 100*B", 2, 1 << 20, 302),  # another symbol at its hint (B = 3)
])
def test_first_wrap_length(n, lower, upper, first):
    L, B = sympy.Symbol("L"), sympy.Symbol("B")
    expr = sympy.sympify(n, locals={"L": L, "B": B})
    assert first_wrap_length(expr, L, lower, upper, {B: sympy.Integer(3)}) == first


@pytest.mark.parametrize("n, taps, first", [
    ("64", 8, 58),        # an 8-tap filter in a fixed 64-point transform: the wrap shows from 58
    ("64", 40, 26),       # 40 taps: from L + 39 > 64
    ("L + 64", 8, None),  # grows with L, always room for 8 taps
    ("L + 4", 8, 2),      # too short for 8 taps at every length
])
def test_first_wrap_length_of_a_short_filter(n, taps, first):
    L = sympy.Symbol("L")
    assert first_wrap_length(sympy.sympify(n, locals={"L": L}), L, 2, 1000, {}, taps) == first


class _FixedSizeFFT(nn.Module):
    """An 8-tap filter convolved in a 64-point transform: causal up to L = 57, circular after."""

    def __init__(self, D=4, K=8):
        super().__init__()
        self.h = nn.Parameter(torch.randn(D, K, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(self.h, n=64), n=64)[..., : x.shape[1]]
        return y.transpose(1, 2)


def test_short_filter_in_a_fixed_size_transform_is_not_rewritten_past_its_wrap():
    model = _FixedSizeFFT().eval()
    compiled = torch.compile(model, backend="lcsm", options={**EAGER, "max_len": 64})
    with torch.no_grad():
        for L in (16, 20, 60):  # the second length makes L dynamic; 60 wraps
            x = torch.randn(2, L, 4, generator=torch.Generator().manual_seed(L))
            assert _rel(compiled(x), model(x)) <= 1e-5, L
    report = lcsm_compile.explain(model, torch.randn(2, 20, 4), max_len=64)
    assert any("non-causal at L=58" in u.reason for u in report.unsupported), str(report)


def test_causal_at_every_length_still_rewritten_dynamic():
    """The other-length checks do not reject a causal FFT conv (its filter cut to L)."""
    model = ZOO["spelling_fft_complex"].build()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        for L in (40, 64, 23):
            x = torch.randn(2, L, model.d_model, generator=torch.Generator().manual_seed(L))
            torch._dynamo.mark_dynamic(x, 1)
            assert _rel(compiled(x), model(x)) <= 1e-5, L
    assert _rewrites() == 1  # one dynamic graph serves all three lengths


# --- 2. filter extent: FFT round-off is not a tap ---------------------------------------------


def test_h3_shift_filter_is_short_and_s4d_filter_long():
    entry = ZOO["h3_lm"]
    model = entry.build()
    ids = entry.make_inputs(model, 1, 63, torch.Generator().manual_seed(0))
    report = lcsm_compile.explain(model, *ids)
    assert report.ok and len(report.mixers) == 4, str(report)
    shift_len = next(m for m in model.modules() if isinstance(m, ShiftSSMKernel)).N  # 4 in h3_tiny
    lengths = sorted(m.filter_length for m in report.mixers)
    # per layer: the shift SSM (d_shift = 4 taps, measured through an FFT at 2L) and the S4D kernel
    assert lengths[:2] == [shift_len, shift_len], str(report)
    short_max = Settings().short_conv_max
    assert all(n > short_max for n in lengths[2:]), str(report)
    assert lengths[2:] == [report.fold_length] * 2, str(report)
    assert sorted(m.strategy for m in report.mixers)[-2:] == ["short", "short"], str(report)


class DecayingFFTConv(nn.Module):
    """y = h * u through an FFT at 2L with h[t] = exp(-t / tau) per channel, max_len taps."""

    def __init__(self, max_len: int = 1024, tau: float = 200.0):
        super().__init__()
        t = torch.arange(max_len).float()
        scale = torch.linspace(0.5, 2.0, D)[:, None]
        self.h = nn.Parameter(scale * torch.exp(-t / tau))
        self.max_len = max_len

    def forward(self, x):
        u = x.transpose(1, 2)
        L = u.shape[-1]
        h = self.h[:, :L]
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(h, n=2 * L), n=2 * L)[..., :L]
        return y.transpose(1, 2)


def test_decaying_exponential_keeps_its_length():
    model = DecayingFFTConv().eval()  # last tap exp(-1023/200) ~ 6e-3 of the first
    report = lcsm_compile.explain(model, torch.randn(1, 100, D, generator=torch.Generator().manual_seed(0)))
    assert report.ok and len(report.mixers) == 1, str(report)
    assert report.fold_length == 1024 and report.mixers[0].filter_length == 1024, str(report)


def test_filter_extent_thresholds():
    L = 4096
    t = torch.arange(L, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    # exact zeros past the last tap
    h = torch.zeros(3, L)
    h[:, :5] = torch.randn(3, 5, generator=g)
    assert filter_extent(h) == 5
    # round-off (~eps * max, random sign) past a 4-tap filter: cut
    noisy = h.clone()
    noisy[:, :5] = 0
    noisy[:, :4] = torch.randn(3, 4, generator=g) + 2
    noisy[:, 4:] = 1e-8 * torch.randn(3, L - 4, generator=g)
    assert filter_extent(noisy) == 4
    # ... unless the channel is that small itself (per-channel scale)
    tiny = noisy.clone()
    tiny[1] = 1e-8 * torch.randn(L, generator=g)
    assert filter_extent(tiny) == L
    # a big skip over a small long decaying filter: each tap is below the round-off level of the
    # channel's peak, but together they carry ~1e-3 of its L1 norm, so they are kept
    skip = (1e-6 * torch.exp(-t / 2000)).float().expand(3, L).clone()
    skip[:, 0] = 1.0
    assert filter_extent(skip) == L
    # a decaying exponential keeps its small late taps
    decay = torch.exp(-t / 300).float().expand(2, L).clone()  # last tap ~1e-6 of the first
    assert filter_extent(decay) == L
    # dtype-aware: a 1e-8-relative tail is round-off in float32 but real in float64
    assert filter_extent(noisy.double()) == L
    assert filter_extent(torch.zeros(2, 7)) == 1


def _extent_per_row(h):
    """filter_extent's rule, one channel at a time in fp64 (the plain version of its fast path)."""
    from lcsm_compile.passes.verify import TAIL_EPS, TAIL_MAX, TAP_EPS

    eps, best = torch.finfo(h.dtype).eps, 1
    for row in h.reshape(-1, h.shape[-1]).double().abs():
        nz = row.nonzero()
        exact = int(nz[-1]) + 1 if nz.numel() else 0
        big = (row > TAP_EPS * eps * row.max()).nonzero()
        sig = int(big[-1]) + 1 if big.numel() else 0
        ok = row[sig:].sum() <= min(TAIL_EPS * eps, TAIL_MAX) * row.sum()
        best = max(best, sig if ok else exact)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_filter_extent_matches_its_per_channel_rule(seed):
    """Channels mixing exact-zero tails, round-off tails that are cut and small tails that add up
    (only the rows with round-off-level taps at the end take the fp64 sums), awkward lengths."""
    g = torch.Generator().manual_seed(seed)
    C, L = 7, [1, 63, 1000, 4097, 300, 5][seed]
    h = torch.zeros(C, L)
    for c in range(C):
        k = int(torch.randint(1, L + 1, (1,), generator=g))
        h[c, :k] = torch.randn(k, generator=g) * 10 ** float(torch.randint(-3, 3, (1,), generator=g))
        kind = int(torch.randint(0, 3, (1,), generator=g))
        if kind == 1 and k < L:  # round-off past the filter
            h[c, k:] = 1e-8 * h[c, :k].abs().max() * torch.randn(L - k, generator=g)
        elif kind == 2 and k < L:  # taps each under round-off level whose sum is kept (long L) or not
            k = max(1, min(k, L // 400))
            h[c, k:] = 5e-7 * h[c, :k].abs().max()
    assert filter_extent(h) == _extent_per_row(h)
    assert filter_extent(torch.zeros(3, L)) == 1


# --- 3. dynamo's restart exceptions pass through the backend ---------------------------------


def test_dynamic_true_compiles_and_rewrites():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", dynamic=True, options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "graph left unchanged" fallback
        for L in (63, 100):
            (ids,) = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
            assert _rel(compiled(ids), model(ids)) <= 1e-5, L
    assert _rewrites() == entry.expected_convs  # one dynamic graph, every mixer rewritten


@pytest.mark.parametrize("strict", [False, True])
def test_restart_exceptions_are_reraised_untouched(monkeypatch, strict):
    exc = torch._dynamo.exc
    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    inputs = [torch.randn(2, 3, 4)]
    for cls in (exc.TensorifyScalarRestartAnalysis, exc.RestartAnalysis, exc.SkipFrame):
        def boom(*_args, cls=cls):
            raise cls()

        monkeypatch.setattr(backend, "capture_aten", boom)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # neither a fallback warning
            with pytest.raises(cls) as info:
                backend.lcsm_backend(gm, inputs, options={**EAGER, "strict": strict})
        assert type(info.value) is cls  # nor wrapped in LcsmCompileError

    def fail(*_args):
        raise RuntimeError("a real failure")

    monkeypatch.setattr(backend, "capture_aten", fail)
    if strict:
        with pytest.raises(backend.LcsmCompileError):
            backend.lcsm_backend(gm, inputs, options={**EAGER, "strict": True})
    else:
        with pytest.warns(UserWarning, match="a real failure"):
            fn = backend.lcsm_backend(gm, inputs, options=EAGER)
        assert torch.equal(fn(*inputs), inputs[0] * 2)


def test_reason_names_the_real_time_axis_when_length_equals_width():
    """At L == D a size-based axis guess also tries the channel dim; the reason reported is the
    one for the time dim seq_axis tracked (not "mixes channels")."""
    from lcsm_compile.zoo import ZOO

    entry = ZOO["neg_bidirectional_fft"]
    model = entry.build()
    x = entry.make_inputs(model, 1, model.d_model, torch.Generator().manual_seed(0))[0]
    compiled = torch.compile(model, backend="lcsm", dynamic=False, options={"inner_backend": "eager"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    messages = [str(w.message) for w in caught if "lcsm" in str(w.message)]
    assert any("non-causal: reads future positions" in m for m in messages), messages


class _SaturatingSkip(nn.Module):
    """A causal FFT conv plus a clamped skip: linear on unit inputs, not on large ones."""

    def __init__(self, D=4, max_len=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.h = nn.Parameter(torch.randn(D, max_len, generator=g) * 0.3)
        self.D = nn.Parameter(torch.randn(D, generator=g))

    def forward(self, x):
        L = x.shape[1]
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.h[:, :L], n=2 * L), n=2 * L)[..., :L]
        return (y + u.clamp(-20, 20) * self.D[:, None]).transpose(1, 2)


def test_a_clamp_on_the_skip_path_is_not_folded():
    model = _SaturatingSkip().eval()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    lcsm_compile.counters.clear()
    with torch.no_grad():
        x = 100 * torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
        assert _rel(compiled(x), model(x)) <= 1e-5  # the clamp stays in the graph
    assert sum(lcsm_compile.counters["rewrite"].values()) == 1  # the convolution alone is rewritten


class _SmallLeak(nn.Module):
    """A causal FFT conv plus `eps` times an anti-causal one (an impulse seen 3 steps early)."""

    def __init__(self, eps: float, D=4, max_len=128):
        super().__init__()
        self.eps = eps
        self.h = nn.Parameter(torch.randn(D, max_len) * 0.3)

    def forward(self, x):  # (B, L, D)
        n = x.size(1)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n) * torch.fft.rfft(self.h[:, :n], n=2 * n), n=2 * n)[..., :n]
        ahead = torch.nn.functional.pad(u[..., 3:], (0, 3))  # u[t + 3]
        return (y + self.eps * ahead).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 3e-5, 1e-3])
def test_a_small_anticausal_part_is_not_rewritten(eps, dtype):
    """verify_rtol (1e-4) bounds the probes' relative error; an impulse seen before it arrives is
    held to round-off. With the leak inside, the region u -> y + eps * u[t + 3] must be refused
    (at 3e-5 it was rewritten: 1.4e-5 off in fp32); its causal FFT conv alone is still rewritten."""
    torch.manual_seed(0)
    model = _SmallLeak(eps).to(dtype).eval()
    x = torch.randn(2, 100, 4, dtype=dtype)
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    assert _rel(y, ref) <= (1e-6 if dtype == torch.float32 else 1e-12)
    assert _rewrites() == 1
