"""modal: recognise filters h[t] = Re(sum_n r_n p_n^t) (+ a skip at t = 0), confirmed numerically.

Such a filter (StripedHyena's `compute_filter`, S4D / diagonal SSM kernels) decodes exactly with a
diagonal recurrence of state n, O(n) per token (kernels/modal), instead of the tiling.

Structure proposes: the filter subgraph (the mixer's u-independent nodes) holds an `exp` or `pow`
over time, exp(a + t log p) or p ** t. Its value at the fold length gives the poles in fp64 (the
exponent's step from t = 0 to t = 1, or the base of the power). Which dims of it index channels and
which index modes is not trusted to names or layouts: each reading is tried against the filter.
Numbers confirm: the residues come from a least-squares fit on samples of the folded h, and the
modal impulse response must equal the folded h over its whole length, per channel, to the
precision the model's own evaluation of r p^t can have: relative L1 error <= 1e-5 (fp32), or
within the rounding bound of its dtype, eps * sum_t,n |r| |p|^t (2 + n + t |log p|) (a model that
forms exp(t log p) in fp32 at t ~ 1e3 is only that close to its own modal form; capped at 1e-3).
Anything else stays on the tiling, with the reason.

    modal, why = recognise_modal(mixer)          # ModalFilter | None, and why not
    strategy = choose_strategy(mixer, settings)  # "short" | "modal" | "long", with the reason
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..kernels.modal.reference import modal_impulse_response
from ..settings import Settings
from .region import describe_node
from .verify import Mixer, concrete_shape

__all__ = ["MAX_MODES", "ModalFilter", "Strategy", "choose_strategy", "modal_tolerance", "recognise_modal"]

aten = torch.ops.aten
# More modes than this per channel: the tiling is the better decoder (and the fit gets costly).
MAX_MODES = 64
# Residues summing to more than this times max|h| cancel, and the fp32 recurrence state loses the
# difference: measured 1.4e-4 relative output error at 2111 x (H3, before the fit was regularised).
MAX_CANCELLATION = 100.0
_EXP = (aten.exp.default,)
_POW = (aten.pow.Tensor_Tensor, aten.pow.Scalar)


@dataclass
class ModalFilter:
    """h[c, t] = Re(sum_n residues[c, n] * poles[c, n]^t) + skip[c] * [t == 0], in the mixer's
    canonical channel order (the rows of `mixer.h`)."""

    poles: Tensor  # (C, n) complex128
    residues: Tensor  # (C, n) complex128
    skip: Tensor  # (C,) float64
    error: float  # max over channels of |h_modal - h|_1 / |h|_1 over the folded length
    allowed: float  # the largest error the confirmation accepted (tolerance or rounding bound)
    length: int  # the folded length it was confirmed over
    node: str  # the exp / pow node the poles were read from

    @property
    def state_size(self) -> int:
        return self.poles.shape[-1]

    @property
    def channels(self) -> int:
        return self.poles.shape[0]

    def impulse_response(self, length: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return modal_impulse_response(self.poles, self.residues, self.skip, length, dtype)


@dataclass
class Strategy:
    name: str  # "short" (ring buffer) | "modal" (diagonal recurrence) | "long" (tiling)
    reason: str
    modal: ModalFilter | None = None


def modal_tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


def choose_strategy(mixer: Mixer, settings: Settings) -> Strategy:
    """How the decoder should step this mixer, and why (explain() prints both)."""
    K = mixer.filter_length
    if K <= settings.short_conv_max:
        return Strategy("short", f"filter of {K} taps <= short_conv_max={settings.short_conv_max}: ring buffer")
    if not settings.modal_recurrence:
        return Strategy("long", "modal_recurrence=False: tiling")
    modal, why = recognise_modal(mixer)
    if modal is None:
        return Strategy("long", f"not modal ({why}): tiling")
    return Strategy("modal", f"Re(sum of {modal.state_size} modes r p^t) from {modal.node}, matches the folded "
                             f"filter to {modal.error:.1e} (allowed {modal.allowed:.1e}) over {modal.length} taps: "
                             f"recurrence, state {modal.state_size}",
                    modal)


def recognise_modal(mixer: Mixer, rtol: float | None = None) -> tuple[ModalFilter | None, str]:
    """The mixer's filter as a confirmed ModalFilter, or None and the reason it is not one.

    Callable before or after rewrite (the region function re-evaluates the filter subgraph from
    the calls it recorded, not from the graph); the answer is cached on the mixer for its
    current filter."""
    rtol = modal_tolerance(mixer.h.dtype) if rtol is None else rtol
    key = (id(mixer.h), mixer.h.shape, rtol)
    cache = mixer.__dict__.setdefault("_modal_cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = _recognise(mixer, rtol)
    return cache[key]


def _recognise(mixer: Mixer, rtol: float) -> tuple[ModalFilter | None, str]:
    h = mixer.h
    C, L = h.shape
    if L < 2:
        return None, "a filter of one tap"
    try:
        env = mixer.fn.constants(torch.Size(_fold_shape(mixer)))
    except Exception as e:  # noqa: BLE001 - the filter subgraph cannot be re-evaluated here
        return None, f"could not re-evaluate the filter subgraph ({type(e).__name__}: {e})"
    candidates = [c for node in mixer.fn.constant if (c := _poles_of(node, env, L)) is not None]
    if not candidates:
        return None, "no exp / pow over time (of poles p^t) in the filter subgraph"
    reasons = []
    for node, poles, _tdim in candidates:
        for per_channel in _channel_readings(poles, C):
            n = per_channel.shape[-1]
            if n > MAX_MODES:
                reasons.append((math.inf, f"{n} modes per channel > {MAX_MODES}"))
                continue
            if bool((per_channel.abs() > 1 + 1e-6).any()):
                reasons.append((math.inf, "a pole outside the unit circle (the recurrence would grow without bound)"))
                continue
            residues, skip, err, allowed = _fit_and_confirm(h, per_channel, rtol)
            if err > allowed:
                reasons.append((err, f"h is not a sum of {n} exponentials r p^t: relative error {err:.1e}"))
                continue
            growth = _cancellation(h, residues)
            if growth > MAX_CANCELLATION:
                reasons.append((math.inf, f"ill-conditioned modes: the residues sum to {growth:.1e} x max|h| "
                                          "(they cancel; an fp32 recurrence state would lose h)"))
                continue
            return ModalFilter(per_channel, residues, skip, err, allowed, L, describe_node(node)), ""
    return None, min(reasons, key=lambda r: r[0])[1]


def _cancellation(h: Tensor, residues: Tensor) -> float:
    """max over channels of sum_n |r_n| / max_t |h[t]|: how much the modes cancel at t = 0."""
    peak = h.detach().abs().amax(-1).double().clamp_min(1e-300)
    return float((residues.abs().sum(-1).to(peak.device) / peak).max())


def _fold_shape(mixer: Mixer) -> list[int]:
    """u's shape at the folded length, as fold evaluated it (batch dims that were dynamic at 1)."""
    val = mixer.region.u.meta["val"]
    shape = list(concrete_shape(val))
    for d in mixer.bcast_dims:
        if isinstance(val.shape[d], torch.SymInt):
            shape[d] = 1
    shape[mixer.axis] = mixer.length
    return shape


