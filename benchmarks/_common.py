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


def timed(fn, reps: int = 1) -> float:
    """Seconds per call after one warm-up call (CUDA events on GPU, wall clock on CPU)."""
    import time  # noqa: PLC0415

    fn()
    sync()
    if CUDA:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
