"""`generate(model, input_ids, max_new_tokens, ...)`: greedy or sampled decoding on a Decoder.

    ids = lcsm_compile.generate(model, prompt, max_new_tokens=256)                 # greedy
    ids = lcsm_compile.generate(model, prompt, 256, do_sample=True, top_p=0.9,
                                generator=torch.Generator().manual_seed(0))        # reproducible

One prefill, then one step per token: O(L log^2 L) for the whole generation. Logits are read from
a tensor, the first element of a tuple, or `.logits` / ["logits"] of an HF ModelOutput or dict;
`logits_fn(output)` picks them otherwise. Tokens stay on the device: the only host syncs are the
end-of-sequence test (when `eos_token_id` is given) and the progress bar's count (when asked).
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

__all__ = ["generate", "sample_next", "logits_of"]

_decoders: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


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


def sample_next(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(B,) next tokens from (B, V) logits: argmax, or a draw after temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / max(float(temperature), 1e-6)
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
    if N == 0:
        return input_ids.clone()
    dec = cached_decoder(model, input_ids, P + N, options)
    ids = torch.empty(B, P + N, dtype=input_ids.dtype, device=input_ids.device)
    ids[:, :P] = input_ids
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    bar = _progress(N, B, progress)
    out = dec.prefill(input_ids)
    n = 0
    try:
        for n in range(1, N + 1):
            token = sample_next(logits_of(out, logits_fn), do_sample, temperature, top_k, top_p, generator)
            token = token.to(ids.dtype)
            if eos is not None:
                token = torch.where(finished, eos[0], token)
                finished |= torch.isin(token, eos)
            ids[:, P + n - 1] = token
            if bar is not None:
                bar.update(B)
            if n == N or (eos is not None and bool(finished.all())):
                break
            out = dec._step((token[:, None],))
            out = dec._structure(out)
    finally:
        if bar is not None:
            bar.close()
        dec.reset()
    return ids[:, : P + n]