def _time_dim(node: fx.Node, value: Tensor, L: int) -> int | None:
    dims = [d for d in node.meta.get("lcsm_time", ()) if d < value.dim() and value.shape[d] == L]
    if not dims:
        dims = [d for d in range(value.dim()) if value.shape[d] == L]
    return dims[-1] if dims else None


def _poles_of(node: fx.Node, env: dict, L: int) -> tuple[fx.Node, Tensor, int] | None:
    """(node, poles shaped like the node's value without its time dim, time dim) for exp / pow
    nodes over time; poles in complex128. Works on the values alone: after rewrite, the filter
    nodes are erased from the graph and their args are gone (their cached values are not)."""
    if node.op != "call_function" or node.target not in _EXP + _POW:
        return None
    value = env.get(node)
    if not isinstance(value, Tensor) or not (value.is_complex() or value.is_floating_point()) or value.dim() < 1:
        return None
    tdim = _time_dim(node, value, L)
    if tdim is None or L < 2:
        return None
    out_shape = value.select(tdim, 0).shape
    poles = None
    if node.target in _EXP:
        x = _exponent(node, value, env, tdim)
        if x is not None:
            # exp(a + t log p): the step of the exponent from t = 0 to t = 1, in fp64
            poles = torch.exp(x.select(tdim, 1).to(torch.complex128) - x.select(tdim, 0).to(torch.complex128))
    elif node.target is aten.pow.Scalar and isinstance(node.args[0], (int, float, complex)):
        poles = torch.tensor(complex(node.args[0]), dtype=torch.complex128)
    elif node.args and isinstance(node.args[0], fx.Node) and isinstance(env.get(node.args[0]), Tensor):
        base = env[node.args[0]]
        if base.dim() == value.dim() and base.shape[tdim] == 1:
            poles = base.select(tdim, 0).to(torch.complex128)
    if poles is None:
        poles = _ratio_poles(value, tdim)
    return node, poles.expand(out_shape).to(value.device), tdim


