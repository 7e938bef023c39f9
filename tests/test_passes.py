"""Each pass on small hand-built models: seq_axis, match, verify, fold, rewrite."""
import pytest
import torch
import torch.nn.functional as F
from graph_capture import capture
from torch import nn

from lcsm_compile.passes.fold import fold, model_max_len
from lcsm_compile.passes.match import match
from lcsm_compile.passes.region import Region, backward_slice
from lcsm_compile.passes.rewrite import rewrite
from lcsm_compile.passes.seq_axis import MIXING, POINTWISE, POSITIONAL, seq_axis
from lcsm_compile.passes.verify import VerifyError, verify, verify_region
from lcsm_compile.settings import Settings

aten = torch.ops.aten


class FFTMixer(nn.Module):
    """proj -> FFT conv with a filter sliced from a max_len buffer -> + u*D -> gelu."""

    def __init__(self, D=4, max_len=96, flip=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = nn.Parameter(torch.randn(D, max_len, generator=g) * 0.1)
        self.D = nn.Parameter(torch.randn(D, generator=g))
        self.proj = nn.Linear(D, D)
        self.register_buffer("pos", torch.arange(max_len, dtype=torch.float32))
        self.flip = flip

    def forward(self, x):
        L = x.shape[1]
        u = self.proj(x).transpose(1, 2) + self.pos[:L]
        k = self.k[:, :L]
        kf = torch.fft.rfft(k.flip(-1) if self.flip else k, n=2 * L)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * kf, n=2 * L)[..., :L]
        return F.gelu((y + u * self.D[:, None]).transpose(1, 2))


def _by_target(cg, target):
    return [n for n in cg.gm.graph.nodes if n.target is target]


def test_seq_axis_classes():
    cg = capture(FFTMixer(), torch.randn(2, 40, 4), dynamic=True)
    assert cg.symbolic and cg.length == 40
    seq_axis(cg)
    (addmm,) = _by_target(cg, aten.addmm.default)
    assert addmm.meta["lcsm_class"] == POINTWISE
    slices = _by_target(cg, aten.slice.Tensor)
    (pos_slice,) = [n for n in slices if n.args[0].op == "placeholder" and n.meta["val"].dim() == 1]
    assert pos_slice.meta["lcsm_class"] == POSITIONAL and pos_slice.meta["lcsm_time"] == (0,)
    ffts = _by_target(cg, aten._fft_r2c.default)
    assert sorted(n.meta["lcsm_class"] for n in ffts) == [MIXING, POSITIONAL]  # the filter FFT is sized by L
    (gelu,) = _by_target(cg, aten.gelu.default)
    assert gelu.meta["lcsm_class"] == POINTWISE and gelu.meta["lcsm_time"] == (1,)


def test_match_proposes_fft_region_with_skip():
    cg = capture(FFTMixer(), torch.randn(2, 40, 4))
    seq_axis(cg)
    proposals, rejections = match(cg)
    assert not rejections and len(proposals) == 1
    regions = proposals[0]
    assert regions[0].kind == "fft"
    assert regions[0].y.target is aten.slice.Tensor  # the core ends where time is restored
    assert regions[-1].y.target is aten.add.Tensor  # the longest alternative takes the skip


def test_verify_recovers_filter_and_skip():
    model = FFTMixer()
    cg = capture(model, torch.randn(2, 40, 4))
    seq_axis(cg)
    proposals, _ = match(cg)
    mixers, rejections = verify(cg, proposals, Settings())
    assert not rejections
    (mx,) = mixers
    want = model.k[:, :40].detach().clone()
    want[:, 0] += model.D.detach()
    assert torch.allclose(mx.h, want, atol=1e-6)
    assert mx.bias is None and mx.bcast_dims == (0,)


class BiasedFFTMixer(FFTMixer):
    """A long conv plus a constant offset per channel: verify finds a bias."""

    def forward(self, x):
        L = x.shape[1]
        u = self.proj(x).transpose(1, 2)
        kf = torch.fft.rfft(self.k[:, :L], n=2 * L)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * kf, n=2 * L)[..., :L] + self.D[:, None]
        return y.transpose(1, 2)


def test_verified_mixers_own_only_their_filter_and_bias():
    # The filter and bias are slices of (B, C, L) probe responses; as views they kept every one
    # alive until fold (Hyena-153M, B = 8, L = 32768: 65 GB, an OOM on an H200).
    model = BiasedFFTMixer()
    cg = capture(model, torch.randn(3, 50, 4))
    seq_axis(cg)
    proposals, _ = match(cg)
    (mx,), rejections = verify(cg, proposals, Settings())
    assert not rejections and mx.bias is not None
    torch.testing.assert_close(mx.bias, model.D.detach(), rtol=1e-5, atol=1e-6)
    for t in (mx.h, mx.bias):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_verify_relative_error_in_chunks_equals_the_whole():
    from lcsm_compile.passes.verify import _norm, _rel, _square_sums

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    want = float((a.double() - b.double()).norm() / b.double().norm())
    for chunk in (1, 8, 34, 35, 36, 1 << 24):  # slices of the largest dim that do and do not divide it
        num, den = _square_sums(a, b, dtype=torch.float64, chunk=chunk)
        assert abs((num / den) ** 0.5 - want) <= 1e-12 * want
    assert abs(_rel(a, b) - want) <= 1e-6 * want  # fp32 sums
    assert abs(_rel(a.transpose(0, 2), b.transpose(0, 2)) - want) <= 1e-6 * want  # strided, no flattening copy
    col = b[:, :, :1]  # broadcast against the whole, as verify's offset check does
    b64, col64 = b.double(), col.double().expand_as(b)
    assert abs(_rel(b, col) - float((b64 - col64).norm() / col64.norm())) < 1e-6
    assert _rel(torch.zeros(0), torch.zeros(0)) == 0.0
    # fp32 squares that overflow or underflow fall back to fp64: the same answer at any scale
    for scale in (1e30, 1e-30):
        assert abs(_rel(a * scale, b * scale) - want) <= 1e-6 * want
        assert abs(_norm(b * scale) / (scale * float(b.double().norm())) - 1) <= 1e-6
    assert _norm(torch.zeros(4)) == 0.0 and _norm(torch.full((4,), 1e-40, dtype=torch.float64)) > 0


