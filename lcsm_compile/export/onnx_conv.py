"""onnx_conv: `lcsm::causal_conv(u, h)` as ONNX that onnxruntime runs correctly.

    u (B, C, L), h (C, K')  ->  DFT(u, n) * DFT(h, n) -> inverse DFT -> real part [:L]

with n = 2^ceil(log2(L + K' - 1)) computed in the graph (L dynamic). Why this form:
- The DFT op of opsets 17-19 (axis an attribute). An opset-20 export of an FFT convolution (axis
  an input) fails at run time in onnxruntime 1.31 ("Shape mismatch attempting to re-use buffer").
- A power-of-two length: onnxruntime's CPU DFT is a radix-2 FFT only for powers of two; other
  lengths run a slow path that is also inaccurate (relative error ~1e-3 at n = 6000, measured),
  so the exporter's own rfft translation (n = 2L) breaks fp32 parity at most lengths.
- Full complex transforms (onesided=0): the inverse of a one-sided spectrum is not expressible
  with DFT alone; the full transform is exact and costs about the same in onnxruntime.
Short filters (K <= 64) never reach this op: graphs.py writes them as a padded depthwise Conv,
which is cheaper than three transforms there. The CUDA provider has no DFT kernel (only
com.microsoft Rfft/Irfft), so a GPU deployment of the prefill graph is not covered here.
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["causal_conv_translation", "SUPPORTED_OPSETS"]

SUPPORTED_OPSETS = (17, 18, 19)
_FLOAT, _INT64 = 1, 7


def causal_conv_translation(opset: int) -> Callable:
    """The custom translation of lcsm::causal_conv for torch.onnx.export at `opset`."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"export: opset {opset} is not supported; use one of {SUPPORTED_OPSETS}. The DFT of opset >= 20 "
            "fails at run time in onnxruntime (shape re-use error), and opsets < 17 have no DFT")
    import onnxscript  # noqa: PLC0415 - only the exporter needs it

    op = getattr(onnxscript, f"opset{opset}")

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
        U = op.DFT(op.Unsqueeze(u, op.Constant(value_ints=[-1])), n, axis=2, onesided=0)  # (B, C, n, 2)
        H = op.DFT(op.Unsqueeze(h, op.Constant(value_ints=[-1])), n, axis=1, onesided=0)  # (C, n, 2)
        Ur, Ui = op.Split(U, num_outputs=2, axis=-1)
        Hr, Hi = op.Split(H, num_outputs=2, axis=-1)
        Y = op.Concat(op.Sub(op.Mul(Ur, Hr), op.Mul(Ui, Hi)), op.Add(op.Mul(Ur, Hi), op.Mul(Ui, Hr)), axis=-1)
        y = op.DFT(Y, n, axis=2, inverse=1, onesided=0)
        start = op.Constant(value_ints=[0, 0])
        end = op.Concat(L, op.Constant(value_ints=[1]), axis=0)
        y = op.Squeeze(op.Slice(y, start, end, op.Constant(value_ints=[2, 3])), op.Constant(value_ints=[-1]))
        if cast:
            y = op.Cast(y, to=int(dtype))
        return y

    return causal_conv
