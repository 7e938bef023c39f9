"""incrementalize: the rewritten prefill graph as a step program for one new position.

After rewrite, the only node of a verified model that combines time steps is
`lcsm::causal_conv`. If every other node acts on each position on its own, then evaluating
the same graph on a length-1 slice, with each causal_conv replaced by an online step and every
positional value (sized by L, independent of the input) indexed at t, gives position t's
outputs. This pass proves the "if" node by node, and refuses with the node and the reason
otherwise (never a silent wrong answer):

    MIXING node left by the pipeline      its seq_axis reason ("non-causal: flips the time axis")
    a value without one time axis         "drops the time axis", "has two time axes"
    an op acting along time               layer norm over time, cat/split/select/index on time, ...
    L used as a number                    `x * L`: differs between the full graph and a step
    a positional value not prefix-stable  its value at L=n is not the prefix of its value at max_len

and cuts the graph into segments at the long convolutions (short ones, with filters of at most
`settings.short_conv_max` taps, become ring buffers inside a segment):

    segment 0 -> long-conv steps of depth 0 -> segment 1 -> ... -> last segment (outputs)

A graph captured with a static L (dynamo specialized it) is handled the same way, with the time
axes read off as the dims whose size is a multiple of the capture length and every shape constant
rescaled (`evaluate` with n != capture length). The runtime (runtime/step_program.py) traces and
compiles the segments and owns the state; the decoder checks the whole thing numerically.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch import Tensor, fx

from .. import ops as _ops  # noqa: F401 - registers lcsm::causal_conv
from ..settings import Settings
from .capture import CapturedGraph, sym_expr
from .length_eval import (
    _flat,
    _is_time_symbol,
    _time,
    ancestors,
    evaluate,
    input_env,
    shape_at,
)
from .modal import Strategy, choose_strategy
from .region import describe_node
from .rewrite import mixer_of
from .seq_axis import MIXING, POINTWISE, POSITIONAL, STATIC, mixing_reason, seq_axis
from .step_plan import CAUSAL_CONV, ConvSite, IncrementalizeError, Segment, StepPlan
from .verify import filter_extent

__all__ = ["ConvSite", "IncrementalizeError", "Segment", "StepPlan", "ancestors", "evaluate", "incrementalize",
           "input_env", "shape_at"]

aten = torch.ops.aten

# Ops that take sizes: the only places a length-dependent int may appear.
_SHAPE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.slice.Tensor, aten.sym_size.int, aten.new_zeros.default, aten.new_empty.default,
    aten.new_ones.default, aten.new_full.default, aten.full.default, aten.zeros.default,
    aten.ones.default, aten.empty.memory_format, aten._assert_scalar.default,
}
# A `dim` argument of these names positions, not acts along, that dim.
_DIM_IS_POSITION = {
    aten.unsqueeze.default, aten.permute.default, aten.movedim.int, aten.stack.default,
    aten.sym_size.int, aten.transpose.int, aten.expand.default, aten.view.default,
}
_INT_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
            operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne)


# ---------------------------------------------------------------- time axes
def _annotate_static(cg: CapturedGraph) -> None:
    """Static L: time axes are the dims of a multiple of the capture length (B*L after a flatten)."""
    for node in cg.gm.graph.nodes:
        node.meta["lcsm_time"] = tuple(d for d, _ in _time(cg, node.meta.get("val")))
        if not node.meta.get("lcsm_seq"):
            node.meta["lcsm_class"] = POSITIONAL if node.meta["lcsm_time"] else STATIC
        else:
            node.meta["lcsm_class"] = MIXING if mixing_reason(node) else POINTWISE


# ---------------------------------------------------------------- checks
def _tensors(val) -> list[Tensor]:
    if isinstance(val, Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v for v in val if isinstance(v, Tensor)]
    return []


def _source(node: fx.Node) -> fx.Node | None:
    for a in node.all_input_nodes:
        if a.meta.get("lcsm_seq") and isinstance(a.meta.get("val"), Tensor):
            return a
    return None


def _arg(node: fx.Node, name: str, index: int):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else None


def _acts_along_time(node: fx.Node) -> str | None:
    """Ops with an axis argument that mixing_reason does not cover, acting on a time axis."""
    src = _source(node)
    if src is None:
        return None
    tin = set(src.meta.get("lcsm_time", ()))
    ndim = src.meta["val"].dim()
    t = node.target
    if t is aten.native_layer_norm.default:
        k = len(node.args[1])
        return "normalizes over time (layer norm)" if tin & set(range(ndim - k, ndim)) else None
    if t is aten.native_group_norm.default:
        return "normalizes over time (group norm)" if tin & set(range(1, ndim)) else None
    if t is aten.index.Tensor:
        for i, idx in enumerate(node.args[1]):
            if idx is not None and i in tin:
                return "indexes along time"
        return None
    if t in _DIM_IS_POSITION:
        return None
    schema = getattr(t, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.name not in ("dim", "dims"):
            continue
        value = _arg(node, a.name, i)
        if value is None:
            continue
        dims = {value} if isinstance(value, int) else set(value)
        if {d % max(ndim, 1) for d in dims} & tin:
            return f"acts along time ({getattr(t, '__name__', t)} over dim {value})"
    return None


def _depends_on_length(cg: CapturedGraph, value) -> bool:
    expr = sym_expr(value)
    return isinstance(expr, sympy.Expr) and cg.time_symbol in expr.free_symbols


def _check_seq_node(cg: CapturedGraph, node: fx.Node) -> str | None:
    if node.meta.get("lcsm_class") == MIXING:
        return mixing_reason(node) or "combines time steps"
    if node.target is CAUSAL_CONV:
        return None
    reason = _acts_along_time(node)
    if reason:
        return reason
    for v in _tensors(node.meta.get("val")):
        axes = _time(cg, v)
        if not axes:
            return "drops the time axis (its result has no time dimension)"
        if len(axes) > 1:
            return f"has {len(axes)} time axes {tuple(v.shape)}"
        if axes[0][1] < 0:
            return f"changes the length of the time axis to {v.shape[axes[0][0]]}"
    if node.target in _SHAPE_OPS or node.target in _INT_OPS:
        return None
    # L as a number: a symbolic int (symbolic graph) or a multiple of the capture length (static)
    for a in _flat(node.args, node.kwargs):
        value = a.meta.get("val") if isinstance(a, fx.Node) else a
        if isinstance(value, Tensor) or isinstance(value, bool):
            continue
        if cg.symbolic and _depends_on_length(cg, value):
            return "uses the sequence length L as a number"
        if not cg.symbolic and isinstance(value, int) and value >= cg.length and value % cg.length == 0:
            return f"uses {value}, a multiple of the length it was captured at, as a number"
    return None


# ---------------------------------------------------------------- the plan
def _filter_attr(h: fx.Node) -> str:
    while h.op == "call_function" and h.target is aten.slice.Tensor:
        h = h.args[0]
    if h.op != "get_attr":
        raise IncrementalizeError([(describe_node(h), "causal_conv filter is not a folded buffer")])
    return h.target


def _filter_of(cg: CapturedGraph, h: fx.Node) -> Tensor:
    return getattr(cg.gm, _filter_attr(h))


def _decode_strategy(cg: CapturedGraph, node: fx.Node, i: int, mixers: list | None, settings: Settings) -> Strategy:
    """A long conv's decode strategy from the verified mixer behind it (modal.choose_strategy)."""
    if mixers is not None:
        mixer = mixers[i] if i < len(mixers) else None
    else:
        mixer = mixer_of(cg, node)
    if mixer is None:
        return Strategy("long", "no verified mixer recorded for this convolution: tiling")
    strategy = choose_strategy(mixer, settings)
    if strategy.name == "short":  # the folded filter at max_len is longer than the mixer's at capture
        return Strategy("long", f"{strategy.reason}, but {describe_node(node)} is long at max_len: tiling")
    return strategy


