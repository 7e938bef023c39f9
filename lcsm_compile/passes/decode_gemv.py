"""The matrix products of a decode step as reductions that inductor fuses and tunes.

At one position per sequence every linear layer is a matrix-vector product, bound by reading its
weight. cuBLAS's fp32 GEMV kernels read these weights at about a third of HBM bandwidth (H200,
Hyena 864-wide: 5.9 µs for a 6 MB weight, measured by benchmarks/step_profile.py), and each one
is its own launch with the bias and activation in further kernels. Written as a broadcast product
summed over K, the product becomes one inductor reduction kernel with its epilogue fused, and
coordinate-descent tuning (COMPILE_OPTIONS) picks block sizes near bandwidth.

Only the step program's segments get this (their row count is the batch); prefill keeps cuBLAS.
`kernel="triton"` makes each product one `lcsm::gemv` call instead (kernels/gemv.py: a
hand-written GEMV that reads its weight before waiting for the previous kernel, an extern call
to inductor; its bias is fused, anything else is not): at 2-8 rows, where inductor's reductions
re-read the weight per row and cuBLAS's small-M kernels are slow.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["decompose_gemv", "product_sum", "COMPILE_OPTIONS"]

# inductor settings for segments whose products became reductions: tuned block sizes.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def _rows(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not isinstance(val.shape[0], int):
        return None
    return val.shape[0]


def decompose_gemv(gm: fx.GraphModule, max_rows: int, kernel: str = "reduction", splits: int = 1,
                   min_rows: int = 1, pdl: bool = False) -> int:
    """Rewrites `mm(x, w)` and `addmm(b, x, w)` with `min_rows` to `max_rows` rows of x in place:
    sum_k x[m, k] w[k, n] in fp32, cast back to the product's dtype, as a reduction (kernel
    "reduction"; with `splits` > 1 dividing K, partial sums over K / splits and then their sum)
    or one `lcsm::gemv` node ("triton"; `pdl`: launched with programmatic dependent launch).
    Returns how many."""
    if kernel not in ("reduction", "triton"):
        raise ValueError(f"decompose_gemv: kernel must be 'reduction' or 'triton', got {kernel!r}")
    if kernel == "triton":
        from ..kernels.gemv import MAX_ROWS  # noqa: PLC0415 - registers lcsm::gemv (loads triton)

        max_rows = min(max_rows, MAX_ROWS)
    if max_rows < 1:
        return 0
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
                continue
            bias, x, w = node.args
        else:
            bias, (x, w) = None, node.args
        rows = _rows(x)
        out = node.meta.get("val")
        if rows is None or not min_rows <= rows <= max_rows:
            continue
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            continue
        with graph.inserting_before(node):
            if kernel == "triton":
                y = graph.call_function(torch.ops.lcsm.gemv.default, (x, w, bias, pdl))
                y.meta["val"] = out
            else:
                y = _reduction(graph, x, w, bias, out.dtype, splits)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _reduction(graph: fx.Graph, x: fx.Node, w: fx.Node, bias: fx.Node | None, dtype: torch.dtype,
               splits: int = 1) -> fx.Node:
    """sum_k x[m, k] w[k, n] (+ bias) in fp32 (fp64 for fp64), cast back to the product's dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    call = graph.call_function
    xs = call(aten._to_copy.default, (x,), {"dtype": acc})
    ws = call(aten._to_copy.default, (w,), {"dtype": acc})
    wv = w.meta.get("val")
    M, K = x.meta["val"].shape  # decompose_gemv checked x's val
    N = wv.shape[-1] if isinstance(wv, torch.Tensor) else None
    if splits > 1 and all(isinstance(s, int) for s in (M, K, N)) and K % splits == 0:
        xs = call(aten.reshape.default, (xs, [M, splits, K // splits, 1]))
        ws = call(aten.reshape.default, (ws, [1, splits, K // splits, N]))
        part = call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (xs, ws)), [2]))  # (M, splits, N)
        return _bias_cast(graph, call(aten.sum.dim_IntList, (part, [1])), bias, dtype)
    return product_sum(graph, call(aten.unsqueeze.default, (xs, 2)), call(aten.unsqueeze.default, (ws, 0)),
                       bias, dtype)


def product_sum(graph: fx.Graph, xs: fx.Node, ws: fx.Node, bias: fx.Node | None, dtype: torch.dtype) -> fx.Node:
    """sum_k xs[m, k, n] ws[0, k, n] (+ bias), cast to `dtype`: the reduction every decode product
    becomes (xs (M, K, 1) or (M, K, N) and ws (1, K, N), both in the accumulation dtype)."""
    call = graph.call_function
    return _bias_cast(graph, call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (xs, ws)), [1])), bias, dtype)


def _bias_cast(graph: fx.Graph, y: fx.Node, bias: fx.Node | None, dtype: torch.dtype) -> fx.Node:
    """A product's sum (+ bias), cast back to the product's dtype."""
    if bias is not None:
        y = graph.call_function(aten.add.Tensor, (y, bias))
    return graph.call_function(aten._to_copy.default, (y,), {"dtype": dtype})
