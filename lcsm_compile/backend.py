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
from operator import itemgetter
from typing import Any

import torch
from functorch.compile import make_boxed_func
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .passes.capture import CapturedGraph, describe_inputs
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
    # Compiled on first need, in this compile's tracing context: its fake mode and shape env
    # say which sizes are dynamic (the example inputs alone would specialize them).
    context = torch._guards.TracingContext.try_get()

    def unchanged() -> Callable:
        with torch._guards.tracing(context):
            return inner_compile(gm, example_inputs, settings, mode)

    if settings.decode:  # prefix-extension serving (runtime/serving.py); the plain graph as fallback
        from .runtime.serving import serve  # noqa: PLC0415 - the decode runtime loads on demand

        served = serve(cg, report, settings, lambda: inner_compile(cg.gm, example_inputs, settings, mode, aten=True))
        # The step program keeps the weights it was built from (not only the folded filters).
        return FoldedWeightsGuard(served, unchanged, cg, _static_indices(cg), _scalar_indices(gm), settings.strict)
    # The rewritten ATen graph takes the same flat inputs as the dynamo graph; the inner compiler
    # treats it like any dynamo graph (inductor lifts the folded filters as constants).
    rewritten = inner_compile(cg.gm, example_inputs, settings, mode, aten=True)
    return FoldedWeightsGuard(rewritten, unchanged, cg, _folded_indices(cg, report), _scalar_indices(gm),
                              settings.strict)


def _static_indices(cg: CapturedGraph) -> list[int]:
    return [i for i, inp in enumerate(cg.inputs) if inp.role == "static" and isinstance(inp.value, torch.Tensor)]


def _folded_indices(cg: CapturedGraph, report: CompileReport) -> list[int]:
    """The static inputs some folded filter was computed from (the leaves of accepted regions)."""
    leaves = set()
    for mx in report.accepted:
        leaves |= mx.fn.leaves
    return [i for i in _static_indices(cg) if cg.inputs[i].node in leaves]


def _scalar_indices(gm: fx.GraphModule) -> set[int]:
    """Inputs that are Python numbers passed as fresh 0-d tensors each call (an unspecialized float
    attribute under dynamic shapes): a new tensor every call, so their value is what is compared."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {i for i, n in enumerate(placeholders)
            if getattr(n.meta.get("grapharg"), "pass_arg_as_tensor", False)}


def _weight_key(x: torch.Tensor) -> tuple[int, int]:
    # Inference tensors keep no version counter (they are only written under inference_mode).
    return x.data_ptr(), (-1 if x.is_inference() else x._version)


class FoldedWeightsGuard:
    """The rewritten graph, unless a weight its folded filters came from has changed since.

    Folded filters are constants computed from the weights at compile time. Dynamo passes the
    weights as graph inputs and does not recompile when they change in place (`mul_`,
    `load_state_dict`, a mutated global) or, with inlined nn.Modules, when a parameter is
    reassigned. Each call compares the weights' (data_ptr, _version) with those at compile time
    (~0.4 us a weight); on a change it runs the unrewritten graph from then on (compiled on first
    need), so a stale filter is never used, and warns once that torch._dynamo.reset() recompiles
    with the new weights. With `strict` it raises instead, on every call while the weights differ
    (the rewrite is kept: the compiled weight tensors, put back unchanged, are served again).
    """

    def __init__(self, rewritten: Callable, compile_unchanged: Callable[[], Callable],
                 cg: CapturedGraph, indices: list[int], scalars: set[int] = frozenset(), strict: bool = False):
        self.rewritten, self.compile_unchanged, self.strict = rewritten, compile_unchanged, strict
        self.scalars = [(i, cg.inputs[i].source, cg.inputs[i].value.item()) for i in indices if i in scalars]
        indices = [i for i in indices if i not in scalars]
        self.indices = indices
        self.sources = [cg.inputs[i].source for i in indices]
        self.keys = [_weight_key(cg.inputs[i].value) for i in indices]
        self.unchanged: Callable | None = None
        self._pick = (lambda args: tuple(args[i] for i in indices)) if len(indices) < 2 else itemgetter(*indices)
        self._versioned = not any(cg.inputs[i].value.is_inference() for i in indices)

    def _same_weights(self, args) -> bool:
        if self.scalars and any(args[i].item() != v for i, _, v in self.scalars):
            return False
        if self._versioned:
            try:
                return [(w.data_ptr(), w._version) for w in self._pick(args)] == self.keys
            except RuntimeError:  # an inference tensor now, where there was none: not the same
                return False
        return [_weight_key(w) for w in self._pick(args)] == self.keys

    def __call__(self, *args):
        if self.unchanged is None:
            if self._same_weights(args):
                return self.rewritten(*args)
            self._go_stale(args)
        return self.unchanged(*args)

    def _go_stale(self, args) -> None:
        changed = [s for i, s, v in self.scalars if args[i].item() != v]
        changed += [s for i, s, k in zip(self.indices, self.sources, self.keys)
                    if not isinstance(args[i], torch.Tensor) or _weight_key(args[i]) != k]
        what = (f"lcsm: {(changed or self.sources)[0]} changed after compiling (in place or reassigned) and a "
                "folded filter was computed from it")
        if self.strict:
            raise LcsmCompileError(f"{what}; call torch._dynamo.reset() to recompile with the new weights "
                                   "(strict: no fallback to the unrewritten graph)")
        counters["graphs"]["stale_filter_fallbacks"] += 1
        warnings.warn(f"{what}: this graph now runs unrewritten; call torch._dynamo.reset() to recompile "
                      "with the new weights", stacklevel=3)
        self.rewritten = None  # the folded filters are stale: let them go
        self.unchanged = self.compile_unchanged()


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
