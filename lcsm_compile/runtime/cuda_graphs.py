"""CUDA graphs for the step program: one graph per tile level, each holding a whole token.

    inputs -> segment 0 -> conv steps -> segment 1 -> ... -> outputs, then the tiles of every
    engine at that level, then t += 1

Nothing a launch reads depends on the position except through device tensors (the engines' `pos`,
the program's `t`), so which graph runs is the only thing that changes with t, and the host knows
it from its own counter (OnlineConv.tile_level): one replay per token, no sync, no allocation.
An engine whose step also depends on the level (GraphedLazyConv: the window it sums) has
`capture_level(level)`, called before each level's token is run here.

With a `feed` (Decoder._fed_step: generate's greedy tokens), the input buffers are the feed's and
the graph ends with `feed(outputs)`, which writes the next position's inputs into them: a loop
of replays then needs nothing from the host.

Capture happens on the first step after a prefill (the engines must hold a prompt). Warm-up runs
every graph's work twice at the scratch position max_len - 2 (kernel compiles, cuFFT plans), each
time from that position again; the engines undo what they wrote there (their scratch_position),
and the program's rings and `t` (and a feed's buffers) are saved and restored around it.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor

from ..passes.incrementalize import shape_at
from .step_program import StepProgram, as_captured

__all__ = ["StepGraphs"]


class StepGraphs:
    @as_captured  # the tiles are captured too, not only run_segments
    def __init__(self, program: StepProgram, feed=None):
        self.program = p = program
        plan, dev = p.plan, p.device
        self.engines = p.engines
        self.inputs = [torch.zeros(shape_at(p.cg, x.meta["val"], 1), dtype=x.meta["val"].dtype, device=dev)
                       for x in plan.seq_inputs]
        self.feed = feed
        if feed is not None:
            like = [(b.shape, b.dtype, b.device) for b in self.inputs]
            if [(b.shape, b.dtype, b.device) for b in feed.inputs] != like:
                raise ValueError("lcsm decoder: a feed's input buffers must match the step's inputs")
            self.inputs = list(feed.inputs)
        last = {key[1] for key in plan.segments[-1].outputs if key[0] == "out"}
        self.outputs = {i: torch.empty(shape, dtype=dtype, device=dev)
                        for i, (shape, dtype) in p.out_shapes.items() if i in last}
        # One graph per tile level of the tiled engines (they share max_len, hence the schedule);
        # recurrences (n_levels = 0) run the same launches at every position.
        self.tiled = [eng for eng in self.engines if eng.n_levels]
        self.levels = [-1, *range(self.tiled[0].n_levels)] if self.tiled else [None]
        # Engines whose step itself depends on the level (GraphedLazyConv: the window it sums)
        # are told the level of each token warmed up or captured, and released afterwards.
        self.leveled = [eng for eng in self.engines if hasattr(eng, "capture_level")]
        t_scratch = max(p.max_len - 2, 0)
        with ExitStack() as stack:
            for eng in self.engines:
                stack.enter_context(eng.scratch_position())
            for eng in self.leveled:
                stack.callback(eng.capture_level, None)
            scratch = [eng.pos.clone() for eng in self.engines]
            saved_t, saved_rings = p.t.clone(), {k: r.clone() for k, r in p.rings.items()}
            fed = list(feed.buffers) if feed is not None else []
            saved_fed = [b.clone() for b in fed]

            def from_scratch() -> None:
                for eng, pos in zip(self.engines, scratch):
                    eng.pos.copy_(pos)
                p.t.fill_(t_scratch)

            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream), torch.no_grad():
                for level in self.levels:
                    for _ in range(2):
                        from_scratch()
                        self._token(level)
            torch.cuda.current_stream(dev).wait_stream(stream)
            from_scratch()
            pool = torch.cuda.graph_pool_handle()
            self.graphs = {}
            with torch.no_grad():
                for level in self.levels:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self._token(level)
                    self.graphs[level] = g
            torch.cuda.synchronize(dev)
            p.t.copy_(saved_t)
            for k, r in p.rings.items():
                r.copy_(saved_rings[k])
            for b, saved in zip(fed, saved_fed):
                b.copy_(saved)

    def _token(self, level: int | None) -> None:
        p = self.program
        for eng in self.leveled:
            eng.capture_level(level)
        outs = p.run_segments(self.inputs)
        for i, v in outs.items():
            self.outputs[i].copy_(v)
        if level is not None:
            for eng in self.engines:
                eng.run_tiles(level)
        p.t.add_(1)
        if self.feed is not None:  # t is now the next input's position, as after StepProgram.step
            self.feed(p.outputs_of(self.outputs))

    def replay(self, seq_values: list[Tensor] | None) -> list:
        """One token: the outputs (static buffers, overwritten by the next replay). None: the
        inputs are already in place (a feed wrote them)."""
        for buf, v in zip(self.inputs, seq_values or ()):
            buf.copy_(v)
        for eng in self.engines:
            eng._check_can_step(range(eng.M))
        level = self.tiled[0].tile_level() if self.tiled else None
        self.graphs[level].replay()
        for eng in self.engines:
            eng.advance(launch=False, check=False)
        self.program.position += 1
        return self.program.outputs_of(self.outputs)
