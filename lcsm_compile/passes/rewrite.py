"""rewrite: each verified region becomes one `lcsm::causal_conv(u, h)` node.

    u -> [pad] -> rfft -> * K -> irfft -> [:L] (+ u*D)      before
    u -> permute/view (B, C, L) -> causal_conv(., h[:, :L]) (+ bias) -> view/permute   after

The folded filter is a buffer on the graph module (skip term in h[:, 0]); with a dynamic L the
node slices it to L behind a runtime check that L <= the fold length. node.meta["val"] stays
true for every node inserted. The original nodes die in dead-code elimination.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx
from torch._guards import detect_fake_mode

from .capture import CapturedGraph
from .verify import Mixer

__all__ = ["rewrite", "MIXER_ATTR"]

aten = torch.ops.aten
MIXER_ATTR = "lcsm_filter_{}"


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.graph = gm.graph
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def call(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        margs = fx.node.map_arg(args, lambda n: n.meta["val"])
        mkwargs = fx.node.map_arg(kwargs, lambda n: n.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*margs, **mkwargs)
        else:
            node.meta["val"] = target(*margs, **mkwargs)
        return node

    def attr(self, gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
        gm.register_buffer(name, value)
        node = self.graph.get_attr(name)
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True) if self.fake_mode else value
        return node


def _size(b: _Builder, u: fx.Node, d: int):
    s = u.meta["val"].shape[d]
    return b.call(aten.sym_size.int, u, d) if isinstance(s, torch.SymInt) else int(s)


def _replace(cg: CapturedGraph, b: _Builder, mx: Mixer, index: int) -> None:
    gm, u, y = cg.gm, mx.region.u, mx.region.y
    perm = [*mx.bcast_dims, *mx.chan_dims, mx.axis]
    inverse = [perm.index(d) for d in range(len(perm))]
    with cg.gm.graph.inserting_before(y):
        L = _size(b, u, mx.axis)
        h = b.attr(gm, MIXER_ATTR.format(index), mx.h.to(u.meta["val"].dtype))
        if isinstance(L, fx.Node):
            ok = b.call(operator.le, L, mx.length)
            b.call(
                aten._assert_scalar.default,
                ok,
                f"lcsm: sequence length exceeds max_len={mx.length} the filters were folded at; "
                f"compile with options={{'max_len': N}}",
            )
            h = b.call(aten.slice.Tensor, h, 1, 0, L)
        sizes = [_size(b, u, d) for d in perm]
        batch = 1
        for s in sizes[: len(mx.bcast_dims)]:
            symbolic = isinstance(s, fx.Node) or isinstance(batch, fx.Node)
            batch = b.call(operator.mul, batch, s) if symbolic else batch * s
        x = b.call(aten.permute.default, u, perm)
        x = b.call(aten.clone.default, x, memory_format=torch.contiguous_format)
        x = b.call(aten.view.default, x, [batch, mx.channels, L])
        out = b.call(torch.ops.lcsm.causal_conv.default, x, h)
        out.meta["lcsm_mixer"] = index  # cg.facts["mixers"][index]: the decoder picks its strategy from it
        if mx.bias is not None:
            bias = b.attr(gm, MIXER_ATTR.format(index) + "_bias", mx.bias.to(u.meta["val"].dtype).reshape(1, -1, 1))
            out = b.call(aten.add.Tensor, out, bias)
        out = b.call(aten.view.default, out, sizes)
        out = b.call(aten.permute.default, out, inverse)
        if out.meta["val"].dtype != y.meta["val"].dtype:
            out = b.call(torch.ops.prims.convert_element_type.default, out, y.meta["val"].dtype)
        out = b.call(aten.clone.default, out, memory_format=torch.contiguous_format)
    y.replace_all_uses_with(out)


def mixer_of(cg: CapturedGraph, node: fx.Node) -> Mixer | None:
    """The verified mixer a `causal_conv` node was rewritten from (None for other nodes)."""
    index, known = node.meta.get("lcsm_mixer"), cg.facts.get("mixers", [])
    return known[index] if index is not None and index < len(known) else None


def rewrite(cg: CapturedGraph, mixers: list[Mixer]) -> Counter:
    """Replace every mixer region; returns how many rewrites of each kind fired."""
    counts: Counter = Counter()
    b = _Builder(cg.gm)
    consumed: set[fx.Node] = set()
    for i, mx in enumerate(mixers):
        region_nodes = set(mx.fn.dynamic)  # filter nodes may be shared (one positional table)
        if region_nodes & consumed:
            continue  # overlaps a region already rewritten
        consumed |= region_nodes
        _replace(cg, b, mx, i)
        counts[mx.kind] += 1
    cg.facts["mixers"] = mixers
    cg.gm.graph.eliminate_dead_code()
    cg.gm.graph.lint()
    cg.gm.recompile()
    return counts
