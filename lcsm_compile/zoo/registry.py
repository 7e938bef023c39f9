"""The model zoo as data: every model the compiler is tested against, with what it should find.

An entry builds a tiny, seeded, eval-mode CPU config and makes inputs for it.  Positive
entries hold `expected_convs` causal convolution regions the compiler must rewrite;
negative entries hold none, and `reason` is a substring of what `explain()` should say.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import negatives, spellings
from .h3 import h3_tiny
from .hyena import hyena_tiny
from .long_conv import long_conv_tiny
from .sgconv import sgconv_tiny

TINY_D = 16
TINY_MAX_LEN = 1024

HYENA = 'Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models"'
H3 = 'Fu et al. 2023, "Hungry Hungry Hippos: Towards Language Modeling with State Space Models"'
LONG_CONV = 'Fu et al. 2023, "Simple Hardware-Efficient Long Convolutions for Sequence Modeling"'
SGCONV = 'Li et al. 2022, "What Makes Convolutional Models Great on Long Sequence Modeling?"'
M2 = 'Fu et al. 2023, "Monarch Mixer: A Simple Sub-Quadratic GEMM-Based Architecture"'
CADUCEUS = 'Schiff et al. 2024, "Caduceus: Bi-Directional Equivariant Long-Range DNA Sequence Modeling"'


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]  # tiny CPU config, seeded, eval mode
    make_inputs: Callable[[nn.Module, int, int, torch.Generator], tuple]  # (model, batch, length, gen)
    positive: bool
    expected_convs: int  # causal conv regions the compiler should rewrite (0 for negatives)
    reason: str | None  # for negatives: substring of the reason explain() should give
    kind: str  # "lm" (ids -> logits) or "seq" (float -> float)
    paper: str


def token_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> tuple:
    return (torch.randint(0, model.vocab_size, (batch, length), generator=generator),)


def float_inputs(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> tuple:
    return (torch.randn(batch, length, model.d_model, generator=generator),)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        return model.float().eval()

    return build


ZOO: dict[str, ZooEntry] = {}


def _register(name: str, factory: Callable[[], nn.Module], *, kind: str, paper: str,
              expected_convs: int = 0, reason: str | None = None) -> None:
    assert name not in ZOO, name
    ZOO[name] = ZooEntry(
        name=name,
        build=_seeded(factory, seed=len(ZOO)),
        make_inputs=token_inputs if kind == "lm" else float_inputs,
        positive=reason is None,
        expected_convs=expected_convs,
        reason=reason,
        kind=kind,
        paper=paper,
    )


# Models: per layer, Hyena has a short and a long conv, H3 a shift and a diagonal SSM conv.
_register("hyena_lm", hyena_tiny, kind="lm", paper=HYENA, expected_convs=4)
_register("h3_lm", h3_tiny, kind="lm", paper=H3, expected_convs=4)
_register("long_conv", long_conv_tiny, kind="seq", paper=LONG_CONV, expected_convs=2)
_register("sgconv", sgconv_tiny, kind="seq", paper=SGCONV, expected_convs=1)

# One causal conv in each spelling.
for _name, _cls in [
    ("spelling_fft_complex", spellings.FFTComplexConv),
    ("spelling_rfft_ortho", spellings.RFFTOrthoConv),
    ("spelling_rfft_forward", spellings.RFFTForwardConv),
    ("spelling_rfft_divide_n", spellings.RFFTDivideByNConv),
    ("spelling_pad_conv1d", spellings.PadConv1d),
    ("spelling_toeplitz", spellings.ToeplitzConv),
]:
    _register(_name, lambda c=_cls: c(TINY_D, TINY_MAX_LEN), kind="seq", paper=LONG_CONV,
              expected_convs=1)
_register("spelling_conv1d_k8", lambda: spellings.CausalConv1d(TINY_D, 8, TINY_MAX_LEN),
          kind="seq", paper=HYENA, expected_convs=1)
_register("spelling_conv1d_k128", lambda: spellings.CausalConv1d(TINY_D, 128, TINY_MAX_LEN),
          kind="seq", paper=HYENA, expected_convs=1)
_register("spelling_cumsum", lambda: spellings.CumsumMixer(TINY_D, TINY_MAX_LEN),
          kind="seq", paper=LONG_CONV, expected_convs=1)

# Negatives.
_register("neg_bidirectional_fft", lambda: negatives.BidirectionalFFTConv(TINY_D, TINY_MAX_LEN),
          kind="seq", paper=M2, reason="non-causal")
_register("neg_same_conv1d", lambda: negatives.SameConv1d(TINY_D, 7, TINY_MAX_LEN),
          kind="seq", paper=M2, reason="non-causal")
_register("neg_time_flip", lambda: negatives.FlippedConv(TINY_D, TINY_MAX_LEN),
          kind="seq", paper=CADUCEUS, reason="non-causal")
_register("neg_length_filter", lambda: negatives.LengthNormalisedFilter(TINY_D, max_len=TINY_MAX_LEN),
          kind="seq", paper=HYENA, reason="filter depends on total length")
_register("neg_data_filter", lambda: negatives.DataDependentFilter(TINY_D, TINY_MAX_LEN),
          kind="seq", paper=HYENA, reason="data-dependent filter")


def positive() -> list[ZooEntry]:
    return [e for e in ZOO.values() if e.positive]


def negative() -> list[ZooEntry]:
    return [e for e in ZOO.values() if not e.positive]
