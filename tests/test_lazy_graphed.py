"""The graphed lazy baseline: its Triton step vs the torch reference vs LazyConv; the decoder
with engine="lazy-graphed" vs the eager model; errors; on a GPU, its CUDA graphs."""
from __future__ import annotations

import functools

import pytest
import torch

import lcsm_compile
from lcsm_compile.kernels.lazy_step import launch_lazy_step, lazy_step_reference
from lcsm_compile.runtime.lazy import LazyConv
from lcsm_compile.runtime.lazy_graphed import GraphedLazyConv, window_level
from lcsm_compile.runtime.step_program import StepProgram
from lcsm_compile.zoo import ZOO, hyena_tiny

EAGER = {"inner_backend": "eager"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton step: interpreted on CPU
INTERPRET = DEVICE == "cpu"


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rel_per_position(got, want):
    g, w = got.double().flatten(2), want.double().flatten(2)
    return ((g - w).norm(dim=(0, 2)) / w.norm(dim=(0, 2)).clamp_min(1e-30)).max().item()


def test_windows_cover_the_history():
    for t in range(2100):
        window = 1 << (window_level(t) + 1)
        assert t + 1 <= window <= 2 * max(t, 1)
    for L in (1, 2, 3, 63, 64, 65, 1000, 1024):
        eng = GraphedLazyConv(torch.zeros(1, 1, 1), 1, L)
        assert window_level(L - 1) < eng.n_levels and eng.n_levels >= 1


# (max_len, D, B, K, P, steps): one-position history; windows 32 and 64 to the end; a filter
# shorter than the history; windows 1024; the 512 -> 1024 window boundary with K < max_len.
CASES = [(1, 5, 1, 1, 0, 1), (63, 37, 3, 63, 30, 33), (63, 7, 1, 9, 1, 20), (1000, 37, 1, 1000, 964, 36),
         (1000, 5, 3, 700, 508, 8)]


@pytest.mark.parametrize("L, D, B, K, P, steps", CASES, ids=lambda v: str(v))
def test_triton_step_equals_reference_and_lazy(L, D, B, K, P, steps):
    """Triton (step_all on strided views) vs torch reference (step per mixer) vs LazyConv, fp32."""
    M = 2
    g = torch.Generator().manual_seed(L + D + B)
    filters = (torch.randn(M, D, K, generator=g) / K**0.5).to(DEVICE)
    u = torch.randn(P + steps, M, B, D, generator=g).to(DEVICE)
    tri = GraphedLazyConv(filters, B, L, backend="triton")
    ref = GraphedLazyConv(filters, B, L, backend="torch")
    lazy = LazyConv(filters, B, L) if P else None  # LazyConv wants a prompt
    prompt = u[:P].permute(1, 2, 3, 0).contiguous()
    y_tri, y_ref = tri.prefill_all(prompt), ref.prefill_all(prompt)
    if lazy is not None:
        y_lazy = torch.stack([lazy.prefill(m, prompt[m]) for m in range(M)])
        assert _rel(y_tri, y_lazy) <= 1e-5 and _rel(y_ref, y_lazy) <= 1e-5
    out = torch.empty(B, M, D, device=DEVICE).transpose(0, 1)  # a strided (M, B, D) view
    for t in range(P, P + steps):
        u_t = u[t].transpose(0, 1).contiguous().transpose(0, 1)  # strided too
        tri.step_all(u_t, out=out)
        want = torch.stack([ref.step(m, u[t, m]) for m in range(M)])
        assert _rel(out, want) <= 1e-5, f"t={t}"
        if lazy is not None:
            got_lazy = torch.stack([lazy.step(m, u[t, m]) for m in range(M)])
            assert _rel(out, got_lazy) <= 1e-5 and _rel(want, got_lazy) <= 1e-5, f"t={t}"
            lazy.advance()
        tri.advance()
        ref.advance()
    assert int(tri.pos) == tri.position == P + steps
    assert torch.equal(tri.X, ref.X)


def test_kernel_wider_window_half_precision_and_past_the_end():
    """A window wider than needed sums the same; fp16 state with fp32 sums; a replay at
    t = max_len (a caller's bug) writes nothing."""
    g = torch.Generator().manual_seed(3)
    M, B, D, L = 3, 2, 19, 200
    h = (torch.randn(M, D, L, generator=g) / 10).to(DEVICE)
    X = torch.randn(M, B, D, L, generator=g).half().to(DEVICE)
    u = torch.randn(2, B, D, generator=g).half().to(DEVICE)
    t = 77
    want = lazy_step_reference(u, X.clone(), h, t, m0=1)
    for window in (128, 512):
        X1, y = X.clone(), torch.empty(2, B, D, dtype=torch.half, device=DEVICE)
        launch_lazy_step(u, y, X1, h, torch.tensor([t], device=DEVICE), 1, window, INTERPRET)
        assert _rel(y, want) <= 1e-3 and torch.equal(X1[1:, ..., t], u)
        assert torch.equal(X1[0], X[0]) and torch.equal(X1[..., t + 1 :], X[..., t + 1 :])
    X1, y = X.clone(), torch.zeros(2, B, D, dtype=torch.half, device=DEVICE)
    launch_lazy_step(u, y, X1, h, torch.tensor([L], device=DEVICE), 1, 256, INTERPRET)
    assert torch.equal(X1, X) and not y.any()


def test_decoder_matches_eager_every_position():
    torch.manual_seed(0)
    model = hyena_tiny(max_len=1024).eval()
    x = torch.randint(0, model.vocab_size, (3, 130), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :8], max_len=130, engine="lazy-graphed", **EAGER)
    assert {type(e) for e in dec.program.engines} == {GraphedLazyConv}
    for P in (1, 63):
        outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, 130)]
        assert _rel_per_position(torch.cat(outs, 1), ref[:, P - 1 :]) <= 1e-5, f"P={P}"
    if DEVICE == "cuda":
        return  # the Triton step inside step programs: test_cuda_graphs_match_eager_and_online_tokens
    # the Triton step (interpreted) inside the same step program
    prog = StepProgram(dec.plan, dec.device, engine_factory=functools.partial(GraphedLazyConv, backend="triton"),
                       like=dec.program)
    outs = [prog.prefill([x[:, :100]], 100)[0][:, -1:]] + [prog.step([x[:, t : t + 1]])[0] for t in range(100, 130)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 99:]) <= 1e-5


