"""lcsm::causal_conv: reference vs FFT implementation, opcheck, compile and export."""
import pytest
import torch

from lcsm_compile.ops import causal_conv, causal_conv_fft, causal_conv_reference, fft_size


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _toeplitz_truth(u, h):
    # y[b,d,t] = sum_{s<=t} h[d,t-s] u[b,d,s], written out as a sum over lags, in fp64.
    B, D, L = u.shape
    y = torch.zeros(B, D, L, dtype=torch.float64)
    u64, h64 = u.double(), h.double()
    for j in range(min(h.shape[1], L)):
        y[..., j:] += h64[:, j, None] * u64[..., : L - j]
    return y


@pytest.mark.parametrize("L", [1, 2, 63, 200, 1000])
@pytest.mark.parametrize("K", [1, 3, 64, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_and_fft_agree(L, K, dtype):
    g = torch.Generator().manual_seed(L * 7919 + K)
    u = torch.randn(2, 5, L, generator=g, dtype=dtype)
    h = torch.randn(5, K, generator=g, dtype=dtype) / K**0.5
    truth = _toeplitz_truth(u, h)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(causal_conv_reference(u, h).double(), truth) < tol
    assert _rel(causal_conv_fft(u, h).double(), truth) < tol
    assert _rel(causal_conv(u, h).double(), truth) < tol
    assert causal_conv(u, h).dtype == dtype


def test_causality_of_the_op():
    u = torch.randn(1, 3, 50, dtype=torch.float64)
    h = torch.randn(3, 50, dtype=torch.float64)
    y = causal_conv(u, h)
    u2 = u.clone()
    u2[..., 30:] = torch.randn(1, 3, 20, dtype=torch.float64)
    y2 = causal_conv(u2, h)[..., :30]
    assert torch.equal(y2, y[..., :30]) or _rel(y2, y[..., :30]) < 1e-13


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="channels"):
        causal_conv(torch.randn(1, 3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"\(B, D, L\)"):
        causal_conv_reference(torch.randn(3, 8), torch.randn(3, 8))


def test_fft_size_is_fast_and_large_enough():
    for n in [1, 7, 17, 100, 1000, 2049, 12345]:
        m = fft_size(n)
        assert m >= n
        while m % 2 == 0:
            m //= 2
        assert m in (1, 3, 5, 9, 15)


def test_opcheck():
    for L, K in [(17, 5), (40, 64)]:
        u = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
        h = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.lcsm.causal_conv.default, (u, h))


def test_gradients_match_reference():
    u = torch.randn(2, 3, 37, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(causal_conv, (u, h))


class _Conv(torch.nn.Module):
    def __init__(self, D, K):
        super().__init__()
        self.h = torch.nn.Parameter(torch.randn(D, K) / K)

    def forward(self, u):
        return torch.ops.lcsm.causal_conv(u.sin(), self.h) * 2


@pytest.mark.slow
def test_survives_inductor_as_one_node():
    m = _Conv(4, 30)
    u = torch.randn(2, 4, 30)
    calls = []

    def count(gm, example_inputs):
        calls.append(sum(n.target is torch.ops.lcsm.causal_conv.default for n in gm.graph.nodes))
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm.forward)

    compiled = torch.compile(m, backend="inductor")
    assert _rel(compiled(u), m(u)) < 1e-5
    torch._dynamo.reset()
    from torch._dynamo.backends.common import aot_autograd

    torch.compile(m, backend=aot_autograd(fw_compiler=count))(u)
    assert calls == [1]


def test_survives_export_as_one_node():
    m = _Conv(4, 30)
    u = torch.randn(2, 4, 30)
    ep = torch.export.export(m, (u,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lcsm.causal_conv.default) == 1
    assert _rel(ep.module()(u), m(u)) < 1e-6
