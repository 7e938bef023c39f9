"""H3 (Hungry Hungry Hippos) layer and language model, written from the paper.

Fu, Dao, Saab, Thomas, Rudra, Re (2023), "Hungry Hungry Hippos: Towards Language Modeling
with State Space Models", ICLR 2023, arXiv:2212.14052.

H3 (Sec. 3.1, Algorithm 1) with head dimension 1: projections Q, K, V of the input;
K goes through a shift SSM (A a shift matrix, B = e_1, C learned, so the kernel
K[l] = C A^l B is a short learned FIR of length N); then the product K*V goes through a
diagonal SSM and the result is gated by Q.  Both SSMs are run as FFT convolutions at
size 2L with a D skip (Sec. 4, FlashConv's reference path).

The diagonal SSM follows S4D (Gu, Gupta, Goel, Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models", arXiv:2206.11893): A = -exp(log_A_real)
+ i A_imag (S4D-Lin init), ZOH discretisation with step exp(log_dt), and the kernel as a
Vandermonde product K[h, l] = 2 Re(sum_n C'_hn exp(dt A_hn l)), C' = C (exp(dt A) - 1) / A.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .lm import LMHeadModel


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """y = (k (*) u)[..., :L] + D u for u (B, H, L), k (H, L'), with L' <= L."""
    L = u.shape[-1]
    n = 2 * L
    k_f = torch.fft.rfft(k, n=n)
    u_f = torch.fft.rfft(u, n=n)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L]
    return y + u * D.unsqueeze(-1)


class ShiftSSMKernel(nn.Module):
    """Kernel of the SSM x' = S x + e_1 u, y = C x, with S the N x N down-shift matrix."""

    def __init__(self, H: int, N: int):
        super().__init__()
        self.N = N
        self.register_buffer("A", torch.diag(torch.ones(N - 1), -1), persistent=False)
        self.register_buffer("B", nn.functional.one_hot(torch.tensor(0), N).float(), persistent=False)
        self.C = nn.Parameter(torch.randn(H, N) / math.sqrt(N))

    def forward(self, L: int) -> torch.Tensor:
        """K[h, l] = C_h S^l e_1 for l < min(N, L): (H, min(N, L))."""
        x = self.B
        taps = []
        for _ in range(min(self.N, L)):
            taps.append(self.C @ x)
            x = self.A @ x
        return torch.stack(taps, dim=-1)


class DiagSSMKernel(nn.Module):
    """S4D kernel (ZOH) for H channels with N/2 complex modes each (conjugate pairs implied)."""

    def __init__(self, H: int, N: int, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, N // 2)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(N // 2).float().repeat(H, 1))
        C = torch.randn(H, N // 2, dtype=torch.cfloat)
        self.C = nn.Parameter(torch.view_as_real(C))

    def forward(self, L: int) -> torch.Tensor:
        """K[h, l] = 2 Re(sum_n C'_hn exp(dt_h A_hn l)): (H, L)."""
        dt = torch.exp(self.log_dt)
        C = torch.view_as_complex(self.C)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dtA = A * dt.unsqueeze(-1)  # (H, N/2)
        K = dtA.unsqueeze(-1) * torch.arange(L, device=A.device)  # (H, N/2, L)
        C = C * (torch.exp(dtA) - 1.0) / A
        return 2 * torch.einsum("hn,hnl->hl", C, torch.exp(K)).real


class H3(nn.Module):
    """The H3 layer on x (B, L, D) -> (B, L, D), head dimension 1."""

    def __init__(self, d_model: int, d_state: int = 64, d_shift: int | None = None):
        super().__init__()
        self.d_model = d_model
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ssm_k_kernel = ShiftSSMKernel(d_model, d_shift or d_state)
        self.ssm_k_D = nn.Parameter(torch.randn(d_model))
        self.kernel = DiagSSMKernel(d_model, d_state)
        self.D = nn.Parameter(torch.randn(d_model))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        L = u.size(-2)
        q = self.q_proj(u).transpose(1, 2)  # (B, H, L)
        k = self.k_proj(u).transpose(1, 2)
        v = self.v_proj(u).transpose(1, 2)
        shift_k = self.ssm_k_kernel(L)
        k = fftconv(k, shift_k, self.ssm_k_D)
        kv = k * v
        ssm_kernel = self.kernel(L)
        y = fftconv(kv, ssm_kernel, self.D)
        y = (q * y).transpose(1, 2)
        return self.out_proj(y)


class H3LM(LMHeadModel):
    """Token ids (B, L) -> logits (B, L, V): the GPT stack with H3 layers only (no attention).

    The paper's hybrid keeps two attention layers; this all-H3 stack is the paper's ablation
    and keeps every mixer a convolution.  `max_len` is nominal: the kernels are defined for
    any length.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, max_len: int,
                 d_state: int = 64, d_shift: int | None = None, d_inner: int | None = None):
        super().__init__(vocab_size, d_model, n_layer, max_len,
                         lambda: H3(d_model, d_state=d_state, d_shift=d_shift), d_inner=d_inner)


def h3_tiny(max_len: int = 1024) -> H3LM:
    """A CPU-sized H3 LM: d_model 32, 2 layers, vocab 64, 8 diagonal modes, shift length 4."""
    return H3LM(vocab_size=64, d_model=32, n_layer=2, max_len=max_len, d_state=16, d_shift=4)
