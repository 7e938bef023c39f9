"""check: an exported artifact, run with onnxruntime, against the eager model it came from.

The prefill graph at the example's length, then prefill + steps over the example (outputs at each
position against the full forward). export_onnx calls it before returning (check=True), so an
artifact that would decode differently from the model is never handed out.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .program import ExportError

__all__ = ["check_artifact", "max_error"]


def max_error(got: np.ndarray, want: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude (>= 1)."""
    want = want.detach().float().cpu().numpy()
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max()))


def check_artifact(model: nn.Module, example_inputs: tuple, out_dir: str | Path, tol: float = 1e-4,
                   max_steps: int = 4) -> None:
    try:
        import onnxruntime  # noqa: F401, PLC0415
    except ImportError:
        warnings.warn("export: onnxruntime is not installed; the artifact was not checked", stacklevel=3)
        return
    from .onnx_decoder import OnnxDecoder  # noqa: PLC0415

    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    L = tensors[0].shape[1]
    P = max(1, L - max_steps)
    dec = OnnxDecoder(out_dir, max_len=L)
    with torch.no_grad():
        full = model(*example_inputs)
    full = full if isinstance(full, (tuple, list)) else (full,)
    tdims = [o["time_dim"] for o in dec.manifest["outputs"]]

    def compare(where: str, got, t: slice | None) -> None:
        got = got if isinstance(got, tuple) else (got,)
        for k, (g, ref) in enumerate(zip(got, full)):
            ref = ref if t is None else ref.narrow(tdims[k], t.start, t.stop - t.start)
            err = max_error(g, ref)
            if not err <= tol:
                raise ExportError(f"export: the artifact in {out_dir} differs from the model: output {k} "
                                  f"{where}: relative error {err:.2e} > {tol:.0e}")

    compare(f"of the prefill graph at length {L}", dec.forward(*example_inputs), None)
    x = [xi[:, :P] if isinstance(xi, torch.Tensor) else xi for xi in example_inputs]
    compare(f"after a prompt of {P}", dec.prefill(*x), slice(P - 1, P))
    for t in range(P, L):
        x = [xi[:, t : t + 1] if isinstance(xi, torch.Tensor) else xi for xi in example_inputs]
        compare(f"at decode position {t}", dec.step(*x), slice(t, t + 1))
