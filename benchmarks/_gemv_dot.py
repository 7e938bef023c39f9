"""A candidate for the decode products of 2-8 rows: kernels/gemv.py's loading order with the sum
as a `tl.dot` instead of one cross-thread reduction per row of x.

kernels/gemv.py reduces its (ROWS, BLOCK_K) weight tile once per row of x: at M = 8 that is eight
reductions across warps per tile, and on an H200 its products read weights at ~1 TB/s
(decode_gemv_h200_m8.json). Here the rows of x are padded to 16 and the tile's sum is
x (16, BLOCK_K) @ w^T (BLOCK_K, ROWS) with `input_precision="ieee"` (exact fp32 products: TF32
would cost the decoder its 1e-5 agreement with eager), accumulated over K in BLOCK_K chunks,
the first chunk loaded before the PDL wait as in kernels/gemv.py. tl.dot wants ROWS >= 16, so a
product has N / 16 programs (54 for Hyena-153M's 864 outputs), fewer than kernels/gemv.py's.
benchmarks/decode_gemv.py times it beside the kernel it would replace; it moves into
kernels/gemv.py only if it wins there.

Named with a leading underscore: `lcsm-compile bench` lists benchmarks/*.py except helpers like this one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_ROWS = 16  # tl.dot's smallest M and N


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, sxk, swk, swn, sym, syn,
                     HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    o_m = tl.arange(0, 16)
    o_n = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    # (BLOCK_K, ROWS): w as mm sees it, (K, N)
    w = tl.load(w_ptr + o_k[:, None] * swk + o_n[None, :] * swn, mask=(o_k < K)[:, None] & m_n[None, :], other=0.0)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((16, ROWS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if k0 > 0:
            w = tl.load(w_ptr + (k0 + o_k)[:, None] * swk + o_n[None, :] * swn,
                        mask=(k0 + o_k < K)[:, None] & m_n[None, :], other=0.0)
        x = tl.load(x_ptr + o_m[:, None] * sxm + (k0 + o_k)[None, :] * sxk,
                    mask=(o_m < M)[:, None] & (k0 + o_k < K)[None, :], other=0.0)
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o_m[:, None] * sym + o_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(o_m < M)[:, None] & m_n[None, :])


def gemv_dot(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 16,
             block_k: int = 128, warps: int = 4, pdl: bool = False) -> torch.Tensor:
    """y = x @ w (+ bias), x (M <= 16, K), w (K, N), fp32 accumulation; as kernels/gemv.gemv."""
    M, K = x.shape
    N = w.shape[1]
    if M > 16 or rows < MIN_ROWS or w.shape[0] != K:
        raise ValueError(f"gemv_dot: x {tuple(x.shape)}, w {tuple(w.shape)}, rows {rows}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_dot_kernel[(triton.cdiv(N, rows),)](
        x, w, bias if bias is not None else x, y, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ROWS=rows, BLOCK_K=block_k, USE_GDC=pdl, num_warps=warps,
        **({"launch_pdl": True} if pdl else {}))
    return y
