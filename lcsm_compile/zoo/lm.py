"""The language-model shell shared by the zoo's LMs (the H3/Hyena papers' GPT-style stack).

Fu et al. (2023), "Hungry Hungry Hippos" (arXiv:2212.14052) and Poli et al. (2023),
"Hyena Hierarchy" (arXiv:2302.10866) both train a GPT-2-style stack with the attention
layer replaced by their mixer: embedding -> N pre-norm residual blocks [LN -> mixer,
LN -> MLP] -> LN -> tied LM head.  Token ids (B, L) int64 in, logits (B, L, V) out.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Module):
    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_inner)
        self.fc2 = nn.Linear(d_inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, d_inner: int, mixer: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = Mlp(d_model, d_inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LMHeadModel(nn.Module):
    """Embedding, `n_layer` blocks of `make_mixer()`, final LN, head tied to the embedding."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, max_len: int,
                 make_mixer: Callable[[], nn.Module], d_inner: int | None = None,
                 pad_vocab_size_multiple: int = 1):
        super().__init__()
        if vocab_size % pad_vocab_size_multiple:
            vocab_size += pad_vocab_size_multiple - vocab_size % pad_vocab_size_multiple
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_len = max_len
        d_inner = d_inner or 4 * d_model
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(Block(d_model, d_inner, make_mixer()) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embeddings.weight
        # GPT-2 initialisation for the shell; mixers keep their own (their filters depend on it).
        nn.init.normal_(self.embeddings.weight, std=0.02)
        for layer in self.layers:
            for fc in (layer.mlp.fc1, layer.mlp.fc2):
                nn.init.normal_(fc.weight, std=0.02)
                nn.init.zeros_(fc.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))
