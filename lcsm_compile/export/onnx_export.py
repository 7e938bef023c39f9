"""export_onnx: an LCSM as deployable ONNX graphs, folded filters and a manifest.

    out_dir/
      manifest.json          what is where (manifest.py)
      prefill.onnx           the full forward, batch and length dynamic (length <= max_len)
      segment_<k>.onnx       the static parts of one decode step, in order (graphs.py)
      filters/mixer<i>.bin   folded filters (C, K), raw little-endian; the graphs' filter
                             initializers point here (ONNX external data)
      positional/*.bin       POSITIONAL tables at max_len, sliced at t by the decoder
      weights.bin            every other initializer of every graph, stored once (deduplicated)

The model is captured by the lcsm pipeline (program.py), cut into graphs (graphs.py) and each
graph exported with torch.onnx (dynamo), `lcsm::causal_conv` translated by onnx_conv.py. A node
the exporter cannot translate is named in the error. After writing, the artifact is run with
onnxruntime against the eager model for a few positions (check=True) and refused if it differs.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .graphs import (
    BATCH,
    LENGTH,
    PREFILL_CONV_MAX,
    GraphSpec,
    IOSpec,
    build_prefill,
    build_step_program,
    combine_segments,
)
from .manifest import FORMAT, FORMAT_VERSION, write_manifest
from .onnx_conv import causal_conv_translation
from .program import CAUSAL_CONV, LONG, ExportError, ExportPlan, capture, describe

__all__ = ["export_onnx"]

_ALIGN = 4096
_INLINE_BYTES = 1024


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _io(spec: IOSpec) -> dict:
    return {"name": spec.name, "dtype": _dtype(spec.dtype), "shape": list(spec.shape)}


class _ExternalData:
    """Initializers of all graphs in one weights file (each distinct tensor once); filters in theirs."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir
        self.weights = "weights.bin"
        self._file = open(out_dir / self.weights, "wb")  # noqa: SIM115 - closed in close()
        self._offset = 0
        self._seen: dict[bytes, tuple[int, int]] = {}
        self.files: dict[str, bytes] = {}  # initializer name -> contents of its own file

    def write(self, rel: str, array: np.ndarray, initializer: str | None = None) -> None:
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        path.write_bytes(data)
        if initializer is not None:
            self.files[initializer] = (rel, data)

    def _append(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha1(data).digest() + len(data).to_bytes(8, "little")
        if key not in self._seen:
            pad = -self._offset % _ALIGN
            self._file.write(b"\0" * pad)
            self._seen[key] = (self._offset + pad, len(data))
            self._file.write(data)
            self._offset += pad + len(data)
        return self._seen[key]

    def externalize(self, model) -> None:
        from onnx import external_data_helper, numpy_helper  # noqa: PLC0415

        for t in model.graph.initializer:
            data = numpy_helper.to_array(t)
            raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
            own = self.files.get(t.name)
            if own is not None and own[1] == raw:
                location, offset, length = own[0], 0, len(raw)
            elif len(raw) >= _INLINE_BYTES:
                (offset, length), location = self._append(raw), self.weights
            else:
                continue
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            t.raw_data = raw
            external_data_helper.set_external_data(t, location, offset, length)
            t.ClearField("raw_data")

    def close(self) -> None:
        self._file.close()


def _dynamic_shapes(specs: list[IOSpec], max_len: int):
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length", max=max_len)
    return tuple({d: batch if s == BATCH else length for d, s in enumerate(sp.shape) if s in (BATCH, LENGTH)}
                 or None for sp in specs)


def _unsupported_node(gm: torch.fx.GraphModule, opset: int) -> torch.fx.Node | None:
    """The first node neither torchlib nor a decomposition can translate (to name in the error)."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry  # noqa: PLC0415

        registry = ONNXRegistry.from_torchlib(max(opset, 18))
    except Exception:  # noqa: BLE001 - private API; without it we cannot say which node
        return None
    decomps = torch.export.default_decompositions()
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t is CAUSAL_CONV:
            continue
        if registry.is_registered(t) or t in decomps or t._can_decompose():
            continue
        return node
    return None


@contextlib.contextmanager
def _torchlib_once():
    """torch.onnx.export rebuilds its registry of translations (~2 s) on every call; build it once
    per export_onnx (each call still gets its own copy to add the custom translation to)."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry  # noqa: PLC0415

        original = ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):  # private API moved: export at the normal speed
        yield
        return
    built: dict = {}

    def from_torchlib(cls, opset_version=None, **kwargs):
        key = (cls, opset_version, tuple(sorted(kwargs.items())))
        if key not in built:
            args = () if opset_version is None else (opset_version,)
            built[key] = original.__func__(cls, *args, **kwargs)
        registry = copy.copy(built[key])
        registry.functions = {k: list(v) for k, v in built[key].functions.items()}
        return registry

    ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


