"""Triton causal FFT convolution (kernels/fftconv) vs its references; dispatch and spectrum cache.

On CPU the kernels run in the Triton interpreter (program by program): sizes stay small.
"""
import math
import threading

import pytest
import torch

from lcsm_compile.kernels.dispatch import DispatchTable, causal_conv_cuda, choose
from lcsm_compile.kernels.fftconv import (
    FFTPlan,
    NotCovered,
    cached_spectrum,
    clear_cache,
    conv_size,
    fft_conv,
    gated_conv_reference,
    make_plan,
    monarch_conv_reference,
    prepare_filter,
    torch_fft_conv,
)
from lcsm_compile.kernels.fftconv.spectrum import _CACHE
from lcsm_compile.kernels.graph_pools import build_outside_graph_pools, run_on_helper_thread

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(B, D, L, K, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, D, L, generator=g)
    h = torch.randn(D, K, generator=g) / math.sqrt(K)
    extras = dict(skip=torch.randn(D, generator=g), pre=torch.randn(B, D, L, generator=g),
                  post=torch.randn(B, D, L, generator=g))
    to = dict(device=device)
    return (u.to(dtype=dtype, **to), h.to(**to), {k: v.to(dtype=dtype if v.dim() == 3 else torch.float32, **to)
                                                 for k, v in extras.items()})


# ---- plans and the torch model of the kernel (no Triton) ----

@pytest.mark.parametrize("L,K", [(1, 1), (63, 63), (100, 7), (1000, 1000), (300, 5000)])
def test_conv_size_never_wraps(L, K):
    n = conv_size(L, K)
    assert n & (n - 1) == 0 and n >= L + min(K, L) - 1 and n >= 256


@pytest.mark.parametrize("plan", [FFTPlan(256, 1, 16, 16), FFTPlan(2048, 1, 32, 64), FFTPlan(512, 2, 16, 16),
                                  FFTPlan(4096, 16, 16, 16), FFTPlan(8192, 32, 16, 16)], ids=str)
def test_monarch_model_matches_direct_sum(plan):
    L = plan.n // 2 - 3
    u, h, ex = _inputs(3, 2, L, L, seed=plan.n + plan.r, dtype=torch.float64)
    spec = prepare_filter(h.double(), L, plan)
    ref = gated_conv_reference(u, h, **ex)
    assert _rel(monarch_conv_reference(u, spec, **ex), ref) < 1e-6  # spectrum planes are fp32


def test_default_plans_cover_up_to_2_20():
    for p in range(8, 21):
        plan = make_plan(1 << p)
        assert plan is not None and plan.r * plan.m1 * plan.m2 == 1 << p
    assert make_plan(1 << 21) is None and make_plan(100) is None


# ---- the Triton kernels (interpreter on CPU) ----

@pytest.mark.parametrize("B,L,K", [(1, 1, 1), (3, 63, 63), (2, 100, 40), (3, 1000, 1000), (2, 120, 5000)],
                         ids=lambda v: str(v))
def test_fused_kernel_fp32(B, L, K):
    u, h, ex = _inputs(B, 2, L, K, seed=L * 31 + K, device=DEV)
    y = fft_conv(u, h)
    assert y.dtype == u.dtype and y.shape == u.shape
    assert _rel(y, gated_conv_reference(u, h)) < 1e-5


@pytest.mark.parametrize("flags", ["skip", "pre", "post", "skip+pre+post"])
def test_fused_skip_and_gates(flags):
    u, h, ex = _inputs(3, 2, 100, 100, seed=len(flags), device=DEV)
    kw = {k: ex[k] for k in flags.split("+")}
    assert _rel(fft_conv(u, h, **kw), gated_conv_reference(u, h, **kw)) < 1e-5


