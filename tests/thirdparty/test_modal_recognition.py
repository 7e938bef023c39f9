"""recognise_modal / choose_strategy on real filter subgraphs: StripedHyena's compute_filter, the
zoo's S4D kernels (H3), p ** t and real-exponential spellings, and filters that are not modal."""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.backend import report_listeners
from lcsm_compile.kernels.modal import ModalRecurrence, modal_impulse_response
from lcsm_compile.kernels.online_conv import OnlineConv
from lcsm_compile.passes.modal import choose_strategy, recognise_modal
from lcsm_compile.settings import Settings
from lcsm_compile.zoo import h3_tiny, hyena_tiny


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def accepted_mixers(model, *inputs, **options):
    """The verified, folded mixers of a model (what the decoder gets), in graph order."""
    reports = []

    def listen(rep, cg):
        reports.append(rep)

    report_listeners.append(listen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lcsm_compile.explain(model, *inputs, **options)
    finally:
        report_listeners.remove(listen)
    return [mx for rep in reports for mx in rep.accepted]


def accepted_mixers_static(model, *inputs):
    """As accepted_mixers, from a compile that keeps L static (explain marks it dynamic)."""
    from lcsm_compile.backend import lcsm_backend

    reports = []
    report_listeners.append(lambda rep, cg: reports.append(rep))
    try:
        compiled = torch.compile(model, dynamic=False,
                                 backend=functools.partial(lcsm_backend, options={"inner_backend": "eager"}))
        with torch.no_grad():
            compiled(*inputs)
    finally:
        report_listeners.pop()
    return [mx for rep in reports for mx in rep.accepted]


def _long(mixers):
    return [mx for mx in mixers if mx.kind == "fft"]


class PowFilterConv(nn.Module):
    """h = Re(sum_n r_n p_n ** t) spelled with pow (stripedhyena's precompute_filters), FFT conv."""

    def __init__(self, d=8, n=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        p = torch.polar(0.9 + 0.09 * torch.rand(d, n, 1, generator=g), 3 * torch.rand(d, n, 1, generator=g))
        self.poles = nn.Parameter(torch.view_as_real(p))
        self.residues = nn.Parameter(torch.randn(d, n, 1, 2, generator=g))
        self.d_model = d

    def forward(self, x):  # (B, L, D)
        L = x.shape[1]
        t = torch.arange(L, device=x.device)[None, None]
        h = (torch.view_as_complex(self.residues) * torch.view_as_complex(self.poles) ** t).real.sum(1)
        u = x.transpose(1, 2)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(h, n=2 * L), n=2 * L)[..., :L]
        return y.transpose(1, 2)

    def exact_filter(self, L):
        """The filter of the parameters, in fp64 (the reference for recognise_modal)."""
        p = torch.view_as_complex(self.poles.detach().double())
        r = torch.view_as_complex(self.residues.detach().double())
        return (r * p ** torch.arange(L, dtype=torch.float64)).real.sum(1)


class EmaConv(nn.Module):
    """h[t] = a exp(-alpha t): one real pole per channel, as a depthwise conv1d."""

    def __init__(self, d=6):
        super().__init__()
        self.alpha = nn.Parameter(torch.linspace(0.01, 0.2, d))
        self.a = nn.Parameter(torch.linspace(1.0, 2.0, d))
        self.d_model = d

    def forward(self, x):
        L = x.shape[1]
        t = torch.arange(L, device=x.device, dtype=x.dtype)
        h = self.a[:, None] * torch.exp(-self.alpha[:, None] * t)
        u = torch.nn.functional.pad(x.transpose(1, 2), (L - 1, 0))
        return torch.nn.functional.conv1d(u, h.flip(-1)[:, None], groups=x.shape[-1]).transpose(1, 2)

    def exact_filter(self, L):
        t = torch.arange(L, dtype=torch.float64)
        return self.a.detach().double()[:, None] * torch.exp(-self.alpha.detach().double()[:, None] * t)


def test_stripedhyena_filters_are_modal():
    pytest.importorskip("stripedhyena.model", reason="stripedhyena 0.2.2 (and einops) not installed")
    from thirdparty_models import stripedhyena_tiny

    model = stripedhyena_tiny()
    mixers = _long(accepted_mixers(model, torch.randint(0, 64, (2, 100))))
    assert len(mixers) == 2
    for mx, block in zip(mixers, model.blocks):
        modal, why = recognise_modal(mx)
        assert modal is not None, why
        assert modal.state_size == 8 and modal.channels == 32
        # stripedhyena forms exp(t log p) in fp32: at t ~ 1e3 its filter is ~1e-5 off its own
        # modal form, which the rounding bound accepts (and nothing much looser)
        assert modal.error <= modal.allowed <= 1e-4
        f = block.filter
        poles = torch.view_as_complex(f.poles.detach().double())[..., 0]
        assert torch.allclose(modal.poles, poles, atol=1e-6)
        # residues of close poles are ill-determined; the filter they make is not: against the
        # exact (fp64) filter of the model's own parameters, skip D included
        residues = torch.view_as_complex(f.residues.detach().double())[..., 0]
        exact = modal_impulse_response(poles, residues, f.D.detach().double(), mx.length)
        assert _rel(modal.impulse_response(mx.length), exact) <= 1e-5
        strategy = choose_strategy(mx, Settings())
        assert strategy.name == "modal" and "state 8" in strategy.reason
        assert choose_strategy(mx, Settings(modal_recurrence=False)).name == "long"


def test_h3_s4d_kernels_are_modal_and_shift_kernels_are_not():
    model = h3_tiny().eval()
    mixers = accepted_mixers(model, torch.randint(0, 64, (2, 100)))
    found = [recognise_modal(mx) for mx in mixers]
    modal = [m for m, _ in found if m is not None]
    assert len(mixers) == 4 and len(modal) == 2  # per layer: the shift SSM, then the diagonal SSM
    for m, mx, layer in zip(modal, mixers[1::2], model.layers):
        assert m.state_size == 8 and m.length == mixers[0].length and m.error <= m.allowed <= 1e-4
        # against the S4D kernel of the layer's own parameters, evaluated in fp64, and its D skip
        kernel = copy.deepcopy(layer.mixer.kernel).double()
        with torch.no_grad():
            exact = kernel(mx.length)
            exact[:, 0] += layer.mixer.D.double()
        assert _rel(m.impulse_response(mx.length), exact) <= 1e-5
    shift_reasons = [why for m, why in found if m is None]
    assert all("no exp / pow over time" in why for why in shift_reasons)


@pytest.mark.parametrize("model,n,real", [(PowFilterConv(), 3, False), (EmaConv(), 1, True)],
                         ids=["pow", "real_exp"])
def test_other_modal_spellings(model, n, real):
    (mx,) = accepted_mixers(model.eval(), torch.randn(2, 90, model.d_model))
    modal, why = recognise_modal(mx)
    assert modal is not None, why
    assert modal.state_size == n and modal.error <= modal.allowed <= 1e-4
    if real:
        assert modal.poles.imag.abs().max() == 0
    assert _rel(modal.impulse_response(mx.length), model.exact_filter(mx.length)) <= 1e-5


def test_non_modal_filters_say_why():
    mixers = _long(accepted_mixers(hyena_tiny().eval(), torch.randint(0, 64, (2, 100))))
    assert len(mixers) == 2
    for mx in mixers:
        modal, why = recognise_modal(mx)
        assert modal is None and "not a sum of" in why
        strategy = choose_strategy(mx, Settings())
        assert strategy.name == "long" and "not modal" in strategy.reason


def test_fla_filters_are_not_modal():
    pytest.importorskip("fla.modules", reason="flash-linear-attention not installed")
    from thirdparty_models import fla_model

    # fla's explicit conv is causal only at the length it runs at (its FFT size is fixed by the
    # filter): a dynamic-L capture is rightly refused, so take it from a static one.
    for kind, mixers_of in (("explicit", accepted_mixers_static), ("implicit", accepted_mixers)):
        (mx,) = mixers_of(fla_model(kind), torch.randn(2, 128, 16))
        modal, why = recognise_modal(mx)
        assert modal is None and "no exp / pow over time" in why, (kind, why)


def test_growing_pole_is_refused():
    model = EmaConv()
    with torch.no_grad():
        model.alpha[2] = -0.001  # |p| > 1
    (mx,) = accepted_mixers(model.eval(), torch.randn(1, 60, model.d_model))
    modal, why = recognise_modal(mx)
    assert modal is None and "outside the unit circle" in why


@pytest.mark.parametrize("P,L,B", [(0, 40, 1), (1, 63, 2), (37, 100, 3)], ids=lambda v: str(v))
def test_recognised_recurrence_matches_the_tiling(P, L, B):
    """The decode-time contract: the recurrence built from recognise_modal and the tiled online
    convolution on the folded filter give the same outputs on fresh random inputs."""
    pytest.importorskip("stripedhyena.model", reason="stripedhyena 0.2.2 (and einops) not installed")
    from thirdparty_models import stripedhyena_tiny

    mixers = _long(accepted_mixers(stripedhyena_tiny(), torch.randint(0, 64, (2, 100))))
    found = [recognise_modal(mx)[0] for mx in mixers]
    rec = ModalRecurrence([f.poles for f in found], [f.residues for f in found], [f.skip for f in found], B)
    tiled = OnlineConv(torch.stack([mx.h for mx in mixers]), B, L, backend="torch")
    u = torch.randn(len(mixers), B, mixers[0].channels, L, generator=torch.Generator().manual_seed(P))
    ys, yt = [], []
    for m in range(len(mixers)):
        ys.append([rec.prefill(m, u[m, ..., :P])])
        yt.append([tiled.prefill(m, u[m, ..., :P])])
    for t in range(P, L):
        for m in range(len(mixers)):
            ys[m].append(rec.step(m, u[m, ..., t])[..., None])
            yt[m].append(tiled.step(m, u[m, ..., t])[..., None])
        rec.advance()
        tiled.advance()
    for a, b in zip(ys, yt):
        assert _rel(torch.cat(a, -1), torch.cat(b, -1)) <= 1e-5
