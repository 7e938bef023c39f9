"""lcsm_compile: a torch.compile backend for long convolution sequence models.

    fast = torch.compile(model, backend="lcsm")
    report = lcsm_compile.explain(model, example_input)
    dec = lcsm_compile.decoder(model, example_input, max_len=65536)
    ids = lcsm_compile.generate(model, input_ids, max_new_tokens=256)
"""
from __future__ import annotations

from .ops import causal_conv, causal_conv_reference
from .explain import ExplainReport, explain
from .passes.pipeline import counters
from .settings import Settings
from .runtime.decoder import decoder
from .runtime.generate import generate

__version__ = "0.1.0"


from .export.onnx_export import export_onnx  # noqa: E402 - the ONNX artifact (export/)


__all__ = [
    "ExplainReport",
    "Settings",
    "counters",
    "causal_conv",
    "causal_conv_reference",
    "decoder",
    "explain",
    "export_onnx",
    "generate",
]
