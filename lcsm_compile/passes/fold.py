"""fold: filter generators evaluated once per compile, kept as buffers.

With a static L the verifier's impulse response at L is the filter. With a dynamic L the filter
is evaluated once at the fold length (settings.max_len, else the longest length the model itself
supports: the size of the buffer its filter path slices by L) and each call slices it.

Prefix consistency: the filter at the fold length must extend the one verify found at the capture
length. Two evaluations of one function of position at two lengths differ by round-off (matmul
kernels chosen by shape, a sine of frequency 14 amplifying it through an implicit MLP: ~3e-5 of the
norm in fp32), so the check is per channel, in L2 over the common prefix, relative to the channel's
norm, against ROUNDOFF_FACTOR * eps(dtype) (2.4e-4 in fp32); a filter that really depends on the
total length (normalised by L, linspace(0, 1, L), cut at L/2) is off by far more than that.

Memory: the filter subgraph is evaluated once at the fold length with intermediates freed as they
die (RegionFunction.evaluate_constants), not cached, and the impulse response runs with batch 1
when the filter ignores the batch (a static batch size is tried at 1 first); after folding, the
cached probe values are dropped. Modal recognition re-evaluates the subgraph when it needs it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx

from ..settings import Settings
from .capture import CapturedGraph, sym_expr
from .match import Rejection
from .verify import Mixer, canonical_row, concrete_shape, impulse_response

__all__ = ["DEFAULT_FOLD_LENGTH", "fold", "model_max_len", "prefix_allowance", "prefix_error"]

aten = torch.ops.aten
DEFAULT_FOLD_LENGTH = 8192
# Allowed per-channel relative L2 difference between the filter's prefixes at two lengths, in
# units of eps(dtype): round-off of the filter generator, amplified by it (a Hyena implicit MLP
# with sine frequency 14 reaches ~250 eps in fp32). Capped for half precision, where 2048 eps is
# more than the filter; the cap matches verify's tolerance for those dtypes.
ROUNDOFF_FACTOR = 2048.0
LOW_PRECISION_CAP = 3e-2
# A channel's norm is floored at this fraction of the largest channel's: a near-zero channel's
# round-off is set by the magnitudes it was computed from, not by its own.
CHANNEL_FLOOR = 1e-2


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


def prefix_allowance(dtype: torch.dtype) -> float:
    """The largest per-channel relative difference (see prefix_error) round-off explains."""
    return min(ROUNDOFF_FACTOR * torch.finfo(dtype).eps, LOW_PRECISION_CAP)


def prefix_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(worst over channels of |a_c - b_c|_2 / max(|a_c|_2, |b_c|_2, CHANNEL_FLOOR * max norm),
    that channel) for two (C, m) filters; inf where either is not finite."""
    a, b = a.detach().double(), b.detach().to(a.device).double()
    diff = (a - b).norm(dim=-1)
    norms = torch.maximum(a.norm(dim=-1), b.norm(dim=-1))
    scale = torch.maximum(norms, CHANNEL_FLOOR * norms.max()).clamp_min(1e-300)
    rel = torch.where(torch.isfinite(diff) & torch.isfinite(scale), diff / scale, torch.full_like(diff, torch.inf))
    c = int(rel.argmax())
    return float(rel[c]), c


def _impulse(mx: Mixer, consts: dict, shape: list[int], dtype, device) -> torch.Tensor:
    """verify's impulse response at this shape, with the filter values given (canonical (C, L))."""
    h, _ = impulse_response(functools.partial(mx.fn.apply, constants=consts), shape, mx.axis, dtype, device,
                            offset=0.0 if mx.offset_free else None)
    if tuple(h.shape) != tuple(shape):
        raise ValueError(f"output shape {tuple(h.shape)} differs from the input's {tuple(shape)}")
    return canonical_row(h, mx.axis, mx.bcast_dims, mx.chan_dims)


def _filter_at(mx: Mixer, length: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
    """The canonical filter at `length` from batch-1 probes where the filter ignores the batch,
    and a way to recompute it at the captured batch size (when that is static and not 1)."""
    val = mx.region.u.meta["val"]
    full = list(concrete_shape(val))
    for d in mx.bcast_dims:
        if isinstance(val.shape[d], torch.SymInt):
            full[d] = 1  # the filter ignores a dynamic batch; probe with one
    full[mx.axis] = length
    one = list(full)
    for d in mx.bcast_dims:
        one[d] = 1  # a static batch too: it does not reach the filter, and may not reach the ops
    consts = mx.fn.evaluate_constants(torch.Size(full))
    dtype, device = val.dtype, mx.h.device
    if one != full:
        try:
            h = _impulse(mx, consts, one, dtype, device)
        except Exception:  # noqa: BLE001 - sizes fixed at the captured batch: probe with it
            return _impulse(mx, consts, full, dtype, device), None
        return h, lambda: _impulse(mx, consts, full, dtype, device)
    return _impulse(mx, consts, full, dtype, device), None


def fold(cg: CapturedGraph, mixers: list[Mixer], settings: Settings) -> tuple[list[Mixer], list[Rejection]]:
    """Fill each mixer's h at the fold length; mixers that cannot be folded are rejected."""
    rejected: list[Rejection] = []
    if not cg.symbolic:
        cg.facts["fold_length"] = cg.length
        for mx in mixers:
            mx.fn.forget()
            _keep_taps(mx, settings)
        return mixers, rejected
    limits = [m for m in (model_max_len(cg, mx) for mx in mixers) if m]
    length = settings.max_len or (min(limits) if limits else max(cg.length, DEFAULT_FOLD_LENGTH))
    cg.facts["fold_length"] = length
    kept = []
    for mx in mixers:
        mx.fn.forget()  # the probes' cached filter values: verify is done with them
        try:
            h, retry = _filter_at(mx, length)
        except Exception as e:  # noqa: BLE001 - the region cannot run at that length
            rejected.append(Rejection(mx.region.seed, f"cannot evaluate the filter at max_len={length}: {e}"))
            continue
        m = min(mx.length, length)
        precision = mx.fn.compute_dtype()
        allowed = prefix_allowance(precision)
        err, chan = prefix_error(h[:, :m], mx.h[:, :m])
        if err > allowed and retry:  # a batch-1 probe of ops sized for the captured batch
            h = retry()
            err, chan = prefix_error(h[:, :m], mx.h[:, :m])
        del retry
        if err > allowed:
            rejected.append(Rejection(
                mx.region.seed,
                f"filter depends on total length (differs at max_len={length}: channel {chan} of its first "
                f"{m} taps is off by {err:.1e} of its norm, round-off in {str(precision).replace('torch.', '')} "
                f"explains {allowed:.1e})"))
            continue
        mx.h, mx.length = h.contiguous(), length
        _keep_taps(mx, settings)
        kept.append(mx)
    return kept, rejected


def _keep_taps(mx: Mixer, settings: Settings) -> None:
    """A short filter keeps only its taps. Padded to the length it is mostly zeros (Hyena-153M's
    2592 x 3 taps at 2^17: 1.4 GB per layer), and on CUDA a filter of L columns would be routed
    to an FFT convolution instead of the direct one; causal_conv takes K < L, and mx.length still
    bounds L."""
    K = mx.filter_length
    if K <= settings.short_conv_max and K < mx.h.shape[-1]:
        mx.h = mx.h[:, :K].clone()
