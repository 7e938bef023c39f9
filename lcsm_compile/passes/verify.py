"""verify: numbers confirm every proposed region before anything is rewritten.

For a region y = f(u):
  offset     c = f(0), must be constant in time (a bias); the rest must be linear
  impulse    h = f(delta_0) - c gives the filter (a skip D*u lands in h[0])
  channels   f(r * delta_0) - c == r * h for random r, else the region mixes channels
  causality  f(delta_{L-1}) - c is zero before L-1, else it reads future positions
  probes     f(u) - c == causal_conv(u, h) for random u, one of unit scale and one 1e3 times
             larger (linearity, also where a clamp or saturation acts; time invariance)
  bias       c is one value per channel: the rewrite adds it to every batch row and, with a
             dynamic L, at every length, so c must not vary along the batch nor with L
  lengths    with a dynamic L the rewritten graph serves other lengths too, so the region is
             re-run at a longer, a shorter and the shortest length its shape guards admit (from 2;
             lengths the guards exclude never run this graph): it must be causal there
             (an FFT whose size does not grow with L, or a fixed-length filter transformed at 2L,
             wraps around at some lengths only), its offset must be the bias, and with probes on,
             h there is a prefix of h at the capture length and a random probe matches the
             convolution;
             with a static L, factory ops sized by L (linspace(0, 1, L)) are re-run at L+1
A region that fails keeps its original nodes, and the reason goes to explain().
Sampled lengths are not all lengths: a region causal at every length checked but not at some
other one is not caught.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..ops import causal_conv_fft, causal_conv_reference
from ..settings import Settings
from .capture import CapturedGraph, sym_expr
from .match import Rejection
from .recheck_lengths import recheck_lengths
from .region import Region, RegionFunction, depends_on, foreign_inputs

__all__ = ["Mixer", "filter_extent", "verify_region", "verify", "to_canonical", "from_canonical"]

aten = torch.ops.aten


@dataclass
class Mixer:
    region: Region
    fn: RegionFunction
    axis: int  # time dim of u
    bcast_dims: tuple[int, ...]  # dims of u the filter does not depend on (batch)
    chan_dims: tuple[int, ...]  # dims of u that index channels
    h: Tensor  # (C, L) canonical filter, skip folded into h[:, 0]
    bias: Tensor | None  # (C,) constant offset, or None
    length: int  # length h was computed at
    offset_free: bool = False  # f(0) was exactly 0 at every length probed: impulses need no zero probe

    @property
    def kind(self) -> str:
        return self.region.kind

    @property
    def channels(self) -> int:
        return self.h.shape[0]

    @property
    def filter_length(self) -> int:
        """Taps up to the last significant one (see filter_extent): FFT round-off is not a tap."""
        key = (id(self.h), tuple(self.h.shape))
        cached = self.__dict__.get("_extent")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_extent"] = (key, filter_extent(self.h))
        return cached[1]


# A tap at most TAP_EPS * eps(dtype) * max|h| of its channel is round-off level (an FFT path
# leaves ~eps * max|h| in taps a few-tap filter never had). A channel's tail of such taps is cut
# only when its L1 mass is at most TAIL_EPS * eps (capped at TAIL_MAX) of the channel's L1 norm:
# a long filter whose many small taps add up (a big skip over a small decaying filter) keeps them.
TAP_EPS = 8.0
TAIL_EPS = 1024.0
TAIL_MAX = 1e-2


def filter_extent(h: Tensor) -> int:
    """The number of taps of a (C, L) filter up to its last significant one (at least 1).

    Per channel: the last tap above TAP_EPS * eps * max|h_c|, if the taps past it carry at most
    min(TAIL_EPS * eps, TAIL_MAX) of the channel's L1 norm; else the last nonzero tap. The
    filter's extent is the largest over channels. Works in channel chunks of ~16M elements:
    filters at max_len are large (2592 x 2^17 for Hyena-153M)."""
    if h.numel() == 0 or h.shape[-1] == 0:
        return 1
    a_all = h.detach().reshape(-1, h.shape[-1])
    L = a_all.shape[-1]
    floating = h.dtype.is_floating_point or h.dtype.is_complex
    eps = torch.finfo(h.dtype).eps if floating else 0.0
    rows = max(1, (1 << 24) // L)
    extent = 1
    for c0 in range(0, a_all.shape[0], rows):
        a = a_all[c0 : c0 + rows].abs()
        if floating and a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        exact = _last(a > 0, L)
        if not floating:
            extent = max(extent, int(exact.max()))
            continue
        significant = _last(a > TAP_EPS * eps * a.amax(-1, keepdim=True), L)
        tails = (significant < exact).nonzero().squeeze(-1)  # rows with round-off-level taps at the end
        if tails.numel():  # only they need the fp64 sums (a short filter padded to L has none)
            a, sig = a[tails], significant[tails]
            beyond = torch.arange(L, device=a.device)[None, :] >= sig[:, None]
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            dropped = torch.where(beyond, a, zero).sum(-1, dtype=torch.float64)
            ok = dropped <= min(TAIL_EPS * eps, TAIL_MAX) * a.sum(-1, dtype=torch.float64)
            exact = exact.index_put((tails,), torch.where(ok, sig, exact[tails]))
        extent = max(extent, int(exact.max()))
    return extent


def _last(mask: Tensor, L: int) -> Tensor:
    """Per row: 1 + index of the last True (0 when none)."""
    any_ = mask.any(-1)
    last = L - mask.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(any_, last, torch.zeros_like(last))


class VerifyError(Exception):
    pass


def concrete_shape(val) -> tuple[int, ...]:
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in val.shape)


CHUNK = 1 << 22  # elements per chunk in the norms below


def _square_sums(*ts: Tensor, dtype: torch.dtype, chunk: int = CHUNK) -> list[float]:
    """[||ts[0] - ts[1]||^2, ||ts[1]||^2] (or [||ts[0]||^2] for one tensor), the tensors broadcast
    together, in `dtype`, over slices of their largest dim: no whole copy of a (B, C, L) probe
    (GBs) and no flattening copy of a strided one; the sums stay on the device until the end."""
    ts = torch.broadcast_tensors(*ts)
    shape = ts[0].shape
    if not shape:
        ts, shape = [t.reshape(1) for t in ts], (1,)
    dim = max(range(len(shape)), key=lambda d: shape[d])
    step = max(1, chunk // max(1, ts[0].numel() // max(1, shape[dim])))
    acc = torch.zeros(len(ts), dtype=torch.float64, device=ts[0].device)
    for i in range(0, shape[dim], step):
        xs = [t.narrow(dim, i, min(step, shape[dim] - i)).to(dtype) for t in ts]
        parts = [xs[0] - xs[1], xs[1]] if len(xs) == 2 else xs
        acc += torch.stack([torch.linalg.vector_norm(v) for v in parts]).double() ** 2
    return acc.tolist()


def _sums(*ts: Tensor) -> list[float]:
    """_square_sums in fp32 where that is exact enough (round-off ~1e-7 of a norm, far under
    any tolerance here), in fp64 for fp64 tensors and when fp32 squares overflow or underflow."""
    if all(t.dtype != torch.float64 for t in ts):
        sums = _square_sums(*ts, dtype=torch.float32)
        if all(math.isfinite(v) for v in sums) and sums[-1] >= 1e-30:
            return sums
    return _square_sums(*ts, dtype=torch.float64)


def _rel(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    num, den = _sums(a, b)
    return (num / max(den, 1e-60)) ** 0.5


def _norm(x: Tensor) -> float:
    """||x||."""
    return _sums(x)[0] ** 0.5


def canonical_row(x: Tensor, axis: int, bcast: tuple, chan: tuple) -> Tensor:
    """Row 0 of to_canonical(x), (C, L), as a copy: a view would keep the whole (B, C, L) probe
    response alive with the filter (B = 8, L = 32768: 65 GB over Hyena-153M's 36 regions, an
    OOM on an H200)."""
    return to_canonical(x, axis, bcast, chan)[0].clone()


def to_canonical(x: Tensor, axis: int, bcast: tuple, chan: tuple) -> Tensor:
    """(..., L at axis, ...) -> (prod bcast, prod chan, L)."""
    perm = (*bcast, *chan, axis)
    x = x.permute(perm)
    b = 1
    for d in range(len(bcast)):
        b *= x.shape[d]
    return x.reshape(b, -1, x.shape[-1])


def from_canonical(y: Tensor, shape: tuple, axis: int, bcast: tuple, chan: tuple) -> Tensor:
    perm = (*bcast, *chan, axis)
    y = y.reshape([shape[d] for d in perm])
    return y.permute([perm.index(d) for d in range(len(shape))])


def _device(cg: CapturedGraph) -> torch.device:
    for inp in cg.inputs:
        if isinstance(inp.value, Tensor):
            return inp.value.device
    return torch.device("cpu")


def impulse_response(fn: RegionFunction, shape, axis, dtype, device, at: int = 0,
                     offset: Tensor | float | None = None):
    """(f(delta at `at`) - f(0), f(0)). `offset`: f(0) where it is already known, as a tensor
    evaluated at this shape or as 0.0 where the region maps zeros to exactly zero (Mixer.offset_free),
    so the region runs once instead of twice."""
    d = torch.zeros(shape, dtype=dtype, device=device)
    c = fn(d) if offset is None else offset
    d.select(axis, at).fill_(1)
    y = fn(d)
    return (y if isinstance(c, float) and c == 0.0 else y - c), c


def verify_region(cg: CapturedGraph, region: Region, settings: Settings) -> Mixer:
    foreign = foreign_inputs(region)
    if foreign:
        from .region import describe_node  # noqa: PLC0415

        raise VerifyError(f"data-dependent filter: it reads another sequence value ({describe_node(foreign[0])})")
    for node in cg.gm.graph.nodes:
        if node.target is aten.flip.default and node.meta.get("lcsm_class") == "MIXING" and depends_on(region.u, node):
            raise VerifyError("non-causal: flips the time axis (the convolution runs on time-reversed input)")
    fn = RegionFunction(cg, region)
    uval = region.u.meta["val"]
    shape = concrete_shape(uval)
    dtype, device = uval.dtype, _device(cg)
    if not dtype.is_floating_point:
        raise VerifyError(f"its input is {dtype}, not a floating-point signal")
    tol = settings.verify_rtol if fn.compute_dtype() in (torch.float32, torch.float64) else 3e-2
    axes = _axis_candidates(cg, uval, shape)
    # Dims seq_axis tracked as time first: when L equals another size (L == D), the reason
    # reported for a rejected region is then the one for its real time axis.
    tracked = set(region.u.meta.get("lcsm_time", ()))
    axes.sort(key=lambda d: d not in tracked)
    if not axes:
        raise VerifyError("no time dim found in the region's input")
    errors = []
    for axis in axes:
        try:
            return _verify_axis(cg, fn, region, shape, axis, dtype, device, tol, settings.verify)
        except VerifyError as e:
            errors.append(str(e))
    raise VerifyError(errors[0])


def _axis_candidates(cg: CapturedGraph, uval, shape) -> list[int]:
    out = []
    for i, s in enumerate(uval.shape):
        expr = sym_expr(s)
        if cg.time_symbol is not None:
            if expr == cg.time_symbol:
                out.append(i)
        elif shape[i] == cg.length:
            out.append(i)
    return out


FAR_PROBE_SCALE = 1e3  # the second probe's scale (relative errors do not see it; fp16: 1)
# What an impulse may show before it arrives: an FFT's round-off (~1e-7 of the response in fp32,
# ~1e-16 in fp64; the zoo measured 1e-7 up to L = 4096 on a CPU), never what dropping a real
# anti-causal part would cost: at 2e-6 such a part adds at most ~3e-6 to a rewrite. verify_rtol (1e-4)
# admitted a leak of 3e-5, three times the fp32 error any rewrite may add.
LEAK_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _random(shape, dtype, device, seed: int) -> Tensor:
    """A random probe drawn where it is used: on a GPU, not a host draw copied over (for
    Hyena-153M at B = 8, L = 8192 one probe is 170M normals, and verify draws ~4 per region).
    fp32 draws (fp64 for fp64 regions): fp64 ones cast down cost 2x on a CPU."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)


