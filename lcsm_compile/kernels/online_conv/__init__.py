"""Online (decode-time) long convolution: the Flash Inference tiling as an engine for M mixers.

`OnlineConv` (engine.py) is the product; reference.py holds the lazy, eager and plain tiled
references it is tested against; schedule.py the tile schedule; triton_step.py / triton_tiles.py
the kernels; fft_tiles.py the spectra and FFT tiles; graphs.py CUDA graph capture.
Triton is imported only when a Triton path runs.
"""
from .engine import OnlineConv
from .reference import EagerOnlineConv, LazyOnlineConv, TiledOnlineConv

__all__ = ["EagerOnlineConv", "LazyOnlineConv", "OnlineConv", "TiledOnlineConv"]
