"""program: what the exporter knows about a model, read off its rewritten ATen graph.

    capture(model, inputs, max_len) -> ExportPlan: the graph the lcsm pipeline rewrote (time and
    batch dynamic, filters folded at max_len), its mixers (each `lcsm::causal_conv` node with its
    folded filter, trimmed to its last non-zero tap) and the role of every node.

`GraphCopier` copies nodes of that graph into a new graph (the prefill graph, a step segment,
a positional table): weights become buffers of the new module, sizes (SymInts) become
expressions of the new graph's inputs, asserts are dropped. Both the prefill and the step
segments are built with it, so both read the same nodes.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import Tensor, fx, nn

from ..backend import lcsm_backend, report_listeners
from ..passes.capture import CapturedGraph, sym_expr
from ..passes.pipeline import CompileReport
from ..passes.region import describe_node
from ..passes.seq_axis import MIXING, mixing_reason, seq_axis
from ..passes.verify import filter_extent
from ..settings import Settings

__all__ = ["ExportError", "ExportPlan", "MixerSpec", "GraphCopier", "capture", "describe"]

aten = torch.ops.aten
CAUSAL_CONV = torch.ops.lcsm.causal_conv.default
SHORT, LONG = "short", "long"
_SEQ = "lcsm_export_seq"
_ASSERTS = {aten._assert_scalar.default, aten._assert_tensor_metadata.default,
            aten.sym_constrain_range_for_size.default}


class ExportError(RuntimeError):
    """A model (or a part of it, named in the message) that cannot be exported."""


def describe(node: fx.Node) -> str:
    return describe_node(node)


@dataclass
class MixerSpec:
    index: int
    node: fx.Node  # the causal_conv node
    kind: str  # "short": ring buffer inside a segment; "long": online convolution between segments
    filter: Tensor  # (C, K), trimmed to the last non-zero tap, skip term in [:, 0]
    source: str  # the model node the mixer was rewritten from

    @property
    def name(self) -> str:
        return f"mixer{self.index}"

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    @property
    def channels(self) -> int:
        return int(self.filter.shape[0])

    @property
    def filter_length(self) -> int:
        return int(self.filter.shape[1])


@dataclass
class ExportPlan:
    cg: CapturedGraph
    report: CompileReport
    max_len: int
    mixers: list[MixerSpec]
    seq_inputs: list[fx.Node]  # placeholders the caller passes, in order
    length_symbol: sympy.Symbol
    batch_symbol: sympy.Symbol | None
    example_batch: int
    values: dict[fx.Node, Any] = field(default_factory=dict)  # static placeholder -> real tensor

    @property
    def gm(self) -> fx.GraphModule:
        return self.cg.gm

    def mixer_of(self, node: fx.Node) -> MixerSpec | None:
        return self._by_node.get(node)

    def __post_init__(self) -> None:
        self._by_node = {m.node: m for m in self.mixers}

    def outputs(self) -> list[fx.Node]:
        (out,) = self.gm.graph.find_nodes(op="output")
        return list(out.args[0])


# ------------------------------------------------------------------------------------------ roles
def is_size(node: fx.Node) -> bool:
    """A SymInt/int-valued node: rebuilt from its expression wherever it is needed."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymBool, torch.SymFloat, int, float, bool))


def is_seq(node: fx.Node) -> bool:
    """Reads the data of the sequence inputs (not only their sizes); a tensor or tuple of tensors."""
    return bool(node.meta.get(_SEQ)) and not is_size(node)


def _mark_seq(cg: CapturedGraph) -> None:
    # seq_axis's lcsm_seq also holds for values that read only a size of a sequence (a filter
    # sliced to L); those are static or positional here.
    roles = {inp.node: inp.role for inp in cg.inputs}
    for node in cg.gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[_SEQ] = roles.get(node) == "sequence"
        else:
            node.meta[_SEQ] = not is_size(node) and any(is_seq(a) for a in node.all_input_nodes)


def is_positional(node: fx.Node) -> bool:
    return not is_seq(node) and not is_size(node) and bool(node.meta.get("lcsm_time"))


def is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERTS


