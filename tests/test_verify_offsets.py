"""verify's offsets: the rewrite adds one bias per channel, taken at the capture length, so an
offset f(0) that differs between batch rows or changes with L must keep its nodes."""
import pytest
import torch
from graph_capture import capture
from torch import nn

import lcsm_compile
from lcsm_compile.passes.match import match
from lcsm_compile.passes.seq_axis import seq_axis
from lcsm_compile.passes.verify import VerifyError, verify, verify_region
from lcsm_compile.settings import Settings


class OffsetFFTConv(nn.Module):
    """x (B, L, D) -> FFT conv with a filter sliced from a max_len buffer, plus an offset:
    "channel" a (D,) bias, "batch" a (B, D, 1) buffer, "length" b * 8 / L."""

    def __init__(self, offset: str, D=4, max_len=64, B=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.offset = offset
        self.h = nn.Parameter(torch.randn(D, max_len, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(D, generator=g) * 5)
        self.register_buffer("per_row", torch.randn(B, D, 1, generator=g))

    def forward(self, x):
        L = x.size(1)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.h[:, :L], n=2 * L), n=2 * L)[..., :L]
        if self.offset == "batch":
            y = y + self.per_row
        elif self.offset == "length":
            y = y + self.b[:, None] * (8.0 / L)
        else:
            y = y + self.b[:, None]
        return y.transpose(1, 2)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run(model, lengths, B=2):
    """Relative errors of the compiled model against eager over calls at `lengths`, and the rewrites."""
    torch._dynamo.reset()  # capture() leaves dynamo's record of dynamic dims behind
    lcsm_compile.counters.clear()
    fast = torch.compile(model, backend="lcsm", options={"inner_backend": "eager"})
    g = torch.Generator().manual_seed(1)
    errs = []
    with torch.no_grad():
        for L in lengths:
            x = torch.randn(B, L, 4, generator=g)
            errs.append(_rel(fast(x), model(x)))
    return errs, sum(lcsm_compile.counters["rewrite"].values())


def _longest_region(model, x, dynamic=False):
    cg = capture(model, x, dynamic=dynamic)
    seq_axis(cg)
    proposals, _ = match(cg)
    (alternatives,) = proposals
    return cg, alternatives[-1]


def test_offset_varying_along_the_batch_is_refused():
    model = OffsetFFTConv("batch").eval()
    cg, region = _longest_region(model, torch.randn(2, 16, 4))
    with pytest.raises(VerifyError, match=r"offset f\(0\) varies along the batch"):
        verify_region(cg, region, Settings())
    errs, _ = _run(model, [16])
    assert max(errs) <= 1e-5, errs  # the add stays in the graph: row 0's offset was used for all rows


def test_offset_depending_on_the_length_is_refused():
    model = OffsetFFTConv("length").eval()
    cg, region = _longest_region(model, torch.randn(2, 24, 4), dynamic=True)
    with pytest.raises(VerifyError, match=r"offset f\(0\) at L=\d+ differs .* depends on the length"):
        verify_region(cg, region, Settings())
    errs, _ = _run(model, [16, 24, 32, 48])  # 16 static, then one dynamic-L graph for the rest
    assert max(errs) <= 1e-5, errs


def test_constant_channel_bias_is_still_folded():
    model = OffsetFFTConv("channel").eval()
    cg = capture(model, torch.randn(2, 24, 4), dynamic=True)
    seq_axis(cg)
    proposals, _ = match(cg)
    (mx,), rejections = verify(cg, proposals, Settings())
    assert not rejections and mx.region is proposals[0][-1]  # the longest region, add included
    torch.testing.assert_close(mx.bias, model.b.detach(), rtol=1e-5, atol=1e-5)
    errs, rewrites = _run(model, [16, 24, 32, 48])
    assert rewrites == 2 and max(errs) <= 1e-5, (errs, rewrites)  # the static graph and the dynamic one
