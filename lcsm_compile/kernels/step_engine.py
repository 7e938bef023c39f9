"""What every decode engine shares: the host's bookkeeping of a sequence and its checks.

    prefill(m, u) for every mixer m  ->  step(m, u_t) for every mixer  ->  advance()  ->  step ...

An engine (OnlineConv, ModalRecurrence, GraphedLazyConv) holds M mixers of `channels` channels
for a batch of B, and a position that moves once every mixer has stepped. The order is checked
here: no step before every prompt, no second prompt once decoding started, no position past
max_len (None: unbounded), inputs of the right shape, dtype and device. Bad input raises before
any state changes. Subclasses supply the device work: `_prefill(m, u, P) -> y`,
`_step(u, y, m0, n)` for n mixers from m0, and `_advance_device()` (tiles, the device position).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["StepEngine", "resolve_backend"]


def resolve_backend(owner: str, device: torch.device, dtype: torch.dtype, backend: str) -> tuple[torch.device, str]:
    """(device with its index, "triton" | "torch"): "auto" is Triton on CUDA, except for fp64."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend not in ("torch", "triton") or (backend == "triton" and dtype == torch.float64):
        raise ValueError(f"{owner}: backend must be 'torch' or 'triton' (no fp64), got {backend!r}")
    return device, backend


