"""fold: the prefix-consistency check tolerates round-off, not length dependence; the filter
subgraph is evaluated with its intermediates freed, batch 1, and nothing large is cached."""
import math
import warnings

import pytest
import torch
from graph_capture import capture
from torch import nn

import lcsm_compile
from lcsm_compile.passes.fold import fold, prefix_allowance, prefix_error
from lcsm_compile.passes.match import match
from lcsm_compile.passes.modal import recognise_modal
from lcsm_compile.passes.rewrite import rewrite
from lcsm_compile.passes.seq_axis import seq_axis
from lcsm_compile.passes.verify import concrete_shape, verify
from lcsm_compile.settings import Settings
from lcsm_compile.zoo.hyena import HyenaLM

aten = torch.ops.aten


def verified(model, x, settings=None):
    settings = settings or Settings()
    cg = capture(model, x, dynamic=True)
    seq_axis(cg)
    proposals, _ = match(cg)
    mixers, rejections = verify(cg, proposals, settings)
    return cg, mixers, rejections


class PerturbedFilter(nn.Module):
    """FFT conv whose filter is a function of position (sliced from max_len buffers) plus
    `noise` times the channel's max|h| times cos(0.7 t + 0.37 L): a perturbation that moves with
    the total length L. noise 3e-5 is the size of fp32 round-off in a Hyena implicit MLP with sine
    frequency 14 (up to 6e-5 of a channel's max|h|, 2e-5 of its L2 norm, against an fp64
    evaluation); 1e-3 is a real length dependence."""

    def __init__(self, D=6, max_len=256, noise=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        t = torch.arange(max_len, dtype=torch.float32)
        # Oscillating and decaying, like an implicit filter: many taps near zero.
        base = torch.randn(D, 1, generator=g) * torch.sin(0.3 * t + torch.randn(D, 1, generator=g)) * torch.exp(-t / 80)
        self.k = nn.Parameter(base)
        self.register_buffer("pos", t)
        self.register_buffer("scale", base.abs().amax(1))
        self.noise = noise
        self.max_len = max_len

    def forward(self, x):  # (B, L, D)
        L = x.shape[1]
        k = self.k[:, :L] + self.noise * self.scale[:, None] * torch.cos(0.7 * self.pos[:L] + 0.37 * L)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y.transpose(1, 2)


def test_prefix_error_scales_with_the_channel_and_dtype():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(500, dtype=torch.float64)
    amp = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)[:, None]
    amp[3], amp[5] = 0.05, 1e-5  # a quiet channel, and one below the floor (1e-2 of the largest)
    h = amp * torch.cos(0.2 * t + torch.randn(8, 1, generator=g, dtype=torch.float64)) * torch.exp(-t / 100)
    noise = torch.randn(h.shape, generator=g, dtype=torch.float64)
    rms = h.norm(dim=1, keepdim=True) / math.sqrt(h.shape[1])
    err, _ = prefix_error(h + 1e-6 * rms * noise, h)
    assert err < 1e-5 < prefix_allowance(torch.float32)
    # judged against its own norm: 1e-3 of a quiet channel is a length dependence
    err, chan = prefix_error(h + 1e-3 * rms * noise * (torch.arange(8)[:, None] == 3), h)
    assert chan == 3 and err > prefix_allowance(torch.float32)
    # below the floor, against 1e-2 of the largest channel's norm (its round-off is set by the
    # magnitudes it was computed from)
    err, chan = prefix_error(h + 1e-3 * rms * noise * (torch.arange(8)[:, None] == 5), h)
    assert chan == 5 and err < 1e-5
    err, _ = prefix_error(h * (1 + 1e-3), h)
    assert err > prefix_allowance(torch.float32)
    assert prefix_error(h, h) == (0.0, 0)
    assert prefix_error(torch.zeros(2, 5), torch.zeros(2, 5))[0] == 0.0
    bad = h.clone()
    bad[1, 7] = float("nan")
    assert prefix_error(bad, h)[0] == math.inf
    # eps-aware: fp64 allows far less, half precision is capped (2048 eps would exceed the filter)
    assert prefix_allowance(torch.float64) < 1e-12
    assert 1e-4 < prefix_allowance(torch.float32) < 1e-3
    assert prefix_allowance(torch.bfloat16) == prefix_allowance(torch.float16) == 3e-2


