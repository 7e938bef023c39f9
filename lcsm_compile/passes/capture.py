"""capture: the dynamo graph as an ATen-level inference graph, with each input's role known.

aot_autograd lowers and functionalizes the graph; its placeholders line up one to one with
the dynamo graph's inputs, which lets us map parameters and buffers (graph inputs since
torch 2.x inlines nn.Modules) back to the module's real tensors, so later passes can fold
filter generators with their values. Inputs are parameters/buffers ("static"), SymInts
(sizes of dynamic dims) or sequence tensors (everything else the caller passes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

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


def _is_static_source(name: str, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or "_parameters" in name or "_buffers" in name


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
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else dn.name
        source = source() if callable(source) else str(source)
        if isinstance(value, (int, torch.SymInt)):
            role = "sym"
            if isinstance(value, torch.SymInt):
                value = int(value.node.hint)  # the size this call was made with
        elif isinstance(value, torch.Tensor) and _is_static_source(source, value):
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
