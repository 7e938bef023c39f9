"""What every benchmark script shares: the device, logging, synchronising, relative error."""
from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def log(*a):
    print(*a, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
