"""The FFT halves of the engine: filter spectra per level, large tiles, the prompt's contribution.

Large tiles run as `irfft(rfft(block, 2U) * G_U)` with G_U = rfft(h[1:2U], 2U) cached per level;
the circular wrap of a size-2U transform only lands on outputs the tile does not keep
(DESIGN.md §2). Work is cut into row chunks (a few mixers, or a few batch rows of one mixer)
so the transient buffers stay under `work_bytes` whatever M, B, D and U are.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from ...ops import fft_size


def complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def level_spectrum(h: Tensor, U: int, work_bytes: int) -> Tensor:
    """G_U = rfft(h[..., 1:2U], 2U): (M, D, U + 1) complex, zero taps past the filter's end."""
    M, D, KH = h.shape
    G = torch.zeros(M, D, U + 1, dtype=complex_dtype(h.dtype), device=h.device)
    if KH <= 1:
        return G
    step = max(1, work_bytes // max(1, D * 2 * U * 8 * 3))
    for m0 in range(0, M, step):
        G[m0 : m0 + step] = torch.fft.rfft(h[m0 : m0 + step, :, 1 : 2 * U], n=2 * U)
    return G


def row_chunks(M: int, B: int, D: int, U: int, itemsize: int, work_bytes: int) -> Iterator[tuple]:
    """(mixer index, batch index) pairs that cut (M, B, D) rows into pieces of bounded work."""
    rows = max(1, work_bytes // (2 * U * itemsize * 3))
    if B * D <= rows:
        step = rows // (B * D)
        for m0 in range(0, M, step):
            yield slice(m0, m0 + step), slice(None)
    else:
        step = max(1, rows // D)
        for m in range(M):
            for b0 in range(0, B, step):
                yield m, slice(b0, b0 + step)


def _spectrum_rows(G: Tensor, mi) -> Tensor:
    # G (M, D, U+1) against rows (m, B, D) [mi a slice] or (b, D) [mi an int].
    return G[mi][:, None] if isinstance(mi, slice) else G[mi]


def fft_tile(X: Tensor, A: Tensor, G: Tensor, U: int, work_bytes: int,
             load: Callable[[Tensor], Tensor], store: Callable[[Tensor, Tensor], None]) -> None:
    """One tile of size U for all mixers. `load(x_rows)` returns the block, zero-padded to 2U in
    the compute dtype; `store(z, a_rows)` adds z[..., U-1 : 2U-1] into the accumulators.
    Host-indexed (torch path) or device-indexed (Triton gather/scatter) by the caller."""
    M, B, D, _ = X.shape
    itemsize = A.element_size()
    for mi, bi in row_chunks(M, B, D, U, itemsize, work_bytes):
        w = load(X[mi, bi])
        f = torch.fft.rfft(w)
        f.mul_(_spectrum_rows(G, mi))
        store(torch.fft.irfft(f, n=2 * U), A[mi, bi])


def prompt_convolution(u: Tensor, h: Tensor, max_len: int, work_bytes: int) -> Tensor:
    """The prompt u (B, D, P) convolved with h (D, KH) over all positions [0, max_len):
    outputs [0, P) are the prefill's y, [P, max_len) the prompt's contribution to the future."""
    B, D, P = u.shape
    KH = h.shape[-1]
    n = fft_size(max(max_len, P + KH - 1))
    out = torch.empty(B, D, max_len, dtype=h.dtype, device=h.device)
    step = max(1, work_bytes // max(1, B * n * 8 * 3))
    for d0 in range(0, D, step):
        ds = slice(d0, d0 + step)
        U = torch.fft.rfft(u[:, ds].to(h.dtype), n=n)
        U.mul_(torch.fft.rfft(h[ds], n=n))
        out[:, ds] = torch.fft.irfft(U, n=n)[..., :max_len]
    return out
