"""Models run under bf16 autocast (how half-precision Hyena is run: fp32 weights, bf16 matmuls).

Autocast puts bf16 casts inside a region whose input and output are fp32, so the region is a
causal convolution up to bf16 round-off: the verifier and the fold must judge it at bf16's
tolerance (RegionFunction.compute_dtype), or every long convolution stays unrewritten.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lcsm_compile
from lcsm_compile.zoo import negative, positive

EAGER = {"inner_backend": "eager"}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(model, inputs):
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return compiled(*inputs), model(*inputs)


@pytest.mark.parametrize("L", [63, 200])
@pytest.mark.parametrize("entry", positive(), ids=lambda e: e.name)
def test_autocast_rewrites_every_mixer_within_bf16_round_off(entry, L):
    model = entry.build()
    inputs = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: every mixer is rewritten
        y, ref = _run(model, inputs)
    assert sum(lcsm_compile.counters["rewrite"].values()) == entry.expected_convs
    with torch.no_grad():
        exact = model(*inputs).double()
    # As close to the fp32 model as eager autocast itself is (the rewrite computes the
    # convolution in fp32), and within bf16 round-off of eager autocast.
    assert _rel(y, exact) <= 1.2 * _rel(ref, exact) + 2e-3, (_rel(y, exact), _rel(ref, exact))
    assert _rel(y, ref) <= 3e-2


@pytest.mark.parametrize("entry", negative(), ids=lambda e: e.name)
def test_autocast_negatives_stay_unrewritten(entry):
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 100, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, ref = _run(model, inputs)
    assert sum(lcsm_compile.counters["rewrite"].values()) == 0
    assert torch.equal(y, ref) or _rel(y, ref) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hyena_lm", "long_conv"])
def test_cuda_autocast_with_inductor(name):
    from lcsm_compile.zoo import ZOO

    entry = ZOO[name]
    model = entry.build().cuda()
    inputs = [x.cuda() for x in entry.make_inputs(model, 2, 300, torch.Generator().manual_seed(0))]
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm")
    with torch.no_grad():
        exact = model(*inputs).double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, ref = compiled(*inputs), model(*inputs)
    assert sum(lcsm_compile.counters["rewrite"].values()) == entry.expected_convs
    assert _rel(y, exact) <= 1.2 * _rel(ref, exact) + 2e-3, (_rel(y, exact), _rel(ref, exact))
    assert _rel(y, ref) <= 3e-2


def _rel_per_position(got, want):
    g, w = got.double(), want.double()
    return ((g - w).norm(dim=(0, 2)) / w.norm(dim=(0, 2)).clamp_min(1e-30)).max().item()


def test_decoder_built_under_autocast_follows_the_autocast_model():
    """Weights are cast once (constants of the step program); prefill and steps give the model
    under autocast, whatever autocast state they are called in."""
    from lcsm_compile.zoo import hyena_tiny

    model = hyena_tiny(max_len=128).eval()
    ids = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dec = lcsm_compile.decoder(model, ids[:, :5], max_len=128, inner_backend="eager")
        with torch.no_grad():
            ref = model(ids)
    with torch.no_grad():
        exact = model(ids)
    assert any(v.dtype == torch.bfloat16 and v.dim() == 2 for v in dec.program.frontier.values()
               if isinstance(v, torch.Tensor))  # the bf16 weights, cast once
    runs = []
    for ambient in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ambient):
            runs.append(torch.cat([dec.prefill(ids[:, :5])] + [dec.step(ids[:, t : t + 1]) for t in range(5, 40)], 1))
    assert torch.equal(runs[0], runs[1])
    y = runs[0]
    assert y.dtype == ref.dtype == torch.bfloat16
    assert _rel_per_position(y, ref[:, 4:]) <= 3e-2
    assert _rel(y, exact[:, 4:]) <= 1.2 * _rel(ref[:, 4:], exact[:, 4:]) + 2e-3
    dec_fp32 = lcsm_compile.decoder(model, ids[:, :5], max_len=128, inner_backend="eager")
    y32 = torch.cat([dec_fp32.prefill(ids[:, :5])] + [dec_fp32.step(ids[:, t : t + 1]) for t in range(5, 40)], 1)
    assert y32.dtype == torch.float32 and _rel(y32, exact[:, 4:]) <= 1e-5  # outside autocast: the fp32 model


@pytest.mark.gpu
def test_cuda_graph_decoder_under_autocast():
    from lcsm_compile.zoo import ZOO

    entry = ZOO["hyena_lm"]
    model = entry.build().cuda()
    x = entry.make_inputs(model, 1, 200, torch.Generator().manual_seed(2))[0].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dec = lcsm_compile.decoder(model, x[:, :16], max_len=200)
        with torch.no_grad():
            ref = model(x)
    assert dec._use_graphs
    y = torch.cat([dec.prefill(x[:, :16])] + [dec.step(x[:, t : t + 1]) for t in range(16, 200)], 1)
    assert dec._graphs is not None
    assert _rel_per_position(y, ref[:, 15:]) <= 3e-2
