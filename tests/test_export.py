"""ONNX export (lcsm_compile/export): the artifact against the eager model it came from.

Each zoo model is exported once per module (max_len 128, example of length 37) and then held
against eager PyTorch: every ONNX file passes onnx.checker; the prefill graph matches the full
forward at several lengths; OnnxDecoder matches it at every decode position after prompts of
several lengths (non powers of two); greedy generation gives the eager tokens. Then the ways an
export or a load must fail, each with a message that says what and where.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import lcsm_compile
from lcsm_compile.export import ExportError, ManifestError, OnnxDecoder
from lcsm_compile.zoo import ZOO

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MAX_LEN = 128
TOL = 1e-5
MODELS = ["hyena_lm", "h3_lm", "long_conv", "sgconv", "spelling_conv1d_k8", "spelling_cumsum"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, artifact dir, manifest), exported on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            entry = ZOO[name]
            model = entry.build()
            (x,) = entry.make_inputs(model, 1, 37, torch.Generator().manual_seed(1))
            out = tmp_path_factory.mktemp(name)
            torch._dynamo.reset()
            manifest = lcsm_compile.export_onnx(model, x, out_dir=out, max_len=MAX_LEN)
            cache[name] = (model, out, manifest)
        return cache[name]

    return get


def _inputs(name: str, model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    (x,) = ZOO[name].make_inputs(model, batch, length, torch.Generator().manual_seed(seed))
    return x


def _rel(got, want: torch.Tensor) -> float:
    """Norm-relative error of an ONNX output against eager (relative at any output scale, unlike
    the export check's max_error, which is absolute below magnitude 1)."""
    want = want.detach().double().numpy()
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def _eager(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------------- artifacts
@pytest.mark.parametrize("name", MODELS)
def test_every_file_passes_the_checker(exported, name):
    model, out, manifest = exported(name)
    files = [manifest["prefill"]["file"]] + [s["file"] for s in manifest["segments"]]
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(files)
    for f in files:
        onnx.checker.check_model(str(out / f), full_check=True)
    assert manifest["format_version"] == 1 and manifest["max_len"] == MAX_LEN
    assert manifest["torch_version"] == torch.__version__ and manifest["lcsm_compile_version"]
    assert manifest["opset"] == 18
    assert len(manifest["mixers"]) == ZOO[name].expected_convs
    for mx in manifest["mixers"]:
        path = out / mx["filter_file"]
        h = np.fromfile(path, dtype=mx["filter_dtype"]).reshape(mx["filter_shape"])
        assert h.shape == (mx["channels"], mx["filter_length"]) and np.abs(h[:, -1]).max() > 0
        assert mx["kind"] == ("short" if mx["filter_length"] <= 64 else "long")
    # Filters are external data of the graphs (not copies inside them).
    model_proto = onnx.load(str(out / manifest["prefill"]["file"]), load_external_data=False)
    locations = {e.value for t in model_proto.graph.initializer for e in t.external_data if e.key == "location"}
    dft = [mx for mx in manifest["mixers"] if mx["prefill_op"] == "DFT"]
    assert {mx["filter_file"] for mx in dft} <= locations
    for mx in manifest["mixers"]:
        if mx["kind"] == "short" and mx["filter_length"] > 1:
            seg = onnx.load(str(out / manifest["segments"][mx["segment"]]["file"]), load_external_data=False)
            assert any(e.value == mx["filter_file"] for t in seg.graph.initializer for e in t.external_data)


def test_step_segments_have_fixed_shapes_and_dynamic_batch(exported):
    _, out, manifest = exported("hyena_lm")
    kinds = [m["kind"] for m in manifest["mixers"]]
    assert kinds == ["short", "long", "short", "long"]
    # segment 0 -> long mixer -> segment 1 -> long mixer -> segment 2
    assert manifest["schedule"] == [{"segment": 0}, {"mixers": [1]}, {"segment": 1}, {"mixers": [3]}, {"segment": 2}]
    for seg in manifest["segments"]:
        m = onnx.load(str(out / seg["file"]), load_external_data=False)
        for v in list(m.graph.input) + list(m.graph.output):
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            assert all(d.HasField("dim_value") for d in dims[1:]), v.name
    seg0 = manifest["segments"][0]
    assert {"name": "mixer0.state", "dtype": "float32", "shape": ["batch", 96, 2]} in seg0["inputs"]
    assert {"name": "input_0", "dtype": "int64", "shape": ["batch", 1]} in seg0["inputs"]


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", MODELS)
def test_prefill_graph_matches_the_model(exported, name):
    model, out, _ = exported(name)
    dec = OnnxDecoder(out)
    for batch, length in [(1, 1), (3, 5), (2, 64), (1, 100), (2, MAX_LEN)]:
        x = _inputs(name, model, batch, length, seed=length)
        got = dec.forward(x)
        assert isinstance(got, np.ndarray)
        assert _rel(got, _eager(model, x)) <= TOL, (batch, length)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_steps_match_the_model(exported, name):
    model, out, _ = exported(name)
    dec = OnnxDecoder(out)
    for batch, prompt, steps in [(2, 1, 9), (1, 7, 12), (3, 33, 5)]:
        x = _inputs(name, model, batch, prompt + steps, seed=prompt)
        full = _eager(model, x)
        got = dec.prefill(x[:, :prompt])  # a torch tensor in, numpy out
        assert got.shape[1] == 1 and _rel(got, full[:, prompt - 1 : prompt]) <= TOL
        for t in range(prompt, prompt + steps):
            got = dec.step(x[:, t : t + 1].numpy())  # numpy in
            assert got.shape[1] == 1
            assert _rel(got, full[:, t : t + 1]) <= TOL, (batch, prompt, t)
        assert dec.position == prompt + steps


def test_numpy_mixers_match_the_model(exported):
    """The engine used where torch is absent (NumpyOnlineConv), through a full decode."""
    model, out, _ = exported("hyena_lm")
    dec = OnnxDecoder(out, mixer_backend="numpy")
    x = _inputs("hyena_lm", model, 2, 40, seed=3)
    full = _eager(model, x)
    dec.prefill(x[:, :11])
    for t in range(11, 40):
        assert _rel(dec.step(x[:, t : t + 1]), full[:, t : t + 1]) <= TOL, t


@pytest.mark.parametrize("P, L", [(0, 9), (1, 40), (7, 40), (13, 100), (63, 64), (64, 200), (100, 100)])
def test_numpy_engine_equals_the_lazy_sum(P, L):
    """NumpyOnlineConv alone against the O(t) reference: prompts of every bit pattern (their
    tiles reach past the prompt), up to max_len, and the steps after them; its history and
    accumulators are rings of the largest tile's length, which prompts past it and steps wrap."""
    from lcsm_compile.export.online_conv_numpy import NumpyOnlineConv
    from lcsm_compile.kernels.online_conv import LazyOnlineConv

    g = torch.Generator().manual_seed(P + L)
    M, B, D = 2, 2, 3
    filters = torch.randn(M, D, L + 5, generator=g, dtype=torch.float64)
    u = torch.randn(L, M, B, D, generator=g, dtype=torch.float64)
    eng, ref = NumpyOnlineConv(filters.numpy(), B, L), LazyOnlineConv(filters, B, L)
    assert eng.X.shape == eng.A.shape == (M, B, D, 1 << ((L - 1).bit_length() - 1))
    for m in range(M):
        prompt = u[:P, m].permute(1, 2, 0)
        y, want = eng.prefill(m, prompt.numpy()), ref.prefill(m, prompt)
        assert y.shape == (B, D, P) and np.allclose(y, want.numpy(), rtol=1e-10, atol=1e-10)
    for t in range(P, L):
        for m in range(M):
            y, want = eng.step(m, u[t, m].numpy()), ref.step(m, u[t, m])
            assert np.allclose(y, want.numpy(), rtol=1e-10, atol=1e-10), (t, m)
        eng.advance()
        ref.advance()


@pytest.mark.parametrize("name", ["hyena_lm", "h3_lm"])
def test_greedy_generation_gives_the_eager_tokens(exported, name):
    model, out, _ = exported(name)
    prompt = _inputs(name, model, 2, 6, seed=5)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(15):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    dec = OnnxDecoder(out)
    got = dec.generate(prompt, max_new_tokens=15)
    assert got.dtype == np.int64 and np.array_equal(got, ids.numpy())
    a = dec.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, generator=7)
    b = dec.generate(prompt, 8, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, generator=7)
    assert a.shape == (2, 14) and np.array_equal(a, b) and np.array_equal(a[:, :6], prompt.numpy())


class PositionalConvLM(nn.Module):
    """Token + learned position embeddings, then a long causal conv: a POSITIONAL per-step input."""

    def __init__(self, vocab: int = 32, d: int = 8, max_len: int = 256):
        super().__init__()
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d))
        self.h = nn.Parameter(torch.randn(d, max_len) * torch.exp(-torch.arange(max_len) / 16.0))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        L = ids.shape[1]
        x = (self.emb(ids) + self.pos[:L]).transpose(1, 2)
        n = 2 * L
        y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(self.h[:, :L], n=n), n=n)[..., :L]
        return self.head(torch.tanh(y.transpose(1, 2)))


