"""HF `generate(use_cache=False)` on an LCSM speeds up unmodified with the lcsm backend (decode on).

A tiny HF wrapper (PreTrainedModel + GenerationMixin; thirdparty_models.hf_hyena) of the zoo's
Hyena LM: HF re-runs the model on the whole growing sequence at every token; compiled with
options={"decode": True}, each call extends the previous one by a token, so only that position is
computed (the step program).
"""
from __future__ import annotations

import pytest
import torch

import lcsm_compile

pytest.importorskip("transformers")
# tests/thirdparty as a namespace package (tests/ is on sys.path, as for graph_capture)
from thirdparty.thirdparty_models import hf_hyena  # noqa: E402


def _generate(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=False,
                              attention_mask=torch.ones_like(ids))


def test_hf_generate_prefix_extension_matches_eager_and_computes_only_new_positions():
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    eager = _generate(hf_hyena(), ids, 40)
    assert eager.shape == (2, 46)
    model = hf_hyena()
    model.compile(backend="lcsm", options={"decode": True, "inner_backend": "eager", "max_len": 256})
    lcsm_compile.counters.clear()
    got = _generate(model, ids, 40)
    assert torch.equal(got, eager)
    c = lcsm_compile.counters["decode"]
    # first call: a static graph (runs as compiled); then one prefill of the dynamic graph; then steps
    assert c["served_graphs"] == 1 and c["serving_prefill_positions"] == 7
    assert c["serving_step_positions"] == 40 - 2


def test_served_outputs_equal_eager_full_outputs_and_other_calls_refill():
    model = hf_hyena().lm
    compiled = torch.compile(model, backend="lcsm", options={"decode": True, "inner_backend": "eager",
                                                              "max_len": 128})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 60), generator=g)
    seen = []
    lcsm_compile.counters.clear()
    with torch.no_grad():
        for n in (5, 6, 7, 9, 12, 30):  # extensions by 1, 1, 2, 3, 18
            out = compiled(ids[:, :n])
            seen.append(out)
            ref = model(ids[:, :n])
            assert out.shape == ref.shape
            assert ((out - ref).norm() / ref.norm()) < 1e-5
        before = [s.clone() for s in seen]
        other = ids.clone()
        other[:, 3] = (other[:, 3] + 1) % 64  # not an extension: a fresh prefill
        out = compiled(other[:, :31])
        ref = model(other[:, :31])
        assert ((out - ref).norm() / ref.norm()) < 1e-5
        out = compiled(other[:, :32])
        assert ((out - model(other[:, :32])).norm() / out.norm()) < 1e-5
    for s, b in zip(seen, before):  # results returned earlier never change
        assert torch.equal(s, b)
    c = lcsm_compile.counters["decode"]
    assert c["serving_prefill_positions"] == 6 + 31 and c["serving_step_positions"] == 1 + 2 + 3 + 18 + 1


@pytest.mark.slow
def test_hf_generate_long_run_computes_only_new_positions():
    """400 tokens (tile levels up to 256) equal eager HF generate; a second generate() from the
    same prompt is no extension of the last call (shorter): it prefills afresh, then steps."""
    ids = torch.randint(1, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    n = 400
    eager = _generate(hf_hyena(max_len=512), ids, n)
    model = hf_hyena(max_len=512)
    model.compile(backend="lcsm", options={"decode": True, "inner_backend": "eager", "max_len": 512})
    _generate(model, ids, 4)  # compiles (static, then dynamic graph)
    lcsm_compile.counters.clear()
    got = _generate(model, ids, n)
    assert torch.equal(got, eager)
    c = lcsm_compile.counters["decode"]
    # HF calls the model at lengths 8 .. 8 + n - 1, each served by the dynamic graph compiled above:
    # one prefill of the 8-token prompt, then one step per call (8 + n - 1 positions, not ~n^2 / 2)
    assert c["serving_prefill_positions"] == 8 and c["serving_step_positions"] == n - 1, dict(c)