def incrementalize(cg: CapturedGraph, settings: Settings, max_len: int, unsupported=(),
                   filters: list[Tensor] | None = None, mixers: list | None = None) -> StepPlan:
    """The step plan of a rewritten graph, or IncrementalizeError naming every obstacle.
    `filters` and `mixers` replace the graph's folded filters and their verified mixers (in
    causal_conv order), for static captures."""
    if unsupported:
        raise IncrementalizeError([(u.node, u.reason) for u in unsupported])
    problems: list[tuple[str, str]] = []
    seq_axis(cg)
    if not cg.symbolic:
        _annotate_static(cg)
    graph = cg.gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = _flat(out_node.args[0], {}) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]

    # What the step needs: walk back from the outputs; a conv needs only its input.
    needed: set[fx.Node] = set()
    stack = [a for a in outputs if isinstance(a, fx.Node)]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        ins = [node.args[0]] if node.target is CAUSAL_CONV else node.all_input_nodes
        if node.meta.get("lcsm_seq") or node.op == "output":
            stack.extend(ins)
        elif not isinstance(node.meta.get("val"), Tensor):
            stack.extend(ins)  # an int: evaluate what it is computed from
    order = [n for n in graph.nodes if n in needed]
    for inp in cg.inputs:  # another dynamic size (e.g. a stride) is fine where nothing reads it
        if inp.role == "sym" and not _is_time_symbol(cg, inp) and any(u in needed for u in inp.node.users):
            problems.append((inp.node.name, f"a dynamic size other than the time axis ({inp.source})"))
    seq_inputs = [i.node for i in cg.inputs if i.role == "sequence"]
    frontier = [n for n in order if _is_value(n) and not n.meta.get("lcsm_seq")]

    time_dim: dict[fx.Node, int] = {}
    for node in order:
        if node.meta.get("lcsm_seq") and node.op == "call_function":
            reason = _check_seq_node(cg, node)
            if reason:
                problems.append((describe_node(node), reason))
    for node in frontier:
        axes = _time(cg, node.meta["val"])
        if not axes:
            continue
        if not cg.symbolic:
            problems.append((describe_node(node), "a positional value computed at the fixed length the "
                             "model was specialized to; it cannot be extended"))
        elif len(axes) != 1 or axes[0][1] != 1:
            problems.append((describe_node(node), f"a positional value with time extent "
                             f"{tuple(node.meta['val'].shape)} (not one axis of length L)"))
        else:
            time_dim[node] = axes[0][0]

    # Mixer sites.
    conv_nodes = [n for n in graph.nodes if n.target is CAUSAL_CONV]
    if filters is not None and len(filters) != len(conv_nodes):
        problems.append(("causal_conv", f"{len(conv_nodes)} convolutions here, {len(filters)} at max_len"))
    convs: list[ConvSite] = []
    for i, node in enumerate(conv_nodes):
        if node not in needed:
            continue
        attr = _filter_attr(node.args[1])
        h = filters[i] if filters is not None and i < len(filters) else getattr(cg.gm, attr)
        k = filter_extent(h)  # FFT round-off past the last real tap does not count
        if k > settings.short_conv_max and k >= h.shape[-1] and h.shape[-1] < max_len:
            problems.append((describe_node(node), f"filter folded at {h.shape[-1]} < max_len={max_len}"))
        site = ConvSite(node, i, node.args[0], h, k, k <= settings.short_conv_max, attr)
        if not site.short:
            site.strategy = _decode_strategy(cg, node, i, mixers, settings)
        convs.append(site)

    output_time: list[int | None] = []
    for a in outputs:
        axes = _time(cg, a.meta.get("val")) if isinstance(a, fx.Node) and a.meta.get("lcsm_seq") else []
        if len(axes) == 1 and axes[0][1] == 1:
            output_time.append(axes[0][0])
        elif not axes:
            output_time.append(None)
        else:
            output_time.append(None)
            problems.append((describe_node(a), f"an output whose time axis is merged with another "
                             f"({tuple(a.meta['val'].shape)})"))
    if problems:
        raise IncrementalizeError(problems)

    plan = StepPlan(cg, max_len, convs, [], order, outputs, output_time, seq_inputs, frontier, time_dim)
    _segment(plan)
    return plan


