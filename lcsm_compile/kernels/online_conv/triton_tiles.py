"""Triton kernels for the tiles of one position, all mixers and channels in one launch.

A tile of size U at position t (t read from pos[1] on the device, see triton_step.py):

    A[r, (t+1+p) % R] += sum_{j<U} h[c(r), U + p - j] * X[r, (t+1-U+j) % R]      p < U, t+1+p < L

(X and A are the engine's rings of R slots, R a power of two >= U: the last R inputs and the
next R outputs; L is max_len.)

r runs over the rows (m, b, d) of X and A, c(r) = (m, d) over the filters. The matrix
T[p, j] = h[U + p - j] is Toeplitz, gathered from the filter (an L1-resident window of 2U taps).

- `_tile_fma_kernel`, U < 16: a block of channels per program, U^2 scalar FMAs per channel.
- `_tile_dot_kernel`, U >= 16: per channel, acc (batch x positions) += X_blk @ T^T with tl.dot
  (fp32 accumulation; tf32 inputs for half-precision state, exact fp32 for fp32 state).
- `_gather_kernel` / `_scatter_kernel`: the device-indexed halves of an FFT tile: copy
  X[..., t+1-U : t+1] into a zero-padded fp32 workspace of length 2U for torch.fft (U a runtime
  argument: one compile), and add z[..., U-1 : 2U-1] back into A's slots of t+1 .. t+U.

Every tile launch writes pos[0] = t + 1 (its program 0), so the next steps see the new position.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tile_fma_kernel(
    x_ptr, a_ptr, h_ptr, pos_ptr, MD, B, D, L, RA, KH,
    U: tl.constexpr, UP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_c = tl.program_id(0)
    o_c = (i_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m_c = o_c < MD
    o_m = o_c // D
    o_d = o_c % D
    t = tl.load(pos_ptr + 1)
    tl.store(pos_ptr, t + 1, mask=i_c == 0)
    src = t + 1 - U
    dst = t + 1
    o_p = tl.arange(0, UP)
    m_p = (o_p < U) & (dst + o_p < L)
    m_c = m_c & (o_c * 0 + t < L)  # never read past the history (a replay past max_len)
    for b in range(B):
        row = (o_m * B + b) * D + o_d
        acc = tl.zeros((BLOCK_C, UP), dtype=tl.float32)
        for j in tl.static_range(U):
            b_x = tl.load(x_ptr + row * RA + ((src + j) & (RA - 1)), mask=m_c, other=0.0).to(tl.float32)
            lag = U + o_p - j
            m_h = m_c[:, None] & ((lag < KH) & (o_p < U))[None, :]
            b_h = tl.load(h_ptr + o_c[:, None] * KH + lag[None, :], mask=m_h, other=0.0)
            acc += b_x[:, None] * b_h
        p_a = a_ptr + row[:, None] * RA + ((dst + o_p) & (RA - 1))[None, :]
        m_a = m_c[:, None] & m_p[None, :]
        tl.store(p_a, tl.load(p_a, mask=m_a, other=0.0) + acc, mask=m_a)


@triton.jit
def _tile_dot_kernel(
    x_ptr, a_ptr, h_ptr, pos_ptr, MD, B, D, L, RA, KH,
    U: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr, BB: tl.constexpr,
    CPP: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_p = tl.program_id(1)
    t = tl.load(pos_ptr + 1)
    tl.store(pos_ptr, t + 1, mask=(i_c == 0) & (i_p == 0))
    src = t + 1 - U
    dst = t + 1
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = dst + o_p < L
    for k in tl.static_range(CPP):  # unrolled: the channels' loads can be in flight together
        c = i_c.to(tl.int64) * CPP + k
        if c < MD:
            m = c // D
            d = c % D
            for b0 in range(0, B, BB):
                o_b = b0 + tl.arange(0, BB)
                m_b = (o_b < B) & (o_b * 0 + t < L)
                row = (m * B + o_b) * D + d
                acc = tl.zeros((BB, BP), dtype=tl.float32)
                for j0 in range(0, U, BJ):
                    o_j = j0 + tl.arange(0, BJ)
                    lag = U + o_p[None, :] - o_j[:, None]
                    b_t = tl.load(h_ptr + c * KH + lag, mask=lag < KH, other=0.0)
                    b_x = tl.load(x_ptr + row[:, None] * RA + ((src + o_j) & (RA - 1))[None, :],
                                  mask=m_b[:, None], other=0.0)
                    acc += tl.dot(b_x.to(tl.float32), b_t, input_precision=PRECISION)
                p_a = a_ptr + row[:, None] * RA + ((dst + o_p) & (RA - 1))[None, :]
                m_a = m_b[:, None] & m_p[None, :]
                tl.store(p_a, tl.load(p_a, mask=m_a, other=0.0) + acc, mask=m_a)


@triton.jit
def _gather_kernel(x_ptr, w_ptr, pos_ptr, R, L, RA, U, BR: tl.constexpr, BJ: tl.constexpr):
    i_r = tl.program_id(0)
    i_j = tl.program_id(1)
    t = tl.load(pos_ptr + 1)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_r = o_r < R
    m_x = m_r[:, None] & ((o_j < U) & (t + 1 - U + o_j < L))[None, :]
    b_x = tl.load(x_ptr + o_r[:, None] * RA + ((t + 1 - U + o_j) & (RA - 1))[None, :], mask=m_x, other=0.0)
    tl.store(w_ptr + o_r[:, None] * (2 * U) + o_j[None, :], b_x.to(tl.float32), mask=m_r[:, None])


@triton.jit
def _scatter_kernel(z_ptr, a_ptr, pos_ptr, R, L, RA, U, BR: tl.constexpr, BJ: tl.constexpr):
    i_r = tl.program_id(0)
    i_j = tl.program_id(1)
    t = tl.load(pos_ptr + 1)
    tl.store(pos_ptr, t + 1, mask=(i_r == 0) & (i_j == 0))
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_p = i_j * BJ + tl.arange(0, BJ)
    m_a = (o_r < R)[:, None] & ((o_p < U) & (t + 1 + o_p < L))[None, :]
    b_z = tl.load(z_ptr + o_r[:, None] * (2 * U) + (U - 1) + o_p[None, :], mask=m_a, other=0.0)
    p_a = a_ptr + o_r[:, None] * RA + ((t + 1 + o_p) & (RA - 1))[None, :]
    tl.store(p_a, tl.load(p_a, mask=m_a, other=0.0) + b_z, mask=m_a)


def launch_direct_tile(X: Tensor, A: Tensor, h: Tensor, pos: Tensor, U: int, max_len: int, dot_min: int,
                       interpret: bool) -> None:
    """All mixers' direct tile of size U. X (M, B, D, R), A (M, B, D, R) fp32, h (M, D, KH) fp32."""
    M, B, D, RA = X.shape
    L = max_len
    MD, KH = M * D, h.shape[-1]
    if U < dot_min or U < 16:
        block_c = 4096 if interpret else 128
        _tile_fma_kernel[(triton.cdiv(MD, block_c),)](
            X, A, h, pos, MD, B, D, L, RA, KH,
            U=U, UP=max(U, 2), BLOCK_C=block_c, num_warps=4,
        )
        return
    bp = bj = min(U, 64)
    cpp = 4 if U <= 32 and not interpret else 1
    precision = "ieee" if X.dtype.itemsize == 4 else "tf32"
    grid = (triton.cdiv(MD, cpp), triton.cdiv(U, bp))
    _tile_dot_kernel[grid](
        X, A, h, pos, MD, B, D, L, RA, KH,
        U=U, BP=bp, BJ=bj, BB=16, CPP=cpp, PRECISION=precision, num_warps=4,
    )


