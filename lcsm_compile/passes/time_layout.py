"""Time dims of a graph captured at a static L, by propagation (seq_axis's static path).

A size says nothing when another dim equals L (L == D, L == 1), so time is tracked by what each
op does to dims; the rules are listed in seq_axis's docstring. `static_layouts(cg)` gives, per
node, its time dims and whether they are a size-based guess."""
from __future__ import annotations

import math
import operator
from collections import ChainMap
from typing import Any

import torch
from torch import fx

from .capture import CapturedGraph

__all__ = ["static_layouts"]

aten = torch.ops.aten

# A layout holds, per dim, the factors it is made of: ((size, is_time), ...). A view that merges
# (B, L) into B*L and splits it back finds L again; a dim is time when one of its factors is.
Atom = tuple[int, bool]
Layout = tuple[tuple[Atom, ...], ...]


def _int(size) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _shape(val) -> tuple[int, ...]:
    return tuple(_int(s) for s in val.shape)


def _plain(shape, time=()) -> Layout:
    return tuple(((n, d in time),) for d, n in enumerate(shape))


def _is_time(atoms) -> bool:
    return any(t for _, t in atoms)


def _dims(layout: Layout) -> tuple[int, ...]:
    return tuple(d for d, atoms in enumerate(layout) if _is_time(atoms))


def _fit(atoms, size: int):
    """The factors of a dim now of `size`: kept when the size is unchanged, else one factor."""
    if math.prod(n for n, _ in atoms) == size:
        return tuple(atoms)
    return ((size, _is_time(atoms)),)


def _merge(candidates, size: int):
    """One output dim fed by several inputs' dims (broadcast): their factors, or one merged factor."""
    same = [a for a in candidates if math.prod(n for n, _ in a) == size]
    if same and all(a == same[0] for a in same) and _is_time(same[0]) == any(_is_time(a) for a in candidates):
        return tuple(same[0])
    return ((size, any(_is_time(a) for a in candidates)),)


def _tensors_of(val) -> list:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def _schema_arg(node: fx.Node, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return default
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return node.args[i]
            return default if a.default_value is None else a.default_value
    return default


def _has_arg(node: fx.Node, name: str) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.name == name for a in schema.arguments)


