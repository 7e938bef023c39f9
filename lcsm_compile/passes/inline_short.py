"""Short causal convolutions written out as shifted products for the inner compiler.

    causal_conv(u, h), h: (D, K) with K <= max_taps   ->   sum_k h[:, k] * u shifted right by k

The rewrite keeps every mixer as one `lcsm::causal_conv` node (the decoder, explain() and the
ONNX export read them). For a handful of taps that node is the wrong thing to hand inductor: an
opaque call that lands on cuDNN's generic depthwise kernel (H200, Hyena-153M under bf16
autocast, L = 8192: 215 us per layer for 3 taps, a fifth of the whole prefill) and splits the
elementwise work around it (projection split, gating) into separate kernels. Written out, the
K products are plain pointwise ATen that inductor fuses with their neighbours.

The graph given to the inner compiler is a new GraphModule over the same root (weights shared,
nothing copied); the captured graph itself keeps its `causal_conv` nodes.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["inline_short_convs"]


def _taps(h: fx.Node) -> tuple[fx.Node, int] | None:
    """The folded filter behind h (a constant, or its slice to a dynamic L) and its tap count."""
    if h.op == "call_function" and h.target is aten.slice.Tensor and h.args[1] == 1:
        h = h.args[0]
    val = h.meta.get("val")
    if h.op != "get_attr" or not isinstance(val, torch.Tensor) or not isinstance(val.shape[1], int):
        return None
    return h, int(val.shape[1])


def inline_short_convs(gm: fx.GraphModule, max_taps: int) -> tuple[fx.GraphModule, int]:
    """A GraphModule over gm's root where every causal_conv with at most max_taps taps is the
    sum of shifted products (fp32 accumulation, cast back); gm itself is left as it is.
    Returns (the module, how many were inlined); gm unchanged when none qualify."""
    targets = [n for n in gm.graph.find_nodes(op="call_function", target=torch.ops.lcsm.causal_conv.default)
               if (t := _taps(n.args[1])) is not None and t[1] <= max_taps]
    if not targets:
        return gm, 0
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inline = set(targets)
    for node in gm.graph.nodes:
        if node in inline:
            env[node] = _shifted_sum(graph, env[node.args[0]], env[_taps(node.args[1])[0]], node)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.eliminate_dead_code()
    out = fx.GraphModule(gm, graph)
    return out, len(targets)


def _shifted_sum(graph: fx.Graph, u: fx.Node, h: fx.Node, conv: fx.Node) -> fx.Node:
    """y[b, d, t] = sum_k h[d, k] u[b, d, t - k] (u = 0 before t = 0). Each shift pads k zeros
    in front and drops the last k samples, so it needs no sequence length (static or symbolic),
    and a tap past the sequence's end (L <= k) contributes zeros, as the convolution does."""
    dtype = conv.meta["val"].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    call = graph.call_function
    u32 = call(aten._to_copy.default, (u,), {"dtype": acc})
    h32 = call(aten._to_copy.default, (h,), {"dtype": acc})
    y = None
    for k in range(h.meta["val"].shape[1]):
        tap = call(aten.unsqueeze.default, (call(aten.select.int, (h32, 1, k)), -1))  # (D, 1)
        shifted = u32 if k == 0 else call(aten.slice.Tensor, (call(
            aten.constant_pad_nd.default, (u32, [k, 0], 0.0)), 2, 0, -k))
        term = call(aten.mul.Tensor, (shifted, tap))
        y = term if y is None else call(aten.add.Tensor, (y, term))
    return call(aten._to_copy.default, (y,), {"dtype": dtype})