def _verify_axis(cg, fn, region, shape, axis, dtype, device, tol, probes=True) -> Mixer:
    L = shape[axis]
    draws = iter(range(1234 + L, 1 << 62))

    def rand(shp):
        return _random(shp, dtype, device, next(draws))

    try:
        h_full, c = impulse_response(fn, shape, axis, dtype, device)
    except VerifyError:
        raise
    except Exception as e:  # noqa: BLE001 - a region that cannot run on probes is not a mixer
        raise VerifyError(f"could not be evaluated on probe inputs ({type(e).__name__}: {e})") from e
    if tuple(h_full.shape) != tuple(shape):
        raise VerifyError(f"its output shape {tuple(h_full.shape)} differs from its input's {shape}")
    scale = max(_norm(h_full), 1e-30)
    # The offset (bias) must not vary along time.
    if _rel(c, c.narrow(axis, 0, 1).expand_as(c)) > tol and _norm(c) > tol * scale:
        raise VerifyError("its offset f(0) varies with position")
    if _leaks(fn, shape, axis, dtype, device, scale, tol, c):
        raise VerifyError("non-causal: reads future positions")
    # Which dims index channels and which the filter ignores (batch).
    # A dynamic size can only be a batch-like dim (the rewrite folds the channel count into a
    # view), so besides dim 0 any dynamic dim the filter ignores is one (a time-first (L, B, D)).
    val = region.u.meta.get("val")
    dyn = {d for d in range(len(shape)) if isinstance(val, Tensor) and isinstance(val.shape[d], torch.SymInt)}
    others = [d for d in range(len(shape)) if d != axis]
    bcast = tuple(d for d in others
                  if (d == 0 or d in dyn) and _rel(h_full, h_full.narrow(d, 0, 1).expand_as(h_full)) <= tol)
    chan = tuple(d for d in others if d not in bcast)
    # A dynamic dim the filter varies along (a filter per batch row, batch marked dynamic) would be
    # specialized by the rewrite's view, which dynamo refuses for a dim marked dynamic.
    dynamic = [d for d in chan if d in dyn]
    if dynamic:
        raise VerifyError(f"its filter differs along dim {dynamic[0]}, whose size is dynamic (the folded "
                          "filter has one row per index there)")
    d0 = torch.zeros(shape, dtype=dtype, device=device)
    d0.select(axis, 0).copy_(rand(d0.select(axis, 0).shape))  # a random impulse per channel
    if _rel(fn(d0) - c, h_full * d0.select(axis, 0).unsqueeze(axis)) > tol:
        raise VerifyError(f"mixes channels (or time is not dim {axis} of its input: options={{'seq_dim': ...}})")
    del d0  # (B, C, L): the probes below need their own
    h = canonical_row(h_full, axis, bcast, chan)
    bias = canonical_row(c.narrow(axis, 0, 1), axis, bcast, chan)[:, 0]
    bias = None if _norm(bias) == 0 else bias
    # The rewrite adds one bias per channel: an offset that differs between batch rows (a (B, C, 1)
    # buffer) would be replaced by row 0's.
    if bcast and _offset_mismatch(c, bias, axis, bcast, chan, scale, tol):
        raise VerifyError(f"its offset f(0) varies along the batch (dim {bcast[0]}); "
                          "the rewrite adds one bias per channel")
    # Random probes: the whole region against the convolution it claims to be. The second is
    # scaled far past unit inputs: a nonlinearity that acts only on large values (a clamp at
    # +-20 on a skip path) passes unit probes (not in fp16, whose range 1e3 inputs could exceed).
    far = 1.0 if dtype == torch.float16 else FAR_PROBE_SCALE
    for scale_u in (1.0, far)[: 2 if probes else 0]:
        u = rand(shape) * scale_u
        got, err = _probe_error(fn, u, c, h, axis, bcast, chan, tol)
        if err > tol:
            if _rel(fn(2 * u) - c, 2 * got) > tol:
                raise VerifyError("not linear in its input (a data-dependent filter or a nonlinearity)")
            if L > 2:
                mid, _ = impulse_response(fn, shape, axis, dtype, device, at=L // 2, offset=c)
                n = L - L // 2
                shifted = torch.zeros_like(h_full).narrow(axis, L // 2, n).copy_(h_full.narrow(axis, 0, n))
                if _rel(mid.narrow(axis, L // 2, n), shifted) > tol:
                    raise VerifyError("not time-invariant: the filter changes with position")
            raise VerifyError(f"does not match a causal convolution (relative error {err:.2e})")
    mixer = Mixer(region, fn, axis, bcast, chan, h, bias, L, offset_free=not bool(c.any()))
    _check_lengths(cg, mixer, shape, dtype, device, tol, probes)
    return mixer


def _leaks(fn, shape, axis, dtype, device, scale: float, tol: float, offset: Tensor) -> bool:
    """Causality: whether an impulse at the last step shows up earlier (`offset`: f(0)) beyond
    round-off (LEAK_RTOL, where it is tighter than the region's tolerance `tol`)."""
    tol = min(tol, LEAK_RTOL.get(fn.compute_dtype(), tol))
    L = shape[axis]
    if L < 2:
        return False
    last, _ = impulse_response(fn, shape, axis, dtype, device, at=L - 1, offset=offset)
    leak = _norm(last.narrow(axis, 0, L - 1))
    return leak > tol * max(scale, _norm(last))


def _offset_mismatch(c: Tensor, bias: Tensor | None, axis, bcast, chan, scale: float, tol: float) -> bool:
    """Whether the offset f(0) differs from the per-channel `bias` the rewrite adds (at any batch
    row, position or length), beyond round-off of the offset or of the region's response (`scale`)."""
    cc = to_canonical(c, axis, bcast, chan)
    want = torch.zeros((), dtype=cc.dtype, device=cc.device) if bias is None else bias.to(cc)[None, :, None]
    err = _sums(cc, want)[0] ** 0.5  # broadcast in chunks: no (B, C, L) difference
    return err > 0 and err > tol * max(_norm(cc), scale)


def _probe_error(fn, u: Tensor, c: Tensor, h: Tensor, axis, bcast, chan, tol: float) -> tuple[Tensor, float]:
    """f(u) - c, and its relative error against the causal convolution of u with h."""
    got = fn(u) - c
    # The reference in fp32 where its round-off (~1e-6 through an FFT) is far under the
    # tolerance, else fp64: at B = 8 the fp64 FFTs were 40% of verifying Hyena-153M on a CPU.
    # Long filters by FFT (the direct sum over K ~ L taps was 40% of a compile before that).
    exact = torch.float64 if u.dtype == torch.float64 or tol < 1e-5 else torch.float32
    # Trailing taps that are exactly zero in every channel change nothing: a short conv's impulse
    # response at L is its K taps and zeros, so its reference is the direct K-tap sum instead of
    # an FFT at 2L over all its channels (the 10 GiB fp64 buffer of the B = 8, L = 32768 OOM).
    h = h[:, : max(1, int(_last((h != 0).any(0, keepdim=True), h.shape[-1])))]
    uc, h = to_canonical(u, axis, bcast, chan).to(exact), h.to(exact)
    want = causal_conv_reference(uc, h) if h.shape[-1] <= 64 else causal_conv_fft(uc, h)
    return got, _rel(got, from_canonical(want, u.shape, axis, bcast, chan))


def _check_lengths(cg, mixer: Mixer, shape, dtype, device, tol, probes: bool = True) -> None:
    L = shape[mixer.axis]
    if cg.symbolic:
        size = mixer.region.u.meta["val"].shape[mixer.axis]
        for L2, full in recheck_lengths(L, size, mixer.fn.nodes, mixer.filter_length):
            _check_at_length(mixer, shape, L2, dtype, device, tol, probes and full)
        return
    if not probes:
        return
    for node in mixer.fn.constant:
        if _length_factory_changes(node, L):
            raise VerifyError(f"filter depends on total length ({node.target} over {L} points)")


def _check_at_length(mixer: Mixer, shape, L2: int, dtype, device, tol, full: bool) -> None:
    """The region at length L2: causal; with `full`, its filter a prefix-extension of (or a prefix
    of) the one at the capture length, and a random probe equal to the causal convolution."""
    axis, bcast, chan, fn = mixer.axis, mixer.bcast_dims, mixer.chan_dims, mixer.fn
    L = shape[axis]
    shp = tuple(L2 if d == axis else s for d, s in enumerate(shape))
    try:
        h2_full, c2 = impulse_response(fn, shp, axis, dtype, device)
        mixer.offset_free = mixer.offset_free and not bool(c2.any())
        if tuple(h2_full.shape) != shp:
            return  # nor would the model: its output there is not one value per position
        if _leaks(fn, shp, axis, dtype, device, max(_norm(h2_full), 1e-30), tol, c2):
            raise VerifyError(f"non-causal at L={L2}: reads future positions")
    except VerifyError:
        raise
    except Exception:  # noqa: BLE001 - the model may not run past its own max_len
        return
    # The bias is folded from the capture length and serves every length: an offset that changes
    # with L (b / L) would be wrong at all the others.
    if _offset_mismatch(c2, mixer.bias, axis, bcast, chan, max(_norm(h2_full), 1e-30), tol):
        raise VerifyError(f"its offset f(0) at L={L2} differs from the bias found at L={L} "
                          "(an offset that depends on the length)")
    if not full:
        return
    h2 = to_canonical(h2_full, axis, bcast, chan)[0]
    m = min(L, L2)
    if _rel(h2[:, :m], mixer.h[:, :m]) > tol:
        raise VerifyError("filter depends on total length (not prefix-consistent across lengths)")
    _, err = _probe_error(fn, _random(shp, dtype, device, 4321 + L2), c2, h2, axis, bcast, chan, tol)
    if err > tol:
        raise VerifyError(f"does not match a causal convolution at L={L2} (relative error {err:.2e})")


_FACTORIES = (aten.linspace.default, aten.logspace.default)


def _length_factory_changes(node: fx.Node, L: int) -> bool:
    """A factory op sized by L whose values change when L does (linspace(0, 1, L))."""
    if node.target not in _FACTORIES:
        return False
    args = list(node.args)
    if len(args) < 3 or args[2] != L or L < 2:
        return False
    a = node.target(*args, **node.kwargs)
    args[2] = L + 1
    b = node.target(*args, **node.kwargs)
    return not torch.allclose(a, b[:L])


def verify(cg: CapturedGraph, proposals: list[list[Region]], settings: Settings):
    """Accepted mixers and rejections; for each seed the longest region that verifies wins."""
    mixers: list[Mixer] = []
    rejections: list[Rejection] = []
    for alternatives in proposals:
        reason = None
        for region in reversed(alternatives):
            try:
                mixers.append(verify_region(cg, region, settings))
                reason = None
                break
            except VerifyError as e:
                reason = reason or str(e)
        if reason is not None:
            rejections.append(Rejection(alternatives[0].seed, reason))
    return mixers, rejections
