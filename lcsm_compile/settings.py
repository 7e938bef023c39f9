"""Every option of the lcsm backend, in one dataclass.

`torch.compile(model, backend="lcsm", options={...})` hands the dict here; an unknown key or a
value of the wrong type is an error that lists what is valid, never a silent no-op.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

INNER_BACKENDS = ("inductor", "eager", "aot_eager")


@dataclass(frozen=True)
class Settings:
    # Longest sequence the compiled model will see; filters are folded at this length.
    # None: the longest length the model itself supports (its filter / positional buffer).
    max_len: int | None = None
    # Raise instead of falling back when a mixer cannot be rewritten or a pass fails.
    strict: bool = False
    # Run the verifier's random probes and second-length check. Off: a region is still
    # checked for causality and its filter still comes from the impulse response.
    verify: bool = True
    # Build a decoder (step program + online convolution state) alongside prefill.
    decode: bool = False
    # Compiler for everything that is not a mixer. "eager" keeps CPU tests fast.
    inner_backend: str = "inductor"
    # Relative tolerance of the verifier's probes (scaled up for half precision).
    verify_rtol: float = 1e-4
    # Convolutions with filters at most this long are "short" (ring buffers when decoding).
    short_conv_max: int = 64
    # Prefill (inductor): causal convs of at most this many taps are handed to inductor as shifted
    # products it fuses (passes/inline_short.py) instead of one opaque op on cuDNN's depthwise
    # kernel (H200, Hyena-153M bf16, L = 8192: 215 us per layer for 3 taps); 0: never.
    inline_short_taps: int = 16
    # Lower modal filters (Re sum r p^t) to their exact recurrence when decoding.
    modal_recurrence: bool = True
    # Replay decode steps under CUDA graphs on GPU.
    cuda_graphs: bool = True
    # Decode steps (inductor, CUDA): matrix products with at most this many rows (the batch) become
    # fused, tuned reductions instead of cuBLAS GEMV launches (passes/decode_gemv.py); 0: never.
    # H200, Hyena-153M fp32: 1 row 816 -> 662 us/token; 8 rows 1329 -> 1555 (worse), hence 1.
    decode_gemv_rows: int = 1
    # What those products become: "reduction" (inductor's, tuned, the layer norms inside) or
    # "triton" (kernels/gemv.py, one extern call each; H200, Hyena-153M fp32, B = 1: 531.2
    # us/token in step_profile.py vs 456.6 with the reductions, another machine start).
    decode_gemv_kernel: str = "reduction"
    # Decode steps (CUDA): products with more rows than decode_gemv_rows and at most this many
    # (<= 8; with decode_gemv_rows = 0, one-row products too) become lcsm::gemv calls
    # (kernels/gemv.py: weight rows read once for all rows, before the PDL wait) instead of
    # cuBLAS matmuls; 0: never. H200, Hyena-153M fp32, B = 8,
    # step_profile.py, 2026-12-01: 1316.5 -> 1093.3 us/token same run, 821.4 with retuned blocks.
    decode_gemv_triton_rows: int = 8
    # The reductions split along K into this many partial sums, then summed (1: not split): more
    # outputs to spread over the SMs. Measured slower: H200, Hyena-153M fp32, step_profile.py,
    # 2026-12-01: 2 splits 694.8 vs 589.0 us/token (19 more kernels, no faster reads). Kept as an option.
    decode_gemv_splits: int = 1
    # Compile the step's inductor kernels with programmatic dependent launch (Hopper and newer):
    # a kernel's prologue overlaps its predecessor's tail, and the step is ~170 latency-bound kernels.
    # H200, Hyena-153M fp32, step_profile.py, 2026-12-01: 589.0 -> 541.0 us/token (floor 533 -> 491).
    decode_pdl: bool = True
    # Decode-step row reductions (the GEMVs) over up to this many elements are persistent, one block
    # holding all of K (0: inductor's own limit, 1024), where inductor would loop over K. H200,
    # Hyena-153M fp32, step_profile.py, 2026-12-01, same run: 578.8 -> 513.2 us/token (floor graph
    # 526 -> 465); fc2 (K = 1728) 9.8 -> 4.7 us. The choice enters inductor's FX-graph cache key
    # through a no-op custom pass (runtime/segment_compile.py).
    decode_persistent_k: int = 2048
    # Decode steps: a layer norm whose output only feeds GEMV reductions is recomputed inside each
    # of them (passes/decode_norm.py), saving its own kernel (two per Hyena-153M layer). H200,
    # Hyena-153M fp32, step_profile.py, 2026-12-01, same run: 504.3 -> 456.6 us/token (floor graph
    # 445.9 -> 397.7, 149 -> 114 kernels per token).
    decode_fuse_norm: bool = True
    # Time dimension of the graph inputs that carry a sequence (batch-first models: 1).
    seq_dim: int = 1

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Settings:
        options = dict(options or {})
        valid = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"lcsm: unknown option(s) {unknown}; valid options are: {sorted(valid)}"
            )
        settings = cls(**options)
        settings._check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return Settings.from_options({**dataclasses.asdict(self), **changes})

    def _check(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"lcsm: option {name}={getattr(self, name)!r} must be {want}")

        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
            raise bad("max_len", "a positive int or None")
        for name in ("strict", "verify", "decode", "modal_recurrence", "cuda_graphs", "decode_pdl", "decode_fuse_norm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if self.inner_backend not in INNER_BACKENDS:
            raise bad("inner_backend", f"one of {INNER_BACKENDS}")
        if not (isinstance(self.verify_rtol, float) and 0 < self.verify_rtol < 1):
            raise bad("verify_rtol", "a float in (0, 1)")
        if not isinstance(self.short_conv_max, int) or self.short_conv_max < 1:
            raise bad("short_conv_max", "a positive int")
        if self.decode_gemv_kernel not in ("reduction", "triton"):
            raise bad("decode_gemv_kernel", "'reduction' or 'triton'")
        if not isinstance(self.inline_short_taps, int) or self.inline_short_taps < 0:
            raise bad("inline_short_taps", "an int >= 0")
        if not isinstance(self.decode_gemv_rows, int) or self.decode_gemv_rows < 0:
            raise bad("decode_gemv_rows", "an int >= 0")
        if not isinstance(self.decode_gemv_triton_rows, int) or not 0 <= self.decode_gemv_triton_rows <= 8:
            raise bad("decode_gemv_triton_rows", "an int from 0 to 8")
        if not isinstance(self.decode_gemv_splits, int) or self.decode_gemv_splits < 1:
            raise bad("decode_gemv_splits", "an int >= 1")
        if not isinstance(self.decode_persistent_k, int) or self.decode_persistent_k < 0:
            raise bad("decode_persistent_k", "an int >= 0")
        if not isinstance(self.seq_dim, int):
            raise bad("seq_dim", "an int")
