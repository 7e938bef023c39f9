"""Failures part way and inputs the decoder bakes in: after a prefill, step or served call that
fails inside the model, nothing runs on half a state; results changed in place by the caller are
not extended; inputs without a time axis must keep their value; generate's arguments."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.zoo import hyena_tiny
from lcsm_compile.zoo.spellings import PadConv1d

EAGER = {"inner_backend": "eager"}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = hyena_tiny(max_len=64).eval()
    ids = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    return model, ids, ref


def _cleared(err: BaseException) -> bool:
    return "state was cleared" in " ".join(getattr(err, "__notes__", ["state was cleared"]))


def test_failed_prefill_or_step_clears_the_state(tiny):
    model, ids, ref = tiny
    dec = lcsm_compile.decoder(model, ids[:, :8], max_len=32, **EAGER)
    dec.prefill(ids[:, :10])
    dec.step(ids[:, 10:11])
    with pytest.raises(IndexError) as info:  # an id past the vocabulary fails inside the embedding
        dec.prefill(ids[:, :5] + model.vocab_size)
    assert _cleared(info.value) and dec.position == 0
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(ids[:, 11:12])
    assert _rel(dec.prefill(ids[:, :12]), ref[:, 11:12]) <= 1e-5
    with pytest.raises(IndexError) as info:
        dec.step(ids[:, 12:13] + model.vocab_size)
    assert _cleared(info.value)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(ids[:, 12:13])
    dec.prefill(ids[:, :12])
    assert _rel(dec.step(ids[:, 12:13]), ref[:, 12:13]) <= 1e-5


def _served(model):
    return torch.compile(model, backend="lcsm", options={"decode": True, "inner_backend": "eager"})


@torch.no_grad()
def test_serving_after_a_failed_call_and_after_an_in_place_change(tiny):
    model, ids, _ = tiny
    fast = _served(model)
    for n in (10, 11, 12):
        fast(ids[:, :n].clone())
    bad = ids[:, :14].clone()
    bad[:, 13] = model.vocab_size  # the step at t = 13 fails after t = 12 has run
    with pytest.raises(Exception):  # noqa: B017 - dynamo may wrap the embedding's IndexError
        fast(bad)
    got = fast(ids[:, :13].clone())
    assert _rel(got, model(ids[:, :13])) <= 1e-5
    # a result written in place: the next call must not extend the zeroed prefix
    fast(ids[:, :20].clone()).zero_()
    assert _rel(fast(ids[:, :21].clone()), model(ids[:, :21])) <= 1e-5
    assert _rel(fast(ids[:, :22].clone()), model(ids[:, :22])) <= 1e-5


class _Gained(nn.Module):
    """A causal conv scaled by a per-channel gain passed as an input without a time axis."""

    def __init__(self):
        super().__init__()
        self.mix = PadConv1d(8, 64)

    def forward(self, x, gain):
        return self.mix(x) * gain


@torch.no_grad()
def test_inputs_without_a_time_axis():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Gained().eval()
    x, gain = torch.randn(2, 40, 8), torch.randn(8)
    dec = lcsm_compile.decoder(model, x[:, :8], gain, max_len=40, short_conv_max=4, **EAGER)
    dec.prefill(x[:, :10], gain)
    assert _rel(dec.step(x[:, 10:11], gain.clone()), model(x[:, :11], gain)[:, 10:11]) <= 1e-5  # equal value
    position = dec.position
    with pytest.raises(ValueError, match="no time axis"):
        dec.step(x[:, 11:12], gain * 2)
    changed = gain.clone()
    dec2 = lcsm_compile.decoder(model, x[:, :8], changed, max_len=40, short_conv_max=4, **EAGER)
    changed.mul_(2)  # the example's own object, changed in place after the build
    dec2.prefill(x[:, :10], gain)
    with pytest.raises(ValueError, match="no time axis"):
        dec2.step(x[:, 10:11], changed)
    assert dec.position == position
    assert _rel(dec.step(x[:, 11:12], gain), model(x[:, :12], gain)[:, 11:12]) <= 1e-5
    # serving: such a graph is not served, runs unchanged and says why
    fast = torch.compile(model, backend="lcsm", options={"decode": True, "short_conv_max": 4, **EAGER})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (10, 11, 12):
            assert _rel(fast(x[:, :n], gain), model(x[:, :n], gain)) <= 1e-5
    assert any("no time axis" in str(w.message) for w in caught)


@torch.no_grad()
def test_generate_needs_max_len_for_the_fed_positions_only(tiny):
    model, ids, _ = tiny  # the model's filters reach 64 positions
    long = torch.randint(0, model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    for P, N in ((60, 5), (64, 1)):
        want = long[:, :P]
        for _ in range(N):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(lcsm_compile.generate(model, long[:, :P], N, **EAGER), want)


@pytest.mark.parametrize("kwargs, match", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "temperature": -1.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": True, "top_k": -1}, "top_k"),
    ({"eos_token_id": []}, "eos_token_id"),
])
def test_generate_rejects_bad_arguments_before_building(tiny, kwargs, match):
    model, ids, _ = tiny
    before = lcsm_compile.counters["decode"]["decoders"]
    with pytest.raises(ValueError, match=match):
        lcsm_compile.generate(model, ids[:, :4], 3, **kwargs, **EAGER)
    assert lcsm_compile.counters["decode"]["decoders"] == before


def test_lengths_past_the_models_own_limit_say_so(tiny):
    model, ids, _ = tiny  # its filters reach 64 positions
    long = ids.repeat(1, 2)
    with pytest.raises(ValueError, match="model itself fails at max_len=69.*exceeds the filter's max_len 64"):
        lcsm_compile.generate(model, long[:, :10], 60, **EAGER)
    with pytest.raises(ValueError, match="model itself fails at max_len=65"):
        lcsm_compile.decoder(model, long[:, :65], max_len=65, **EAGER)
