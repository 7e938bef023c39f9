"""ONNX export of the static parts and an onnxruntime-backed runner.

    lcsm_compile.export_onnx(model, example_input, out_dir="artifact/", max_len=65536)
    dec = lcsm_compile.export.OnnxDecoder("artifact/")

Loaded lazily: OnnxDecoder (onnx_decoder.py, manifest.py, online_conv_numpy.py) needs only numpy
and onnxruntime; the exporter needs torch and onnx.
"""
from __future__ import annotations

__all__ = ["ExportError", "ManifestError", "NumpyOnlineConv", "OnnxDecoder", "export_onnx", "load_manifest"]

_WHERE = {
    "export_onnx": "onnx_export",
    "ExportError": "program",
    "OnnxDecoder": "onnx_decoder",
    "ManifestError": "manifest",
    "load_manifest": "manifest",
    "NumpyOnlineConv": "online_conv_numpy",
}


def __getattr__(name):
    if name in _WHERE:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
