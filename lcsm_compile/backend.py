"""The `torch.compile` backend: `torch.compile(model, backend="lcsm", options={...})`.

Thin on purpose: validate the options, run the pass pipeline, hand what is left to the inner
compiler. Registered through the `torch_dynamo_backends` entry point, so importing
`lcsm_compile` is not needed before `torch.compile(..., backend="lcsm")`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from .settings import Settings

__all__ = ["lcsm_backend", "inner_compile"]


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings) -> Callable:
    """Compile what we do not own with the configured inner backend."""
    if settings.inner_backend == "inductor":
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

        return compile_fx(gm, list(example_inputs))
    if settings.inner_backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager  # noqa: PLC0415

        return aot_eager(gm, list(example_inputs))
    return gm.forward


def lcsm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable:
    settings = Settings.from_options(options)
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"lcsm: unknown mode {mode!r}")
    return inner_compile(gm, example_inputs, settings)
