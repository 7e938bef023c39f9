"""How the decoder steps each long convolution: the modal recurrence where the filter is one
(H3's S4D kernel), the tiling otherwise or when forced; a recurrence that fails the decoder's own
check against the model falls back to the tiling; fold keeps short filters at their taps."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

import lcsm_compile
import lcsm_compile.passes.incrementalize as incrementalize
from lcsm_compile.backend import report_listeners
from lcsm_compile.kernels import OnlineConv
from lcsm_compile.kernels.modal import ModalRecurrence
from lcsm_compile.passes.modal import Strategy
from lcsm_compile.zoo import ZOO

EAGER = {"inner_backend": "eager"}
MAX_LEN = 160


def _decode(dec, x, P):
    out = [dec.prefill(x[:, :P])]
    for t in range(P, x.shape[1]):
        out.append(dec.step(x[:, t : t + 1]))
    return torch.cat(out, 1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _h3(batch=2, length=80, seed=0):
    entry = ZOO["h3_lm"]
    model = entry.build()
    x = entry.make_inputs(model, batch, length, torch.Generator().manual_seed(seed))[0]
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def test_h3_s4d_convs_step_by_their_recurrence_and_shift_convs_by_a_ring():
    model, x, ref = _h3()
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=MAX_LEN, **EAGER)
    # per layer: the shift-SSM filter (4 taps, FFT round-off not counted) and the S4D kernel
    assert [c.short for c in dec.plan.convs] == [True, False, True, False]
    assert [c.strategy.name for c in dec.plan.long_convs] == ["modal", "modal"]
    assert all("recurrence, state" in c.strategy.reason for c in dec.plan.long_convs)
    (eng,) = dec.program.engines
    assert isinstance(eng, ModalRecurrence) and eng.M == 2
    for P in (1, 37):
        assert _rel(_decode(dec, x, P), ref[:, P - 1 :]) <= 1e-5


def test_modal_recurrence_false_forces_the_tiling():
    model, x, ref = _h3(batch=1, seed=1)
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=MAX_LEN, modal_recurrence=False, **EAGER)
    assert [c.strategy.name for c in dec.plan.long_convs] == ["long", "long"]
    assert "modal_recurrence=False" in dec.plan.long_convs[0].strategy.reason
    (eng,) = dec.program.engines
    assert isinstance(eng, OnlineConv)
    assert _rel(_decode(dec, x, 7), ref[:, 6:]) <= 1e-5


def test_a_recurrence_that_disagrees_with_the_model_falls_back_to_the_tiling(monkeypatch):
    """Structure proposes, numbers confirm: a wrong modal form (residues scaled by 1.5, as a bad
    fit would give) is caught by the decoder's check against the model, not served."""
    real = incrementalize.choose_strategy

    def wrong(mixer, settings):
        s = real(mixer, settings)
        if s.modal is not None:
            bad = type(s.modal)(**{**vars(s.modal), "residues": s.modal.residues * 1.5})
            return Strategy("modal", s.reason, bad)
        return s

    monkeypatch.setattr(incrementalize, "choose_strategy", wrong)
    model, x, ref = _h3(batch=1, seed=2)
    with pytest.warns(UserWarning, match="modal recurrence disagreed with the model"):
        dec = lcsm_compile.decoder(model, x[:, :21], max_len=MAX_LEN, **EAGER)
    assert [c.strategy.name for c in dec.plan.long_convs] == ["long", "long"]
    assert all(isinstance(e, OnlineConv) for e in dec.program.engines)
    assert _rel(_decode(dec, x, 7), ref[:, 6:]) <= 1e-5


@contextmanager
def _accepted_mixers():
    """The verified (and folded) mixers of every compile inside the block."""
    mixers = []
    listen = lambda rep, cg: mixers.extend(rep.accepted)  # noqa: E731
    report_listeners.append(listen)
    try:
        yield mixers
    finally:
        report_listeners.remove(listen)


def test_fold_keeps_short_filters_at_their_taps():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    x = entry.make_inputs(model, 1, 50, torch.Generator().manual_seed(0))[0]
    with _accepted_mixers() as mixers, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lcsm_compile.explain(model, x, max_len=512)
    assert report.ok, str(report)
    short = [mx for mx in mixers if mx.filter_length <= 64]
    long = [mx for mx in mixers if mx.filter_length > 64]
    assert short and long
    assert all(mx.h.shape[-1] == mx.filter_length == 3 and mx.length == 512 for mx in short)
    assert all(mx.h.shape[-1] == 512 for mx in long)
    compiled = torch.compile(model, backend="lcsm", options={**EAGER, "max_len": 512})
    for L in (1, 63, 200):
        xl = entry.make_inputs(model, 1, L, torch.Generator().manual_seed(L))[0]
        with torch.no_grad():
            assert _rel(compiled(xl), model(xl)) <= 1e-5, L


def test_static_length_compile_keeps_short_filters_at_their_taps():
    """A first compile specialises L; its short filters too are stored at their taps (on CUDA a
    filter of L columns would be sent to an FFT convolution instead of the direct one)."""
    entry = ZOO["hyena_lm"]
    model = entry.build()
    x = entry.make_inputs(model, 2, 90, torch.Generator().manual_seed(3))[0]
    with _accepted_mixers() as mixers, torch.no_grad():
        compiled = torch.compile(model, backend="lcsm", options=EAGER)
        y, ref = compiled(x), model(x)
    short = [mx for mx in mixers if mx.filter_length <= 64]
    long = [mx for mx in mixers if mx.filter_length > 64]
    assert short and long
    assert all(mx.h.shape[-1] == mx.filter_length == 3 and mx.length == 90 for mx in short)
    assert all(mx.h.shape[-1] == 90 for mx in long)
    assert _rel(y, ref) <= 1e-5
