"""seq_axis: which dims of each value are time, and what each node does to time.

Classes (DESIGN.md §3):
  STATIC      independent of the sequence inputs and of L (weights, folded constants)
  POSITIONAL  independent of the sequence inputs but sized by L (positional embeddings, arange(L))
  POINTWISE   acts on each time step on its own (projections, norms, gates, activations)
  MIXING      combines time steps (convolutions, FFTs, flips, reductions over time, shifts)

With a dynamic L the time dims are exact (their size expression holds the time symbol);
with a static L they are the dims of size L, which is ambiguous when another dim equals L,
so nothing downstream trusts them alone: the verifier's numbers decide.
"""
from __future__ import annotations

import torch
from torch import fx

from .capture import CapturedGraph, sym_expr

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
        if set(a.meta.get("lcsm_time", ())) & {a.meta["val"].dim() - 1} or set(b.meta.get("lcsm_time", ())) & {
            b.meta["val"].dim() - 2
        }:
            return "a matrix product over time"
    if t is aten.constant_pad_nd.default:
        pad = node.args[1]
        for i in range(0, len(pad), 2):
            d = ndim - 1 - i // 2
            if d in tin and (pad[i] != 0 or pad[i + 1] != 0):
                return "pads along time (a shift)"
    if t is aten.slice.Tensor:
        d = (node.args[1] if len(node.args) > 1 else 0) % max(ndim, 1)
        start = node.args[2] if len(node.args) > 2 else 0
        if d in tin and start not in (0, None):
            return "slices along time (a shift)"
    return None


def seq_axis(cg: CapturedGraph) -> int:
    """Annotate every node with lcsm_seq / lcsm_time / lcsm_class; returns how many are MIXING."""
    roles = {inp.node: inp.role for inp in cg.inputs}
    mixing = 0
    for node in cg.gm.graph.nodes:
        if node.op == "placeholder":
            seq = roles.get(node) == "sequence"
        elif node.op == "get_attr":
            seq = False
        else:
            seq = any(a.meta.get("lcsm_seq", False) for a in node.all_input_nodes)
        node.meta["lcsm_seq"] = seq
        val = node.meta.get("val")
        tdims = time_dims(val, cg)
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

