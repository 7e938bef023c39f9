"""`OnlineConv`: exact online long convolution for the M mixers of a model (DESIGN.md §2).

    eng = OnlineConv(filters, batch, max_len)        # filters (M, D, K)
    y = eng.prefill(m, u)                            # u (B, D, P) -> y (B, D, P), for each m
    for each new position:
        y_t = eng.step(m, u_t)                       # (B, D) -> (B, D), for each m, in model order
        eng.advance()                                # the tiles of all mixers, position += 1

State, all preallocated: history X (M, B, D, R) in the state dtype, accumulators A (M, B, D, R)
in fp32 (fp64 for fp64 state), filters h (M, D, min(K, L)) in the compute dtype, and the filter
spectra G_U = rfft(h[1:2U], 2U) of the levels whose tiles go through FFTs (U > direct_max),
except the top levels (4U > max_len), which run at most twice per sequence and transform the
filter when they run: state + spectra stay under 3 * M * D * max_len elements for B = 1
(about 2 when max_len is a power of two).

X and A are rings of R slots, position p in slot p % R, R the largest tile (the largest power
of two below max_len, about max_len / 2). A tile reads at most the last R inputs and writes at
most R positions ahead, in aligned blocks that never wrap; so X keeps the last R inputs, and A
the next R outputs: after the step at t every pending contribution is to a position in (t, t + R],
and the step clears slot t % R of A once it has read it, for t + R. The prefill runs the prompt's
tiles from the prompt itself and keeps its last R positions. Rings instead of max_len-long
buffers halve the state (B = 8, max_len 2^17, fp32: 130 GB -> 65 GB).

Two backends with one schedule. "torch": plain torch ops indexed from the host (the CPU path;
fp64 too). "triton" (default on CUDA; on CPU through TRITON_INTERPRET=1): the fused step kernel,
direct tiles as one Triton launch for all mixers and channels, FFT tiles as torch.fft on the
cached spectra between a Triton gather and scatter.

CUDA graphs. In the Triton path no launch argument depends on the position: the position lives
in the device tensor `pos` (int64: [0] position for the steps, [1] its copy for the tiles,
[2] the prompt length, which no kernel reads), the step reads pos[0] and copies it to pos[1],
every tile launch reads pos[1] and writes pos[0] = t + 1. What changes with t is only *which*
tile runs, one of `num_levels(max_len)` levels, and that the host knows without a sync. So:
- `step(m, u_t, out=)` / `step_all(u, out=)` are replayable as they are (no host sync, no
  allocation when `out` is given); a compiled step program captures them inside its graph;
- `run_tiles(level)` is the device work of one level (pure, capturable); `tile_level()` says
  which level runs now; `capture_graphs()` (graphs.py) captures one graph per level, after
  which `advance()` replays them; `graphs.TokenGraphs` captures a whole token (a user step
  function + the tiles) per level, for decode loops with one replay per token;
- `advance(launch=False)` does only the host bookkeeping, for callers that replayed the tiles
  inside their own graphs.
Level-0 tiles (every other position) ride inside the step kernel (A[t+1] += h[1] u), so those
positions cost one step launch plus the position update.

Prefill: the prompt's own convolution (its filter cut to P taps) and the few tiles inside the
prompt whose outputs reach past it (schedule.prompt_tiles, one per set bit of P): O(P log P),
not a convolution of the prompt over all of max_len.

Tile kinds (schedule.default_tiles, measured on an H100 and an H200): direct tiles up to
direct_max (32 for B < 4; from B = 4, 64 for half-precision states and 32 for fp32), as scalar
FMAs below dot_min and tl.dot from it (never at B < 4, from 16 at B >= 4), FFT tiles above.
Decode cost on an H100 (M=18, D=864, B=1, bf16): 9-13 µs per token for L = 2^10 .. 2^18, 269x
the lazy decoder at 2^17 (benchmarks/NOTES_online_conv.md).

Errors leave the state as it was: ValueError for bad arguments (shape, dtype, device, a prompt
longer than max_len), RuntimeError for calls out of order (a step before prefill, past max_len,
an advance before every mixer stepped, a prefill after decoding started).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..step_engine import StepEngine, resolve_backend
from . import fft_tiles
from .reference import compute_dtype
from .schedule import default_tiles, largest_tile, level_at, num_levels, prompt_tiles, tile_at

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class OnlineConv(StepEngine):
    def __init__(self, filters: Tensor, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, direct_max: int | None = None,
                 dot_min: int | None = None, backend: str = "auto", work_bytes: int = 1 << 29):
        if not isinstance(filters, Tensor) or filters.dim() != 3 or filters.shape[-1] < 1:
            raise ValueError(f"OnlineConv: filters must be a (M, D, K) tensor with K >= 1, got "
                             f"{tuple(filters.shape) if isinstance(filters, Tensor) else type(filters)}")
        if int(batch) < 1 or int(max_len) < 1:
            raise ValueError(f"OnlineConv: batch and max_len must be >= 1, got {batch}, {max_len}")
        self.dtype = dtype or filters.dtype
        if self.dtype not in _FLOATS:
            raise ValueError(f"OnlineConv: state dtype must be one of {_FLOATS}, got {self.dtype}")
        self.device, self.backend = resolve_backend(
            "OnlineConv", torch.device(device) if device is not None else filters.device, self.dtype, backend)
        backend = self.backend
        self.M, self.D, K = filters.shape
        self.B, self.max_len = int(batch), int(max_len)
        self.cdtype = compute_dtype(self.dtype)
        default_direct_max, default_dot_min = default_tiles(self.B, self.dtype.itemsize)
        self.direct_max = default_direct_max if direct_max is None else int(direct_max)
        self.dot_min = default_dot_min if dot_min is None else int(dot_min)
        self.work_bytes = work_bytes
        self._interpret = self.device.type != "cuda"
        self._fuse_level0 = backend == "triton" and self.direct_max >= 1

        M, B, D, L = self.M, self.B, self.D, self.max_len
        self.h = filters[..., : min(K, L)].to(device=self.device, dtype=self.cdtype).contiguous()
        self.ring = largest_tile(L)
        self.X = torch.zeros(M, B, D, self.ring, dtype=self.dtype, device=self.device)
        self.A = torch.zeros(M, B, D, self.ring, dtype=self.cdtype, device=self.device)
        self.n_levels = num_levels(L)
        self.spectra: dict[int, Tensor] = {
            k: fft_tiles.level_spectrum(self.h, 1 << k, work_bytes)
            for k in range(self.n_levels) if fft_tiles.cached_level(1 << k, L, self.direct_max)
        }
        self.pos = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._tile_graphs = None
        self.reset()

    # ---------------------------------------------------------------- host state (StepEngine)
    @property
    def channels(self) -> int:
        return self.D

    def scratch_position(self):
        """Context: device work inside runs at position max_len - 2 and is undone on exit (graph
        warm-ups and captures); every StepEngine has one (StepEngine._restored)."""
        from .graphs import scratch_position  # noqa: PLC0415 - graphs imports this module

        return scratch_position(self)

    def memory_elements(self) -> dict:
        """Elements of decode state and spectra (a complex value counts 2), beyond the filters."""
        spectra = sum(2 * G.numel() for G in self.spectra.values())
        total = self.X.numel() + self.A.numel() + spectra
        return {"history": self.X.numel(), "accumulators": self.A.numel(), "spectra": spectra,
                "total": total, "per_MDL": total / (self.M * self.D * self.max_len)}

    # ---------------------------------------------------------------- prompt and step
    def _prefill(self, m: int, u: Tensor, P: int) -> Tensor:
        """y over the prompt; A[m] gets the contributions of the prompt's tiles that reach past it,
        computed from the prompt; the history keeps its last R positions, which later tiles read."""
        self.A[m].zero_()
        if P == 0:
            return u.clone()
        kept = torch.arange(max(0, P - self.ring), P, device=self.device)
        self.X[m, :, :, kept % self.ring] = u[..., kept].to(self.dtype)
        prompt = u.to(self.dtype)[None]
        for tile in prompt_tiles(P, self.max_len):
            self._tile_torch(tile, slice(m, m + 1), start=P, source=prompt)
        return fft_tiles.prompt_convolution(u, self.h[m, :, :P], P, self.work_bytes).to(self.dtype)

    def _step(self, u: Tensor, y: Tensor, m0: int, n: int) -> None:
        if self.backend == "triton":
            from .triton_step import launch_step  # noqa: PLC0415 - triton loads lazily

            launch_step(u, y, self.X, self.A, self.h, self.pos, self.max_len, m0, n, self._fuse_level0,
                        self._interpret)
            return
        t, ms = self._position, slice(m0, m0 + n)
        self.X[ms, ..., t % self.ring] = u
        y.copy_(self.A[ms, ..., t % self.ring] + self.h[ms, None, :, 0] * u.to(self.cdtype))
        self.A[ms, ..., t % self.ring] = 0

    # ---------------------------------------------------------------- tiles
    def tile_level(self) -> int:
        """Level (log2 of the tile size) of the tiles after the current position's steps; -1: none."""
        if self._prompt_len is None:
            raise RuntimeError("OnlineConv: no prompt yet; call prefill first")
        return level_at(self._position, self.max_len)

    def _advance_device(self) -> None:
        """The tiles of all mixers for the current position (replayed graphs once captured)."""
        level = self.tile_level()
        if self._tile_graphs is not None:
            self._tile_graphs[level].replay()
        else:
            self.run_tiles(level)

    def run_tiles(self, level: int) -> None:
        """The device work of one tile level for all mixers. In the Triton path it reads the
        position from `pos` and is capturable; the torch path indexes from the host position."""
        if self.backend == "torch":
            self._run_tiles_torch()
            return
        from . import triton_step, triton_tiles  # noqa: PLC0415 - triton loads lazily

        if level < 0 or (level == 0 and self._fuse_level0):
            triton_step.launch_advance_position(self.pos)
            return
        U = 1 << level
        if U <= self.direct_max:
            triton_tiles.launch_direct_tile(self.X, self.A, self.h, self.pos, U, self.max_len, self.dot_min,
                                            self._interpret)
            return

        def load(x_rows: Tensor) -> Tensor:
            w = torch.empty(x_rows.shape[:-1] + (2 * U,), dtype=self.cdtype, device=self.device)
            triton_tiles.launch_gather(x_rows, w, self.pos, U, self.max_len, self._interpret)
            return w

        def store(z: Tensor, a_rows: Tensor) -> None:
            triton_tiles.launch_scatter(z, a_rows, self.pos, U, self.max_len, self._interpret)

        fft_tiles.fft_tile(self.X, self.A, self._spectrum(level), U, self.work_bytes, load, store)

    def _spectrum(self, level: int):
        # mixers -> G_U, from the cache or (levels that run at most twice) from the filters
        G = self.spectra.get(level)
        if G is not None:
            return lambda mi: G[mi]
        return lambda mi: fft_tiles.rows_spectrum(self.h[mi], 1 << level)

    def _run_tiles_torch(self) -> None:
        tile = tile_at(self._position, self.max_len)
        if tile is not None:
            self._tile_torch(tile)

    def _tile_torch(self, tile, mixers: slice = slice(None), start: int = 0, source: Tensor | None = None) -> None:
        """One tile, host-indexed, for `mixers`: its outputs from `start` on (the prefill runs the
        prompt's tiles for the positions past the prompt only), its inputs from the history ring
        or from `source` (mixers, B, D, positions), the prompt."""
        U, src, dst = tile.size, tile.src, tile.dst
        lo, end = max(dst, start), min(dst + U, self.max_len)
        A, h = self.A[mixers], self.h[mixers]
        # aligned blocks of at most R positions: never wrap in the rings
        assert dst % U == 0 and U <= self.ring, (tile, self.ring)
        slots = slice(lo % self.ring, lo % self.ring + end - lo)
        X, cols = (self.X[mixers], slice(src % self.ring, src % self.ring + U)) if source is None else (
            source, slice(src, src + U))
        if U <= self.direct_max:
            # T[p, j] = h[U + p - j]: lags 1 .. 2U-1 of a filter zero-padded to 2U taps.
            taps = torch.nn.functional.pad(h[..., : 2 * U], (0, max(0, 2 * U - h.shape[-1])))
            ar = torch.arange(U, device=self.device)
            T = taps[..., U + ar[:, None] - ar[None, :]]  # (M, D, U, U)
            block = X[..., cols].to(self.cdtype)
            A[..., slots] += torch.einsum("mbdj,mdpj->mbdp", block, T)[..., lo - dst : end - dst]
            return

        def load(x_rows: Tensor) -> Tensor:
            w = torch.zeros(x_rows.shape[:-1] + (2 * U,), dtype=self.cdtype, device=self.device)
            w[..., :U] = x_rows[..., cols]
            return w

        def store(z: Tensor, a_rows: Tensor) -> None:
            a_rows[..., slots] += z[..., U - 1 + lo - dst : U - 1 + end - dst]

        spectrum, first, rows = self._spectrum(tile.level), mixers.start or 0, X.shape[0]
        fft_tiles.fft_tile(X, A, lambda mi: spectrum(_offset(mi, first, rows)), U, self.work_bytes, load, store)

    def capture_graphs(self) -> None:
        """Capture one CUDA graph per tile level; advance() then replays them (graphs.py)."""
        from .graphs import capture_tile_graphs  # noqa: PLC0415

        self._tile_graphs = capture_tile_graphs(self)

    def __repr__(self) -> str:
        return (f"OnlineConv(M={self.M}, D={self.D}, B={self.B}, max_len={self.max_len}, dtype={self.dtype}, "
                f"backend={self.backend}, direct_max={self.direct_max}, position={self._position})")


def _offset(mi: int | slice, first: int, rows: int) -> int | slice:
    """Rows `mi` of the `rows` mixers from `first` on, as rows of the whole engine."""
    if isinstance(mi, int):
        return mi + first
    start, stop, _ = mi.indices(rows)
    return slice(start + first, stop + first)
