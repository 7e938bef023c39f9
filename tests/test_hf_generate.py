"""HF `generate(use_cache=False)` on an LCSM speeds up unmodified with the lcsm backend (decode on).

A tiny HF wrapper (PreTrainedModel + GenerationMixin) of the zoo's Hyena LM: HF re-runs the model
on the whole growing sequence at every token; compiled with options={"decode": True}, each call
extends the previous one by a token, so only that position is computed (the step program).
"""
from __future__ import annotations

import time

import pytest
import torch

import lcsm_compile
from lcsm_compile.zoo import hyena_tiny

transformers = pytest.importorskip("transformers")
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402


class HyenaConfig(PretrainedConfig):
    model_type = "lcsm_test_hyena"

    def __init__(self, max_len: int = 1024, **kwargs):
        self.max_len = max_len
        super().__init__(**kwargs)


class HyenaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyenaConfig
    main_input_name = "input_ids"

    def __init__(self, config: HyenaConfig):
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lm = hyena_tiny(max_len=config.max_len)
        self.post_init()

    def _init_weights(self, module):  # the zoo model is initialised already
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.lm(input_ids))


def _model(max_len=1024):
    config = HyenaConfig(max_len=max_len, vocab_size=64, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return HyenaForCausalLM(config).eval()


def _generate(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=False,
                              attention_mask=torch.ones_like(ids))


def test_hf_generate_prefix_extension_matches_eager_and_computes_only_new_positions():
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    eager = _generate(_model(), ids, 40)
    assert eager.shape == (2, 46)
    model = _model()
    model.compile(backend="lcsm", options={"decode": True, "inner_backend": "eager", "max_len": 256})
    lcsm_compile.counters.clear()
    got = _generate(model, ids, 40)
    assert torch.equal(got, eager)
    c = lcsm_compile.counters["decode"]
    # first call: a static graph (runs as compiled); then one prefill of the dynamic graph; then steps
    assert c["served_graphs"] == 1 and c["serving_prefill_positions"] == 7
    assert c["serving_step_positions"] == 40 - 2


def test_served_outputs_equal_eager_full_outputs_and_other_calls_refill():
    model = _model().lm
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
def test_hf_generate_is_faster_with_the_backend():
    ids = torch.randint(1, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    n = 400
    eager_model = _model(max_len=512)
    _generate(eager_model, ids, 4)
    t0 = time.perf_counter()
    eager = _generate(eager_model, ids, n)
    t_eager = time.perf_counter() - t0
    model = _model(max_len=512)
    model.compile(backend="lcsm", options={"decode": True, "inner_backend": "eager", "max_len": 512})
    _generate(model, ids, 4)  # compiles (static, then dynamic graph)
    t0 = time.perf_counter()
    got = _generate(model, ids, n)
    t_ours = time.perf_counter() - t0
    assert torch.equal(got, eager)
    assert t_ours < t_eager, f"lcsm {t_ours:.2f}s vs eager {t_eager:.2f}s"
