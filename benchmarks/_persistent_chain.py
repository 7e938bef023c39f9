"""A persistent-kernel variant of decode_chain.py's product chain: the test for a fused decode step.

One launch runs all the chain's products: one program per SM, a grid-wide barrier (an atomic
counter) between dependent products. Before it waits at a barrier a program has already issued
the loads of its first weight tile of the next product, so weight reads run under the barrier
and under the other programs' tails, with no launch in between. If this beats the PDL chain of
separate launches clearly, a fused step (norms, activations, gates inside, one kernel per token or
per layer: benchmarks/NOTES_decode_floor.md, step 3) is worth building; if not, launches under
PDL are already as cheap as a grid barrier and that route is closed.

The barrier needs every program resident at once: grid = the SM count (one program per SM), and
nothing else may hold an SM for the whole kernel. Through the Triton interpreter (--smoke) programs
run one after another, so the grid is one program there.

Named with a leading underscore: `lcsm-compile bench` lists benchmarks/*.py except helpers like this one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _meta(meta_ptr, p):
    # (offset, N, K) of product p. They come from memory, so the compiler cannot know what an int
    # argument's divisibility would tell it: vector loads need the hint, given where the values
    # are loaded (on a function's arguments it was lost: Triton 3.9, sm90 PTX had scalar loads);
    # persistent_chain checks that it holds
    off = tl.multiple_of(tl.load(meta_ptr + 3 * p), 8)
    N = tl.load(meta_ptr + 3 * p + 1).to(tl.int32)
    K = tl.multiple_of(tl.load(meta_ptr + 3 * p + 2).to(tl.int32), 8)
    return off, N, K


@triton.jit
def _tile(w_ptr, off, N, K, first, ROWS: tl.constexpr, BK: tl.constexpr):
    # weight rows first .. first + ROWS of a row-major (N, K) weight at w_ptr + off, K padded to BK
    o_n = first + tl.arange(0, ROWS)
    o_k = tl.arange(0, BK)
    return tl.load(w_ptr + off + o_n[:, None].to(tl.int64) * K + o_k[None, :],
                   mask=(o_n < N)[:, None] & (o_k < K)[None, :], other=0.0)


@triton.jit
def _persistent_chain_kernel(w_ptr, meta_ptr, vec_ptr, ctr_ptr, P, NMAX,
                             ROWS: tl.constexpr, BK: tl.constexpr, MAX_SPINS: tl.constexpr):
    # product p: y[n] = sum_k w_p[n, k] f(v[k]), v the previous product's output (f = softsign from
    # p = 1 on), ping-ponged through vec (2, NMAX); meta (P, 3) = (offset, N, K) per product
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    o_k = tl.arange(0, BK)
    off, N, K = _meta(meta_ptr, 0)
    w = _tile(w_ptr, off, N, K, pid * ROWS, ROWS, BK)
    for p in range(P):
        off, N, K = _meta(meta_ptr, p)
        if p > 0:  # grid barrier: every program has written its rows of product p - 1
            seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
            spins = pid * 0  # an int32 tensor, as the loop carries it
            # bounded: should the programs not all be resident, the chain comes out wrong (and
            # decode_chain.py's check says so) instead of hanging the device
            while (seen < p * G) & (spins < MAX_SPINS):
                seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
                spins += 1
        src = vec_ptr + (p % 2) * NMAX
        dst = vec_ptr + ((p + 1) % 2) * NMAX
        # .cg: past L1, which may still hold this buffer from two products ago
        x = tl.load(src + o_k, mask=o_k < K, other=0.0, cache_modifier=".cg")
        if p > 0:
            x = x / (1.0 + tl.abs(x))
        o_n = pid * ROWS + tl.arange(0, ROWS)
        tl.store(dst + o_n, tl.sum(w * x[None, :], axis=1), mask=o_n < N)
        for first in range((pid + G) * ROWS, N, G * ROWS):  # the program's further tiles, if any
            t = _tile(w_ptr, off, N, K, first, ROWS, BK)
            o_n = first + tl.arange(0, ROWS)
            tl.store(dst + o_n, tl.sum(t * x[None, :], axis=1), mask=o_n < N)
        if p + 1 < P:  # the next product's first tile, issued before this program's arrival
            off1, N1, K1 = _meta(meta_ptr, p + 1)
            w = _tile(w_ptr, off1, N1, K1, pid * ROWS, ROWS, BK)
        tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")


def persistent_chain(x: torch.Tensor, ws: list[torch.Tensor], programs: int, rows: int = 8, warps: int = 8):
    """(run, output) for decode_chain.py: the chain in one persistent launch over `programs`
    programs (the SM count on a GPU, 1 through the interpreter), fixed buffers."""
    dev = x.device
    flat = torch.cat([w.reshape(-1) for w in ws])
    offs, o = [], 0
    for w in ws:
        offs.append((o, w.shape[0], w.shape[1]))
        o += w.numel()
    if any(v % 8 for o, _, k in offs for v in (o, k)):
        raise ValueError("persistent_chain: weight offsets and K must be multiples of 8 (the kernel's load hint)")
    meta = torch.tensor(offs, dtype=torch.int64, device=dev)
    nmax = max(max(w.shape[0] for w in ws), x.numel())
    vec = torch.zeros(2, nmax, device=dev)
    ctr = torch.zeros(1, dtype=torch.int32, device=dev)
    bk = triton.next_power_of_2(max(w.shape[1] for w in ws))
    P = len(ws)

    def run():
        vec[0, : x.numel()].copy_(x)
        ctr.zero_()
        _persistent_chain_kernel[(programs,)](flat, meta, vec, ctr, P, nmax, ROWS=rows, BK=bk,
                                            MAX_SPINS=1 << 20, num_warps=warps)
    return run, vec[P % 2, : ws[-1].shape[0]]
