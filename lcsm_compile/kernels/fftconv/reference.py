"""Plain-torch references for the Triton FFT convolution.

* `gated_conv_reference`: what `fft_conv` computes, by the direct sum (ops.causal_conv_reference)
  in fp64: y = post * (causal_conv(pre * u, h) + skip * (pre * u)).
* `monarch_conv_reference`: the kernel's own algorithm (pairing, stage order, twiddles, the
  permuted spectrum) as complex128 matrix products; holds the plan's index maths to the truth on
  CPU without Triton.
* `torch_fft_conv`: the torch.fft path the dispatcher falls back to (rfft at the fast size, the
  filter's rfft cached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ops import causal_conv_reference, fft_size
from .spectrum import FilterSpectrum, cached_rfft
from .tables import dft_matrix, twiddles

__all__ = ["gated_conv_reference", "monarch_conv_reference", "torch_fft_conv"]


def gated_conv_reference(u: Tensor, h: Tensor, skip: Tensor | None = None, pre: Tensor | None = None,
                         post: Tensor | None = None) -> Tensor:
    z = u.double() if pre is None else u.double() * pre.double()
    y = causal_conv_reference(z, h.double())
    if skip is not None:
        y = y + skip.double().reshape(-1, 1) * z
    if post is not None:
        y = y * post.double()
    return y


def monarch_conv_reference(u: Tensor, spec: FilterSpectrum, skip: Tensor | None = None,
                           pre: Tensor | None = None, post: Tensor | None = None) -> Tensor:
    """The kernel's stages in complex128; returns fp64 (B, D, L)."""
    p = spec.plan
    B, D, L = u.shape
    z = u.double() if pre is None else u.double() * pre.double()
    z = F.pad(z, (0, p.n - L, 0, 0, 0, B % 2))                 # pad time to N, batch to even
    x = torch.complex(z[0::2], z[1::2]).reshape(-1, D, p.r, p.m)  # x[r, m], n = r*M + m
    dev = u.device
    fr, f1, f2 = (dft_matrix(s).to(dev) for s in (p.r, p.m1, p.m2))
    tw_o, tw = twiddles(p.r, p.m, p.n).to(dev), twiddles(p.m1, p.m2, p.m).to(dev)
    x = torch.einsum("kr,pdrm->pdkm", fr, x) * tw_o
    x = x.reshape(-1, D, p.r, p.m1, p.m2)
    x = torch.einsum("ka,pdram->pdrkm", f1, x) * tw @ f2
    H = torch.complex(spec.planes[:, 0].double(), spec.planes[:, 1].double())
    if skip is not None:
        H = H + skip.double().reshape(-1, 1, 1, 1)
    x = (x * H) @ f2.conj() * tw.conj()
    x = torch.einsum("ka,pdram->pdrkm", f1.conj(), x).reshape(-1, D, p.r, p.m)
    x = torch.einsum("kr,pdrm->pdkm", fr.conj(), x * tw_o.conj()).reshape(-1, D, p.n)[..., :L]
    y = torch.stack([x.real, x.imag], dim=1).reshape(-1, D, L)[:B]
    if post is not None:
        y = y * post.double()
    return y


def torch_fft_conv(u: Tensor, h: Tensor, skip: Tensor | None = None) -> Tensor:
    """irfft(rfft(u, n) * rfft(h, n), n)[..., :L] (+ skip * u) in fp32 (fp64 for fp64 inputs),
    n = ops.fft_size(L + taps - 1), with the filter's rfft cached per (h, n)."""
    L = u.shape[-1]
    taps = min(h.shape[-1], L)
    n = fft_size(L + taps - 1)
    if u.dtype == torch.float64 or h.dtype == torch.float64:
        Hf = torch.fft.rfft(h[:, :taps].double(), n=n)
        compute = torch.float64
    else:
        Hf = cached_rfft(h, taps, n)
        compute = torch.float32
    y = torch.fft.irfft(torch.fft.rfft(u.to(compute), n=n) * Hf, n=n)[..., :L]
    if skip is not None:
        y = y + skip.reshape(-1, 1).to(compute) * u
    return y.to(u.dtype).contiguous()