def test_fold_accepts_round_off_between_lengths_rejects_length_dependence():
    x = torch.randn(2, 64, 6, generator=torch.Generator().manual_seed(1))
    # fp32 round-off size: the old check (elementwise rtol 1e-3, atol 1e-5 max|h|) rejected this.
    model = PerturbedFilter(noise=3e-5)
    cg, mixers, rejections = verified(model, x)
    assert len(mixers) == 1 and not rejections
    mx = mixers[0]
    short = mx.h.clone()
    kept, rejected = fold(cg, mixers, Settings())
    assert not rejected and kept[0].length == 256
    assert not torch.allclose(kept[0].h[:, :64].double(), short.double(), rtol=1e-3,
                              atol=1e-5 * float(kept[0].h.abs().max()))
    assert prefix_error(kept[0].h[:, :64], short)[0] < prefix_allowance(torch.float32)
    # A real length dependence of 1e-3: verify's own length check is off here, fold rejects.
    model = PerturbedFilter(noise=1e-3)
    cg, mixers, rejections = verified(model, x, Settings(verify=False))
    assert len(mixers) == 1 and not rejections
    kept, rejected = fold(cg, mixers, Settings(verify=False))
    assert not kept and len(rejected) == 1
    assert "filter depends on total length" in rejected[0].reason and "max_len=256" in rejected[0].reason


class LengthDependentFilter(nn.Module):
    """A filter that really depends on the total length L: divided by L, computed on
    linspace(0, 1, L) (lag l sits at l / (L - 1)), or cut at L / 2."""

    def __init__(self, how, D=4, max_len=256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = nn.Parameter(torch.randn(D, max_len, generator=g) * torch.exp(-torch.arange(max_len) / 60.0))
        self.w = nn.Parameter(torch.randn(D, 1, generator=g))
        self.register_buffer("pos", torch.arange(max_len, dtype=torch.float32))
        self.how, self.max_len = how, max_len

    def forward(self, x):
        L = x.shape[1]
        if self.how == "normalised":
            k = self.k[:, :L] * (64.0 / L)
        elif self.how == "linspace":
            s = self.pos[:L] / (L - 1)  # linspace(0, 1, L) (which dynamo would specialise)
            k = torch.sin(3 * self.w * s) * torch.exp(-4 * s)
        else:
            k = self.k[:, :L] * (self.pos[:L] < L / 2)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y.transpose(1, 2)


@pytest.mark.parametrize("how", ["normalised", "linspace", "half"])
def test_fold_rejects_filters_that_depend_on_the_total_length(how):
    x = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(0))
    settings = Settings(verify=False)  # verify's own length check off: fold's check alone
    cg, mixers, rejections = verified(LengthDependentFilter(how), x, settings)
    assert len(mixers) == 1 and not rejections
    kept, rejected = fold(cg, mixers, settings)
    assert not kept and "filter depends on total length" in rejected[0].reason


def _explain(model, *inputs, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lcsm_compile.explain(model, *inputs, **options)


def test_round_off_sized_perturbation_is_accepted_end_to_end():
    x = torch.randn(1, 64, 6, generator=torch.Generator().manual_seed(2))
    report = _explain(PerturbedFilter(noise=3e-5), x)
    assert not report.unsupported and len(report.mixers) == 1
    report = _explain(PerturbedFilter(noise=1e-3), x)
    assert not report.mixers
    assert any("filter depends on total length" in u.reason for u in report.unsupported), str(report)


def test_hyena_implicit_filter_with_sine_frequency_14_is_accepted():
    """The Hyena-153M filter (emb 33, order 64, w=14) at width 864: accepted at max_len 4096."""
    torch.manual_seed(0)
    model = HyenaLM(vocab_size=64, d_model=864, n_layer=1, max_len=4096, d_inner=64, filter_order=64,
                    emb_dim=33, w=14.0).eval()
    ids = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(0))
    report = _explain(model, ids, max_len=4096)
    assert not report.unsupported, str(report)
    assert report.fold_length == 4096 and {m.kind for m in report.mixers} >= {"fft"}


