"""The decoder on a GPU: CUDA graphs per tile level (Triton online conv), inductor step segments."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import lcsm_compile
from lcsm_compile.backend import lcsm_backend
from lcsm_compile.runtime.cuda_graphs import StepGraphs
from lcsm_compile.runtime.lazy import LazyConv
from lcsm_compile.runtime.step_program import StepProgram
from lcsm_compile.zoo import ZOO

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _model(name):
    return ZOO[name].build().to(DEV)


def _rel_per_position(got, want):
    g, w = got.double().flatten(2), want.double().flatten(2)
    return ((g - w).norm(dim=(0, 2)) / w.norm(dim=(0, 2)).clamp_min(1e-30)).max().item()


def _inductor_decoder_error(seed: int, prompt: int, length: int, batch: int = 1, **options):
    """hyena_lm decoded with inductor segments and `options` against its eager forward: the
    decoder and its worst relative error per position."""
    model = _model("hyena_lm")
    x = ZOO["hyena_lm"].make_inputs(model, batch, length, torch.Generator().manual_seed(seed))[0].to(DEV)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :prompt], max_len=length, inner_backend="inductor", **options)
    outs = [dec.prefill(x[:, :prompt])] + [dec.step(x[:, t : t + 1]) for t in range(prompt, length)]
    return dec, _rel_per_position(torch.cat(outs, 1), ref[:, prompt - 1 :])


@pytest.mark.parametrize("name, backend", [("hyena_lm", "inductor"), ("h3_lm", "eager"), ("long_conv", "eager")])
def test_cuda_graph_decoder_matches_eager(name, backend):
    model = _model(name)
    x = ZOO[name].make_inputs(model, 3, 300, torch.Generator().manual_seed(0))[0].to(DEV)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=300, inner_backend=backend)
    assert dec._use_graphs
    for P in (1, 64):
        outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, 300)]
        assert dec._graphs is not None
        err = _rel_per_position(torch.cat(outs, 1), ref[:, P - 1 :])
        assert err <= 1e-4, f"{name} P={P}: {err:.2e}"


@pytest.mark.parametrize("kernel, counter", [("reduction", "gemv_reductions"), ("triton", "gemv_kernels")])
def test_gemv_at_batch_one_match_eager(kernel, counter):
    """decode_gemv_rows (default 1): the inductor segments' products as tuned reductions, or as
    lcsm::gemv calls (decode_gemv_kernel="triton")."""
    lcsm_compile.counters.clear()
    _, err = _inductor_decoder_error(1, 13, 200, decode_gemv_kernel=kernel)
    assert lcsm_compile.counters["decode"][counter] > 0
    assert err <= 1e-4, f"{err:.2e}"


@pytest.mark.parametrize("batch, triton_rows", [(3, 8), (8, 8), (3, 0)])
def test_batched_products_as_triton_gemv_match_eager(batch, triton_rows):
    """decode_gemv_triton_rows (default 8): at B = 2..8 the step's products are lcsm::gemv calls
    (weights read before the PDL wait) instead of cuBLAS matmuls; 0 keeps cuBLAS."""
    lcsm_compile.counters.clear()
    dec, err = _inductor_decoder_error(3, 11, 180, batch=batch, decode_gemv_triton_rows=triton_rows)
    assert dec.program.compiler.gemv_triton_rows == triton_rows
    assert (lcsm_compile.counters["decode"]["gemv_kernels"] > 0) == bool(triton_rows)
    assert err <= 1e-4, f"{err:.2e}"


@pytest.mark.parametrize("pdl", [False, True])
def test_programmatic_dependent_launch_matches_eager(pdl):
    """decode_pdl (default on): the step's inductor kernels launched with PDL where the GPU has it
    (sm90+); either way the decoder is the model."""
    model = _model("hyena_lm")
    x = ZOO["hyena_lm"].make_inputs(model, 2, 160, torch.Generator().manual_seed(2))[0].to(DEV)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :9], max_len=160, inner_backend="inductor", decode_pdl=pdl)
    assert dec.program.compiler.pdl == (pdl and torch.cuda.get_device_capability() >= (9, 0))
    outs = [dec.prefill(x[:, :9])] + [dec.step(x[:, t : t + 1]) for t in range(9, 160)]
    err = _rel_per_position(torch.cat(outs, 1), ref[:, 8:])
    assert err <= 1e-4, f"{err:.2e}"


def test_persistent_reductions_match_eager():
    """decode_persistent_k (default 2048; 4096 here): the step's row reductions up to K kept persistent
    through inductor's choices hook; the decoder is still the model."""
    dec, err = _inductor_decoder_error(3, 7, 130, decode_persistent_k=4096)
    assert dec.program.compiler.persistent_k == 4096
    assert err <= 1e-4, f"{err:.2e}"


