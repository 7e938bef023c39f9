"""NumpyOnlineConv: the online convolution engine of kernels/online_conv in numpy, for OnnxDecoder
where torch is absent. Same calls as `OnlineConv` (prefill(m, u), step(m, u_t), advance()), same
tiling (DESIGN.md §2, kernels/online_conv/schedule.py): at step t the tile of size U = i & -i
(i = t + 1, the schedule counts from 0) adds the block X[t+1-U : t+1] to A[t+1 : t+1+U] with a
circular FFT of size 2U; a prompt of length P is its own convolution plus, for each set bit of P,
the tile inside it whose outputs reach past it (O(P log P), whatever max_len). fp64 accumulators.
X and A are rings of R slots, R the largest tile (the largest power of two below max_len), as in
OnlineConv: the last R inputs and the next R outputs (a tile's blocks are aligned and never wrap).

Deliberately torch-free (numpy only), like manifest.py and onnx_decoder.py.
"""
from __future__ import annotations

import numpy as np

__all__ = ["NumpyOnlineConv"]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _conv(u: np.ndarray, h: np.ndarray, length: int) -> np.ndarray:
    """u (..., N) convolved with h (..., K), outputs [0, length), fp64."""
    n = _pow2(u.shape[-1] + h.shape[-1] - 1)
    return np.fft.irfft(np.fft.rfft(u.astype(np.float64), n) * np.fft.rfft(h, n), n)[..., :length]


class NumpyOnlineConv:
    def __init__(self, filters: np.ndarray, batch: int, max_len: int):
        filters = np.asarray(filters)
        if filters.ndim != 3 or filters.shape[-1] < 1:
            raise ValueError(f"NumpyOnlineConv: filters must be (M, D, K), got {filters.shape}")
        self.M, self.D, K = filters.shape
        self.B, self.max_len = int(batch), int(max_len)
        self.h = filters[..., : min(K, self.max_len)].astype(np.float64)
        self.ring = 1 << max(0, (self.max_len - 1).bit_length() - 1)  # schedule.largest_tile (torch-free here)
        self.X = np.zeros((self.M, self.B, self.D, self.ring), np.float64)
        self.A = np.zeros((self.M, self.B, self.D, self.ring), np.float64)
        self._spectra: dict[int, np.ndarray] = {}
        self.reset()

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self._position = 0
        self._prompt_len: int | None = None
        self._stepped: set[int] = set()
        self.X[:] = 0
        self.A[:] = 0

    def prefill(self, m: int, u: np.ndarray) -> np.ndarray:
        """y (B, D, P) for the prompt u (B, D, P) of mixer m; its contribution to later positions goes
        to A[m], its last R positions to the history."""
        P = u.shape[-1]
        if u.shape != (self.B, self.D, P):
            raise ValueError(f"NumpyOnlineConv: prefill input must be {(self.B, self.D, 'P')}, got {u.shape}")
        if P > self.max_len:
            raise ValueError(f"NumpyOnlineConv: prompt of length {P} is longer than max_len={self.max_len}")
        if self._prompt_len is not None and P != self._prompt_len:
            raise ValueError(f"NumpyOnlineConv: every mixer's prompt must have length {self._prompt_len}, got {P}")
        h, R = self.h[m], self.ring
        self.A[m] = 0
        kept = np.arange(max(0, P - R), P)
        self.X[m][..., kept % R] = u[..., kept]
        for k in range(P.bit_length()):  # schedule.prompt_tiles
            U, end = 1 << k, (P >> k) << k
            if (P >> k) & 1 and end < self.max_len:
                hi = min(end + U, self.max_len)
                z = _conv(u[..., end - U : end], h[:, : 2 * U], 2 * U)  # outputs from the block's start
                self.A[m, ..., P % R : P % R + hi - P] += z[..., P - end + U : hi - end + U]
        self._prompt_len = self._position = P
        return _conv(u, h[:, :P], P).astype(u.dtype)

    def step(self, m: int, u_t: np.ndarray) -> np.ndarray:
        """y_t (B, D) of mixer m at the current position; u_t (B, D) joins the history."""
        if self._prompt_len is None:
            raise RuntimeError("NumpyOnlineConv: step before prefill")
        if self._position >= self.max_len:
            raise RuntimeError(f"NumpyOnlineConv: step past max_len={self.max_len}")
        if u_t.shape != (self.B, self.D):
            raise ValueError(f"NumpyOnlineConv: step input must be {(self.B, self.D)}, got {u_t.shape}")
        s = self._position % self.ring  # the position's slot in both rings
        self.X[m, ..., s] = u_t
        self._stepped.add(m)
        y = (self.A[m, ..., s] + self.h[m, None, :, 0] * u_t).astype(u_t.dtype)
        self.A[m, ..., s] = 0  # the slot now waits for the position R later
        return y

    def advance(self) -> None:
        """The tile of every mixer for the current position, then the next position."""
        if len(self._stepped) < self.M:
            raise RuntimeError(f"NumpyOnlineConv: advance before mixer(s) "
                               f"{sorted(set(range(self.M)) - self._stepped)} stepped")
        t = self._position
        U = (t + 1) & -(t + 1)
        dst = t + 1
        if dst < self.max_len:
            n, src = min(U, self.max_len - dst), (dst - U) % self.ring
            block = self.X[..., src : src + U]  # (M, B, D, U)
            z = np.fft.irfft(np.fft.rfft(block, 2 * U) * self._spectrum(U)[:, None], 2 * U)
            self.A[..., dst % self.ring : dst % self.ring + n] += z[..., U - 1 : U - 1 + n]
        self._position += 1
        self._stepped.clear()

    def _spectrum(self, U: int) -> np.ndarray:
        # G_U = rfft(h[1:2U], 2U) per mixer and channel, computed once per level
        G = self._spectra.get(U)
        if G is None:
            g = self.h[..., 1 : 2 * U]
            G = self._spectra[U] = np.fft.rfft(g, 2 * U)
        return G