class StepEngine:
    M: int
    B: int
    max_len: int | None
    dtype: torch.dtype
    device: torch.device
    pos: Tensor

    @property
    def channels(self) -> int:
        raise NotImplementedError

    # ---------------------------------------------------------------- host state
    @property
    def position(self) -> int:
        return self._position

    @property
    def prompt_len(self) -> int | None:
        return self._prompt_len

    def reset(self) -> None:
        """Back to before the prompt. Buffers are kept (and captured graphs stay valid)."""
        self._position = 0
        self._prompt_len: int | None = None
        self._prefilled = [False] * self.M
        self._stepped: set[int] = set()
        self.pos.zero_()

    def _fail(self, message: str) -> str:
        return f"{type(self).__name__}: {message}"

    def _check_mixer(self, m) -> int:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.M:
            raise ValueError(self._fail(f"mixer index must be an int in [0, {self.M}), got {m!r}"))
        return m

    def _check_tensor(self, name: str, x, shape: tuple, dtype: torch.dtype | None = None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(self._fail(f"{name} must be a tensor, got {type(x).__name__}"))
        if tuple(x.shape) != shape:
            raise ValueError(self._fail(f"{name} must have shape {shape}, got {tuple(x.shape)}"))
        if x.dtype != (dtype or self.dtype):
            raise ValueError(self._fail(f"{name} must be {dtype or self.dtype}, got {x.dtype}"))
        if x.device != self.device:
            raise ValueError(self._fail(f"{name} must be on {self.device}, got {x.device}"))

    def _past_end(self) -> bool:
        return self.max_len is not None and self._position >= self.max_len

    def _check_can_step(self, mixers) -> None:
        missing = [m for m in mixers if not self._prefilled[m]]
        if missing:
            raise RuntimeError(self._fail(f"step before prefill for mixer(s) {missing}; call prefill(m, u) first "
                                          "(a prompt of length 0 starts an empty sequence)"))
        if self._past_end():
            raise RuntimeError(self._fail(f"step past max_len={self.max_len}"))

    # ---------------------------------------------------------------- prompt
    def prefill(self, m: int, u: Tensor) -> Tensor:
        """y (B, channels, P) for the prompt u (B, channels, P) of mixer m; the mixer's state
        becomes the state after u. Every mixer's prompt has the same length."""
        m = self._check_mixer(m)
        P = u.shape[-1] if isinstance(u, Tensor) and u.dim() == 3 else -1
        self._check_tensor("prefill input u", u, (self.B, self.channels, max(P, 0)))
        if self.max_len is not None and P > self.max_len:
            raise ValueError(self._fail(f"prompt of length {P} is longer than max_len={self.max_len}"))
        if self._prompt_len is not None:
            if self._position != self._prompt_len or self._stepped:
                raise RuntimeError(self._fail("prefill after decoding started; call reset() first"))
            if P != self._prompt_len:
                raise ValueError(self._fail(f"every mixer's prompt must have length {self._prompt_len}, got {P}"))
        y = self._prefill(m, u, P)
        if self._prompt_len is None:
            self._prompt_len = self._position = P
            self.pos.fill_(P)
        self._prefilled[m] = True
        return y

    def prefill_all(self, u: Tensor) -> Tensor:
        """prefill(m, u[m]) for every mixer: u (M, B, channels, P) -> y (M, B, channels, P)."""
        if not isinstance(u, Tensor) or u.dim() != 4 or u.shape[0] != self.M:
            raise ValueError(self._fail(f"prefill_all wants u of shape (M={self.M}, B, channels, P)"))
        self._check_tensor("prefill input u", u, (self.M, self.B, self.channels, u.shape[-1]))
        return torch.stack([self.prefill(m, u[m]) for m in range(self.M)])

    def _prefill(self, m: int, u: Tensor, P: int) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- step
    def step(self, m: int, u_t: Tensor, out: Tensor | None = None) -> Tensor:
        """y_t (B, channels) of mixer m at the current position, from its input u_t (B, channels)."""
        m = self._check_mixer(m)
        self._check_tensor("step input u_t", u_t, (self.B, self.channels))
        if out is not None:
            self._check_tensor("step output", out, (self.B, self.channels))
        self._check_can_step([m])
        y = torch.empty_like(u_t) if out is None else out
        self._step(u_t[None], y[None], m, 1)
        self._stepped.add(m)
        return y

    def step_all(self, u: Tensor, out: Tensor | None = None) -> Tensor:
        """step for every mixer in one launch: u (M, B, channels) -> y (M, B, channels). Only where
        the mixers' inputs do not depend on each other's outputs (benchmarks, independent heads)."""
        self._check_tensor("step_all input u", u, (self.M, self.B, self.channels))
        if out is not None:
            self._check_tensor("step_all output", out, (self.M, self.B, self.channels))
        self._check_can_step(range(self.M))
        y = torch.empty_like(u) if out is None else out
        self._step(u, y, 0, self.M)
        self._stepped.update(range(self.M))
        return y

    def _step(self, u: Tensor, y: Tensor, m0: int, n: int) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- position
    def advance(self, launch: bool = True, check: bool = True) -> None:
        """Move to the next position once every mixer stepped. launch=False: bookkeeping only (the
        device work was replayed in a CUDA graph). check=False: skip the every-mixer-stepped check
        (for steps replayed inside a caller's CUDA graph)."""
        if not all(self._prefilled):
            raise RuntimeError(self._fail(f"advance before prefill of mixer(s) "
                                          f"{[m for m in range(self.M) if not self._prefilled[m]]}"))
        if self._past_end():
            raise RuntimeError(self._fail(f"advance past max_len={self.max_len}"))
        if check and len(self._stepped) < self.M:
            raise RuntimeError(self._fail(f"advance before mixer(s) {sorted(set(range(self.M)) - self._stepped)} "
                                          f"stepped at position {self._position}"))
        if launch:
            self._advance_device()
        self._position += 1
        self._stepped.clear()

    def _advance_device(self) -> None:
        """The device work between two positions (none by default)."""

    # ---------------------------------------------------------------- graph warm-ups
    @contextmanager
    def _restored(self, *state: Tensor):
        """Device work inside (graph warm-ups and captures run real steps) leaves `state`, views
        of what that work writes, as it was; the mixers count as not stepped afterwards."""
        saved = [s.clone() for s in state]
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            for s, v in zip(state, saved, strict=True):
                s.copy_(v)
            self._stepped.clear()
