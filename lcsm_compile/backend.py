"""The `torch.compile` backend: `torch.compile(model, backend="lcsm", options={...})`.

Thin on purpose: validate the options, lower the dynamo graph to ATen (capture), run the pass
pipeline, hand the rewritten graph to the inner compiler. Registered through the
`torch_dynamo_backends` entry point, so `import lcsm_compile` is not needed first.
A graph the pipeline cannot handle runs as the inner compiler alone would run it, with a
warning naming why (once); `options={"strict": True}` raises instead. Dynamo's own control-flow
exceptions (restart analysis, skip frame), raised from inside the ATen capture, pass through
untouched: dynamo catches them to retrace, and a fallback would hide them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from functorch.compile import make_boxed_func
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .passes.capture import describe_inputs
from .passes.pipeline import CompileReport, counters, run_pipeline
from .settings import Settings

__all__ = ["lcsm_backend", "inner_compile", "autocast_enabled", "report_listeners", "LcsmCompileError"]

# explain() and the decoder subscribe here to see each graph's report.
report_listeners: list[Callable[[CompileReport, Any], None]] = []
_warned: set[str] = set()


class LcsmCompileError(RuntimeError):
    """Raised in strict mode when part of a model cannot be rewritten."""


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], settings: Settings,
                  mode: str | None = None, aten: bool = False) -> Callable:
    """Compile a dynamo graph with the configured inner backend (the unchanged fallback).
    torch.compile's `mode` applies to inductor as it would with backend="inductor"
    ("reduce-overhead": CUDA graphs, "max-autotune": tuned GEMMs and CUDA graphs, ...).
    `aten`: gm is the captured ATen graph, which holds autocast's casts already; run eagerly, it
    must not be autocast a second time (aot_autograd's own runtime does the same)."""
    if settings.inner_backend == "inductor":
        from torch._inductor import list_mode_options  # noqa: PLC0415
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

        patches = list_mode_options(mode) if mode not in (None, "default") else {}
        if aten:
            from .kernels.dispatch import prime_filter_caches  # noqa: PLC0415
            from .passes.inline_short import inline_short_convs  # noqa: PLC0415

            gm, n = inline_short_convs(gm, settings.inline_short_taps)
            counters["lowering"]["inlined_short_convs"] += n
            counters["lowering"]["primed_convs"] += prime_filter_caches(gm)
        return compile_fx(gm, list(example_inputs), config_patches=patches or None)
    if settings.inner_backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager  # noqa: PLC0415

        return aot_eager(gm, list(example_inputs))
    if aten and autocast_enabled():
        def run(*args):
            with torch._C._DisableAutocast():
                return gm.forward(*args)

        return run
    return gm.forward


def autocast_enabled() -> bool:
    """Whether the caller runs under torch.autocast (CPU or CUDA)."""
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _dynamo_control_flow(e: BaseException) -> bool:
    """Whether `e` is one of dynamo's internal control-flow exceptions, which must reach dynamo.

    E.g. aot_autograd's scalar tensorification raises TensorifyScalarRestartAnalysis under
    `dynamic=True` so that dynamo restarts analysis with those scalars specialised."""
    import torch._dynamo.exc as exc  # noqa: PLC0415 - only on the failure path

    kinds = tuple(k for k in (getattr(exc, n, None) for n in ("RestartAnalysis", "SkipFrame")) if isinstance(k, type))
    if kinds and isinstance(e, kinds):
        return True
    # A dynamo exception that tells convert_frame how to run the frame is control flow too.
    base = getattr(exc, "TorchDynamoException", None)
    return isinstance(base, type) and isinstance(e, base) and getattr(e, "frame_exec_strategy", None) is not None


def _problems(report: CompileReport) -> str:
    return "; ".join(f"{u.node}: {u.reason}" for u in report.unsupported)


def lcsm_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable:
    settings = Settings.from_options(options)
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"lcsm: unknown mode {mode!r}")
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        message = (
            "lcsm: gradients are enabled, so the graph runs unchanged (lcsm folds weights into filters and "
            "rewrites inference graphs only); call the model under torch.no_grad() or torch.inference_mode()"
        )
        if settings.strict:
            raise LcsmCompileError(message)
        _warn_once(message)
        return inner_compile(gm, example_inputs, settings, mode)

    try:
        aten_gm = capture_aten(gm, example_inputs)  # under the caller's autocast: it bakes in the casts
        # aot_autograd calls compilers inside its fake mode; the verifier's probes are real tensors.
        # The passes evaluate that graph as written, and their reference convolutions in full
        # precision: autocast off (left on, it would cast the graph's ops and our conv1d again).
        with unset_fake_temporarily(), torch._C._DisableAutocast():
            cg = describe_inputs(gm, example_inputs, aten_gm, settings.seq_dim)
            report = run_pipeline(cg, settings)
    except Exception as e:
        if _dynamo_control_flow(e):
            raise
        if settings.strict:
            raise LcsmCompileError(f"lcsm: cannot compile this graph: {e}") from e
        _warn_once(f"lcsm: graph left unchanged: {type(e).__name__}: {e}")
        return inner_compile(gm, example_inputs, settings, mode)
    for listener in list(report_listeners):
        listener(report, cg)
    if report.unsupported:
        message = f"lcsm: left unchanged: {_problems(report)}"
        if settings.strict:
            raise LcsmCompileError(message)
        _warn_once(message)
    if not report.rewrites:
        return inner_compile(gm, example_inputs, settings, mode)
    if settings.decode:  # prefix-extension serving (runtime/serving.py); the plain graph as fallback
        from .runtime.serving import serve  # noqa: PLC0415 - the decode runtime loads on demand

        return serve(cg, report, settings, lambda: inner_compile(cg.gm, example_inputs, settings, mode, aten=True))
    # The rewritten ATen graph takes the same flat inputs as the dynamo graph; the inner compiler
    # treats it like any dynamo graph (inductor lifts the folded filters as constants).
    return inner_compile(cg.gm, example_inputs, settings, mode, aten=True)


def capture_aten(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """The dynamo graph as a functional ATen inference graph with the same flat inputs/outputs."""
    captured: list[fx.GraphModule] = []

    def keep(aten_gm: fx.GraphModule, _inputs):
        captured.append(aten_gm)
        return make_boxed_func(aten_gm.forward)

    with torch.no_grad():
        aot_module_simplified(gm, list(example_inputs), fw_compiler=keep, inference_compiler=keep)
    (aten_gm,) = captured
    n_out = len(next(iter(gm.graph.find_nodes(op="output"))).args[0])
    n_aten = len(next(iter(aten_gm.graph.find_nodes(op="output"))).args[0])
    if n_out != n_aten:
        # Functionalized input mutations come back as extra outputs that aot's runtime applies.
        raise RuntimeError("the graph mutates its inputs (extra functional outputs); not rewritten")
    return aten_gm
