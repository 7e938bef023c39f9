"""Input roles from dynamo's sources (plain tensor attributes are the model's, not the caller's)
and the time axis of a static capture when L equals another dim (L == d_model, L == 1)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from graph_capture import capture
from torch import nn

import lcsm_compile
from lcsm_compile.backend import report_listeners
from lcsm_compile.passes.seq_axis import MIXING, POINTWISE, POSITIONAL, STATIC, seq_axis
from lcsm_compile.zoo import ZOO

aten = torch.ops.aten
EAGER = {"inner_backend": "eager"}


def _rel(a, b):
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


def _compile_static(model, *inputs):
    """Compile with L specialized; (output, eager output, the pipeline's reports)."""
    lcsm_compile.counters.clear()
    reports = []

    def listen(report, cg):
        reports.append(report)

    report_listeners.append(listen)
    try:
        compiled = torch.compile(model, backend="lcsm", options=EAGER, dynamic=False)
        with torch.no_grad():
            y = compiled(*inputs)
            ref = model(*inputs)
    finally:
        report_listeners.remove(listen)
    return y, ref, reports


# ------------------------------------------------------------------ roles from sources
_GLOBAL_SCALE = torch.linspace(0.5, 1.5, 8)  # a module-level tensor: G['_GLOBAL_SCALE']


class PlainAttrHyena(nn.Module):
    """Hyena-like order-2 operator whose positional table, time grid, decay rates and skip are
    plain tensor attributes (not buffers), as third-party code (stripedhyena, fla) writes them,
    plus an explicit filter that is a plain attribute too."""

    def __init__(self, d: int = 8, max_len: int = 128, order: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.d_model, self.max_len = d, max_len
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.t = torch.linspace(0, 1, max_len)[None, :, None]  # (1, max_len, 1)
        w = 2 * math.pi * torch.arange(max_len)[None, :, None] / max_len
        self.z = torch.cat([self.t, torch.cos(w), torch.sin(w)], -1)  # (1, max_len, 3)
        self.deltas = torch.linspace(-0.5, -4.0, d)[None, None]
        self.implicit = nn.Sequential(nn.Linear(3, order), nn.Tanh(), nn.Linear(order, d))
        self.skip = torch.randn(d, generator=g)
        decay = torch.exp(-torch.arange(max_len) / 16.0)
        self.k2 = torch.randn(d, max_len, generator=g) * decay / 4  # an explicit plain filter

    def forward(self, x):
        L = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)
        x0, x1, v = u.split(self.d_model, 1)
        h = self.implicit(self.z[:, :L]) * torch.exp(self.t[:, :L] * self.deltas)
        k = h[0].transpose(0, 1)  # (D, L)
        n = 2 * L
        v = v * x1
        y = torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
        y = (y + v * self.skip[:, None]) * x0
        y2 = torch.fft.irfft(torch.fft.rfft(y, n=n) * torch.fft.rfft(self.k2[:, :L], n=n), n=n)[..., :L]
        return self.out_proj((y2 * _GLOBAL_SCALE[:, None]).transpose(1, 2))


def test_plain_tensor_attributes_and_globals_are_static():
    model = PlainAttrHyena().eval()
    x = torch.randn(2, 40, 8)
    cg = capture(model, x)
    roles = {inp.source: inp for inp in cg.inputs}
    seq = [s for s, i in roles.items() if i.role == "sequence"]
    assert seq == ["L['x']"], {s: i.role for s, i in roles.items()}
    attrs = {"t": model.t, "z": model.z, "deltas": model.deltas, "skip": model.skip, "k2": model.k2}
    for name, tensor in attrs.items():
        (inp,) = [i for s, i in roles.items() if s.endswith((f".{name}", f"['{name}']"))]
        assert inp.role == "static" and inp.source.startswith("L['self']")
        assert inp.value is tensor  # the module's own tensor, for constant folding
    (glob,) = [i for s, i in roles.items() if s.startswith("G[")]
    assert glob.role == "static" and glob.value is _GLOBAL_SCALE
    assert roles["L['x']"].time_dim == 1 and cg.length == 40


@dataclass
class _Batch:
    x: torch.Tensor


class _Args(nn.Module):
    """Call arguments in a tuple and in an object are sequence inputs; module attributes are not."""

    def __init__(self):
        super().__init__()
        self.table = torch.randn(64, 4)
        self.tables = [torch.randn(64, 4)]

    def forward(self, x, pair, batch):
        L = x.shape[1]
        return x + pair[0] + batch.x + self.table[:L] + self.tables[0][:L]


def test_call_arguments_are_sequence_inputs():
    x = torch.randn(2, 10, 4)
    cg = capture(_Args(), x, (torch.randn(2, 10, 4),), _Batch(torch.randn(2, 10, 4)))
    roles = {inp.source: inp.role for inp in cg.inputs}
    assert roles == {"L['x']": "sequence", "L['pair'][0]": "sequence", "L['batch'].x": "sequence",
                     "L['self'].table": "static", "L['self'].tables[0]": "static"}, roles


def test_plain_attribute_hyena_compiles_explains_and_decodes():
    model = PlainAttrHyena().eval()
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(1))
    report = lcsm_compile.explain(model, x)
    assert report.ok, str(report)
    assert len(report.mixers) == 2 and {m.kind for m in report.mixers} == {"fft"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        lcsm_compile.counters.clear()
        compiled = torch.compile(model, backend="lcsm", options=EAGER)
        with torch.no_grad():
            y, ref = compiled(x), model(x)
    assert _rel(y, ref) <= 1e-5
    assert lcsm_compile.counters["rewrite"]["fft"] == 2

    xs = torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(xs)
    dec = lcsm_compile.decoder(model, xs[:, :21], max_len=model.max_len, **EAGER)
    assert len(dec.plan.convs) == 2
    outs = [dec.prefill(xs[:, :5])] + [dec.step(xs[:, t : t + 1]) for t in range(5, 48)]
    assert _rel(torch.cat(outs, 1), ref[:, 4:]) <= 1e-5


# ------------------------------------------------------------------ time axis at L == D
class _Block(nn.Module):
    """proj -> (B*L, D) -> (B, L, D) -> transpose -> FFT conv -> mean over channels -> proj."""

    def __init__(self, d=16, max_len=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.h = nn.Parameter(torch.randn(d, max_len, generator=g) * 0.1)

    def forward(self, x):
        B, L, D = x.shape
        u = self.proj(x.reshape(B * L, D)).reshape(B, L, D).transpose(1, 2)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L]
        y = y.transpose(1, 2)
        return self.out(y - y.mean(-1, keepdim=True))


def test_static_time_axis_follows_ops_not_sizes():
    cg = capture(_Block(), torch.randn(2, 16, 16))  # L == D == 16, static
    assert not cg.symbolic
    seq_axis(cg)

    def nodes(target):
        return [n for n in cg.gm.graph.nodes if n.target is target]

    x = next(n for n in cg.gm.graph.nodes if n.op == "placeholder" and n.meta["lcsm_seq"])
    assert x.meta["lcsm_time"] == (1,)
    for n in cg.gm.graph.nodes:
        assert not n.meta.get("lcsm_time_guess"), n
    projections = nodes(aten.mm.default) + nodes(aten.addmm.default)
    assert len(projections) == 2
    for mm in projections:  # (B*L, D) @ (D, D) contracts channels, though D == L
        assert mm.meta["lcsm_class"] == POINTWISE and mm.meta["lcsm_time"] == (0,)
    (tr, tr2) = nodes(aten.transpose.int)
    assert tr.meta["lcsm_time"] == (2,) and tr2.meta["lcsm_time"] == (1,)
    (mean,) = nodes(aten.mean.dim)  # over channels: not a reduction over time
    assert mean.meta["lcsm_class"] == POINTWISE and mean.meta["lcsm_time"] == (1,)
    ffts = nodes(aten._fft_r2c.default)
    assert sorted(n.meta["lcsm_class"] for n in ffts) == [MIXING, POSITIONAL]
    (h_slice,) = [n for n in nodes(aten.slice.Tensor) if not n.meta["lcsm_seq"]]
    assert h_slice.meta["lcsm_time"] == (1,)  # the filter (D, L) sliced to L: time is dim 1, not 0
    weights = [n for n in cg.gm.graph.nodes if n.op == "placeholder" and not n.meta["lcsm_seq"]]
    assert all(n.meta["lcsm_class"] == STATIC for n in weights)
    out = next(n for n in cg.gm.graph.nodes if n.op == "output").args[0][0]
    assert out.meta["lcsm_time"] == (1,)


def test_merged_batch_time_views_split_back():
    """(B, L, D) -> (B*L, D) -> (L, B, D)-style views keep track of which factor is time."""

    class Views(nn.Module):
        def forward(self, x):
            B, L, D = x.shape
            y = (x.reshape(B * L, D) * 2).reshape(B, L, D)
            return y.permute(1, 0, 2).reshape(L, B * D).cumsum(0)

    cg = capture(Views(), torch.randn(4, 4, 4))  # B == L == D
    seq_axis(cg)
    shaping = (aten.view.default, aten._unsafe_view.default, aten.permute.default)
    got = [(tuple(n.meta["val"].shape), n.meta["lcsm_time"]) for n in cg.gm.graph.nodes if n.target in shaping]
    # (B*L, D): time inside dim 0; (B, L, D): dim 1 again; permuted (L, B, D) and (L, B*D): dim 0
    assert got == [((16, 4), (0,)), ((4, 4, 4), (1,)), ((4, 4, 4), (0,)), ((4, 16), (0,))], got
    (cumsum,) = [n for n in cg.gm.graph.nodes if n.target is aten.cumsum.default]
    assert cumsum.meta["lcsm_class"] == MIXING  # the cumulative sum runs over time (dim 0)


@pytest.mark.parametrize("name, L", [
    ("hyena_lm", 32),  # d_model 32
    ("h3_lm", 32),  # d_model 32
    ("spelling_toeplitz", 16),  # d_model 16
    ("sgconv", 16),
    ("long_conv", 16),
    ("spelling_pad_conv1d", 16),
    ("spelling_cumsum", 16),
])
def test_zoo_static_length_equal_to_width(name, L):
    entry = ZOO[name]
    model = entry.build()
    inputs = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every mixer found, nothing left unchanged
        y, ref, reports = _compile_static(model, *inputs)
    assert _rel(y, ref) <= 1e-5
    (report,) = reports
    assert not report.symbolic and report.length == L
    assert not report.unsupported, report.unsupported
    assert len(report.mixers) == entry.expected_convs, report.mixers
    assert sum(lcsm_compile.counters["rewrite"].values()) == entry.expected_convs


@pytest.mark.parametrize("name, L", [("hyena_lm", 32), ("spelling_toeplitz", 16)])
def test_explain_at_length_equal_to_width(name, L):
    entry = ZOO[name]
    model = entry.build()
    report = lcsm_compile.explain(model, *entry.make_inputs(model, 1, L, torch.Generator().manual_seed(0)))
    assert report.ok, str(report)
    assert len(report.mixers) == entry.expected_convs


class _ChannelFFTThenConv(nn.Module):
    """An FNet-style FFT over the hidden dim, then a causal long conv over time."""

    def __init__(self, D=4):
        super().__init__()
        from lcsm_compile.zoo.spellings import RFFTDivideByNConv

        self.mix = RFFTDivideByNConv(D, 64)

    def forward(self, x):
        return self.mix(torch.fft.fft(x, dim=-1).real)


@pytest.mark.parametrize("L", [16, 63])
def test_an_fft_over_channels_is_no_mixer_to_refuse(L):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _ChannelFFTThenConv().eval()
    x = torch.randn(2, L, 4, generator=torch.Generator().manual_seed(L))
    report = lcsm_compile.explain(model, x, inner_backend="eager")
    assert len(report.mixers) == 1 and report.ok and report.decode == [], str(report)
    compiled = torch.compile(model, backend="lcsm", options={"inner_backend": "eager", "strict": True})
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


class _FilterPerBatchRow(nn.Module):
    """A different filter for each batch row: the batch is a channel-like dim of the filter."""

    def __init__(self, D=4, max_len=64, rows=8):
        super().__init__()
        self.h = nn.Parameter(torch.randn(rows, D, max_len, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x):
        B, L = x.shape[:2]
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.h[:B, :, :L], n=2 * L), n=2 * L)
        return y[..., :L].transpose(1, 2)


