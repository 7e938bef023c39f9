"""match: structural matchers that propose mixer regions u -> y. They propose; `verify` decides.

Rules are data: a seed op, how to find u behind it, how to find y in front of it.

    rfft/fft (pad) -> * static spectrum -> irfft/ifft (.real) -> slice [:L] (/n) (+ u*D)   "fft"
    convolution(groups=C) on pad(u) or with padding K-1 -> slice [:L] (+ bias)          "conv"
    bmm/mm with a static (L, L) operand contracting time (einsum / matmul)              "toeplitz"
    cumsum along time                                                                    "cumsum"

A seed that cannot become a region is reported with why (`Rejection`), e.g. a filter that is
computed from the input ("data-dependent filter") or a convolution that mixes channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .capture import CapturedGraph, sym_expr
from .region import Region, describe_node, foreign_inputs, random_ops
from .seq_axis import is_static

__all__ = ["Rejection", "match", "SEEDS"]

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass
class Rejection:
    node: fx.Node
    reason: str

    def describe(self) -> str:
        return describe_node(self.node)


_CASTS = {aten._to_copy.default, aten.clone.default, prims.convert_element_type.default, aten.alias.default}
_PADS = {aten.constant_pad_nd.default}
_VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.view_as_complex.default, aten.view_as_real.default,
}  # fmt: skip


def _seq_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if not is_static(a)]


def _u_candidates(x: fx.Node, through_views: bool) -> list[fx.Node]:
    """x, then its ancestors through casts/pads (and views when asked), nearest first."""
    out = [x]
    allowed = _CASTS | _PADS | (_VIEWS if through_views else set())
    while x.op == "call_function" and x.target in allowed and len(_seq_inputs(x)) == 1:
        x = _seq_inputs(x)[0]
        out.append(x)
    # A padded value (or a cast of one: autocast casts conv1d's padded input to bf16) is never
    # the region's input: the pad belongs to the convolution.
    pads = [i for i, n in enumerate(out) if n.target in _PADS]
    out = out[pads[-1] + 1:] if pads else out
    # Through views (einsum's permute/reshape), prefer the value in the model's own layout.
    return out[::-1] if through_views else out


def _shape_key(val: torch.Tensor) -> tuple:
    # Sizes as expressions: comparing SymInts would ask the shape env, and a dynamic L that
    # equals a static dim (L == D == 16) would then be specialized to that value.
    return tuple(sym_expr(s) for s in val.shape)


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Same shape and time in the same dim: (B, L, D) is not its transpose (B, D, L) when L == D."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if _shape_key(va) != _shape_key(vb) or vb.is_complex():
        return False
    if a.meta.get("lcsm_time_guess") or b.meta.get("lcsm_time_guess"):
        return True  # time dims guessed from sizes: the shape decides, the verifier checks
    ta, tb = a.meta.get("lcsm_time"), b.meta.get("lcsm_time")
    return ta is None or tb is None or tuple(ta) == tuple(tb)


def _walk_to_shape(seed: fx.Node, u: fx.Node, limit: int = 16) -> tuple[fx.Node | None, str | None]:
    """Follow the seed's single sequence user until the value has u's shape again."""
    x = seed
    for _ in range(limit):
        if _same_layout(u, x):
            return x, None
        users = [n for n in x.users if n.op == "call_function"]
        if len(users) != 1:
            return None, "its output is used in several places before the time axis is restored"
        nxt = users[0]
        others = [a for a in _seq_inputs(nxt) if a is not x]
        for other in others:
            region = Region("probe", seed, u, other)
            if foreign_inputs(region) or not _depends(other, u):
                return None, f"data-dependent filter: it is computed from the input ({describe_node(other)})"
        x = nxt
    if _same_layout(u, x):
        return x, None
    return None, "the time axis is never restored to the input's shape"


def _depends(node: fx.Node, target: fx.Node) -> bool:
    from .region import depends_on  # noqa: PLC0415

    return depends_on(node, target)


_EXTEND = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor} | _CASTS


def _extensions(y: fx.Node, u_roots: list[fx.Node]) -> list[fx.Node]:
    """y, then y + u*D (skip), y * c, y + b, casts: each a candidate end, longest last."""
    out = [y]
    while True:
        users = [n for n in y.users if n.op == "call_function"]
        if len(users) != 1 or users[0].target not in _EXTEND:
            return out
        nxt = users[0]
        others = [a for a in nxt.all_input_nodes if a is not y]
        ok = True
        for other in others:
            if is_static(other):
                continue
            # A skip term: a function of u alone (a root of u, no other sequence value).
            if nxt.target in (aten.add.Tensor, aten.sub.Tensor) and any(_depends(other, r) for r in u_roots):
                region = Region("probe", nxt, u_roots[-1], other)
                if not foreign_inputs(region):
                    continue
            ok = False
        if not ok or not _same_layout(y, nxt):
            return out
        y = nxt
        out.append(y)


def _fft_seed(node: fx.Node) -> bool:
    if node.target is aten._fft_r2c.default:
        return True
    return node.target is aten._fft_c2c.default and bool(node.args[3])  # forward transform


def _propose(cg, kind, seed, x, through_views):
    last_reason = None
    for u in _u_candidates(x, through_views):
        y, reason = _walk_to_shape(seed, u)
        if y is None:
            last_reason = reason or last_reason
            if reason and reason.startswith("data-dependent"):
                return None, reason
            continue
        regions = [Region(kind, seed, u, end) for end in _extensions(y, _u_candidates(x, True))]
        # A region becomes one filter folded once: a random op in it would be frozen (refused).
        drawn = [random_ops(r) for r in regions]
        if all(drawn):
            ops = ", ".join(dict.fromkeys(describe_node(n) for n in drawn[0]))
            return None, f"random op in the filter path ({ops}): folding would freeze one draw"
        return [r for r, d in zip(regions, drawn) if not d], None
    return None, last_reason or "no region found"


def _match_fft(cg, node):
    return _propose(cg, "fft", node, node.args[0], through_views=False)


def _match_conv(cg, node):
    x, w = node.args[0], node.args[1]
    transposed, groups = node.args[6], node.args[8]
    if not is_static(w):
        return None, f"data-dependent filter: the convolution weight is computed from the input ({describe_node(w)})"
    wv, xv = w.meta["val"], x.meta["val"]
    if transposed:
        return None, "a transposed convolution"
    if wv.dim() != 3:
        return None, f"a {wv.dim() - 2}-d convolution (only 1-d convolutions along time are mixers)"
    if not (groups == xv.shape[1] == wv.shape[0]):
        return None, f"mixes channels (groups={groups} for {xv.shape[1]} channels)"
    if any(s != 1 for s in node.args[3]):
        return None, "a strided convolution changes the time rate"
    return _propose(cg, "conv", node, x, through_views=False)


def _match_cumsum(cg, node):
    return _propose(cg, "cumsum", node, node.args[0], through_views=False)


def _match_matmul(cg, node):
    a, b = node.args[:2]
    if is_static(a) == is_static(b):
        return None, "a matrix product of two sequence values (attention-like, data-dependent)"
    x = b if is_static(a) else a
    return _propose(cg, "toeplitz", node, x, through_views=True)


SEEDS = [
    (_fft_seed, _match_fft),
    (lambda n: n.target is aten.convolution.default, _match_conv),
    (lambda n: n.target is aten.cumsum.default, _match_cumsum),
    (lambda n: n.target in (aten.bmm.default, aten.mm.default), _match_matmul),
]


def match(cg: CapturedGraph) -> tuple[list[list[Region]], list[Rejection]]:
    """Candidate regions per seed (alternatives, longest last), and seeds that cannot be regions."""
    proposals: list[list[Region]] = []
    rejections: list[Rejection] = []
    # Where nothing mixes along the declared time axis, that axis may be the wrong one (a
    # channels-first model at the default seq_dim): every seed is tried, so a refusal says why.
    time_mixing = any(n.meta.get("lcsm_class") == "MIXING" for n in cg.gm.graph.nodes)
    for node in cg.gm.graph.nodes:
        if node.op != "call_function" or is_static(node):
            continue
        for is_seed, propose in SEEDS:
            if not is_seed(node):
                continue
            known_time = time_mixing and node.meta.get("lcsm_time") and not node.meta.get("lcsm_time_guess")
            if node.meta.get("lcsm_class") != "MIXING" and (
                    node.target in (aten.bmm.default, aten.mm.default) or known_time):
                # over channels or batch, not along a known time axis: a projection or an
                # FNet-style channel FFT is no mixer to refuse (where the time axis is unknown, at
                # L = 1, or only guessed, a seed is still tried, and a refusal says why)
                break
            regions, reason = propose(cg, node)
            if regions:
                proposals.append(regions)
            else:
                rejections.append(Rejection(node, reason))
            break
    return proposals, rejections
