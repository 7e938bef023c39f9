"""Layer norms recomputed inside the decode products they feed (passes/decode_norm.py): the same
values, only where every use of the norm is such a product, and a decoder built with it is still
the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import lcsm_compile
from lcsm_compile.passes import decode_norm
from lcsm_compile.passes.decode_norm import fuse_norm_into_gemv
from lcsm_compile.passes.pipeline import counters
from lcsm_compile.runtime.segment_compile import SegmentCompiler
from lcsm_compile.settings import Settings
from lcsm_compile.zoo import hyena_tiny

aten = torch.ops.aten
K, N = 37, 61


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _block(r, x, g, b, w1, b1, w2):
    """A pre-norm MLP: residual add, norm with affine, addmm, gelu, norm without affine, mm."""
    x = x + r
    h = F.gelu(F.linear(F.layer_norm(x, (K,), g, b, 1e-5), w1, b1))
    return x + F.linear(F.layer_norm(h, (N,)), w2)


def _args(rows, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(rows, 1, K), (rows, 1, K), (K,), (K,), (N, K), (N,), (K, N)]
    return [(torch.randn(s, generator=gen) + (3.0 if i < 2 else 0.0)).to(dtype) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("rows", [1, 3])
def test_norms_move_into_the_products_with_the_same_values(rows):
    from torch._inductor.compile_fx import compile_fx

    args = _args(rows, rows)  # inputs with a mean of 3: the norm's centring matters
    want = _block(*args)
    gm = make_fx(_block)(*args)
    assert fuse_norm_into_gemv(gm, max_rows=3) == 2
    targets = _targets(gm)
    assert aten.native_layer_norm.default not in targets
    assert aten.mm.default not in targets and aten.addmm.default not in targets
    assert _rel(gm(*args), want) <= 1e-6
    out = compile_fx(gm, args)(*args)
    assert _rel(out[0] if isinstance(out, (tuple, list)) else out, want) <= 1e-6


def test_casts_between_norm_and_product_are_kept():
    """Under autocast the norm runs in fp32 and its output is cast to bf16 before the product:
    the rewrite rounds where the graph did."""
    args = _args(1, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _block(*args)
        gm = make_fx(_block)(*args)
    assert aten._to_copy.default in _targets(gm)
    assert fuse_norm_into_gemv(gm, max_rows=1) == 2
    got = gm(*args)
    assert got.dtype == want.dtype and _rel(got, want) <= 1e-2


def test_left_alone_where_a_norm_has_other_uses_or_too_many_rows(monkeypatch):
    args = _args(2, 3)

    def kept(x, g, b, w):  # the normalised vector is also an output
        y = F.layer_norm(x, (K,), g, b)
        return F.linear(y, w), y

    gm = make_fx(kept)(args[0], args[2], args[3], args[4])
    assert fuse_norm_into_gemv(gm, max_rows=8) == 0
    gm = make_fx(_block)(*args)
    assert fuse_norm_into_gemv(gm, max_rows=1) == 0  # two rows
    assert fuse_norm_into_gemv(gm, max_rows=0) == 0
    monkeypatch.setattr(decode_norm, "MAX_OUTPUTS", N - 1)  # the first product's N = 61 is too wide
    assert fuse_norm_into_gemv(gm, max_rows=2) == 1
    assert _rel(gm(*args), _block(*args)) <= 1e-6


def test_decoder_with_norms_in_the_products_is_the_model(monkeypatch):
    """Hyena-tiny's step segments compiled by inductor with the rewrite (on CPU the settings drop
    decode options, so the compiler is forced): 5 norms move (2 per layer and the final one)."""
    with pytest.raises(ValueError, match="decode_fuse_norm"):
        Settings.from_options({"decode_fuse_norm": 1})
    assert SegmentCompiler.for_device(torch.device("cpu"), Settings(decode_fuse_norm=True)).fuse_norm is False
    monkeypatch.setattr(SegmentCompiler, "for_device", classmethod(lambda cls, d, s=None: cls(True, 1, fuse_norm=True)))
    torch.manual_seed(0)
    model = hyena_tiny(max_len=128).eval()
    x = torch.randint(0, model.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    counters.clear()
    with torch.no_grad():
        ref = model(x)
        dec = lcsm_compile.decoder(model, x[:, :7], max_len=64)
        outs = [dec.prefill(x[:, :7])] + [dec.step(x[:, t : t + 1]) for t in range(7, 40)]
    assert counters["decode"]["norms_in_gemv"] == 5
    assert _rel(torch.cat(outs, 1), ref[:, 6:]) <= 1e-5