class _TimeFirstCumsum(nn.Module):
    """(L, B, D) in, a projection and a running sum over time (dim 0)."""

    def __init__(self, D=4):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return torch.cumsum(self.proj(x), dim=0)


@pytest.mark.parametrize("model, first, later, seq_dim, rewrites", [
    (_FilterPerBatchRow, (3, 16, 4), [(4, 16, 4), (5, 16, 4)], 1, 0),  # refused: batch is a filter dim
    (_TimeFirstCumsum, (16, 3, 4), [(16, 5, 4)], 0, 1),  # batch at dim 1, broadcast: rewritten
])
def test_a_batch_marked_dynamic_that_is_not_dim_0_or_is_a_filter_dim(model, first, later, seq_dim, rewrites):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = model().eval()
    batch_dim = 1 - seq_dim  # the other leading dim
    x = torch.randn(*first, generator=torch.Generator().manual_seed(1))
    torch._dynamo.mark_dynamic(x, batch_dim)
    compiled = torch.compile(m, backend="lcsm", options={"inner_backend": "eager", "seq_dim": seq_dim})
    lcsm_compile.counters.clear()
    with torch.no_grad():
        for shape in [first, *later]:
            xx = x if shape == first else torch.randn(*shape, generator=torch.Generator().manual_seed(2))
            got, want = compiled(xx), m(xx)
            assert ((got - want).norm() / want.norm()).item() <= 1e-5, shape
    assert sum(lcsm_compile.counters["rewrite"].values()) == rewrites


class _ChannelsFirstFFTConv(nn.Module):
    """(B, D, L) in: time is dim 2, not the default seq_dim."""

    def __init__(self, D=4, max_len=64):
        super().__init__()
        self.h = nn.Parameter(torch.randn(D, max_len, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, u):
        L = u.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.h[:, :L], n=2 * L), n=2 * L)[..., :L]


def test_a_wrong_seq_dim_is_named_in_the_refusal():
    model, x = _ChannelsFirstFFTConv().eval(), torch.randn(2, 4, 16)
    report = lcsm_compile.explain(model, x, inner_backend="eager")
    assert not report.mixers and any("seq_dim" in u.reason for u in report.unsupported), str(report)
    report = lcsm_compile.explain(model, x, inner_backend="eager", seq_dim=2)
    assert len(report.mixers) == 1 and report.ok, str(report)
