"""onnx_conv: `lcsm::causal_conv(u, h)` as ONNX that onnxruntime runs correctly.

    u (B, C, L), h (C, K')  ->  DFT(u, n) * DFT(h, n) -> inverse DFT -> real part [:L]

with n = 2^ceil(log2(L + K' - 1)) computed in the graph (L dynamic). Why this form:
- Our own DFT nodes, full complex transforms (onesided=0): axis an attribute at opsets 18-19, an
  input from 20. torch.onnx's translation of torch.fft (rfft/irfft) exported at opset 20 fails at
  run time in onnxruntime 1.31 ("Shape mismatch attempting to re-use buffer" in a DFT node, its
  one-sided output); asked for 17 or 18 (both give opset 18) it runs. This translation runs at
  18, 19, 20 and 21 (tested, dynamic length). Asking
  torch.onnx for 17 yields an opset-18 model (it builds at 18 and its version converter has no
  adapters down for Split and Pad), so 17 is refused.
- A power-of-two length: onnxruntime's CPU DFT is fast and accurate only there; other lengths
  take a slow path that is also inaccurate (measured, 64 rows: n = 4095 46 ms and relative error
  1e-3, n = 4096 16 ms and 8e-7; n = 6000 128 ms and 1.6e-3), so a translation at n = 2L, as
  torch.onnx's rfft gives, breaks fp32 parity at long lengths that are not powers of two.
- Full complex transforms: the inverse of a one-sided spectrum is not one DFT node; the full
  transform is exact and costs about the same in onnxruntime (measured, n = 4096 and 8192).
Filters of at most graphs.PREFILL_CONV_MAX (128) taps never reach this op: graphs.py writes them
as a padded depthwise Conv, cheaper than three transforms there (benchmarks/onnx_decode.py conv).
The CUDA provider has no DFT kernel (the issue's finding, not checked here: no onnxruntime-gpu);
onnxruntime then places the DFT nodes of a CUDA session on the CPU provider.
"""
from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["causal_conv_translation", "SUPPORTED_OPSETS"]

SUPPORTED_OPSETS = (18, 19, 20, 21)
_FLOAT, _INT64 = 1, 7


def causal_conv_translation(opset: int) -> Callable:
    """The custom translation of lcsm::causal_conv for torch.onnx.export at `opset`."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"export: opset {opset} is not supported; use one of {SUPPORTED_OPSETS}. torch.onnx builds at opset 18 "
            "and cannot convert these graphs down to 17 (no version adapters for Split and Pad); opsets < 17 have "
            "no DFT; opsets above 21 are untested")
    import onnxscript  # noqa: PLC0415 - only the exporter needs it

    op = getattr(onnxscript, f"opset{opset}")

    def dft(x, n, axis: int, inverse: int = 0):
        if opset >= 20:  # the axis became an input
            return op.DFT(x, n, op.Constant(value_int=axis), inverse=inverse, onesided=0)
        return op.DFT(x, n, axis=axis, inverse=inverse, onesided=0)

    def causal_conv(u, h):
        dtype = getattr(u, "dtype", None)
        cast = dtype is not None and int(dtype) != _FLOAT
        if cast:
            u, h = op.Cast(u, to=_FLOAT), op.Cast(h, to=_FLOAT)
        L = op.Shape(u, start=2, end=3)
        K = op.Shape(h, start=1, end=2)
        span = op.Cast(op.Sub(op.Add(L, K), op.Constant(value_ints=[1])), to=_FLOAT)
        log2 = op.Div(op.Log(span), op.Constant(value_float=math.log(2.0)))
        e = op.Ceil(op.Sub(log2, op.Constant(value_float=1e-4)))
        n = op.Cast(op.Pow(op.Constant(value_float=2.0), e), to=_INT64)
        n = op.Squeeze(n)  # dft_length is a scalar
        U = dft(op.Unsqueeze(u, op.Constant(value_ints=[-1])), n, 2)  # (B, C, n, 2)
        H = dft(op.Unsqueeze(h, op.Constant(value_ints=[-1])), n, 1)  # (C, n, 2)
        Ur, Ui = op.Split(U, num_outputs=2, axis=-1)
        Hr, Hi = op.Split(H, num_outputs=2, axis=-1)
        Y = op.Concat(op.Sub(op.Mul(Ur, Hr), op.Mul(Ui, Hi)), op.Add(op.Mul(Ur, Hi), op.Mul(Ui, Hr)), axis=-1)
        y = dft(Y, n, 2, inverse=1)
        start = op.Constant(value_ints=[0, 0])
        end = op.Concat(L, op.Constant(value_ints=[1]), axis=0)
        y = op.Squeeze(op.Slice(y, start, end, op.Constant(value_ints=[2, 3])), op.Constant(value_ints=[-1]))
        if cast:
            y = op.Cast(y, to=int(dtype))
        return y

    return causal_conv
