"""Which implementation runs `lcsm::causal_conv` on CUDA, chosen per shape and dtype.

    fp64                      -> torch.fft in fp64 (the Triton kernel has no fp64 path)
    K <= 32 taps              -> direct depthwise conv1d (cuDNN), as on CPU
    otherwise                 -> the measured dispatch table: "triton" (fftconv.fft_conv with the
                                 table's best plan) or "torch" (torch.fft, filter rfft cached)
    no table entry / no plan  -> torch.fft

The table (kernels/fftconv/dispatch_table.json) is written by benchmarks/prefill.py on the GPU:
one entry per (dtype, FFT size N, rows = B * D) measured, with the faster implementation and
both times. A call looks up its dtype (fp16 uses bf16's entries if it has none), the nearest
measured N (within one octave; the plan is rebuilt for the call's own N when they differ) and
the nearest rows (log scale). Both paths cache the filter's spectrum (fftconv/spectrum.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Choice", "DispatchTable", "causal_conv_cuda", "choose", "load_table", "prime_filter_caches", "TABLE_PATH"]

TABLE_PATH = Path(__file__).parent / "fftconv" / "dispatch_table.json"
SHORT_FILTER = 32


@dataclass(frozen=True)
class Choice:
    impl: str                 # "triton" | "torch" | "direct"
    plan: object = None       # fftconv.FFTPlan for "triton"
    reason: str = ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DispatchTable:
    def __init__(self, entries: list[dict], meta: dict | None = None):
        self.entries = entries
        self.meta = meta or {}

    @classmethod
    def load(cls, path: Path | str = TABLE_PATH) -> DispatchTable:
        path = Path(path)
        if not path.exists():
            return cls([], {"missing": str(path)})
        data = json.loads(path.read_text())
        return cls(data.get("entries", []), {k: v for k, v in data.items() if k != "entries"})

    def choose(self, dtype: torch.dtype, n: int, rows: int) -> Choice:
        from .fftconv.plan import FFTPlan, make_plan  # noqa: PLC0415

        names = [_dtype_name(dtype)] + (["bfloat16"] if dtype == torch.float16 else [])
        for name in names:
            cands = [e for e in self.entries if e["dtype"] == name]
            if cands:
                break
        else:
            return Choice("torch", reason=f"no measured entry for {_dtype_name(dtype)}")
        ln, lr = math.log2(n), math.log2(max(rows, 1))
        best = min(cands, key=lambda e: (abs(math.log2(e["n"]) - ln), abs(math.log2(e["rows"]) - lr)))
        if abs(math.log2(best["n"]) - ln) > 1:
            return Choice("torch", reason=f"N={n} is more than an octave from every measured size")
        why = (f"table: N={best['n']}, rows={best['rows']}: triton {best.get('triton_ms')} ms, "
               f"torch {best.get('torch_ms')} ms")
        if best["impl"] != "triton":
            return Choice("torch", reason=why)
        fields = dict(best["plan"])
        plan = FFTPlan(**fields) if fields.get("n") == n else make_plan(
            n, persistent=fields.get("persistent", False), precision=fields.get("precision", "tf32x3"))
        if plan is None:
            return Choice("torch", reason=f"no Triton plan for N={n}")
        return Choice("triton", plan.check(), why)


@cache
def load_table(path: str = str(TABLE_PATH)) -> DispatchTable:
    return DispatchTable.load(path)


def choose(u: Tensor, h: Tensor, table: DispatchTable | None = None) -> Choice:
    """The implementation for causal_conv(u, h) on u's device, and why."""
    if u.dtype == torch.float64 or h.dtype == torch.float64:
        return Choice("torch", reason="fp64")
    if h.shape[-1] <= SHORT_FILTER:
        return Choice("direct", reason=f"short filter ({h.shape[-1]} <= {SHORT_FILTER} taps)")
    from .fftconv.plan import conv_size  # noqa: PLC0415

    B, D, L = u.shape
    n = conv_size(L, h.shape[-1])
    return table.choose(u.dtype, n, B * D) if table is not None else _choose_default(u.dtype, n, B * D)


@lru_cache(maxsize=4096)
def _choose_default(dtype: torch.dtype, n: int, rows: int) -> Choice:
    # Every prefill call asks: the table scan and plan check cost ~0.1 ms of host time each,
    # which at short L is a large part of a forward's 18 convolutions. The table is fixed.
    return load_table().choose(dtype, n, rows)


def causal_conv_cuda(u: Tensor, h: Tensor, impl: str = "auto") -> Tensor:
    """lcsm::causal_conv on CUDA: impl "auto" (the table), "triton", "fft" (torch.fft) or "direct"."""
    from ..ops import causal_conv_reference  # noqa: PLC0415 - avoid an import cycle with ops
    from .fftconv import NotCovered, fft_conv, torch_fft_conv  # noqa: PLC0415

    plan = None
    if impl == "auto":
        c = choose(u, h)
        impl, plan = c.impl, c.plan
    if impl == "direct":
        return causal_conv_reference(u, h)
    if impl == "triton" and u.dtype != torch.float64 and h.dtype != torch.float64:
        try:
            return fft_conv(u, h, plan=plan)
        except NotCovered:
            pass
    return torch_fft_conv(u, h)


def prime_filter_caches(gm, device_type: str = "cuda") -> int:
    """Run each CUDA `causal_conv` of a graph with a static input shape once, on zeros, so that
    the filter spectra it caches (fftconv/spectrum.py) exist before the graph first runs.
    Under mode="reduce-overhead" the first run is inductor's CUDA-graph warm-up, whose
    allocations land in the graph's private pool: a spectrum cached there outlives the run and
    cudagraph trees refuses the recording ("tensors in the cudagraph pool not tracked as
    outputs"). Returns how many convolutions ran. Real tensors even if a compiler calls this
    inside its fake mode; `device_type` is for tests (the caches exist on CUDA only)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily  # noqa: PLC0415

    count = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.lcsm.causal_conv.default):
        u, h = node.args[0].meta.get("val"), node.args[1]
        if h.op != "get_attr" or not isinstance(u, torch.Tensor) or not all(isinstance(s, int) for s in u.shape):
            continue  # a dynamic length: each new length is a new spectrum anyway
        filt = getattr(gm, h.target)
        if filt.device.type != device_type:
            continue
        with unset_fake_temporarily(), torch.no_grad():
            causal_conv_cuda(torch.zeros(tuple(u.shape), dtype=u.dtype, device=filt.device), filt)
        count += 1
    return count
