"""Small, seeded CPU configs of third-party LCSMs, built from their installed packages.

Nothing here copies their code: the factories only write configs and draw parameters.

- stripedhyena 0.2.2 (`pip install --no-deps stripedhyena==0.2.2 einops`): Evo-1's config
  (evo-1-131k-base: state_size 8, short_filter_length 3, column-split projections, filter groups 1,
  GELU MLP, tied embeddings) scaled down, with `attn_layer_idxs: []` (its attention blocks need
  flash_attn, which needs CUDA) and every dtype fp32 (its MLPs default to bf16).
- flash-linear-attention (`fla.modules.LongConvolution`, `ImplicitLongConvolution`): wrapped only
  where a test needs (B, L, D) in and out, which is their own layout already.
- a Hugging Face causal LM (`PreTrainedModel` + `GenerationMixin`) around the zoo's Hyena LM.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

SH_REASON = "stripedhyena 0.2.2 not installed: pip install --no-deps stripedhyena==0.2.2 einops"
FLA_REASON = "flash-linear-attention not installed: pip install --no-deps flash-linear-attention fla-core einops"


def evo1_config(hidden_size: int = 32, num_layers: int = 2, state_size: int = 8, vocab_size: int = 64,
                num_attention_heads: int = 4, max_seqlen: int = 1024, **overrides):
    """Evo-1's StripedHyena config (evo-1-131k-base_inference.yml) with Hyena blocks only."""
    from stripedhyena.utils import dotdict

    config = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_filters=hidden_size, max_sequence_len=max_seqlen,
        attn_layer_idxs=[], hyena_layer_idxs=list(range(num_layers)), num_layers=num_layers,
        short_filter_length=3, num_attention_heads=num_attention_heads, short_filter_bias=True,
        eps=1e-6, state_size=state_size, inner_size_multiple_of=16, smeared_gqa=False,
        make_vocab_size_divisible_by=8, proj_groups=1, hyena_filter_groups=1, split_k0=True,
        model_parallel_size=1, tie_embeddings=True, inner_mlp_size=None, final_norm=True,
        use_flash_attn=False, use_flash_rmsnorm=False, use_flash_depthwise=False, use_flashfft=False,
        column_split=True, inference_mode=True, prefill_style="fft", mlp_activation="gelu",
        max_seqlen=max_seqlen, max_batch_size=1, seqlen=max_seqlen,
        # Every block in fp32 (stripedhyena defaults its MLPs and norms' params_dtype to bf16).
        params_dtype=torch.float32, mlp_dtype=torch.float32, hyena_block_dtype=torch.float32,
    )
    config.update(overrides)
    return dotdict(config)


def draw_modal_parameters(model: nn.Module, generator: torch.Generator, min_abs: float = 0.8,
                          max_abs: float = 0.999) -> None:
    """Poles with |p| in [min_abs, max_abs] and spread phases, random residues and skips D.

    stripedhyena 0.2.2 initialises |p| ~ 1e-2, a filter that dies out in five taps (a short
    convolution); trained Evo poles sit near the unit circle, which is what decoding must handle."""
    from stripedhyena.model import ParallelHyenaFilter

    with torch.no_grad():
        for f in model.modules():
            if not isinstance(f, ParallelHyenaFilter):
                continue
            shape = f.poles.shape[:-1]  # (D, state_size, 1)
            mag = min_abs + (max_abs - min_abs) * torch.rand(shape, generator=generator)
            ang = math.pi * torch.rand(shape, generator=generator)
            f.poles.copy_(torch.stack([mag * torch.cos(ang), mag * torch.sin(ang)], -1))
            f.residues.copy_(torch.randn(f.residues.shape, generator=generator) / math.sqrt(shape[1]))
            f.D.copy_(torch.randn(f.D.shape, generator=generator))


