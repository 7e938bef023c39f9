"""Matrix-vector products for decode steps: y = x @ w (+ b) with a few rows of x, in Triton.

    y[m, n] = sum_k x[m, k] w[k, n] (+ b[n])        M <= 8 rows, fp32 accumulation

At one position per sequence every projection of a decode step is bound by reading its weight
once. cuBLAS's fp32 GEMV read Hyena-153M's 3-9 MB weights at about a third of an H200's
bandwidth, and inductor's fused reductions (passes/decode_gemv.py) at 0.9-1.7 TB/s
(benchmarks/step_profile.py, 2026-12-01). This kernel is the hand-written candidate: a program
owns BLOCK_N outputs, streams their weight rows along K (contiguous for a transposed nn.Linear
weight, the layout `mm` sees) and keeps a (BLOCK_M, BLOCK_N, BLOCK_K) product reduced once per
chunk. `benchmarks/decode_gemv.py` holds it against cuBLAS and inductor's reduction on the
model's shapes: on an H200 (2026-12-01, fp32, one row) the reduction was 1.2-1.5x faster even
than this kernel's best swept blocks, so the decode path uses it (as the custom op `lcsm::gemv`)
only when asked, `options={"decode_gemv_kernel": "triton"}`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gemv", "gemv_blocks", "gemv_op", "gemv_reference", "MAX_ROWS"]

MAX_ROWS = 8


def gemv_reference(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain torch, in fp64 for fp32/fp64 and fp32 for half inputs, cast to x's dtype."""
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(acc) @ w.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    sxm, sxk, swk, swn, sym, syn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    o_m = tl.arange(0, BLOCK_M)
    o_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_m, m_n = o_m < M, o_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(x_ptr + o_m[:, None] * sxm + o_k[None, :] * sxk, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_n[:, None] * swn + o_k[None, :] * swk, mask=m_n[:, None] & m_k[None, :], other=0.0)
        acc += tl.sum(b_x.to(tl.float32)[:, None, :] * b_w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o_m[:, None] * sym + o_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def gemv_blocks(M: int, N: int, K: int, interpret: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). On a GPU: enough programs for two or more waves
    of an H100/H200 (132 SMs) so every SM has weight loads in flight, K in 256-wide chunks.
    The interpreter runs programs one by one: few, large ones."""
    block_m = triton.next_power_of_2(max(M, 1))
    if interpret:
        return block_m, min(triton.next_power_of_2(N), 64), min(triton.next_power_of_2(K), 512), 4
    block_n = 4
    while block_n < 64 and triton.cdiv(N, block_n * 2) >= 264:
        block_n *= 2
    return block_m, block_n, min(triton.next_power_of_2(K), 256), 4


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, *, blocks: tuple[int, int, int, int] | None = None,
         out: Tensor | None = None) -> Tensor:
    """y = x @ w (+ bias) for x (M, K) with M <= MAX_ROWS, w (K, N) (any strides; fastest with
    w.stride(0) == 1, a transposed nn.Linear weight), bias (N,). y has x's dtype."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemv: want x (M, K) and w (K, N), got {tuple(x.shape)} and {tuple(w.shape)}")
    M, K = x.shape
    N = w.shape[1]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv: {M} rows; the kernel takes 1 to {MAX_ROWS} (use a matmul)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"gemv: bias must be ({N},), got {tuple(bias.shape)}")
    if x.device != w.device or (bias is not None and bias.device != x.device):
        raise ValueError("gemv: x, w and bias must be on one device")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    block_m, block_n, block_k, warps = blocks or gemv_blocks(M, N, K, interpret=not x.is_cuda)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, w, bias if bias is not None else x, y, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y


@torch.library.custom_op("lcsm::gemv", mutates_args=())
def gemv_op(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """`gemv` as one graph node for inductor-compiled decode segments (an extern call there).
    CUDA: the Triton kernel; elsewhere the same sum in torch (fp32 accumulation)."""
    if x.is_cuda:
        return gemv(x, w, bias)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ w.to(acc)
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)


@gemv_op.register_fake
def _(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "lcsm::gemv: x (M, K) and w (K, N)")
    return x.new_empty(x.shape[0], w.shape[1])
