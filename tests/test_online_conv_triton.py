"""OnlineConv's Triton path: on CPU through TRITON_INTERPRET=1 (fp32/fp16, small grids), and
on a GPU (bf16, CUDA graphs)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from online_conv_reference import run_against_lazy

from lcsm_compile.kernels import OnlineConv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _data(M, B, D, L, K, seed, decay=64.0):
    g = torch.Generator().manual_seed(seed)
    filters = torch.randn(M, D, K, generator=g) * torch.exp(-torch.arange(K) / decay)
    u = torch.randn(L, M, B, D, generator=g)
    return filters.to(DEVICE), u.to(DEVICE)


@pytest.mark.parametrize(
    "L, P, K, direct_max, all_at_once",
    [
        (45, 0, 30, 4, True),  # fused level 0, FMA tiles, cached + on-the-fly FFT levels
        (45, 7, 100, 16, True),  # tl.dot tiles (U = 16)
        (40, 1, 40, 0, True),  # every tile an FFT, no fused level 0
        (33, 0, 1, 64, False),  # one-tap filter: no h[1], per-mixer step kernel
        (37, 36, 37, 4, False),  # a prompt that leaves one step
        (1, 0, 1, 4, True),  # max_len 1: no tile level, one step
        (1, 0, 5, 0, False),  # max_len 1, a filter longer than it: only h[0] is ever used
        (1, 1, 1, 4, True),  # max_len 1: the prompt is the whole sequence, no step
    ],
)
def test_triton_path_fp32_equals_lazy(L, P, K, direct_max, all_at_once):
    filters, u = _data(2, 2, 3, L, K, seed=L + P + K)
    eng = OnlineConv(filters, 2, L, direct_max=direct_max, backend="triton")
    run_against_lazy(eng, filters.cpu(), u, P, tol=1e-5, all_at_once=all_at_once)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.integers(2, 70), P=st.integers(0, 70), B=st.sampled_from([1, 4]),
       direct_max=st.sampled_from([0, 1, 4, 16, 32]), K=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_triton_path_equals_lazy_at_random_sizes(L, P, B, direct_max, K, seed):
    """The rings (X and A of R = the largest power of two below L slots) wrap at every size:
    random lengths, prompts (longer than R too) and tile kinds (tl.dot from U = 16 at B = 4)
    against the lazy sum."""
    P = min(P, L)
    filters, u = _data(1, B, 3, L, K, seed=seed % 1000)
    eng = OnlineConv(filters, B, L, direct_max=direct_max, backend="triton")
    run_against_lazy(eng, filters.cpu(), u, P, tol=1e-5, all_at_once=True)


def test_triton_path_fp16_state():
    filters, u = _data(2, 1, 3, 40, 40, seed=5, decay=8.0)
    u = u.half().float()
    eng = OnlineConv(filters, 1, 40, dtype=torch.float16, direct_max=16, backend="triton")
    assert eng.X.dtype == torch.float16 and eng.A.dtype == torch.float32
    run_against_lazy(eng, filters.cpu(), u, 7, tol=2e-3, all_at_once=True)


def test_triton_and_torch_paths_agree_on_the_state():
    filters, u = _data(2, 2, 3, 48, 48, seed=6)
    engs = [OnlineConv(filters, 2, 48, direct_max=8, backend=b) for b in ("torch", "triton")]
    for eng in engs:
        eng.prefill_all(u[:5].permute(1, 2, 3, 0).contiguous())
        for t in range(5, 30):
            eng.step_all(u[t])
            eng.advance()
    # the whole accumulator ring (32 slots for 48 positions): pending sums and cleared slots alike
    assert engs[0].A.shape[-1] == engs[1].A.shape[-1] == 32
    torch.testing.assert_close(engs[1].A, engs[0].A, rtol=1e-5, atol=1e-5)
    assert int(engs[1].pos[0]) == 30 == engs[1].position


def test_scratch_position_leaves_the_state_as_it_was():
    """Graph warm-ups run a step and every level's tiles at max_len - 2 inside scratch_position:
    what they write (the ring slots of t and t + 1, X[..., t], pos) comes back, and the engine
    goes on exactly like one that never ran them."""
    L, P = 45, 9
    filters, u = _data(2, 2, 3, L, L, seed=11)
    engs = [OnlineConv(filters, 2, L, direct_max=4, backend="triton") for _ in range(2)]
    for eng in engs:
        eng.prefill_all(u[:P].permute(1, 2, 3, 0).contiguous())
        for t in range(P, 20):
            eng.step_all(u[t])
            eng.advance()
    eng, ref = engs
    before = [s.clone() for s in (eng.X, eng.A, eng.pos)]
    with eng.scratch_position():
        scratch = eng.pos.clone()
        for level in (-1, *range(eng.n_levels)):
            eng.pos.copy_(scratch)
            eng._step(u[0] + 1.0, torch.empty_like(u[0]), 0, eng.M)  # the device work of step_all
            eng.run_tiles(level)
        assert not torch.equal(eng.X, before[0]) and not torch.equal(eng.A, before[1])
    for now, then in zip((eng.X, eng.A, eng.pos), before):
        assert torch.equal(now, then)
    for t in range(20, L):
        assert torch.equal(eng.step_all(u[t]), ref.step_all(u[t])), t
        eng.advance()
        ref.advance()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_gpu_graphs_equal_lazy(dtype, tol):
    from lcsm_compile.kernels.online_conv.graphs import TokenGraphs

    M, B, D, L, P = 3, 2, 40, 300, 7
    filters, u = _data(M, B, D, L, L, seed=7)
    u = u.to(dtype).float()
    eng = OnlineConv(filters, B, L, dtype=dtype)
    eng.capture_graphs()  # advance() now replays
    run_against_lazy(eng, filters, u, P, tol=tol)
    eng.reset()
    u_buf = torch.empty(M, B, D, dtype=dtype, device=DEVICE)
    y_buf = torch.empty_like(u_buf)
    eng.prefill_all(u[:P].permute(1, 2, 3, 0).to(dtype).contiguous())
    graphs = TokenGraphs(eng, lambda: eng.step_all(u_buf, out=y_buf))
    from lcsm_compile.kernels.online_conv import LazyOnlineConv

    lazy = LazyOnlineConv(filters.double(), B, L)
    for m in range(M):
        lazy.prefill(m, u[:P, m].permute(1, 2, 0).double())
    for t in range(P, L):
        u_buf.copy_(u[t].to(dtype))
        graphs.replay()
        for m in range(M):
            ref = lazy.step(m, u[t, m].double())
            err = ((y_buf[m].double() - ref).norm() / ref.norm()).item()
            assert err <= tol, (t, m, err)
        lazy.advance()
    assert eng.position == L
