"""DFT matrices and twiddles of a plan, built once per (plan, operand dtype, device) in fp64.

Matrices are stored as three planes (real, imag, -imag) so the kernels never negate in
registers; twiddles stay fp32 (they multiply fp32 accumulators).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph_pools import build_outside_graph_pools
from .plan import FFTPlan

__all__ = ["DFTTables", "dft_tables", "dft_matrix", "twiddles"]


def dft_matrix(size: int, pad: int | None = None) -> Tensor:
    """Orthonormal DFT matrix exp(-2 pi i j k / size) / sqrt(size), complex128, zero-padded to pad."""
    j = torch.arange(size, dtype=torch.float64)
    ang = -2 * math.pi * torch.outer(j, j).remainder_(size) / size  # exact angles before the trig
    f = torch.polar(torch.full_like(ang, 1 / math.sqrt(size)), ang)
    if pad is not None and pad > size:
        f = torch.nn.functional.pad(f, (0, pad - size, 0, pad - size))
    return f


def twiddles(rows: int, cols: int, n: int) -> Tensor:
    """exp(-2 pi i k m / n) for k < rows, m < cols, complex128."""
    k = torch.arange(rows, dtype=torch.float64)
    m = torch.arange(cols, dtype=torch.float64)
    ang = -2 * math.pi * torch.outer(k, m).remainder_(n) / n
    return torch.polar(torch.ones_like(ang), ang)


def _planes3(f: Tensor, dtype: torch.dtype, device) -> Tensor:
    return torch.stack([f.real, f.imag, -f.imag]).to(device=device, dtype=dtype).contiguous()


def _planes2(t: Tensor, device) -> Tensor:
    return torch.stack([t.real, t.imag]).to(device=device, dtype=torch.float32).contiguous()


@dataclass(frozen=True)
class DFTTables:
    f1: Tensor      # (3, M1, M1) operand dtype
    f2: Tensor      # (3, M2, M2)
    tw: Tensor      # (2, M1, M2) fp32: W_M^{k1 m2}
    fr: Tensor      # (3, R_PAD, R_PAD) operand dtype: exp(-2 pi i j k / R), unscaled (R > 1)
    tw_outer: Tensor  # (2, R, M) fp32: W_N^{k_r m} / sqrt(R) (R > 1), else a dummy


_TABLES: dict[tuple, DFTTables] = {}


def dft_tables(plan: FFTPlan, dtype: torch.dtype, device: torch.device | str) -> DFTTables:
    device = torch.device(device)
    key = (plan.key(), dtype, device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    tables = _TABLES[key] = build_outside_graph_pools(device, lambda: _build(plan, dtype, device))
    return tables


def _build(plan: FFTPlan, dtype: torch.dtype, device: torch.device) -> DFTTables:
    f1 = _planes3(dft_matrix(plan.m1), dtype, device)
    f2 = _planes3(dft_matrix(plan.m2), dtype, device)
    tw = _planes2(twiddles(plan.m1, plan.m2, plan.m), device)
    if plan.r > 1:
        fr = _planes3(dft_matrix(plan.r, plan.r_pad) * math.sqrt(plan.r), dtype, device)
        tw_outer = _planes2(twiddles(plan.r, plan.m, plan.n) / math.sqrt(plan.r), device)
    else:
        fr = torch.zeros(1, dtype=dtype, device=device)
        tw_outer = torch.zeros(1, dtype=torch.float32, device=device)
    return DFTTables(f1, f2, tw, fr, tw_outer)