# ---------------------------------------------------------------------------------------- capture
def _batched(x: Any, seq_dim: int, index: int) -> Any:
    if not isinstance(x, Tensor):
        return x
    if x.dim() <= seq_dim:
        raise ExportError(f"export: input {index} has shape {tuple(x.shape)}; every tensor input needs a batch "
                          f"dim 0 and a time dim {seq_dim}")
    if x.shape[seq_dim] < 2:
        raise ExportError(f"export: input {index} has length {x.shape[seq_dim]}; give an example of length >= 2")
    x = x.detach().clone()
    if x.shape[0] == 1:  # a batch of one would be specialised; two keeps the batch dim dynamic
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    torch._dynamo.maybe_mark_dynamic(x, 0)
    torch._dynamo.maybe_mark_dynamic(x, seq_dim)
    return x


def _fresh_caller(model: nn.Module):
    """A new code object per capture, so dynamo's cache (and its recompile limit) start empty."""
    def call(*args):
        return model(*args)

    return types.FunctionType(call.__code__.replace(), call.__globals__, "lcsm_export_capture", None,
                              call.__closure__)


def capture(model: nn.Module, example_inputs: tuple, max_len: int, seq_dim: int = 1) -> ExportPlan:
    """Run the lcsm pipeline on `model` with dynamic batch and time; the rewritten graph and its mixers."""
    if not isinstance(max_len, int) or max_len < 2:
        raise ExportError(f"export: max_len must be an int >= 2, got {max_len!r}")
    inputs = [_batched(x, seq_dim, i) for i, x in enumerate(example_inputs)]
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and x.shape[seq_dim] > max_len:
            raise ExportError(f"export: example input {i} has length {x.shape[seq_dim]} > max_len={max_len}")
    options = {"inner_backend": "eager", "max_len": max_len, "strict": False, "seq_dim": seq_dim}
    got: list = []
    listener = lambda report, cg: got.append((report, cg))  # noqa: E731
    compiled = torch.compile(_fresh_caller(model), backend=functools.partial(lcsm_backend, options=options),
                             fullgraph=True)
    was_training = model.training
    model.eval()
    report_listeners.append(listener)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            compiled(*inputs)
    except Exception as e:  # noqa: BLE001 - a graph break or an error while tracing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"export: cannot capture the model as one graph ({type(e).__name__}: {first})") from e
    finally:
        report_listeners.remove(listener)
        model.train(was_training)
    if len(got) != 1:
        why = "; ".join(str(w.message) for w in caught if str(w.message).startswith("lcsm")) or "no graph"
        raise ExportError(f"export: the lcsm pipeline did not process this model as one graph: {why}")
    report, cg = got[0]
    if report.unsupported:
        parts = "; ".join(f"{u.node}: {u.reason}" for u in report.unsupported)
        raise ExportError(f"export: cannot export, part of the model cannot be rewritten for decoding: {parts}")
    if not cg.symbolic:
        raise ExportError("export: the time dim was specialised during capture (the model computes with the "
                          "length as a Python int, e.g. an FFT size from L.bit_length()); export needs one graph "
                          "valid for every length up to max_len")
    return _plan(cg, report, max_len, inputs)


def _plan(cg: CapturedGraph, report: CompileReport, max_len: int, inputs: list) -> ExportPlan:
    seq_axis(cg)  # annotate the rewritten graph (new nodes included)
    _mark_seq(cg)
    for node in cg.gm.graph.nodes:
        if node.meta.get("lcsm_class") == MIXING:
            raise ExportError(f"export: {describe(node)} mixes time steps and is not a causal convolution: "
                              f"{mixing_reason(node)}")
    short_max = Settings().short_conv_max
    sources = [m.node for m in report.mixers]
    mixers = []
    for node in cg.gm.graph.nodes:
        if node.op == "call_function" and node.target is CAUSAL_CONV:
            h, attr = _filter_of(cg.gm, node)
            K = filter_extent(h)  # as the decoder counts taps: FFT round-off is not a tap
            i = len(mixers)
            kind = SHORT if K <= short_max else LONG
            j = re.fullmatch(r"lcsm_filter_(\d+)", attr)
            source = sources[int(j.group(1))] if j and int(j.group(1)) < len(sources) else describe(node)
            mixers.append(MixerSpec(i, node, kind, h[:, :K].detach().clone().contiguous(), source))
    seq_inputs = [inp.node for inp in cg.inputs if inp.role == "sequence"]
    values = {inp.node: inp.value for inp in cg.inputs if inp.role == "static"}
    batch = None
    first = seq_inputs[0].meta["val"]
    expr = sym_expr(first.shape[0])
    if isinstance(expr, sympy.Symbol) and expr != cg.time_symbol:
        batch = expr
    plan = ExportPlan(cg, report, max_len, mixers, seq_inputs, cg.time_symbol, batch,
                      int(inputs[0].shape[0]) if isinstance(inputs[0], Tensor) else 2, values)
    for node in seq_inputs:
        val = node.meta["val"]
        if sym_expr(val.shape[1]) != cg.time_symbol:
            raise ExportError(f"export: input {node.name} has no dynamic time dim 1")
    return plan