def _is_value(node) -> bool:
    """A node whose value is a tensor or a tuple of tensors (native_layer_norm, split)."""
    return isinstance(node, fx.Node) and bool(_tensors(node.meta.get("val")))


def _segment(plan: StepPlan) -> None:
    """Depth of every sequence tensor (long convs on its path) and the segments' borders."""
    depth: dict[fx.Node, int] = {}
    sites = {c.node: c for c in plan.convs}
    seq = [n for n in plan.nodes if n.meta.get("lcsm_seq") and _is_value(n)]
    for node in seq:
        if node.op == "placeholder":
            depth[node] = 0
            continue
        if node in sites:
            site = sites[node]
            site.depth = depth[site.x]
            depth[node] = site.depth + (0 if site.short else 1)
            continue
        depth[node] = max((depth[a] for a in node.all_input_nodes if a in depth), default=0)
    n_seg = 1 + max(depth.values(), default=0)
    segments = [Segment(i) for i in range(n_seg)]
    home: dict[fx.Node, int] = {}
    for node in plan.nodes:
        if not node.meta.get("lcsm_seq") or node.op == "placeholder":
            continue
        if node in sites and not sites[node].short:
            continue
        k = depth.get(node)
        if k is None:  # an int computed from a sequence value: a constant of the step
            continue
        segments[k].nodes.append(node)
        home[node] = k

    def need(seg: Segment, a: fx.Node) -> None:
        if not _is_value(a):
            return
        if a.op == "placeholder":
            key = ("seq", a) if a in plan.seq_inputs else ("static", a)
        elif a in sites and not sites[a].short:
            key = ("conv", a)
        elif not a.meta.get("lcsm_seq"):
            key = ("positional", a) if a in plan.time_dim else ("static", a)
        elif home.get(a) == seg.index:
            return
        else:
            key = ("value", a)
            src = segments[home[a]]
            if ("value", a) not in src.outputs:
                src.outputs.append(("value", a))
        if key not in seg.inputs:
            seg.inputs.append(key)
        if key[0] == "positional" and ("t",) not in seg.inputs:
            seg.inputs.append(("t",))

    for seg in segments:
        for node in seg.nodes:
            ins = [node.args[0]] if node.target is CAUSAL_CONV else node.all_input_nodes
            for a in ins:
                need(seg, a)
            if node in sites:  # a short conv: its ring state and taps
                seg.inputs += [("state", sites[node].index), ("taps", sites[node].index)]
    for c in plan.convs:
        if not c.short:
            seg = segments[c.depth]
            need(seg, c.x)
            seg.outputs.append(("conv_in", c.index))
        else:
            segments[c.depth].outputs.append(("state", c.index))
    last = segments[-1]
    for i, a in enumerate(plan.outputs):
        if _is_value(a):
            need(last, a)
            last.outputs.append(("out", i))
    plan.segments = segments
