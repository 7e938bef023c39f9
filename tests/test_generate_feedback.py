"""generate()'s greedy feed: the token choice, end-of-sequence bookkeeping and the next input as
device work after each step (inside the token's CUDA graph on a GPU), against an eager greedy
loop with the same end-of-sequence rule and against the path that takes each token through the
host (a `logits_fn` forces it)."""
from __future__ import annotations

import pytest
import torch

import lcsm_compile
from lcsm_compile.runtime import generate as gen
from lcsm_compile.zoo import ZOO

EAGER = {"inner_backend": "eager"}


@torch.no_grad()
def eager_greedy_eos(model, ids, n, eos: list[int] | None):
    """The reference: full forwards, finished rows padded with eos[0], stop once all have ended."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stop = torch.tensor(eos or [], dtype=ids.dtype, device=ids.device)
    for _ in range(n):
        token = model(ids)[:, -1].argmax(-1)
        if eos is not None:
            token = torch.where(finished, stop[0], token)
            finished |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], 1)
        if eos is not None and bool(finished.all()):
            break
    return ids


def _through_host(out):
    return out  # any logits_fn takes the host path


def _case(device: str, batch: int = 3, prompt: int = 5):
    entry = ZOO["hyena_lm"]
    model = entry.build().to(device)
    ids = entry.make_inputs(model, batch, prompt, torch.Generator().manual_seed(11))[0].to(device)
    return model, ids


def _check(model, ids, N, options):
    free = lcsm_compile.generate(model, ids, N, **options)
    P = ids.shape[1]
    assert torch.equal(free, eager_greedy_eos(model, ids, N, None))
    # eos ids that end the rows at different steps: row 0 early (before the first check after
    # the prompt's token), row 1 past an EOS_EVERY boundary, and a pair of ids as a list
    eos_sets = [[int(free[0, P + 2])], [int(free[1, P + gen.EOS_EVERY + 3])],
                [int(free[0, P + 1]), int(free[2, P + 30])], [int(free[0, P])]]
    for eos in eos_sets:
        before = lcsm_compile.counters["decode"]["fed_step_positions"]
        got = lcsm_compile.generate(model, ids, N, eos_token_id=eos, **options)
        fed = lcsm_compile.counters["decode"]["fed_step_positions"] - before
        want = eager_greedy_eos(model, ids, N, eos)
        assert torch.equal(got, want), eos
        host = lcsm_compile.generate(model, ids, N, eos_token_id=eos, logits_fn=_through_host, **options)
        assert torch.equal(host, want), eos
        # the feed ran steps past the end only up to the next check
        n = want.shape[1] - P
        assert n - 1 <= fed < n - 1 + gen.EOS_EVERY or fed == N - 1


def test_greedy_feed_matches_eager_loop_with_eos_on_cpu():
    model, ids = _case("cpu")
    before = lcsm_compile.counters["decode"]["fed_step_positions"]
    lcsm_compile.generate(model, ids, 40, **EAGER)
    assert lcsm_compile.counters["decode"]["fed_step_positions"] - before == 39
    _check(model, ids, 40, EAGER)


def test_greedy_feed_state_does_not_leak_between_calls():
    # the same cached decoder and feed: a call that ended at once, then one without eos, then a
    # shorter prompt of the same batch (a new decoder length is not needed: max_len covers it)
    model, ids = _case("cpu", batch=2, prompt=6)
    eos = int(lcsm_compile.generate(model, ids, 1, **EAGER)[0, -1])
    lcsm_compile.generate(model, ids, 20, eos_token_id=[eos], **EAGER)
    assert torch.equal(lcsm_compile.generate(model, ids, 20, **EAGER), eager_greedy_eos(model, ids, 20, None))
    short = ids[:, :3]
    assert torch.equal(lcsm_compile.generate(model, short, 20, **EAGER), eager_greedy_eos(model, short, 20, None))


@pytest.mark.gpu
def test_greedy_feed_in_cuda_graphs_matches_eager_loop():
    model, ids = _case("cuda")
    options = {"inner_backend": "inductor", "cuda_graphs": True}
    _check(model, ids, 48, options)
    # the decoder's own step() (its plain graphs) still agrees with the eager forward afterwards
    dec = gen.cached_decoder(model, ids, ids.shape[1] + 48 - 1, options)  # generate's: the last token is never fed
    assert dec._fed_graphs, "generate on a GPU should have captured the feed's token graphs"
    x = eager_greedy_eos(model, ids, 12, None)
    with torch.no_grad():
        ref = model(x)
    outs = [dec.prefill(x[:, :5])] + [dec.step(x[:, t : t + 1]) for t in range(5, x.shape[1])]
    got = torch.cat(outs, 1).double()
    want = ref[:, 4:].double()
    assert ((got - want).norm() / want.norm()).item() <= 1e-4
    dec.reset()
