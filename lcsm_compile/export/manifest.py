"""manifest: `manifest.json`, the description of an exported artifact, and its validation.

    {format: "lcsm-onnx", format_version, lcsm_compile_version, torch_version, opset, max_len,
     inputs / outputs (name, dtype, shape with "batch" / "length", time_dim),
     prefill {file, inputs, outputs}, segments [{file, inputs, outputs}], schedule (segments and
     mixer groups in the order one time step runs them), mixers (kind, filter file, lengths, the
     values they read and write), positional tables, external weights file}

Torch-free (json, pathlib, numpy), like onnx_decoder.py, so an artifact can be checked and run
where PyTorch is not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["FORMAT", "FORMAT_VERSION", "ManifestError", "load_manifest", "write_manifest", "io_names"]

FORMAT = "lcsm-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"}


class ManifestError(ValueError):
    """An artifact that cannot be loaded: wrong version, missing files, inconsistent shapes."""


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def io_names(specs: list[dict]) -> list[str]:
    return [s["name"] for s in specs]


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


def _file(root: Path, rel: str, what: str) -> Path:
    path = root / rel
    _need(path.is_file(), f"artifact {root}: {what} file {rel} is missing")
    return path


def _check_io(specs, where: str) -> None:
    _need(isinstance(specs, list), f"manifest: {where} must be a list")
    for s in specs:
        _need(isinstance(s, dict) and {"name", "dtype", "shape"} <= set(s), f"manifest: bad entry in {where}: {s}")
        _need(s["dtype"] in _DTYPES, f"manifest: {where} {s['name']} has unknown dtype {s['dtype']}")
        _need(all(isinstance(d, int) or d in ("batch", "length") for d in s["shape"]),
              f"manifest: {where} {s['name']} has a bad shape {s['shape']}")


def load_manifest(out_dir: str | Path) -> dict:
    """Read and validate `out_dir/manifest.json`; every file it names must be there and fit."""
    root = Path(out_dir)
    path = root / MANIFEST
    _need(root.is_dir(), f"artifact directory {root} does not exist")
    _need(path.is_file(), f"artifact {root}: {MANIFEST} is missing (not an lcsm_compile ONNX export?)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"artifact {root}: {MANIFEST} is not valid JSON: {e}") from e
    _need(isinstance(m, dict) and m.get("format") == FORMAT, f"artifact {root}: not an {FORMAT} manifest")
    version = m.get("format_version")
    _need(version == FORMAT_VERSION,
          f"artifact {root}: manifest format version {version}, this lcsm_compile reads version {FORMAT_VERSION}; "
          "re-export the model with this version")
    for key in ("max_len", "inputs", "outputs", "prefill", "segments", "schedule", "mixers", "positional"):
        _need(key in m, f"artifact {root}: manifest lacks '{key}'")
    _need(isinstance(m["max_len"], int) and m["max_len"] >= 1, f"manifest: bad max_len {m['max_len']}")
    _check_io(m["inputs"], "inputs")
    _check_io(m["outputs"], "outputs")
    _file(root, m["prefill"]["file"], "prefill graph")
    _check_io(m["prefill"]["inputs"], "prefill inputs")
    _check_io(m["prefill"]["outputs"], "prefill outputs")
    for seg in m["segments"]:
        _file(root, seg["file"], f"segment {seg['index']}")
        _check_io(seg["inputs"], f"segment {seg['index']} inputs")
        _check_io(seg["outputs"], f"segment {seg['index']} outputs")
    if m.get("external_data"):
        _file(root, m["external_data"], "external weights")
    _check_mixers(root, m)
    _check_dataflow(m)
    return m


def _check_mixers(root: Path, m: dict) -> None:
    for mx in m["mixers"]:
        name = mx.get("name", "?")
        _need(mx.get("kind") in ("short", "long"), f"manifest: mixer {name} has unknown kind {mx.get('kind')}")
        shape = mx["filter_shape"]
        _need(len(shape) == 2 and shape[0] == mx["channels"] and shape[1] == mx["filter_length"],
              f"manifest: mixer {name} filter shape {shape} does not match channels {mx['channels']} "
              f"and filter_length {mx['filter_length']}")
        path = _file(root, mx["filter_file"], f"mixer {name} filter")
        want = int(np.prod(shape)) * np.dtype(mx["filter_dtype"]).itemsize
        got = path.stat().st_size
        _need(got == want, f"artifact {root}: filter file {mx['filter_file']} has {got} bytes, its shape {shape} "
                           f"({mx['filter_dtype']}) needs {want}")
    for t in m["positional"]:
        path = _file(root, t["file"], f"positional table {t['name']}")
        want = int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
        _need(path.stat().st_size == want, f"artifact {root}: positional table {t['file']} has the wrong size")
        _need(t["shape"][t["time_dim"]] >= m["max_len"], f"manifest: positional table {t['name']} shorter than max_len")


def _check_dataflow(m: dict) -> None:
    """Every value a step reads is written before, with the shape its reader expects."""
    known = {s["name"]: s for s in m["inputs"]}
    known.update({t["name"]: t for t in m["positional"]})
    mixers = {mx["index"]: mx for mx in m["mixers"]}
    for mx in mixers.values():
        if mx["kind"] == "short":
            known[mx["state"]] = {"name": mx["state"], "shape": ["batch", mx["channels"], mx["filter_length"] - 1]}
    for entry in m["schedule"]:
        if "segment" in entry:
            seg = m["segments"][entry["segment"]]
            for s in seg["inputs"]:
                _need(s["name"] in known, f"manifest: segment {seg['index']} reads {s['name']} before it is written")
                if s["name"] not in {t["name"] for t in m["positional"]} and s["name"] not in io_names(m["inputs"]):
                    _need(known[s["name"]]["shape"] == s["shape"] or "shape" not in known[s["name"]],
                          f"manifest: segment {seg['index']} reads {s['name']} with shape {s['shape']}, "
                          f"written with shape {known[s['name']]['shape']}")
            known.update({s["name"]: s for s in seg["outputs"]})
        else:
            for i in entry["mixers"]:
                _need(i in mixers and mixers[i]["kind"] == "long", f"manifest: schedule names unknown mixer {i}")
                mx = mixers[i]
                _need(mx["input"] in known, f"manifest: mixer {mx['name']} reads {mx['input']} before it is written")
                shape = known[mx["input"]].get("shape")
                _need(shape in (None, ["batch", mx["channels"], 1]) or shape[1:] == [mx["channels"], 1],
                      f"manifest: mixer {mx['name']} has {mx['channels']} channels, its input {mx['input']} "
                      f"has shape {shape}")
                known[mx["output"]] = {"name": mx["output"], "shape": ["batch", mx["channels"], 1]}
    for out in m["outputs"]:
        _need(out["step_value"] in known, f"manifest: output {out['name']} ({out['step_value']}) is never written")
