"""Plain-torch references for online convolution, with the engine's interface.

    y[m, b, d, t] = sum_{s <= t} h[m, d, t - s] * u[m, b, d, s]      (h zero beyond K)

- `LazyOnlineConv`: each step sums over the whole history, O(t) per step (the naive decoder).
- `EagerOnlineConv`: each step pushes u[t]'s contribution to every future position, O(L - t).
- `TiledOnlineConv`: the Flash Inference schedule (schedule.py), every tile an FFT of size 2U
  computed from scratch; no caching, no kernels: the engine's fast paths are held against it.

All three keep their state in the compute dtype (fp64 for fp64 inputs, else fp32) and are meant
for tests and baselines, not for speed (benchmarks/online_conv.py has tuned GPU baselines).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...ops import causal_conv_reference
from .schedule import prompt_tiles, tile_at


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _OnlineReference:
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None):
        M, D, K = filters.shape
        self.dtype = dtype or filters.dtype
        self.cdtype = compute_dtype(self.dtype)
        self.M, self.D, self.B, self.max_len = M, D, batch, max_len
        h = torch.zeros(M, D, max_len, dtype=self.cdtype, device=filters.device)
        k = min(K, max_len)
        h[..., :k] = filters[..., :k].to(self.cdtype)
        self.h = h
        self.X = torch.zeros(M, batch, D, max_len, dtype=self.cdtype, device=filters.device)
        self.prompt_len = 0
        self.position = 0

    def prefill(self, m: int, u: Tensor) -> Tensor:
        P = u.shape[-1]
        self.prompt_len = self.position = P
        self.X[m, ..., :P] = u.to(self.cdtype)
        if P == 0:
            return u.clone()
        return causal_conv_reference(u.to(self.cdtype), self.h[m]).to(self.dtype)

    def advance(self) -> None:
        self.position += 1


class LazyOnlineConv(_OnlineReference):
    def step(self, m: int, u_t: Tensor) -> Tensor:
        t = self.position
        self.X[m, ..., t] = u_t.to(self.cdtype)
        hist = self.X[m, ..., : t + 1]  # (B, D, t+1)
        taps = self.h[m, :, : t + 1].flip(-1)  # h[t - s] for s = 0..t
        return (hist * taps).sum(-1).to(self.dtype)


class EagerOnlineConv(_OnlineReference):
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None):
        super().__init__(filters, batch, max_len, dtype)
        self.A = torch.zeros_like(self.X)

    def prefill(self, m: int, u: Tensor) -> Tensor:
        P = u.shape[-1]
        y = super().prefill(m, u)
        self.A[m].zero_()
        if P:
            full = torch.zeros(self.B, self.D, self.max_len, dtype=self.cdtype, device=u.device)
            full[..., :P] = u.to(self.cdtype)
            self.A[m] = causal_conv_reference(full, self.h[m])
        return y

    def step(self, m: int, u_t: Tensor) -> Tensor:
        t, L = self.position, self.max_len
        u = u_t.to(self.cdtype)
        self.X[m, ..., t] = u
        y = self.A[m, ..., t] + self.h[m, :, 0] * u
        self.A[m, ..., t + 1 :] += u[..., None] * self.h[m, None, :, 1 : L - t]
        return y.to(self.dtype)


class TiledOnlineConv(_OnlineReference):
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None):
        super().__init__(filters, batch, max_len, dtype)
        self.A = torch.zeros_like(self.X)

    def prefill(self, m: int, u: Tensor) -> Tensor:
        P = u.shape[-1]
        y = super().prefill(m, u)
        self.A[m].zero_()
        for tile in prompt_tiles(P, self.max_len):  # the prompt's tiles that reach past it
            self._tile(tile, m, start=P)
        return y

    def _tile(self, tile, m=slice(None), start: int = 0) -> None:
        """A[m, ..., t'] += the tile's contribution for t' in its outputs from `start` on."""
        U, end = tile.size, min(tile.dst + tile.size, self.max_len)
        block = self.X[m, ..., tile.src : tile.src + U]
        g = self.h[m, ..., 1 : 2 * U].unsqueeze(-3)  # lags 1 .. 2U-1, broadcast over the batch
        z = torch.fft.irfft(torch.fft.rfft(block, n=2 * U) * torch.fft.rfft(g, n=2 * U), n=2 * U)
        lo = max(tile.dst, start)
        self.A[m, ..., lo:end] += z[..., U - 1 + lo - tile.dst : U - 1 + end - tile.dst]

    def step(self, m: int, u_t: Tensor) -> Tensor:
        t = self.position
        u = u_t.to(self.cdtype)
        self.X[m, ..., t] = u
        return (self.A[m, ..., t] + self.h[m, :, 0] * u).to(self.dtype)

    def advance(self) -> None:
        tile = tile_at(self.position, self.max_len)
        if tile is not None:
            self._tile(tile)
        self.position += 1
