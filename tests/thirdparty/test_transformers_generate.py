"""A Hugging Face style LCSM (`PreTrainedModel` + `GenerationMixin`, no KV cache) driven by
transformers' own `generate()`: with the body compiled by the lcsm backend, with our decoder
behind its forward, and against `lcsm_compile.generate`."""
import warnings

import pytest
import torch

import lcsm_compile

pytest.importorskip("transformers", reason="transformers not installed: pip install transformers")

from thirdparty_models import hf_hyena  # noqa: E402

EAGER = {"inner_backend": "eager"}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _prompt(B, P, seed=0):
    return torch.randint(1, 64, (B, P), generator=torch.Generator().manual_seed(seed))


def _hf_generate(model, ids, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on generation flags
        return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=False,
                              output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("B,P", [(1, 1), (3, 17)], ids=lambda v: str(v))
def test_transformers_generate_with_compiled_body(B, P):
    model = hf_hyena()
    ids = _prompt(B, P, seed=P)
    want = _hf_generate(model, ids, 12)
    eager = model.lm
    model.lm = torch.compile(eager, backend="lcsm", options=EAGER)  # recompiles once, then dynamic
    lcsm_compile.counters.clear()
    got = _hf_generate(model, ids, 12)
    assert sum(lcsm_compile.counters["rewrite"].values()) > 0
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert _rel(a, b) <= 1e-5


class DecoderBody(torch.nn.Module):
    """The LM body for a cache-less generate(): each call gets the whole sequence so far; when it
    extends the previous one by a token, only that token is stepped through our decoder. Returns
    the logits of the last position (all generate() reads)."""

    def __init__(self, lm, batch, max_len):
        super().__init__()
        self.lm, self.batch, self.max_len = lm, batch, max_len
        self.dec, self.seen = None, None
        self.calls = {"prefill": 0, "step": 0}

    def forward(self, input_ids):
        if self.dec is None:
            self.dec = lcsm_compile.decoder(self.lm, input_ids[:, : min(16, input_ids.shape[1])],
                                            max_len=self.max_len, inner_backend="eager")
        L = input_ids.shape[1]
        if self.seen is not None and L == self.seen.shape[1] + 1 and torch.equal(input_ids[:, :-1], self.seen):
            out = self.dec.step(input_ids[:, -1:])
            self.calls["step"] += 1
        else:
            out = self.dec.prefill(input_ids)
            self.calls["prefill"] += 1
        self.seen = input_ids
        return out


@pytest.mark.parametrize("B,P", [(1, 3), (2, 17)], ids=lambda v: str(v))
def test_transformers_generate_on_our_decoder(B, P):
    model = hf_hyena()
    ids = _prompt(B, P, seed=P)
    want = _hf_generate(model, ids, 20)
    model.lm = body = DecoderBody(model.lm, B, max_len=64)
    got = _hf_generate(model, ids, 20)
    assert body.calls == {"prefill": 1, "step": 19}
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert _rel(a, b) <= 1e-5


def test_lcsm_generate_matches_transformers_generate():
    model = hf_hyena()
    ids = _prompt(2, 9)
    want = _hf_generate(model, ids, 24).sequences
    got = lcsm_compile.generate(model, ids, max_new_tokens=24, inner_backend="eager")
    assert torch.equal(got, want)
