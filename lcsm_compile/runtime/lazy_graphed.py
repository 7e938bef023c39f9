"""The lazy decode baseline replayed as CUDA graphs: `decoder(..., engine="lazy-graphed")`.

    y[t] = sum_{s <= t} h[t - s] u[s]        O(t) per step and mixer, like `LazyConv`

`LazyConv` runs eager launches whose shapes change with t, so it cannot be graphed and a token
pays every launch's host overhead; the online engine's tokens are single graph replays. This
engine computes the same sums with launches that replay: the step (kernels/lazy_step.py) reads
t from the device tensor `pos` and sums within a fixed window, a power of two (a constexpr of
the launch). Its "levels" are those windows, in the online engine's interface (n_levels,
tile_level, run_tiles), so StepGraphs captures one token graph per level:

    level -1: t = 0                      window 1
    level k:  2^k <= t < 2^(k+1)         window 2^(k+1)          k = 0 .. n_levels - 1

A window is at most twice the history it covers, and it only caps the step's loop, which stops
at t on the device: a token reads what the lazy sum reads, no more, and pays no launch
overhead. The step runs inside the segments, before `run_tiles`, so it cannot learn the level
from there: StepGraphs calls `capture_level(level)` before warming up or capturing each level's
token, and `capture_level(None)` after. Otherwise (eager steps, no CUDA graphs, the CPU) the
window comes from the host position. `run_tiles` only moves the device position on.

State: history X (M, B, D, max_len) in the state dtype, filters h (M, D, min(K, max_len)) in
fp32 (fp64 for fp64 state), read forwards and backwards from contiguous rows. "triton" backend
on CUDA (capturable), "torch" (lazy_step_reference, host-indexed) elsewhere.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from ..kernels.step_engine import StepEngine, resolve_backend
from ..ops import causal_conv_fft

__all__ = ["GraphedLazyConv", "window_level"]


def window_level(t: int) -> int:
    """The level of position t: its window 2^(level+1) is the smallest power of two > t."""
    return t.bit_length() - 1


class GraphedLazyConv(StepEngine):
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, backend: str = "auto"):
        if not isinstance(filters, Tensor) or filters.dim() != 3 or filters.shape[-1] < 1:
            raise ValueError("GraphedLazyConv: filters must be a (M, D, K) tensor with K >= 1")
        if int(batch) < 1 or int(max_len) < 1:
            raise ValueError(f"GraphedLazyConv: batch and max_len must be >= 1, got {batch}, {max_len}")
        self.dtype = dtype or filters.dtype
        self.device, self.backend = resolve_backend(
            "GraphedLazyConv", torch.device(device) if device is not None else filters.device, self.dtype, backend)
        self._interpret = self.device.type != "cuda"
        self.M, self.D, K = filters.shape
        self.B, self.max_len = int(batch), int(max_len)
        self.cdtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.h = filters[..., : min(K, self.max_len)].to(device=self.device, dtype=self.cdtype).contiguous()
        self.X = torch.zeros(self.M, self.B, self.D, self.max_len, dtype=self.dtype, device=self.device)
        self.n_levels = max(1, window_level(self.max_len - 1) + 1)
        self.pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._capture_level: int | None = None
        self.reset()

    # ---------------------------------------------------------------- host state (StepEngine)
    @property
    def channels(self) -> int:
        return self.D

    def memory_elements(self) -> dict:
        """Elements of decode state beyond the filters."""
        n = self.X.numel()
        return {"history": n, "total": n, "per_MDL": n / (self.M * self.D * self.max_len)}

    @contextmanager
    def scratch_position(self):
        """Device work inside runs at position max_len - 2 and is undone on exit (graph warm-ups)."""
        t = max(self.max_len - 2, 0)
        with self._restored(self.pos, self.X[..., t]):
            self.pos.fill_(t)
            yield

    def capture_level(self, level: int | None) -> None:
        """The level whose token StepGraphs warms up or captures next (None: the host position's)."""
        self._capture_level = level

    # ---------------------------------------------------------------- prompt and step
    def _prefill(self, m: int, u: Tensor, P: int) -> Tensor:
        """The prompt's outputs; the history holds it."""
        self.X[m, ..., :P] = u
        return u.clone() if P == 0 else causal_conv_fft(u, self.h[m])

    def _step(self, u: Tensor, y: Tensor, m0: int, n: int) -> None:
        from ..kernels import lazy_step  # triton loads on the first step

        if self.backend == "torch":
            y.copy_(lazy_step.lazy_step_reference(u, self.X, self.h, self._position, m0))
            return
        level = self._capture_level if self._capture_level is not None else self.tile_level()
        lazy_step.launch_lazy_step(u, y, self.X, self.h, self.pos, m0, 1 << (level + 1), self._interpret)

    # ---------------------------------------------------------------- levels
    def tile_level(self) -> int:
        """The level (window) of the current host position."""
        if self._prompt_len is None:
            raise RuntimeError("GraphedLazyConv: no prompt yet; call prefill first")
        return window_level(self._position)

    def run_tiles(self, level: int) -> None:
        """Capturable: the device position moves on (there are no tiles to run)."""
        self.pos.add_(1)

    def _advance_device(self) -> None:
        self.run_tiles(self.tile_level())

    def __repr__(self) -> str:
        return (f"GraphedLazyConv(M={self.M}, D={self.D}, B={self.B}, max_len={self.max_len}, dtype={self.dtype}, "
                f"backend={self.backend}, position={self._position})")

