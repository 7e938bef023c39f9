"""What benchmarks/online_conv.py measures: correctness of every y_t, the direct/FFT tile crossover,
the lazy and eager baselines and OnlineConv itself (the script runs them and reports).

Named with a leading underscore: `lcsm-compile bench` lists benchmarks/*.py except helpers like this one.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # --smoke on CPU: Triton kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CUDA, DEV, log, rel, sync  # noqa: E402, F401 - online_conv.py imports log from here

from lcsm_compile.kernels import OnlineConv  # noqa: E402
from lcsm_compile.kernels.online_conv.schedule import level_at, level_frequencies  # noqa: E402

SDT = torch.bfloat16 if CUDA else torch.float32  # bf16 is wrong in the Triton interpreter
BACKEND = "triton"  # the engine's GPU path; on CPU (--smoke) the same kernels, interpreted


def filters_for(M, D, L, seed=0):
    """Random decaying filters (Hyena-like), fp32, on the device; never zeros."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    t = torch.arange(L, device=DEV, dtype=torch.float32)
    decay = torch.exp(-t[None, :] / (8.0 + torch.rand(D, 1, device=DEV, generator=g) * L / 4))
    out = torch.empty(M, D, L, device=DEV)
    for m in range(M):
        out[m] = torch.randn(D, L, device=DEV, generator=g) * decay / (1 + t / 16).sqrt()
    return out


# ------------------------------------------------------------------ timing helpers
class Runner:
    """One token per replay(): CUDA graphs on a GPU, the eager engine API on CPU."""

    def __init__(self, eng, fn):
        self.eng, self.fn = eng, fn
        if CUDA:
            from lcsm_compile.kernels.online_conv.graphs import TokenGraphs

            self.tg = TokenGraphs(eng, fn)

    def replay(self):
        if CUDA:
            self.tg.replay()
        else:
            self.fn()
            self.eng.advance(check=False)

    def tight(self, levels):
        """Replay a precomputed level sequence with no engine bookkeeping (host position stale)."""
        if not CUDA:
            for _ in levels:
                self.replay()
            return
        graphs = self.tg.graphs
        for lv in levels:
            graphs[lv].replay()


def elapsed(fn):
    """Seconds of device time for fn() (events on CUDA)."""
    if CUDA:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def graph_time(fn, reps=20, outer=5):
    """Median seconds per fn() call, fn captured `reps` times in one CUDA graph (no launch gaps
    from the host), warm-up excluded."""
    if not CUDA:
        fn()
        return statistics.median(elapsed(fn) for _ in range(2))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    times = [elapsed(g.replay) / reps for _ in range(outer)]
    del g
    return statistics.median(times)


# ------------------------------------------------------------------ correctness
def check_every_step(dtype, M, D, B, L, P, direct_max, tol, mode):
    """Every prefill output and every y_t against an fp64 FFT convolution. mode: "token_graphs"
    (TokenGraphs, step_all), "tile_graphs" (step per mixer, advance() replays tile graphs),
    "eager" (step per mixer, advance() launches)."""
    from lcsm_compile.ops import causal_conv_fft

    h = filters_for(M, D, L, seed=1)
    u = torch.randn(L, M, B, D, device=DEV).to(dtype)
    eng = OnlineConv(h, B, L, dtype=dtype, direct_max=direct_max, backend=BACKEND)
    if mode == "tile_graphs" and CUDA:
        eng.capture_graphs()
    y_pre = eng.prefill_all(u[:P].permute(1, 2, 3, 0).contiguous())
    u_buf = torch.empty(M, B, D, dtype=dtype, device=DEV)
    y_buf = torch.empty_like(u_buf)
    run = Runner(eng, lambda: eng.step_all(u_buf, out=y_buf)) if mode == "token_graphs" else None
    ys = torch.full((L, M, B, D), float("nan"), dtype=dtype, device=DEV)
    for t in range(P, L):
        if run is not None:
            u_buf.copy_(u[t])
            run.replay()
            ys[t] = y_buf
        else:
            for m in range(M):
                ys[t, m] = eng.step(m, u[t, m])
            eng.advance()
    worst = 0.0
    for m in range(M):
        ref = causal_conv_fft(u[:, m].permute(1, 2, 0).double(), h[m].double())  # (B, D, L)
        if P:
            worst = max(worst, rel(y_pre[m], ref[..., :P]))
        got = ys[P:, m].permute(1, 2, 0).double()
        err_t = (got - ref[..., P:]).norm(dim=(0, 1)) / ref[..., P:].norm(dim=(0, 1)).clamp_min(1e-300)
        worst = max(worst, err_t.max().item())
    ok = worst <= tol and not ys[P:].isnan().any().item() and eng.position == L
    log(f"  check {str(dtype):15s} {mode:12s} M={M} D={D} B={B} L={L} P={P} direct_max={eng.direct_max} "
        f"dot_min={eng.dot_min}: "
        f"worst relative error over all y_t {worst:.2e} (tol {tol:.0e}) {'OK' if ok else 'FAIL'}")
    return {"dtype": str(dtype), "mode": mode, "M": M, "D": D, "B": B, "L": L, "P": P,
            "direct_max": eng.direct_max, "worst_rel_err": worst, "tol": tol, "ok": ok}


