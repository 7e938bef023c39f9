"""ModalRecurrence (torch and Triton paths) against the fp64 step-by-step recurrence, the lazy sum
and the tiled online convolution on the same filter, on fresh random inputs and awkward lengths."""
import math

import pytest
import torch

from lcsm_compile.kernels.modal import ModalRecurrence, ReferenceModalRecurrence, modal_impulse_response, modal_state
from lcsm_compile.kernels.online_conv import LazyOnlineConv, OnlineConv


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _modal(M, C, n, seed, real=False, min_abs=0.8):
    g = torch.Generator().manual_seed(seed)
    mag = min_abs + (0.999 - min_abs) * torch.rand(M, C, n, generator=g, dtype=torch.float64)
    ang = torch.zeros_like(mag) if real else math.pi * torch.rand(M, C, n, generator=g, dtype=torch.float64)
    poles = torch.polar(mag, ang)
    residues = torch.complex(torch.randn(M, C, n, generator=g, dtype=torch.float64),
                             torch.randn(M, C, n, generator=g, dtype=torch.float64)) / math.sqrt(n)
    skip = torch.randn(M, C, generator=g, dtype=torch.float64)
    return poles, residues, skip


def _drive(engines, u, P):
    """Prefill every engine with u[..., :P], then step all of them to the end; outputs per engine."""
    M = u.shape[0]
    outs = [[] for _ in engines]
    for m in range(M):
        for i, eng in enumerate(engines):
            outs[i].append([eng.prefill(m, u[m, ..., :P])])
    for t in range(P, u.shape[-1]):
        for m in range(M):
            for i, eng in enumerate(engines):
                outs[i][m].append(eng.step(m, u[m, ..., t])[..., None])
        for eng in engines:
            eng.advance()
    return [torch.stack([torch.cat(o, -1) for o in per_m]) for per_m in outs]


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C,n,P,L", [(1, 5, 3, 0, 63), (3, 7, 8, 1, 40), (2, 33, 5, 37, 100), (1, 4, 1, 63, 64)],
                         ids=lambda v: str(v))
def test_recurrence_matches_lazy_and_tiled(backend, B, C, n, P, L):
    M = 2
    poles, residues, skip = _modal(M, C, n, seed=B * 100 + P)
    h = modal_impulse_response(poles, residues, skip, L, torch.float32)
    u = torch.randn(M, B, C, L, generator=torch.Generator().manual_seed(L + P))
    ours = ModalRecurrence(poles, residues, skip, B, backend=backend, max_len=L)
    lazy = LazyOnlineConv(h, B, L)
    tiled = OnlineConv(h, B, L, backend="torch")
    ref = ReferenceModalRecurrence(poles, residues, skip, B, dtype=torch.float64)
    y, y_lazy, y_tiled, y_ref = _drive([ours, lazy, tiled, ref], u, P)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(y, y_lazy) <= 1e-5
    assert _rel(y, y_tiled) <= 1e-5
    # every position, not only in aggregate
    scale = y_ref.abs().amax(dim=(0, 1, 2), keepdim=True).clamp_min(1e-6)
    assert ((y.double() - y_ref) / scale).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_impulse_response_is_the_filter(backend):
    """A delta through the recurrence gives back h over the full length (2000 taps; fewer through
    the Triton interpreter)."""
    C, n, L = 6, 8, 2000 if backend == "torch" or torch.cuda.is_available() else 300
    poles, residues, skip = _modal(1, C, n, seed=7, min_abs=0.99)
    h = modal_impulse_response(poles, residues, skip, L)[0]
    eng = ModalRecurrence(poles, residues, skip, 1, backend=backend)
    u = torch.zeros(1, C, L)
    u[..., 0] = 1
    y = [eng.prefill(0, u[..., :1])]
    for t in range(1, L):
        y.append(eng.step(0, u[..., t])[..., None])
        eng.advance()
    y = torch.cat(y, -1)[0]
    assert _rel(y, h) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_of_different_sizes_and_real_and_zero_poles(backend):
    """Mixers with 1, 4 and 3 modes (padded), real poles, a zero pole (a pure delay-free tap)."""
    C, B, L, P = 5, 2, 50, 11
    p1, r1, s1 = _modal(1, C, 1, seed=1, real=True)
    p2, r2, s2 = _modal(1, C, 4, seed=2)
    p3, r3, s3 = _modal(1, C, 3, seed=3)
    p3[..., 0] = 0
    poles = [p1[0], p2[0], p3[0]]
    residues = [r1[0], r2[0], r3[0]]
    skips = [s1[0], s2[0], s3[0]]
    ours = ModalRecurrence(poles, residues, skips, B, backend=backend)
    assert (ours.M, ours.n) == (3, 4)
    h = torch.stack([modal_impulse_response(p, r, s, L, torch.float32) for p, r, s in zip(poles, residues, skips)])
    lazy = LazyOnlineConv(h, B, L)
    u = torch.randn(3, B, C, L, generator=torch.Generator().manual_seed(0))
    y, y_lazy = _drive([ours, lazy], u, P)
    assert _rel(y, y_lazy) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_all_and_out(backend):
    M, B, C, n, L = 3, 2, 9, 4, 30
    poles, residues, skip = _modal(M, C, n, seed=5)
    a = ModalRecurrence(poles, residues, skip, B, backend=backend)
    b = ModalRecurrence(poles, residues, skip, B, backend=backend)
    u = torch.randn(M, B, C, L)
    a.prefill_all(u[..., :4])
    for m in range(M):
        b.prefill(m, u[m, ..., :4])
    out = torch.empty(M, B, C)
    for t in range(4, L):
        y_all = a.step_all(u[..., t], out=out)
        assert y_all is out
        ys = torch.stack([b.step(m, u[m, ..., t]) for m in range(M)])
        assert torch.allclose(y_all, ys, rtol=1e-6, atol=1e-6)
        a.advance()
        b.advance()


