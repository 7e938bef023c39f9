"""The fused modal decode step, as one Triton kernel for any number of mixers.

    s[m, b, c, :] = p[m, c, :] * s[m, b, c, :] + u[m, b, c]
    y[m, b, c]    = Re(sum_n r[m, c, n] * s[m, b, c, n]) + skip[m, c] * u[m, b, c]

Complex values are interleaved (re, im) fp32 pairs (`torch.view_as_real` of complex64 tensors).
No argument depends on the position, so the launch replays under CUDA graphs as it is.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _modal_step_kernel(
    u_ptr, y_ptr, s_ptr, p_ptr, r_ptr, skip_ptr,
    m0, B, C, N,
    su_m, su_b, su_c, sy_m, sy_b, sy_c,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_m = tl.program_id(1)
    m = (m0 + i_m).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < B * C
    o_b = (o_r // C).to(tl.int64)
    o_c = (o_r % C).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_rn = m_r[:, None] & (o_n[None, :] < N)

    b_u = tl.load(u_ptr + i_m * su_m + o_b * su_b + o_c * su_c, mask=m_r, other=0.0).to(tl.float32)
    # (m, c, n) for poles / residues; (m, b, c, n) for the state; x2 for (re, im)
    o_pc = ((m * C + o_c)[:, None] * N + o_n[None, :]) * 2
    o_s = (((m * B + o_b) * C + o_c)[:, None] * N + o_n[None, :]) * 2
    b_pr = tl.load(p_ptr + o_pc, mask=m_rn, other=0.0)
    b_pi = tl.load(p_ptr + o_pc + 1, mask=m_rn, other=0.0)
    b_rr = tl.load(r_ptr + o_pc, mask=m_rn, other=0.0)
    b_ri = tl.load(r_ptr + o_pc + 1, mask=m_rn, other=0.0)
    b_sr = tl.load(s_ptr + o_s, mask=m_rn, other=0.0)
    b_si = tl.load(s_ptr + o_s + 1, mask=m_rn, other=0.0)

    b_nr = b_pr * b_sr - b_pi * b_si + b_u[:, None]
    b_ni = b_pr * b_si + b_pi * b_sr
    tl.store(s_ptr + o_s, b_nr, mask=m_rn)
    tl.store(s_ptr + o_s + 1, b_ni, mask=m_rn)

    b_skip = tl.load(skip_ptr + m * C + o_c, mask=m_r, other=0.0)
    b_y = tl.sum(b_rr * b_nr - b_ri * b_ni, axis=1) + b_skip * b_u
    tl.store(y_ptr + i_m * sy_m + o_b * sy_b + o_c * sy_c, b_y.to(y_ptr.dtype.element_ty), mask=m_r)


def step_blocks(n: int, interpret: bool) -> tuple[int, int]:
    block_n = max(1, triton.next_power_of_2(n))
    # On a GPU ~256 state elements per program: the step is latency-bound, and 4096 channels x 8
    # modes must spread over the SMs (4096 elements per program left 8 programs: 16 us on an H100).
    # The interpreter runs programs one by one and wants few.
    rows = (1 << 14 if interpret else 256) // block_n
    return max(1, rows), block_n


def launch_modal_step(u: Tensor, y: Tensor, s_ri: Tensor, p_ri: Tensor, r_ri: Tensor, skip: Tensor,
                      m0: int, n_mixers: int, interpret: bool) -> None:
    """u, y: (n_mixers, B, C) views (any strides); s_ri (M, B, C, n, 2) fp32; p_ri, r_ri (M, C, n, 2)
    fp32; skip (M, C) fp32. All but u and y contiguous."""
    _, B, C, N, _ = s_ri.shape
    block_r, block_n = step_blocks(N, interpret)
    grid = (triton.cdiv(B * C, block_r), n_mixers)
    _modal_step_kernel[grid](
        u, y, s_ri, p_ri, r_ri, skip,
        m0, B, C, N,
        u.stride(0), u.stride(1), u.stride(2), y.stride(0), y.stride(1), y.stride(2),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4,
    )
