"""Filter spectra, computed once per (filter, FFT size) and reused by every call.

After compilation a filter is a constant buffer (folded at max_len), so its spectrum is a
constant too. Two ways to get one:

* explicit: `prepare_filter(h, L)` returns a `FilterSpectrum` the caller owns (the backend at
  compile time, a decode tile, a benchmark) and passes to `fft_conv(u, spectrum)`;
* implicit: `cached_spectrum(h, L, plan)` / `cached_rfft(h, n)`, which `fft_conv(u, h)` and the
  dispatcher use, since `lcsm::causal_conv(u, h)` only ever sees the tensor h.

Why both: the custom op's signature is (u, h) - tensors only, so the graph cannot carry a
spectrum object - and a prefill length is only known at run time while the spectrum depends on
N(L). So the op path caches, keyed on (h.data_ptr(), h._version, shape, stride, dtype, device,
plan) and guarded by a weak reference to the tensor that owns the memory (h._base for a view):
an entry is used only while that very tensor is alive and its version counter has not moved,
so freed-and-reused memory or an in-place update can never serve a stale spectrum, and an entry
disappears with its filter. The backend need do nothing more than keep the folded filter
alive; it runs each static-shape conv once at compile time (dispatch.prime_filter_caches), so the
spectra exist before the first call; a dynamic-length graph meets new FFT sizes at run time, and
those spectra are built off the CUDA-graph pools (build_outside_graph_pools). Inference
tensors have no version counter: they are guarded by identity alone (an in-place update under
inference_mode would not be seen).

Memory: a Triton-layout spectrum is D * N complex fp32 (N >= 2L), 4x the fp32 filter; the
rfft spectrum for the torch.fft path half of that.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph_pools import build_outside_graph_pools
from .plan import FFTPlan, conv_size, make_plan

__all__ = ["FilterSpectrum", "prepare_filter", "cached_spectrum", "cached_rfft", "spectrum_planes",
           "clear_cache"]


def spectrum_planes(h: Tensor, L: int, plan: FFTPlan) -> Tensor:
    """(D, 2, R, M1, M2) fp32: DFT_N(h[:, :L]) at bin k_r + R * (k1 + M1 * k2), real and imag."""
    k = h[:, :L].to(torch.float64)
    H = torch.fft.fft(k, n=plan.n)  # complex128; full spectrum, the kernel's signal is complex
    kr = torch.arange(plan.r, device=h.device)[:, None, None]
    k1 = torch.arange(plan.m1, device=h.device)[None, :, None]
    k2 = torch.arange(plan.m2, device=h.device)[None, None, :]
    idx = (kr + plan.r * (k1 + plan.m1 * k2)).reshape(-1)
    Hp = H[:, idx].reshape(h.shape[0], plan.r, plan.m1, plan.m2)
    return torch.stack([Hp.real, Hp.imag], dim=1).to(torch.float32).contiguous()


@dataclass(frozen=True)
class FilterSpectrum:
    """A filter's spectrum in a plan's layout: exact for every length L that `covers` accepts."""

    plan: FFTPlan
    planes: Tensor   # (D, 2, R, M1, M2) fp32
    taps: int        # taps it holds: h[:, :taps]
    filter_len: int  # K of the filter it came from

    @property
    def channels(self) -> int:
        return self.planes.shape[0]

    def covers(self, L: int) -> bool:
        """Every tap that reaches [0, L) is in, and the linear conv (L + taps - 1) does not wrap."""
        return min(self.filter_len, L) <= self.taps and L + self.taps - 1 <= self.plan.n


def prepare_filter(h: Tensor, L: int, plan: FFTPlan | None = None) -> FilterSpectrum:
    """Spectrum of h (D, K) for convolutions of length up to L, in the default plan for L."""
    if h.dim() != 2:
        raise ValueError(f"prepare_filter: want h (D, K), got {tuple(h.shape)}")
    taps = min(h.shape[1], L)
    plan = plan or make_plan(conv_size(L, h.shape[1]))
    if plan is None:
        raise ValueError(f"prepare_filter: no Triton plan for L={L} (FFT size {conv_size(L, h.shape[1])})")
    if L + taps - 1 > plan.n:
        raise ValueError(f"prepare_filter: plan n={plan.n} too small for L={L}, {taps} taps")
    return FilterSpectrum(plan, spectrum_planes(h, taps, plan), taps, h.shape[1])


@dataclass
class _Entry:
    owner: weakref.ref
    version: int | None
    value: object


class _SpectrumCache:
    """LRU of spectra keyed on the filter's memory, guarded by identity and version."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, h: Tensor, tag: tuple, build: Callable[[], object]):
        owner = h._base if h._base is not None else h
        try:
            version = h._version
        except RuntimeError:  # inference tensor: no version counter
            version = None
        key = (h.data_ptr(), tuple(h.shape), tuple(h.stride()), h.dtype, h.device, tag)
        entry = self.entries.get(key)
        if entry is not None and entry.owner() is owner and entry.version == version:
            self.entries.move_to_end(key)
            self.hits += 1
            return entry.value
        self.misses += 1
        value = build_outside_graph_pools(h.device, build)

        def drop(_ref, key=key):
            e = self.entries.get(key)
            if e is not None and e.owner is _ref:
                del self.entries[key]

        self.entries[key] = _Entry(weakref.ref(owner, drop), version, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value


_CACHE = _SpectrumCache()


def cached_spectrum(h: Tensor, L: int, plan: FFTPlan) -> FilterSpectrum:
    """The Triton-layout spectrum of h for (L's taps, plan), computed on first use."""
    taps = min(h.shape[1], L)
    # Spectra depend on the taps kept (min(K, L)) and on the plan's layout, not on L itself.
    return _CACHE.get(h, ("planes", plan.key(), taps),
                      lambda: FilterSpectrum(plan, spectrum_planes(h, taps, plan), taps, h.shape[1]))


def cached_rfft(h: Tensor, taps: int, n: int) -> Tensor:
    """rfft(h[:, :taps], n) in complex64 for the torch.fft path, computed on first use."""
    return _CACHE.get(h, ("rfft", n, taps),
                      lambda: torch.fft.rfft(h[:, :taps].to(torch.float32), n=n))


def clear_cache() -> None:
    _CACHE.entries.clear()
