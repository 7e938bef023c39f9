"""The decoder against the eager model: every position, every positive zoo model; refusals; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.runtime import IncrementalizeError
from lcsm_compile.zoo import ZOO, negative, positive

EAGER = {"inner_backend": "eager"}
MAX_LEN = 160  # > short_conv_max: zoo filters folded here are long (online engine, tiles of 4 levels)
TOTAL = 96  # positions checked per prompt: prefill of P, then TOTAL - P steps


def _inputs(entry, model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return entry.make_inputs(model, batch, length, g)[0]


def _rel_per_position(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.double().flatten(2) if got.dim() > 2 else got.double(), want.double()
    w = w.flatten(2) if w.dim() > 2 else w
    return ((g - w).norm(dim=(0, -1)) / w.norm(dim=(0, -1)).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("entry", positive(), ids=lambda e: e.name)
def test_every_position_matches_eager(entry, batch):
    model = entry.build()
    x = _inputs(entry, model, batch, TOTAL)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=MAX_LEN, **EAGER)  # 21: no model dim
    assert dec.batch == batch and dec.max_len == MAX_LEN
    n_long = len(dec.plan.long_convs)
    assert n_long + sum(c.short for c in dec.plan.convs) == entry.expected_convs
    for P in (1, 7, 64):
        outs = [dec.prefill(x[:, :P])]
        assert dec.position == P
        for t in range(P, TOTAL):
            outs.append(dec.step(x[:, t : t + 1]))
        got = torch.cat(outs, 1)
        assert got.shape == ref[:, P - 1 :].shape
        err = _rel_per_position(got, ref[:, P - 1 :])
        assert err <= 1e-5, f"{entry.name} B={batch} P={P}: max relative error {err:.2e}"


@pytest.mark.parametrize("entry", negative(), ids=lambda e: e.name)
def test_negative_models_refuse_with_reason(entry):
    model = entry.build()
    x = _inputs(entry, model, 2, 24)
    with pytest.raises(IncrementalizeError, match=entry.reason) as info:
        lcsm_compile.decoder(model, x, max_len=MAX_LEN, **EAGER)
    assert info.value.problems and all(node and reason for node, reason in info.value.problems)


class _CumMaxLM(nn.Module):
    """Causal, but its cummax along time has no step form the decoder knows."""

    def __init__(self):
        super().__init__()
        from lcsm_compile.zoo.spellings import PadConv1d

        self.emb, self.mix, self.head = nn.Embedding(32, 8), PadConv1d(8, 64), nn.Linear(8, 32)

    def forward(self, ids):
        return self.head(torch.cummax(self.mix(self.emb(ids)), dim=1).values)


def test_explain_says_whether_a_model_decodes():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    report = lcsm_compile.explain(model, _inputs(entry, model, 1, 40))
    assert report.decode == [] and "every graph has a step form" in str(report)
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    report = lcsm_compile.explain(_CumMaxLM().eval(), ids)
    assert report.ok and len(report.decode) == 1 and report.decode[0][0].startswith("aten.cummax.default")
    assert "decode refused" in str(report) and "acts along time" in str(report)
    with pytest.raises(IncrementalizeError, match="cummax"):  # what decoder() says about it
        lcsm_compile.decoder(_CumMaxLM().eval(), ids, max_len=32, **EAGER)


class _Mixer(nn.Module):
    """x (B, L, D) -> x + causal conv, with a position-wise extra chosen by `extra`."""

    def __init__(self, extra: str, d: int = 8, max_len: int = 256):
        super().__init__()
        self.extra, self.max_len, self.d_model = extra, max_len, d
        g = torch.Generator().manual_seed(0)
        self.h = nn.Parameter(torch.randn(d, max_len, generator=g) * torch.exp(-torch.arange(max_len) / 32.0))
        self.pos = nn.Parameter(torch.randn(max_len, d, generator=g))

    def forward(self, x):
        L = x.shape[1]
        u = x.transpose(1, 2)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L]
        y = y.transpose(1, 2)
        if self.extra == "positional":  # a learned positional table sliced to L: indexed at t
            return y + self.pos[:L]
        if self.extra == "arange":
            return y * torch.arange(L, device=x.device)[:, None].float().sqrt()
        if self.extra == "linspace":  # depends on L itself (and dynamo specializes L)
            return y * torch.linspace(0, 1, L, device=x.device)[:, None]
        if self.extra == "arange_over_length":  # depends on L itself
            return y * (torch.arange(L, device=x.device) / L)[:, None]
        if self.extra == "times_length":
            return y * L
        if self.extra == "norm_over_time":
            return nn.functional.layer_norm(y.transpose(1, 2), (L,)).transpose(1, 2)
        if self.extra == "shift":
            return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], 1)
        if self.extra == "mean_over_time":
            return y - y.mean(1, keepdim=True)
        return y


@pytest.mark.parametrize("extra", ["positional", "arange"])
def test_positional_values_are_indexed_at_t(extra):
    model = _Mixer(extra).eval()
    x = torch.randn(2, 80, 8)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :10], max_len=200, **EAGER)
    outs = [dec.prefill(x[:, :5])] + [dec.step(x[:, t : t + 1]) for t in range(5, 80)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 4:]) <= 1e-5


@pytest.mark.parametrize("extra, reason", [
    ("linspace", "fixed length the model was specialized to"),
    ("arange_over_length", "depends on the total length"),
    ("times_length", "length L as a number"),
    ("norm_over_time", "over time"),
    ("shift", "time"),
    ("mean_over_time", "averages over time"),
])
def test_not_position_wise_refuses(extra, reason):
    model = _Mixer(extra).eval()
    with pytest.raises(IncrementalizeError, match=reason):
        lcsm_compile.decoder(model, torch.randn(2, 12, 8), max_len=200, **EAGER)


@pytest.fixture(scope="module")
def hyena_decoder():
    torch._dynamo.reset()
    entry = ZOO["hyena_lm"]
    model = entry.build()
    x = _inputs(entry, model, 2, 40)
    with torch.no_grad():
        ref = model(x)
    return lcsm_compile.decoder(model, x[:, :8], max_len=40, **EAGER), x, ref


def test_bad_input_errors_leave_state_unchanged(hyena_decoder):
    dec, x, ref = hyena_decoder
    dec.reset()
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(x[:, :1])
    with pytest.raises(ValueError, match="max_len"):
        dec.prefill(torch.zeros(2, 41, dtype=torch.long))
    dec.prefill(x[:, :10])
    bad = [
        (ValueError, "batch", x[:1, 10:11]),
        (ValueError, "one position", x[:, 10:12]),
        (ValueError, "int64|float32", x[:, 10:11].float()),
        (ValueError, "rank", x[:, 10]),
    ]
    for err, match, arg in bad:
        with pytest.raises(err, match=match):
            dec.step(arg)
    with pytest.raises(ValueError, match="input"):
        dec.step(x[:, 10:11], x[:, 10:11])
    assert dec.position == 10
    outs = [dec.step(x[:, t : t + 1]) for t in range(10, 40)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 10:]) <= 1e-5
    with pytest.raises(RuntimeError, match="past max_len"):
        dec.step(x[:, :1])
    assert dec.position == 40
    # prefill again restarts; reset() forgets the prompt
    out = dec.prefill(x[:, :3])
    assert _rel_per_position(out, ref[:, 2:3]) <= 1e-5
    dec.reset()
    assert dec.position == 0
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step(x[:, :1])


def test_build_errors():
    entry = ZOO["long_conv"]
    model = entry.build()
    x = _inputs(entry, model, 2, 16)
    with pytest.raises(ValueError, match="longer than max_len"):
        lcsm_compile.decoder(model, x, max_len=8, **EAGER)
    with pytest.raises(ValueError, match="engine"):
        lcsm_compile.decoder(model, x, max_len=64, engine="magic", **EAGER)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):  # no position left to step
        lcsm_compile.decoder(model, x[:, :1], max_len=1, **EAGER)
    with pytest.raises(ValueError, match="unknown option"):
        lcsm_compile.decoder(model, x, max_len=64, nonsense=1)
    # beyond the model's own filter length: refused with the model's own reason, not truncated
    with pytest.raises(ValueError, match="model itself fails at max_len=4096.*exceeds the kernel's max_len"):
        lcsm_compile.decoder(model, x, max_len=4096, **EAGER)


def test_lazy_engine_matches():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    x = _inputs(entry, model, 2, 100)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :8], max_len=MAX_LEN, engine="lazy", **EAGER)
    outs = [dec.prefill(x[:, :20])] + [dec.step(x[:, t : t + 1]) for t in range(20, 100)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 19:]) <= 1e-5


@pytest.mark.slow
def test_inductor_step_program_cpu():
    entry = ZOO["spelling_cumsum"]
    model = entry.build()
    x = _inputs(entry, model, 2, 40)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :8], max_len=MAX_LEN, inner_backend="inductor")
    outs = [dec.prefill(x[:, :7])] + [dec.step(x[:, t : t + 1]) for t in range(7, 40)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 6:]) <= 1e-5


def test_one_copy_of_the_filters_when_engines_allocate():
    """A new step program's engines allocate their state with one copy of the long filters alive
    (at B = 8, L = 2^17 a second copy was what an H100 lacked): the folded filters the plan held
    are released before the engine is constructed, and each conv then uses the engine's copy."""
    import gc
    import weakref

    from lcsm_compile.runtime.lazy_graphed import GraphedLazyConv
    from lcsm_compile.runtime.step_program import StepProgram

    entry = ZOO["hyena_lm"]
    model = entry.build()
    x = _inputs(entry, model, 2, 40)
    dec = lcsm_compile.decoder(model, x[:, :8], max_len=MAX_LEN, **EAGER)
    old = [weakref.ref(c.filter) for c in dec.plan.long_convs]
    alive_at_build = []

    def engine(filters, *args):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in old))
        return GraphedLazyConv(filters, *args, backend="torch")

    prog = StepProgram(dec.plan, dec.device, engine_factory=engine, like=dec.program)
    assert alive_at_build == [0] * len(prog.engines) and len(prog.engines) >= 1
    for c in dec.plan.long_convs:
        eng, m = prog.where[c.index]
        assert c.filter.untyped_storage().data_ptr() == eng.h.untyped_storage().data_ptr()
    with torch.no_grad():
        ref = model(x)
    outs = [prog.prefill([x[:, :20]], 20)[0][:, -1:]] + [prog.step([x[:, t : t + 1]])[0] for t in range(20, 40)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 19:]) <= 1e-5
