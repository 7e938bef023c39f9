"""`fft_conv`: launch the Triton causal FFT convolution for u (B, D, L).

    y = post * (causal_conv(pre * u, h) + skip[:, None] * (pre * u))

with every optional term fused (constexpr flags), padding to the plan's N inside the kernel and
the filter's spectrum computed once (`spectrum.py`).
"""
from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from .kernel import fftconv_fused_kernel, fftconv_split_kernel
from .plan import FFTPlan, conv_size, dot_dtype, make_plan
from .spectrum import FilterSpectrum, cached_spectrum
from .tables import dft_tables

__all__ = ["fft_conv", "NotCovered", "SCRATCH_BYTES"]

SCRATCH_BYTES = 1 << 31  # the outer stage's scratch per launch; larger problems go in channel chunks

LAST_KERNEL: list = [None]  # the last launch's compiled kernel (registers, spills) for benchmarks

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


class NotCovered(ValueError):
    """No Triton plan for this size or dtype: use the torch.fft path."""


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _gate(t: Tensor | None, u: Tensor, name: str) -> Tensor | None:
    if t is None:
        return None
    if t.shape != u.shape:
        raise ValueError(f"fft_conv: {name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    return t.contiguous()


def fft_conv(u: Tensor, filt: Tensor | FilterSpectrum, *, skip: Tensor | None = None,
             pre: Tensor | None = None, post: Tensor | None = None, plan: FFTPlan | None = None,
             out: Tensor | None = None) -> Tensor:
    """Causal conv of u (B, D, L) with h (D, K) or a prepared `FilterSpectrum`; y has u's dtype.

    fp32 / bf16 / fp16 inputs, fp32 accumulation. Raises NotCovered where no plan exists
    (N > plan.MAX_N, fp64); the dispatcher then takes the torch.fft path.
    """
    if u.dim() != 3:
        raise ValueError(f"fft_conv: want u (B, D, L), got {tuple(u.shape)}")
    if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise NotCovered(f"fft_conv: dtype {u.dtype} not covered")
    B, D, L = u.shape
    if isinstance(filt, FilterSpectrum):
        spec = filt
        if plan is not None and plan.key() != spec.plan.key():
            raise ValueError("fft_conv: plan differs from the spectrum's plan")
        plan = spec.plan
        if not spec.covers(L):
            raise ValueError(f"fft_conv: spectrum (n={plan.n}, {spec.taps} taps) does not cover L={L}")
    else:
        if filt.dim() != 2 or filt.shape[0] != D:
            raise ValueError(f"fft_conv: want h ({D}, K), got {tuple(filt.shape)}")
        n = conv_size(L, filt.shape[1])
        if plan is None:
            plan = make_plan(n)
            if plan is None:
                raise NotCovered(f"fft_conv: no plan for FFT size {n} (L={L})")
        elif plan.n < L + min(filt.shape[1], L) - 1:
            raise ValueError(f"fft_conv: plan n={plan.n} too small for L={L}")
        spec = cached_spectrum(filt, L, plan)
    if spec.channels != D or spec.planes.device != u.device:
        raise ValueError("fft_conv: spectrum channels/device do not match u")
    u = u.contiguous()
    pre, post = _gate(pre, u, "pre"), _gate(post, u, "post")
    if skip is not None:
        skip = skip.reshape(-1).contiguous()
        if skip.numel() != D:
            raise ValueError(f"fft_conv: skip must have {D} values")
    tables = dft_tables(plan, dot_dtype(u.dtype), u.device)
    if out is not None and (out.shape != u.shape or out.dtype != u.dtype or not out.is_contiguous()):
        raise ValueError("fft_conv: out must be a contiguous tensor like u")
    y = torch.empty_like(u) if out is None else out
    if B == 0 or L == 0 or D == 0:
        return y
    op_dtype = dot_dtype(u.dtype)
    consts = dict(
        DOT=_TL[op_dtype], PREC=plan.precision if op_dtype == torch.float32 else "tf32",
        HAS_SKIP=skip is not None, HAS_PRE=pre is not None, HAS_POST=post is not None,
        num_warps=plan.num_warps,
    )
    dummy = u
    pairs = (B + 1) // 2
    if plan.r == 1:
        LAST_KERNEL[0] = fftconv_fused_kernel[(pairs, D)](
            u, y, spec.planes, skip if skip is not None else dummy, pre if pre is not None else dummy,
            post if post is not None else dummy, tables.f1, tables.f2, tables.tw,
            B, D, L, M1=plan.m1, M2=plan.m2, **consts)
        return y
    # Outer stage: channel chunks so the scratch stays under SCRATCH_BYTES.
    item_bytes = 8 * plan.n
    if plan.persistent:
        chunk = D
    else:
        chunk = max(1, min(D, SCRATCH_BYTES // (item_bytes * pairs)))
    for d0 in range(0, D, chunk):
        dc = min(chunk, D - d0)
        n_items = pairs * dc
        grid = min(n_items, 2 * _num_sms(u.device)) if plan.persistent else n_items
        scratch = torch.empty(grid, 2, plan.r, plan.m, dtype=torch.float32, device=u.device)
        sl = slice(d0, d0 + dc)
        LAST_KERNEL[0] = fftconv_split_kernel[(grid,)](
            u[:, sl], y[:, sl], spec.planes[sl], skip[sl] if skip is not None else dummy,
            pre[:, sl] if pre is not None else dummy, post[:, sl] if post is not None else dummy,
            tables.f1, tables.f2, tables.tw, tables.fr, tables.tw_outer, scratch,
            B, D, L, pairs, n_items,
            R=plan.r, R_PAD=plan.r_pad, M1=plan.m1, M2=plan.m2, MC=plan.mc, FWD_DOT=plan.fwd_dot,
            INV_DOT=plan.inv_dot, PERSISTENT=plan.persistent, num_stages=1, **consts)
    return y