def check_from_history(eng, saved, bank):
    """y at saved positions against sum_s h[t-s] u[s], the input at s being bank[s % len(bank)]
    (the engine keeps only the last inputs: its history is a ring)."""
    worst = 0.0
    for t, y in saved.items():
        idx = torch.arange(t + 1, device=bank.device) % bank.shape[0]
        for m in range(eng.M):
            hist = bank[idx, m].permute(1, 2, 0).float()  # (B, D, t+1)
            ref = (hist * eng.h[m, :, : t + 1].flip(-1)).sum(-1)
            worst = max(worst, rel(y[m], ref))
    return worst


# ------------------------------------------------------------------ per-level costs
def level_costs(eng, levels, reps=20):
    """Device seconds of run_tiles(level) per level, at a mid-sequence position (the tiles read
    pos[1] and write pos[0], so repeating them in place is safe)."""
    L = eng.max_len
    out = {}
    for lv in levels:
        U = 1 << max(lv, 0)
        t = max(L // 2 - 1, U - 1)
        eng.pos.copy_(torch.tensor([t, t, 0]))
        big = U > 4096
        out[lv] = graph_time(lambda lv=lv: eng.run_tiles(lv), reps=2 if big else reps, outer=3 if big else 5)
    eng.reset()
    return out


def crossover(M, D, B, L, max_direct=512, max_fma=64):
    """Direct vs FFT tile time per tile size, the direct tile both as scalar FMAs and as tl.dot.
    direct_max: the largest U up to which the best direct kernel is never slower than the FFT;
    dot_min: the smallest U >= 16 from which tl.dot beats the FMA kernel."""
    h = filters_for(M, D, L, seed=2)
    eng_d = OnlineConv(h, B, L, dtype=SDT, direct_max=1 << 30, backend=BACKEND)
    eng_d.X.normal_()
    n_levels = min(eng_d.n_levels, 11)
    eng_d.dot_min = 1 << 30
    fma = level_costs(eng_d, [k for k in range(1, n_levels) if (1 << k) <= min(max_direct, max_fma)])
    eng_d.dot_min = 16
    dot = level_costs(eng_d, [k for k in range(4, n_levels) if (1 << k) <= max_direct])
    del eng_d
    eng_f = OnlineConv(h, B, L, dtype=SDT, direct_max=0, backend=BACKEND)
    eng_f.X.normal_()
    fft = level_costs(eng_f, list(range(n_levels)))
    del eng_f
    rows, direct_max, dot_min, still_direct = [], 0, 1 << 30, True
    for k in range(n_levels):
        U = 1 << k
        a, d, f = fma.get(k), dot.get(k), fft[k]
        best = min(x for x in (a, d, float("inf")) if x is not None)
        if k >= 1 and still_direct and best <= f:
            direct_max = U
        elif k >= 1:
            still_direct = False
        if d is not None and (a is None or d < a):
            dot_min = min(dot_min, U)
        rows.append({"U": U, "fma_us": a and a * 1e6, "dot_us": d and d * 1e6, "fft_us": f * 1e6})
        fmt = lambda x: "       -" if x is None else f"{x * 1e6:8.1f}"  # noqa: E731
        log(f"  U={U:5d}  direct fma {fmt(a)} us  dot {fmt(d)} us   fft {f * 1e6:8.1f} us")
    if dot_min > max_fma:  # the FMA kernel was not measured past max_fma
        direct_max = min(direct_max, max_fma)
    return max(direct_max, 1), dot_min, rows


# ------------------------------------------------------------------ baselines
def lazy_cost(M, D, B, L, samples):
    C = M * D
    X = torch.randn(C, B, L, device=DEV, dtype=SDT)
    hrev = torch.randn(C, L, device=DEV, dtype=SDT)
    u = torch.randn(C, B, device=DEV, dtype=SDT)
    best = {}
    for t in samples:
        def bmm_step(t=t):
            X[:, :, t] = u
            return torch.bmm(X[:, :, : t + 1], hrev[:, L - 1 - t :, None])

        def sum_step(t=t):
            X[:, :, t] = u
            return (X[:, :, : t + 1] * hrev[:, None, L - 1 - t :]).sum(-1, dtype=torch.float32)

        times = {"bmm": graph_time(bmm_step, reps=3, outer=3), "mul_sum": graph_time(sum_step, reps=3, outer=3)}
        best[t] = min(times.values())
        log(f"    lazy t={t}: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in times.items()))
    del X, hrev
    return statistics.mean(best.values())


def eager_cost(M, D, B, L, samples):
    C = M * D
    A = torch.randn(C, B, L, device=DEV)
    h = torch.randn(C, L, device=DEV, dtype=SDT)
    u = torch.randn(C, B, device=DEV)
    times = []
    for t in samples:
        def step(t=t):
            y = A[:, :, t] + h[:, None, 0] * u
            A[:, :, t + 1 :].addcmul_(u[:, :, None], h[:, None, 1 : L - t])
            return y

        times.append(graph_time(step, reps=3, outer=3))
    del A, h
    return statistics.mean(times)


# ------------------------------------------------------------------ ours
def ours_cost(M, D, B, L, direct_max, dot_min, check_positions, breakdown):
    h = filters_for(M, D, L, seed=3)
    eng = OnlineConv(h, B, L, dtype=SDT, direct_max=direct_max, dot_min=dot_min, backend=BACKEND)
    mem = eng.memory_elements()
    res = {"memory_elements": mem}
    u_buf = torch.randn(M, B, D, device=DEV, dtype=SDT)
    y_buf = torch.empty_like(u_buf)
    # 1. correctness at this size: a bank of random inputs, picked on the device by position
    bank = torch.randn(61, M, B, D, device=DEV, dtype=SDT)

    def step_varying():
        u_buf.copy_(bank.index_select(0, eng.pos[:1] % bank.shape[0])[0])
        eng.step_all(u_buf, out=y_buf)

    eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
    run = Runner(eng, step_varying)
    saved = {}
    for t in range(L):
        run.replay()
        if t in check_positions:
            saved[t] = y_buf.clone()
    res["check_rel_err"] = check_from_history(eng, saved, bank)
    # the history ring holds the last R inputs
    res["check_history_ok"] = all(torch.equal(eng.X[..., t % eng.ring], bank[t % bank.shape[0]])
                                  for t in {L - eng.ring, (2 * L - eng.ring) // 2, L - 1})
    del run
    # 2. timing: the mixer alone (a fixed random input buffer), whole generation of L tokens
    eng.reset()
    eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
    run = Runner(eng, lambda: eng.step_all(u_buf, out=y_buf))
    levels = [level_at(t, L) for t in range(L)]
    api, tight = [], []
    for _ in range(2 if L <= 1 << 14 else 1):
        eng.reset()
        eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
        sync()
        api.append(elapsed(lambda: [run.replay() for _ in range(L)]) / L)
        eng.reset()
        eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
        sync()
        tight.append(elapsed(lambda: run.tight(levels)) / L)
    res["us_per_token_api"] = min(api) * 1e6
    res["us_per_token_tight"] = min(tight) * 1e6
    del run
    if breakdown:
        eng.reset()
        eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
        eng.pos.copy_(torch.tensor([L // 2, L // 2, 0]))
        step_all = graph_time(lambda: eng.step_all(u_buf, out=y_buf))
        step_each = graph_time(lambda: [eng.step(m, u_buf[m], out=y_buf[m]) for m in range(M)], reps=5)
        eng._stepped.clear()
        costs = level_costs(eng, list(range(eng.n_levels)))
        freqs = level_frequencies(eng.n_levels)
        model = step_all + sum(f * costs[k] for k, f in enumerate(freqs))
        res["breakdown_us"] = {"step_all": step_all * 1e6, "step_per_mixer_x_M": step_each * 1e6,
                               "tiles_by_level": {str(1 << k): v * 1e6 for k, v in costs.items()},
                               "model_us_per_token": model * 1e6}
    del eng
    return res



# ------------------------------------------------------------------ debugging
def diagnose(L, M, D, B, direct_max, graphs=True):
    """Reproduce the graph warm-up at length L op by op, synchronizing after each."""
    h = filters_for(M, D, L, seed=3)
    eng = OnlineConv(h, B, L, dtype=SDT, direct_max=direct_max, backend=BACKEND)
    eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
    u_buf = torch.randn(M, B, D, device=DEV, dtype=SDT)
    y_buf = torch.empty_like(u_buf)
    t = L - 2
    for level in [-1, *range(eng.n_levels)]:
        eng.pos.copy_(torch.tensor([t, t, 0]))
        eng.step_all(u_buf, out=y_buf)
        sync()
        eng.run_tiles(level)
        sync()
        log(f"  [diag] L={L} level {level} (U={1 << max(level, 0)}) ok, pos {eng.pos.tolist()}")
    log(f"  [diag] L={L}: all levels ran; A finite: {bool(torch.isfinite(eng.A).all())}")
    if not graphs:
        return
    eng.reset()
    eng.prefill_all(torch.empty(M, B, D, 0, device=DEV, dtype=SDT))
    bank = torch.randn(61, M, B, D, device=DEV, dtype=SDT)

    def step_varying():
        u_buf.copy_(bank.index_select(0, eng.pos[:1] % bank.shape[0])[0])
        eng.step_all(u_buf, out=y_buf)

    run = Runner(eng, step_varying)
    sync()
    log(f"  [diag] L={L}: token graphs captured")
    for _ in range(L):
        run.replay()
    sync()
    log(f"  [diag] L={L}: {L} tokens replayed; position {eng.position}, device {eng.pos.tolist()}")

