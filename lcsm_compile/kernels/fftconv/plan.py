"""How one causal FFT convolution is cut into small DFT-matrix products (a Monarch plan).

The convolution of a length-L row with a length-K filter is exact as a circular one of size
N = 2^p >= L + min(K, L) - 1. Two real rows of one channel (batch b and b+1) share the filter, so
they travel as one complex signal z = u_b + i u_{b+1}: conv(z, h) = conv(u_b, h) + i conv(u_{b+1}, h)
for a real h, and a full complex DFT of size N serves two rows.

The size-N DFT is Cooley-Tukey with N = R * M and M = M1 * M2, time index n = r*M + m1*M2 + m2,
frequency index k = k_r + R*(k1 + M1*k2):

    inner (one program, registers):  x (M1, M2) -> F_M1 @ x -> * W_M[k1, m2] -> @ F_M2
    outer (R > 1, through a scratch): columns of the (R, M) matrix -> F_R @ . -> * W_N[k_r, m]

Every stage is a small complex matrix product on tensor cores (4 real `tl.dot`s), twiddles are
elementwise. The inverse runs the stages backwards with conjugates and lands in natural order,
so the frequency order never has to be undone: the filter spectrum is stored in the same
permuted (k_r, k1, k2) order once (`spectrum.py`). Each DFT matrix is orthonormal (1/sqrt(size)),
so values keep the input's scale through every stage and y = F^H (F z * H) with H = DFT(h).

R = 1 is the fused kernel (N <= 4096 by default). R > 1 adds the outer stage. For small R the
forward outer DFT is elementwise: row k of F_R @ x is a weighted sum of the few rows of x that
hold data (x is zero past L <= N/2), computed right before that row's inner conv, whose result
(twiddled back) goes to a scratch of N complex values per row pair; the inverse outer DFT reads
the scratch once, as conj F_R products on tensor cores (or elementwise for R <= 4). For large R
the forward outer DFT is also a tensor-core product (fwd_dot), written to the scratch first.
Dots need every dimension >= 16, so F_R is zero-padded to R_PAD = max(R, 16). Covered:
256 <= N <= 128 * 8192 = 2^20 (L <= 2^19); larger N has no plan and callers use torch.fft.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["FFTPlan", "make_plan", "conv_size", "MAX_N", "MIN_N"]

MIN_N = 256          # 16 x 16: the smallest tl.dot tile
MAX_INNER = 8192     # M1 * M2 held by one program in registers
MAX_R = 128          # outer radix: F_R is one (R, R) dot operand
MAX_N = MAX_R * MAX_INNER
CHUNK = 4096         # elements of one (R_PAD, MC) column chunk in the outer stage


def conv_size(L: int, K: int) -> int:
    """Smallest power of two >= L + min(K, L) - 1 (and >= MIN_N): no wrap reaches [0, L)."""
    need = L + min(K, L) - 1
    return max(MIN_N, 1 << max(need - 1, 0).bit_length())


@dataclass(frozen=True)
class FFTPlan:
    n: int                   # circular FFT size
    r: int                   # outer radix (1: fused, no scratch)
    m1: int                  # inner tile rows (left DFT)
    m2: int                  # inner tile columns (right DFT)
    num_warps: int = 4
    persistent: bool = False  # R > 1: one launch, a grid of ~2 programs per SM, scratch per program
    precision: str = "tf32x3"  # fp32 inputs only: tl.dot input_precision ("ieee", "tf32x3", "tf32")
    fwd_dot: bool = False    # R > 1: forward outer DFT as tl.dot into the scratch (else elementwise, fused)
    inv_dot: bool = True     # R > 1: inverse outer DFT as tl.dot (else elementwise)

    @property
    def m(self) -> int:
        return self.m1 * self.m2

    @property
    def r_pad(self) -> int:
        return 1 if self.r == 1 else max(self.r, 16)

    @property
    def mc(self) -> int:
        """Columns of one outer-stage chunk."""
        return min(self.m, max(16, CHUNK // self.r_pad))

    def key(self) -> tuple:
        return (self.n, self.r, self.m1, self.m2)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self) -> FFTPlan:
        for name in ("n", "r", "m1", "m2"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"FFTPlan.{name}={v} must be a power of two")
        if self.r * self.m != self.n:
            raise ValueError(f"FFTPlan: r*m1*m2 = {self.r * self.m} != n = {self.n}")
        if min(self.m1, self.m2) < 16 or self.m > MAX_INNER or self.r > MAX_R:
            raise ValueError(f"FFTPlan: tiles {self.m1}x{self.m2} (r={self.r}) outside 16..{MAX_INNER}")
        if self.precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"FFTPlan.precision={self.precision!r}")
        return self


def _split(m: int) -> tuple[int, int]:
    m1 = 1 << (int(math.log2(m)) // 2)
    return m1, m // m1


def make_plan(n: int, *, r: int | None = None, m1: int | None = None, num_warps: int | None = None,
              persistent: bool = False, precision: str = "tf32x3", fwd_dot: bool | None = None,
              inv_dot: bool | None = None) -> FFTPlan | None:
    """The default plan for FFT size n (a power of two), or None when n is not covered.

    Defaults: fused up to n = 4096, else inner 64 x 64 and R = n / 4096 (up to 128).
    Any field can be forced; the benchmark tries several and the dispatch table keeps the best.
    """
    if n < MIN_N or n > MAX_N or n & (n - 1):
        return None
    if r is None:
        r = 1 if n <= 4096 else min(MAX_R, n // 4096)
    m = n // r
    if m1 is None:
        m1, m2 = _split(m)
    else:
        m2 = m // m1
    if num_warps is None:
        num_warps = 4 if m <= 4096 else 8
    fwd_dot = r > 16 if fwd_dot is None else fwd_dot
    inv_dot = r > 4 if inv_dot is None else inv_dot
    try:
        return FFTPlan(n, r, m1, m2, num_warps, persistent, precision, fwd_dot, inv_dot).check()
    except ValueError:
        return None


def dot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand type of the DFT products: fp32 for fp32 input, bf16 for half inputs (bf16 keeps
    fp32's range, so no stage can overflow; fp32 accumulation either way)."""
    return torch.float32 if dtype in (torch.float32, torch.float64) else torch.bfloat16
