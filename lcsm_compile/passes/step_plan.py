"""The step plan: what incrementalize proves and the runtime executes (runtime/step_program.py).

A StepPlan is the rewritten graph cut into segments at its long convolutions; each ConvSite is
one `lcsm::causal_conv` with its folded filter and decode strategy (ring buffer, modal
recurrence or tiling)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .. import ops as _ops  # noqa: F401 - registers lcsm::causal_conv
from .capture import CapturedGraph
from .modal import Strategy

__all__ = ["CAUSAL_CONV", "ConvSite", "IncrementalizeError", "Segment", "StepPlan"]

CAUSAL_CONV = torch.ops.lcsm.causal_conv.default


class IncrementalizeError(RuntimeError):
    """The graph has no exact step form; `problems` lists (node, reason)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems = list(dict.fromkeys(problems))
        lines = "; ".join(f"{node}: {reason}" for node, reason in problems)
        super().__init__(f"lcsm: cannot decode this model step by step: {lines}")


@dataclass
class ConvSite:
    node: fx.Node
    index: int  # order among the graph's causal_conv nodes
    x: fx.Node  # its input (B', C, L)
    filter: Tensor  # (C, K) at the fold length, skip in filter[:, 0]
    filter_length: int  # taps up to the last significant one (verify.filter_extent)
    short: bool  # a ring buffer of filter_length - 1 inputs instead of the online engine
    attr: str | None = None  # the graph's buffer holding the filter (the runtime may slim it)
    depth: int = 0  # long: steps after segment `depth`; short: runs inside segment `depth`
    strategy: Strategy | None = None  # long convs: "modal" (its recurrence) or "long" (the tiling)

    @property
    def batch(self) -> int:
        return int(self.x.meta["val"].shape[0])

    @property
    def channels(self) -> int:
        return int(self.filter.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.node.meta["val"].dtype


@dataclass
class Segment:
    """Nodes evaluated together between two rounds of long-conv steps, and what crosses its border.

    Input keys: ("seq", placeholder), ("conv", node), ("value", node) from an earlier segment,
    ("static", node), ("positional", node), ("state", conv index), ("taps", conv index), ("t",).
    Output keys: ("conv_in", conv index), ("state", conv index), ("value", node)."""

    index: int
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[tuple] = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)


@dataclass
class StepPlan:
    cg: CapturedGraph
    max_len: int
    convs: list[ConvSite]
    segments: list[Segment]
    nodes: list[fx.Node]  # every node the full graph evaluates, in order
    outputs: list[Any]  # the output node's flat args (nodes or constants)
    output_time: list[int | None]  # time dim of each output, None for outputs without one
    seq_inputs: list[fx.Node]  # sequence placeholders, in graph order
    frontier: list[fx.Node]  # input-independent tensors the position-wise part reads
    time_dim: dict[fx.Node, int] = field(default_factory=dict)  # positional frontier -> time dim

    @property
    def symbolic(self) -> bool:
        return self.cg.symbolic

    @property
    def long_convs(self) -> list[ConvSite]:
        return [c for c in self.convs if not c.short]

    def conv_of(self, node: fx.Node) -> ConvSite:
        return self._by_node[node]

    @property
    def convs_by_index(self) -> dict[int, ConvSite]:
        return {c.index: c for c in self.convs}

    def __post_init__(self):
        self._by_node = {c.node: c for c in self.convs}
