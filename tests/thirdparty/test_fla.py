"""flash-linear-attention's long convolutions (`fla.modules.LongConvolution`,
`ImplicitLongConvolution`, installed from PyPI) inside a small model: compiled parity, explain(),
decoder parity, and the one place fla's spelling is not causal."""
import warnings

import pytest
import torch

import lcsm_compile

pytest.importorskip("einops", reason="fla needs einops: pip install einops")
pytest.importorskip("fla.modules", reason="flash-linear-attention not installed: "
                    "pip install --no-deps flash-linear-attention fla-core einops")

from thirdparty_models import fla_model  # noqa: E402

EAGER = {"inner_backend": "eager"}
MAX_LEN = 128  # the modules' max_len: the explicit filter's length, the implicit one's positions


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _x(B, L, seed=0):
    return torch.randn(B, L, 16, generator=torch.Generator().manual_seed(seed))


def _compiled_matches(model, B, lengths, rewrites, dynamic=None):
    """rewrites[i]: the fft rewrites expected at lengths[i]: 1 where that length compiles a graph,
    0 where it reuses one compiled before."""
    compiled = torch.compile(model, backend="lcsm", options=EAGER, dynamic=dynamic)
    for L, n in zip(lengths, rewrites, strict=True):
        x = _x(B, L, seed=L)
        lcsm_compile.counters.clear()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback
            got = compiled(x)
        with torch.no_grad():
            want = model(x)
        assert _rel(got, want) <= 1e-5, L
        assert lcsm_compile.counters["rewrite"] == ({"fft": n} if n else {}), L
        # a length with no rewrite must be one served by an earlier graph, not a graph left unchanged
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == (1 if n else 0), L


@pytest.mark.parametrize("B", [1, 3])
def test_implicit_long_convolution_compiles(B):
    # dynamo: L=1 is specialised, L=37 compiles a graph dynamic in L, which serves 100 and 128
    _compiled_matches(fla_model("implicit"), B, (1, 37, 100, MAX_LEN), rewrites=(1, 1, 0, 0))


@pytest.mark.parametrize("B", [1, 3])
def test_explicit_long_convolution_compiles_where_causal(B):
    """One static graph per length (L >= max_len - 1, where fla's spelling is causal): a graph
    dynamic in L would also serve lengths where it is not, so verify rejects that one (below)."""
    _compiled_matches(fla_model("explicit"), B, (MAX_LEN - 1, MAX_LEN, 200), rewrites=(1, 1, 1), dynamic=False)


def test_explain():
    report = lcsm_compile.explain(fla_model("implicit"), _x(2, 100))
    assert report.ok and [m.kind for m in report.mixers] == ["fft"], str(report)
    assert report.fold_length == MAX_LEN  # the positional table's length, the model's own limit
    assert report.mixers[0].channels == 16


@pytest.mark.parametrize("L", [37, 100])
def test_explicit_filter_longer_than_the_sequence_is_not_causal(L):
    """fla's fft_conv transforms the whole max_len filter at 2L points: for L < max_len - 1 the
    taps past 2L wrap around onto earlier outputs, and y[t] reads u[s > t]. explain() says so and
    the compiled model runs unchanged (equal to eager)."""
    model = fla_model("explicit")
    report = lcsm_compile.explain(model, _x(2, L))
    assert not report.mixers and any("non-causal" in u.reason for u in report.unsupported), str(report)
    x = _x(2, L)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(model, backend="lcsm", options=EAGER)(x)
    assert _rel(got, model(x).detach()) <= 1e-6


def test_explicit_dynamic_graph_is_not_reused_where_non_causal():
    """A graph made dynamic at L=150 (where fla's explicit conv is causal) would be reused at L=100
    (where it is not): verify re-checks causality at other lengths and leaves it unchanged."""
    model = fla_model("explicit")
    report = lcsm_compile.explain(model, _x(1, 150))  # explain marks L dynamic
    assert not report.mixers, str(report)
    assert any("non-causal at L=" in u.reason for u in report.unsupported), str(report)
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for L in (200, 150, 100):
            x = _x(1, L, seed=L)
            assert _rel(compiled(x), model(x)) <= 1e-5, L


@pytest.mark.parametrize("B", [1, 2])
def test_decoder_matches_full_forward(B):
    model = fla_model("implicit")
    x = _x(B, 100, seed=B)
    with torch.no_grad():
        want = model(x)
    dec = lcsm_compile.decoder(model, x[:, :16], max_len=MAX_LEN, inner_backend="eager")
    for P in (1, 17, 64):
        out = [dec.prefill(x[:, :P])]
        for t in range(P, x.shape[1]):
            out.append(dec.step(x[:, t : t + 1]))
        assert _rel(torch.cat(out, 1), want[:, P - 1 :]) <= 1e-5, P


def test_decoder_refuses_the_non_causal_spelling():
    from lcsm_compile.passes.incrementalize import IncrementalizeError

    model = fla_model("explicit")
    with pytest.raises(IncrementalizeError, match="non-causal"):
        lcsm_compile.decoder(model, _x(1, 16), max_len=MAX_LEN, inner_backend="eager")
