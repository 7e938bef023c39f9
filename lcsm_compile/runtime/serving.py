"""Prefix-extension serving: `torch.compile(model, backend="lcsm", options={"decode": True})`.

A compiled model called again with inputs that extend its previous call by k positions (same
batch, same prefix) computes only the k new positions with the step program, and returns what
eager would: the full outputs, as views of a preallocated output buffer (grown by doubling; a
buffer is never rewritten where a previous result can see it). The views are not contiguous at
batch > 1 (`reshape`, not `view`); a copy per call would cost O(L) per token, O(L^2) in all.
A result changed in place by the caller changes the buffer's version: the next call then runs a
fresh prefill instead of extending it. Any other call runs a fresh prefill too, and so does the
call after one that failed part way. So a loop that re-runs the model on its growing sequence, like HF
`generate(use_cache=False)`, decodes in O(L log^2 L) without a change to its code.

Only graphs with a dynamic time dim are served (dynamo makes L dynamic from the second length
it sees); a graph that cannot be incrementalized runs unchanged, with a warning saying why.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, fx

from ..passes.capture import CapturedGraph, GraphInput
from ..passes.incrementalize import IncrementalizeError, incrementalize
from ..passes.pipeline import CompileReport, counters
from ..settings import Settings
from .segment_compile import SegmentCompiler
from .step_program import StepProgram

__all__ = ["serve", "ServedGraph", "decode_problems", "served_max_len"]

MAX_STEPS_PER_CALL = 64  # a longer extension is cheaper as a fresh prefill
_warned: set[str] = set()


def _copy(cg: CapturedGraph) -> CapturedGraph:
    """The graph copied (inner compilers may rewrite theirs in place), sharing weights and filters."""
    graph, val_map = fx.Graph(), {}
    out = graph.graph_copy(cg.gm.graph, val_map)
    graph.output(out)
    gm = fx.GraphModule(cg.gm, graph)
    inputs = [GraphInput(val_map[i.node], i.role, i.value, i.source, i.time_dim) for i in cg.inputs]
    return CapturedGraph(gm, inputs, cg.length, cg.time_symbol, dict(cg.facts))


class ServedGraph:
    def __init__(self, cg: CapturedGraph, program: StepProgram, fallback: Callable, settings: Settings):
        self.cg, self.program, self.fallback = cg, program, fallback
        self.plan = program.plan
        self.seq_index = [i for i, inp in enumerate(cg.inputs) if inp.role == "sequence"]
        self.dims = [cg.inputs[i].time_dim for i in self.seq_index]
        self.use_graphs = (program.device.type == "cuda" and settings.cuda_graphs
                           and all(getattr(e, "backend", "") == "triton" for e in program.engines))
        self._graphs = None
        self._inputs: list[Tensor] | None = None  # the previous call's sequence inputs
        self._buffers: list = []
        self._versions: list[int] = []  # the buffers' version counters after our last write
        self._length = 0

    def __call__(self, *args):
        seq = [args[i] for i in self.seq_index]
        n = int(seq[0].shape[self.dims[0]])
        if not 1 <= n <= self.plan.max_len or any(s.shape[d] != n for s, d in zip(seq, self.dims)):
            self._inputs = None
            return self.fallback(*args)
        seq = [s.contiguous() for s in seq]
        k = self._extends(seq, n)
        self._inputs = None  # until this call has finished: one that fails leaves no prefix to extend
        if k is None:
            self._prefill(seq, n)
        else:
            for t in range(self._length, n):
                self._step([s.narrow(d, t, 1) for s, d in zip(seq, self.dims)], t)
        self._inputs, self._length = [s.clone() for s in seq], n
        self._versions = [b._version if d is not None else None for b, d in zip(self._buffers, self.plan.output_time)]
        return tuple(b.narrow(d, 0, n) if d is not None else b for b, d in zip(self._buffers, self.plan.output_time))

    def _extends(self, seq: list[Tensor], n: int) -> int | None:
        if self._inputs is None or not 0 <= n - self._length <= MAX_STEPS_PER_CALL:
            return None
        if any(v is not None and b._version != v for b, v in zip(self._buffers, self._versions)):
            return None  # a result was written in place: its prefix is no longer the model's
        for new, old, d in zip(seq, self._inputs, self.dims):
            if new.shape[:d] != old.shape[:d] or new.shape[d + 1:] != old.shape[d + 1:] or new.dtype != old.dtype:
                return None
            if not torch.equal(new.narrow(d, 0, self._length), old):
                return None
        return n - self._length

    def _prefill(self, seq: list[Tensor], n: int) -> None:
        outs = self.program.prefill(seq, n)
        counters["decode"]["serving_prefill_positions"] += n
        cap = min(self.plan.max_len, max(2 * n, n + 64))
        self._buffers = []
        for o, d in zip(outs, self.plan.output_time):
            if d is None:
                self._buffers.append(o)
                continue
            shape = list(o.shape)
            shape[d] = cap
            buf = torch.empty(shape, dtype=o.dtype, device=o.device)
            buf.narrow(d, 0, n).copy_(o)
            self._buffers.append(buf)

    def _step(self, seq_t: list[Tensor], t: int) -> None:
        if self.use_graphs:
            if self._graphs is None:
                from .cuda_graphs import StepGraphs  # noqa: PLC0415

                self._graphs = StepGraphs(self.program)
            outs = self._graphs.replay(seq_t)
        else:
            outs = self.program.step(seq_t)
        counters["decode"]["serving_step_positions"] += 1
        for i, (o, d) in enumerate(zip(outs, self.plan.output_time)):
            if d is None:
                self._buffers[i] = o
                continue
            buf = self._buffers[i]
            if buf.shape[d] <= t:  # grow: a new buffer, so earlier results keep theirs
                shape = list(buf.shape)
                shape[d] = min(self.plan.max_len, 2 * buf.shape[d])
                grown = torch.empty(shape, dtype=buf.dtype, device=buf.device)
                grown.narrow(d, 0, t).copy_(buf.narrow(d, 0, t))
                self._buffers[i] = buf = grown
            buf.narrow(d, t, 1).copy_(o)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def served_max_len(cg: CapturedGraph, settings: Settings) -> int:
    """The longest sequence a served graph decodes: the max_len option, else the fold length."""
    return settings.max_len or int(cg.facts.get("fold_length") or cg.length)


def decode_problems(cg: CapturedGraph, report: CompileReport, settings: Settings) -> list[tuple[str, str]]:
    """Why this rewritten graph has no step form ([] when it has one); for explain()."""
    try:
        incrementalize(_copy(cg), settings, served_max_len(cg, settings), report.unsupported)
    except IncrementalizeError as e:
        return e.problems
    return []


def serve(cg: CapturedGraph, report: CompileReport, settings: Settings,
          compile_fallback: Callable[[], Callable]) -> Callable:
    """The backend's callable for one graph when options={"decode": True}."""
    if not cg.symbolic:  # a first call: dynamo makes L dynamic when a second length comes
        return compile_fallback()
    untimed = [i.source for i in cg.inputs if i.role == "sequence" and i.time_dim is None]
    if untimed:
        _warn_once(f"lcsm serving: input {untimed[0]} has no time axis; this graph runs without "
                   "prefix-extension decoding")
        return compile_fallback()
    own = _copy(cg)
    fallback = compile_fallback()
    try:
        plan = incrementalize(own, settings, served_max_len(cg, settings), report.unsupported)
        device = next((i.value.device for i in own.inputs if isinstance(i.value, Tensor)), torch.device("cpu"))
        program = StepProgram(plan, device, compiler=SegmentCompiler.for_device(device, settings))
    except IncrementalizeError as e:
        if settings.strict:
            raise
        _warn_once(f"{e}; this graph runs without prefix-extension decoding")
        return fallback
    counters["decode"]["served_graphs"] += 1
    return ServedGraph(own, program, fallback, settings)
