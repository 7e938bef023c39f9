"""Evaluating a captured graph at another length n: time axes, shapes and values at n.

Symbolic graphs take n for the time symbol; static ones (dynamo specialized L) have every shape
constant that is a multiple of the capture length rescaled to n (`_rescale`)."""
from __future__ import annotations

import sys
from collections.abc import Callable

import sympy
import torch
from torch import Tensor, fx

from .capture import CapturedGraph, sym_expr
from .region import describe_node
from .step_plan import CAUSAL_CONV, IncrementalizeError, StepPlan

__all__ = ["ancestors", "evaluate", "input_env", "shape_at"]

aten = torch.ops.aten

_SIZE_ARG = {  # op -> index of its size list (static graphs rescale it)
    aten.view.default: 1, aten._unsafe_view.default: 1, aten.reshape.default: 1, aten.expand.default: 1,
    aten.new_zeros.default: 1, aten.new_empty.default: 1, aten.new_ones.default: 1, aten.new_full.default: 1,
    aten.full.default: 0, aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0,
}


def _extent(cg: CapturedGraph, size) -> int | None:
    """c when a dim of this size is c*L; -1 when it depends on L otherwise; None when not time."""
    if cg.symbolic:
        expr = sym_expr(size)
        if not isinstance(expr, sympy.Expr) or cg.time_symbol not in expr.free_symbols:
            return None
        c = sympy.simplify(expr / cg.time_symbol)
        return int(c) if c.is_Integer and c > 0 else -1
    size = int(size)
    return size // cg.length if size > 0 and size % cg.length == 0 else None


def _time(cg: CapturedGraph, val) -> list[tuple[int, int]]:
    if not isinstance(val, Tensor):
        return []
    return [(i, c) for i, s in enumerate(val.shape) if (c := _extent(cg, s)) is not None]


def _flat(args, kwargs) -> list:
    out: list = []
    fx.node.map_aggregate((args, kwargs), out.append)
    return out


def _rescale(cg: CapturedGraph, node: fx.Node, args: tuple, n: int) -> tuple:
    """Static graphs: the node's shape constants for length n instead of the capture length."""
    L = cg.length
    t = node.target
    if t in _SIZE_ARG:
        i = _SIZE_ARG[t]
        out = node.meta["val"]
        sizes = [
            s // L * n if s != -1 and d in node.meta.get("lcsm_time", ()) and s % L == 0 else s
            for d, s in enumerate(args[i])
        ] if out.dim() == len(args[i]) else list(args[i])
        return (*args[:i], sizes, *args[i + 1:])
    if t is aten.slice.Tensor and len(args) > 3:
        src = node.args[0].meta["val"]
        dim = args[1] % src.dim()
        if dim in node.args[0].meta.get("lcsm_time", ()) and args[3] is not None and args[3] >= src.shape[dim]:
            return (*args[:3], sys.maxsize, *args[4:])
    return args


def evaluate(plan_or_cg, nodes: list[fx.Node], env: dict, n: int,
             conv: Callable[[fx.Node, Tensor], Tensor] | None = None) -> dict:
    """Run `nodes` (topological order) at length n into env; nodes already in env are kept.
    Placeholders must be in env; causal_conv nodes go through `conv(node, x)` when given."""
    cg = plan_or_cg.cg if isinstance(plan_or_cg, StepPlan) else plan_or_cg
    gm = cg.gm
    for node in nodes:
        if node in env:
            continue
        if node.op == "placeholder":
            raise KeyError(f"incrementalize: no value for input {node.name}")
        elif node.op == "get_attr":
            env[node] = getattr(gm, node.target)
        elif node.op == "call_function":
            if node.target is aten._assert_scalar.default:
                env[node] = None
                continue
            if node.target is CAUSAL_CONV and conv is not None:
                env[node] = conv(node, env[node.args[0]])
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if not cg.symbolic and n != cg.length:
                args = _rescale(cg, node, args, n)
            env[node] = node.target(*args, **kwargs)
        elif node.op == "output":
            continue
        else:
            raise IncrementalizeError([(describe_node(node), f"unsupported node kind {node.op}")])
    return env


def _is_time_symbol(cg: CapturedGraph, inp) -> bool:
    return cg.symbolic and sym_expr(inp.node.meta.get("val")) == cg.time_symbol


def input_env(cg: CapturedGraph, values: list | None, n: int) -> dict:
    """Placeholder values: `values` for sequence inputs (graph order; None: leave them out),
    the real weights, n for L."""
    env: dict = {}
    seq = iter(values or ())
    for inp in cg.inputs:
        if inp.role == "static":
            env[inp.node] = inp.value
        elif inp.role == "sym":
            env[inp.node] = n if _is_time_symbol(cg, inp) else inp.value
        elif values is not None:
            env[inp.node] = next(seq)
    return env


def shape_at(cg: CapturedGraph, val: Tensor, n: int) -> list[int]:
    """The concrete shape of a value at length n."""
    shape = []
    for s in val.shape:
        c = _extent(cg, s)
        if c is None:
            shape.append(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s))
        else:
            shape.append(c * n)
    return shape


def ancestors(nodes: list[fx.Node]) -> list[fx.Node]:
    """`nodes` and everything they are computed from, in graph order."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    if not seen:
        return []
    graph = next(iter(seen)).graph
    return [n for n in graph.nodes if n in seen]