def _row_block(R: int, U: int, interpret: bool) -> tuple[int, int, tuple[int, int]]:
    bj = min(2 * U, 4096 if interpret else 256)
    br = max(1, (1 << 16 if interpret else 4096) // bj)
    return br, bj, (triton.cdiv(R, br), triton.cdiv(2 * U, bj))


def launch_gather(x_rows: Tensor, w: Tensor, pos: Tensor, U: int, max_len: int, interpret: bool) -> None:
    """w[r, :U] = the inputs t+1-U .. t of ring row r, w[r, U:] = 0. x_rows: contiguous ring rows
    (..., RA)."""
    RA = x_rows.shape[-1]
    R = x_rows.numel() // RA
    br, bj, grid = _row_block(R, U, interpret)
    _gather_kernel[grid](x_rows, w, pos, R, max_len, RA, U, BR=br, BJ=bj, num_warps=4)


def launch_scatter(z: Tensor, a_rows: Tensor, pos: Tensor, U: int, max_len: int, interpret: bool) -> None:
    """a_rows[r, (t+1+p) % RA] += z[r, U-1+p], p < U, t+1+p < max_len; z: contiguous (..., 2U)
    fp32; a_rows: contiguous ring rows (..., RA)."""
    RA = a_rows.shape[-1]
    R = a_rows.numel() // RA
    br, bj, grid = _row_block(R, U, interpret)
    grid = (grid[0], triton.cdiv(U, bj))
    _scatter_kernel[grid](z, a_rows, pos, R, max_len, RA, U, BR=br, BJ=bj, num_warps=4)
