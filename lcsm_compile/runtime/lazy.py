"""The lazy decode baseline behind `decoder(..., engine="lazy")`: every step sums the whole history.

    y[t] = sum_{s <= t} h[t - s] u[s]        O(t) per step and mixer

Same interface as the online engine (prefill / step / advance / reset), so the same step program
runs on it; it is what an LCSM decoder without the tiling does, and what benchmarks compare to.
The filter is stored reversed so that each step is one contiguous product-sum.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import causal_conv_fft


class LazyConv:
    backend = "lazy"

    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.M, self.D, K = filters.shape
        self.B, self.max_len = int(batch), int(max_len)
        self.dtype = dtype or filters.dtype
        self.device = torch.device(device) if device is not None else filters.device
        self.cdtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        L, k = self.max_len, min(K, self.max_len)
        self.h_reversed = torch.zeros(self.M, self.D, L, dtype=self.cdtype, device=self.device)
        self.h_reversed[..., L - k:] = filters[..., :k].flip(-1).to(self.device, self.cdtype)  # [L-1-j] = h[j]
        self.X = torch.zeros(self.M, self.B, self.D, L, dtype=self.cdtype, device=self.device)
        self.reset()

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position, self._prompt_len = 0, None

    def prefill(self, m: int, u: Tensor) -> Tensor:
        P = u.shape[-1]
        self.X[m, ..., :P] = u.to(self.cdtype)
        self._position = self._prompt_len = P
        h = self.h_reversed[m, :, self.max_len - P:].flip(-1)
        return causal_conv_fft(u.to(self.cdtype), h).to(self.dtype)

    def step(self, m: int, u_t: Tensor, out: Tensor | None = None) -> Tensor:
        t, L = self._position, self.max_len
        if self._prompt_len is None:
            raise RuntimeError("LazyConv: step before prefill")
        if t >= L:
            raise RuntimeError(f"LazyConv: step past max_len={L}")
        self.X[m, ..., t] = u_t.to(self.cdtype)
        y = torch.einsum("bds,ds->bd", self.X[m, ..., : t + 1], self.h_reversed[m, :, L - 1 - t:])
        if out is None:
            return y.to(self.dtype)
        out.copy_(y)
        return out

    def advance(self, launch: bool = True, check: bool = True) -> None:
        self._position += 1