def test_norms_in_products_match_eager():
    """decode_fuse_norm: layer norms recomputed inside the step's GEMV
    reductions; the decoder is still the model."""
    lcsm_compile.counters.clear()
    dec, err = _inductor_decoder_error(4, 7, 130, decode_fuse_norm=True)
    assert dec.program.compiler.fuse_norm and lcsm_compile.counters["decode"]["norms_in_gemv"] > 0
    assert err <= 1e-4, f"{err:.2e}"


def test_generate_and_serving_on_gpu():
    model = _model("hyena_lm")
    ids = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    got = lcsm_compile.generate(model, ids, 100, inner_backend="eager")
    x = ids
    with torch.no_grad():
        for _ in range(100):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, x)
    options = {"decode": True, "inner_backend": "eager", "max_len": 256}
    # the backend object itself: where the package is not installed, "lcsm" has no entry point
    compiled = torch.compile(model, backend=functools.partial(lcsm_backend, options=options))
    lcsm_compile.counters.clear()
    with torch.no_grad():
        for n in range(9, 60):
            out = compiled(x[:, :n])
        assert _rel_per_position(out, model(x[:, :59])) <= 1e-4
    assert lcsm_compile.counters["decode"]["serving_step_positions"] >= 45


def test_floor_and_lazy_programs_share_the_segments():
    model = _model("hyena_lm")
    x = torch.randint(0, model.vocab_size, (1, 80), device=DEV)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :16], max_len=128, inner_backend="eager")
    lazy = StepProgram(dec.plan, dec.device, engine_factory=LazyConv, like=dec.program)
    outs = [lazy.prefill([x[:, :10]], 10)[0][:, -1:]] + [lazy.step([x[:, t : t + 1]])[0] for t in range(10, 80)]
    assert _rel_per_position(torch.cat(outs, 1), ref[:, 9:]) <= 1e-4
    floor = StepProgram(dec.plan, dec.device, floor=True, like=dec.program)
    graphs = StepGraphs(floor)
    assert list(graphs.graphs) == [None]
    floor.prefill([x[:, :10]], 10)
    out = graphs.replay([x[:, 10:11]])[0]
    # The floor drops the long convolutions (y = u): its reference is the model with each Hyena
    # long filter (fftconv and its bias skip) replaced by the identity, not the model itself.
    identity = copy.deepcopy(model)
    for layer in identity.layers:
        layer.mixer.filter_fn.forward = lambda v, L, k=None: v
    with torch.no_grad():
        want = identity(x[:, :11])[:, 10:11]
    assert out.shape == (1, 1, model.vocab_size) and _rel_per_position(out, want) <= 1e-4


@pytest.mark.parametrize("mixed", [False, True], ids=["modal-only", "modal+tiling"])
def test_cuda_graphs_with_modal_recurrences(monkeypatch, mixed):
    """H3's S4D convs step by ModalRecurrence under CUDA graphs; with one of them forced onto the
    tiling, the token graphs take their levels from the tiled engine and replay both."""
    import lcsm_compile.passes.incrementalize as incrementalize
    from lcsm_compile.kernels import OnlineConv
    from lcsm_compile.kernels.modal import ModalRecurrence
    from lcsm_compile.passes.modal import Strategy

    if mixed:
        real, seen = incrementalize.choose_strategy, []

        def second_tiled(mixer, settings):
            seen.append(mixer)
            s = real(mixer, settings)
            return Strategy("long", "forced by the test") if len(seen) == 2 else s

        monkeypatch.setattr(incrementalize, "choose_strategy", second_tiled)
    model = _model("h3_lm")
    x = ZOO["h3_lm"].make_inputs(model, 2, 300, torch.Generator().manual_seed(1))[0].to(DEV)
    with torch.no_grad():
        ref = model(x)
    dec = lcsm_compile.decoder(model, x[:, :21], max_len=300, inner_backend="eager")
    kinds = sorted(type(e).__name__ for e in dec.program.engines)
    assert kinds == (["ModalRecurrence", "OnlineConv"] if mixed else ["ModalRecurrence"])
    assert dec._use_graphs
    for P in (1, 64):
        outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, 300)]
        assert dec._graphs is not None
        tiled = [e for e in dec.program.engines if isinstance(e, OnlineConv)]
        assert list(dec._graphs.graphs) == ([-1, *range(tiled[0].n_levels)] if mixed else [None])
        err = _rel_per_position(torch.cat(outs, 1), ref[:, P - 1 :])
        assert err <= 1e-4, f"mixed={mixed} P={P}: {err:.2e}"
    assert any(isinstance(e, ModalRecurrence) for e in dec.program.engines)
