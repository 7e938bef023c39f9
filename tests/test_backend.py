"""The lcsm backend on the model zoo: parity with eager, exact rewrite counts, negatives untouched."""
import os
import warnings

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import lcsm_compile
from lcsm_compile.backend import LcsmCompileError, report_listeners
from lcsm_compile.zoo import ZOO, negative, positive

EAGER = {"inner_backend": "eager"}
# Pads to the next power of two above 2L: dynamo specializes L, so each length compiles anew.
SPECIALIZES_ON_LENGTH = {"spelling_rfft_forward"}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compile_run(model, inputs, options=EAGER, dynamic=False):
    lcsm_compile.counters.clear()
    if dynamic:
        torch._dynamo.maybe_mark_dynamic(inputs[0], 1)
    compiled = torch.compile(model, backend="lcsm", options=options)
    with torch.no_grad():
        return compiled, compiled(*inputs), model(*inputs)


def _rewrites():
    return sum(lcsm_compile.counters["rewrite"].values())


@pytest.mark.parametrize("L", [1, 63, 200, 1000])
@pytest.mark.parametrize("entry", positive(), ids=lambda e: e.name)
def test_positive_parity_and_counts(entry, L):
    model = entry.build()
    inputs = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
    reports = []

    def listen(report, cg):
        reports.append(report)

    report_listeners.append(listen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a positive model must compile without any fallback
            _, y, ref = _compile_run(model, inputs)
    finally:
        report_listeners.remove(listen)
    assert _rel(y, ref) <= 1e-5
    # a first compile specialises L: one graph, static at the call's length
    assert [(r.symbolic, r.length) for r in reports] == [(False, L)]
    # At L = 1 einsum lowers the Toeplitz product to a pointwise multiply: no mixer exists.
    expected = 0 if (L == 1 and entry.name == "spelling_toeplitz") else entry.expected_convs
    assert _rewrites() == expected, dict(lcsm_compile.counters["rewrite"])


@pytest.mark.parametrize("entry", positive(), ids=lambda e: e.name)
def test_dynamic_length_one_compile_serves_several(entry):
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 100, torch.Generator().manual_seed(0))
    compiled, y, ref = _compile_run(model, inputs, dynamic=True)
    assert _rel(y, ref) <= 1e-5
    assert _rewrites() == entry.expected_convs
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for L in (37, 150, 517):
        x = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
        with torch.no_grad():
            assert _rel(compiled(*x), model(*x)) <= 1e-5
    if entry.name not in SPECIALIZES_ON_LENGTH:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "recompiled for a new length"
        assert _rewrites() == entry.expected_convs


@pytest.mark.parametrize("L", [63, 200])
@pytest.mark.parametrize("entry", negative(), ids=lambda e: e.name)
def test_negative_untouched_with_reason(entry, L):
    model = entry.build()
    inputs = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, y, ref = _compile_run(model, inputs)
    assert torch.equal(y, ref) or _rel(y, ref) <= 1e-6
    assert _rewrites() == 0
    assert any(entry.reason in str(w.message) for w in caught), [str(w.message) for w in caught]
    report = lcsm_compile.explain(model, *inputs)
    assert not report.mixers
    assert any(entry.reason in u.reason for u in report.unsupported), str(report)
    assert entry.reason in str(report)


def test_strict_raises_on_negative():
    entry = ZOO["neg_same_conv1d"]
    model = entry.build()
    inputs = entry.make_inputs(model, 1, 50, torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="lcsm", options={**EAGER, "strict": True})
    with torch.no_grad(), pytest.raises(BackendCompilerFailed, match="non-causal") as info:
        compiled(*inputs)
    assert isinstance(info.value.inner_exception, LcsmCompileError)  # dynamo wraps what the backend raised


def test_filter_generator_runs_once_per_compile_not_per_call():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 63, torch.Generator().manual_seed(0))
    compiled, y0, _ = _compile_run(model, inputs)
    evaluations = lcsm_compile.counters["filter"]["evaluations"]
    assert evaluations > 0
    with torch.no_grad():
        for _ in range(3):
            compiled(*inputs)
    assert lcsm_compile.counters["filter"]["evaluations"] == evaluations
    # The folded filter is a constant of the compiled graph, computed from the implicit filter's
    # MLP weights: scaling them makes it stale, which the next call detects (version counters)
    # and answers with the unrewritten graph, warning, instead of the stale filter.
    filters = [p for n, p in model.named_parameters() if "filter" in n]
    assert filters
    with torch.no_grad():
        for p in filters:
            p.mul_(0.5)
        assert _rel(model(*inputs), y0) > 1e-4
        with pytest.warns(UserWarning, match="changed after compiling"):
            got = compiled(*inputs)
        assert _rel(got, model(*inputs)) < 1e-5
    assert lcsm_compile.counters["filter"]["evaluations"] == evaluations


