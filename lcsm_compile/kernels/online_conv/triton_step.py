"""The fused decode step, as one Triton kernel, and the device-side position counter.

    y[m, b, d] = A[m, b, d, t % R] + h[m, d, 0] * u[m, b, d]      X[m, b, d, t % R] = u[m, b, d]
    A[m, b, d, t % R] = 0

X and A are rings of R slots (engine docstring): X the last R inputs, A the next R outputs; the
A slot just read is cleared for position t + R, which only tiles after this step write.

The position lives on the device (engine docstring: the int64 slots `pos`): the step reads
t = pos[0] and copies it to pos[1], which the tiles read; the tiles write pos[0] = t + 1. No
launch reads a slot that the same launch writes, so there is no race, and no argument of any
launch depends on t: the step and the tiles replay under CUDA graphs.

With FUSE_LEVEL0, the step also runs this position's level-0 tile when there is one
(i = t + 1 odd; the schedule counts from 0): A[(t+1) % R] += h[1] * u. It depends on this mixer's
own u only, costs two loads and a store in the same launch, and saves a launch on every other
token.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _online_step_kernel(
    u_ptr, y_ptr, x_ptr, a_ptr, h_ptr, pos_ptr,
    m0, B, D, L, RA, KH,
    su_m, su_b, su_d, sy_m, sy_b, sy_d,
    FUSE_LEVEL0: tl.constexpr, BLOCK: tl.constexpr,
):
    # RA: the rings' length (X and A), a power of two; L: max_len
    # FUSE_LEVEL0 is only set when the filter has a tap h[1] (KH > 1).
    i_n = tl.program_id(0)
    i_m = tl.program_id(1)
    m = (m0 + i_m).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    o_b = (o_n // D).to(tl.int64)
    o_d = (o_n % D).to(tl.int64)

    t = tl.load(pos_ptr)
    tl.store(pos_ptr + 1, t, mask=(i_n == 0) & (i_m == 0))
    # a replay past max_len (a caller's bug) must not write outside X and A
    m_n = (o_n < B * D) & (o_n * 0 + t < L)

    b_u = tl.load(u_ptr + i_m * su_m + o_b * su_b + o_d * su_d, mask=m_n, other=0.0)
    p_h = h_ptr + (m * D + o_d) * KH
    b_h0 = tl.load(p_h, mask=m_n, other=0.0)
    a_row = a_ptr + ((m * B + o_b) * D + o_d) * RA
    p_a = a_row + (t & (RA - 1))
    b_y = tl.load(p_a, mask=m_n, other=0.0) + b_h0 * b_u.to(tl.float32)
    tl.store(p_a, tl.zeros_like(b_y), mask=m_n)
    tl.store(y_ptr + i_m * sy_m + o_b * sy_b + o_d * sy_d, b_y.to(y_ptr.dtype.element_ty), mask=m_n)
    tl.store(x_ptr + ((m * B + o_b) * D + o_d) * RA + (t & (RA - 1)), b_u.to(x_ptr.dtype.element_ty), mask=m_n)

    if FUSE_LEVEL0:
        # i = t + 1 odd (the schedule counts from 0), and t + 1 inside the sequence (kept
        # vector-shaped: the interpreter mistypes a scalar & vector mask)
        i_v = o_n * 0 + (t + 1)
        m_1 = m_n & ((i_v % 2) == 1) & (i_v < L)
        b_h1 = tl.load(p_h + 1, mask=m_1, other=0.0)
        p_a1 = a_row + ((t + 1) & (RA - 1))
        b_a1 = tl.load(p_a1, mask=m_1, other=0.0)
        tl.store(p_a1, b_a1 + b_h1 * b_u.to(tl.float32), mask=m_1)


@triton.jit
def _advance_position_kernel(pos_ptr):
    tl.store(pos_ptr, tl.load(pos_ptr + 1) + 1)


def step_block(interpret: bool) -> int:
    # The interpreter runs programs one by one: few large ones. On a GPU: enough programs to
    # spread the (latency-bound) strided loads of A over the SMs.
    return 1024 if interpret else 256


def launch_step(u: Tensor, y: Tensor, X: Tensor, A: Tensor, h: Tensor, pos: Tensor, max_len: int,
                m0: int, n_mixers: int, fuse_level0: bool, interpret: bool) -> None:
    """u, y: (n_mixers, B, D) views (any strides); X (M, B, D, R) in the state dtype and A (M, B,
    D, R) fp32, R a power of two; h (M, D, KH)."""
    _, B, D, _ = X.shape
    block = step_block(interpret)
    grid = (triton.cdiv(B * D, block), n_mixers)
    _online_step_kernel[grid](
        u, y, X, A, h, pos,
        m0, B, D, max_len, A.shape[-1], h.shape[-1],
        u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), y.stride(2),
        FUSE_LEVEL0=fuse_level0 and h.shape[-1] > 1, BLOCK=block, num_warps=4,
    )


def launch_advance_position(pos: Tensor) -> None:
    _advance_position_kernel[(1,)](pos, num_warps=1)
