"""OnnxDecoder: runs an exported artifact with onnxruntime, the mixers with an online convolution.

    dec = OnnxDecoder("artifact/")                  # validates manifest.json and every file
    last = dec.prefill(input_ids)                   # (B, 1, V): outputs at the last prompt position
    nxt = dec.step(next_ids)                        # (B, 1) in -> (B, 1, V) out, one position on
    ids = dec.generate(input_ids, max_new_tokens=64)
    full = dec.forward(input_ids)                   # the prefill graph's full outputs, no state

Inputs may be numpy arrays or torch tensors; outputs are numpy arrays, with the time-dimension
convention of `lcsm_compile.decoder`: step inputs and every returned output keep their rank with a
time dim of length 1. The segments run in onnxruntime (any providers); long mixers run in
`OnlineConv` (torch, the CPU path unless mixer_device says otherwise) or, where torch is absent,
`NumpyOnlineConv`. Short mixers live inside the segments (their ring buffers are segment
inputs/outputs that this class carries from one step to the next).

Torch-free at import: with manifest.py, online_conv_numpy.py and the package's lazy __init__.py,
this file runs on numpy and onnxruntime alone (tests load the folder with torch blocked), so it can
ship beside an artifact. Memory: the segments hold the weights once, the prefill graph once more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .manifest import ManifestError, io_names, load_manifest
from .online_conv_numpy import NumpyOnlineConv

__all__ = ["OnnxDecoder"]


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class OnnxDecoder:
    def __init__(self, out_dir: str | Path, providers: list | None = None, *, max_len: int | None = None,
                 mixer_backend: str = "auto", mixer_device: str = "cpu", session_options: Any = None):
        import onnxruntime as ort  # noqa: PLC0415

        self.dir = Path(out_dir)
        self.manifest = m = load_manifest(self.dir)
        if max_len is not None and not 1 <= int(max_len) <= m["max_len"]:
            raise ValueError(f"OnnxDecoder: max_len={max_len} must be in [1, {m['max_len']}] (the artifact's)")
        self.max_len = int(max_len or m["max_len"])
        if mixer_backend == "auto":
            mixer_backend = "torch" if _have_torch() else "numpy"
        if mixer_backend not in ("torch", "numpy"):
            raise ValueError(f"OnnxDecoder: mixer_backend must be 'auto', 'torch' or 'numpy', got {mixer_backend!r}")
        self.mixer_backend, self.mixer_device = mixer_backend, mixer_device
        self.providers = list(providers or ["CPUExecutionProvider"])
        if session_options is None:
            # One step runs many small sessions in turn; a pool that spins after its run keeps the
            # cores the next session needs (Hyena 153M on 2 cores: 82 -> 52 ms per step).
            session_options = ort.SessionOptions()
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(graph: dict):
            sess = ort.InferenceSession(str(self.dir / graph["file"]), sess_options=session_options,
                                        providers=self.providers)
            _check_session(sess, graph)
            return sess

        self._prefill = session(m["prefill"])
        self._segments = [session(seg) for seg in m["segments"]]
        self._mixers = {mx["index"]: mx for mx in m["mixers"]}
        self._long = [mx for mx in m["mixers"] if mx["kind"] == "long"]
        self._filters = {mx["index"]: np.fromfile(self.dir / mx["filter_file"], dtype=mx["filter_dtype"])
                         .reshape(mx["filter_shape"]) for mx in self._long}
        self._tables = {t["name"]: (np.fromfile(self.dir / t["file"], dtype=t["dtype"]).reshape(t["shape"]),
                                    t["time_dim"]) for t in m["positional"]}
        self._seg_io = [(io_names(seg["inputs"]), io_names(seg["outputs"])) for seg in m["segments"]]
        self._inputs = m["inputs"]
        self._outputs = m["outputs"]
        self._engines: list = []
        self._where: dict[int, tuple[int, int]] = {}  # long mixer -> (engine, index in it)
        self._batch: int | None = None
        self._position: int | None = None
        self._states: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------- state
    @property
    def position(self) -> int:
        """The position the next step fills (the prompt length after prefill); 0 before."""
        return self._position or 0

    @property
    def batch(self) -> int | None:
        return self._batch

    def reset(self) -> None:
        self._position = None
        self._states = {}
        for engine in self._engines:
            engine.reset()

    def _make_engines(self, batch: int) -> None:
        if batch == self._batch and self._engines:
            for engine in self._engines:
                engine.reset()
            return
        groups: dict[tuple, list[dict]] = {}
        for mx in self._long:
            groups.setdefault((mx["channels"], mx["filter_dtype"]), []).append(mx)
        self._engines, self._where = [], {}
        for (channels, dtype), mixers in groups.items():
            K = max(mx["filter_length"] for mx in mixers)
            filters = np.zeros((len(mixers), channels, K), dtype=np.float32 if dtype != "float64" else np.float64)
            for j, mx in enumerate(mixers):
                filters[j, :, : mx["filter_length"]] = self._filters[mx["index"]]
                self._where[mx["index"]] = (len(self._engines), j)
            if self.mixer_backend == "torch":
                import torch  # noqa: PLC0415

                from lcsm_compile.kernels.online_conv import OnlineConv  # noqa: PLC0415

                engine = OnlineConv(torch.from_numpy(filters), batch, self.max_len, device=self.mixer_device)
            else:
                engine = NumpyOnlineConv(filters, batch, self.max_len)
            self._engines.append(engine)
        self._batch = batch

    # ------------------------------------------------------------------------------- inputs
    def _feeds(self, inputs: tuple, step: bool) -> tuple[dict, int, int]:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"OnnxDecoder: expected {len(self._inputs)} input(s) "
                             f"({', '.join(io_names(self._inputs))}), got {len(inputs)}")
        feeds, batch, length = {}, None, None
        for x, spec in zip(inputs, self._inputs):
            a = _numpy(x)
            want = np.dtype(spec["dtype"])
            if a.dtype != want:
                if a.dtype.kind != want.kind and not (a.dtype.kind in "iu" and want.kind in "iu"):
                    raise ValueError(f"OnnxDecoder: input {spec['name']} must be {want}, got {a.dtype}")
                a = a.astype(want)
            shape = spec["shape"]
            if a.ndim != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, a.shape)):
                raise ValueError(f"OnnxDecoder: input {spec['name']} must have shape {shape}, got {list(a.shape)}")
            b, t = a.shape[0], a.shape[spec["time_dim"]]
            if batch is not None and b != batch or length is not None and t != length:
                raise ValueError("OnnxDecoder: all inputs need the same batch and length")
            batch, length = b, t
            feeds[spec["name"]] = np.ascontiguousarray(a)
        if step and length != 1:
            raise ValueError(f"OnnxDecoder: step takes one position (time dim of length 1), got length {length}")
        if not step and not 1 <= length <= self.max_len:
            raise ValueError(f"OnnxDecoder: prompt length {length} must be in [1, max_len={self.max_len}]")
        return feeds, batch, length

    # ------------------------------------------------------------------------------- running
    def forward(self, *inputs) -> np.ndarray | tuple:
        """The full forward (the prefill graph) at every position; the decode state is untouched."""
        feeds, _, _ = self._feeds(inputs, step=False)
        outs = self._prefill.run(io_names(self._outputs), feeds)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def prefill(self, *inputs) -> np.ndarray | tuple:
        """Run the prompt; the outputs at its last position (time dim of length 1)."""
        feeds, batch, P = self._feeds(inputs, step=False)
        names = io_names(self.manifest["prefill"]["outputs"])
        values = dict(zip(names, self._prefill.run(names, feeds)))
        self._make_engines(batch)
        self._states = {}
        for mx in self._mixers.values():
            if mx["kind"] == "short" and mx.get("state"):
                self._states[mx["state"]] = values[mx["prefill_output"]]
            elif mx["kind"] == "long":
                e, j = self._where[mx["index"]]
                self._engines[e].prefill(j, self._to_engine(values[mx["prefill_output"]]))
        self._position = P
        outs = [np.take(values[o["name"]], [P - 1], axis=o["time_dim"]) for o in self._outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def step(self, *inputs) -> np.ndarray | tuple:
        """One position: inputs with a time dim of length 1 -> outputs with a time dim of length 1."""
        if self._position is None:
            raise RuntimeError("OnnxDecoder: step before prefill; call prefill(prompt) first")
        if self._position >= self.max_len:
            raise RuntimeError(f"OnnxDecoder: step past max_len={self.max_len}")
        feeds, batch, _ = self._feeds(inputs, step=True)
        if batch != self._batch:
            raise ValueError(f"OnnxDecoder: step batch {batch} differs from the prompt's {self._batch}")
        t = self._position
        values = dict(feeds)
        values.update(self._states)
        for name, (table, tdim) in self._tables.items():
            values[name] = np.take(table, [t], axis=tdim)
        for entry in self.manifest["schedule"]:
            if "segment" in entry:
                k = entry["segment"]
                ins, outs = self._seg_io[k]
                values.update(zip(outs, self._segments[k].run(outs, {n: values[n] for n in ins})))
            else:
                for i in entry["mixers"]:
                    mx = self._mixers[i]
                    e, j = self._where[i]
                    u = values[mx["input"]][..., 0]
                    values[mx["output"]] = self._from_engine(self._engines[e].step(j, self._to_engine(u)))[..., None]
        for engine in self._engines:
            engine.advance()
        for mx in self._mixers.values():
            if mx["kind"] == "short" and mx.get("state"):
                self._states[mx["state"]] = values[mx["state_out"]]
        self._position = t + 1
        outs = [values[o["step_value"]] for o in self._outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _to_engine(self, a: np.ndarray):
        if self.mixer_backend == "numpy":
            return a
        import torch  # noqa: PLC0415

        return torch.from_numpy(np.ascontiguousarray(a)).to(self.mixer_device)

    def _from_engine(self, y) -> np.ndarray:
        return y if isinstance(y, np.ndarray) else y.cpu().numpy()

    def generate(self, input_ids, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: np.random.Generator | int | None = None) -> np.ndarray:
        """Greedy or sampled generation for a token model (output 0 holds the logits), like
        `lcsm_compile.generate`: (B, P + N) int64 ids; after `eos_token_id` a row repeats it.
        `generator`: a numpy Generator or a seed, for reproducible sampling."""
        ids = _numpy(input_ids)
        if len(self._inputs) != 1 or np.dtype(self._inputs[0]["dtype"]).kind not in "iu":
            raise ValueError("OnnxDecoder.generate needs a model with one integer (token id) input")
        P = ids.shape[1]
        if max_new_tokens < 1 or P + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"OnnxDecoder.generate: {P} prompt + {max_new_tokens} new tokens must fit "
                             f"max_len={self.max_len}")
        rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
        out = [ids.astype(np.int64)]
        logits = self.prefill(ids)
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            logits = logits[0] if isinstance(logits, tuple) else logits
            tok = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, rng)
            if eos_token_id is not None:
                tok = np.where(done, eos_token_id, tok)
                done |= tok == eos_token_id
            out.append(tok[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and done.all()):
                break
            logits = self.step(tok[:, None])
        return np.concatenate(out, axis=1)

    def __repr__(self) -> str:
        return (f"OnnxDecoder({str(self.dir)!r}, segments={len(self._segments)}, long_mixers={len(self._long)}, "
                f"max_len={self.max_len}, providers={self.providers}, mixers on {self.mixer_backend})")


def sample_next(logits: np.ndarray, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """(B,) int64 next tokens from (B, V) logits: argmax, or a draw after temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    scores = logits.astype(np.float64) / max(float(temperature), 1e-6)
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-scores, axis=-1)
        sorted_scores = np.take_along_axis(scores, order, -1)
        p = np.exp(sorted_scores - sorted_scores[:, :1])
        p /= p.sum(-1, keepdims=True)
        drop = np.cumsum(p, -1) - p > top_p  # keep the smallest set reaching top_p
        np.put_along_axis(scores, order, np.where(drop, -np.inf, sorted_scores), -1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rng = rng or np.random.default_rng()
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def _check_session(sess, graph: dict) -> None:
    """The ONNX file's inputs and outputs are the ones the manifest describes."""
    sides = (("input", sess.get_inputs(), graph["inputs"]), ("output", sess.get_outputs(), graph["outputs"]))
    for kind, got, want in sides:
        got_names = [g.name for g in got]
        if got_names != io_names(want):
            raise ManifestError(f"artifact: {graph['file']} has {kind}s {got_names}, "
                                f"the manifest says {io_names(want)}")
        for g, w in zip(got, want):
            if len(g.shape) != len(w["shape"]) or any(isinstance(s, int) and isinstance(d, int) and s != d
                                                      for s, d in zip(w["shape"], g.shape)):
                raise ManifestError(f"artifact: {graph['file']} {kind} {g.name} has shape {g.shape}, "
                                    f"the manifest says {w['shape']}")