def _view(src: Layout, out_shape) -> Layout | None:
    """Reshape: output dims take the input's factors in row-major order (None: factors cross)."""
    atoms = [a for dim in src for a in dim]
    out, i = [], 0
    for size in out_shape:
        if size == 1:
            if i < len(atoms) and atoms[i][0] == 1:
                out.append((atoms[i],))
                i += 1
            else:
                out.append(((1, False),))
            continue
        got, rem = [], size
        while rem > 1:
            while i < len(atoms) and atoms[i][0] == 1:
                i += 1  # a size-1 factor (time at L == 1) squeezed away
            if i >= len(atoms):
                return None
            n, t = atoms[i]
            if rem % n == 0:
                got.append((n, t))
                rem //= n
                i += 1
            elif n % rem == 0:
                got.append((rem, t))
                atoms[i] = (n // rem, t)
                rem = 1
            else:
                return None
        out.append(tuple(got))
    if any(n != 1 for n, _ in atoms[i:]):
        return None
    return tuple(out)


def _broadcast(inputs: list[Layout], out_shape) -> Layout | None:
    """Inputs aligned to the right of the output (pointwise ops, broadcasting, same-rank ops)."""
    rank = len(out_shape)
    if any(len(lay) > rank for lay in inputs):
        return None
    out = []
    for d, size in enumerate(out_shape):
        cands = []
        for lay in inputs:
            k = d - (rank - len(lay))
            if k >= 0:
                atoms = lay[k]
                # A dim that an input holds at size 1 and the output broadcasts is not that input's.
                if math.prod(n for n, _ in atoms) == 1 and size != 1:
                    continue
                cands.append(atoms)
        out.append(_merge(cands, size) if cands else ((size, False),))
    return tuple(out)


def _reduced(node: fx.Node, src: Layout, out_shape) -> Layout | None:
    ndim = len(src)
    dims = _schema_arg(node, "dim")
    if dims is None or dims == []:
        dims = set(range(ndim))
    else:
        dims = {d % max(ndim, 1) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = bool(_schema_arg(node, "keepdim", False))
    out = []
    for d in range(ndim):
        if d in dims:
            if keep:
                out.append(((1, False),))
        else:
            out.append(src[d])
    if len(out) != len(out_shape):
        return None
    return tuple(_fit(a, n) for a, n in zip(out, out_shape))


def _rule(node: fx.Node, lay: dict, L: int, out_shape) -> Layout | None:
    """The output layout of a single-tensor-output op, or None when no rule explains it."""
    t = node.target
    args = node.args
    tensor_args = [a for a in node.all_input_nodes if isinstance(lay.get(a), tuple)]
    src = lay.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    src = src if isinstance(src, tuple) else None
    if t is operator.getitem:
        parts = lay.get(args[0])
        if isinstance(parts, list) and isinstance(args[1], int) and args[1] < len(parts):
            return parts[args[1]]
        return None
    if not tensor_args:
        # A factory (arange(L), zeros(B, L, D), linspace(0, 1, L)): dims of size L may be time.
        return _plain(out_shape, {d for d, n in enumerate(out_shape) if n == L})
    if t is aten.stack.default:
        d = (args[1] if len(args) > 1 else 0) % len(out_shape)
        merged = _broadcast([lay[a] for a in tensor_args], [n for k, n in enumerate(out_shape) if k != d])
        if merged is None:
            return None
        return (*merged[:d], ((out_shape[d], False),), *merged[d:])
    if src is None:  # a list of tensors first (cat): dim by dim
        return _broadcast([lay[a] for a in tensor_args], out_shape)
    ndim = len(src)
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return _view(src, out_shape)
    if t is aten.permute.default:
        return tuple(src[d % ndim] for d in args[1])
    if t is aten.transpose.int:
        a, b = args[1] % ndim, args[2] % ndim
        out = list(src)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    if t is aten.t.default:
        return tuple(reversed(src))
    if t is aten.unsqueeze.default:
        d = args[1] % (ndim + 1)
        return (*src[:d], ((1, False),), *src[d:])
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        dims = args[1] if len(args) > 1 else [d for d in range(ndim) if math.prod(n for n, _ in src[d]) == 1]
        dims = {d % max(ndim, 1) for d in ([dims] if isinstance(dims, int) else dims)}
        return tuple(a for d, a in enumerate(src) if not (d in dims and math.prod(n for n, _ in a) == 1))
    if t is aten.select.int:
        d = args[1] % ndim
        return (*src[:d], *src[d + 1:])
    if t is aten.view_as_real.default:
        return (*src, ((2, False),))
    if t is aten.view_as_complex.default:
        return src[:-1]
    if t in (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default):
        bias = None
        if t in (aten.addmm.default, aten.baddbmm.default):
            bias, args = lay.get(args[0]), args[1:]
        a, b = lay.get(args[0]), lay.get(args[1])
        if not (isinstance(a, tuple) and isinstance(b, tuple)):
            return None
        if t in (aten.mm.default, aten.addmm.default):
            out = (_fit(a[0], out_shape[0]), _fit(b[1], out_shape[1]))
        else:
            out = (_merge([a[0], b[0]], out_shape[0]), _fit(a[1], out_shape[1]), _fit(b[2], out_shape[2]))
        if isinstance(bias, tuple):
            out = _broadcast([out, bias], out_shape)
        return out
    if t is aten.convolution.default:
        # (B, C, *spatial): batch and spatial dims keep their place, channels are new.
        return (_fit(src[0], out_shape[0]), ((out_shape[1], False),),
                *(_fit(a, n) for a, n in zip(src[2:], out_shape[2:])))
    if t is aten.embedding.default:
        idx = lay.get(args[1])
        if not isinstance(idx, tuple):
            return None
        return (*idx, ((out_shape[-1], False),))
    if t in (aten.index.Tensor, aten._unsafe_index.Tensor):
        return _index(src, [lay.get(i) if isinstance(i, fx.Node) else None for i in args[1]], out_shape)
    if _has_arg(node, "keepdim") and _has_arg(node, "dim"):
        return _reduced(node, src, out_shape)
    return _broadcast([lay[a] for a in tensor_args], out_shape)


def _rule_multi(node: fx.Node, lay: dict, out_shape) -> Layout | None:
    """One output of a tuple-valued op (split, unbind, max.dim, native_layer_norm, sort, ...)."""
    src = lay.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if not isinstance(src, tuple):
        return None
    if node.target is aten.unbind.int:
        d = (node.args[1] if len(node.args) > 1 else 0) % len(src)
        return (*src[:d], *src[d + 1:])
    if _has_arg(node, "keepdim") and _has_arg(node, "dim"):
        return _reduced(node, src, out_shape)
    tensors = [lay[a] for a in node.all_input_nodes if isinstance(lay.get(a), tuple)]
    return _broadcast(tensors, out_shape)


def _sizes(layout: Layout) -> tuple[int, ...]:
    return tuple(math.prod(n for n, _ in atoms) for atoms in layout)


def _index(src: Layout, indices: list, out_shape) -> Layout | None:
    """x[..., idx, ...] (aten.index.Tensor): the index's dims replace the indexed dims."""
    used = [d for d, i in enumerate(indices) if i is not None]
    if not used or any(not isinstance(indices[d], tuple) for d in used):
        return None
    idx_shape = tuple(torch.broadcast_shapes(*(_sizes(indices[d]) for d in used)))
    idx = _broadcast([indices[d] for d in used], idx_shape)
    if idx is None:
        return None
    if any(_is_time(src[d]) for d in used):  # indexing along time: the picked positions are time
        idx = tuple(a if _is_time(a) else ((math.prod(n for n, _ in a), True),) for a in idx)
    rest = [d for d in range(len(src)) if d not in used]
    if used == list(range(used[0], used[-1] + 1)):
        out = (*src[:used[0]], *idx, *(src[d] for d in rest if d > used[-1]))
    else:
        out = (*idx, *(src[d] for d in rest))
    return out if len(out) == len(out_shape) else None


def _source_dims(node: fx.Node, lay: Layout, src: Layout | None, L: int, out_shape) -> Layout:
    """Values that do not read the input gain time where they are cut or expanded to L."""
    t = node.target
    time = set()
    if t in (aten.slice.Tensor, aten.narrow.default) and src is not None and len(src) == len(out_shape):
        d = (node.args[1] if len(node.args) > 1 else 0) % max(len(out_shape), 1)
        if t is aten.slice.Tensor:
            start = node.args[2] if len(node.args) > 2 else 0
            cut = start in (0, None) and out_shape[d] == L
        else:
            cut = node.args[2] == 0 and out_shape[d] == L
        if cut:
            time.add(d)
    if t is aten.expand.default and src is not None:
        off = len(out_shape) - len(src)
        for d, n in enumerate(out_shape):
            was = math.prod(x for x, _ in src[d - off]) if d >= off else 1
            if n == L and was == 1 and n != 1:
                time.add(d)
    if not time:
        return lay
    return tuple(((math.prod(n for n, _ in a), True),) if d in time and not _is_time(a) else a
                 for d, a in enumerate(lay))


def _strip(layout):
    """The layout with no time (a list for tuple outputs)."""
    if isinstance(layout, list):
        return [_strip(p) for p in layout]
    if isinstance(layout, tuple):
        return tuple(((math.prod(n for n, _ in a), False),) for a in layout)
    return layout


def static_layouts(cg: CapturedGraph) -> dict[fx.Node, tuple[tuple[int, ...], bool]]:
    """Time dims of every node of a static-L graph, and whether they are a size-based guess."""
    L = cg.length
    seq_time = {inp.node: inp.time_dim for inp in cg.inputs if inp.role == "sequence"}
    lay: dict[fx.Node, Any] = {}  # node -> Layout, a list of them (tuple outputs), or None
    out: dict[fx.Node, tuple[tuple[int, ...], bool]] = {}
    seq: set[fx.Node] = set()
    guess: set[fx.Node] = set()  # layouts that rest on a size-based guess
    for node in cg.gm.graph.nodes:
        val = node.meta.get("val")
        layout, guessed = None, False
        if node.op == "placeholder":
            if node in seq_time:
                seq.add(node)
            td = seq_time.get(node)
            if isinstance(val, torch.Tensor):
                layout = _plain(_shape(val), () if td is None else {td})
        elif node.op == "get_attr":
            if isinstance(val, torch.Tensor):
                layout = _plain(_shape(val))
        elif node.op == "call_function":
            ins = node.all_input_nodes
            view = lay
            if any(a in seq for a in ins):
                seq.add(node)
                # A guess about a weight or table must not put time into a sequence value.
                view = ChainMap({a: _strip(lay[a]) for a in ins if a not in seq and a in guess}, lay)
                guessed = any(a in guess for a in ins if a in seq)
            else:
                guessed = any(a in guess for a in ins)
            if isinstance(val, torch.Tensor):
                layout, fell_back = _layout_of(node, view, L, _shape(val), node in seq)
                guessed = guessed or fell_back
            elif _tensors_of(val):
                parts = [_layout_of(node, view, L, _shape(v), node in seq, multi=True)
                         if isinstance(v, torch.Tensor) else (None, False) for v in val]
                layout = [p for p, _ in parts]
                guessed = guessed or any(g for _, g in parts)
        if guessed:
            guess.add(node)
        lay[node] = layout
        first = layout if not isinstance(layout, list) else next((p for p in layout if p is not None), None)
        out[node] = (_dims(first) if first else (), guessed)
    return out


def _layout_of(node: fx.Node, lay: dict, L: int, out_shape, is_seq: bool, multi: bool = False):
    """(layout, guessed) of one tensor output of a call_function node."""
    try:
        got = _rule_multi(node, lay, out_shape) if multi else _rule(node, lay, L, out_shape)
    except (IndexError, TypeError, KeyError, ValueError, ZeroDivisionError, RuntimeError, AttributeError):
        got = None  # an op whose arguments the rules do not expect: the guess below
    if got is not None and len(got) == len(out_shape):
        got = tuple(_fit(a, n) for a, n in zip(got, out_shape))
        if not is_seq:
            src = lay.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            got = _source_dims(node, got, src if isinstance(src, tuple) else None, L, out_shape)
        return got, False
    # No rule: the dims of size L (the old guess, ambiguous when another dim equals L).
    return _plain(out_shape, {d for d, n in enumerate(out_shape) if n == L}), True
