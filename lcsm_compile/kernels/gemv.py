"""Matrix-vector products for decode steps: y = x @ w (+ b) with a few rows of x, in Triton.

    y[m, n] = sum_k x[m, k] w[k, n] (+ b[n])        M <= 8 rows, fp32 accumulation (fp64 for fp64)

At one position per sequence every projection of a decode step is bound by reading its weight
once, and a step is a chain of such products, each waiting for the last. A program owns ROWS
outputs and loads their weight rows (contiguous along K for a transposed nn.Linear weight, the
layout `mm` sees), a whole row where it fits (BLOCK_K = K), *before* it waits for the previous
kernel: launched with programmatic dependent launch (`pdl`, Hopper), its weight reads overlap
the predecessor's tail; then it reads the M vectors and reduces one row of x at a time (each
weight element is read from memory once for all M rows).

H200, 2026-12-01: inductor's fused reductions (passes/decode_gemv.py, the B = 1 default) beat
cuBLAS 1.3-2x at one row, and a chain of Hyena-153M's 72 products with this kernel's loading
order under PDL took 168 µs against inductor's 216 (benchmarks/decode_chain.py), but at B = 1
the reductions keep the step's layer norms inside them and stay the default. At 2-8 rows this
kernel replaces cuBLAS's small-M matmuls (`decode_gemv_triton_rows`): 1.4-2.7x faster per
product at M = 8, a B = 8 token 1316.5 -> 821.4 µs (benchmarks/decode_gemv.py, step_profile.py).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gemv", "gemv_blocks", "gemv_op", "gemv_reference", "MAX_ROWS", "pdl_supported"]

MAX_ROWS = 8
_PER_THREAD = 64  # weight values a thread holds at one row of x (a tile is ROWS x BLOCK_K over 32 x warps threads)
_SMS = 132  # H100 / H200


def gemv_reference(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain torch, in fp64 for fp32/fp64 and fp32 for half inputs, cast to x's dtype."""
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    y = x.to(acc) @ w.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA on sm90 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@triton.jit
def _rows_times_tile(acc, x_ptr, sxm, sxk, o_k, K, w, M, BLOCK_M: tl.constexpr):
    # acc[m, :] += w @ x[m, o_k] for every row m of x; w is (ROWS, BLOCK_K) in acc's dtype
    o_m = tl.arange(0, BLOCK_M)
    m_k = o_k < K
    for m in tl.static_range(BLOCK_M):
        x_m = tl.load(x_ptr + m * sxm + o_k * sxk, mask=m_k & (o_k * 0 + m < M), other=0.0).to(acc.dtype)
        part = tl.sum(w * x_m[None, :], axis=1)
        acc = tl.where(o_m[:, None] == m, acc + part[None, :], acc)
    return acc


