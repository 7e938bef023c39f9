"""capture: the dynamo graph as an ATen-level inference graph, with each input's role known.

aot_autograd lowers and functionalizes the graph; its placeholders line up one to one with
the dynamo graph's inputs, which lets us map parameters and buffers (graph inputs since
torch 2.x inlines nn.Modules) back to the module's real tensors, so later passes can fold
filter generators with their values. Each input's role comes from dynamo's source for it:

    static    the model's own tensors: anything reached through a module (parameters, buffers,
              and plain tensor attributes such as `self.t = torch.arange(L)` set in __init__,
              L['self'].t, L['self']._modules['filter'].t), through the compiled
              function's `self` or closure, or from a global (G['table'])
    sym       SymInts (sizes of dynamic dims)
    sequence  the call's arguments (L['x'], L['args'][0], L['batch'].ids): everything else
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

__all__ = ["GraphInput", "CapturedGraph", "describe_inputs", "sym_expr"]


@dataclass
class GraphInput:
    node: fx.Node
    role: str  # "static" | "sequence" | "sym"
    value: Any  # the real tensor / int the graph was compiled with
    source: str = ""  # dynamo's name for it, e.g. L['self']._parameters['k']
    time_dim: int | None = None  # for sequence inputs


@dataclass
class CapturedGraph:
    """An ATen inference graph plus what the passes learn about it."""

    gm: fx.GraphModule
    inputs: list[GraphInput]
    length: int  # the time length the graph was captured at
    time_symbol: sympy.Symbol | None  # the symbol of the time dim when L is dynamic
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def symbolic(self) -> bool:
        return self.time_symbol is not None

    def input_of(self, node: fx.Node) -> GraphInput | None:
        for inp in self.inputs:
            if inp.node is node:
                return inp
        return None


def sym_expr(value: Any) -> Any:
    """The sympy expression behind a SymInt, or the int itself."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return value


# Source kinds that mean "a module's tensor" and roots that are not arguments of the call.
_MODULE_SOURCES = (
    "NNModuleSource", "UnspecializedNNModuleSource", "UnspecializedBuiltinNNModuleSource",
    "FSDPNNModuleSource", "ParamBufferSource", "UnspecializedParamBufferSource",
)
_GLOBAL_ROOTS = ("GlobalSource", "GlobalWeakRefSource")
_CLOSURE_ROOTS = ("ClosureSource", "CellContentsSource", "LocalCellSource")


def _source_chain(source: Any) -> list[Any]:
    """The source and its bases, outermost first (L['self'].t -> [AttrSource, ..., LocalSource])."""
    chain = []
    while source is not None and len(chain) < 64:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def _is_static_source(name: str, value: Any, source: Any = None) -> bool:
    """A tensor of the model (or a global / closure constant), not an argument of the call."""
    if isinstance(value, torch.nn.Parameter) or "_parameters" in name or "_buffers" in name:
        return True
    chain = _source_chain(source)
    if not chain:
        return False
    kinds = [type(s).__name__ for s in chain]
    if any(k in _MODULE_SOURCES for k in kinds):
        return True  # reached through an nn.Module: a parameter, buffer or plain tensor attribute
    root, root_kind = chain[-1], kinds[-1]
    if root_kind in _GLOBAL_ROOTS or root_kind in _CLOSURE_ROOTS:
        return True
    if root_kind == "LocalSource":
        if getattr(root, "is_derefed_cell_contents", False):
            return True  # a closure variable of the compiled function
        # An attribute of the compiled method's own object (self.table on a non-Module wrapper).
        if getattr(root, "local_name", None) == "self" and "AttrSource" in kinds[:-1]:
            return True
    return False


def describe_inputs(
    dynamo_gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    aten_gm: fx.GraphModule,
    seq_dim: int,
) -> CapturedGraph:
    """Pair the ATen graph's placeholders with the dynamo inputs and classify them."""
    dyn_ph = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    aten_ph = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if not (len(dyn_ph) == len(aten_ph) == len(example_inputs)):
        raise RuntimeError(
            f"capture: {len(aten_ph)} ATen inputs for {len(dyn_ph)} dynamo inputs; cannot map weights"
        )
    inputs: list[GraphInput] = []
    for dn, an, value in zip(dyn_ph, aten_ph, example_inputs):
        grapharg = dn.meta.get("grapharg")
        src = grapharg.source if grapharg is not None else None
        source = src.name if src is not None else dn.name
        source = source() if callable(source) else str(source)
        if isinstance(value, (int, torch.SymInt)):
            role = "sym"
            if isinstance(value, torch.SymInt):
                value = int(value.node.hint)  # the size this call was made with
        elif isinstance(value, torch.Tensor) and _is_static_source(source, value, src):
            role = "static"
        else:
            role = "sequence"
        inputs.append(GraphInput(an, role, value, source))

    # Time is dim `seq_dim` of the sequence inputs; the first one that has it sets L.
    length, time_symbol = None, None
    for inp in inputs:
        if inp.role != "sequence" or not isinstance(inp.value, torch.Tensor):
            continue
        val = inp.node.meta.get("val")
        if val is None or val.dim() <= seq_dim:
            continue
        inp.time_dim = seq_dim
        if length is None:
            length = int(inp.value.shape[seq_dim])
            expr = sym_expr(val.shape[seq_dim])
            if isinstance(expr, sympy.Symbol):
                time_symbol = expr
    if length is None:
        raise RuntimeError("capture: no graph input carries a sequence (no tensor with a time dim)")
    return CapturedGraph(aten_gm, inputs, length, time_symbol)
