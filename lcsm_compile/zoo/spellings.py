"""One causal convolution, spelled the ways LCSM code bases spell it.

Each mixer maps x (B, L, D) -> (B, L, D) with exactly one causal convolution per channel,
y[t] = sum_{s<=t} h[t-s] u[s] (+ D u[t] where noted), computed the way one family of code
writes it.  The spellings are the ones used by the models of Fu et al. (2023),
"Simple Hardware-Efficient Long Convolutions for Sequence Modeling" (arXiv:2302.06646,
Sec. 2: FFT convolution padded to 2L), Poli et al. (2023), "Hyena Hierarchy"
(arXiv:2302.10866: rfft/irfft with hand scaling, short Conv1d with padding K-1), and of
direct convolutions (conv1d with left padding, Toeplitz matrices, the cumulative sum as the
all-ones filter).  Explicit filters are parameters of length `max_len`, cut to L.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def decaying_filter(d_model: int, max_len: int, tau: float = 64.0) -> torch.Tensor:
    """Random filter (D, max_len) with an exponential envelope, so long sums stay O(1)."""
    t = torch.arange(max_len).float()
    return torch.randn(d_model, max_len) * torch.exp(-t / tau) / math.sqrt(tau)


class ExplicitFilterMixer(nn.Module):
    """Base: an explicit filter h (D, max_len) and a skip D; subclasses spell the convolution."""

    def __init__(self, d_model: int, max_len: int, skip: bool = True):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.h = nn.Parameter(decaying_filter(d_model, max_len))
        self.D = nn.Parameter(torch.randn(d_model)) if skip else None

    def filter(self, L: int) -> torch.Tensor:
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the filter's max_len {self.max_len}")
        return self.h[:, :L]

    def conv(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        u = x.transpose(1, 2)  # (B, D, L)
        y = self.conv(u, self.filter(L))
        if self.D is not None:
            y = y + u * self.D[:, None]
        return y.transpose(1, 2)


class FFTComplexConv(ExplicitFilterMixer):
    """Complex FFT at 2L, product, inverse FFT, real part."""

    def conv(self, u, h):
        L = u.size(-1)
        y = torch.fft.ifft(torch.fft.fft(u, n=2 * L) * torch.fft.fft(h, n=2 * L), n=2 * L)
        return y.real[..., :L]


class RFFTOrthoConv(ExplicitFilterMixer):
    """The signal through an orthonormal rfft/irfft pair; the filter's plain DFT in between."""

    def conv(self, u, h):
        L = u.size(-1)
        u_f = torch.fft.rfft(u, n=2 * L, norm="ortho")
        h_f = torch.fft.rfft(h, n=2 * L)
        return torch.fft.irfft(u_f * h_f, n=2 * L, norm="ortho")[..., :L]


class RFFTForwardConv(ExplicitFilterMixer):
    """norm="forward" on both transforms, at the next power of two >= 2L (a cuFFT habit)."""

    def conv(self, u, h):
        L = u.size(-1)
        n = 1 << (2 * L - 1).bit_length()
        u_f = torch.fft.rfft(u, n=n, norm="forward")
        h_f = torch.fft.rfft(h, n=n)
        return torch.fft.irfft(u_f * h_f, n=n, norm="forward")[..., :L]


class RFFTDivideByNConv(ExplicitFilterMixer):
    """Unnormalised inverse (norm="forward") and the 1/n applied by hand afterwards."""

    def conv(self, u, h):
        L = u.size(-1)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(h, n=n), n=n, norm="forward")
        return y[..., :L] / n


class PadConv1d(ExplicitFilterMixer):
    """Left-pad by K-1 and a depthwise conv1d (a correlation, hence the flipped filter); K = L."""

    def conv(self, u, h):
        K = h.size(-1)
        weight = h.flip(-1).unsqueeze(1)  # (D, 1, K)
        return F.conv1d(F.pad(u, (K - 1, 0)), weight, groups=u.size(1))


class ToeplitzConv(ExplicitFilterMixer):
    """y = T u with T[d, t, s] = h[d, t-s] for t >= s, built from index arithmetic."""

    def conv(self, u, h):
        L = u.size(-1)
        t = torch.arange(L, device=u.device)
        lag = t[:, None] - t[None, :]  # (L, L)
        T = h[:, lag.clamp(min=0)] * (lag >= 0)  # (D, L, L)
        return torch.einsum("dts,bds->bdt", T, u)


class CausalConv1d(nn.Module):
    """nn.Conv1d(D, D, K, padding=K-1, groups=D), then the first L outputs (Hyena's short conv)."""

    def __init__(self, d_model: int, kernel_size: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size - 1,
                              groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.size(1)
        return self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2)


class CumsumMixer(nn.Module):
    """A running sum along time (the all-ones filter) between two projections."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.in_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.in_proj(x)
        return self.out_proj(torch.cumsum(u, dim=1))