class ModalConv(nn.Module):
    """h = Re(r exp(t log p)) per channel (an exp over time, like StripedHyena), then a big
    positional intermediate that only the filter path uses, FFT conv with skip."""

    def __init__(self, D=4, n=2, max_len=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        p = torch.polar(0.8 + 0.15 * torch.rand(D, n, 1, generator=g), 2 * torch.rand(D, n, 1, generator=g))
        self.log_p = nn.Parameter(torch.view_as_real(p.log()))
        self.r = nn.Parameter(torch.randn(D, n, 1, 2, generator=g))
        self.D = nn.Parameter(torch.randn(D, generator=g))
        self.register_buffer("t", torch.arange(max_len, dtype=torch.float32))
        self.max_len = max_len

    def forward(self, x):
        L = x.shape[1]
        t = self.t[:L]
        h = (torch.view_as_complex(self.r) * torch.exp(torch.view_as_complex(self.log_p) * t)).real.sum(1)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(h, n=2 * L), n=2 * L)[..., :L]
        return (y + u * self.D[:, None]).transpose(1, 2)


def test_filter_evaluation_frees_intermediates_and_keeps_what_is_read():
    model = ModalConv()
    x = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0))
    cg, mixers, _ = verified(model, x)
    (mx,) = mixers
    fn = mx.fn
    leaves = {n for n in fn.leaves if n is not fn.region.u}
    exp_nodes = [n for n in fn.constant if n.target is aten.exp.default]
    assert exp_nodes and set(exp_nodes) <= set(fn.inspected)
    shape = [3, 4, 40]  # u = x.transpose(1, 2)
    assert mx.axis == 2 and list(concrete_shape(fn.region.u.meta["val"])) == shape
    shape = torch.Size([3, 4, 128])
    env = fn.evaluate_constants(shape)
    assert set(env) == leaves | set(fn.frontier), "only what the u-dependent nodes read survives"
    assert len(fn.frontier) < len(fn.constant) - 2
    full = fn.constants(shape)  # modal recognition's view: the exp nodes and their inputs too
    assert set(full) == leaves | set(fn.frontier) | set(fn.inspected)
    for n in fn.frontier:
        assert torch.equal(env[n], full[n]) if isinstance(env[n], torch.Tensor) else env[n] == full[n]
    # Applying with the evaluated constants is the same function as probing.
    u = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fn.apply(u, env), fn(u))
    # Probing caches the frontier only; fold drops the cache and does not cache the max_len values.
    assert fn._cache and all(set(e) == leaves | set(fn.frontier) for e in fn._cache.values())
    kept, rejected = fold(cg, mixers, Settings())
    assert not rejected and kept[0].length == 128 and not fn._cache


def test_modal_recognition_re_evaluates_after_rewrite_erased_the_filter():
    model = ModalConv()
    x = torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(0))
    cg, mixers, _ = verified(model, x)
    kept, _ = fold(cg, mixers, Settings())
    rewrite(cg, kept)
    (mx,) = kept
    exp_nodes = [n for n in mx.fn.constant if n.target is aten.exp.default]
    assert exp_nodes and all(n._erased and n.args == (None,) for n in exp_nodes)  # args nulled
    modal, why = recognise_modal(mx)
    assert modal is not None, why
    assert modal.state_size == 2 and not mx.fn._cache