def test_positional_values_are_per_step_inputs(tmp_path):
    torch.manual_seed(0)
    model = PositionalConvLM().eval()
    x = torch.randint(0, 32, (2, 45))
    manifest = lcsm_compile.export_onnx(model, x[:, :20], out_dir=tmp_path, max_len=MAX_LEN)
    (table,) = manifest["positional"]
    assert table["shape"][table["time_dim"]] >= MAX_LEN
    assert table["name"] in [s["name"] for s in manifest["segments"][0]["inputs"]]
    dec = OnnxDecoder(tmp_path)
    full = _eager(model, x)
    dec.prefill(x[:, :9])
    for t in range(9, 45):
        assert _rel(dec.step(x[:, t : t + 1]), full[:, t : t + 1]) <= TOL


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["neg_time_flip", "neg_data_filter"])
def test_a_model_that_cannot_decode_is_refused_with_the_node(tmp_path, name):
    entry = ZOO[name]
    model = entry.build()
    (x,) = entry.make_inputs(model, 1, 24, torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match=entry.reason) as info:
        lcsm_compile.export_onnx(model, x, out_dir=tmp_path, max_len=64)
    assert "aten." in str(info.value) and ".py:" in str(info.value)  # the node and its source line


class BesselGate(nn.Module):
    """A causal conv gated by bessel_j0, which has no ONNX translation."""

    def __init__(self, d: int = 8, max_len: int = 64):
        super().__init__()
        self.h = nn.Parameter(torch.randn(d, max_len) * 0.1)

    def forward(self, x):
        u = x.transpose(1, 2)
        L = u.shape[-1]
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(self.h[:, :L], n=2 * L), n=2 * L)[..., :L]
        return torch.special.bessel_j0(y).transpose(1, 2)


