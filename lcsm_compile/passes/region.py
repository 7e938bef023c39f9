"""A mixer region u -> y cut out of the graph and made callable on its own.

The verifier probes regions with impulses and random inputs, and the fold pass evaluates them
at max_len; both need "y as a function of u" with every other input held at its real value.
Nodes that do not depend on u (the filter generator) are evaluated once per length and cached,
so an implicit MLP filter runs once per compile however many probes are made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from .capture import CapturedGraph, sym_expr

__all__ = ["Region", "RegionFunction", "backward_slice", "foreign_inputs"]


@dataclass
class Region:
    kind: str  # which matcher proposed it: "fft", "conv", "toeplitz", "cumsum", ...
    seed: fx.Node  # the mixing node the matcher started from
    u: fx.Node  # region input: a sequence value
    y: fx.Node  # region output: same shape as u
    nodes: list[fx.Node] = field(default_factory=list)  # backward slice of y, topological order

    def describe(self) -> str:
        return describe_node(self.seed)


def describe_node(node: fx.Node) -> str:
    """`aten._fft_r2c (model.py:42 in forward)` style: the op and the user's source line."""
    target = str(node.target) if node.op == "call_function" else node.name
    where = ""
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
        if lines:
            last = lines[-1]
            try:
                file = last.split('"')[1].rsplit("/", 1)[-1]
                line = last.split("line ")[1].split(",")[0]
                func = last.rsplit(" in ", 1)[-1]
                where = f" ({file}:{line} in {func})"
            except IndexError:
                where = ""
    return f"{target}{where}"


def backward_slice(y: fx.Node, stop: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes needed to compute y from `stop`, and the leaves (graph inputs, constants)."""
    seen: set[fx.Node] = set()
    leaves: set[fx.Node] = set()
    stack = [y]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is stop or n.op in ("placeholder", "get_attr"):
            leaves.add(n)
            continue
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(y.graph.nodes)}
    nodes = sorted((n for n in seen if n not in leaves), key=order.__getitem__)
    return nodes, leaves


def depends_on(node: fx.Node, target: fx.Node, _memo: dict | None = None) -> bool:
    memo = {} if _memo is None else _memo
    if node is target:
        return True
    if node in memo:
        return memo[node]
    memo[node] = False
    memo[node] = any(depends_on(a, target, memo) for a in node.all_input_nodes)
    return memo[node]


def foreign_inputs(region: Region) -> list[fx.Node]:
    """Sequence-dependent values other than u that the region reads (data-dependent filters)."""
    nodes, leaves = backward_slice(region.y, region.u)
    memo: dict = {}
    out = []
    for n in list(leaves) + nodes:
        if n is region.u or not n.meta.get("lcsm_seq"):
            continue
        if n in leaves or not depends_on(n, region.u, memo):
            # The earliest such node is the informative one; skip its sequence descendants.
            if not any(a in out for a in n.all_input_nodes):
                out.append(n)
    return out


class RegionFunction:
    """y = f(u) for one region, every other input held at its captured value."""

    def __init__(self, cg: CapturedGraph, region: Region):
        self.cg = cg
        self.region = region
        self.nodes, self.leaves = backward_slice(region.y, region.u)
        memo: dict = {}
        self.dynamic = [n for n in self.nodes if depends_on(n, region.u, memo)]
        self.constant = [n for n in self.nodes if n not in set(self.dynamic)]
        self._cache: dict[tuple, dict[fx.Node, Any]] = {}
        self.constant_evaluations = 0
        u_val = region.u.meta["val"]
        self._u_symbols = {i: sym_expr(s) for i, s in enumerate(u_val.shape)}

    def _bindings(self, shape: torch.Size) -> dict:
        binding = {}
        for i, expr in self._u_symbols.items():
            if isinstance(expr, sympy.Symbol):
                binding[expr] = int(shape[i])
            elif int(expr) != int(shape[i]):
                raise ValueError(f"region input has static size {expr} in dim {i}, probe has {shape[i]}")
        return binding

    def _leaf_value(self, node: fx.Node, binding: dict) -> Any:
        if node.op == "get_attr":
            return getattr(self.cg.gm, node.target)
        inp = self.cg.input_of(node)
        if inp is None:
            raise RuntimeError(f"region leaf {node} is not a graph input")
        if inp.role == "sym":
            expr = sym_expr(node.meta.get("val"))
            if isinstance(expr, sympy.Expr) and expr.free_symbols <= set(binding):
                return int(expr.subs(binding))
            return inp.value
        if inp.role == "static":
            return inp.value
        raise RuntimeError(f"region reads sequence input {node.name} other than its own input")

    @staticmethod
    def _run(node: fx.Node, env: dict) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        return node.target(*args, **kwargs)

    def constants(self, shape: torch.Size) -> dict[fx.Node, Any]:
        """Values of the region's u-independent nodes (the filter) at this input shape, cached."""
        binding = self._bindings(shape)
        key = tuple(sorted((str(k), v) for k, v in binding.items()))
        if key not in self._cache:
            env = {leaf: self._leaf_value(leaf, binding) for leaf in self.leaves if leaf is not self.region.u}
            with torch.no_grad():
                for node in self.constant:
                    env[node] = self._run(node, env)
            self.constant_evaluations += 1
            from .pipeline import counters  # noqa: PLC0415 - pipeline imports this module

            counters["filter"]["evaluations"] += 1
            self._cache[key] = env
        return self._cache[key]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        env = dict(self.constants(u.shape))
        env[self.region.u] = u
        with torch.no_grad():
            for node in self.dynamic:
                env[node] = self._run(node, env)
        return env[self.region.y]