def _exponent(node: fx.Node, value: Tensor, env: dict, tdim: int) -> Tensor | None:
    """The first two time steps of an exp node's input: from its arg, or (args erased) from the
    cached value whose exp it is (compared on those steps and the last: filters at max_len are
    large, so nothing here touches more than three time steps)."""
    arg = node.args[0] if node.args else None
    if isinstance(arg, fx.Node) and isinstance(env.get(arg), Tensor):
        x = env[arg]
        return x.narrow(tdim, 0, 2) if x.dim() == value.dim() and x.shape[tdim] == value.shape[tdim] else None
    L = value.shape[tdim]
    idx = torch.tensor([0, 1, L - 1], device=value.device)
    want = value.index_select(tdim, idx)
    for other, x in env.items():
        if (isinstance(other, fx.Node) and other is not node and isinstance(x, Tensor) and x.shape == value.shape
                and x.dtype == value.dtype):
            xs = x.index_select(tdim, idx)
            if torch.equal(torch.exp(xs), want):
                return xs.narrow(tdim, 0, 2)
    return None


def _ratio_poles(value: Tensor, tdim: int) -> Tensor:
    """p from v[t] = c p^t: v[1] / v[0], refined over a longer span T (fp32 values hold p to
    ~1e-7; the T-th root of the residual ratio, near 1, carries that error down by T)."""
    L = value.shape[tdim]
    T = min(L - 1, 64)
    v = value.index_select(tdim, torch.tensor([0, 1, T], device=value.device)).movedim(tdim, -1)
    v = v.to(torch.complex128)
    p = v[..., 1] / v[..., 0]
    if T > 1:
        ratio = v[..., 2] / (v[..., 0] * p**T)
        ok = torch.isfinite(ratio) & ((ratio - 1).abs() < 0.1) & (v[..., 2].abs() > 1e-30)
        p = torch.where(ok, p * ratio ** (1.0 / T), p)
    return torch.where(torch.isfinite(p), p, torch.zeros_like(p))