@pytest.mark.parametrize("plan,L", [
    (FFTPlan(512, 2, 16, 16, inv_dot=False), 200),
    (FFTPlan(512, 2, 16, 16, fwd_dot=True, inv_dot=True), 256),
    (FFTPlan(1024, 4, 16, 16, inv_dot=False), 300),
    (FFTPlan(4096, 16, 16, 16, fwd_dot=True), 1000),
    (FFTPlan(4096, 16, 16, 16, persistent=True), 999),
], ids=str)
def test_split_kernel_fp32(plan, L):
    u, h, ex = _inputs(3, 2, L, L, seed=L, device=DEV)
    y = torch.full_like(u, float("nan"))  # poisoned: every element must be written
    fft_conv(u, h, plan=plan, out=y, **ex)
    assert _rel(y, gated_conv_reference(u, h, **ex)) < 1e-5


def test_prepared_spectrum_serves_shorter_lengths():
    u, h, _ = _inputs(2, 2, 1000, 1000, seed=5, device=DEV)
    spec = prepare_filter(h, 1000)
    assert spec.covers(1000) and spec.covers(1) and spec.covers(1049) and not spec.covers(1050)
    for L in (1000, 517):
        assert _rel(fft_conv(u[..., :L], spec), gated_conv_reference(u[..., :L], h)) < 1e-5
    with pytest.raises(ValueError, match="does not cover"):
        fft_conv(torch.randn(2, 2, 2000, device=DEV), spec)


def test_not_covered_sizes_and_dtypes_say_so():
    with pytest.raises(NotCovered):
        fft_conv(torch.randn(1, 1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64))
    assert make_plan(conv_size(1 << 20, 1 << 20)) is None


# ---- the spectrum cache ----

def test_spectrum_cache_hits_and_invalidates():
    clear_cache()
    h = torch.randn(3, 64)
    plan = make_plan(256)
    s1 = cached_spectrum(h, 100, plan)
    assert cached_spectrum(h, 100, plan) is s1                 # same tensor, same version: hit
    h.mul_(2)                                                  # in-place: version moves
    s2 = cached_spectrum(h, 100, plan)
    assert s2 is not s1 and torch.allclose(s2.planes, 2 * s1.planes, rtol=1e-5, atol=1e-5)
    view = h[:, :64]                                           # a fresh view of the same memory
    assert cached_spectrum(view, 100, plan) is s2
    del h, view, s1, s2
    assert len(_CACHE.entries) == 0                            # entries die with their filter


def test_helper_thread_returns_raises_and_drops_grad():
    main = threading.current_thread()
    seen = {}

    def build():
        seen["thread"], seen["grad"] = threading.current_thread(), torch.is_grad_enabled()
        return torch.ones(2) * 3

    assert torch.equal(run_on_helper_thread(build), torch.full((2,), 3.0))
    assert seen["thread"] is not main and seen["grad"] is False

    def fail():
        raise ValueError("no spectrum")

    with pytest.raises(ValueError, match="no spectrum"):
        run_on_helper_thread(fail)


@pytest.mark.gpu
def test_cache_entries_escape_a_thread_routed_pool():
    """What cudagraph trees do in a warm-up (route this thread's allocations to a private pool),
    done with a MemPool: an entry built through build_outside_graph_pools lands outside it."""
    if not hasattr(torch.cuda, "MemPool"):
        pytest.skip("this torch has no MemPool")
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        inside = torch.empty(1 << 20, device="cuda")
        outside = build_outside_graph_pools(torch.device("cuda"), lambda: torch.empty(1 << 20, device="cuda"))
    if hasattr(pool, "snapshot"):
        owned = pool.snapshot()
    else:  # torch 2.11 (the GPU host): the allocator's snapshot, segments tagged with their pool
        owned = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == tuple(pool.id)]
    segments = [(s["address"], s["address"] + s["total_size"]) for s in owned]
    assert any(a <= inside.data_ptr() < b for a, b in segments)
    assert not any(a <= outside.data_ptr() < b for a, b in segments)


def test_cpu_cache_entries_are_built_in_place():
    seen = []
    value = build_outside_graph_pools(torch.device("cpu"), lambda: seen.append(threading.current_thread()) or 7)
    assert value == 7 and seen == [threading.current_thread()]