@triton.jit
def _weight_tile(w_ptr, o_n, m_n, o_k, K, swn, swk):
    # rows o_n of the (N, K)-indexed weight, columns o_k, zeros outside
    return tl.load(w_ptr + o_n[:, None] * swn + o_k[None, :] * swk, mask=m_n[:, None] & (o_k < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    sxm, sxk, swk, swn, sym, syn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr, FP64: tl.constexpr,
):
    o_n = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    m_n = o_n < N
    o_k = tl.arange(0, BLOCK_K)
    # the weight is no output of earlier kernels: its first tile is read before the wait
    w = _weight_tile(w_ptr, o_n, m_n, o_k, K, swn, swk)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if FP64:
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
    acc = _rows_times_tile(acc, x_ptr, sxm, sxk, o_k, K, w.to(acc.dtype), M, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # only where a row does not fit one tile
        w = _weight_tile(w_ptr, o_n, m_n, k0 + o_k, K, swn, swk)
        acc = _rows_times_tile(acc, x_ptr, sxm, sxk, k0 + o_k, K, w.to(acc.dtype), M, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(acc.dtype)[None, :]
    o_m = tl.arange(0, BLOCK_M)
    tl.store(y_ptr + o_m[:, None] * sym + o_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(o_m < M)[:, None] & m_n[None, :])


@functools.cache  # a pure function of the shape, asked on every eager launch
def gemv_blocks(M: int, N: int, K: int, interpret: bool = False, itemsize: int = 4) -> tuple[int, int, int, int]:
    """(BLOCK_M, ROWS, BLOCK_K, num_warps). On a GPU, one row of x: up to 16 weight rows a
    program at 8 warps while there is a program per SM (132), as decode_chain.py measured. Several
    rows of x: one warp, whole rows while a thread holds at most 128 weight values (64 for fp64),
    down to one program per SM. H200, M = 8 (decode_gemv_h200_m8_warps_dot.json): one warp was
    the sweep's best at all four Hyena-153M shapes; against the earlier rule (4 warps, 64 values
    a thread) these picks take in_proj 8.38 -> 7.06 µs (the sweep's best), fc1 7.07 -> 6.39 (best
    5.97), fc2 6.94 -> 5.61 (best), out_proj 5.66 -> 5.70 (best 4.84: 2 rows with BLOCK_K 2048,
    which was 1.4x off the best for in_proj, so no rule here). Wider rows loop over K. The
    interpreter runs programs one by one: few, large ones."""
    block_m = triton.next_power_of_2(max(M, 1))
    k = triton.next_power_of_2(max(K, 1))
    if interpret:
        return block_m, min(triton.next_power_of_2(N), 64), min(k, 1024), 4
    if M == 1:
        most, warps, per_thread = 16, 8, _PER_THREAD
    else:
        most, warps, per_thread = 8, 1, 2 * _PER_THREAD if itemsize <= 4 else _PER_THREAD
    rows = 1
    tile = per_thread * 32 * warps
    while rows < most and N // (rows * 2) >= _SMS and rows * 2 * min(k, tile) <= tile:
        rows *= 2
    return block_m, rows, min(k, tile // rows), warps


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, *, blocks: tuple[int, int, int, int] | None = None,
         out: Tensor | None = None, pdl: bool = False) -> Tensor:
    """y = x @ w (+ bias) for x (M, K) with M <= MAX_ROWS, w (K, N) (any strides; fastest with
    w.stride(0) == 1, a transposed nn.Linear weight), bias (N,). y has x's dtype. `pdl`: launched
    with programmatic dependent launch (ignored where the device has none)."""
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
    block_m, rows, block_k, warps = blocks or gemv_blocks(M, N, K, not x.is_cuda, x.element_size())
    pdl = pdl and pdl_supported(x.device)
    _gemv_kernel[(triton.cdiv(N, rows),)](
        x, w, bias if bias is not None else x, y, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, ROWS=rows, BLOCK_K=block_k, USE_GDC=pdl,
        FP64=x.dtype == torch.float64, num_warps=warps, **({"launch_pdl": True} if pdl else {}),
    )
    return y


@torch.library.custom_op("lcsm::gemv", mutates_args=())
def gemv_op(x: Tensor, w: Tensor, bias: Tensor | None = None, pdl: bool = False) -> Tensor:
    """`gemv` as one graph node for inductor-compiled decode segments (an extern call there).
    CUDA: the Triton kernel (`pdl`: launched with programmatic dependent launch, for a segment
    whose inductor kernels use it too); elsewhere the same sum in torch (fp32 accumulation)."""
    if x.is_cuda:
        return gemv(x, w, bias, pdl=pdl)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ w.to(acc)
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)


@gemv_op.register_fake
def _(x: Tensor, w: Tensor, bias: Tensor | None = None, pdl: bool = False) -> Tensor:
    torch._check(x.dim() == 2 and w.dim() == 2, lambda: "lcsm::gemv: x (M, K) and w (K, N)")
    return x.new_empty(x.shape[0], w.shape[1])
