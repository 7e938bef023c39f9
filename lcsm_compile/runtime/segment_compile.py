"""How the step program's segments are compiled for one position: inductor plus decode options.

At one position a segment is matrix-vector products and pointwise work, bound by latency and
weight reads. On CUDA its products with at most `gemv_rows` rows become fused reductions
(passes/decode_gemv.py) whose block sizes coordinate-descent tuning picks, and on sm90+ its
kernels use programmatic dependent launch (`pdl`: a kernel's prologue overlaps its predecessor's
tail; a Hyena-153M token is ~170 such kernels). On CPU neither applies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..passes.decode_gemv import COMPILE_OPTIONS, decompose_gemv
from ..passes.pipeline import counters
from ..settings import Settings

__all__ = ["SegmentCompiler"]


@dataclass(frozen=True)
class SegmentCompiler:
    gemv_rows: int = 0                 # products with at most this many rows -> reductions (0: none)
    gemv_kernel: str = "reduction"     # or "triton": lcsm::gemv calls (kernels/gemv.py)
    gemv_splits: int = 1               # reductions split along K into this many partial sums
    pdl: bool = False                  # programmatic dependent launch for the inductor kernels

    @classmethod
    def for_device(cls, device: torch.device, settings: Settings | None = None) -> SegmentCompiler:
        """The settings' decode options, kept only where `device` can use them."""
        s = settings or Settings()
        device = torch.device(device)
        if device.type != "cuda":
            return cls(gemv_kernel=s.decode_gemv_kernel, gemv_splits=s.decode_gemv_splits)
        pdl = s.decode_pdl and torch.cuda.get_device_capability(device) >= (9, 0)
        return cls(s.decode_gemv_rows, s.decode_gemv_kernel, s.decode_gemv_splits, pdl)

    def inductor_options(self, reductions: int) -> dict:
        options = dict(COMPILE_OPTIONS) if reductions and self.gemv_kernel == "reduction" else {}
        if self.pdl:
            options["triton.enable_pdl"] = True
        return options

    def __call__(self, gm: fx.GraphModule, examples: list) -> Callable:
        from torch._inductor import config as inductor_config  # noqa: PLC0415
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

        n = decompose_gemv(gm, self.gemv_rows, self.gemv_kernel, self.gemv_splits)
        counters["decode"]["gemv_reductions" if self.gemv_kernel == "reduction" else "gemv_kernels"] += n
        with inductor_config.patch(self.inductor_options(n)):
            return compile_fx(gm, examples)
