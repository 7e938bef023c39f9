"""`ModalRecurrence`: exact decoding of modal filters, with `OnlineConv`'s interface.

    eng = ModalRecurrence(poles, residues, skip, batch)   # (M, C, n) complex, (M, C) real skip
    y = eng.prefill(m, u)                                   # u (B, C, P) -> y (B, C, P), each m
    for each new position:
        y_t = eng.step(m, u_t)                              # (B, C) -> (B, C), each m, model order
        eng.advance()                                       # position += 1 (no tiles to run)

For filters h[c, t] = Re(sum_n r p^t) + skip [t == 0] (StripedHyena, S4D kernels) the state is
the complex vector s (M, B, C, n): s = p s + u_t, y_t = Re(r . s) + skip u_t, O(n) per token and
position-independent, so a decoder can hold an `OnlineConv` for some mixers and a
`ModalRecurrence` for others and drive both the same way.

State: complex64 (complex128 for fp64 models), whatever the model dtype; inputs and outputs in
the model dtype. Mixers with fewer modes are padded with zero poles and residues (exact no-ops).
The prompt's outputs are one FFT convolution with h[:P] (the caller's folded filters when given,
else the modal impulse response, computed once and cached); its state is a chunked Vandermonde
product (reference.py). Backends: "torch" (plain ops) and "triton" (default on CUDA: the fused step
of triton_step.py, one launch for one mixer or for all). Errors leave the state as it was:
ValueError for bad arguments, RuntimeError for calls out of order (like `OnlineConv`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..step_engine import StepEngine, resolve_backend
from .reference import complex_of, modal_impulse_response, modal_prompt_output, modal_state

__all__ = ["ModalRecurrence"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stack(xs, n: int | None, what: str) -> Tensor:
    """(M, C, n) from a tensor or a list of (C, n_m) tensors (zero-padded to the largest n)."""
    if isinstance(xs, Tensor):
        return xs if xs.dim() == 3 else xs[None]
    if not isinstance(xs, Sequence) or not xs or not all(isinstance(x, Tensor) and x.dim() == 2 for x in xs):
        raise ValueError(f"ModalRecurrence: {what} must be a (M, C, n) tensor or a list of (C, n) tensors")
    n = n or max(x.shape[-1] for x in xs)
    return torch.stack([torch.nn.functional.pad(x, (0, n - x.shape[-1])) for x in xs])


class ModalRecurrence(StepEngine):
    def __init__(self, poles, residues, skip, batch: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, max_len: int | None = None,
                 filters: Tensor | None = None, backend: str = "auto", work_bytes: int = 1 << 28):
        p = _stack(poles, None, "poles")
        r = _stack(residues, p.shape[-1], "residues")
        if not (p.is_complex() and r.is_complex()) or p.shape != r.shape:
            raise ValueError(f"ModalRecurrence: poles and residues must be complex tensors of one shape (M, C, n), "
                             f"got {tuple(p.shape)} {p.dtype} and {tuple(r.shape)} {r.dtype}")
        M, C, n = p.shape
        if skip is None:
            skip = torch.zeros(M, C, device=p.device)
        elif isinstance(skip, (list, tuple)):
            skip = torch.stack(list(skip))
        skip = skip if skip.dim() == 2 else skip[None]
        if tuple(skip.shape) != (M, C) or skip.is_complex():
            raise ValueError(f"ModalRecurrence: skip must be real of shape ({M}, {C}), got {tuple(skip.shape)}")
        if int(batch) < 1 or (max_len is not None and int(max_len) < 1):
            raise ValueError(f"ModalRecurrence: batch and max_len must be >= 1, got {batch}, {max_len}")
        self.dtype = dtype or torch.float32
        if self.dtype not in _FLOATS:
            raise ValueError(f"ModalRecurrence: dtype must be one of {_FLOATS}, got {self.dtype}")
        self.device, self.backend = resolve_backend(
            "ModalRecurrence", torch.device(device) if device is not None else p.device, self.dtype, backend)
        self._interpret = self.device.type != "cuda"
        self.M, self.C, self.n = M, C, n
        self.B = int(batch)
        self.max_len = None if max_len is None else int(max_len)
        self.work_bytes = work_bytes
        self.rdtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        cdtype = complex_of(self.rdtype)
        # Exact values (for the prompt) and the state-dtype copies the steps use.
        self.poles64 = p.to(device=self.device, dtype=torch.complex128)
        self.residues64 = r.to(device=self.device, dtype=torch.complex128)
        self.skip64 = skip.to(device=self.device, dtype=torch.float64)
        self.p = self.poles64.to(cdtype).contiguous()
        self.r = self.residues64.to(cdtype).contiguous()
        self.skip = self.skip64.to(self.rdtype).contiguous()
        if filters is not None:
            if filters.dim() != 3 or tuple(filters.shape[:2]) != (M, C):
                raise ValueError(f"ModalRecurrence: filters must be (M={M}, C={C}, K), got {tuple(filters.shape)}")
            filters = filters.to(device=self.device, dtype=self.rdtype)
        self._filters = filters
        self.S = torch.zeros(M, self.B, C, n, dtype=cdtype, device=self.device)
        # OnlineConv's graph interface: no tile levels, and a device position the steps never read
        # (kept so code that saves and restores `pos` around graph warm-ups works unchanged).
        self.n_levels = 0
        self.pos = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.reset()

    @property
    def h(self) -> Tensor | None:
        """The (M, C, K) filters the prompts are convolved with, when given (as OnlineConv.h)."""
        return self._filters

    # ---------------------------------------------------------------- host state (StepEngine)
    @property
    def channels(self) -> int:
        return self.C

    @property
    def state_size(self) -> int:
        return self.n

    def reset(self) -> None:
        super().reset()
        self.S.zero_()

    def memory_elements(self) -> dict:
        """Elements of decode state (a complex value counts 2), beyond the poles and residues."""
        state = 2 * self.S.numel()
        return {"state": state, "total": state, "per_MDL": state / (self.M * self.C * (self.max_len or 1))}

    # ---------------------------------------------------------------- prompt
    def impulse_response(self, m: int, length: int) -> Tensor:
        """h[m] (C, length) in the compute dtype: the caller's filters, else the modal one."""
        if self._filters is not None and self._filters.shape[-1] >= length:
            return self._filters[m, :, :length]
        cached = getattr(self, "_h_cache", None)
        if cached is None or cached.shape[-1] < length:
            cached = modal_impulse_response(self.poles64, self.residues64, self.skip64, length, self.rdtype,
                                            self.work_bytes)
            self._h_cache = cached
        return cached[m, :, :length]

    def _prefill(self, m: int, u: Tensor, P: int) -> Tensor:
        """The prompt's outputs; the mixer's state becomes the state after u."""
        self.S[m] = modal_state(u, self.poles64[m], work_bytes=self.work_bytes) if P else 0
        return modal_prompt_output(u, self.impulse_response(m, P)) if P else u.clone()

    def _step(self, u: Tensor, y: Tensor, m0: int, n: int) -> None:
        if self.backend == "triton":
            from .triton_step import launch_modal_step  # noqa: PLC0415 - triton loads lazily

            launch_modal_step(u, y, torch.view_as_real(self.S), torch.view_as_real(self.p),
                              torch.view_as_real(self.r), self.skip, m0, n, self._interpret)
            return
        ms = slice(m0, m0 + n)
        x = u.to(self.rdtype)
        S = self.S[ms]
        S.mul_(self.p[ms, None]).add_(x[..., None])
        y.copy_((self.r[ms, None] * S).real.sum(-1) + self.skip[ms, None] * x)

    # ---------------------------------------------------------------- position
    def tile_level(self) -> int:
        """No tiles: -1 at every position (the interface of `OnlineConv.tile_level`)."""
        if self._prompt_len is None:
            raise RuntimeError("ModalRecurrence: no prompt yet; call prefill first")
        return -1

    def run_tiles(self, level: int) -> None:
        """Nothing to run: the recurrence has no tiles (kept for `OnlineConv`'s interface)."""

    def capture_graphs(self) -> None:
        """Nothing to capture: the steps are position-independent launches."""

    def scratch_position(self):
        """Device work inside (graph warm-ups, captures) leaves no trace: the state is restored."""
        return self._restored(self.S, self.pos)

    def __repr__(self) -> str:
        return (f"ModalRecurrence(M={self.M}, C={self.C}, n={self.n}, B={self.B}, dtype={self.dtype}, "
                f"backend={self.backend}, position={self._position})")