def keep_time_as_buffer(model: nn.Module, length: int) -> None:
    """Register each filter's time vector `t` as a (non-persistent) buffer before the first call.

    stripedhyena keeps `t = arange(L)` as a plain tensor attribute, set on the first forward; the
    lcsm capture pass maps only parameters and buffers to module state, so the attribute becomes a
    "sequence" graph input and the long convolutions are reported as data-dependent filters.
    `update_time` keeps working on the buffer (it slices or replaces it by assignment)."""
    from stripedhyena.model import ParallelHyenaFilter

    for f in model.modules():
        if isinstance(f, ParallelHyenaFilter) and "t" not in f._buffers:
            if hasattr(f, "t"):
                delattr(f, "t")
            f.register_buffer("t", torch.arange(length)[None, None], persistent=False)


def stripedhyena_tiny(seed: int = 0, time_buffer: bool = True, **config) -> nn.Module:
    """A seeded, eval-mode, fp32 StripedHyena (Evo-1 shape, Hyena blocks only, CPU sized)."""
    from stripedhyena.model import StripedHyena

    cfg = evo1_config(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StripedHyena(cfg)
    draw_modal_parameters(model, torch.Generator().manual_seed(seed + 1))
    if time_buffer:
        keep_time_as_buffer(model, cfg.max_seqlen)
    return model.float().eval()


class StripedHyenaLogits(nn.Module):
    """ids -> logits: StripedHyena's forward returns (logits, inference_params)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]


def stripedhyena_recurrent_logits(model: nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """stripedhyena's own decoder: stateful prefill on ids[:, :P], then one token per call."""
    params = model.initialize_inference_params()
    out = [model(ids[:, :prompt_len], inference_params_dict=params)[0]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], inference_params_dict=params)[0])
    return torch.cat(out, 1)


class FlaLongConvModel(nn.Module):
    """An fla long convolution between two projections, so the mixer sits inside a model."""

    def __init__(self, kind: str, hidden_size: int = 16, max_len: int = 128):
        super().__init__()
        from fla.modules import ImplicitLongConvolution, LongConvolution

        self.d_model = hidden_size
        self.inp = nn.Linear(hidden_size, hidden_size)
        cls = {"explicit": LongConvolution, "implicit": ImplicitLongConvolution}[kind]
        self.conv = cls(hidden_size, max_len)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.gelu(self.conv(self.inp(x))) * x)


def fla_model(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FlaLongConvModel(kind, **kwargs).float().eval()


def hf_hyena(max_len: int = 1024, seed: int = 0):
    """A tiny Hugging Face causal LM (`PreTrainedModel` + `GenerationMixin`, no KV cache) whose
    body is the zoo's Hyena LM: what a user gets from `AutoModelForCausalLM` for an LCSM."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    from lcsm_compile.zoo import hyena_tiny

    class TinyHyenaConfig(PretrainedConfig):
        model_type = "lcsm_tiny_hyena"

        def __init__(self, vocab_size: int = 64, max_len: int = 1024, **kw):
            self.vocab_size, self.max_len = vocab_size, max_len
            kw.setdefault("use_cache", False)
            kw.setdefault("is_decoder", True)
            super().__init__(**kw)

    class TinyHyenaForCausalLM(PreTrainedModel, GenerationMixin):
        config_class = TinyHyenaConfig
        main_input_name = "input_ids"
        _supports_cache_class = False

        def __init__(self, config):
            super().__init__(config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.lm = hyena_tiny(max_len=config.max_len)

        def _init_weights(self, module):  # the zoo model initialises itself (seeded)
            pass

        def get_input_embeddings(self):
            return self.lm.embeddings

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return CausalLMOutput(logits=self.lm(input_ids))

        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            return {"input_ids": input_ids}

    config = TinyHyenaConfig(vocab_size=64, max_len=max_len, pad_token_id=0, eos_token_id=None,
                             bos_token_id=None)
    model = TinyHyenaForCausalLM(config).float().eval()
    model.generation_config.use_cache = False  # no KV cache: generate() feeds the whole sequence
    return model
