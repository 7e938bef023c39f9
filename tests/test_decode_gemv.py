"""The decode segments' matrix products as reductions (passes/decode_gemv.py): the rewritten graph
computes what the original did, only where it should, and the decoder applies it on CUDA only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import lcsm_compile
from lcsm_compile.passes.decode_gemv import COMPILE_OPTIONS, decompose_gemv
from lcsm_compile.runtime.segment_compile import SegmentCompiler
from lcsm_compile.settings import Settings
from lcsm_compile.zoo import hyena_tiny

aten = torch.ops.aten


def _mlp(x, w1, b1, w2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2)  # an addmm and an mm


def _graph(rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    args = [torch.randn(rows, 1, 37, generator=g), torch.randn(61, 37, generator=g) / 6,
            torch.randn(61, generator=g), torch.randn(29, 61, generator=g) / 8]
    args = [a.to(dtype) for a in args]
    return make_fx(_mlp)(*args), args


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_products_become_reductions_with_the_same_values(rows, seed):
    gm, args = _graph(rows, torch.float32, seed)
    want = gm(*args)
    assert decompose_gemv(gm, max_rows=4) == 2
    assert aten.mm.default not in _targets(gm) and aten.addmm.default not in _targets(gm)
    got = gm(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= 1e-6


@pytest.mark.parametrize("splits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_split_reductions_have_the_same_values(splits, rows):
    g = torch.Generator().manual_seed(10 * splits + rows)
    x, w, b = torch.randn(rows, 36, generator=g), torch.randn(50, 36, generator=g) / 6, torch.randn(50, generator=g)
    # F.linear: the weight reaches addmm transposed, as a model's does
    gm = make_fx(lambda x, w, b: (F.linear(x, w, b), torch.mm(x[:, :35], w.t()[:35])))(x, w, b)
    want = gm(x, w, b)
    assert decompose_gemv(gm, max_rows=4, splits=splits) == 2
    sums = [n.args[1] for n in gm.graph.nodes if n.target is aten.sum.dim_IntList]
    assert sums.count([2]) == 1 and len(sums) == 3  # K = 36 split; K = 35 does not divide: one sum
    for got, ref in zip(gm(x, w, b), want, strict=True):
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-6
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415 - what the decode segments do

    for got, ref in zip(compile_fx(gm, [x, w, b])(x, w, b), want, strict=True):
        assert ((got - ref).norm() / ref.norm()).item() <= 1e-6
    with pytest.raises(ValueError, match="decode_gemv_splits"):
        Settings.from_options({"decode_gemv_splits": 0})
    with pytest.raises(ValueError, match="decode_pdl"):
        Settings.from_options({"decode_pdl": 1})


def test_half_precision_products_accumulate_in_fp32():
    gm, args = _graph(1, torch.float16, 2)
    ref = _mlp(*[a.double() for a in args])
    assert decompose_gemv(gm, max_rows=1) == 2
    got = gm(*args)
    assert got.dtype == torch.float16
    assert ((got.double() - ref).norm() / ref.norm()).item() <= 2e-3


def test_more_rows_than_allowed_or_scaled_products_are_left_alone():
    gm, args = _graph(5, torch.float32, 3)
    assert decompose_gemv(gm, max_rows=4) == 0
    assert decompose_gemv(gm, max_rows=0) == 0
    scaled = make_fx(lambda b, x, w: torch.addmm(b, x, w, beta=0.5))(
        torch.randn(7), torch.randn(1, 5), torch.randn(5, 7))
    assert decompose_gemv(scaled, max_rows=8) == 0
    assert aten.addmm.default in _targets(scaled)


def test_option_is_validated_and_cpu_decoders_keep_their_products():
    with pytest.raises(ValueError, match="decode_gemv_rows"):
        Settings.from_options({"decode_gemv_rows": -1})
    model = hyena_tiny(max_len=64).eval()
    ids = torch.randint(0, model.vocab_size, (1, 8))
    dec = lcsm_compile.decoder(model, ids, max_len=64, inner_backend="eager", decode_gemv_rows=8)
    assert dec.program.compiler.gemv_rows == 0  # CPU: cuBLAS-free GEMV reductions are a CUDA-only win
    assert any(aten.addmm.default in _targets(fn) for fn in dec.program.fns)


@pytest.mark.parametrize("rows", [1, 3])
def test_products_become_gemv_calls_with_the_same_values(rows):
    gm, args = _graph(rows, torch.float32, 4)
    want = gm(*args)
    assert decompose_gemv(gm, max_rows=8, kernel="triton") == 2
    assert _targets(gm).count(torch.ops.lcsm.gemv.default) == 2
    assert aten.mm.default not in _targets(gm) and aten.addmm.default not in _targets(gm)
    got = gm(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    # inductor compiles the graph with the calls as externs (here on CPU: the torch fallback)
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(gm, args)
    out = compiled(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert ((out - want).norm() / want.norm()).item() <= 1e-6


def test_wider_products_become_gemv_calls_only_in_their_row_range():
    """The segment compiler's second rewrite (decode_gemv_triton_rows): products of more rows than
    the reductions take, up to the limit, become lcsm::gemv calls; 1-row ones are left alone."""
    for rows, want_calls in ((1, 0), (3, 2), (8, 2), (9, 0)):
        gm, args = _graph(rows, torch.float32, rows)
        want = gm(*args)
        assert decompose_gemv(gm, max_rows=8, kernel="triton", min_rows=2, pdl=True) == want_calls
        calls = [n for n in gm.graph.nodes if n.target is torch.ops.lcsm.gemv.default]
        assert len(calls) == want_calls and all(n.args[3] is True for n in calls)
        got = gm(*args)
        assert ((got - want).norm() / want.norm()).item() <= 1e-6


def test_inductor_decoder_with_gemv_calls_matches_eager(monkeypatch):
    """What a GPU's segment compiler does at B = 3 (reductions for one row, lcsm::gemv calls for
    2-8), forced on a CPU: the step program's products become the op (its torch fallback here),
    inductor compiles the segments around it, and the decoder still equals the model."""
    model = hyena_tiny(max_len=64).eval()
    ids = torch.randint(0, model.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    gpu_like = SegmentCompiler(inductor=True, gemv_rows=1, gemv_triton_rows=8)
    monkeypatch.setattr(SegmentCompiler, "for_device", classmethod(lambda cls, device, settings=None: gpu_like))
    lcsm_compile.counters.clear()
    dec = lcsm_compile.decoder(model, ids[:, :5], max_len=64, inner_backend="inductor")
    assert lcsm_compile.counters["decode"]["gemv_kernels"] > 0
    assert lcsm_compile.counters["decode"]["gemv_reductions"] == 0  # no one-row product at B = 3
    got = torch.cat([dec.prefill(ids[:, :5])] + [dec.step(ids[:, t : t + 1]) for t in range(5, 40)], 1)
    assert ((got - ref[:, 4:]).norm() / ref[:, 4:].norm()).item() <= 1e-5


def test_gemv_triton_rows_option():
    assert Settings().decode_gemv_triton_rows == 8
    for bad in (-1, 9, 2.0):
        with pytest.raises(ValueError, match="decode_gemv_triton_rows"):
            Settings.from_options({"decode_gemv_triton_rows": bad})
    cpu = SegmentCompiler.for_device(torch.device("cpu"), Settings())
    assert cpu.gemv_triton_rows == 0  # a CUDA-only kernel choice


def test_gemv_kernel_option():
    assert Settings.from_options({"decode_gemv_kernel": "triton"}).decode_gemv_kernel == "triton"
    with pytest.raises(ValueError, match="decode_gemv_kernel"):
        Settings.from_options({"decode_gemv_kernel": "cublas"})
    with pytest.raises(ValueError, match="kernel must be"):
        decompose_gemv(_graph(1, torch.float32, 0)[0], max_rows=1, kernel="cublas")
    with pytest.raises(ValueError, match="inline_short_taps"):
        Settings.from_options({"inline_short_taps": -1})


def test_segment_compiler_keeps_only_what_the_device_can_use():
    s = Settings.from_options({"decode_gemv_rows": 4, "decode_pdl": True, "decode_gemv_splits": 2})
    cpu = SegmentCompiler.for_device(torch.device("cpu"), s)
    assert (cpu.gemv_rows, cpu.pdl, cpu.gemv_splits) == (0, False, 2)
    eager = SegmentCompiler.for_device(torch.device("cpu"), s.replace(inner_backend="eager"))
    assert cpu.inductor and not eager.inductor
    assert cpu.inductor_options(reductions=0) == {}
    gpu_like = SegmentCompiler(gemv_rows=4, pdl=True)  # what for_device gives an sm90 GPU
    assert gpu_like.inductor_options(reductions=3) == {**COMPILE_OPTIONS, "triton.enable_pdl": True}
    assert gpu_like.inductor_options(reductions=0) == {"triton.enable_pdl": True}
    assert SegmentCompiler(gemv_rows=4, gemv_kernel="triton").inductor_options(reductions=3) == {}


def test_persistent_choices_widen_only_static_row_reductions(monkeypatch):
    """decode_persistent_k: row (INNER) reductions of a static K up to the limit are persistent;
    others get inductor's own answer (which needs a graph: not reached here)."""
    import sympy  # noqa: PLC0415
    from torch._inductor import config as inductor_config  # noqa: PLC0415
    from torch._inductor.runtime.hints import ReductionHint  # noqa: PLC0415

    from lcsm_compile.runtime.segment_compile import persistent_choices  # noqa: PLC0415

    class Features:
        def __init__(self, k, hint=ReductionHint.INNER):
            self.reduction_numel, self.hint = k, hint

        def get_reduction_hint(self):
            return self.hint

    choices = persistent_choices(4096)
    assert choices.should_use_persistent_reduction(Features(sympy.Integer(1728)), False)
    assert choices.should_use_persistent_reduction(Features(4096), False)
    base_called = []

    def base(features, cooperative_reduction):
        base_called.append(features.reduction_numel)
        return False

    from torch._inductor.choices import InductorChoices  # noqa: PLC0415

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(base))
    assert not choices.should_use_persistent_reduction(Features(sympy.Integer(8192)), False)
    assert not choices.should_use_persistent_reduction(Features(sympy.Symbol("s0")), False)
    assert not choices.should_use_persistent_reduction(Features(1728, ReductionHint.OUTER), False)
    assert not choices.should_use_persistent_reduction(Features(1728), True)  # cooperative
    with inductor_config.patch({"triton.persistent_reductions": False}):
        assert not choices.should_use_persistent_reduction(Features(1728), False)
    assert len(base_called) == 5
    s = Settings.from_options({"decode_persistent_k": 4096})
    assert SegmentCompiler.for_device(torch.device("cpu"), s).persistent_k == 0  # CPU: no Triton reductions
    key = SegmentCompiler(persistent_k=4096).inductor_options(reductions=0)["post_grad_custom_post_pass"]
    assert key.uuid() == "lcsm.persistent_k=4096"
    with inductor_config.patch({"post_grad_custom_post_pass": key}):  # a pass set already: no cache
        assert SegmentCompiler(persistent_k=4096).inductor_options(reductions=0) == {"fx_graph_cache": False}
    with pytest.raises(ValueError, match="decode_persistent_k"):
        Settings.from_options({"decode_persistent_k": -1})


