"""The CapturedGraph the lcsm backend would see for a model call, for pass-level tests."""
from __future__ import annotations

import torch

from lcsm_compile.backend import capture_aten, describe_inputs


def capture(model, *inputs, dynamic: bool = False):
    """dynamic=True marks the first input's time dim (dim 1) dynamic; False compiles with L static.
    Dynamo is reset first: one graph per call, also for two instances of one class."""
    box = []

    def backend(gm, example_inputs):
        aten_gm = capture_aten(gm, example_inputs)
        box.append(describe_inputs(gm, example_inputs, aten_gm, seq_dim=1))
        return gm.forward

    torch._dynamo.reset()
    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    if dynamic:
        torch._dynamo.mark_dynamic(inputs[0], 1)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=None if dynamic else False)(*inputs)
    (cg,) = box
    return cg
