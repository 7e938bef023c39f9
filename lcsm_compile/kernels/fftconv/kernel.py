"""Triton causal FFT convolution: DFTs as small complex matrix products on tensor cores.

See plan.py for the decomposition. One program owns one channel d and a pair of batch rows
(b, b+1) packed as z = u_b + i u_{b+1}. Padding to N happens in the loads (masked, zero),
truncation to L in the stores; the skip D*u is the spectrum plus D (D*u = conv(u, D delta));
the gates multiply on load (pre) and on store (post). Accumulation is fp32; dot operands are
bf16 for half inputs and fp32 (input_precision from the plan) for fp32 inputs.

Prefixes as in fla: i_ program ids, o_ offsets, m_ masks, p_ pointers.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_mat(p, plane: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    o = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    return tl.load(p + plane * ROWS * COLS + o)


@triton.jit
def _left(p_f, xr, xi, S: tl.constexpr, CONJ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """(F or conj F) @ (xr + i xi) for an (S, S) table of planes (re, im, -im)."""
    fr = _load_mat(p_f, 0, S, S)
    if CONJ:
        fi = _load_mat(p_f, 2, S, S)
        nfi = _load_mat(p_f, 1, S, S)
    else:
        fi = _load_mat(p_f, 1, S, S)
        nfi = _load_mat(p_f, 2, S, S)
    ar = xr.to(DOT)
    ai = xi.to(DOT)
    yr = tl.dot(fr, ar, input_precision=PREC)
    yr = tl.dot(nfi, ai, yr, input_precision=PREC)
    yi = tl.dot(fr, ai, input_precision=PREC)
    yi = tl.dot(fi, ar, yi, input_precision=PREC)
    return yr, yi


@triton.jit
def _right(xr, xi, p_f, S: tl.constexpr, CONJ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """(xr + i xi) @ (F or conj F)."""
    fr = _load_mat(p_f, 0, S, S)
    if CONJ:
        fi = _load_mat(p_f, 2, S, S)
        nfi = _load_mat(p_f, 1, S, S)
    else:
        fi = _load_mat(p_f, 1, S, S)
        nfi = _load_mat(p_f, 2, S, S)
    ar = xr.to(DOT)
    ai = xi.to(DOT)
    yr = tl.dot(ar, fr, input_precision=PREC)
    yr = tl.dot(ai, nfi, yr, input_precision=PREC)
    yi = tl.dot(ai, fr, input_precision=PREC)
    yi = tl.dot(ar, fi, yi, input_precision=PREC)
    return yr, yi


@triton.jit
def _twiddle(xr, xi, tr, ti, CONJ: tl.constexpr):
    if CONJ:
        yr = xr * tr + xi * ti
        yi = xi * tr - xr * ti
    else:
        yr = xr * tr - xi * ti
        yi = xr * ti + xi * tr
    return yr, yi


@triton.jit
def _inner_conv(xr, xi, p_hr, p_hi, skip, p_f1, p_f2, p_tw, M1: tl.constexpr, M2: tl.constexpr,
                DOT: tl.constexpr, PREC: tl.constexpr, HAS_SKIP: tl.constexpr):
    """Circular conv of one (M1, M2) complex tile with a spectrum stored in (k1, k2) order:
    F_M1 @ x, * W_M, @ F_M2, * (H [+ D]), @ conj F_M2, * conj W_M, conj F_M1 @ ."""
    o = tl.arange(0, M1)[:, None] * M2 + tl.arange(0, M2)[None, :]
    xr, xi = _left(p_f1, xr, xi, M1, False, DOT, PREC)
    xr, xi = _twiddle(xr, xi, tl.load(p_tw + o), tl.load(p_tw + M1 * M2 + o), False)
    xr, xi = _right(xr, xi, p_f2, M2, False, DOT, PREC)
    hr = tl.load(p_hr + o)
    hi = tl.load(p_hi + o)
    if HAS_SKIP:
        hr += skip
    xr, xi = xr * hr - xi * hi, xr * hi + xi * hr
    xr, xi = _right(xr, xi, p_f2, M2, True, DOT, PREC)
    xr, xi = _twiddle(xr, xi, tl.load(p_tw + o), tl.load(p_tw + M1 * M2 + o), True)
    xr, xi = _left(p_f1, xr, xi, M1, True, DOT, PREC)
    return xr, xi


@triton.jit(do_not_specialize=["B", "L"])
def fftconv_fused_kernel(
    u_ptr, y_ptr, h_ptr, skip_ptr, pre_ptr, post_ptr, f1_ptr, f2_ptr, tw_ptr,
    B, D, L,
    M1: tl.constexpr, M2: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    HAS_SKIP: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
):
    """N = M1 * M2 <= a few thousand: the whole row pair lives in registers. Grid (pairs, D)."""
    i_p = tl.program_id(0)
    i_d = tl.program_id(1)
    M: tl.constexpr = M1 * M2
    o_t = tl.arange(0, M1)[:, None] * M2 + tl.arange(0, M2)[None, :]
    L2 = tl.where(2 * i_p + 1 < B, L, 0)  # the pair's second row exists (odd B: not the last)
    m_1 = o_t < L
    m_2 = o_t < L2
    o_1 = (2 * i_p * D + i_d).to(tl.int64) * L
    o_2 = ((2 * i_p + 1) * D + i_d).to(tl.int64) * L
    xr = tl.load(u_ptr + o_1 + o_t, mask=m_1, other=0.0).to(tl.float32)
    xi = tl.load(u_ptr + o_2 + o_t, mask=m_2, other=0.0).to(tl.float32)
    if HAS_PRE:
        xr *= tl.load(pre_ptr + o_1 + o_t, mask=m_1, other=0.0).to(tl.float32)
        xi *= tl.load(pre_ptr + o_2 + o_t, mask=m_2, other=0.0).to(tl.float32)
    skip = 0.0
    if HAS_SKIP:
        skip = tl.load(skip_ptr + i_d).to(tl.float32)
    p_h = h_ptr + i_d.to(tl.int64) * (2 * M)
    yr, yi = _inner_conv(xr, xi, p_h, p_h + M, skip, f1_ptr, f2_ptr, tw_ptr, M1, M2, DOT, PREC, HAS_SKIP)
    if HAS_POST:
        yr *= tl.load(post_ptr + o_1 + o_t, mask=m_1, other=0.0).to(tl.float32)
        yi *= tl.load(post_ptr + o_2 + o_t, mask=m_2, other=0.0).to(tl.float32)
    tl.store(y_ptr + o_1 + o_t, yr.to(y_ptr.dtype.element_ty), mask=m_1)
    tl.store(y_ptr + o_2 + o_t, yi.to(y_ptr.dtype.element_ty), mask=m_2)


@triton.jit(do_not_specialize=["B", "L", "n_pairs", "n_items"])
def fftconv_split_kernel(
    u_ptr, y_ptr, h_ptr, skip_ptr, pre_ptr, post_ptr, f1_ptr, f2_ptr, tw_ptr, fr_ptr, two_ptr, s_ptr,
    B, D, L, n_pairs, n_items,
    R: tl.constexpr, R_PAD: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, MC: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, FWD_DOT: tl.constexpr, INV_DOT: tl.constexpr,
    HAS_SKIP: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """N = R * M1 * M2, per (pair, channel) item, x viewed as the (R, M) matrix x[r, m] = z[r*M + m]:

    forward outer stage, two ways:
      FWD_DOT: column DFTs F_R @ x on tensor cores (R_PAD-chunks of columns) into the scratch;
      else:    row k of F_R @ x is sum_r W_R^{rk} x[r] over the nonzero rows (< cdiv(L, M)),
               elementwise in fp32 right before its inner conv: no scratch pass (small R).
    then per row k: * W_N^{km}/sqrt(R), inner conv, * W_N^{-km}/sqrt(R), into the scratch;
    inverse outer stage: y[r] = sum_k W_R^{-rk} v[k] for the rows r that hold t < L, as conj F_R
    chunks on tensor cores (INV_DOT) or elementwise. Barriers between stages; the scratch (N
    complex fp32) belongs to the item, or to the program when PERSISTENT (grid < items)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    M: tl.constexpr = M1 * M2
    TWO_PI: tl.constexpr = 6.283185307179586
    o_r = tl.arange(0, R_PAD)[:, None]
    o_c = tl.arange(0, MC)[None, :]
    o_t = tl.arange(0, M1)[:, None] * M2 + tl.arange(0, M2)[None, :]
    m_r = (o_r < R) & (o_c >= 0)
    rows = tl.cdiv(L, M)  # rows of x that hold data (time < L); the rest is the zero padding
    for item in range(pid, n_items, G):
        i_p = item % n_pairs
        i_d = item // n_pairs
        if PERSISTENT:
            slot = pid
        else:
            slot = item
        p_s = s_ptr + slot.to(tl.int64) * (2 * R * M)
        o_1 = (2 * i_p * D + i_d).to(tl.int64) * L
        o_2 = ((2 * i_p + 1) * D + i_d).to(tl.int64) * L
        L2 = tl.where(2 * i_p + 1 < B, L, 0)
        skip = 0.0
        if HAS_SKIP:
            skip = tl.load(skip_ptr + i_d).to(tl.float32)
        if FWD_DOT:
            for c in range(0, M, MC):
                o_w = o_r * M + c + o_c
                m_u = m_r & (o_w < L)
                m_v = m_r & (o_w < L2)
                xr = tl.load(u_ptr + o_1 + o_w, mask=m_u, other=0.0).to(tl.float32)
                xi = tl.load(u_ptr + o_2 + o_w, mask=m_v, other=0.0).to(tl.float32)
                if HAS_PRE:
                    xr *= tl.load(pre_ptr + o_1 + o_w, mask=m_u, other=0.0).to(tl.float32)
                    xi *= tl.load(pre_ptr + o_2 + o_w, mask=m_v, other=0.0).to(tl.float32)
                xr, xi = _left(fr_ptr, xr, xi, R_PAD, False, DOT, PREC)
                tl.store(p_s + o_w, xr, mask=m_r)
                tl.store(p_s + R * M + o_w, xi, mask=m_r)
            tl.debug_barrier()
        for k in range(0, R):
            p_x = p_s + k * M
            if FWD_DOT:
                xr = tl.load(p_x + o_t)
                xi = tl.load(p_x + R * M + o_t)
            else:
                xr = tl.zeros((M1, M2), dtype=tl.float32)
                xi = tl.zeros((M1, M2), dtype=tl.float32)
                for r in range(0, rows):
                    ang = tl.cast((r * k) % R, tl.float32) * (-TWO_PI / R)
                    wr = tl.cos(ang)
                    wi = tl.sin(ang)
                    o_n = r * M + o_t
                    ar = tl.load(u_ptr + o_1 + o_n, mask=o_n < L, other=0.0).to(tl.float32)
                    ai = tl.load(u_ptr + o_2 + o_n, mask=o_n < L2, other=0.0).to(tl.float32)
                    if HAS_PRE:
                        ar *= tl.load(pre_ptr + o_1 + o_n, mask=o_n < L, other=0.0).to(tl.float32)
                        ai *= tl.load(pre_ptr + o_2 + o_n, mask=o_n < L2, other=0.0).to(tl.float32)
                    xr += ar * wr - ai * wi
                    xi += ar * wi + ai * wr
            p_w = two_ptr + k * M + o_t
            xr, xi = _twiddle(xr, xi, tl.load(p_w), tl.load(p_w + R * M), False)
            p_h = h_ptr + (i_d.to(tl.int64) * (2 * R) + k) * M
            xr, xi = _inner_conv(xr, xi, p_h, p_h + R * M, skip, f1_ptr, f2_ptr, tw_ptr, M1, M2, DOT,
                                 PREC, HAS_SKIP)
            xr, xi = _twiddle(xr, xi, tl.load(p_w), tl.load(p_w + R * M), True)
            tl.store(p_x + o_t, xr)
            tl.store(p_x + R * M + o_t, xi)
        tl.debug_barrier()
        if INV_DOT:
            for c in range(0, M, MC):
                o_w = o_r * M + c + o_c
                xr = tl.load(p_s + o_w, mask=m_r, other=0.0)
                xi = tl.load(p_s + R * M + o_w, mask=m_r, other=0.0)
                xr, xi = _left(fr_ptr, xr, xi, R_PAD, True, DOT, PREC)
                m_y = m_r & (o_w < L)
                m_z = m_r & (o_w < L2)
                if HAS_POST:
                    xr *= tl.load(post_ptr + o_1 + o_w, mask=m_y, other=0.0).to(tl.float32)
                    xi *= tl.load(post_ptr + o_2 + o_w, mask=m_z, other=0.0).to(tl.float32)
                tl.store(y_ptr + o_1 + o_w, xr.to(y_ptr.dtype.element_ty), mask=m_y)
                tl.store(y_ptr + o_2 + o_w, xi.to(y_ptr.dtype.element_ty), mask=m_z)
        else:
            for r in range(0, rows):
                yr = tl.zeros((M1, M2), dtype=tl.float32)
                yi = tl.zeros((M1, M2), dtype=tl.float32)
                for k in range(0, R):
                    ang = tl.cast((r * k) % R, tl.float32) * (TWO_PI / R)
                    wr = tl.cos(ang)
                    wi = tl.sin(ang)
                    vr = tl.load(p_s + k * M + o_t)
                    vi = tl.load(p_s + R * M + k * M + o_t)
                    yr += vr * wr - vi * wi
                    yi += vr * wi + vi * wr
                o_n = r * M + o_t
                if HAS_POST:
                    yr *= tl.load(post_ptr + o_1 + o_n, mask=o_n < L, other=0.0).to(tl.float32)
                    yi *= tl.load(post_ptr + o_2 + o_n, mask=o_n < L2, other=0.0).to(tl.float32)
                tl.store(y_ptr + o_1 + o_n, yr.to(y_ptr.dtype.element_ty), mask=o_n < L)
                tl.store(y_ptr + o_2 + o_n, yi.to(y_ptr.dtype.element_ty), mask=o_n < L2)
        tl.debug_barrier()
