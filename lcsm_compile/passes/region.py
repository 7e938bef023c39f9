"""A mixer region u -> y cut out of the graph and made callable on its own.

The verifier probes regions with impulses and random inputs, and the fold pass evaluates them
at max_len; both need "y as a function of u" with every other input held at its real value.
Nodes that do not depend on u (the filter generator) are evaluated once per length and cached,
so an implicit MLP filter runs once per compile however many probes are made.

Memory: an evaluation frees each intermediate after its last use and keeps only what is read
afterwards: the values the u-dependent nodes read (the frontier) and, for modal recognition
(`constants(shape)`), exp / pow nodes and their inputs. Only probing (calling the function)
caches, and only the frontier; `constants(shape)` evaluates afresh without caching, and
`forget()` drops the cache once probing is over. Filters at max_len are large (each hidden
layer of an implicit MLP is (L, width); StripedHyena's exp(t log p) is (D, n, L) complex), so
nothing that size outlives the pass that needs it. Each node's call is recorded at
construction, so the subgraph can be re-evaluated after rewrite has erased its nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from .capture import CapturedGraph, sym_expr

__all__ = ["INSPECTED", "Region", "RegionFunction", "backward_slice", "foreign_inputs", "random_ops"]

aten = torch.ops.aten
# Filter nodes whose values (and their inputs' values) stay readable after evaluation:
# modal recognition reads the poles from exp(t log p) / p ** t over time (passes/modal.py).
INSPECTED = (aten.exp.default, aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.pow.Tensor_Scalar)


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


# Higher-order ops that replay or record the RNG (functionalized dropout under rng functionalization).
_RNG_HOPS = ("run_and_save_rng_state", "run_with_rng_state")


def _draws_random(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    return isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _RNG_HOPS


def random_ops(region: Region) -> list[fx.Node]:
    """Ops in the region that draw random numbers (dropout in train mode, rand, bernoulli).

    A region is folded into one filter evaluated once, and replaced by a convolution: a random
    op inside it would be frozen to the draw the compile made, where eager draws on every call."""
    nodes, _ = backward_slice(region.y, region.u)
    return [n for n in nodes if n.op == "call_function" and _draws_random(n)]


class RegionFunction:
    """y = f(u) for one region, every other input held at its captured value."""

    def __init__(self, cg: CapturedGraph, region: Region):
        self.cg = cg
        self.region = region
        self.nodes, self.leaves = backward_slice(region.y, region.u)
        memo: dict = {}
        self.dynamic = [n for n in self.nodes if depends_on(n, region.u, memo)]
        dynamic = set(self.dynamic)
        self.constant = [n for n in self.nodes if n not in dynamic]
        # Each node's call as it is now: rewrite erases the filter nodes (and nulls their args).
        self._calls = {n: (n.target, n.args, dict(n.kwargs)) for n in self.nodes}
        self._cache: dict[tuple, dict[fx.Node, Any]] = {}
        self.constant_evaluations = 0
        u_val = region.u.meta["val"]
        self._u_symbols = {i: sym_expr(s) for i, s in enumerate(u_val.shape)}
        # What an evaluation of the filter keeps: the leaves (references to the model's own
        # tensors and sizes), the values u-dependent nodes read (the frontier) and, when asked,
        # the inspected nodes with their inputs; everything else dies at its last use.
        constant = set(self.constant)
        read = {a for d in self.dynamic for a in self._inputs(d)}
        self.frontier = [n for n in self.constant if n in read]
        if region.y in constant:
            self.frontier.append(region.y)
        inspected = set()
        for n in self.constant:
            if n.target in INSPECTED:
                inspected.add(n)
                inspected.update(a for a in self._inputs(n) if a in constant)
        self.inspected = [n for n in self.constant if n in inspected]
        self._free_constant = {
            False: self._last_uses(self.constant, constant - set(self.frontier)),
            True: self._last_uses(self.constant, constant - set(self.frontier) - inspected),
        }
        self._free_dynamic = self._last_uses(self.dynamic, dynamic - {region.y})

    def compute_dtype(self) -> torch.dtype:
        """The least precise floating dtype among the region's values. Under autocast an fp32
        region computes in bf16 inside (casts before its matmuls and FFT inputs): its results
        carry bf16 round-off, and the verifier's and the fold's tolerances must allow for it."""
        least = None
        for node in [self.region.u, *self.nodes]:
            val = node.meta.get("val") if isinstance(node, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.dtype.is_floating_point and not val.dtype.is_complex:
                if least is None or torch.finfo(val.dtype).eps > torch.finfo(least).eps:
                    least = val.dtype
        return least or torch.float32

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        _, args, kwargs = self._calls[node]
        found: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), found.append)
        return found

    def _last_uses(self, order: list[fx.Node], freeable: set) -> list[list[fx.Node]]:
        """For each step of `order`, the freeable values no later step reads."""
        last: dict[fx.Node, int] = {}
        for i, node in enumerate(order):
            for a in self._inputs(node):
                if a in freeable:
                    last[a] = i
        free: list[list[fx.Node]] = [[] for _ in order]
        for i, node in enumerate(order):
            if node in freeable and node not in last:
                free[i].append(node)  # never read in this order (read only by the other part)
        for a, i in last.items():
            free[i].append(a)
        return free

    def _bindings(self, shape: torch.Size, strict: bool = True) -> dict:
        binding = {}
        for i, expr in self._u_symbols.items():
            if isinstance(expr, sympy.Symbol):
                binding[expr] = int(shape[i])
            elif strict and int(expr) != int(shape[i]):
                raise ValueError(f"region input has static size {expr} in dim {i}, probe has {shape[i]}")
        return binding

    @staticmethod
    def _key(binding: dict) -> tuple:
        return tuple(sorted((str(k), v) for k, v in binding.items()))

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

    def _run(self, node: fx.Node, env: dict) -> Any:
        target, args, kwargs = self._calls[node]
        args = fx.node.map_arg(args, env.__getitem__)
        kwargs = fx.node.map_arg(kwargs, env.__getitem__)
        return target(*args, **kwargs)

    def evaluate_constants(self, shape: torch.Size, inspect: bool = False) -> dict[fx.Node, Any]:
        """Evaluate the u-independent nodes at this input shape (no cache): the leaves, the
        frontier (what `apply` needs) and with `inspect` the inspected values; every other
        intermediate is freed after its last use. Static sizes of u need not match `shape` (they
        do not reach the filter)."""
        binding = self._bindings(shape, strict=False)
        env = {leaf: self._leaf_value(leaf, binding) for leaf in self.leaves if leaf is not self.region.u}
        with torch.no_grad():
            for node, dead in zip(self.constant, self._free_constant[inspect]):
                env[node] = self._run(node, env)
                for d in dead:
                    del env[d]
        self.constant_evaluations += 1
        from .pipeline import counters  # noqa: PLC0415 - pipeline imports this module

        counters["filter"]["evaluations"] += 1
        return env

    def constants(self, shape: torch.Size) -> dict[fx.Node, Any]:
        """Values of the region's u-independent nodes that are read afterwards at this input
        shape: the frontier and the inspected exp / pow nodes with their inputs (what modal
        recognition reads). A fresh evaluation, not cached: the probes' cache holds the frontier
        only."""
        self._bindings(shape)  # static sizes must match, as for a probe
        return self.evaluate_constants(shape, inspect=True)

    def forget(self) -> None:
        """Drop the cached filter values (probing is over; a later read re-evaluates)."""
        self._cache.clear()

    def apply(self, u: torch.Tensor, constants: dict[fx.Node, Any]) -> torch.Tensor:
        """y for input u with the filter values given (from evaluate_constants / constants)."""
        env = dict(constants)
        env[self.region.u] = u
        with torch.no_grad():
            for node, dead in zip(self.dynamic, self._free_dynamic):
                env[node] = self._run(node, env)
                for d in dead:
                    del env[d]
        return env[self.region.y]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        key = self._key(self._bindings(u.shape))
        if key not in self._cache:
            self._cache[key] = self.evaluate_constants(u.shape)
        return self.apply(u, self._cache[key])