def test_verify_rejects_anticausal_filter():
    model = nn.Conv1d(4, 4, 5, padding=2, groups=4)
    cg = capture(nn.Sequential(Transpose(), model, Transpose()), torch.randn(2, 40, 4))
    seq_axis(cg)
    proposals, _ = match(cg)
    with pytest.raises(VerifyError, match="non-causal: reads future positions"):
        verify_region(cg, proposals[0][-1], Settings())


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def test_match_rejects_channel_mixing_conv():
    model = nn.Sequential(Transpose(), nn.Conv1d(4, 4, 3, padding=2), Transpose())
    cg = capture(model, torch.randn(2, 30, 4))
    seq_axis(cg)
    proposals, rejections = match(cg)
    assert not proposals
    assert "mixes channels" in rejections[0].reason


class Squared(nn.Module):
    def forward(self, x):
        return torch.cumsum(x * x, dim=1) + torch.cumsum(x, dim=1) ** 2


def test_verify_rejects_nonlinear_region():
    """A region stretched over a nonlinearity is refused; the accepted ones are the bare cumsums,
    with x*x before one and **2 after the other left outside, and the rewritten graph is the model."""
    model, x = Squared(), torch.randn(2, 30, 4)
    cg = capture(model, x)
    seq_axis(cg)
    proposals, _ = match(cg)
    mixers, rejections = verify(cg, proposals, Settings())
    assert len(mixers) == 2 and not rejections
    (u,) = [n for n in cg.gm.graph.nodes if n.op == "placeholder"]
    (square,) = _by_target(cg, aten.mul.Tensor)
    (power,) = _by_target(cg, aten.pow.Tensor_Scalar)
    sums = _by_target(cg, aten.cumsum.default)
    # cumsum(x*x) is linear in its own input x*x; cumsum(x)**2 ends at the cumsum
    assert [(mx.region.u, mx.region.y) for mx in mixers] == [(square, sums[0]), (u, sums[1])]
    assert all(square not in mx.region.nodes and power not in mx.region.nodes for mx in mixers)
    for seed, y in ((sums[0], sums[0]), (sums[1], power)):  # u -> x*x -> cumsum, u -> cumsum -> **2
        stretched = Region("cumsum", seed, u, y, backward_slice(y, u)[0])
        # verify's per-channel random impulse is the first probe a square fails: f(a d) != a f(d)
        with pytest.raises(VerifyError, match="mixes channels|not linear"):
            verify_region(cg, stretched, Settings())
    mixers, rejected = fold(cg, mixers, Settings())
    assert not rejected and rewrite(cg, mixers) == {"cumsum": 2}
    assert _by_target(cg, aten.mul.Tensor) == [square] and _by_target(cg, aten.pow.Tensor_Scalar) == [power]
    with torch.no_grad():
        (y,) = cg.gm(x)
        ref = model(x)
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-5


def test_fold_at_model_max_len_and_rewrite_keeps_meta():
    model = FFTMixer(max_len=96)
    cg = capture(model, torch.randn(2, 40, 4), dynamic=True)
    seq_axis(cg)
    proposals, _ = match(cg)
    mixers, _ = verify(cg, proposals, Settings())
    assert model_max_len(cg, mixers[0]) == 96
    mixers, rejected = fold(cg, mixers, Settings())
    assert not rejected and mixers[0].h.shape == (4, 96)
    counts = rewrite(cg, mixers)
    assert counts == {"fft": 1}
    assert not _by_target(cg, aten._fft_r2c.default)  # the filter FFT died with the region
    assert len(_by_target(cg, torch.ops.lcsm.causal_conv.default)) == 1
    for node in cg.gm.graph.nodes:
        if node.op in ("call_function", "get_attr", "placeholder"):
            assert "val" in node.meta, node
    x = torch.randn(2, 70, 4)  # the batch was static at capture
    with torch.no_grad():
        (y,) = cg.gm(70, x, *[i.value for i in cg.inputs if i.role == "static"])
        ref = model(x)
        assert ((y - ref).norm() / ref.norm()).item() <= 1e-5


def test_settings_validation():
    with pytest.raises(ValueError, match="valid options are"):
        Settings.from_options({"nope": 1})
    with pytest.raises(ValueError, match="inner_backend"):
        Settings.from_options({"inner_backend": "tvm"})
    assert Settings.from_options({"max_len": 8}).max_len == 8