def test_a_compile_that_fails_under_the_shape_env_is_compiled_as_before(monkeypatch):
    """The tracing context that lets inductor cache segments is an optimisation (written against
    torch 2.13 here; the GPU host runs 2.11): should it fail, the segment compiles without it."""
    import contextlib

    from lcsm_compile.runtime import segment_compile

    @contextlib.contextmanager
    def broken():
        raise RuntimeError("no shape env here")
        yield

    monkeypatch.setattr(segment_compile, "_static_shape_context", broken)
    gm, args = _graph(3, torch.float32, 1)
    want = gm(*args)
    lcsm_compile.counters.clear()
    out = SegmentCompiler(inductor=True)(gm, args)(*args)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert lcsm_compile.counters["decode"]["segment_compiles_without_cache"] == 1
    assert ((out - want).norm() / want.norm()).item() <= 1e-6


def test_segments_come_from_the_fx_graph_cache_keyed_by_persistent_k():
    """A segment compiled again comes from inductor's FX-graph cache (it bypassed every segment
    before the compiles got a shape environment); another persistent-K choice is a new entry."""
    from torch._dynamo.utils import counters as dynamo_counters
    from torch._inductor.utils import fresh_cache

    gm, args = _graph(1, torch.float32, 0)
    want = gm(*args)
    with fresh_cache():
        dynamo_counters.clear()
        for k in (2048, 2048, 1024, 0, 0):
            out = SegmentCompiler(inductor=True, persistent_k=k)(gm, args)(*args)
            out = out[0] if isinstance(out, (tuple, list)) else out
            assert ((out - want).norm() / want.norm()).item() <= 1e-6
        assert dynamo_counters["inductor"]["fxgraph_cache_hit"] == 2
        assert dynamo_counters["inductor"]["fxgraph_cache_miss"] == 3
