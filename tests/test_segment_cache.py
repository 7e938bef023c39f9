"""Decoder segments through inductor's FX-graph cache (runtime/segment_compile.py): a rebuilt
decoder reuses compiled segments, and two models of one architecture with different weights share
cache entries without sharing weights (the cache key describes constants by shape and dtype; a hit
binds them from the graph at hand). A wrong hit here would be a silent wrong answer."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters as dynamo_counters
from torch._inductor.utils import fresh_cache

import lcsm_compile
from lcsm_compile.zoo import hyena_tiny


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hyena_tiny(max_len=64).eval()


def _decoded(model, ids, prompt: int) -> torch.Tensor:
    dec = lcsm_compile.decoder(model, ids[:, :prompt], max_len=64, inner_backend="inductor")
    outs = [dec.prefill(ids[:, :prompt])] + [dec.step(ids[:, t : t + 1]) for t in range(prompt, ids.shape[1])]
    return torch.cat(outs, 1)


def test_models_with_other_weights_share_cache_entries_not_weights():
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(0))
    a, b = _model(0), _model(1)
    with torch.no_grad():
        want_a, want_b = a(ids)[:, 5:], b(ids)[:, 5:]
    assert (want_a - want_b).abs().max() > 1e-2  # the two models do differ
    with fresh_cache():
        dynamo_counters.clear()
        got_a = _decoded(a, ids, 6)
        misses = dynamo_counters["inductor"]["fxgraph_cache_miss"]
        assert misses > 0 and dynamo_counters["inductor"]["fxgraph_cache_hit"] == 0
        got_b = _decoded(b, ids, 6)  # same architecture and shapes: every segment a hit
        assert dynamo_counters["inductor"]["fxgraph_cache_miss"] == misses
        assert dynamo_counters["inductor"]["fxgraph_cache_hit"] == misses
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert ((got - want).norm() / want.norm()).item() <= 1e-5
