"""Plain-torch references for modal (diagonal) filters and their exact recurrence.

A modal filter of C channels with n modes each:

    h[c, t] = Re(sum_n r[c, n] * p[c, n]^t) + skip[c] * [t == 0]

is the impulse response of the diagonal recurrence with complex state s (C, n):

    s_t = p * s_{t-1} + u_t          y_t = Re(sum_n r * s_t) + skip * u_t

so y = h (*) u exactly, at O(n) per step instead of a sum over the history.

- `modal_impulse_response`: h from (p, r, skip), in chunks so C * n * L never sits in memory;
- `modal_state`: the state after a prompt, s = sum_k p^(P-1-k) u_k, as chunked Vandermonde
  products (one matrix per chunk size, reused for every full chunk);
- `modal_prompt_output`: the prompt's outputs as one FFT convolution with h[:P];
- `ReferenceModalRecurrence`: the recurrence one step at a time in fp64, the engine's interface.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...ops import fft_size

__all__ = [
    "ReferenceModalRecurrence",
    "complex_of",
    "modal_impulse_response",
    "modal_prompt_output",
    "modal_state",
]


def complex_of(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def _rows(total: int, per_row: int, work_bytes: int) -> int:
    return max(1, min(total, work_bytes // max(1, per_row)))


def modal_impulse_response(poles: Tensor, residues: Tensor, skip: Tensor | None, length: int,
                           dtype: torch.dtype = torch.float64, work_bytes: int = 1 << 28) -> Tensor:
    """h (..., length) of the modal filter (poles, residues (..., n), skip (...)), computed in fp64
    as exp(t log p) and cast to `dtype`."""
    p = poles.to(torch.complex128)
    r = residues.to(torch.complex128)
    lead, n = p.shape[:-1], p.shape[-1]
    p, r = p.reshape(-1, n), r.reshape(-1, n)
    C = p.shape[0]
    h = torch.empty(C, length, dtype=dtype, device=p.device)
    t = torch.arange(length, device=p.device, dtype=torch.float64)
    log_p = torch.log(p)
    # A zero pole (padding) has log -inf: its powers are [1, 0, 0, ...] (0^0 = 1).
    zero = p == 0
    step = _rows(C, n * length * 16 * 3, work_bytes)
    for c0 in range(0, C, step):
        lp = log_p[c0 : c0 + step]
        z = torch.where(zero[c0 : c0 + step, :, None], torch.zeros((), dtype=lp.dtype, device=lp.device),
                        lp[..., None] * t)
        pw = torch.exp(z)
        pw = torch.where(zero[c0 : c0 + step, :, None] & (t > 0), torch.zeros_like(pw), pw)
        h[c0 : c0 + step] = torch.einsum("cn,cnt->ct", r[c0 : c0 + step], pw).real.to(dtype)
    if skip is not None:
        h[:, 0] += skip.reshape(-1).to(device=h.device, dtype=torch.float64).to(dtype)
    return h.reshape(*lead, length)


def _powers(poles: Tensor, exponents: Tensor) -> Tensor:
    """poles^e for integer exponents e >= 0 (fp64 exp of e log p; 0^0 = 1): (C, n, E) complex128."""
    p = poles.to(torch.complex128)
    e = exponents.to(device=p.device, dtype=torch.float64)
    zero = (p == 0)[..., None]
    pw = torch.exp(torch.where(zero, torch.zeros((), dtype=p.dtype, device=p.device), torch.log(p)[..., None] * e))
    return torch.where(zero & (e > 0), torch.zeros_like(pw), pw)


def modal_state(u: Tensor, poles: Tensor, state: Tensor | None = None, work_bytes: int = 1 << 28) -> Tensor:
    """The state after the prompt u (B, C, P): s = p^P s0 + sum_k p^(P-1-k) u_k, (B, C, n) complex.

    The prompt is cut into chunks of T positions; W[c, j, n] = p^(T-1-j) is built once (in fp64,
    cast to the state dtype) and each chunk is one batched product, s = p^T s + u_chunk @ W."""
    B, C, P = u.shape
    n = poles.shape[-1]
    cdtype = complex_of(torch.float64 if u.dtype == torch.float64 else torch.float32)
    s = torch.zeros(B, C, n, dtype=cdtype, device=u.device) if state is None else state.to(cdtype).clone()
    if P == 0:
        return s
    T = 1 << max(0, min(12, (work_bytes // max(1, C * n * 16 * max(B, 2))).bit_length() - 1))
    T = min(T, 1 << (P - 1).bit_length())
    real = torch.float64 if cdtype == torch.complex128 else torch.float32
    uc = u.to(real)
    full_W = _powers(poles, torch.arange(T - 1, -1, -1)).to(cdtype)  # (C, n, T)
    pT = _powers(poles, torch.tensor([T]))[..., 0].to(cdtype)  # (C, n)
    for a in range(0, P, T):
        chunk = uc[..., a : a + T].to(cdtype)  # (B, C, T)
        k = chunk.shape[-1]
        if k == T:
            W, pk = full_W, pT
        else:
            W = _powers(poles, torch.arange(k - 1, -1, -1)).to(cdtype)
            pk = _powers(poles, torch.tensor([k]))[..., 0].to(cdtype)
        s = s * pk + torch.einsum("bct,cnt->bcn", chunk, W)
    return s


def modal_prompt_output(u: Tensor, h: Tensor) -> Tensor:
    """y = h (*) u for the prompt u (B, C, P), h (C, >= P): one FFT convolution in fp32 (fp64 for
    fp64 inputs), cast to u's dtype."""
    P = u.shape[-1]
    if P == 0:
        return u.clone()
    real = torch.float64 if u.dtype == torch.float64 else torch.float32
    N = fft_size(2 * P - 1)
    U = torch.fft.rfft(u.to(real), n=N)
    H = torch.fft.rfft(h[..., :P].to(device=u.device, dtype=real), n=N)
    return torch.fft.irfft(U * H, n=N)[..., :P].to(u.dtype)


class ReferenceModalRecurrence:
    """The recurrence one step at a time, state in complex128: for tests, not for speed.

    Same interface as the engine (`ModalRecurrence`): prefill(m, u), step(m, u_t), advance()."""

    def __init__(self, poles: Tensor, residues: Tensor, skip: Tensor, batch: int, dtype: torch.dtype | None = None):
        if poles.dim() == 2:
            poles, residues, skip = poles[None], residues[None], skip[None]
        self.p = poles.to(torch.complex128)
        self.r = residues.to(torch.complex128)
        self.skip = skip.to(torch.float64)
        self.M, self.C, self.n = self.p.shape
        self.B = batch
        self.dtype = dtype or torch.float32
        self.s = torch.zeros(self.M, batch, self.C, self.n, dtype=torch.complex128, device=self.p.device)
        self.position = 0

    def prefill(self, m: int, u: Tensor) -> Tensor:
        y = []
        for t in range(u.shape[-1]):
            y.append(self._step(m, u[..., t]))
        self.position = u.shape[-1]
        return torch.stack(y, -1).to(self.dtype) if y else u.clone()

    def _step(self, m: int, u_t: Tensor) -> Tensor:
        x = u_t.to(torch.float64)
        self.s[m] = self.p[m] * self.s[m] + x[..., None]
        return (self.r[m] * self.s[m]).real.sum(-1) + self.skip[m] * x

    def step(self, m: int, u_t: Tensor) -> Tensor:
        return self._step(m, u_t).to(self.dtype)

    def advance(self) -> None:
        self.position += 1
