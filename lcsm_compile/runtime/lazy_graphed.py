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

from ..ops import causal_conv_fft

__all__ = ["GraphedLazyConv", "window_level"]


def window_level(t: int) -> int:
    """The level of position t: its window 2^(level+1) is the smallest power of two > t."""
    return t.bit_length() - 1


class GraphedLazyConv:
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, backend: str = "auto"):
        if not isinstance(filters, Tensor) or filters.dim() != 3 or filters.shape[-1] < 1:
            raise ValueError("GraphedLazyConv: filters must be a (M, D, K) tensor with K >= 1")
        if int(batch) < 1 or int(max_len) < 1:
            raise ValueError(f"GraphedLazyConv: batch and max_len must be >= 1, got {batch}, {max_len}")
        self.dtype = dtype or filters.dtype
        self.device = torch.device(device) if device is not None else filters.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and self.dtype != torch.float64 else "torch"
        if backend not in ("torch", "triton") or (backend == "triton" and self.dtype == torch.float64):
            raise ValueError(f"GraphedLazyConv: backend must be 'torch' or 'triton' (no fp64), got {backend!r}")
        self.backend = backend
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

    # ---------------------------------------------------------------- host state
    @property
    def position(self) -> int:
        return self._position

    @property
    def prompt_len(self) -> int | None:
        return self._prompt_len

    def reset(self) -> None:
        """Back to before the prompt; buffers (and graphs captured over them) are kept."""
        self._position, self._prompt_len = 0, None
        self._prefilled = [False] * self.M
        self._stepped: set[int] = set()
        self.pos.zero_()

    def memory_elements(self) -> dict:
        """Elements of decode state beyond the filters."""
        n = self.X.numel()
        return {"history": n, "total": n, "per_MDL": n / (self.M * self.D * self.max_len)}

    @contextmanager
    def scratch_position(self):
        """Device work inside runs at position max_len - 2 and is undone on exit (graph warm-ups)."""
        t = max(self.max_len - 2, 0)
        saved = (self.pos.clone(), self.X[..., t].clone())
        self.pos.fill_(t)
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.pos.copy_(saved[0])
            self.X[..., t] = saved[1]
            self._stepped.clear()

    def capture_level(self, level: int | None) -> None:
        """The level whose token StepGraphs warms up or captures next (None: the host position's)."""
        self._capture_level = level

    def _check_mixer(self, m) -> int:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.M:
            raise ValueError(f"GraphedLazyConv: mixer index must be an int in [0, {self.M}), got {m!r}")
        return m

    def _check_tensor(self, name: str, x, shape: tuple) -> None:
        if not isinstance(x, Tensor) or tuple(x.shape) != shape or x.dtype != self.dtype or x.device != self.device:
            got = f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GraphedLazyConv: {name} must be {shape} {self.dtype} on {self.device}, got {got}")

    def _check_can_step(self, mixers) -> None:
        missing = [m for m in mixers if not self._prefilled[m]]
        if missing:
            raise RuntimeError(f"GraphedLazyConv: step before prefill for mixer(s) {missing}; call prefill(m, u) "
                               "first")
        if self._position >= self.max_len:
            raise RuntimeError(f"GraphedLazyConv: step past max_len={self.max_len}")

    # ---------------------------------------------------------------- prompt
    def prefill(self, m: int, u: Tensor) -> Tensor:
        """y (B, D, P) for the prompt u (B, D, P) of mixer m; the history now holds it."""
        m = self._check_mixer(m)
        P = u.shape[-1] if isinstance(u, Tensor) and u.dim() == 3 else -1
        self._check_tensor("prefill input u", u, (self.B, self.D, max(P, 0)))
        if P > self.max_len:
            raise ValueError(f"GraphedLazyConv: prompt of length {P} is longer than max_len={self.max_len}")
        if self._prompt_len is not None:
            if self._position != self._prompt_len or self._stepped:
                raise RuntimeError("GraphedLazyConv: prefill after decoding started; call reset() first")
            if P != self._prompt_len:
                raise ValueError(f"GraphedLazyConv: every mixer's prompt must have length {self._prompt_len}, "
                                 f"got {P}")
        y = u.clone() if P == 0 else causal_conv_fft(u, self.h[m])
        self.X[m, ..., :P] = u
        if self._prompt_len is None:
            self._prompt_len = self._position = P
            self.pos.fill_(P)
        self._prefilled[m] = True
        return y

    def prefill_all(self, u: Tensor) -> Tensor:
        """prefill(m, u[m]) for every mixer: u (M, B, D, P) -> y (M, B, D, P)."""
        if not isinstance(u, Tensor) or u.dim() != 4:
            raise ValueError(f"GraphedLazyConv: prefill_all wants u of shape (M={self.M}, B, D, P)")
        self._check_tensor("prefill input u", u, (self.M, self.B, self.D, u.shape[-1]))
        return torch.stack([self.prefill(m, u[m]) for m in range(self.M)])

    # ---------------------------------------------------------------- step
    def step(self, m: int, u_t: Tensor, out: Tensor | None = None) -> Tensor:
        """y_t (B, D) of mixer m at the current position; stores u_t (B, D) in the history."""
        m = self._check_mixer(m)
        self._check_tensor("step input u_t", u_t, (self.B, self.D))
        if out is not None:
            self._check_tensor("step output", out, (self.B, self.D))
        self._check_can_step([m])
        y = torch.empty_like(u_t) if out is None else out
        self._step(u_t[None], y[None], m)
        self._stepped.add(m)
        return y

    def step_all(self, u: Tensor, out: Tensor | None = None) -> Tensor:
        """step for every mixer in one launch: u (M, B, D) -> y (M, B, D)."""
        self._check_tensor("step_all input u", u, (self.M, self.B, self.D))
        if out is not None:
            self._check_tensor("step_all output", out, (self.M, self.B, self.D))
        self._check_can_step(range(self.M))
        y = torch.empty_like(u) if out is None else out
        self._step(u, y, 0)
        self._stepped.update(range(self.M))
        return y

    def _step(self, u: Tensor, y: Tensor, m0: int) -> None:
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

    def advance(self, launch: bool = True, check: bool = True) -> None:
        """Move to the next position (after every mixer stepped, unless check=False).
        launch=False: host bookkeeping only (the device position moved inside a replayed graph)."""
        if not all(self._prefilled):
            raise RuntimeError(f"GraphedLazyConv: advance before prefill of mixer(s) "
                               f"{[m for m in range(self.M) if not self._prefilled[m]]}")
        if self._position >= self.max_len:
            raise RuntimeError(f"GraphedLazyConv: advance past max_len={self.max_len}")
        if check and len(self._stepped) < self.M:
            raise RuntimeError(f"GraphedLazyConv: advance before mixer(s) "
                               f"{sorted(set(range(self.M)) - self._stepped)} stepped at position {self._position}")
        if launch:
            self.run_tiles(self.tile_level())
        self._position += 1
        self._stepped.clear()

    def __repr__(self) -> str:
        return (f"GraphedLazyConv(M={self.M}, D={self.D}, B={self.B}, max_len={self.max_len}, dtype={self.dtype}, "
                f"backend={self.backend}, position={self._position})")

