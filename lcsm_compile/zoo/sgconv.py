"""SGConv (Structured Global Convolution), written from the paper.

Li, Cai, Zhang, Chen, Dey (2022), "What Makes Convolutional Models Great on Long Sequence
Modeling?", ICLR 2023, arXiv:2210.09298.

The kernel is a concatenation of sub-kernels of `kernel_dim` parameters each; sub-kernel i
is upsampled (linear interpolation) by 2^max(i-1, 0) and weighted by decay^i, so the kernel
decays with distance and its resolution coarsens (Sec. 3.2).  The number of scales comes
from `max_len`, and the normalisation uses the whole kernel, so the kernel at length L is
the prefix of the kernel at max_len.  The convolution is an FFT convolution at 2L with a D
skip, inside a GELU / linear block with a pre-norm residual.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SGConv(nn.Module):
    """SGConv layer on x (B, L, H) -> (B, L, H)."""

    def __init__(self, H: int, max_len: int, kernel_dim: int = 16, decay: float = 0.5):
        super().__init__()
        self.H = H
        self.max_len = max_len
        self.kernel_dim = kernel_dim
        self.decay = decay
        self.num_scales = 1 + max(0, math.ceil(math.log2(max_len / kernel_dim)))
        self.kernel_list = nn.ParameterList(
            nn.Parameter(torch.randn(1, H, kernel_dim)) for _ in range(self.num_scales)
        )
        self.D = nn.Parameter(torch.randn(H))
        self.output_linear = nn.Linear(H, H)

    def multiscale_kernel(self) -> torch.Tensor:
        """The full kernel, (H, kernel_dim * 2^(num_scales-1)) >= (H, max_len), unit norm per channel."""
        parts = []
        for i, k in enumerate(self.kernel_list):
            scale = 2 ** max(0, i - 1)
            if scale > 1:
                k = F.interpolate(k, scale_factor=scale, mode="linear")
            parts.append(k * self.decay ** i)
        k = torch.cat(parts, dim=-1)[0]
        return k / torch.linalg.vector_norm(k, dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the kernel's max_len {self.max_len}")
        u = x.transpose(1, 2)  # (B, H, L)
        k = self.multiscale_kernel()[:, :L]
        k_f = torch.fft.rfft(k.float(), n=2 * L)
        u_f = torch.fft.rfft(u.float(), n=2 * L)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]
        y = y + u * self.D.unsqueeze(-1)
        y = F.gelu(y).transpose(1, 2)
        return self.output_linear(y)


class SGConvModel(nn.Module):
    """(B, L, d_model) -> (B, L, d_model): n_layer pre-norm residual SGConv layers."""

    def __init__(self, d_model: int, n_layer: int, max_len: int, **layer_kwargs):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layer))
        self.layers = nn.ModuleList(SGConv(d_model, max_len, **layer_kwargs) for _ in range(n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return x


def sgconv_tiny(max_len: int = 1024) -> SGConvModel:
    """A CPU-sized SGConv model: d_model 16, 1 layer, sub-kernels of 16, 7 scales at 1024."""
    return SGConvModel(d_model=16, n_layer=1, max_len=max_len)
