"""The Flash Inference tile schedule (DESIGN.md §2), as plain integer functions.

The schedule counts from position 0, whatever the prompt: the step at position t is followed by
one tile: with i = t + 1 and U = i & -i (the largest power of two dividing i), the inputs
X[t+1-U : t+1] add their contribution to A[t+1 : t+1+U] (clipped at max_len). The tile's *level*
is log2(U). Every pair (s, t') with 0 <= s < t' < max_len is covered by exactly one tile, run
after step s and before step t'.

A prompt of length P arrives in one call, so the tiles of positions t < P do not run one by one:
their outputs inside the prompt are the prompt's own convolution, and the ones reaching past it
come from one tile per set bit of P (`prompt_tiles`), which the prefill runs for outputs >= P.
A prefill is therefore O(P log P) whatever max_len; tiles after the prompt read its inputs from
the history like any other.
"""
from __future__ import annotations

from typing import NamedTuple

# Direct (block-Toeplitz) tiles up to DIRECT_MAX_TILE positions, FFT tiles beyond; direct tiles
# as scalar FMAs below DOT_MIN_TILE, as tl.dot from it (tl.dot needs every dimension >= 16).
# Measured on an H100, M=18, D=864, bf16 state (benchmarks/NOTES_online_conv.md, 2026-11):
#   B=1: FMA 2.5/3.4/4.5/8.3/14.8 us for U=2..32, tl.dot 16.5/22.8/55 us for U=16/32/64,
#        FFT 14-24 us up to U=32 and 41 us at 64  -> direct up to 32, FMA throughout;
#   B=8: FMA 16.5/21/32/50 us for U=2..16, tl.dot 28/52/195/638 us for U=16..128,
#        FFT 84/154/303/596 us                    -> direct up to 64, tl.dot from 16.
# An fp32 state makes tl.dot exact fp32 (input_precision "ieee", no tensor cores): on an H200,
# Hyena-153M, B = 8, fp32 (benchmarks/results/generate_nvidia_h200_b8.json, 2026-12-01) the
# token with the U = 64 direct tile took 6165 us against 1427 (U = 32) and 1758 (U = 128, an
# FFT tile), so fp32 states stop direct tiles at 32 (the U = 64 FFT tile: not yet timed).
DIRECT_MAX_TILE = 32
DOT_MIN_TILE = 64


def default_tiles(batch: int, itemsize: int = 2) -> tuple[int, int]:
    """(direct_max, dot_min) for a batch size and the state's bytes per element, from the
    measurements above."""
    if batch < 4:
        return DIRECT_MAX_TILE, DOT_MIN_TILE
    return (32 if itemsize >= 4 else 64), 16


class Tile(NamedTuple):
    src: int  # first input position of the block, X[src : src + size]
    dst: int  # first output position, A[dst : dst + size]
    size: int  # U, a power of two
    level: int  # log2(U)


def num_levels(max_len: int) -> int:
    """How many tile levels a sequence of max_len positions can use (any prompt length)."""
    return (max_len - 1).bit_length() if max_len >= 2 else 0


def largest_tile(max_len: int) -> int:
    """The largest tile the schedule runs for max_len (1 when none): no tile reads further back
    or writes further ahead, so it is the length of the engine's history and accumulator rings."""
    return 1 << max(0, num_levels(max_len) - 1)


def tile_at(t: int, max_len: int) -> Tile | None:
    """The tile that runs after the step at position t, or None when it would write nothing."""
    if t < 0:
        raise ValueError(f"position {t} is negative")
    if t + 1 >= max_len:
        return None
    size = (t + 1) & -(t + 1)
    return Tile(src=t + 1 - size, dst=t + 1, size=size, level=size.bit_length() - 1)


def level_at(t: int, max_len: int) -> int:
    """The tile level after step t; -1 where no tile runs."""
    tile = tile_at(t, max_len)
    return -1 if tile is None else tile.level


def prompt_tiles(prompt_len: int, max_len: int) -> list[Tile]:
    """The tiles of positions inside a prompt whose outputs reach position prompt_len or later:
    for each set bit k of P, the block of 2^k inputs ending where P's bits above k end. Their
    outputs below P belong to the prompt's own convolution; the prefill adds those from P on."""
    tiles = []
    for k in range(prompt_len.bit_length()):
        end = (prompt_len >> k) << k
        if (prompt_len >> k) & 1 and end < max_len:
            tiles.append(Tile(src=end - (1 << k), dst=end, size=1 << k, level=k))
    return tiles


def level_frequencies(n_levels: int) -> list[float]:
    """Fraction of steps that end with a tile of each level (1/2, 1/4, ...): the weights of a
    per-token average cost over a long generation."""
    return [2.0 ** -(k + 1) for k in range(n_levels)]
