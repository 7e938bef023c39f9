"""`generate(model, input_ids, max_new_tokens, ...)`: greedy or sampled decoding on a Decoder.

    ids = lcsm_compile.generate(model, prompt, max_new_tokens=256)                 # greedy
    ids = lcsm_compile.generate(model, prompt, 256, do_sample=True, top_p=0.9,
                                generator=torch.Generator().manual_seed(0))        # reproducible

One prefill, then one step per token: O(L log^2 L) for the whole generation. Logits are read from
a tensor, the first element of a tuple, or `.logits` / ["logits"] of an HF ModelOutput or dict;
`logits_fn(output)` picks them otherwise. Tokens stay on the device. Greedy decoding of a model
whose only sequence input is the ids runs as a feed (Decoder._fed_step): the token's choice, the
end-of-sequence bookkeeping and the write of the next input are part of the step (on a GPU,
inside its CUDA graph), and the host only replays; it asks whether every sequence has ended once
every EOS_EVERY tokens (then trims what came after). Sampling, `logits_fn` and other inputs take
a token back through the host each step (the end-of-sequence test syncs each token). H200,
Hyena-153M to 4096: the feed issues a token in 70-85 µs of host time against 250-340 through
the host, at the same wall time per token (the GPU is the bound; its argmax, ~12 µs, costs the
same in the graph as out of it); what it removes is the per-token sync with `eos_token_id`.
Decoders are cached per model (batch, dtype, device, options, max_len >= needed), and rebuilt
when a weight changes in place (its version counter moves).
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..settings import Settings
from .decoder import Decoder

__all__ = ["generate", "sample_next", "logits_of", "GreedyFeed"]

_decoders: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()
EOS_EVERY = 16  # greedy feed: tokens between the host's "all ended?" checks (each one a sync)


def logits_of(output: Any, logits_fn: Callable | None = None) -> Tensor:
    """(B, V) logits of the last position from a model output."""
    if logits_fn is not None:
        logits = logits_fn(output)
    elif isinstance(output, Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(f"lcsm generate: cannot find logits in a {type(output).__name__}; pass logits_fn=")
    return logits[:, -1] if logits.dim() == 3 else logits


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise ValueError(f"lcsm generate: temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"lcsm generate: top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"lcsm generate: top_k must be >= 0 (0: no top-k), got {top_k}")


def sample_next(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(B,) next tokens from (B, V) logits: argmax, or a draw after temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    _check_sampling(temperature, top_k, top_p)
    scores = logits.float() / float(temperature)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _fingerprint(model: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def cached_decoder(model: torch.nn.Module, input_ids: Tensor, max_len: int, options: dict) -> Decoder:
    settings = Settings.from_options(options)
    key = (input_ids.shape[0], input_ids.dtype, input_ids.device, settings)
    entries = _decoders.setdefault(model, [])
    fp = _fingerprint(model)
    for i, (k, f, dec) in enumerate(entries):
        if k == key and dec.max_len >= max_len:
            if f == fp:
                return dec
            entries.pop(i)
            break
    dec = Decoder(model, (input_ids,), max_len, settings)
    entries.append((key, fp, dec))
    del entries[:-2]  # the decode state is O(max_len); keep few
    return dec


def _hold_ended(token: Tensor, finished: Tensor, eos: Tensor | None) -> Tensor:
    """Sequences that have ended keep emitting eos[0]; `finished` (B,) is updated in place."""
    if eos is None:
        return token
    token = torch.where(finished, eos[0], token)
    finished.logical_or_(torch.isin(token, eos))
    return token


class GreedyFeed:
    """The greedy choice as device work after each step (Decoder._fed_step): argmax of the last
    logits, held at EOS for sequences that have ended, written as the next input and into
    `tokens` at the next position (the program's device counter `t`)."""

    def __init__(self, dec: Decoder, dtype: torch.dtype, eos: Tensor | None):
        B, dev = dec.batch, dec.device
        self.key = self.key_of(dtype, eos)
        self.t, self.structure, self.eos = dec.program.t, dec._structure, eos
        self.inputs = [torch.zeros(B, 1, dtype=dtype, device=dev)]
        self.tokens = torch.zeros(B, dec.max_len + 1, dtype=dtype, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.buffers = (*self.inputs, self.tokens, self.finished)

    @staticmethod
    def key_of(dtype: torch.dtype, eos: Tensor | None) -> tuple:
        return dtype, None if eos is None else tuple(eos.tolist())

    def choose(self, logits: Tensor) -> Tensor:
        """(B,) tokens from (B, V) logits, EOS-padded; updates `finished`."""
        return _hold_ended(logits.argmax(-1).to(self.tokens.dtype), self.finished, self.eos)

    def __call__(self, outputs: list) -> None:
        token = self.choose(logits_of(self.structure(outputs)))
        self.inputs[0].copy_(token[:, None])
        self.tokens.index_copy_(1, self.t, token[:, None])


def _greedy_feed(dec: Decoder, dtype: torch.dtype, eos: Tensor | None) -> GreedyFeed:
    key = GreedyFeed.key_of(dtype, eos)
    found = next((f for f in dec._fed_graphs if f.key == key), None)  # its token graphs are captured
    return found if found is not None else GreedyFeed(dec, dtype, eos)


def _eos_end(ids: Tensor, P: int, n: int, eos: Tensor) -> int:
    """New tokens up to and including the one at which the last sequence ended (n if one has not)."""
    hit = torch.isin(ids[:, P : P + n], eos)
    if not bool(hit.any(1).all()):
        return n
    return int(hit.int().argmax(1).max()) + 1


@torch.no_grad()
def _generate_fed(dec: Decoder, input_ids: Tensor, ids: Tensor, N: int, eos: Tensor | None, bar) -> int:
    """Greedy: new tokens into ids[:, P:] through a feed; returns how many to keep."""
    P = input_ids.shape[1]
    feed = _greedy_feed(dec, ids.dtype, eos)
    feed.finished.zero_()
    token = feed.choose(logits_of(dec.prefill(input_ids)))
    ids[:, P] = token
    feed.inputs[0].copy_(token[:, None])
    n = 1
    if bar is not None:
        bar.update(dec.batch)
    while n < N:
        if eos is not None and n % EOS_EVERY == 1 and bool(feed.finished.all()):
            break
        dec._fed_step(feed)
        n += 1
        if bar is not None:
            bar.update(dec.batch)
    ids[:, P + 1 : P + n] = feed.tokens[:, P + 1 : P + n]
    return n if eos is None else _eos_end(ids, P, n, eos)


@torch.no_grad()
def _generate_host(dec: Decoder, input_ids: Tensor, ids: Tensor, N: int, eos: Tensor | None, bar,
                   logits_fn, sampling: tuple) -> int:
    """Each token through the host: sampled, picked by logits_fn, or for models of other inputs."""
    B, P = input_ids.shape
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    out = dec.prefill(input_ids)
    for n in range(1, N + 1):
        token = _hold_ended(sample_next(logits_of(out, logits_fn), *sampling).to(ids.dtype), finished, eos)
        ids[:, P + n - 1] = token
        if bar is not None:
            bar.update(B)
        if n == N or (eos is not None and bool(finished.all())):
            return n
        out = dec._structure(dec._step((token[:, None],)))
    return N


def _progress(total: int, batch: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total * batch, unit="tok", unit_scale=True, desc="lcsm generate", file=sys.stderr)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, logits_fn: Callable | None = None,
             progress: bool = False, generator: torch.Generator | None = None, **options) -> Tensor:
    """(B, P + N) token ids: the prompt and up to `max_new_tokens` new tokens (fewer when every
    sequence has produced `eos_token_id`; finished sequences are padded with it)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("lcsm generate: input_ids must be an integer tensor of shape (B, P)")
    B, P = input_ids.shape
    N = int(max_new_tokens)
    if P < 1 or N < 0:
        raise ValueError(f"lcsm generate: need a prompt (P={P}) and max_new_tokens >= 0 (got {N})")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    if eos_token_id is not None and torch.as_tensor(eos_token_id).numel() == 0:
        raise ValueError("lcsm generate: eos_token_id is an empty list; pass None for no end of sequence")
    if N == 0:
        return input_ids.clone()
    dec = cached_decoder(model, input_ids, max(P + N - 1, 2), options)  # the last token is never fed back
    ids = torch.empty(B, P + N, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :P] = input_ids
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1).to(ids.dtype)
    bar = _progress(N, B, progress)
    try:
        if not do_sample and logits_fn is None and len(dec.specs) == 1:
            n = _generate_fed(dec, input_ids, ids, N, eos, bar)
        else:
            n = _generate_host(dec, input_ids, ids, N, eos, bar, logits_fn,
                               (do_sample, temperature, top_k, top_p, generator))
    finally:
        if bar is not None:
            bar.close()
        dec.reset()
    return ids[:, : P + n]