def test_a_node_without_onnx_translation_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"bessel_j0.*test_export\.py:\d+ in forward.*no ONNX translation"):
        lcsm_compile.export_onnx(BesselGate().eval(), torch.randn(1, 20, 8), out_dir=tmp_path, max_len=64)


def test_a_length_specialised_model_and_a_bad_opset_are_refused(tmp_path):
    entry = ZOO["spelling_rfft_forward"]
    model = entry.build()
    (x,) = entry.make_inputs(model, 1, 24, torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match="specialised"):
        lcsm_compile.export_onnx(model, x, out_dir=tmp_path, max_len=64)
    with pytest.raises(ValueError, match="opset 17 .*cannot convert these graphs down to 17"):
        lcsm_compile.export_onnx(model, x, out_dir=tmp_path, max_len=64, opset=17)


@pytest.fixture
def broken(exported, tmp_path):
    """A fresh copy of the hyena artifact to damage."""
    _, out, _ = exported("hyena_lm")
    copy = tmp_path / "artifact"
    shutil.copytree(out, copy)
    return copy


def _edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_load_refuses_a_wrong_format_version(broken):
    _edit(broken, lambda m: m.update(format_version=99))
    with pytest.raises(ManifestError, match="format version 99"):
        OnnxDecoder(broken)


