"""Mixers that look like long convolutions but must not be rewritten as causal ones.

Each maps x (B, L, D) -> (B, L, D) and is written the way the model families that use it
write it; each breaks one property the compiler's verifier checks:

- `BidirectionalFFTConv`: the bidirectional long convolution of Monarch Mixer (Fu et al.
  2023, "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture", arXiv:2310.12109):
  a forward kernel and a reversed backward kernel share one circular FFT conv over 2L.
  Non-causal.
- `SameConv1d`: a depthwise Conv1d with padding="same", as in bidirectional encoders.
  Non-causal.
- `FlippedConv`: a causal FFT conv applied to the time-reversed input and reversed back,
  the reverse half of bidirectional SSM/conv encoders (e.g. Schiff et al. 2024, "Caduceus",
  arXiv:2403.03234).  Anti-causal.
- `LengthNormalisedFilter`: an implicit MLP filter over `torch.linspace(0, 1, L)`; the
  filter at lag l depends on L, so outputs change when the sequence grows (cf. the
  positional encoding of Poli et al. 2023, "Hyena Hierarchy", arXiv:2302.10866, Sec. 3.3,
  when it is built at the input length instead of a fixed maximum).  Causal at fixed L,
  not prefix-consistent.
- `DataDependentFilter`: the filter is a projection of the input itself, convolved with
  another projection (cf. the data-controlled kernels discussed by Poli et al. 2023,
  Sec. 2).  Not a convolution with a fixed filter.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _decaying(d_model: int, max_len: int, tau: float = 64.0) -> torch.Tensor:
    t = torch.arange(max_len).float()
    return torch.randn(d_model, max_len) * torch.exp(-t / tau) / math.sqrt(tau)


class BidirectionalFFTConv(nn.Module):
    """k_fwd on lags >= 0, k_rev on lags < 0, one circular convolution of size 2L."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.k_fwd = nn.Parameter(_decaying(d_model, max_len))
        self.k_rev = nn.Parameter(_decaying(d_model, max_len))
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        u = x.transpose(1, 2)
        k_fwd = self.k_fwd[:, :L]
        k_rev = self.k_rev[:, :L]
        k = F.pad(k_fwd, (0, L)) + F.pad(k_rev.flip(-1), (L, 0))  # (D, 2L)
        k_f = torch.fft.rfft(k, n=2 * L)
        u_f = torch.fft.rfft(u, n=2 * L)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]
        y = y + u * self.D[:, None]
        return y.transpose(1, 2)


class SameConv1d(nn.Module):
    """Depthwise Conv1d with padding="same": centred, sees K//2 future steps."""

    def __init__(self, d_model: int, kernel_size: int = 7, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding="same", groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class FlippedConv(nn.Module):
    """A causal FFT conv run on x.flip(1), reversed back: anti-causal."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.k = nn.Parameter(_decaying(d_model, max_len))
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        u = x.flip(1).transpose(1, 2)
        k_f = torch.fft.rfft(self.k[:, :L], n=2 * L)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * k_f, n=2 * L)[..., :L]
        y = y + u * self.D[:, None]
        return y.transpose(1, 2).flip(1)


class LengthNormalisedFilter(nn.Module):
    """Implicit filter MLP(linspace(0, 1, L)): lag l sits at l/(L-1), which moves with L."""

    def __init__(self, d_model: int, hidden: int = 16, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.filter_mlp = nn.Sequential(
            nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, d_model),
        )
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        t = torch.linspace(0, 1, L, device=x.device, dtype=x.dtype)[:, None]  # (L, 1)
        k = self.filter_mlp(t).transpose(0, 1) * torch.exp(-4 * t[:, 0])  # (D, L)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        y = y + u * self.D[:, None]
        return y.transpose(1, 2)


class DataDependentFilter(nn.Module):
    """The filter is a projection of x; an FFT conv of another projection of x with it."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.filter_proj = nn.Linear(d_model, d_model)
        self.value_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        k = self.filter_proj(x).transpose(1, 2)  # (B, D, L), from the input
        v = self.value_proj(x).transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(v, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return self.out_proj(y.transpose(1, 2))