def _to_onnx(spec: GraphSpec, what: str, opset: int, max_len: int, batch: int):
    # a prime example length, so no static size of the model equals it by chance
    examples = tuple(s.example(batch, min(max_len, 13)) for s in spec.inputs)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
            program = torch.onnx.export(
                spec.gm, examples, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                input_names=[s.name for s in spec.inputs], output_names=[s.name for s in spec.outputs],
                dynamic_shapes=_dynamic_shapes(spec.inputs, max_len),
                custom_translation_table={CAUSAL_CONV: causal_conv_translation(opset)})
    except Exception as e:  # noqa: BLE001 - re-raised with the node that caused it
        node = _unsupported_node(spec.gm, opset)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if node is not None:
            raise ExportError(f"export: {what}: {describe(node)} has no ONNX translation (opset {opset}): "
                              f"{first}") from e
        raise ExportError(f"export: {what} failed to export to ONNX: {type(e).__name__}: {first}") from e
    finally:
        logger.setLevel(level)
    return program.model_proto


def export_onnx(model: nn.Module, *example_inputs, out_dir, max_len: int, opset: int = 18,
                check: bool = True) -> dict:
    """Export `model` for deployment; returns the manifest (also written to out_dir/manifest.json).

    example_inputs: one call of the model (batch-first, time at dim 1, length >= 2).
    max_len: the longest sequence (prompt + generated) the artifact serves; filters fold there.
    check: run the artifact with onnxruntime against the eager model before returning.
    """
    causal_conv_translation(opset)  # refuses unsupported opsets before any work
    model, example_inputs = _on_cpu(model, example_inputs)
    plan = capture(model, example_inputs, max_len)
    prefill = build_prefill(plan)
    program = build_step_program(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = _ExternalData(out)
    try:
        files = _write_graphs(plan, prefill, program, store, out, opset)
    finally:
        store.close()
    manifest = _manifest(plan, prefill, program, files, opset, store)
    write_manifest(out, manifest)
    if check:
        from .check import check_artifact  # noqa: PLC0415

        check_artifact(model, example_inputs, out)
    return manifest


def _on_cpu(model: nn.Module, example_inputs: tuple) -> tuple[nn.Module, tuple]:
    """Export traces on the CPU in fp32 (the graphs run in fp32); a model elsewhere is copied there."""
    tensors = list(model.parameters()) + list(model.buffers())
    odd = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype != torch.float32})
    if odd:
        raise ExportError(f"export: the model holds {', '.join(odd)} weights; export an fp32 model "
                          "(model.float()): the exported graphs and the filter files are fp32")
    if any(t.device.type != "cpu" for t in tensors):
        model = copy.deepcopy(model).cpu()
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    return model, example_inputs