def test_errors_leave_the_state_intact():
    g = torch.Generator().manual_seed(5)
    filters = torch.randn(2, 3, 8, generator=g)
    eng, lazy = GraphedLazyConv(filters, 1, 6), LazyConv(filters, 1, 6)
    u = torch.randn(6, 2, 1, 3, generator=g)
    with pytest.raises(RuntimeError, match="step before prefill"):
        eng.step(0, u[0, 0])
    with pytest.raises(RuntimeError, match="advance before prefill"):
        eng.advance()
    for m in range(2):
        eng.prefill(m, u[:4, m].permute(1, 2, 0).contiguous())
        lazy.prefill(m, u[:4, m].permute(1, 2, 0).contiguous())
    X = eng.X.clone()
    with pytest.raises(ValueError, match="step input"):
        eng.step(0, u[4, 0].double())
    with pytest.raises(ValueError, match="mixer index"):
        eng.step(2, u[4, 0])
    assert torch.equal(eng.X, X) and eng.position == 4
    for t in (4, 5):
        eng.step(0, u[t, 0])
        with pytest.raises(RuntimeError, match=r"mixer\(s\) \[1\] stepped"):
            eng.advance()
        assert _rel(eng.step(1, u[t, 1]), lazy.step(1, u[t, 1])) <= 1e-6
        eng.advance()
        lazy.advance()
    X = eng.X.clone()
    with pytest.raises(RuntimeError, match="past max_len=6"):
        eng.step(0, u[0, 0])
    assert torch.equal(eng.X, X) and eng.position == 6 and int(eng.pos) == 6
    with pytest.raises(RuntimeError, match="prefill after decoding started"):
        eng.prefill(0, u[:4, 0].permute(1, 2, 0).contiguous())

    model = hyena_tiny(max_len=64).eval()
    x = torch.randint(0, model.vocab_size, (1, 24), generator=g)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :8], max_len=24, engine="lazy-graphed", **EAGER)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(x[:, :1])
    outs = [dec.prefill(x[:, :20])] + [dec.step(x[:, t : t + 1]) for t in range(20, 24)]
    with pytest.raises(RuntimeError, match="past max_len"):
        dec.step(x[:, :1])
    assert dec.position == 24
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 19:]) <= 1e-5


@pytest.mark.gpu
def test_cuda_graphs_match_eager_and_online_tokens():
    model = ZOO["hyena_lm"].build().to("cuda")
    x = ZOO["hyena_lm"].make_inputs(model, 2, 300, torch.Generator().manual_seed(0))[0].to("cuda")
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=300, engine="lazy-graphed", **EAGER)
    assert dec._use_graphs
    for P in (1, 64):
        outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, 300)]
        n_levels = dec.program.engines[0].n_levels
        assert list(dec._graphs.graphs) == [-1, *range(n_levels)]
        err = _rel_per_position(torch.cat(outs, 1), ref[:, P - 1 :])
        assert err <= 1e-4, f"P={P}: {err:.2e}"
    online = lcsm_compile.decoder(model, x[:, :21], max_len=300, **EAGER)

    def greedy(d):
        out, toks = d.prefill(x[:, :9]), []
        for _ in range(120):
            toks.append(out[:, -1].argmax(-1, keepdim=True))
            out = d.step(toks[-1])
        return torch.cat(toks, 1)

    assert torch.equal(greedy(dec), greedy(online))
    # bf16 state, fp32 sums: the kernel on the GPU against the reference
    g = torch.Generator().manual_seed(2)
    M, B, D, L, t = 3, 2, 864, 5000, 4321
    h = torch.randn(M, D, L, generator=g).cuda() / 50
    X = torch.randn(M, B, D, L, generator=g).cuda().bfloat16()
    u = torch.randn(M, B, D, generator=g).cuda().bfloat16()
    want = lazy_step_reference(u, X.clone(), h, t)
    y = torch.empty_like(u)
    launch_lazy_step(u, y, X, h, torch.tensor([t], device="cuda"), 0, 8192, interpret=False)
    assert _rel(y, want) <= 1e-2
