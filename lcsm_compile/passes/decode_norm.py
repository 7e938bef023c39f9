"""A layer norm recomputed inside each matrix-vector product that reads it (decode steps).

At one position a layer norm is a reduction over one vector (K = 864 values in Hyena-153M), and
its output feeds a GEMV whose programs each cover a few output rows. Inductor computes the norm
in a kernel of its own, because the GEMV before it must finish first (its output is the norm's
input), so each layer pays two launches for its two norms (~3.5 µs per Hyena-153M layer on an
H200, benchmarks/NOTES_decode_floor.md). Written as a reduction over the (rows, K, N) space the
product already iterates, every program recomputes the norm's mean and variance of the vector it
loads anyway, and inductor emits norm and product as one persistent reduction:

    y[m, n] = sum_k W[n, k] * ((x[m, k] - mean_m) * rstd_m * g[k] + b[k])   (mean_m, rstd_m per n)

Values are the norm's: the same two-pass mean and variance in fp32, then the casts the graph had
between the norm and the product. Only norms whose output feeds nothing but such products (after
views and casts) are rewritten; the redundant reductions cost compute, not memory traffic.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .decode_gemv import product_sum

aten = torch.ops.aten

__all__ = ["fuse_norm_into_gemv"]

_PRODUCTS = (aten.mm.default, aten.addmm.default)
# Recomputing the norm costs O(N K) flops per product: beyond this many outputs (a vocabulary
# head, N = 50264 in Hyena-153M) it would outweigh the one launch it saves.
MAX_OUTPUTS = 8192
_SHAPE_ONLY = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _product_x(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, w, bias) of a plain mm/addmm (alpha = beta = 1), else None."""
    if node.target is aten.mm.default and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1], None
    if node.target is aten.addmm.default and len(node.args) == 3 and all(
            node.kwargs.get(k, 1) == 1 for k in ("alpha", "beta")):
        return node.args[1], node.args[2], node.args[0]
    return None


def _paths(out: fx.Node, K: int, max_rows: int) -> list[tuple[fx.Node, list[torch.dtype]]] | None:
    """Every use of the norm's output as (product, casts on the way), or None if one is anything
    else: a view or cast chain must end as the x of a product with at most max_rows rows of K."""
    found, stack = [], [(out, [])]
    while stack:
        node, casts = stack.pop()
        for user in node.users:
            if user.target in _SHAPE_ONLY:
                stack.append((user, casts))
            elif user.target is aten._to_copy.default and set(user.kwargs) == {"dtype"}:
                stack.append((user, [*casts, user.kwargs["dtype"]]))
            elif user.target in _PRODUCTS:
                parts = _product_x(user)
                val, out = node.meta.get("val"), user.meta.get("val")
                if (parts is None or parts[0] is not node or not isinstance(val, torch.Tensor)
                        or val.dim() != 2 or val.shape[1] != K or not isinstance(val.shape[0], int)
                        or val.shape[0] > max_rows or not isinstance(out, torch.Tensor)
                        or not isinstance(out.shape[1], int) or out.shape[1] > MAX_OUTPUTS):
                    return None
                found.append((user, casts))
            else:
                return None
    return found or None


def fuse_norm_into_gemv(gm: fx.GraphModule, max_rows: int) -> int:
    """Rewrites each `native_layer_norm` over the last dim whose output only feeds mm/addmm with
    at most `max_rows` rows into per-row reductions inside those products. Returns how many
    products absorbed a norm."""
    if max_rows < 1:
        return 0
    graph, count = gm.graph, 0
    for ln in list(graph.nodes):
        if ln.target is not aten.native_layer_norm.default:
            continue
        x, shape, weight, bias, eps = (list(ln.args) + [None] * 5)[:5]
        outs = {u.args[1]: u for u in ln.users if u.target is operator.getitem}
        xval = x.meta.get("val") if isinstance(x, fx.Node) else None
        if (len(shape) != 1 or len(outs) != len(ln.users) or 0 not in outs or not isinstance(xval, torch.Tensor)
                or any(outs[i].users for i in outs if i != 0) or not isinstance(shape[0], int)):
            continue
        K = shape[0]
        paths = _paths(outs[0], K, max_rows)
        if paths is None:
            continue
        for product, casts in paths:
            with graph.inserting_before(product):
                y = _norm_product(graph, x, K, weight, bias, eps, xval.dtype, casts, product)
            product.replace_all_uses_with(y)
            graph.erase_node(product)
            count += 1
    if count:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return count


def _norm_product(graph: fx.Graph, x: fx.Node, K: int, weight, bias, eps, ln_dtype: torch.dtype,
                  casts: list[torch.dtype], product: fx.Node) -> fx.Node:
    call = graph.call_function
    _, w, b_out = _product_x(product)
    out = product.meta["val"]
    M, N = out.shape
    acc = torch.float64 if torch.float64 in (ln_dtype, out.dtype) else torch.float32

    def vec(v):  # a (K,) norm parameter along dim 1 of the (M, K, N) product space, in acc
        return call(aten._to_copy.default, (call(aten.reshape.default, (v, [K, 1])),), {"dtype": acc})

    xs = call(aten._to_copy.default, (call(aten.reshape.default, (x, [M, K, 1])),), {"dtype": acc})
    xe = call(aten.expand.default, (xs, [M, K, N]))  # every output column reduces the vector itself
    mean = call(aten.mean.dim, (xe, [1], True))
    xc = call(aten.sub.Tensor, (xe, mean))
    var = call(aten.mean.dim, (call(aten.mul.Tensor, (xc, xc)), [1], True))
    xn = call(aten.mul.Tensor, (xc, call(aten.rsqrt.default, (call(aten.add.Tensor, (var, eps)),))))
    if weight is not None:
        xn = call(aten.mul.Tensor, (xn, vec(weight)))
    if bias is not None:
        xn = call(aten.add.Tensor, (xn, vec(bias)))
    for dtype in (ln_dtype, *casts):  # the norm's output dtype, then the graph's casts before the product
        if dtype != acc:
            xn = call(aten._to_copy.default, (call(aten._to_copy.default, (xn,), {"dtype": dtype}),), {"dtype": acc})
    ws = call(aten.unsqueeze.default, (call(aten._to_copy.default, (w,), {"dtype": acc}), 0))  # (1, K, N)
    return product_sum(graph, xn, ws, b_out, out.dtype)
