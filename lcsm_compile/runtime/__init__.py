"""Decode state, step programs, CUDA graphs and generate().

    decoder.py        Decoder: capture, plan, check against eager; prefill / step / reset
    step_program.py   the plan's segments traced and compiled, with the decode state
    cuda_graphs.py    one CUDA graph per tile level holding a whole token
    generate.py       greedy / sampled generation on a Decoder
    serving.py        prefix-extension serving for torch.compile(..., options={"decode": True})
"""
from ..passes.incrementalize import IncrementalizeError
from .decoder import Decoder, decoder

__all__ = ["Decoder", "IncrementalizeError", "decoder"]
