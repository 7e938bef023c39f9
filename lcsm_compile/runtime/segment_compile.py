"""How the step program's segments are compiled for one position: traced graphs run as they are,
or inductor with the decode options.

At one position a segment is matrix-vector products and pointwise work, bound by latency and
weight reads. On CUDA its products with at most `gemv_rows` rows become fused reductions
(passes/decode_gemv.py) whose block sizes coordinate-descent tuning picks, and on sm90+ its
kernels use programmatic dependent launch (`pdl`: a kernel's prologue overlaps its predecessor's
tail; a Hyena-153M token is ~170 such kernels). Products of more rows, up to `gemv_triton_rows`
(a batch of 2-8), become Triton GEMV calls, launched with PDL too. On CPU none of this applies.

`persistent_k`: inductor keeps a row reduction persistent (one block holds all of K, every load
issued at once) only up to K = 1024 and loops over K beyond; at one position a looped product is
latency-bound (H200 step profile: fc2, K = 1728, looped, 0.95 TB/s where in_proj, K = 864,
persistent, reads 3.1). A larger limit goes through inductor's choices hook (InductorChoices);
the default 2048 took fc2 from 9.8 to 4.7 µs and a token from 579 to 513 µs (same run, H200).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..passes.decode_gemv import COMPILE_OPTIONS, decompose_gemv
from ..passes.decode_norm import fuse_norm_into_gemv
from ..passes.pipeline import counters
from ..settings import Settings

__all__ = ["SegmentCompiler"]


@dataclass(frozen=True)
class SegmentCompiler:
    inductor: bool = False             # False: the traced graphs run eagerly (inner_backend eager/aot_eager)
    gemv_rows: int = 0                 # products with at most this many rows -> reductions (0: none)
    gemv_kernel: str = "reduction"     # or "triton": lcsm::gemv calls (kernels/gemv.py)
    gemv_triton_rows: int = 0          # products with gemv_rows < rows <= this -> lcsm::gemv calls
    gemv_splits: int = 1               # reductions split along K into this many partial sums
    pdl: bool = False                  # programmatic dependent launch for the inductor kernels
    persistent_k: int = 0              # row reductions up to this K persistent (0: inductor's 1024)
    fuse_norm: bool = False            # layer norms recomputed inside the products they feed

    @classmethod
    def for_device(cls, device: torch.device, settings: Settings | None = None) -> SegmentCompiler:
        """The settings' inner backend and decode options, kept only where `device` can use them."""
        s = settings or Settings()
        device, inductor = torch.device(device), s.inner_backend == "inductor"
        if device.type != "cuda":
            return cls(inductor, gemv_kernel=s.decode_gemv_kernel, gemv_splits=s.decode_gemv_splits)
        from ..kernels.gemv import pdl_supported  # noqa: PLC0415 - loads triton, CUDA only

        pdl = s.decode_pdl and pdl_supported(device)
        return cls(inductor, s.decode_gemv_rows, s.decode_gemv_kernel, s.decode_gemv_triton_rows,
                   s.decode_gemv_splits, pdl, s.decode_persistent_k, s.decode_fuse_norm)

    def inductor_options(self, reductions: int) -> dict:
        options = dict(COMPILE_OPTIONS) if reductions and self.gemv_kernel == "reduction" else {}
        if self.pdl:
            options["triton.enable_pdl"] = True
        if self.persistent_k:
            # inductor's FX-graph cache key does not see the choices hook (__call__), but it does
            # see a custom pass's uuid: a no-op pass naming the choice keys the cache by it. Where
            # a pass is set there already, the cache is bypassed instead.
            from torch._inductor import config  # noqa: PLC0415

            if config.post_grad_custom_post_pass is None:
                options["post_grad_custom_post_pass"] = _choice_key(f"lcsm.persistent_k={self.persistent_k}")
            else:
                options["fx_graph_cache"] = False
        return options

    def __call__(self, gm: fx.GraphModule, examples: list) -> Callable:
        if not self.inductor:
            return gm
        from torch._inductor import config as inductor_config  # noqa: PLC0415
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

        fused = fuse_norm_into_gemv(gm, self.gemv_rows) if self.fuse_norm and self.gemv_kernel == "reduction" else 0
        counters["decode"]["norms_in_gemv"] += fused
        n = decompose_gemv(gm, self.gemv_rows, self.gemv_kernel, self.gemv_splits, pdl=self.pdl) + fused
        counters["decode"]["gemv_reductions" if self.gemv_kernel == "reduction" else "gemv_kernels"] += n
        wide = decompose_gemv(gm, self.gemv_triton_rows, "triton", min_rows=self.gemv_rows + 1, pdl=self.pdl)
        counters["decode"]["gemv_kernels"] += wide
        with contextlib.ExitStack() as stack:
            stack.enter_context(inductor_config.patch(self.inductor_options(n)))
            if self.persistent_k:
                from torch._inductor.virtualized import V  # noqa: PLC0415

                stack.enter_context(V.set_choices_handler(persistent_choices(self.persistent_k)))
            try:
                with _static_shape_context():
                    return compile_fx(gm, examples)
            except Exception:  # noqa: BLE001 - the shape env only buys caching: compile as before it
                counters["decode"]["segment_compiles_without_cache"] += 1
                return compile_fx(gm, examples)


def _static_shape_context():
    """A tracing context with a shape environment (all shapes static) for compile_fx: without
    one, inductor's FX-graph cache bypasses the compile ('No shape env'), and every decoder build
    compiled every segment again (CPU, hyena_tiny: 24 s, and as long the second time). Weights
    are graph constants, which the cache key describes by shape and dtype and a hit binds from
    the graph at hand, so models of one architecture share entries (tested with other weights)."""
    from torch._guards import TracingContext, tracing  # noqa: PLC0415
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: PLC0415

    return tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv())))


def _choice_key(name: str):
    """A post-grad pass that does nothing and whose uuid is `name`: a choice made outside
    inductor's config, made part of its FX-graph cache key."""
    from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: PLC0415

    class ChoiceKey(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return name

    return ChoiceKey()


def persistent_choices(max_k: int):
    """Inductor's choices, with inner (row) reductions of a static K <= max_k kept persistent."""
    from torch._inductor import config  # noqa: PLC0415
    from torch._inductor.choices import InductorChoices  # noqa: PLC0415
    from torch._inductor.runtime.hints import ReductionHint  # noqa: PLC0415

    class PersistentUpTo(InductorChoices):
        def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
            k = features.reduction_numel
            static = isinstance(k, int) or bool(getattr(k, "is_number", False))
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER and static and int(k) <= max_k):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return PersistentUpTo()