class StaticBatchConv(nn.Module):
    """Ops sized by the captured batch inside the region (a view to (B * D, L + 1)): a batch-1
    probe cannot run."""

    def __init__(self, D=3, max_len=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = nn.Parameter(torch.randn(D, max_len, generator=g) * torch.exp(-torch.arange(max_len) / 10.0))
        self.max_len = max_len

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        u = x.transpose(1, 2)
        k = self.k[:, :L]
        z = torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L)
        z = z.reshape(B * D, L + 1).reshape(B, D, L + 1)
        y = torch.fft.irfft(z, n=2 * L)[..., :L]
        return y.transpose(1, 2)


@pytest.mark.parametrize("cls", [PerturbedFilter, StaticBatchConv])
def test_fold_probes_with_batch_one_when_it_can(cls, monkeypatch):
    model = cls()
    x = torch.randn(5, 30, model.k.shape[0], generator=torch.Generator().manual_seed(0))
    cg, mixers, rejections = verified(model, x)  # the batch, 5, is static in the graph
    assert len(mixers) == 1 and not rejections
    batches = []
    apply = type(mixers[0].fn).apply

    def spy(self, u, constants):
        batches.append(u.shape[0])
        return apply(self, u, constants)

    monkeypatch.setattr(type(mixers[0].fn), "apply", spy)
    kept, rejected = fold(cg, mixers, Settings())
    assert not rejected and kept[0].h.shape == (model.k.shape[0], model.max_len)
    h = kept[0].h  # its own storage, not a row of the (5, D, max_len) probe response
    assert h.untyped_storage().nbytes() == h.numel() * h.element_size()
    # one run per impulse: f(0) was exactly 0 wherever verify probed, so fold skips the zero probe
    assert mixers[0].offset_free
    if cls is PerturbedFilter:
        assert batches == [1]
    else:
        assert batches == [1, 5]  # tried at 1, fell back to the captured batch
    ref = model.k.detach() if cls is StaticBatchConv else None
    if ref is not None:
        assert torch.allclose(kept[0].h, ref, atol=1e-5)


class BiasedConv(nn.Module):
    """A causal FFT convolution plus a per-channel constant: f(0) = b, not 0."""

    def __init__(self, D=3, max_len=64):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.k = nn.Parameter(torch.randn(D, max_len, generator=g) * torch.exp(-torch.arange(max_len) / 10.0))
        self.b = nn.Parameter(torch.randn(D, 1, generator=g))
        self.max_len = max_len

    def forward(self, x):  # (B, L, D)
        L = x.shape[1]
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.k[:, :L], n=2 * L), n=2 * L)[..., :L]
        return (y + self.b).transpose(1, 2)


@pytest.mark.parametrize("cls", [BiasedConv, PerturbedFilter])
def test_fold_skips_the_zero_probe_only_without_an_offset(cls, monkeypatch):
    """The filter at max_len is f(delta) - f(0); f(0) is evaluated unless verify saw it exactly 0
    at every length it probed, and the filter is the same either way."""
    model = cls()
    x = torch.randn(2, 30, model.k.shape[0], generator=torch.Generator().manual_seed(2))
    cg, mixers, rejections = verified(model, x)
    assert len(mixers) == 1 and not rejections
    assert mixers[0].offset_free is (cls is PerturbedFilter)
    assert (mixers[0].bias is not None) is (cls is BiasedConv)
    runs = []
    apply = type(mixers[0].fn).apply

    def spy(self, u, constants):
        runs.append(u.shape)
        return apply(self, u, constants)

    monkeypatch.setattr(type(mixers[0].fn), "apply", spy)
    kept, rejected = fold(cg, mixers, Settings())
    assert not rejected and len(runs) == (2 if cls is BiasedConv else 1)
    cg2, mixers2, _ = verified(model, x)
    mixers2[0].offset_free = False  # the two-probe way
    assert torch.equal(kept[0].h, fold(cg2, mixers2, Settings())[0][0].h)
    assert torch.allclose(kept[0].h, model.k.detach(), atol=1e-5)
