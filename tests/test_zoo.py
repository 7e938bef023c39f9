"""The model zoo in eager mode: shapes, causality, prefix consistency, and the negatives' flaws."""
from __future__ import annotations

import inspect
import sys

import pytest
import torch

from lcsm_compile.zoo import ZOO, hyena_153m, negative, positive
from lcsm_compile.zoo.registry import ZooEntry

NAMES = list(ZOO)
POSITIVE = [e.name for e in positive()]
NONCAUSAL = [e.name for e in negative() if e.reason == "non-causal"]

_models: dict[str, torch.nn.Module] = {}


def model_of(name: str) -> torch.nn.Module:
    if name not in _models:
        _models[name] = ZOO[name].build()
    return _models[name]


def inputs(name: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    (x,) = ZOO[name].make_inputs(model_of(name), batch, length, g)
    return x


@torch.no_grad()
def run(name: str, x: torch.Tensor) -> torch.Tensor:
    return model_of(name)(x)


def perturb_from(name: str, x: torch.Tensor, t: int) -> torch.Tensor:
    """x with every position >= t replaced by fresh inputs."""
    fresh = inputs(name, x.shape[0], x.shape[1], seed=1)
    x2 = x.clone()
    x2[:, t:] = fresh[:, t:]
    return x2


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_registry_entries_are_consistent():
    assert len(positive()) >= 13 and len(negative()) == 5
    for name, e in ZOO.items():
        assert isinstance(e, ZooEntry) and e.name == name
        assert e.kind in ("lm", "seq")
        if e.positive:
            assert e.expected_convs >= 1 and e.reason is None
        else:
            assert e.expected_convs == 0 and e.reason
    reasons = {e.reason for e in negative()}
    assert reasons == {"non-causal", "filter depends on total length", "data-dependent filter"}


@pytest.mark.parametrize("name", NAMES)
def test_build_is_seeded_eval_and_deterministic(name):
    e = ZOO[name]
    state = torch.get_rng_state()
    a, b = e.build(), e.build()
    assert torch.equal(state, torch.get_rng_state()), "build must not consume the global RNG"
    assert not a.training and all(not m.training for m in a.modules())
    assert a.max_len >= 1000
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    for p in a.parameters():
        assert p.dtype in (torch.float32,)
    x = inputs(name, 2, 63)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in a.modules())


@pytest.mark.parametrize("L", [1, 63, 200])
@pytest.mark.parametrize("name", NAMES)
def test_runs_in_eager(name, L):
    e, model = ZOO[name], model_of(name)
    x = inputs(name, 2, L)
    y = run(name, x)
    if e.kind == "lm":
        assert x.dtype == torch.int64 and x.shape == (2, L)
        assert y.shape == (2, L, model.vocab_size)
    else:
        assert x.dtype == torch.float32 and x.shape == (2, L, model.d_model)
        assert y.shape == (2, L, model.d_model)
    assert y.dtype == torch.float32 and isinstance(y, torch.Tensor)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_docstrings_cite_the_paper(name):
    e, model = ZOO[name], model_of(name)
    module_doc = sys.modules[type(model).__module__].__doc__ or ""
    first_author = e.paper.split()[0]
    assert first_author in module_doc, f"{type(model).__module__} does not cite {e.paper}"
    assert "arXiv" in module_doc or "ICLR" in module_doc or "ICML" in module_doc
    assert inspect.getdoc(type(model))


@pytest.mark.parametrize("t", [1, 37, 150])
@pytest.mark.parametrize("name", POSITIVE)
def test_positive_is_causal(name, t):
    x = inputs(name, 2, 200)
    y, y2 = run(name, x), run(name, perturb_from(name, x, t))
    assert close(y[:, :t], y2[:, :t])
    assert not close(y[:, t:], y2[:, t:]), "the perturbation should change later outputs"


@pytest.mark.parametrize("P", [1, 63, 137])
@pytest.mark.parametrize("name", POSITIVE)
def test_positive_is_prefix_consistent(name, P):
    x = inputs(name, 2, 200)
    assert close(run(name, x[:, :P]), run(name, x)[:, :P])


@pytest.mark.parametrize("name", NONCAUSAL)
def test_noncausal_negatives_are_not_causal(name):
    x = inputs(name, 2, 200)
    t = 100
    y, y2 = run(name, x), run(name, perturb_from(name, x, t))
    assert (y[:, :t] - y2[:, :t]).abs().max() > 1e-3


def test_length_dependent_filter_is_causal_but_not_prefix_consistent():
    name = "neg_length_filter"
    x = inputs(name, 2, 200)
    y = run(name, x)
    assert close(y[:, :100], run(name, perturb_from(name, x, 100))[:, :100])
    assert (run(name, x[:, :100]) - y[:, :100]).abs().max() > 1e-3


def test_data_dependent_filter_is_not_a_fixed_filter():
    """Causal and prefix-consistent, so only linearity in the convolved input gives it away."""
    name = "neg_data_filter"
    x = inputs(name, 2, 200)
    y = run(name, x)
    assert close(y[:, :100], run(name, perturb_from(name, x, 100))[:, :100])
    assert close(run(name, x[:, :100]), y[:, :100])
    # An affine map has zero second difference; the data-dependent filter is quadratic in x.
    d = inputs(name, 2, 200, seed=2)
    second = run(name, x + d) + run(name, x - d) - 2 * y
    assert second.abs().max() > 1e-2
    fixed = "spelling_rfft_ortho"
    xs, ds = inputs(fixed, 2, 200), inputs(fixed, 2, 200, seed=2)
    second = run(fixed, xs + ds) + run(fixed, xs - ds) - 2 * run(fixed, xs)
    assert second.abs().max() < 1e-4


def test_hyena_153m_parameter_count():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = hyena_153m(max_len=4096)
    n = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    print(f"hyena_153m: {n / 1e6:.1f}M parameters")
    assert 140e6 < n < 170e6
    assert model.max_len == 4096 and hyena_153m.__defaults__ == (2**17,)
    assert len(model.layers) == 18 and model.d_model == 864
    with torch.no_grad():
        y = model(torch.randint(0, 50257, (1, 8)))
    assert y.shape == (1, 8, model.vocab_size) and torch.isfinite(y).all()
