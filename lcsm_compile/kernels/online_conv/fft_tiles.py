"""The FFT halves of the engine: filter spectra per level, large tiles, the prompt's contribution.

Large tiles run as `irfft(rfft(block, 2U) * G_U)` with G_U = rfft(h[1:2U], 2U) cached per level;
the circular wrap of a size-2U transform only lands on outputs the tile does not keep
(DESIGN.md §2). Work is cut into row chunks (a few mixers, or a few batch rows of one mixer)
so the transient buffers stay under `work_bytes` whatever M, B, D and U are.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ...ops import fft_size


def complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def level_spectrum(h: Tensor, U: int, work_bytes: int) -> Tensor:
    """G_U = rfft(h[..., 1:2U], 2U): (M, D, U + 1) complex, zero taps past the filter's end."""
    M, D, KH = h.shape
    G = torch.empty(M, D, U + 1, dtype=complex_dtype(h.dtype), device=h.device)
    step = max(1, work_bytes // max(1, D * 2 * U * 8 * 3))
    for m0 in range(0, M, step):
        G[m0 : m0 + step] = rows_spectrum(h[m0 : m0 + step], U)
    return G


def rows_spectrum(h: Tensor, U: int) -> Tensor:
    """rfft(h[..., 1:2U], 2U) for any leading shape; all zeros for a one-tap filter."""
    if h.shape[-1] <= 1:
        return torch.zeros(h.shape[:-1] + (U + 1,), dtype=complex_dtype(h.dtype), device=h.device)
    return torch.fft.rfft(h[..., 1 : 2 * U], n=2 * U)


def cached_level(U: int, max_len: int, direct_max: int) -> bool:
    """Whether the spectrum of tiles of size U is kept. Tiles with 4U > max_len run at most
    twice in a whole generation: their spectra are computed when they run, which keeps
    state + spectra under 3 * M * D * max_len elements for any max_len (B = 1)."""
    return direct_max < U and 4 * U <= max_len


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


def fft_tile(X: Tensor, A: Tensor, spectrum: Callable[[object], Tensor], U: int, work_bytes: int,
             load: Callable[[Tensor], Tensor], store: Callable[[Tensor, Tensor], None]) -> None:
    """One tile of size U for all mixers. `spectrum(mi)` gives G_U for mixers mi (an int or a
    slice); `load(x_rows)` returns the block, zero-padded to 2U in the compute dtype;
    `store(z, a_rows)` adds z[..., U-1 : 2U-1] into the accumulators. Host-indexed (torch path)
    or device-indexed (Triton gather/scatter) by the caller."""
    M, B, D, _ = X.shape
    itemsize = A.element_size()
    for mi, bi in row_chunks(M, B, D, U, itemsize, work_bytes):
        w = load(X[mi, bi])
        f = torch.fft.rfft(w)
        G = spectrum(mi)
        f.mul_(G[:, None] if isinstance(mi, slice) else G)  # rows (m, b, D) or (b, D)
        store(torch.fft.irfft(f, n=2 * U), A[mi, bi])


def prompt_convolution(u: Tensor, h: Tensor, max_len: int, work_bytes: int) -> Tensor:
    """u (B, D, P) convolved with h (D, KH), outputs [0, max_len) in h's dtype (the prefill's y at
    max_len = P); channels in chunks of about work_bytes."""
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