def test_load_refuses_missing_files(broken):
    (broken / "segment_1.onnx").unlink()
    with pytest.raises(ManifestError, match="segment_1.onnx is missing"):
        OnnxDecoder(broken)
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        OnnxDecoder(broken / "filters")


def test_load_refuses_inconsistent_shapes(broken):
    (broken / "filters" / "mixer1.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ManifestError, match="mixer1.bin has 12 bytes"):
        OnnxDecoder(broken)


def test_load_refuses_a_manifest_that_disagrees_with_the_graphs(broken, exported):
    _, out, _ = exported("hyena_lm")

    def change_mixer(m):
        m["mixers"][1]["channels"] = m["mixers"][1]["filter_shape"][0] = 31
    _edit(broken, change_mixer)
    shutil.copy(out / "filters" / "mixer1.bin", broken / "filters" / "mixer1.bin")
    with pytest.raises(ManifestError, match="filter file .*mixer1.bin"):
        OnnxDecoder(broken)
    shutil.copy(out / "manifest.json", broken / "manifest.json")

    def change_io(m):
        m["segments"][-1]["outputs"][-1]["shape"] = ["batch", 1, 63]
    _edit(broken, change_io)
    want = r"segment_2.onnx output .* has shape .* the manifest says \['batch', 1, 63\]"
    with pytest.raises(ManifestError, match=want):
        OnnxDecoder(broken)


def test_bad_calls_raise_clear_errors(exported):
    model, out, _ = exported("hyena_lm")
    dec = OnnxDecoder(out, max_len=40)
    x = _inputs("hyena_lm", model, 2, 41)
    with pytest.raises(RuntimeError, match="step before prefill"):
        dec.step(x[:, :1])
    with pytest.raises(ValueError, match="prompt length 41"):
        dec.prefill(x)
    with pytest.raises(ValueError, match="must be int64"):
        dec.prefill(x[:, :4].float())
    dec.prefill(x[:, :39])
    with pytest.raises(ValueError, match="one position"):
        dec.step(x[:, 1:3])
    with pytest.raises(ValueError, match="batch 1 differs"):
        dec.step(x[:1, :1])
    dec.step(x[:, 39:40])
    with pytest.raises(RuntimeError, match="past max_len=40"):
        dec.step(x[:, :1])
    with pytest.raises(ValueError, match="max_len=500 must be in"):
        OnnxDecoder(out, max_len=500)


_TORCH_FREE = r"""
import importlib.util, sys
import numpy as np
sys.modules["torch"] = None  # any `import torch` now fails
here, art, data = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("lcsm_onnx_runtime", here + "/__init__.py",
                                              submodule_search_locations=[here])
pkg = importlib.util.module_from_spec(spec)
sys.modules["lcsm_onnx_runtime"] = pkg
spec.loader.exec_module(pkg)
from lcsm_onnx_runtime.onnx_decoder import OnnxDecoder
dec = OnnxDecoder(art)
assert dec.mixer_backend == "numpy", dec.mixer_backend
x = np.load(data + "/x.npy")
outs = [dec.prefill(x[:, :5])] + [dec.step(x[:, t : t + 1]) for t in range(5, x.shape[1])]
np.save(data + "/y.npy", np.concatenate(outs, 1))
"""


def test_the_decoder_runs_without_torch(exported, tmp_path):
    """export/ holds a torch-free runtime (onnx_decoder, manifest, online_conv_numpy): numpy + onnxruntime."""
    import subprocess
    import sys
    from pathlib import Path

    import lcsm_compile.export as export_pkg

    model, out, _ = exported("h3_lm")
    x = _inputs("h3_lm", model, 2, 14, seed=9)
    np.save(tmp_path / "x.npy", x.numpy())
    here = str(Path(export_pkg.__file__).parent)
    subprocess.run([sys.executable, "-c", _TORCH_FREE, here, str(out), str(tmp_path)], check=True, timeout=120)
    got = np.load(tmp_path / "y.npy")
    assert _rel(got, _eager(model, x)[:, 4:]) <= TOL
