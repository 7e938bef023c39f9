"""seq_axis: which dims of each value are time, and what each node does to time.

Classes (DESIGN.md §3):
  STATIC      independent of the sequence inputs and of L (weights, folded constants)
  POSITIONAL  independent of the sequence inputs but sized by L (positional embeddings, arange(L))
  POINTWISE   acts on each time step on its own (projections, norms, gates, activations)
  MIXING      combines time steps (convolutions, FFTs, flips, reductions over time, shifts)

With a dynamic L the time dims are exact: their size expression holds the time symbol.
With a static L (dynamo specialized it) a size says nothing when another dim equals L (L == D,
L == 1), so time is tracked by what each op does to dims, not by sizes:

    sources      dim `seq_dim` of each sequence input; for values that do not read the input,
                 a slice/narrow to [0, L), a factory op or expand sized L (arange(L), a table[:L])
    positions    view/reshape (dims split and merged by their factors), permute/transpose/t,
                 (un)squeeze, select/unbind, stack, reductions (dim, keepdim), mm/bmm/addmm/
                 baddbmm (only the kept dims), convolution, embedding, index, view_as_real/complex
    otherwise    an op whose result has at least the rank of each tensor input acts dim by dim
                 (pointwise, broadcasting, FFTs, pads, slices, cat, softmax, cumsum, ...)

An op none of these explains falls back to the dims of size L, flagged as a guess
(`lcsm_time_guess`, on every value computed from it too). A guessed value that does not read the
input never adds time to one that does; where a guess remains, match compares shapes only and
the verifier tries every candidate axis of a region: its numbers decide.
"""
from __future__ import annotations

import torch
from torch import fx

from .capture import CapturedGraph, sym_expr
from .time_layout import static_layouts

__all__ = ["STATIC", "POSITIONAL", "POINTWISE", "MIXING", "seq_axis", "time_dims", "mixing_reason"]

STATIC, POSITIONAL, POINTWISE, MIXING = "STATIC", "POSITIONAL", "POINTWISE", "MIXING"
aten = torch.ops.aten


def time_dims(val, cg: CapturedGraph) -> tuple[int, ...]:
    if not isinstance(val, torch.Tensor):
        return ()
    dims = []
    for i, size in enumerate(val.shape):
        expr = sym_expr(size)
        if cg.time_symbol is not None:
            if hasattr(expr, "free_symbols") and cg.time_symbol in expr.free_symbols:
                dims.append(i)
        elif expr == cg.length:
            dims.append(i)
    return tuple(dims)


def _dims_arg(node: fx.Node, index: int, key: str, ndim: int):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(key)
    if value is None:
        return None
    if isinstance(value, int):
        value = [value]
    return {d % ndim for d in value} if ndim else set(value)


_REDUCTIONS = {
    aten.sum.dim_IntList: "sums over time",
    aten.mean.dim: "averages over time",
    aten.amax.default: "takes a max over time",
    aten.amin.default: "takes a min over time",
    aten.var.correction: "a variance over time",
    aten._softmax.default: "a softmax over time",
    aten._log_softmax.default: "a log-softmax over time",
    aten.logsumexp.default: "a logsumexp over time",
    aten.cumsum.default: "a cumulative sum over time",
    aten.cumprod.default: "a cumulative product over time",
    aten.sort.default: "sorts along time",
    aten.index_select.default: "indexes along time",
    aten.gather.default: "gathers along time",
}


def _contracts_time(operand: fx.Node, dim: int) -> bool:
    return bool(operand.meta.get("lcsm_seq")) and dim in set(operand.meta.get("lcsm_time", ()))


def mixing_reason(node: fx.Node) -> str | None:
    """Why this node combines time steps, or None when it acts per position."""
    if node.op != "call_function" or not node.meta.get("lcsm_seq"):
        return None
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if not args:
        return None
    src = args[0]
    tin = set(src.meta.get("lcsm_time", ()))
    ndim = src.meta["val"].dim() if isinstance(src.meta.get("val"), torch.Tensor) else 0
    t = node.target
    if t is aten.flip.default and tin & _dims_arg(node, 1, "dims", ndim):
        return "non-causal: flips the time axis"
    if t is aten.roll.default and tin & (_dims_arg(node, 2, "dims", ndim) or set()):
        return "rolls the time axis"
    if t in (aten._fft_r2c.default, aten._fft_c2c.default, aten._fft_c2r.default):
        if tin & _dims_arg(node, 1, "dim", ndim):
            return "an FFT along time"
    if t is aten.convolution.default and tin & set(range(2, ndim)):
        return "a convolution along time"
    if t in _REDUCTIONS:
        dims = _dims_arg(node, 1, "dim", ndim)
        if dims is None or tin & dims:
            return _REDUCTIONS[t]
    if t in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default):
        a, b = (node.args[1], node.args[2]) if t in (aten.addmm.default, aten.baddbmm.default) else node.args[:2]
        # Only a sequence operand's time dims count: a weight whose size happens to equal L is
        # contracted over channels (hyena's projections at L == d_model).
        if _contracts_time(a, a.meta["val"].dim() - 1) or _contracts_time(b, b.meta["val"].dim() - 2):
            return "a matrix product over time"
    if t is aten.constant_pad_nd.default:
        pad = node.args[1]
        for i in range(0, len(pad), 2):
            d = ndim - 1 - i // 2
            if d in tin and (sym_expr(pad[i]) != 0 or sym_expr(pad[i + 1]) != 0):  # no guard on L
                return "pads along time (a shift)"
    if t is aten.slice.Tensor:
        d = (node.args[1] if len(node.args) > 1 else 0) % max(ndim, 1)
        start = node.args[2] if len(node.args) > 2 else 0
        if d in tin and start is not None and sym_expr(start) != 0:
            return "slices along time (a shift)"
    return None


def seq_axis(cg: CapturedGraph) -> int:
    """Annotate every node with lcsm_seq / lcsm_time / lcsm_class; returns how many are MIXING."""
    roles = {inp.node: inp.role for inp in cg.inputs}
    layouts = None if cg.symbolic else static_layouts(cg)
    mixing = 0
    for node in cg.gm.graph.nodes:
        if node.op == "placeholder":
            seq = roles.get(node) == "sequence"
        elif node.op == "get_attr":
            seq = False
        else:
            seq = any(a.meta.get("lcsm_seq", False) for a in node.all_input_nodes)
        node.meta["lcsm_seq"] = seq
        if layouts is None:
            tdims = time_dims(node.meta.get("val"), cg)
        else:
            tdims, guessed = layouts[node]
            node.meta["lcsm_time_guess"] = guessed
        node.meta["lcsm_time"] = tdims
        if not seq:
            node.meta["lcsm_class"] = POSITIONAL if tdims else STATIC
        elif mixing_reason(node) is not None:
            node.meta["lcsm_class"] = MIXING
            mixing += 1
        else:
            node.meta["lcsm_class"] = POINTWISE
    return mixing


def is_static(node: fx.Node) -> bool:
    """Independent of the sequence inputs (may still depend on L)."""
    return not node.meta.get("lcsm_seq", False)