def test_prompt_state_matches_stepping():
    """The chunked Vandermonde prompt state equals the state reached by stepping, also past a
    chunk boundary (work_bytes forces 16-position chunks)."""
    C, n, P = 3, 5, 77
    poles, _, _ = _modal(1, C, n, seed=9)
    u = torch.randn(2, C, P, dtype=torch.float64)
    s = torch.zeros(2, C, n, dtype=torch.complex128)
    for t in range(P):
        s = poles[0] * s + u[..., t, None]
    got = modal_state(u, poles[0], work_bytes=16 * C * n * 16 * 2)
    assert _rel(torch.view_as_real(got), torch.view_as_real(s)) <= 1e-12


def test_fp64_and_bf16_states():
    C, n, B, L, P = 4, 3, 2, 40, 9
    poles, residues, skip = _modal(1, C, n, seed=11)
    u = torch.randn(1, B, C, L, dtype=torch.float64)
    ref = ReferenceModalRecurrence(poles, residues, skip, B, dtype=torch.float64)
    (y_ref,) = _drive([ref], u, P)
    eng = ModalRecurrence(poles, residues, skip, B, dtype=torch.float64)
    assert eng.S.dtype == torch.complex128
    (y,) = _drive([eng], u, P)
    assert _rel(y, y_ref) <= 1e-12
    eng = ModalRecurrence(poles, residues, skip, B, dtype=torch.bfloat16)
    assert eng.S.dtype == torch.complex64  # the state stays fp32 whatever the model dtype
    (y,) = _drive([eng], u.bfloat16(), P)
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) <= 2e-2


def test_prefill_with_the_callers_filters():
    """With `filters` given, the prompt's outputs use them (the folded filter of the model)."""
    C, n, B, L = 4, 3, 1, 20
    poles, residues, skip = _modal(1, C, n, seed=12)
    h = modal_impulse_response(poles, residues, skip, L, torch.float32)
    eng = ModalRecurrence(poles, residues, skip, B, filters=2 * h)
    u = torch.randn(B, C, L)
    y = eng.prefill(0, u)
    ref = ModalRecurrence(poles, residues, skip, B).prefill(0, u)
    assert _rel(y, 2 * ref) <= 1e-5


def test_errors_and_reset():
    poles, residues, skip = _modal(2, 3, 2, seed=0)
    with pytest.raises(ValueError, match="complex"):
        ModalRecurrence(poles.real, residues, skip, 1)
    with pytest.raises(ValueError, match="skip"):
        ModalRecurrence(poles, residues, skip[:, :2], 1)
    with pytest.raises(ValueError, match="backend"):
        ModalRecurrence(poles, residues, skip, 1, dtype=torch.float64, backend="triton")
    eng = ModalRecurrence(poles, residues, skip, 2, max_len=5)
    with pytest.raises(RuntimeError, match="before prefill"):
        eng.step(0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        eng.prefill(0, torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="longer than max_len"):
        eng.prefill(0, torch.zeros(2, 3, 6))
    eng.prefill(0, torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="length 2"):
        eng.prefill(1, torch.zeros(2, 3, 3))
    eng.prefill(1, torch.zeros(2, 3, 2))
    eng.step(0, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="stepped"):
        eng.advance()
    eng.step(1, torch.ones(2, 3))
    eng.advance()
    with pytest.raises(RuntimeError, match="prefill after decoding"):
        eng.prefill(0, torch.zeros(2, 3, 2))
    assert eng.position == 3 and eng.prompt_len == 2 and eng.tile_level() == -1
    for _ in range(2):
        eng.step_all(torch.ones(2, 2, 3))
        eng.advance()
    with pytest.raises(RuntimeError, match="past max_len"):
        eng.step(0, torch.ones(2, 3))
    eng.reset()
    assert eng.position == 0 and eng.prompt_len is None and not eng.S.abs().any()


def test_scratch_position_restores_the_state():
    poles, residues, skip = _modal(1, 3, 2, seed=1)
    eng = ModalRecurrence(poles, residues, skip, 1)
    eng.prefill(0, torch.randn(1, 3, 5))
    before = eng.S.clone()
    with eng.scratch_position():
        eng.step(0, torch.randn(1, 3))
        assert not torch.equal(eng.S, before)
    assert torch.equal(eng.S, before) and eng.position == 5 and eng.n_levels == 0
    eng.step(0, torch.randn(1, 3))  # the scratch step does not count as this position's step
    eng.advance()
