"""Hyena language model, written from the paper.

Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon, Re (2023),
"Hyena Hierarchy: Towards Larger Convolutional Language Models", ICML 2023,
arXiv:2302.10866.

The operator of order 2 (Sec. 3): a projection to (x0, x1, v), a short depthwise
convolution on all three, then v <- x0 * (h (*) (x1 * v)), where h is a long implicit
filter: an FFN with sine activations over a positional encoding of t (Sec. 3.3,
Eq. 7), multiplied by an exponential decay window.  The long convolution is an FFT
convolution padded to 2L with a learned skip ("bias", the D term).

The filter is a function of t only, computed from buffers of length `max_len` sliced
to L, so the filter for length L is the prefix of the filter for any longer length.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .lm import LMHeadModel


def fftconv(u: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (B, D, L) with k (D, L) via FFT at size 2L, plus bias * u."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * bias.unsqueeze(-1)
    return out.to(dtype=u.dtype)


class Sin(nn.Module):
    """Sine activation with a learned frequency per feature (the paper's filter FFN)."""

    def __init__(self, dim: int, w: float = 10.0, train_freq: bool = True):
        super().__init__()
        freq = w * torch.ones(1, dim)
        self.freq = nn.Parameter(freq) if train_freq else freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """Positional encoding of t: [t, Re exp(-i f w t), Im exp(-i f w t)] for emb_dim-1 bands."""

    def __init__(self, emb_dim: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        t = torch.linspace(0, 1, max_len)[None, :, None]  # (1, L, 1)
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, max_len - 1, max_len)[None, :, None]
        w = 2 * math.pi * t_rescaled / max_len  # (1, L, 1)
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        z = torch.cat([t, z.real, z.imag], dim=-1)  # (1, L, emb_dim)
        self.register_buffer("z", z, persistent=False)
        self.register_buffer("t", t, persistent=False)

    def forward(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    """Decay window exp(-|delta_d| t): channels decay from fast to slow (Sec. 3.3)."""

    def __init__(self, d_model: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2, shift: float = 0.0):
        super().__init__()
        self.shift = shift
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, d_model)[None, None]
        self.register_buffer("deltas", deltas, persistent=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        decay = torch.exp(-t * self.deltas.abs())
        return x * (decay + self.shift)


class HyenaFilter(nn.Module):
    """Implicit long filter h = FFN(PositionalEmbedding(t)) * window(t), plus the skip bias."""

    def __init__(self, d_model: int, emb_dim: int = 3, order: int = 16, max_len: int = 1024,
                 w: float = 1.0, num_inner_mlps: int = 2):
        super().__init__()
        assert emb_dim % 2 != 0 and emb_dim >= 3, "emb_dim must be odd and at least 3"
        self.d_model = d_model
        self.max_len = max_len
        self.bias = nn.Parameter(torch.randn(d_model))
        self.pos_emb = PositionalEmbedding(emb_dim, max_len)
        layers = [nn.Linear(emb_dim, order), Sin(order, w)]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(order, order), Sin(order, w)]
        layers.append(nn.Linear(order, d_model, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = ExponentialModulation(d_model)

    def filter(self, L: int) -> torch.Tensor:
        """The filter for length L, (1, L, D)."""
        if L > self.max_len:
            raise ValueError(f"sequence length {L} exceeds the filter's max_len {self.max_len}")
        z, t = self.pos_emb(L)
        h = self.implicit_filter(z)
        return self.modulation(t, h)

    def forward(self, x: torch.Tensor, L: int, k: torch.Tensor | None = None) -> torch.Tensor:
        if k is None:
            k = self.filter(L)[0].transpose(0, 1)  # (D, L)
        return fftconv(x, k, self.bias)


class HyenaOperator(nn.Module):
    """Hyena operator of order 2 on x (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, max_len: int, filter_order: int = 64, emb_dim: int = 3,
                 short_filter_order: int = 3, w: float = 1.0):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.order = 2
        inner_width = d_model * (self.order + 1)
        self.in_proj = nn.Linear(d_model, inner_width)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(inner_width, inner_width, short_filter_order,
                                      padding=short_filter_order - 1, groups=inner_width)
        self.filter_fn = HyenaFilter(d_model * (self.order - 1), emb_dim=emb_dim,
                                     order=filter_order, max_len=max_len, w=w)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        L = u.size(-2)
        u = self.in_proj(u).transpose(1, 2)  # (B, 3D, L)
        uc = self.short_filter(u)[..., :L]
        x0, x1, v = uc.split(self.d_model, dim=1)
        k = self.filter_fn.filter(L)[0].transpose(0, 1)  # (D, L)
        v = v * x1
        v = self.filter_fn(v, L, k=k)
        y = (v * x0).transpose(1, 2)
        return self.out_proj(y)


class HyenaLM(LMHeadModel):
    """Token ids (B, L) -> logits (B, L, V): the GPT stack with Hyena operators as mixers."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, max_len: int,
                 d_inner: int | None = None, filter_order: int = 64, emb_dim: int = 3,
                 w: float = 1.0, pad_vocab_size_multiple: int = 1):
        super().__init__(
            vocab_size, d_model, n_layer, max_len,
            lambda: HyenaOperator(d_model, max_len, filter_order=filter_order, emb_dim=emb_dim, w=w),
            d_inner=d_inner, pad_vocab_size_multiple=pad_vocab_size_multiple,
        )


def hyena_tiny(max_len: int = 1024) -> HyenaLM:
    """A CPU-sized Hyena LM: d_model 32, 2 layers, vocab 64, filter order 16."""
    return HyenaLM(vocab_size=64, d_model=32, n_layer=2, max_len=max_len, filter_order=16,
                   emb_dim=5, w=10.0)


def hyena_153m(max_len: int = 2**17) -> HyenaLM:
    """The paper's 153M Pile model: 18 layers, width 864, MLP width 2*864, filter order 64."""
    return HyenaLM(vocab_size=50257, d_model=864, n_layer=18, max_len=max_len,
                   d_inner=2 * 864, filter_order=64, emb_dim=33, w=14.0,
                   pad_vocab_size_multiple=8)
