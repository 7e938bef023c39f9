"""benchmarks/generate.py's lazy baselines: per-token costs of step programs of the decoder's plan
(sharing its compiled segments) whose long convs sum their whole history.

- lazy: `LazyConv`, eager launches (its shapes change with t): timed at several t.
- lazy, graphed: `GraphedLazyConv`, one CUDA graph replay per token like ours. A token at t
  replays the graph of its window level (the smallest power of two > t); within a level the cost
  is affine in t (the reads grow with t, the launches do not), so each level used by a
  generation is timed at both ends. On CPU (--smoke) the same positions, stepped without graphs.
"""
from __future__ import annotations

import torch
from _common import CUDA, log, timed
from _generate_report import P, lazy_graphed_positions

from lcsm_compile.runtime.lazy import LazyConv
from lcsm_compile.runtime.lazy_graphed import GraphedLazyConv, window_level
from lcsm_compile.runtime.step_program import StepProgram


@torch.no_grad()
def lazy_costs(dec, L: int, reps: int, vocab: int) -> dict:
    """Seconds per token of the lazy decoder at several positions t (history of t inputs)."""
    prog = StepProgram(dec.plan, dec.device, engine_factory=LazyConv, like=dec.program)
    ids = torch.randint(0, vocab, (dec.batch, P), device=dec.device)
    prog.prefill([ids], P)
    x = [ids[:, :1].contiguous()]
    ts = sorted({t for t in (P, L // 8, L // 4, L // 2, 3 * L // 4, L - reps - 2) if P <= t <= L - reps - 2})
    costs = {}

    def run(t):
        for eng in prog.engines:  # benchmark only: jump the history length (its contents do not matter)
            eng._position = t
        prog.position = t
        for _ in range(reps):
            prog.step(x)

    for t in ts:
        costs[t] = timed(lambda t=t: run(t)) / reps
        log(f"    lazy t={t}: {costs[t] * 1e6:.0f} us/token")
    return costs


@torch.no_grad()
def lazy_graphed_costs(dec, L: int, reps: int, vocab: int) -> dict:
    """Seconds per token of the graphed lazy decoder at both ends of every window level a
    generation of positions P .. L-1 uses."""
    prog = StepProgram(dec.plan, dec.device, engine_factory=GraphedLazyConv, like=dec.program)
    ids = torch.randint(0, vocab, (dec.batch, P), device=dec.device)
    prog.prefill([ids], P)
    x = [ids[:, :1].contiguous()]

    def at(t: int) -> None:
        # benchmark only: jump to position t (the history's contents do not matter)
        for eng in prog.engines:
            eng._position = t
            eng.pos.fill_(t)
        prog.t.fill_(t)
        prog.position = t

    costs = {}
    if CUDA:
        from lcsm_compile.runtime.cuda_graphs import StepGraphs

        graphs = StepGraphs(prog)
        for t in lazy_graphed_positions(L):
            g = graphs.graphs[window_level(t)]
            base = timed(lambda t=t: [at(t) for _ in range(reps)]) / reps
            costs[t] = timed(lambda t=t, g=g: [(at(t), g.replay()) for _ in range(reps)]) / reps - base
            log(f"    lazy graphed t={t} (window {2 << window_level(t)}): {costs[t] * 1e6:.1f} us/token")
    else:
        for t in lazy_graphed_positions(L):
            costs[t] = timed(lambda t=t: [(at(t), prog.step(x)) for _ in range(reps)]) / reps
            log(f"    lazy graphed (no graphs on CPU) t={t}: {costs[t] * 1e6:.0f} us/token")
    return costs
