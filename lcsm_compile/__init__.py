"""lcsm_compile: a torch.compile backend for long convolution sequence models.

    fast = torch.compile(model, backend="lcsm")
    report = lcsm_compile.explain(model, example_input)
    dec = lcsm_compile.decoder(model, example_input, max_len=65536)
    ids = lcsm_compile.generate(model, input_ids, max_new_tokens=256)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# eager: importing the package registers torch.ops.lcsm.causal_conv, which the passes emit and
# exported programs name
from .ops import causal_conv, causal_conv_reference

__version__ = "0.1.0"

# the rest load on first use: they import aot_autograd, torch.onnx, ... (seconds), which
# `lcsm-compile --help` and its usage errors do not need (the console script imports this package)
_LAZY = {
    "ExplainReport": ".explain_report",
    "explain": ".explain_report",
    "counters": ".passes.pipeline",
    "Settings": ".settings",
    "decoder": ".runtime.decoder",
    "generate": ".runtime.generate",
    "export_onnx": ".export.onnx_export",
}
# subpackages the eager imports used to bind here, which code reaches as `lcsm_compile.backend` etc.
_SUBMODULES = ("backend", "export", "kernels", "passes", "runtime", "settings")

if TYPE_CHECKING:
    from .explain_report import ExplainReport, explain
    from .export.onnx_export import export_onnx
    from .passes.pipeline import counters
    from .runtime.decoder import decoder
    from .runtime.generate import generate
    from .settings import Settings


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it here
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


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


def _register_backend_without_install() -> None:
    """`backend="lcsm"` comes from the package's entry point; run from a source tree (not
    installed), the name is registered here instead, so it works the same way."""
    from importlib.metadata import entry_points  # noqa: PLC0415

    if entry_points(group="torch_dynamo_backends", name="lcsm"):
        return  # installed: torch loads the entry point itself (registering too would clash)
    from torch._dynamo import register_backend  # noqa: PLC0415

    def lcsm(gm, example_inputs, **kwargs):
        from .backend import lcsm_backend  # noqa: PLC0415 - the passes load on first compile

        return lcsm_backend(gm, example_inputs, **kwargs)

    register_backend(lcsm, name="lcsm")


_register_backend_without_install()
