"""graphs: the exportable graph modules cut from the rewritten graph.

    build_prefill(plan)       the full forward, (B, L) dynamic; short convs as Conv, long ones
                              stay `lcsm::causal_conv` (onnx_conv.py translates them); extra
                              outputs give each mixer's decode state after the prompt
    build_step_program(plan)  one graph per static segment of one time step

The step program. Every sequence value of the graph gets a depth: the number of long mixers on
its longest path from the inputs. Segment s computes the values of depth s at one position
(time dims of size 1); the long mixers of depth s + 1 read its outputs and run between segment
s and s + 1 (online convolution, outside ONNX). Short mixers (K <= 64) stay inside their
segment as a ring buffer with explicit state: `mixer{i}.state` (B, C, K-1), newest first, in,
`mixer{i}.state_out` out. POSITIONAL values (depend on t only) are per-step inputs sliced from
a table evaluated at max_len. A value used by a later segment is an output of its own segment
and an input of the later one, under one name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import Tensor, fx

from ..passes.capture import sym_expr
from .program import (
    CAUSAL_CONV,
    LONG,
    SHORT,
    ExportError,
    ExportPlan,
    GraphCopier,
    MixerSpec,
    describe,
    is_assert,
    is_positional,
    is_seq,
)

__all__ = ["GraphSpec", "IOSpec", "PositionalTable", "StepProgram", "build_prefill", "build_step_program"]

aten = torch.ops.aten
BATCH, LENGTH = "batch", "length"
# Prefill: filters up to this many taps run as a padded depthwise Conv, longer ones as DFTs.
# onnxruntime CPU, C=64, K=L (benchmarks/results/onnx_conv_cpu.json): Conv 0.23 vs DFT 0.83 ms at
# 128, within 20% of each other from 256 to 1024, DFT 5x faster at 4096 (26 vs 129 ms).
PREFILL_CONV_MAX = 128
_END = 2**62


@dataclass
class IOSpec:
    name: str
    dtype: torch.dtype
    shape: list  # ints, "batch", "length"

    def example(self, batch: int, length: int) -> Tensor:
        shape = [batch if s == BATCH else length if s == LENGTH else int(s) for s in self.shape]
        if self.dtype.is_floating_point:
            return torch.randn(shape, dtype=self.dtype)
        return torch.zeros(shape, dtype=self.dtype)


@dataclass
class GraphSpec:
    gm: fx.GraphModule
    inputs: list[IOSpec]
    outputs: list[IOSpec]


@dataclass
class PositionalTable:
    name: str
    table: Tensor  # the value at max_len
    time_dim: int


@dataclass
class StepProgram:
    segments: list[GraphSpec]
    schedule: list[tuple[str, Any]]  # ("mixers", [i, ...]) | ("segment", k), in order
    outputs: list[str]  # value name of each model output
    output_time_dims: list[int]
    positional: list[PositionalTable] = field(default_factory=list)
    names: dict = field(default_factory=dict)  # fx node of the rewritten graph -> value name


def _spec(plan: ExportPlan, name: str, val: Any, step: bool) -> IOSpec:
    shape = []
    for s in val.shape:
        e = sympy.sympify(sym_expr(s))
        if step:
            e = e.subs(plan.length_symbol, 1)
        if e.is_Integer:
            shape.append(int(e))
        elif e == plan.batch_symbol:
            shape.append(BATCH)
        elif e == plan.length_symbol:
            shape.append(LENGTH)
        else:
            raise ExportError(f"export: value {name} has a size {e} that is neither the batch, the length nor fixed")
    return IOSpec(name, val.dtype, shape)


def _input_size(copier: GraphCopier, plan: ExportPlan, inputs: list[tuple[fx.Node, Any]], step: bool):
    """size(symbol) for a copier: L (1 in a step) or the batch, read off one of the graph inputs."""

    def size(sym):
        if sym == plan.length_symbol and step:
            return 1
        for placeholder, val in inputs:
            for d, s in enumerate(val.shape):
                if sym_expr(s) == sym:
                    return copier.graph.call_function(aten.sym_size.int, (placeholder, d))
        raise ExportError(f"export: no input of this graph carries the size {sym}")

    return size


# ---------------------------------------------------------------------------------------- prefill
def build_prefill(plan: ExportPlan) -> GraphSpec:
    inputs: list[tuple[fx.Node, Any]] = []
    c = GraphCopier(plan, lambda sym: size(sym))
    size = _input_size(c, plan, inputs, step=False)
    specs = []
    for k, node in enumerate(plan.seq_inputs):
        p = c.env[node] = c.placeholder(f"input_{k}")
        inputs.append((p, node.meta["val"]))
        specs.append(_spec(plan, f"input_{k}", node.meta["val"], step=False))
    extras: list[tuple[IOSpec, fx.Node]] = []
    for node in plan.gm.graph.nodes:
        if node.op != "call_function" or is_assert(node) or not is_seq(node):
            continue
        m = plan.mixer_of(node)
        if m is None:
            c.env[node] = c.copy(node)
            continue
        x = c.value(m.input)
        if m.kind == SHORT:
            c.env[node], state = _short_conv_full(c, m, x)
            if state is not None:
                extras.append((_state_spec(plan, m, f"{m.name}.state"), state))
        elif m.filter_length <= PREFILL_CONV_MAX:
            c.env[node], _ = _short_conv_full(c, m, x)
            extras.append((_spec(plan, f"{m.name}.u", m.input.meta["val"], step=False), x))
        else:
            h = c.buffer(f"lcsm_filter_{m.index}", m.filter.to(m.input.meta["val"].dtype))
            L = c.graph.call_function(aten.sym_size.int, (x, 2))
            h = c.graph.call_function(aten.slice.Tensor, (h, 1, 0, L))
            c.env[node] = c.graph.call_function(CAUSAL_CONV, (x, h))
            extras.append((_spec(plan, f"{m.name}.u", m.input.meta["val"], step=False), x))
    outs, out_specs = [], []
    for k, o in enumerate(plan.outputs()):
        if not isinstance(o, fx.Node) or not (is_seq(o) or o in plan.seq_inputs):
            raise ExportError(f"export: model output {k} ({o}) does not depend on the inputs")
        outs.append(c.value(o))
        out_specs.append(_spec(plan, f"output_{k}", o.meta["val"], step=False))
    for spec, value in extras:
        outs.append(value)
        out_specs.append(spec)
    return GraphSpec(c.module(outs), specs, out_specs)


def _state_spec(plan: ExportPlan, m: MixerSpec, name: str) -> IOSpec:
    """A short mixer's ring buffer: (B, C, K-1), the last K-1 inputs, newest first."""
    x = _spec(plan, name, m.input.meta["val"], step=True)
    return IOSpec(name, x.dtype, [x.shape[0], m.channels, m.filter_length - 1])


