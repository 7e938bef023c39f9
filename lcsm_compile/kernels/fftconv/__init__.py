"""Causal FFT convolution in Triton on tensor cores (issue 7).

    from lcsm_compile.kernels.fftconv import fft_conv, prepare_filter
    spec = prepare_filter(h, L)                 # once: the folded filter's spectrum
    y = fft_conv(u, spec, skip=D, pre=x1, post=x2)   # y = x2 * (conv(x1*u, h) + D*(x1*u))
    y = fft_conv(u, h)                          # or hand h: its spectrum is cached (spectrum.py)

Files: plan.py (the Monarch decomposition and its sizes), tables.py (DFT matrices, twiddles),
spectrum.py (filter spectra and their cache), kernel.py (Triton), conv.py (launch),
reference.py (plain torch). Importing this package imports triton; the dispatcher
(kernels/dispatch.py) imports it only on CUDA.
"""
from .conv import NotCovered, fft_conv
from .plan import MAX_N, FFTPlan, conv_size, make_plan
from .reference import gated_conv_reference, monarch_conv_reference, torch_fft_conv
from .spectrum import FilterSpectrum, cached_rfft, cached_spectrum, clear_cache, prepare_filter

__all__ = [
    "MAX_N", "FFTPlan", "FilterSpectrum", "NotCovered", "cached_rfft", "cached_spectrum", "clear_cache",
    "conv_size", "fft_conv", "gated_conv_reference", "make_plan", "monarch_conv_reference",
    "prepare_filter", "torch_fft_conv",
]
