"""torch dtype -> ONNX element type."""
from __future__ import annotations

import torch

_ELEM = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
         torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


def elem_type(dtype: torch.dtype) -> int:
    if dtype not in _ELEM:
        raise TypeError(f"export: no ONNX element type for {dtype}")
    return _ELEM[dtype]
