"""One lazy decode step of n mixers as one Triton launch, and its plain-torch reference.

    X[m, b, d, t] = u[m, b, d]
    y[m, b, d]    = sum_{s <= t} h[m, d, t - s] * X[m, b, d, s]        (h zero beyond its K taps)

The lazy decoder's whole cost per token: O(t) reads of the history and of the filter. The
position t is read from a device scalar and the window W (a power of two, W >= t + 1) is a
constexpr, so one launch replays under a CUDA graph at every position of its window (the graphed
lazy baseline, runtime/lazy_graphed.py, captures one token graph per window).

Layout: the history rows X[m, b, d, :] and the filter rows h[m, d, :] are contiguous, so the
loop over the window streams both (X forwards, h backwards from lag t). A program holds a
channel of one mixer and every batch row (up to 8), so each filter chunk is read once for the
batch. The loop stops at t (a device value) within the window, so a step reads what the lazy sum
needs and no more. Memory-bound; fp32 accumulation; X and u in the state dtype (fp32 / bf16 /
fp16), h in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch_lazy_step", "lazy_step_blocks", "lazy_step_reference"]


def lazy_step_reference(u: Tensor, X: Tensor, h: Tensor, t: int, m0: int = 0) -> Tensor:
    """Plain torch: stores u (n, B, D) at X[m0 : m0+n, ..., t] and returns y (n, B, D) in the
    compute dtype of h. X (M, B, D, L), h (M, D, KH)."""
    ms = slice(m0, m0 + u.shape[0])
    if not 0 <= t < X.shape[-1]:
        raise ValueError(f"lazy_step_reference: position {t} outside the history of {X.shape[-1]}")
    X[ms, ..., t] = u.to(X.dtype)
    k = min(t + 1, h.shape[-1])
    # positions t-k+1 .. t pair with lags k-1 .. 0
    x = X[ms, ..., t + 1 - k : t + 1].to(h.dtype)
    return torch.einsum("mbds,mds->mbd", x, h[ms, :, :k].flip(-1))


@triton.jit
def _lazy_step_kernel(
    u_ptr, y_ptr, x_ptr, h_ptr, pos_ptr,
    m0, B, D, L, KH, n_bblocks,
    su_m, su_b, su_d, sy_m, sy_b, sy_d,
    W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i_mb = tl.program_id(0)
    i_d = tl.program_id(1)
    i_m = i_mb // n_bblocks
    m = (m0 + i_m).to(tl.int64)
    o_b = ((i_mb % n_bblocks) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)

    t = tl.load(pos_ptr)
    # a replay past max_len (a caller's bug) must not write outside X (vector-shaped: the
    # interpreter mistypes a scalar & vector mask)
    m_bd = ((o_b < B)[:, None] & (o_d < D)[None, :]) & ((o_d * 0 + t) < L)[None, :]
    row = (m * B + o_b[:, None]) * D + o_d[None, :]  # (BLOCK_B, BLOCK_D) rows of X
    p_x = x_ptr + row[:, :, None] * L
    p_h = h_ptr + ((m * D + o_d) * KH)[None, :, None]
    acc = tl.zeros((BLOCK_B, BLOCK_D, BLOCK_S), dtype=tl.float32)
    # Trips stop at t (a device value): masked trips past it were measured at ~45% of a real
    # one's time on an H200. W caps the loop: nothing past the window is read.
    for s0 in range(0, tl.minimum(t, W), BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)
        lag = t - o_s
        # s < t: X[t] is this step's input, added below from registers (no store-then-load race)
        m_s = (o_s < t) & (lag < KH)
        m_x = m_bd[:, :, None] & m_s[None, None, :]
        b_x = tl.load(p_x + o_s[None, None, :], mask=m_x, other=0.0).to(tl.float32)
        m_h = (o_d < D)[None, :, None] & m_s[None, None, :]
        b_h = tl.load(p_h + lag[None, None, :], mask=m_h, other=0.0)
        acc += b_x * b_h
    b_u = tl.load(u_ptr + i_m * su_m + o_b[:, None] * su_b + o_d[None, :] * su_d, mask=m_bd, other=0.0)
    b_h0 = tl.load(h_ptr + (m * D + o_d) * KH, mask=o_d < D, other=0.0)
    b_y = tl.sum(acc, axis=2) + b_h0[None, :] * b_u.to(tl.float32)
    tl.store(y_ptr + i_m * sy_m + o_b[:, None] * sy_b + o_d[None, :] * sy_d, b_y.to(y_ptr.dtype.element_ty),
             mask=m_bd)
    tl.store(x_ptr + row * L + t, b_u.to(x_ptr.dtype.element_ty), mask=m_bd)


def lazy_step_blocks(B: int, D: int, window: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, BLOCK_S). On a GPU one channel a program (D programs a mixer: the SMs
    fill even though the step program launches one mixer at a time) and chunks of up to 2K
    elements. Measured on an H200, M = 18, D = 864, fp32, t = 2^16: 3.7 TB/s at B = 1 (BLOCK_S
    1024; 2.6 TB/s with 4 channels a program), 3.7 TB/s at B = 8 (BLOCK_S 256). The interpreter
    runs programs one by one: few, large ones."""
    block_b = min(triton.next_power_of_2(B), 8)
    if interpret:
        block_d, block_s = min(triton.next_power_of_2(D), 128), (1 << 16) // (block_b * 128)
    else:
        block_d, block_s = 1, min(1024, 2048 // block_b)
    return block_b, block_d, max(16, min(triton.next_power_of_2(window), block_s))


def launch_lazy_step(u: Tensor, y: Tensor, X: Tensor, h: Tensor, pos: Tensor, m0: int, window: int,
                     interpret: bool) -> None:
    """u, y: (n, B, D) views (any strides) of mixers m0 .. m0+n-1; X (M, B, D, L) contiguous;
    h (M, D, KH) contiguous fp32; pos: the position t on the device (int64, pos[0]); window: a
    power of two >= t + 1 (positions past it are not summed)."""
    n, B, D = u.shape
    L, KH = X.shape[-1], h.shape[-1]
    if window < 1 or window & (window - 1):
        raise ValueError(f"launch_lazy_step: window must be a power of two, got {window}")
    block_b, block_d, block_s = lazy_step_blocks(B, D, window, interpret)
    n_bblocks = triton.cdiv(B, block_b)
    grid = (n * n_bblocks, triton.cdiv(D, block_d))
    _lazy_step_kernel[grid](
        u, y, X, h, pos,
        m0, B, D, L, KH, n_bblocks,
        u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), y.stride(2),
        W=window, BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4,
    )