def test_explain_positive_table():
    entry = ZOO["hyena_lm"]
    model = entry.build()
    report = lcsm_compile.explain(model, *entry.make_inputs(model, 1, 63, torch.Generator().manual_seed(0)))
    assert len(report.mixers) == 4 and report.ok
    kinds = sorted(m.kind for m in report.mixers)
    assert kinds == ["conv", "conv", "fft", "fft"]
    assert {m.filter_length for m in report.mixers if m.kind == "conv"} == {3}
    assert all(m.channels == 96 for m in report.mixers if m.kind == "conv")
    assert all("hyena.py" in m.node for m in report.mixers)
    text = str(report)
    assert "fft" in text and "hyena.py" in text


class _GraphBreakStack(torch.nn.Module):
    """Two zoo mixers with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a = ZOO["spelling_rfft_ortho"].build()
        self.b = ZOO["spelling_pad_conv1d"].build()

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


def test_graph_breaks_each_graph_rewritten():
    model = _GraphBreakStack()
    x = torch.randn(2, 80, 16)
    _, y, ref = _compile_run(model, (x,))
    assert _rel(y, ref) <= 1e-5
    assert _rewrites() == 2
    report = lcsm_compile.explain(model, x)
    assert report.graphs == 2 and len(report.mixers) == 2


def test_bad_options_list_valid_ones():
    model = ZOO["spelling_cumsum"].build()
    compiled = torch.compile(model, backend="lcsm", options={"max_lenn": 3})
    with pytest.raises(BackendCompilerFailed, match="valid options are") as info:
        compiled(torch.randn(1, 4, 16))
    assert isinstance(info.value.inner_exception, ValueError)


def test_grad_enabled_runs_unchanged_with_warning():
    model = ZOO["spelling_rfft_ortho"].build()
    x = torch.randn(2, 40, 16)
    compiled = torch.compile(model, backend="lcsm", options=EAGER)
    with pytest.warns(UserWarning, match="no_grad"):
        y = compiled(x)
    assert _rel(y, model(x)) <= 1e-6
    y.sum().backward()  # still differentiable: nothing was folded


def test_length_past_max_len_falls_back_with_a_clear_warning():
    entry = ZOO["spelling_rfft_ortho"]
    model = entry.build()
    x = torch.randn(1, 64, 16)
    compiled, _, _ = _compile_run(model, (x,), options={**EAGER, "max_len": 128}, dynamic=True)
    with torch.no_grad():
        x = torch.randn(1, 100, 16)
        assert _rel(compiled(x), model(x)) <= 1e-5
        # Past the folded length the filters do not exist: never a silent truncation.
        x = torch.randn(1, 200, 16)
        with pytest.warns(UserWarning, match="max_len=128"):
            y = compiled(x)
        assert _rel(y, model(x)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hyena_lm", "spelling_conv1d_k128"])
def test_inductor_inner_backend(name):
    entry = ZOO[name]
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 63, torch.Generator().manual_seed(0))
    _, y, ref = _compile_run(model, inputs, options={})
    assert _rel(y, ref) <= 1e-5
    assert _rewrites() == entry.expected_convs
    # Hyena's 3-tap convolutions reach inductor as shifted products; a 128-tap filter stays one op.
    inlined = lcsm_compile.counters["lowering"]["inlined_short_convs"]
    assert inlined == (entry.expected_convs // 2 if name == "hyena_lm" else 0)


def test_verify_off_still_checks_causality():
    pos, neg = ZOO["hyena_lm"], ZOO["neg_same_conv1d"]
    model = pos.build()
    inputs = pos.make_inputs(model, 2, 63, torch.Generator().manual_seed(0))
    _, y, ref = _compile_run(model, inputs, options={**EAGER, "verify": False})
    assert _rel(y, ref) <= 1e-5 and _rewrites() == pos.expected_convs
    model = neg.build()
    inputs = neg.make_inputs(model, 2, 63, torch.Generator().manual_seed(0))
    _, y, ref = _compile_run(model, inputs, options={**EAGER, "verify": False})
    assert _rewrites() == 0 and _rel(y, ref) <= 1e-6


@pytest.mark.parametrize("mode, want", [("max-autotune-no-cudagraphs", {"max_autotune": True}),
                                        ("reduce-overhead", {"triton.cudagraphs": True}), (None, None)])
def test_compile_mode_reaches_the_inner_inductor(monkeypatch, mode, want):
    """torch.compile(..., mode=...) means for the non-mixer parts what it means for inductor."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []

    def fake_compile_fx(gm, inputs, config_patches=None, **kw):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    entry = ZOO["hyena_lm"]
    model = entry.build()
    inputs = entry.make_inputs(model, 2, 40, torch.Generator().manual_seed(0))
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", mode=mode)  # torch.compile takes mode or options
    with torch.no_grad():
        y, ref = compiled(*inputs), model(*inputs)
    assert _rewrites() > 0 and _rel(y, ref) <= 1e-5
    assert seen and all((p or None) == want if want is None else want.items() <= p.items() for p in seen)


