"""Device tensors that outlive the call that made them, kept out of CUDA-graph memory pools.

The prefill op caches per-filter spectra (fftconv/spectrum.py) and per-plan DFT tables
(fftconv/tables.py) on first use. cudagraph trees (mode="reduce-overhead") route every
allocation *of the current thread* into the graph's private pool while they warm up a new shape,
and refuse the recording if a tensor there outlives the run ("tensors in the cudagraph pool not
tracked as outputs"). A static-shape graph is primed at compile time (dispatch.prime_filter_caches);
a dynamic-length one meets new FFT sizes inside a warm-up, so its cache entries are built here.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

__all__ = ["build_outside_graph_pools", "run_on_helper_thread"]


def build_outside_graph_pools(device: torch.device, build: Callable[[], object]) -> object:
    """build(), its memory outside any CUDA-graph pool where that can be chosen.

    On CUDA it runs on a helper thread (warm-up pools route by thread), on the caller's stream
    (same ordering). During a stream capture every allocation on the capturing stream joins the
    capture's pool whatever the thread, so it runs in place, as before this existed: the entry
    keeps its block reserved. cudagraph trees warm up each new shape before recording it, so
    their recordings find the entry already built.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return build()
    return run_on_helper_thread(build, device, torch.cuda.current_stream(device))


def run_on_helper_thread(fn: Callable[[], object], device: torch.device | None = None, stream=None):
    """fn() on a fresh thread (no grad, the given CUDA device and stream), its result or error."""
    box: dict = {}

    def work():
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                if stream is not None:
                    stack.enter_context(torch.cuda.device(device))
                    stack.enter_context(torch.cuda.stream(stream))
                box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=work, name="lcsm-graph-pools")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