def _short_conv_full(c: GraphCopier, m: MixerSpec, x: fx.Node):
    """Conv over the prompt (left pad K-1, flipped filter) and the ring buffer after it (newest first)."""
    g, K = c.graph, m.filter_length
    dtype = m.input.meta["val"].dtype
    xp = g.call_function(aten.constant_pad_nd.default, (x, [K - 1, 0])) if K > 1 else x
    w = c.buffer(f"lcsm_filter_{m.index}_conv", m.filter.flip(-1).unsqueeze(1).to(dtype))
    y = g.call_function(aten.convolution.default, (xp, w, None, [1], [0], [1], False, [0], m.channels))
    if K == 1:
        return y, None
    last = g.call_function(aten.slice.Tensor, (xp, 2, -(K - 1), _END))
    return y, g.call_function(aten.flip.default, (last, [2]))


# ------------------------------------------------------------------------------------------ step
def _depths(plan: ExportPlan) -> dict[fx.Node, int]:
    depth = {p: 0 for p in plan.seq_inputs}
    for node in plan.gm.graph.nodes:
        if node.op != "call_function" or is_assert(node) or not is_seq(node):
            continue
        m = plan.mixer_of(node)
        if m is not None and m.kind == LONG:
            depth[node] = depth[m.input] + 1
        else:
            depth[node] = max((depth[a] for a in node.all_input_nodes if a in depth), default=0)
    return depth


