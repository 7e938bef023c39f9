"""LCSMs written from their papers: test clients, benchmarks and the demo.

The models are plain nn.Modules written the way their authors write them (rfft/irfft,
Conv1d, ...), never with lcsm_compile ops: the compiler must find their convolutions.
"""
from .h3 import H3, H3LM, h3_tiny
from .hyena import HyenaLM, HyenaOperator, hyena_153m, hyena_tiny
from .long_conv import LongConv, LongConvModel, long_conv_tiny
from .registry import ZOO, ZooEntry, negative, positive
from .sgconv import SGConv, SGConvModel, sgconv_tiny

__all__ = [
    "H3", "H3LM", "HyenaLM", "HyenaOperator", "LongConv", "LongConvModel", "SGConv",
    "SGConvModel", "ZOO", "ZooEntry", "h3_tiny", "hyena_153m", "hyena_tiny", "long_conv_tiny",
    "negative", "positive", "sgconv_tiny",
]
