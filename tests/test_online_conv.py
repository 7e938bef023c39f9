"""OnlineConv (torch path) against the lazy reference; the schedule; errors; memory."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from online_conv_reference import run_against_lazy

from lcsm_compile.kernels import OnlineConv
from lcsm_compile.kernels.online_conv import EagerOnlineConv, LazyOnlineConv, TiledOnlineConv
from lcsm_compile.kernels.online_conv.schedule import num_levels, prompt_tiles, tile_at


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


THRESHOLDS = [0, 1, 2, 4, 8, 16, 1 << 30]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 160),
    P=st.sampled_from([0, 1, 7, 13, 63, 100]),
    M=st.integers(1, 3),
    D=st.integers(1, 4),
    B=st.integers(1, 3),
    K=st.integers(1, 320),
    direct_max=st.sampled_from(THRESHOLDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_path_fp64_equals_lazy(L, P, M, D, B, K, direct_max, seed):
    P = min(P, L)
    g = torch.Generator().manual_seed(seed)
    filters = torch.randn(M, D, K, generator=g, dtype=torch.float64)
    u = torch.randn(L, M, B, D, generator=g, dtype=torch.float64)
    eng = OnlineConv(filters, B, L, direct_max=direct_max, backend="torch")
    run_against_lazy(eng, filters, u, P, tol=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(2, 300),
    P=st.sampled_from([0, 1, 7, 13, 63, 100]),
    K=st.integers(1, 600),
    direct_max=st.sampled_from(THRESHOLDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_path_fp32_equals_lazy(L, P, K, direct_max, seed):
    P = min(P, L)
    g = torch.Generator().manual_seed(seed)
    # decaying filters, as in trained LCSMs, and an fp32 state: error <= 1e-5 relative
    filters = torch.randn(2, 3, K, generator=g) * torch.exp(-torch.arange(K) / 64.0)
    u = torch.randn(L, 2, 2, 3, generator=g)
    eng = OnlineConv(filters, 2, L, direct_max=direct_max, backend="torch")
    run_against_lazy(eng, filters, u, P, tol=1e-5, all_at_once=True)


def test_filter_longer_than_max_len_and_prompt_fills_it():
    g = torch.Generator().manual_seed(1)
    filters = torch.randn(1, 2, 500, generator=g, dtype=torch.float64)
    u = torch.randn(64, 1, 1, 2, generator=g, dtype=torch.float64)
    run_against_lazy(OnlineConv(filters, 1, 64, backend="torch"), filters, u, 64, 1e-12)  # no steps
    run_against_lazy(OnlineConv(filters, 1, 64, backend="torch"), filters, u, 63, 1e-12)  # one step


@pytest.mark.parametrize("P", [0, 3])
def test_references_agree(P):
    g = torch.Generator().manual_seed(2)
    M, B, D, L = 2, 2, 3, 77
    filters = torch.randn(M, D, 50, generator=g, dtype=torch.float64)
    u = torch.randn(L, M, B, D, generator=g, dtype=torch.float64)
    refs = [cls(filters, B, L) for cls in (LazyOnlineConv, EagerOnlineConv, TiledOnlineConv)]
    for r in refs:
        for m in range(M):
            r.prefill(m, u[:P, m].permute(1, 2, 0))
    for t in range(P, L):
        ys = [[r.step(m, u[t, m]) for m in range(M)] for r in refs]
        for y in ys[1:]:
            for m in range(M):
                assert _rel(y[m], ys[0][m]) < 1e-12
        for r in refs:
            r.advance()


@pytest.mark.parametrize("L", [1, 2, 17, 64, 100])
@pytest.mark.parametrize("P", [0, 1, 7, 13, 63, 64])
def test_schedule_covers_every_pair_once_and_in_time(L, P):
    """Prompt tiles (their outputs from P on) then one tile per step: every pair (s, t') with
    s < t' and t' >= P is covered exactly once, before step t'; a prompt's tiles sum to P inputs."""
    P = min(P, L)
    covered = {}

    def cover(tile, start=0):
        assert tile.src + tile.size == tile.dst and tile.size == 1 << tile.level
        assert tile.level < max(num_levels(L), 1)
        for s in range(tile.src, tile.dst):
            for q in range(max(tile.dst, start), min(tile.dst + tile.size, L)):
                covered[(s, q)] = covered.get((s, q), 0) + 1

    tiles = prompt_tiles(P, L)
    if P < L:
        assert sum(t.size for t in tiles) == P  # one block per set bit of P
    assert all(t.dst <= P < t.dst + t.size for t in tiles)
    for tile in tiles:
        cover(tile, start=P)
    for t in range(P, L):
        for s in range(t):  # before step t every pair (s, t) must be in
            assert covered.get((s, t)) == 1, (s, t)
        tile = tile_at(t, L)
        if tile is not None:
            assert tile.dst == t + 1
            cover(tile)
    assert all(v == 1 for v in covered.values())
    assert len(covered) == sum(range(P, L))  # exactly the pairs (s, t') with s < t', t' >= P


def test_history_and_accumulators_are_rings_of_the_largest_tile():
    """X holds the last R inputs and A the next R outputs, R the largest power of two below
    max_len (the largest tile): half of max_len at a power of two."""
    for L, R in ((1, 1), (2, 1), (3, 2), (45, 32), (64, 32), (65, 64), (1000, 512), (4096, 2048)):
        eng = OnlineConv(torch.randn(1, 2, 5), 1, L, backend="torch")
        assert eng.A.shape == eng.X.shape == (1, 1, 2, R), (L, eng.A.shape, eng.X.shape)
    assert OnlineConv(torch.randn(2, 3, 4096), 1, 4096, backend="torch").memory_elements()["per_MDL"] <= 2.0


def test_default_tiles_by_batch_and_state_dtype():
    """Direct tiles up to 32 at B < 4; from B = 4 up to 64 for a half-precision state (tf32 dots)
    but 32 for an fp32 state, whose exact fp32 dots measured slower than an FFT tile at 64."""
    h = torch.randn(1, 2, 8)
    got = {(B, dt): (e.direct_max, e.dot_min) for B in (1, 3, 4, 8) for dt in (torch.bfloat16, torch.float32)
           for e in [OnlineConv(h, B, 16, dtype=dt, backend="torch")]}
    assert got == {(1, torch.bfloat16): (32, 64), (1, torch.float32): (32, 64), (3, torch.bfloat16): (32, 64),
                   (3, torch.float32): (32, 64), (4, torch.bfloat16): (64, 16), (4, torch.float32): (32, 16),
                   (8, torch.bfloat16): (64, 16), (8, torch.float32): (32, 16)}
    assert OnlineConv(h, 8, 16, dtype=torch.float32, direct_max=64, backend="torch").direct_max == 64


def test_memory_state_and_spectra_within_4_MDL():
    for L in (4096, 4097, 6000, 8191):
        eng = OnlineConv(torch.randn(2, 3, L), 1, L, backend="torch")
        mem = eng.memory_elements()
        assert mem["per_MDL"] <= 4.0, (L, mem)
    assert OnlineConv(torch.randn(1, 1, 8), 1, 8, direct_max=0, backend="torch").memory_elements()["per_MDL"] <= 4.0


def _engine_and_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    filters = torch.randn(2, 3, 20, generator=g, dtype=dtype)
    u = torch.randn(12, 2, 2, 3, generator=g, dtype=dtype)
    return OnlineConv(filters, 2, 12, direct_max=2, backend="torch"), filters, u


def test_errors_are_clear_and_leave_state_intact():
    eng, filters, u = _engine_and_data()
    lazy = LazyOnlineConv(filters, 2, 12)
    ok = u[0, 0]
    with pytest.raises(RuntimeError, match="before prefill"):
        eng.step(0, ok)
    with pytest.raises(RuntimeError, match="prefill"):
        eng.advance()
    with pytest.raises(ValueError, match="longer than max_len"):
        eng.prefill(0, torch.randn(2, 3, 13, dtype=torch.float64))
    prompt = u[:2].permute(1, 2, 3, 0)
    eng.prefill(0, prompt[0].contiguous())
    with pytest.raises(ValueError, match="length 2"):
        eng.prefill(1, prompt[1, ..., :1].contiguous())
    with pytest.raises(RuntimeError, match=r"mixer\(s\) \[1\]"):
        eng.step(1, ok)
    eng.prefill(1, prompt[1].contiguous())
    for m in range(2):
        lazy.prefill(m, prompt[m])
    bad_inputs = [
        (0, torch.randn(2, 4, dtype=torch.float64), ValueError, "shape"),
        (0, torch.randn(2, 3, dtype=torch.float32), ValueError, "float64"),
        (0, torch.randn(2, 3, dtype=torch.float64, device="meta"), ValueError, "on cpu"),
        (0, [[0.0] * 3] * 2, ValueError, "tensor"),
        (2, ok, ValueError, "mixer index"),
        (-1, ok, ValueError, "mixer index"),
    ]
    for t in range(2, 12):
        for m, x, err, msg in bad_inputs:
            with pytest.raises(err, match=msg):
                eng.step(m, x)
        y0 = eng.step(0, u[t, 0])
        with pytest.raises(RuntimeError, match=r"mixer\(s\) \[1\] stepped"):
            eng.advance()
        with pytest.raises(RuntimeError, match="decoding started"):
            eng.prefill(0, prompt[0].contiguous())
        y1 = eng.step(1, u[t, 1])
        assert _rel(y0, lazy.step(0, u[t, 0])) < 1e-12 and _rel(y1, lazy.step(1, u[t, 1])) < 1e-12
        eng.advance()
        lazy.advance()
    assert eng.position == 12
    with pytest.raises(RuntimeError, match="past max_len"):
        eng.step(0, ok)
    with pytest.raises(RuntimeError, match="past max_len"):
        eng.advance()
    with pytest.raises(RuntimeError, match="decoding started"):
        eng.prefill(0, prompt[0].contiguous())
    assert eng.position == 12
    # reset starts over: same numbers again
    eng.reset()
    assert eng.position == 0
    err = run_against_lazy(eng, filters, u, 5, 1e-12)
    assert err < 1e-12


def test_bad_construction_and_out_buffers():
    with pytest.raises(ValueError, match=r"\(M, D, K\)"):
        OnlineConv(torch.randn(3, 4), 1, 8)
    with pytest.raises(ValueError, match="max_len"):
        OnlineConv(torch.randn(1, 3, 4), 1, 0)
    with pytest.raises(ValueError, match="backend"):
        OnlineConv(torch.randn(1, 3, 4, dtype=torch.float64), 1, 8, backend="triton")
    eng, filters, u = _engine_and_data()
    eng.prefill_all(torch.zeros(2, 2, 3, 0, dtype=torch.float64))
    out = torch.full((2, 2, 3), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="step_all output"):
        eng.step_all(u[0], out=out[:, :1])
    y = eng.step_all(u[0], out=out)
    assert y is out and not out.isnan().any()
    ref = filters[:, None, :, 0] * u[0]
    assert _rel(out, ref) < 1e-15


def test_bf16_state_on_torch_path():
    g = torch.Generator().manual_seed(4)
    filters = torch.randn(2, 3, 40, generator=g) * torch.exp(-torch.arange(40) / 10.0)
    u = torch.randn(40, 2, 1, 3, generator=g).bfloat16().float()
    eng = OnlineConv(filters, 1, 40, dtype=torch.bfloat16, backend="torch")
    assert eng.A.dtype == torch.float32 and eng.X.dtype == torch.bfloat16
    run_against_lazy(eng, filters, u, 7, tol=1e-2)