def build_step_program(plan: ExportPlan) -> StepProgram:
    depth = _depths(plan)
    names = {p: f"input_{k}" for k, p in enumerate(plan.seq_inputs)}
    for node in depth:
        m = plan.mixer_of(node)
        # Dotted names cannot collide with the names torch.onnx gives intermediate values.
        names.setdefault(node, f"{m.name}.y" if m is not None and m.kind == LONG else f"value.{node.name}")
    outputs = plan.outputs()
    needed = set()  # values some other stage reads
    for node, s in depth.items():
        for u in node.users:
            um = plan.mixer_of(u)
            if u.op == "output" or (um is not None and um.kind == LONG) or (u in depth and depth[u] > s):
                needed.add(node)
    n_stages = max(depth.values(), default=0)
    tables: dict[fx.Node, PositionalTable] = {}
    segments, schedule = [], []
    for s in range(n_stages + 1):
        group = [m.index for m in plan.mixers if m.kind == LONG and depth[m.node] == s]
        if group:
            schedule.append(("mixers", group))
        seg = _segment(plan, s, depth, names, needed, tables)
        if seg is not None:
            schedule.append(("segment", len(segments)))
            segments.append(seg)
    out_names, tdims = [], []
    for k, o in enumerate(outputs):
        if not isinstance(o, fx.Node) or o not in depth:
            raise ExportError(f"export: model output {k} ({o}) does not depend on the inputs")
        out_names.append(names[o])
        t = o.meta.get("lcsm_time", ())
        if len(t) != 1:
            raise ExportError(f"export: model output {k} has time dims {t}; want exactly one")
        tdims.append(t[0])
    return StepProgram(segments, schedule, out_names, tdims, list(tables.values()), names)


def _segment(plan: ExportPlan, s: int, depth: dict, names: dict, needed: set, tables: dict) -> GraphSpec | None:
    nodes = [n for n, d in depth.items() if d == s and n not in plan.seq_inputs
             and not (plan.mixer_of(n) is not None and plan.mixer_of(n).kind == LONG)]
    if not nodes:
        return None
    inputs: list[tuple[fx.Node, Any]] = []
    in_specs: list[IOSpec] = []

    def add_input(name: str, val: Any, spec: IOSpec) -> fx.Node:
        p = c.placeholder(name)
        inputs.append((p, val))
        in_specs.append(spec)
        return p

    def lookup(a: fx.Node):
        if a in depth:  # a sequence value from an earlier stage, or an input
            if a in plan.seq_inputs or depth[a] < s or (plan.mixer_of(a) is not None and a not in nodes):
                return add_input(names[a], a.meta["val"], _spec(plan, names[a], a.meta["val"], step=True))
            raise ExportError(f"export: internal: {describe(a)} used before it is computed")
        if is_positional(a):
            if a not in frontier:
                raise ExportError(f"export: a static value depends on the sequence length through {describe(a)}")
            t = tables.get(a) or _table(plan, a, f"position.{len(tables)}")
            tables[a] = t
            shape = [1 if d == t.time_dim else int(n) for d, n in enumerate(t.table.shape)]
            spec = IOSpec(t.name, t.table.dtype, shape)
            return add_input(t.name, a.meta["val"], spec)
        return None

    frontier = {a for n in nodes if plan.mixer_of(n) is None for a in n.all_input_nodes if is_positional(a)}
    c = GraphCopier(plan, lambda sym: size(sym), lookup)
    size = _input_size(c, plan, inputs, step=True)
    outs, out_specs = [], []
    for node in nodes:
        m = plan.mixer_of(node)
        if m is None:
            c.env[node] = c.copy(node)
            continue
        x = c.value(m.input)
        state_spec = _state_spec(plan, m, f"{m.name}.state")
        state = add_input(state_spec.name, None, state_spec) if m.filter_length > 1 else None
        y, state_out = _short_conv_step(c, m, x, state)
        c.env[node] = y
        if state_out is not None:
            outs.append(state_out)
            out_specs.append(IOSpec(f"{m.name}.state_out", state_spec.dtype, state_spec.shape))
    for node in nodes:
        if node in needed:
            outs.append(c.value(node))
            out_specs.append(_spec(plan, names[node], node.meta["val"], step=True))
    if not outs:
        return None
    return GraphSpec(c.module(outs), in_specs, out_specs)


