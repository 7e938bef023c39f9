"""generate(): greedy equals an eager greedy loop token for token; seeded sampling is reproducible."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.runtime.generate import logits_of, sample_next
from lcsm_compile.zoo import ZOO

EAGER = {"inner_backend": "eager"}
LMS = [e for e in ZOO.values() if e.positive and e.kind == "lm"]


@torch.no_grad()
def eager_greedy(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("entry", LMS, ids=lambda e: e.name)
def test_greedy_equals_eager_loop(entry):
    model = entry.build()
    ids = entry.make_inputs(model, 3, 7, torch.Generator().manual_seed(0))[0]
    got = lcsm_compile.generate(model, ids, max_new_tokens=90, **EAGER)
    assert got.shape == (3, 97) and torch.equal(got[:, :7], ids)
    assert torch.equal(got, eager_greedy(model, ids, 90))


def test_sampling_is_reproducible_with_a_generator():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    ids = entry.make_inputs(model, 2, 5, torch.Generator().manual_seed(0))[0]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return lcsm_compile.generate(model, ids, 40, do_sample=True, generator=g, **kw, **EAGER)

    a, b, c = run(1, top_k=20, top_p=0.9, temperature=0.7), run(1, top_k=20, top_p=0.9, temperature=0.7), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 45) and int(a.max()) < model.vocab_size


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, False).tolist() == [2, 0]
    for _ in range(20):  # top_k=1 and a small top_p both leave only the argmax
        assert sample_next(logits, True, top_k=1, generator=g).tolist() == [2, 0]
        assert sample_next(logits, True, top_p=0.5, generator=g).tolist() == [2, 0]
    seen = {int(sample_next(logits, True, top_k=2, temperature=5.0, generator=g)[0]) for _ in range(200)}
    assert seen == {2, 3}


def test_eos_stops_and_pads():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    P, N = 4, 30
    ids = entry.make_inputs(model, 2, P, torch.Generator().manual_seed(3))[0]
    free = lcsm_compile.generate(model, ids, N, **EAGER)
    eos = int(free[0, P])  # row 0 ends at once; row 1 runs to its first eos or to the end
    got = lcsm_compile.generate(model, ids, N, eos_token_id=eos, **EAGER)
    hits = (free[1, P:] == eos).nonzero()
    n1 = int(hits[0]) + 1 if len(hits) else N
    assert got.shape == (2, P + n1)
    assert (got[0, P:] == eos).all()
    assert torch.equal(got[1], free[1, : P + n1])


class _TupleLM(nn.Module):
    """An LM returning (hidden, logits): logits_fn picks the second."""

    def __init__(self):
        super().__init__()
        self.inner = ZOO["hyena_lm"].build()
        self.vocab_size, self.max_len = self.inner.vocab_size, self.inner.max_len

    def forward(self, ids):
        logits = self.inner(ids)
        return logits.tanh(), logits


def test_logits_fn_and_output_structures():
    model = _TupleLM().eval()
    ids = torch.randint(0, model.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    got = lcsm_compile.generate(model, ids, 20, logits_fn=lambda out: out[1], **EAGER)
    assert torch.equal(got, eager_greedy(model.inner, ids, 20))
    x = torch.randn(2, 1, 5)
    assert logits_of(x).shape == (2, 5) and logits_of((x, 1)).shape == (2, 5)
    assert logits_of({"logits": x}).shape == (2, 5)
    with pytest.raises(TypeError, match="logits_fn"):
        logits_of(object())


def test_progress_bar_reports_tokens_per_second(capsys):
    lm = ZOO["hyena_lm"].build()
    ids = torch.randint(0, lm.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    lcsm_compile.generate(lm, ids, 10, progress=True, **EAGER)
    err = capsys.readouterr().err
    # tqdm redraws its line after each "\r"; the last draw is the closed bar: all 2 x 10 tokens
    # (unit_scale prints 20 as "20.0"), then elapsed<remaining and the rate ("?" if no time passed)
    final = err.rsplit("\r", 1)[-1]
    closed = r"lcsm generate: 100%\|.*\| 20(\.0)?/20(\.0)? \[[\d:]+<[\d:]+, ([\d.]+[kMG]?|\?)tok/s\]"
    assert re.search(closed, final), err


def test_decoders_are_cached_and_rebuilt_when_weights_change():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    ids = entry.make_inputs(model, 1, 5, torch.Generator().manual_seed(0))[0]
    lcsm_compile.counters.clear()
    a = lcsm_compile.generate(model, ids, 10, **EAGER)
    b = lcsm_compile.generate(model, ids, 8, **EAGER)
    assert lcsm_compile.counters["decode"]["decoders"] == 1 and torch.equal(a[:, :13], b)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    c = lcsm_compile.generate(model, ids, 10, **EAGER)
    assert lcsm_compile.counters["decode"]["decoders"] == 2
    assert torch.equal(c, eager_greedy(model, ids, 10))


def test_bad_arguments():
    model = ZOO["hyena_lm"].build()
    with pytest.raises(ValueError, match="input_ids"):
        lcsm_compile.generate(model, torch.randn(1, 4), 3)
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert torch.equal(lcsm_compile.generate(model, ids, 0), ids)
