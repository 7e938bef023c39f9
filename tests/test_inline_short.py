"""passes/inline_short.py: short causal convs written out as shifted products, against the op."""
import pytest
import torch
from torch import fx

import lcsm_compile  # noqa: F401 - registers torch.ops.lcsm.causal_conv
from lcsm_compile.ops import causal_conv_reference
from lcsm_compile.passes.inline_short import inline_short_convs

aten = torch.ops.aten


def _conv_graph(h: torch.Tensor, sliced: bool) -> fx.GraphModule:
    """u -> causal_conv(u, h) (or h[:, :L], as the rewrite emits for a dynamic length) -> y."""
    root = torch.nn.Module()
    root.register_buffer("h", h)
    g = fx.Graph()
    u = g.placeholder("u")
    hn = g.get_attr("h")
    hn.meta["val"] = h
    if sliced:
        L = g.call_function(aten.sym_size.int, (u, 2))
        hn = g.call_function(aten.slice.Tensor, (hn, 1, 0, L))
    y = g.call_function(torch.ops.lcsm.causal_conv.default, (u, hn))
    y.meta["val"] = torch.empty(0, dtype=h.dtype)
    g.output(y)
    return fx.GraphModule(root, g)


@pytest.mark.parametrize("L", [1, 2, 63, 1000])
@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("sliced", [False, True])
def test_shifted_products_equal_the_convolution(L, K, sliced):
    g = torch.Generator().manual_seed(L * 100 + K)
    B, D = 3, 5
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        u = torch.randn(B, D, L, generator=g, dtype=dtype)
        h = torch.randn(D, K, generator=g, dtype=dtype)
        gm = _conv_graph(h, sliced)
        inlined, n = inline_short_convs(gm, max_taps=16)
        assert n == 1 and inlined is not gm
        assert not inlined.graph.find_nodes(op="call_function", target=torch.ops.lcsm.causal_conv.default)
        assert gm.graph.find_nodes(op="call_function", target=torch.ops.lcsm.causal_conv.default)  # untouched
        want = causal_conv_reference(u.double(), h.double())
        got = inlined(u)
        assert got.dtype == dtype and got.shape == u.shape
        assert ((got.double() - want).norm() / want.norm()).item() <= tol
        assert inlined.h is gm.h  # weights shared, not copied


def test_long_filters_stay_one_op():
    gm = _conv_graph(torch.randn(4, 17, dtype=torch.float64), sliced=False)
    out, n = inline_short_convs(gm, max_taps=16)
    assert n == 0 and out is gm
    out, n = inline_short_convs(_conv_graph(torch.randn(4, 3), sliced=False), max_taps=0)
    assert n == 0


def test_filter_caches_are_primed_with_real_tensors_at_compile_time(monkeypatch):
    """dispatch.prime_filter_caches runs every static-shape conv once while the backend compiles
    (on CUDA; here on CPU with a spy): with real zeros of the call's shape and the graph's own
    filter buffer, even though the compiler may hold a fake mode."""
    import torch._inductor.compile_fx as compile_fx_module
    from torch._subclasses.fake_tensor import FakeTensor

    import lcsm_compile.kernels.dispatch as dispatch
    from lcsm_compile.zoo import ZOO

    seen = []
    real_prime = dispatch.prime_filter_caches
    monkeypatch.setattr(dispatch, "causal_conv_cuda", lambda u, h: seen.append((u, h)))
    monkeypatch.setattr(dispatch, "prime_filter_caches", lambda gm: real_prime(gm, device_type="cpu"))
    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None, **kw: gm.forward)
    entry = ZOO["hyena_lm"]
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 40, torch.Generator().manual_seed(0))
    lcsm_compile.counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="lcsm")(*inputs)
    # the two long convolutions (the 3-tap ones were inlined before priming)
    assert len(seen) == lcsm_compile.counters["lowering"]["primed_convs"] == 2
    for u, h in seen:
        assert not isinstance(u, FakeTensor) and not isinstance(h, FakeTensor)
        assert u.shape == (2, h.shape[0], 40) and not u.any()