def _short_conv_step(c: GraphCopier, m: MixerSpec, x: fx.Node, state: fx.Node | None):
    """y_t = sum_j h[j] u[t-j] over [u_t, state] (newest first); the new state drops the oldest."""
    g = c.graph
    h = c.buffer(f"lcsm_filter_{m.index}", m.filter.to(m.input.meta["val"].dtype))
    if state is None:
        return g.call_function(aten.mul.Tensor, (x, h)), None
    window = g.call_function(aten.cat.default, ([x, state], 2))
    y = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (window, h)), [2], True))
    return y, g.call_function(aten.slice.Tensor, (window, 2, 0, m.filter_length - 1))


def _table(plan: ExportPlan, node: fx.Node, name: str) -> PositionalTable:
    """A POSITIONAL value evaluated at max_len, to be sliced at t by the decoder."""
    tdims = node.meta.get("lcsm_time", ())
    if len(tdims) != 1:
        raise ExportError(f"export: positional value {describe(node)} has time dims {tdims}; want one")

    def size(sym):
        if sym == plan.length_symbol:
            return plan.max_len
        raise ExportError(f"export: positional value {describe(node)} depends on the size {sym}")

    c = GraphCopier(plan, size)
    value = c.value(node)
    with torch.no_grad():
        (table,) = c.module([value])()
    if table.shape[tdims[0]] < plan.max_len:
        raise ExportError(f"export: positional value {describe(node)} covers {table.shape[tdims[0]]} positions, "
                          f"fewer than max_len={plan.max_len}")
    return PositionalTable(name, table.contiguous(), tdims[0])


def combine_segments(segments: list[GraphSpec]) -> GraphSpec:
    """All segments of a step as one graph (mixer outputs and states as inputs, every segment
    output an output), so one torch.onnx.export serves them all; the exporter cuts it apart."""
    root, graph = torch.nn.Module(), fx.Graph()
    values: dict[str, fx.Node] = {}
    in_specs, out_specs, outs = [], [], []
    produced: set[str] = set()
    for seg in segments:  # placeholders first: what no earlier segment writes
        for spec in seg.inputs:
            if spec.name not in produced and spec.name not in values:
                values[spec.name] = graph.placeholder(spec.name.replace(".", "_"))
                in_specs.append(spec)
        produced |= {spec.name for spec in seg.outputs}
    for seg in segments:
        placeholders = [n for n in seg.gm.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, fx.Node] = {p: values[spec.name] for p, spec in zip(placeholders, seg.inputs)}
        for node in seg.gm.graph.nodes:
            if node.op == "get_attr":
                tensor = getattr(seg.gm, node.target)
                if not hasattr(root, node.target):
                    root.register_buffer(node.target, tensor)
                elif not torch.equal(getattr(root, node.target), tensor):
                    raise ExportError(f"export: internal: two segments hold different weights named {node.target}")
                env[node] = graph.get_attr(node.target)
            elif node.op == "call_function":
                env[node] = graph.node_copy(node, env.__getitem__)
            elif node.op == "output":
                for value, spec in zip(node.args[0], seg.outputs):
                    values[spec.name] = env[value]
                    outs.append(env[value])
                    out_specs.append(spec)
    graph.output(tuple(outs))
    graph.lint()
    return GraphSpec(fx.GraphModule(root, graph), in_specs, out_specs)
