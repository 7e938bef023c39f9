"""CUDA graphs for the online convolution engine: one graph per tile level.

The tile size changes with the position, but only through which of `num_levels(max_len)` levels
runs; the position itself is read on the device (engine docstring). So one graph per level
(plus one for "no tile", the last position) replays every position, and the host picks the
graph from its own position counter: no sync, no allocation after capture.

- `capture_tile_graphs(eng)`: the tiles only; `eng.capture_graphs()` installs them so that
  `eng.advance()` replays.
- `TokenGraphs(eng, fn)`: a whole token per level: `fn()` (the caller's step program writing
  static buffers, e.g. `lambda: eng.step_all(u_buf, out=y_buf)` or a model's decode step calling
  `eng.step(m, ...)` per layer) followed by the tiles. `graphs.replay()` runs one token.

Warm-up (Triton compiles, cuFFT plans) runs the captured work once at a scratch position,
t = max_len - 2, whose few touched values (the ring slots of t and t+1, pos) are saved and restored:
graphs can be captured before the prompt or in the middle of a generation.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from .engine import OnlineConv


@contextmanager
def scratch_position(eng: OnlineConv):
    """Run device work at position max_len - 2 and undo what it wrote there."""
    t = max(eng.max_len - 2, 0)
    slots = {t % eng.ring} | ({(t + 1) % eng.ring} if t + 1 < eng.max_len else set())
    written = [eng.pos, eng.X[..., t % eng.ring]] + [eng.A[..., s] for s in sorted(slots)]
    with eng._restored(*written):
        eng.pos.copy_(torch.tensor([t, t, 0], dtype=torch.int64))
        yield


def _levels(eng: OnlineConv) -> list[int]:
    return [-1, *range(eng.n_levels)]


def _check(eng: OnlineConv) -> None:
    if eng.backend != "triton" or eng.device.type != "cuda":
        raise RuntimeError("OnlineConv graphs need the Triton backend on a CUDA device")


def capture_tile_graphs(eng: OnlineConv) -> dict[int, torch.cuda.CUDAGraph]:
    _check(eng)
    return _capture(eng, lambda level: eng.run_tiles(level))


def _capture(eng: OnlineConv, work: Callable[[int], None]) -> dict[int, torch.cuda.CUDAGraph]:
    levels = _levels(eng)
    with scratch_position(eng):
        scratch = eng.pos.clone()
        stream = torch.cuda.Stream(eng.device)
        stream.wait_stream(torch.cuda.current_stream(eng.device))
        with torch.cuda.stream(stream):
            for level in levels:  # compiles kernels, makes cuFFT plans; repeated once for the allocator
                for _ in range(2):
                    # every call moves the device position on: back to the scratch position, or
                    # the warm-up would walk past max_len
                    eng.pos.copy_(scratch)
                    work(level)
        torch.cuda.current_stream(eng.device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for level in levels:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                work(level)
            graphs[level] = g
    return graphs


class TokenGraphs:
    """One CUDA graph per tile level holding `fn()` and then that level's tiles."""

    def __init__(self, eng: OnlineConv, fn: Callable[[], object]):
        _check(eng)
        self.eng = eng

        def work(level: int) -> None:
            fn()
            eng.run_tiles(level)

        self.graphs = _capture(eng, work)

    def replay(self) -> None:
        """One token: the step program and the tiles for the engine's current position."""
        eng = self.eng
        eng._check_can_step(range(eng.M))
        self.graphs[eng.tile_level()].replay()
        eng.advance(launch=False, check=False)
