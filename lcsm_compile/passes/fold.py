"""fold: filter generators evaluated once per compile, kept as buffers.

With a static L the verifier's impulse response at L is the filter. With a dynamic L the filter
is evaluated once at the fold length (settings.max_len, else the longest length the model itself
supports: the size of the buffer its filter path slices by L) and each call slices it.
"""
from __future__ import annotations

import torch
from torch import fx

from ..settings import Settings
from .capture import CapturedGraph, sym_expr
from .match import Rejection
from .verify import Mixer, concrete_shape, impulse_response, to_canonical

__all__ = ["fold", "model_max_len", "DEFAULT_FOLD_LENGTH"]

aten = torch.ops.aten
DEFAULT_FOLD_LENGTH = 8192


def _is_time(value, cg: CapturedGraph) -> bool:
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    expr = sym_expr(value)
    return expr == cg.time_symbol if cg.symbolic else expr == cg.length


def model_max_len(cg: CapturedGraph, mixer: Mixer) -> int | None:
    """The size of the static buffer the filter path slices to [0, L): the model's own limit."""
    found = []
    for node in mixer.fn.constant:
        if node.target is not aten.slice.Tensor or len(node.args) < 4:
            continue
        src, dim, start, end = node.args[:4]
        if start not in (0, None) or not _is_time(end, cg):
            continue
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        if isinstance(val, torch.Tensor) and not isinstance(val.shape[dim], torch.SymInt):
            found.append(int(val.shape[dim]))
    return min(found) if found else None


def fold(cg: CapturedGraph, mixers: list[Mixer], settings: Settings) -> tuple[list[Mixer], list[Rejection]]:
    """Fill each mixer's h at the fold length; mixers that cannot be folded are rejected."""
    rejected: list[Rejection] = []
    if not cg.symbolic:
        cg.facts["fold_length"] = cg.length
        return mixers, rejected
    limits = [m for m in (model_max_len(cg, mx) for mx in mixers) if m]
    length = settings.max_len or (min(limits) if limits else max(cg.length, DEFAULT_FOLD_LENGTH))
    cg.facts["fold_length"] = length
    kept = []
    for mx in mixers:
        shape = list(concrete_shape(mx.region.u.meta["val"]))
        for d in mx.bcast_dims:
            if isinstance(mx.region.u.meta["val"].shape[d], torch.SymInt):
                shape[d] = 1  # the filter ignores a dynamic batch; probe with one
        shape[mx.axis] = length
        dtype = mx.region.u.meta["val"].dtype
        try:
            h_full, _ = impulse_response(mx.fn, shape, mx.axis, dtype, mx.h.device)
        except Exception as e:  # noqa: BLE001 - the region cannot run at that length
            rejected.append(Rejection(mx.region.seed, f"cannot evaluate the filter at max_len={length}: {e}"))
            continue
        h = to_canonical(h_full, mx.axis, mx.bcast_dims, mx.chan_dims)[0]
        m = min(mx.length, length)
        if not torch.allclose(h[:, :m].double(), mx.h[:, :m].double(), rtol=1e-3, atol=1e-5 * float(h.abs().max())):
            rejected.append(Rejection(mx.region.seed, "filter depends on total length (differs at max_len)"))
            continue
        mx.h, mx.length = h.contiguous(), length
        kept.append(mx)
    return kept, rejected