def _channel_readings(poles: Tensor, C: int):
    """Per-channel poles (C, n) for each way the dims of `poles` can map to the C channels: a run of
    dims that holds exactly the channels, one that repeats per group (repeat_interleave / repeat),
    or none (poles shared by all channels). Size-1 dims are broadcast, the rest are modes."""
    dims = [d for d in range(poles.dim()) if poles.shape[d] > 1]
    p = poles.reshape([poles.shape[d] for d in dims]) if dims else poles.reshape(1)
    sizes = list(p.shape) if dims else []
    seen = []
    for i in range(len(sizes)):
        for j in range(i + 1, len(sizes) + 1):
            k = math.prod(sizes[i:j])
            if C % k:
                continue
            modes = [d for d in range(len(sizes)) if not i <= d < j]
            q = p.permute(*range(i, j), *modes).reshape(k, -1)  # (channels in the run, n)
            maps = [torch.arange(C)] if k == C else [torch.arange(C) // (C // k), torch.arange(C) % k]
            for idx in maps:
                seen.append(q[idx.to(q.device)])
    seen.append(p.reshape(1, -1).expand(C, -1))
    # Exact channel runs first (fewest modes first among equals), shared poles last.
    return sorted(seen[:-1], key=lambda q: q.shape[-1]) + seen[-1:]


def _fit_and_confirm(h: Tensor, poles: Tensor, rtol: float) -> tuple[Tensor, Tensor, float, float]:
    """Residues by least squares, skip from h[0], then the check over the full length: (residues,
    skip, error, allowed error), both relative and the worst over channels (on a few channels
    only, when those already fail)."""
    C = h.shape[0]
    h64 = h.detach().to(torch.float64)
    eps = torch.finfo(h.dtype).eps / 2
    # A cheap look at a few channels first rejects a wrong reading before the full fit.
    probe = sorted({0, C // 2, C - 1})
    for rows in (probe, None) if C > 8 else (None,):
        hh = h64 if rows is None else h64[rows]
        pp = poles if rows is None else poles[rows]
        residues = _least_squares(hh, pp, torch.finfo(h.dtype).eps)
        skip = hh[:, 0] - residues.real.sum(-1)
        err, allowed = _confirm(hh, pp, residues, skip, rtol, eps)
        if err > allowed:
            break
    return residues, skip, err, allowed


def _fit_times(L: int, n: int) -> Tensor:
    """Where the fit samples h: the first steps, then steps spread to the end of the filter. Poles
    near 1 (slow modes, S4D with small dt) are nearly collinear over a short prefix; only late
    samples tell them apart, and a fit on a prefix alone extrapolates badly."""
    head = min(L - 1, max(128, 8 * n))
    spread = torch.linspace(head + 1, L - 1, steps=max(0, min(L - 1 - head, max(384, 24 * n))))
    return torch.unique(torch.cat([torch.arange(1, head + 1, dtype=torch.float64), spread.round().double()]))


def _least_squares(h: Tensor, poles: Tensor, eps: float) -> Tensor:
    """r (C, n) minimising |Re(sum_n r p^t) - h[t]| over the fit times, fp64 on the CPU (gelsd
    copes with real poles, whose imaginary columns vanish); eps: the precision h was computed in."""
    C, L = h.shape
    n = poles.shape[-1]
    t = _fit_times(L, n)
    p = poles.detach().cpu().to(torch.complex128)
    zero = (p == 0)[..., None]
    V = torch.exp(torch.where(zero, torch.zeros((), dtype=p.dtype), torch.log(p)[..., None] * t))
    V = torch.where(zero, torch.zeros_like(V), V)  # 0^t = 0 for t >= 1
    A = torch.cat([V.real, -V.imag], dim=1).transpose(1, 2)  # (C, T, 2n)
    scale = A.norm(dim=1, keepdim=True)
    # A column far smaller than the channel's largest (the imaginary part of a pole that is real
    # up to rounding) carries only noise: normalised, it would fit that noise with a huge residue.
    keep = scale > 1e-9 * scale.amax(-1, keepdim=True)
    scale = torch.where(keep, scale, torch.ones_like(scale))
    y = h[:, t.long().to(h.device)].cpu()[..., None]
    # h is known to its dtype's precision only: directions of A below that carry no information,
    # and solving along them gives residues that cancel (H3's S4D: sum|r| = 2000 max|h| at
    # rcond 1e-13, 2.5 at 1e-10, the same fit error).
    rcond = max(1e-13, 1e-2 * eps)
    x = torch.linalg.lstsq(A * keep / scale, y, rcond=rcond, driver="gelsd").solution / scale.transpose(1, 2)
    x = x * keep.transpose(1, 2)
    x = x[..., 0]
    return torch.complex(x[:, :n], x[:, n:]).to(h.device)


def _confirm(h: Tensor, poles: Tensor, residues: Tensor, skip: Tensor, rtol: float, eps: float,
             work_bytes: int = 1 << 28) -> tuple[float, float]:
    """(error, allowed): |h_modal - h|_1 / |h|_1 over the full length and the error each channel
    may have (rtol, or the rounding bound of evaluating r p^t in the filter's dtype, capped at
    1e-3), for the channel that is worst against its allowance."""
    C, L = h.shape
    n = poles.shape[-1]
    hm = modal_impulse_response(poles.to(h.device), residues, skip, L, torch.float64)
    num = (hm - h).abs().sum(-1)
    den = h.abs().sum(-1)
    # eps * sum_t sum_n |r| |p|^t (2 + n + t |log p|), in channel chunks
    p = poles.to(device=h.device, dtype=torch.complex128)
    a, lg = p.abs(), torch.log(p).abs().nan_to_num(posinf=0.0)
    r = residues.abs()
    t = torch.arange(L, device=h.device, dtype=torch.float64)
    bound = torch.empty(C, dtype=torch.float64, device=h.device)
    step = max(1, work_bytes // max(1, n * L * 8 * 3))
    for c0 in range(0, C, step):
        pw = torch.exp(torch.log(a[c0 : c0 + step])[..., None] * t).nan_to_num(0.0)  # |p|^t (0^0 -> 0: fine)
        terms = pw * (2 + n + t * lg[c0 : c0 + step, :, None])
        bound[c0 : c0 + step] = eps * (r[c0 : c0 + step, :, None] * terms).sum((-1, -2))
    safe = den.clamp_min(1e-300)
    rel = torch.where(den > 0, num / safe, num)
    allowed = torch.maximum(torch.full_like(rel, rtol), torch.minimum(bound / safe, torch.full_like(rel, 1e-3)))
    worst = int(torch.argmax(rel / allowed)) if rel.numel() else 0
    return (float(rel[worst]), float(allowed[worst])) if rel.numel() else (0.0, rtol)