def test_torch_fft_path_with_cached_filter():
    u, h, ex = _inputs(2, 3, 300, 200, seed=3)
    assert _rel(torch_fft_conv(u, h, skip=ex["skip"]), gated_conv_reference(u, h, skip=ex["skip"])) < 1e-5


# ---- dispatch ----

def test_dispatch_table_lookup():
    plan = make_plan(4096).as_dict()
    table = DispatchTable([
        dict(dtype="bfloat16", n=4096, rows=64 * 768, impl="triton", plan=plan, triton_ms=1, torch_ms=3),
        dict(dtype="bfloat16", n=4096, rows=768, impl="torch", plan=plan, triton_ms=1, torch_ms=0.5),
        dict(dtype="float32", n=4096, rows=64 * 768, impl="torch", plan=plan, triton_ms=5, torch_ms=3),
    ])
    bf = torch.bfloat16
    assert table.choose(bf, 4096, 64 * 768).impl == "triton"
    assert table.choose(bf, 4096, 2 * 768).impl == "torch"          # nearest rows: the B=1 entry
    assert table.choose(torch.float16, 4096, 64 * 768).impl == "triton"  # fp16 uses bf16's entries
    c = table.choose(bf, 8192, 64 * 768)                             # one octave away: plan rebuilt
    assert c.impl == "triton" and c.plan.n == 8192
    assert table.choose(bf, 1 << 16, 64 * 768).impl == "torch"       # far from any measurement
    assert table.choose(torch.float32, 4096, 64 * 768).impl == "torch"
    assert DispatchTable([]).choose(bf, 4096, 1).impl == "torch"


def test_dispatch_rules_before_the_table():
    u = torch.randn(2, 3, 100)
    assert choose(u, torch.randn(3, 8)).impl == "direct"
    assert choose(u.double(), torch.randn(3, 100, dtype=torch.float64)).impl == "torch"


@pytest.mark.parametrize("impl", ["triton", "fft", "direct", "auto"])
def test_causal_conv_cuda_impls_agree(impl):
    u, h, _ = _inputs(3, 2, 150, 150, seed=11, device=DEV)
    assert _rel(causal_conv_cuda(u, h, impl=impl), gated_conv_reference(u, h)) < 1e-5


# ---- GPU: half precision, large sizes, the op ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [1, 100, 1000, 5000, 16384])
def test_gpu_half(dtype, L):
    u, h, ex = _inputs(3, 16, L, L, seed=L, dtype=dtype, device="cuda")
    y = torch.full_like(u, float("nan"))
    fft_conv(u, h, out=y, **ex)
    assert _rel(y, gated_conv_reference(u, h, **ex)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("precision,L", [("tf32x3", 63), ("tf32x3", 1000), ("tf32x3", 8192), ("ieee", 63),
                                         ("ieee", 1000)])
def test_gpu_fp32(precision, L):
    u, h, _ = _inputs(3, 16, L, L, seed=L, device="cuda")
    plan = make_plan(conv_size(L, L), precision=precision)
    err = _rel(fft_conv(u, h, plan=plan), gated_conv_reference(u, h))
    assert err < (1e-5 if precision == "ieee" else 1e-4), err


@pytest.mark.gpu
def test_gpu_op_dispatches():
    from lcsm_compile.ops import causal_conv

    u, h, _ = _inputs(2, 16, 3000, 3000, seed=1, dtype=torch.bfloat16, device="cuda")
    assert _rel(causal_conv(u, h), gated_conv_reference(u, h)) < 1e-2


def test_committed_dispatch_table_is_valid():
    from lcsm_compile.kernels.dispatch import TABLE_PATH

    table = DispatchTable.load(TABLE_PATH)
    assert table.entries, f"no dispatch table at {TABLE_PATH}"
    for e in table.entries:
        assert e["impl"] in ("triton", "torch")
        if e["impl"] == "triton":
            FFTPlan(**e["plan"]).check()
            assert e["triton_ms"] < e["torch_ms"]
    for n in (512, 1024, 2048, 4096, 8192, 16384, 32768):  # the measured H100 prefill sizes, bf16
        assert table.choose(torch.bfloat16, n, 64 * 768).impl == "triton"
