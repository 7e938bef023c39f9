"""stripedhyena 0.2.2 (Together's StripedHyena / Evo-1 code, installed from PyPI) as a client:
compiled prefill vs its own stateless_forward, explain(), its own recurrent decoder, and our
decoder (the modal recurrence it picks, and the tiling when forced) vs the full forward, at several
lengths and batches."""
import copy
import warnings

import pytest
import torch

import lcsm_compile

pytest.importorskip("einops", reason="stripedhyena needs einops: pip install einops")
pytest.importorskip("stripedhyena.model", reason="stripedhyena 0.2.2 not installed: "
                    "pip install --no-deps stripedhyena==0.2.2 einops")

from thirdparty_models import (  # noqa: E402
    StripedHyenaLogits,
    stripedhyena_recurrent_logits,
    stripedhyena_tiny,
)

EAGER = {"inner_backend": "eager"}
VOCAB = 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ids(B, L, seed=0):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B,lengths", [(1, (1, 100)), (3, (37, 256))], ids=["B1", "B3"])
def test_compiled_prefill_matches_stateless_forward(B, lengths):
    # stripedhyena re-creates its time vector whenever L grows, so dynamo recompiles per length
    model = stripedhyena_tiny()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    for L in lengths:
        ids = _ids(B, L, seed=L)
        lcsm_compile.counters.clear()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback: every mixer must be rewritten
            got, _ = compiled(ids)
            want, _ = model.stateless_forward(model.embedding_layer.embed(ids))
            want = model.unembed.unembed(model.norm(want))
        assert _rel(got, want) <= 1e-5, L
        # a graph per length (above), each with both blocks' short FIR and long modal conv rewritten
        assert lcsm_compile.counters["rewrite"] == {"conv": 2, "fft": 2}, L


def test_explain_finds_every_mixer():
    model = stripedhyena_tiny(num_layers=3)
    report = lcsm_compile.explain(model, _ids(2, 100))
    assert report.ok, str(report)
    kinds = [(m.kind, m.strategy, m.channels, m.filter_length) for m in report.mixers]
    # per Hyena block: the short FIR on the 3 projections, then the long modal filter on x1*v
    assert kinds == [("conv", "short", 96, 3), ("fft", "modal", 32, report.fold_length)] * 3, str(report)
    assert all("state 8" in m.strategy_reason for m in report.mixers[1::2]), str(report)
    assert "decode strategy" in str(report) and "recurrence, state 8" in str(report)
    forced = lcsm_compile.explain(model, _ids(2, 100), modal_recurrence=False)
    assert [m.strategy for m in forced.mixers] == ["short", "long"] * 3, str(forced)
    assert "modal_recurrence=False" in forced.mixers[1].strategy_reason


def test_as_shipped_time_attribute():
    """stripedhyena keeps its time vector `filter.t` as a plain tensor attribute (not a buffer):
    capture reads it as module state from its dynamo source, so the filters fold."""
    model = stripedhyena_tiny(time_buffer=False)
    ids = _ids(2, 100)
    with torch.no_grad():
        model(ids)  # the attribute `t` now exists, as after any eager call
    report = lcsm_compile.explain(model, ids)
    assert report.ok and len(report.mixers) == 4, str(report)


@pytest.mark.parametrize("P", [2, 17, 64])
def test_its_own_recurrent_decoder_matches_stateless_forward(P):
    """The configuration is one stripedhyena decodes itself (the benchmark's baseline). Its prefill
    keeps the last short_filter_length - 1 = 2 inputs of the FIR without padding: prompts of one
    token leave its FIR state short, so its own decoder needs P >= 2 (ours does not)."""
    model = stripedhyena_tiny()
    ids = _ids(2, 80, seed=P)
    with torch.no_grad():
        want, _ = model(ids)
        got = stripedhyena_recurrent_logits(model, ids, P)
    assert _rel(got[:, P - 1 :], want[:, P - 1 :]) <= 1e-5


def _decode(dec, ids, P):
    out = [dec.prefill(ids[:, :P])]
    for t in range(P, ids.shape[1]):
        out.append(dec.step(ids[:, t : t + 1]))
    return torch.cat(out, 1)


@pytest.mark.parametrize("B", [1, 2])
def test_decoder_matches_full_forward(B):
    # stripedhyena's forward cuts its time vector `t` to the call's length, so a model last called
    # at L captures with a guard L' <= L and cannot fold its filters past L: the decoder is built
    # on a model that was not called yet, the reference and explain() run on copies.
    model = StripedHyenaLogits(stripedhyena_tiny())
    fresh, reference = copy.deepcopy(model), copy.deepcopy(model)
    ids = _ids(B, 100, seed=B)
    with torch.no_grad():
        want = reference(ids)
    from lcsm_compile.kernels import OnlineConv
    from lcsm_compile.kernels.modal import ModalRecurrence

    for strategy, opts, engine in (("modal", {}, ModalRecurrence),
                                   ("tiling", {"modal_recurrence": False}, OnlineConv)):
        dec = lcsm_compile.decoder(copy.deepcopy(fresh), ids[:, :16], max_len=128, inner_backend="eager", **opts)
        assert len(dec.program.engines) == 1 and isinstance(dec.program.engines[0], engine), strategy
        assert dec.program.engines[0].M == 2  # both layers' long convolutions in one engine
        assert all(c.strategy.name == ("modal" if engine is ModalRecurrence else "long") for c in dec.plan.long_convs)
        for P in (1, 17, 64):
            got = _decode(dec, ids, P)
            assert _rel(got, want[:, P - 1 :]) <= 1e-5, (strategy, P)


def test_compiled_prefill_under_bf16_autocast():
    """How StripedHyena runs in half precision: every mixer is still rewritten."""
    model = stripedhyena_tiny()
    ids = _ids(2, 100, seed=5)
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got, _ = compiled(ids)
        want, _ = model(ids)
    assert sum(lcsm_compile.counters["rewrite"].values()) == 4  # 2 blocks: short conv + long conv each
    assert _rel(got, want) <= 3e-2
