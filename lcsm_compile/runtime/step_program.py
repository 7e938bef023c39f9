"""The step program: a StepPlan's segments traced for one position, compiled, run with state.

    prefill(inputs, P)   the full graph at length P; long convs prefill the online engine, short
                         ones fill their rings; returns the graph's outputs at all P positions
    step(inputs_t)       segment 0, long-conv steps, segment 1, ..., last segment; then the tiles
                         of every engine and t += 1; returns the outputs at t

State, preallocated and written in place (CUDA graphs stay valid across prefill and reset):
  engines    one OnlineConv per (channels, batch, dtype) group of long convs: M = its size
  conv_out   (B', C) per long conv: its engine's output at the current position
  rings      (B', C, K-1) per short conv: its last K-1 inputs, oldest first
  t          (1,) int64 on the device: where positional tables are indexed

Segments are traced with make_fx from the plan's nodes at length 1, every weight and table an
input (so identical layers trace to identical graphs and inductor's cache compiles them once);
a SegmentCompiler (runtime/segment_compile.py) compiles each with inductor or keeps the traced graphs.
`floor=True` removes the long mixers (y = u, no engine): the position-wise floor of benchmarks.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..passes.fold import prefix_allowance
from ..passes.incrementalize import (
    CAUSAL_CONV,
    IncrementalizeError,
    Segment,
    StepPlan,
    ancestors,
    evaluate,
    input_env,
    shape_at,
)
from ..passes.region import describe_node
from .segment_compile import SegmentCompiler

__all__ = ["StepProgram", "as_captured"]

aten = torch.ops.aten


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rounding_close(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of computing them at two lengths (a GPU's matmuls round
    differently by shape): relative L2 error within fold's prefix allowance for the dtype."""
    if not a.is_floating_point() or not bool(torch.isfinite(b).all()):
        return False
    tol = prefix_allowance(a.dtype)
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).norm()) <= tol * max(float(a64.norm()), 1e-30)


def _default_engine(filters: Tensor, batch: int, max_len: int, dtype: torch.dtype, device):
    from ..kernels import OnlineConv  # noqa: PLC0415 - kernels load lazily

    return OnlineConv(filters, batch, max_len, dtype=dtype, device=device)


def _modal_engine(modal: list, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype, device):
    """One ModalRecurrence for a group of modal convs (fewer modes padded with zero poles); prompts
    are convolved with the folded filters themselves."""
    from ..kernels.modal import ModalRecurrence  # noqa: PLC0415 - kernels load lazily

    return ModalRecurrence([f.poles for f in modal], [f.residues for f in modal], [f.skip for f in modal], batch,
                           dtype=dtype, device=device, max_len=max_len, filters=filters)