def _filter_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Tensor, str]:
    h = node.args[1]
    if h.op == "call_function" and h.target is aten.slice.Tensor:
        h = h.args[0]
    if h.op != "get_attr":
        raise ExportError(f"export: the filter of {describe(node)} is not a folded buffer")
    return getattr(gm, h.target), h.target


# ---------------------------------------------------------------------------------------- copier
def buffer_name(source: str) -> str:
    """`L['self']._modules['mixer']._parameters['h']` -> `mixer_h` (an ONNX initializer name)."""
    parts = [p for p in re.findall(r"\['([^']*)'\]", source) if p not in ("self",)]
    name = "_".join(parts) if parts else source
    return re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "w"


class GraphCopier:
    """Copies nodes of the rewritten graph into a new graph module.

    `value(node)` gives the node's counterpart: from `env` if it is there, else `lookup(node)` (a
    hook for sequence values: a placeholder, or an error), else a copy built on demand: weights
    become buffers, sizes are rebuilt from `size(symbol)`, other static nodes are copied with
    their inputs.
    """

    def __init__(self, plan: ExportPlan, size: Callable[[sympy.Symbol], Any],
                 lookup: Callable[[fx.Node], Any] | None = None):
        self.plan = plan
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.size = size
        self.lookup = lookup
        self._buffers: dict[str, fx.Node] = {}

    def _after_placeholders(self):
        first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        return self.graph.inserting_before(first) if first is not None else contextlib.nullcontext()

    def buffer(self, name: str, tensor: Tensor) -> fx.Node:
        if name not in self._buffers:
            self.root.register_buffer(name, tensor.detach().clone())
            with self._after_placeholders():
                self._buffers[name] = self.graph.get_attr(name)
        return self._buffers[name]

    def placeholder(self, name: str) -> fx.Node:
        with self._after_placeholders():
            return self.graph.placeholder(name.replace(".", "_"))

    def expr(self, e: Any) -> Any:
        """An int, or nodes computing a sympy expression of the size symbols."""
        e = sympy.sympify(e)
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            return self.size(e)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            fn = operator.add if isinstance(e, sympy.Add) else operator.mul
            terms = [self.expr(a) for a in e.args]
            acc = terms[0]
            for t in terms[1:]:
                acc = fn(acc, t) if not isinstance(acc, fx.Node) and not isinstance(t, fx.Node) \
                    else self.graph.call_function(fn, (acc, t))
            return acc
        raise ExportError(f"export: cannot express the size {e} in the exported graph")

    def value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node in self.env:
            return self.env[node]
        if self.lookup is not None:
            found = self.lookup(node)
            if found is not None:
                self.env[node] = found
                return found
        self.env[node] = out = self._copy(node)
        return out

    def _copy(self, node: fx.Node) -> Any:
        if is_size(node):
            val = node.meta["val"]
            if isinstance(val, torch.SymInt):
                return self.expr(sym_expr(val))
            if isinstance(val, (int, float, bool)):
                return val
            raise ExportError(f"export: cannot rebuild the symbolic value {describe(node)}")
        if node.op == "placeholder":
            if node in self.plan.values:
                return self.buffer(buffer_name(self._source(node)), self.plan.values[node])
            raise ExportError(f"export: unexpected graph input {node.name}")
        if node.op == "get_attr":
            return self.buffer(node.target, getattr(self.plan.gm, node.target))
        if is_seq(node):
            raise ExportError(f"export: internal: sequence value {describe(node)} reached the static copier")
        return self.copy(node)

    def copy(self, node: fx.Node) -> fx.Node:
        """node_copy with every argument mapped through value()."""
        return self.graph.node_copy(node, self.value)

    def _source(self, node: fx.Node) -> str:
        inp = self.plan.cg.input_of(node)
        return inp.source if inp is not None else node.name

    def module(self, outputs: list) -> fx.GraphModule:
        self.graph.output(tuple(outputs))
        self.graph.eliminate_dead_code()
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)
