"""Long convolutions with explicit, regularised kernels, written from the paper.

Fu, Epstein, Nguyen, Thomas, Zhang, Dao, Rudra, Re (2023), "Simple Hardware-Efficient Long
Convolutions for Sequence Modeling", ICML 2023, arXiv:2302.06646.

The kernel is a plain parameter of length `max_len` per channel.  Two regularisers keep it
smooth and sparse (Sec. 3.1): Squash, k <- sign(k) * relu(|k| - lambda), and Smooth, an
average pool along the kernel's time axis.  Both act on the whole `max_len` kernel before
it is cut to L, so the kernel at length L is the prefix of the kernel at max_len.  The
convolution is an FFT convolution at 2L with a D skip, inside an S4-style block
(GELU, then a GLU output projection), stacked with pre-norm residuals.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LongConv(nn.Module):
    """Long convolution layer on x (B, L, H) -> (B, L, H)."""

    def __init__(self, H: int, max_len: int, kernel_lam: float = 3e-3, smooth_width: int = 3,
                 kernel_init_scale: float = 0.02):
        super().__init__()
        self.H = H
        self.max_len = max_len
        self.kernel_lam = kernel_lam
        self.smooth_width = smooth_width
        self.kernel = nn.Parameter(torch.randn(H, max_len) * kernel_init_scale)
        self.D = nn.Parameter(torch.randn(H))
        self.output_linear = nn.Linear(H, 2 * H)

    def regularised_kernel(self) -> torch.Tensor:
        """Squash then smooth the full (H, max_len) kernel."""
        k = self.kernel
        k = torch.sign(k) * F.relu(torch.abs(k) - self.kernel_lam)
        k = F.avg_pool1d(k.unsqueeze(0), self.smooth_width, stride=1,
                         padding=self.smooth_width // 2).squeeze(0)
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the kernel's max_len {self.max_len}")
        u = x.transpose(1, 2)  # (B, H, L)
        k = self.regularised_kernel()[:, :L]
        k_f = torch.fft.rfft(k, n=2 * L)
        u_f = torch.fft.rfft(u, n=2 * L)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]
        y = y + u * self.D.unsqueeze(-1)
        y = F.gelu(y).transpose(1, 2)
        return F.glu(self.output_linear(y), dim=-1)


class LongConvModel(nn.Module):
    """(B, L, d_model) -> (B, L, d_model): n_layer pre-norm residual LongConv layers."""

    def __init__(self, d_model: int, n_layer: int, max_len: int, **layer_kwargs):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layer))
        self.layers = nn.ModuleList(LongConv(d_model, max_len, **layer_kwargs) for _ in range(n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return x


def long_conv_tiny(max_len: int = 1024) -> LongConvModel:
    """A CPU-sized Long Conv model: d_model 16, 2 layers."""
    return LongConvModel(d_model=16, n_layer=2, max_len=max_len)