def _write_graphs(plan: ExportPlan, prefill: GraphSpec, program, store: _ExternalData, out: Path, opset: int):
    import onnx  # noqa: PLC0415

    for m in plan.mixers:
        store.write(f"filters/{m.name}.bin", m.filter.to(m.input.meta["val"].dtype).numpy(),
                    initializer=f"lcsm_filter_{m.index}")
    for t in program.positional:
        store.write(f"positional/{t.name.replace('.', '_')}.bin", t.table.numpy())
    files = ["prefill.onnx"] + [f"segment_{k}.onnx" for k in range(len(program.segments))]
    models = []
    with _torchlib_once():
        models.append(_to_onnx(prefill, "the prefill graph", opset, plan.max_len, plan.example_batch))
        if program.segments:
            step = combine_segments(program.segments)
            whole = _to_onnx(step, "the step segments", opset, plan.max_len, plan.example_batch)
            models += [_cut(whole, seg, k) for k, seg in enumerate(program.segments)]
    opsets = set()
    for file, model in zip(files, models):
        store.externalize(model)
        onnx.save_model(model, str(out / file))
        opsets.add(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    graphs = files
    return {"files": graphs, "opsets": sorted(opsets)}


def _value_info(spec: IOSpec):
    from onnx import helper  # noqa: PLC0415

    from ._onnx_types import elem_type  # noqa: PLC0415

    return helper.make_tensor_value_info(spec.name, elem_type(spec.dtype), [str(s) if isinstance(s, str) else s
                                                                             for s in spec.shape])


def _cut(whole, seg: GraphSpec, k: int):
    """Segment k out of the combined step graph: from its inputs to its outputs."""
    from onnx import utils  # noqa: PLC0415

    try:
        model = utils.Extractor(whole).extract_model([s.name for s in seg.inputs], [s.name for s in seg.outputs])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"export: cannot cut step segment {k} out of the exported step graph: {e}") from e
    for field, specs in (("input", seg.inputs), ("output", seg.outputs)):
        container = getattr(model.graph, field)
        del container[:]
        container.extend(_value_info(s) for s in specs)
    model.graph.name = f"segment_{k}"
    return model


def _manifest(plan: ExportPlan, prefill: GraphSpec, program, files: dict, opset: int, store) -> dict:
    import onnx  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415

    n_out = len(program.outputs)
    segment_of = {}
    for k, seg in enumerate(program.segments):
        for s in seg.inputs:
            m = re.fullmatch(r"mixer(\d+)\.state", s.name)
            if m:
                segment_of[int(m.group(1))] = k
    mixers = []
    for m in plan.mixers:
        entry = {"index": m.index, "name": m.name, "kind": m.kind, "channels": m.channels,
                 "filter_length": m.filter_length, "fold_length": plan.max_len,
                 "filter_file": f"filters/{m.name}.bin", "filter_dtype": _dtype(m.input.meta["val"].dtype),
                 "filter_shape": [m.channels, m.filter_length], "source": m.source,
                 "prefill_op": "Conv" if m.kind != LONG or m.filter_length <= PREFILL_CONV_MAX else "DFT"}
        if m.kind == LONG:
            entry.update(step="online_conv", input=program.names[m.input], output=f"{m.name}.y",
                         prefill_output=f"{m.name}.u")
        else:
            entry.update(step="ring_buffer", segment=segment_of.get(m.index),
                         state=f"{m.name}.state" if m.filter_length > 1 else None,
                         state_out=f"{m.name}.state_out" if m.filter_length > 1 else None,
                         prefill_output=f"{m.name}.state" if m.filter_length > 1 else None)
        mixers.append(entry)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "lcsm_compile_version": __version__, "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "opset": files["opsets"][0] if len(files["opsets"]) == 1 else files["opsets"], "requested_opset": opset,
        "max_len": plan.max_len, "batch": "dynamic" if plan.batch_symbol is not None else plan.example_batch,
        "inputs": [dict(_io(s), time_dim=1) for s in prefill.inputs],
        "outputs": [dict(_io(s), time_dim=program.output_time_dims[k], step_value=program.outputs[k])
                    for k, s in enumerate(prefill.outputs[:n_out])],
        "prefill": {"file": files["files"][0], "inputs": [_io(s) for s in prefill.inputs],
                    "outputs": [_io(s) for s in prefill.outputs],
                    "convolution": f"Pad + depthwise Conv for filters of <= {PREFILL_CONV_MAX} taps, else DFT "
                                   "at a power-of-two length (onnx_conv.py)"},
        "segments": [{"index": k, "file": files["files"][k + 1], "inputs": [_io(s) for s in seg.inputs],
                      "outputs": [_io(s) for s in seg.outputs]} for k, seg in enumerate(program.segments)],
        "schedule": [{"segment": a} if kind == "segment" else {"mixers": a} for kind, a in program.schedule],
        "mixers": mixers,
        "positional": [{"name": t.name, "file": f"positional/{t.name.replace('.', '_')}.bin",
                        "dtype": _dtype(t.table.dtype), "shape": list(t.table.shape), "time_dim": t.time_dim}
                       for t in program.positional],
        "external_data": store.weights,
    }
