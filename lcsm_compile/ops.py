"""The canonical op every verified mixer becomes: `lcsm::causal_conv(u, h) -> y`.

    y[b, d, t] = sum_{s <= t} h[d, t - s] * u[b, d, s]      u: (B, D, L), h: (D, K)

K may be shorter than L (the filter is zero beyond K) or longer (only h[:, :L] matters).
One custom op with a fake kernel, so inductor, torch.export and ONNX all see a single node;
the plain-torch reference sits beside the FFT implementation and tests hold them together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv", "causal_conv_reference", "causal_conv_fft", "fft_size"]

_FAST_SIZES = (1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16)


def fft_size(n: int) -> int:
    """Smallest 2^a * (1, 3, 5, 9, 15) >= n: cuFFT and pocketfft are fast there, and it wastes
    less than the next power of two."""
    if n <= 16:
        return next(s for s in _FAST_SIZES if s >= n)
    best = 1 << (n - 1).bit_length()
    for odd in (3, 5, 9, 15):
        m = odd
        while m < n:
            m *= 2
        best = min(best, m)
    return best


def _check(u: Tensor, h: Tensor) -> None:
    if u.dim() != 3 or h.dim() != 2:
        raise ValueError(f"causal_conv: want u (B, D, L) and h (D, K), got {tuple(u.shape)} and {tuple(h.shape)}")
    if u.shape[1] != h.shape[0]:
        raise ValueError(f"causal_conv: u has {u.shape[1]} channels, h has {h.shape[0]}")
    if h.shape[1] < 1:
        raise ValueError("causal_conv: the filter needs at least one tap")
    if u.device != h.device:
        raise ValueError(f"causal_conv: u on {u.device}, h on {h.device}")


def causal_conv_reference(u: Tensor, h: Tensor) -> Tensor:
    """Direct O(L K) sum via a depthwise conv1d on the flipped filter; exact in fp64."""
    _check(u, h)
    L = u.shape[-1]
    k = h[:, :L]
    K = k.shape[-1]
    dtype = torch.promote_types(u.dtype, h.dtype)
    w = k.flip(-1).to(dtype).unsqueeze(1)  # (D, 1, K): conv1d correlates, so flip
    y = F.conv1d(F.pad(u.to(dtype), (K - 1, 0)), w, groups=u.shape[1])
    return y.to(u.dtype).contiguous()


def causal_conv_fft(u: Tensor, h: Tensor) -> Tensor:
    """FFT convolution padded past L + K - 1 so the circular wrap never reaches [0, L)."""
    _check(u, h)
    L = u.shape[-1]
    k = h[:, :L]
    compute = torch.float64 if u.dtype == torch.float64 or h.dtype == torch.float64 else torch.float32
    n = fft_size(L + k.shape[-1] - 1)
    U = torch.fft.rfft(u.to(compute), n=n)
    H = torch.fft.rfft(k.to(compute), n=n)
    y = torch.fft.irfft(U * H, n=n)[..., :L]
    return y.to(u.dtype).contiguous()


@torch.library.custom_op("lcsm::causal_conv", mutates_args=())
def causal_conv(u: Tensor, h: Tensor) -> Tensor:
    """Causal depthwise convolution of u (B, D, L) with per-channel filters h (D, K)."""
    if u.is_cuda:
        from .kernels.dispatch import causal_conv_cuda  # noqa: PLC0415 - kernels load lazily

        return causal_conv_cuda(u, h)
    # Short filters: the direct sum is cheaper than two FFTs and exact.
    if h.shape[-1] <= 32:
        return causal_conv_reference(u, h)
    return causal_conv_fft(u, h)


@causal_conv.register_fake
def _(u: Tensor, h: Tensor) -> Tensor:
    torch._check(u.dim() == 3, lambda: "causal_conv: u must be (B, D, L)")
    torch._check(h.dim() == 2, lambda: "causal_conv: h must be (D, K)")
    torch._check(u.shape[1] == h.shape[0], lambda: "causal_conv: channel mismatch")
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    u, h = inputs
    ctx.save_for_backward(u, h)


def _backward(ctx, grad_y):
    # dL/du[s] = sum_t h[t - s] g[t]: an anti-causal conv = causal conv on the time-flipped signal.
    u, h = ctx.saved_tensors
    L = u.shape[-1]
    grad_u = grad_h = None
    if ctx.needs_input_grad[0]:
        grad_u = causal_conv(grad_y.flip(-1).contiguous(), h).flip(-1).to(u.dtype)
    if ctx.needs_input_grad[1]:
        # dL/dh[d, j] = sum_{b, t} g[b, d, t] u[b, d, t - j], j < min(K, L)
        K = h.shape[-1]
        n = fft_size(2 * L)
        G = torch.fft.rfft(grad_y.to(torch.float64 if u.dtype == torch.float64 else torch.float32), n=n)
        Uf = torch.fft.rfft(u.to(G.real.dtype), n=n)
        corr = torch.fft.irfft(G * Uf.conj(), n=n)[..., :L].sum(0)
        grad_h = torch.zeros_like(h)
        m = min(K, L)
        grad_h[:, :m] = corr[:, :m].to(h.dtype)
    return grad_u, grad_h


causal_conv.register_autograd(_backward, setup_context=_setup_context)