@pytest.mark.gpu
def test_reduce_overhead_prefill_on_gpu():
    entry = ZOO["hyena_lm"]
    model = entry.build().cuda()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(3):  # warm-up, record, replay
            inputs = [x.cuda() for x in entry.make_inputs(model, 2, 300, torch.Generator().manual_seed(seed))]
            y, ref = compiled(*inputs).clone(), model(*inputs)
            assert _rel(y, ref) <= 1e-4
    assert _rewrites() > 0


@pytest.mark.gpu
def test_reduce_overhead_prefill_dynamic_length_on_gpu():
    """A second length recompiles with a dynamic L, and each new length meets a new FFT size
    inside a CUDA-graph warm-up: its DFT tables and filter spectra must not be left in the
    graph's pool (the caches start empty, so that earlier tests cannot have filled them)."""
    from lcsm_compile.kernels.fftconv import clear_cache
    from lcsm_compile.kernels.fftconv.tables import _TABLES

    clear_cache()
    _TABLES.clear()
    entry = ZOO["hyena_lm"]
    model = entry.build().cuda()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", mode="reduce-overhead")
    with torch.no_grad():
        for L in (300, 517, 517, 517, 1000, 1000, 1000, 300):
            inputs = [x.cuda() for x in entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))]
            y, ref = compiled(*inputs).clone(), model(*inputs)
            assert _rel(y, ref) <= 1e-4, L
    assert _rewrites() > 0


@pytest.mark.slow
def test_inductor_dynamic_length_with_inlined_short_convs():
    """The shifted products need no static length: one dynamic inductor compile serves several."""
    entry = ZOO["hyena_lm"]
    model = entry.build()
    lcsm_compile.counters.clear()
    compiled = torch.compile(model, backend="lcsm", dynamic=True)
    for L in (63, 100):
        inputs = entry.make_inputs(model, 2, L, torch.Generator().manual_seed(L))
        with torch.no_grad():
            assert _rel(compiled(*inputs), model(*inputs)) <= 1e-5
    assert lcsm_compile.counters["lowering"]["inlined_short_convs"] > 0


def test_backend_name_works_from_a_source_tree_without_the_entry_point():
    """Not installed (no entry point), `import lcsm_compile` registers "lcsm" itself: checked in a
    fresh interpreter where the entry-point lookup finds nothing, by compiling a causal conv."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import importlib.metadata as md
found = md.entry_points
# as if the package were not installed: no dynamo backends found by entry point
md.entry_points = lambda **kw: md.EntryPoints(()) if kw.get("group") == "torch_dynamo_backends" else found(**kw)
import torch, lcsm_compile
def f(u, h):
    return lcsm_compile.causal_conv(u, h) * 2
u, h = torch.randn(2, 4, 50), torch.randn(4, 50)
got = torch.compile(f, backend="lcsm", options={"inner_backend": "eager"})(u, h)
ref = lcsm_compile.causal_conv_reference(u, h) * 2
print(float((got - ref).norm() / ref.norm()))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5