def as_captured(method: Callable) -> Callable:
    """The plan's graph holds the casts of any autocast it was captured under: evaluated, traced or
    stepped under a caller's autocast it would be cast twice. Every entry point runs without it."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch._C._DisableAutocast():
            return method(*args, **kwargs)

    return run


class StepProgram:
    @as_captured
    def __init__(self, plan: StepPlan, device: torch.device, *, floor: bool = False,
                 engine_factory: Callable | None = None, like: StepProgram | None = None,
                 compiler: SegmentCompiler | None = None):
        """`like`: another program of the same plan whose traced segments and constants to share.
        `compiler`: how a traced segment is compiled (default: not at all, the traced graphs run)."""
        self.plan, self.device, self.floor = plan, torch.device(device), floor
        self.compiler = compiler or SegmentCompiler()
        self.cg = plan.cg
        self.max_len = plan.max_len
        self.frontier = like.frontier if like is not None else self._precompute()
        self.t = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.position, self.prompt_len = 0, None
        self._build_state(engine_factory)
        if like is not None:
            self.consts, self.out_shapes, self.fns = like.consts, like.out_shapes, like.fns
            return
        self.consts, dry = self._dry_run()
        self.fns = []
        values: dict = {}  # a compiled segment's outputs may be laid out unlike eager's: feed the next one those
        for seg in plan.segments:
            examples = [values[k[1]] if k[0] == "value" else self._example(k, dry) for k in seg.inputs]
            fn = self._trace(seg, examples)
            with torch.no_grad():
                outs = fn(*examples)
            values.update((k[1], v) for k, v in zip(seg.outputs, outs) if k[0] == "value")
            self.fns.append(fn)

    # ------------------------------------------------------------ constants
    def _precompute(self) -> dict:
        """Input-independent tensors at max_len; each checked against a second length."""
        plan, cg = self.plan, self.cg
        nodes = ancestors(plan.frontier)
        n = plan.max_len if cg.symbolic else cg.length
        with torch.no_grad():
            env = evaluate(cg, nodes, input_env(cg, None, n), n)
        values = {node: env[node].detach() for node in plan.frontier}
        problems = []
        for node, d in plan.time_dim.items():
            if values[node].shape[d] < plan.max_len:
                problems.append((describe_node(node), f"a positional table of {values[node].shape[d]} "
                                 f"positions, shorter than max_len={plan.max_len}"))
        n2 = min(cg.length, plan.max_len - 1) if cg.length < plan.max_len else plan.max_len // 2
        if cg.symbolic and n2 >= 1 and not problems:
            with torch.no_grad():
                env2 = evaluate(cg, nodes, input_env(cg, None, n2), n2)
            for node in plan.frontier:
                a, b = values[node], env2[node]
                if node in plan.time_dim:
                    a = a.narrow(plan.time_dim[node], 0, n2)
                same = a.shape == b.shape and (torch.equal(a, b) or _rounding_close(a, b))
                if not same:
                    problems.append((describe_node(node), f"depends on the total length: its value at L={n2} "
                                     f"is not the prefix of its value at L={plan.max_len}"))
        if problems:
            raise IncrementalizeError(problems)
        return values

    def _build_state(self, engine_factory: Callable | None) -> None:
        """Engines for the long convs: modal ones (plan strategy "modal") get a ModalRecurrence
        unless another engine was asked for (the lazy baseline); the rest the online tiling."""
        plan = self.plan
        self.engines, self.where, self.conv_out = [], {}, {}
        groups: dict[tuple, list] = {}
        for c in plan.long_convs:
            modal = engine_factory is None and c.strategy is not None and c.strategy.modal is not None
            groups.setdefault((c.channels, c.batch, c.dtype, modal), []).append(c)
        for (C, B, dtype, modal), sites in ([] if self.floor else groups.items()):
            K = max(c.filter.shape[-1] for c in sites)
            filters = torch.stack([F.pad(c.filter, (0, K - c.filter.shape[-1])) for c in sites]).to(self.device)
            for m, c in enumerate(sites):
                # the folded filters go before the engine allocates its state: a second copy of
                # M * D * max_len filter taps at the peak (B = 8, L = 2^17: 8 of 82 GB) did not fit an H100
                self._slim(c, filters[m])
            if modal:
                eng = _modal_engine([c.strategy.modal for c in sites], filters, B, plan.max_len, dtype, self.device)
            else:
                eng = (engine_factory or _default_engine)(filters, B, plan.max_len, dtype, self.device)
            del filters
            self.engines.append(eng)
            for m, c in enumerate(sites):
                self.where[c.index] = (eng, m)
                if isinstance(getattr(eng, "h", None), Tensor) and eng.h.shape[:2] == (len(sites), C):
                    self._slim(c, eng.h[m])  # one copy of each filter: the engine's
        for c in plan.long_convs:
            self.conv_out[c.index] = torch.zeros(c.batch, c.channels, dtype=c.dtype, device=self.device)
        self.rings, self.taps = {}, {}
        for c in plan.convs:
            if c.short:
                K = c.filter_length
                if c.filter.shape[-1] > K:
                    self._slim(c, c.filter[:, :K].clone())
                self.rings[c.index] = torch.zeros(c.batch, c.channels, K - 1, dtype=c.dtype, device=self.device)
                self.taps[c.index] = c.filter[:, :K].flip(-1).to(self.device, _compute_dtype(c.dtype)).contiguous()

    def _slim(self, c, h: Tensor) -> None:
        """Use h as the conv's filter everywhere (the folded buffer at max_len can be freed)."""
        c.filter = h
        if c.attr is not None and isinstance(getattr(self.cg.gm, c.attr, None), Tensor):
            setattr(self.cg.gm, c.attr, h)

    def _step_frontier(self, index: Tensor | int) -> dict:
        out = {}
        for node, v in self.frontier.items():
            d = self.plan.time_dim.get(node)
            if d is None:
                out[node] = v
            else:
                idx = index if isinstance(index, Tensor) else torch.tensor([index], device=v.device)
                out[node] = aten.index_select(v, d, idx)
        return out

    def _ring(self, states: dict, taps: dict, new: dict) -> Callable:
        def conv(node: fx.Node, x: Tensor) -> Tensor:
            # K shifted products (pointwise), not a (B', C, K) window summed over K: inductor fuses
            # them with their neighbours (CPU, hyena_tiny's step: 22 kernels -> 18).
            c = self.plan.conv_of(node)
            ring, tap = states[c.index], taps[c.index]  # ring oldest first; taps flipped to match
            x = x.to(c.dtype)
            K1 = ring.shape[-1]
            y = x.to(tap.dtype) * tap[:, K1:]
            for j in range(K1):
                y = y + ring[..., j:j + 1].to(tap.dtype) * tap[:, j:j + 1]
            new[c.index] = torch.cat([ring[..., 1:], x], -1)
            return y.to(c.dtype)
        return conv

    def _dry_run(self) -> tuple[dict, dict]:
        """Every node once at length 1 on zeros: the step's ints, and example values for tracing."""
        cg, plan = self.cg, self.plan
        seq = [torch.zeros(shape_at(cg, p.meta["val"], 1), dtype=p.meta["val"].dtype, device=self.device)
               for p in plan.seq_inputs]
        env = input_env(cg, seq, 1)
        env.update(self._step_frontier(0))
        ring = self._ring(self.rings, self.taps, {})

        def conv(node: fx.Node, x: Tensor) -> Tensor:
            return ring(node, x) if plan.conv_of(node).short else torch.zeros_like(x)

        with torch.no_grad():
            evaluate(cg, plan.nodes, env, 1, conv)
        consts = {n: v for n, v in env.items()
                  if not isinstance(v, Tensor) and not (isinstance(v, (tuple, list)) and any(
                      isinstance(e, Tensor) for e in v))}
        self.out_shapes = {i: (tuple(env[o].shape), env[o].dtype) for i, o in enumerate(plan.outputs)
                           if isinstance(o, fx.Node) and isinstance(env.get(o), Tensor)}
        return consts, env

    # ------------------------------------------------------------ segments
    def _example(self, key: tuple, dry: dict) -> Tensor:
        kind = key[0]
        if kind in ("seq", "value"):
            return dry[key[1]]
        if kind == "conv":
            c = self.plan.conv_of(key[1])
            return torch.zeros(c.batch, c.channels, dtype=c.dtype, device=self.device)
        if kind in ("static", "positional"):
            return self.frontier[key[1]]
        if kind == "t":
            return self.t
        return self.rings[key[1]] if kind == "state" else self.taps[key[1]]

    def _segment_fn(self, seg: Segment) -> Callable:
        plan, cg = self.plan, self.cg

        def run(*flat):
            env = dict(self.consts)
            states, taps, new, tables = {}, {}, {}, {}
            t = None
            for key, v in zip(seg.inputs, flat):
                kind = key[0]
                if kind == "conv":
                    env[key[1]] = v.unsqueeze(-1)
                elif kind == "positional":
                    tables[key[1]] = v
                elif kind == "t":
                    t = v
                elif kind == "state":
                    states[key[1]] = v
                elif kind == "taps":
                    taps[key[1]] = v
                else:
                    env[key[1]] = v
            for node, table in tables.items():
                env[node] = aten.index_select(table, plan.time_dim[node], t)
            evaluate(cg, seg.nodes, env, 1, self._ring(states, taps, new))
            outs = []
            for key in seg.outputs:
                kind = key[0]
                if kind == "conv_in":
                    outs.append(env[plan.convs_by_index[key[1]].x].select(-1, 0))
                elif kind == "state":
                    outs.append(new[key[1]])
                elif kind == "value":
                    outs.append(env[key[1]])
                else:
                    outs.append(env[plan.outputs[key[1]]])
            return tuple(outs)

        return run

    def _trace(self, seg: Segment, examples: list) -> Callable:
        with torch.no_grad():
            return self.compiler(make_fx(self._segment_fn(seg))(*examples), examples)

    # ------------------------------------------------------------ running
    def reset(self) -> None:
        for eng in self.engines:
            eng.reset()
        for r in self.rings.values():
            r.zero_()
        self.t.zero_()
        self.position, self.prompt_len = 0, None

    @as_captured
    def prefill(self, seq_values: list[Tensor], P: int) -> list:
        """The graph's outputs at all P positions; the decode state now holds the prompt."""
        self.reset()
        plan, cg = self.plan, self.cg

        def conv(node: fx.Node, x: Tensor) -> Tensor:
            c = plan.conv_of(node)
            if c.short:
                K1 = c.filter_length - 1
                if K1:
                    tail = x[..., -K1:] if P >= K1 else F.pad(x, (K1 - P, 0))
                    self.rings[c.index].copy_(tail)
                return CAUSAL_CONV(x, c.filter[:, : c.filter_length].to(x.device, x.dtype))
            if self.floor:
                return x
            eng, m = self.where[c.index]
            return eng.prefill(m, x.contiguous())

        with torch.no_grad():
            env = evaluate(cg, list(cg.gm.graph.nodes), input_env(cg, seq_values, P), P, conv)
        self.t.fill_(P)
        self.position = self.prompt_len = P
        return [env[o] if isinstance(o, fx.Node) else o for o in plan.outputs]

    @as_captured
    def forward(self, seq_values: list[Tensor], n: int) -> list:
        """The full graph at length n with plain causal convolutions (no state): the compiled
        prefill's outputs, for matching and checking."""
        plan, cg = self.plan, self.cg

        def conv(node: fx.Node, x: Tensor) -> Tensor:
            h = plan.conv_of(node).filter
            return CAUSAL_CONV(x, h[:, : max(n, 1)].to(x.device, x.dtype))

        with torch.no_grad():
            env = evaluate(cg, list(cg.gm.graph.nodes), input_env(cg, seq_values, n), n, conv)
        return [env[o] if isinstance(o, fx.Node) else o for o in plan.outputs]

    @as_captured
    def run_segments(self, seq_values: list[Tensor]) -> dict[int, Tensor]:
        """One position's device work before the tiles (capturable): returns {output index: value}."""
        values, outs = {}, {}
        seq = dict(zip(self.plan.seq_inputs, seq_values))
        for seg, fn in zip(self.plan.segments, self.fns):
            flat = []
            for key in seg.inputs:
                kind = key[0]
                if kind == "seq":
                    flat.append(seq[key[1]])
                elif kind == "value":
                    flat.append(values[key[1]])
                elif kind == "conv":
                    flat.append(self.conv_out[self.plan.conv_of(key[1]).index])
                else:
                    flat.append(self._example(key, {}))
            result = fn(*flat)
            for key, v in zip(seg.outputs, result):
                kind = key[0]
                if kind == "conv_in":
                    if self.floor:
                        self.conv_out[key[1]] = v
                    else:
                        eng, m = self.where[key[1]]
                        eng.step(m, v, out=self.conv_out[key[1]])
                elif kind == "state":
                    self.rings[key[1]].copy_(v)
                elif kind == "value":
                    values[key[1]] = v
                else:
                    outs[key[1]] = v
        return outs

    def outputs_of(self, outs: dict[int, Tensor]) -> list:
        """All outputs, the constant ones filled in."""
        result = []
        for i, o in enumerate(self.plan.outputs):
            if i in outs:
                result.append(outs[i])
            elif isinstance(o, fx.Node):
                result.append(self.consts.get(o))
            else:
                result.append(o)
        return result

    @as_captured
    def step(self, seq_values: list[Tensor]) -> list:
        """The outputs at the current position (eagerly: no CUDA graphs)."""
        with torch.no_grad():
            outs = self.run_segments(seq_values)
            for eng in self.engines:
                eng.advance()
            self.t.add_(1)
        self.position += 1
        return self.outputs_of(outs)
