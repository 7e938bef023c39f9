"""`decoder(model, *example_inputs, max_len, **options)`: a step-wise decoder for an unmodified model.

    dec = lcsm_compile.decoder(model, ids[:, :16], max_len=4096)
    out = dec.prefill(ids[:, :P])            # outputs at position P-1, time dim of length 1
    out = dec.step(ids[:, P:P+1])            # outputs at position P; dec.position == P + 1

Built once: dynamo captures the model with a dynamic time dim (fullgraph), the pass pipeline
rewrites its mixers, `incrementalize` plans the step, `StepProgram` traces and compiles it. A
model whose L dynamo specializes (e.g. `1 << (2L-1).bit_length()`) is captured twice statically:
at a prime length for the position-wise structure, at max_len for the filters. Before it is
returned, the decoder is held numerically against the eager model (prefill, then every step of
a short continuation of the example); anything it cannot do exactly raises IncrementalizeError
naming the node and the reason. Bad calls raise ValueError (inputs) or RuntimeError (order) and
leave the state as it was.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import types
import warnings

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..backend import autocast_enabled, lcsm_backend, report_listeners
from ..passes.incrementalize import CAUSAL_CONV, IncrementalizeError, StepPlan, _filter_of, incrementalize
from ..passes.modal import Strategy
from ..passes.pipeline import counters
from ..passes.rewrite import mixer_of
from ..settings import Settings
from .lazy import LazyConv
from .lazy_graphed import GraphedLazyConv
from .segment_compile import SegmentCompiler
from .step_program import StepProgram

__all__ = ["Decoder", "capture", "decoder"]

# How long convolutions step: the online engine (Flash Inference tiling), the lazy sum over the
# history (the baseline; "lazy-graphed": the same sums as launches that replay under CUDA graphs,
# the baseline without launch overhead), or "floor": no mixer at all (y = u; wrong outputs, for
# benchmarks only).
ENGINES = {"online": None, "lazy": LazyConv, "lazy-graphed": GraphedLazyConv, "floor": None}
_captures = itertools.count()
_PRIMES = (61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157)


def _fresh_caller(model):
    """A new code object per capture, under a new name: dynamo's cache (and its size limit) and
    its automatic-dynamic memory of earlier shapes (keyed by file, line and name) start empty."""
    def call(*args):
        return model(*args)

    name = f"lcsm_decode_capture_{next(_captures)}"
    return types.FunctionType(call.__code__.replace(co_name=name), call.__globals__, name, None, call.__closure__)


def capture(model, args: list, settings: Settings, dynamic: bool, time_args: list[int]):
    """The model's rewritten ATen graph at these inputs: (CompileReport, CapturedGraph)."""
    got = []
    opts = {**dataclasses.asdict(settings), "inner_backend": "eager", "decode": False, "strict": False}
    compiled = torch.compile(_fresh_caller(model), backend=functools.partial(lcsm_backend, options=opts),
                             fullgraph=True, dynamic=None if dynamic else False)
    if dynamic:
        for j in time_args:
            torch._dynamo.maybe_mark_dynamic(args[j], settings.seq_dim)
    listen = lambda report, cg: got.append((report, cg))  # noqa: E731
    report_listeners.append(listen)
    try:
        with torch.no_grad():
            compiled(*args)
    except Exception as e:  # noqa: BLE001 - a graph break or an error while tracing
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IncrementalizeError([("capture", f"cannot capture the model as one graph "
                                    f"({type(e).__name__}: {first})")]) from e
    finally:
        report_listeners.remove(listen)
    if len(got) != 1:
        raise IncrementalizeError([("capture", f"{len(got)} graphs were captured; decoding needs one")])
    return got[0]


def _at_length(args: list, time_args: list[int], n: int, dim: int) -> list:
    """The inputs tiled (or cut) along time to length n."""
    out = list(args)
    for j in time_args:
        x = args[j]
        idx = torch.arange(n, device=x.device) % x.shape[dim]
        out[j] = x.index_select(dim, idx)
    return out


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class StepMismatch(IncrementalizeError):
    """The step program runs but its outputs differ from the model's (the decoder's self-check)."""


class Decoder:
    def __init__(self, model: torch.nn.Module, example_inputs: tuple, max_len: int, settings: Settings,
                 engine: str = "online"):
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"lcsm decoder: max_len must be an int >= 2 (a prompt and a step), got {max_len!r}")
        if engine not in ENGINES:
            raise ValueError(f"lcsm decoder: engine must be one of {tuple(ENGINES)}, got {engine!r}")
        # Built under torch.autocast, the decoder follows the model under that autocast: the capture
        # bakes its casts into the graph (weights cast once, as constants), and everything after
        # the capture runs with autocast off (incrementalize here, StepProgram itself) so that
        # nothing is cast twice.
        self.autocast = autocast_enabled()
        self.max_len, self.settings, self.engine = max_len, settings, engine
        args = list(example_inputs)
        d = self.dim = settings.seq_dim
        self.time_args = [j for j, x in enumerate(args) if isinstance(x, Tensor) and x.dim() > d]
        if not self.time_args:
            raise ValueError("lcsm decoder: no example input has a time dimension "
                             f"(dim {d}; options seq_dim=... picks another)")
        x0 = args[self.time_args[0]]
        self.batch, L = int(x0.shape[0]), int(x0.shape[d])
        self.time_args = [j for j in self.time_args if args[j].shape[d] == L]
        if L > max_len:
            raise ValueError(f"lcsm decoder: example of length {L} is longer than max_len={max_len}")
        self.specs = [(tuple(x.shape[:d]) + tuple(x.shape[d + 1:]), x.dtype, x.device) if j in self.time_args
                      else x for j, x in enumerate(args)]
        # inputs without a time axis are baked into the step program: a later call must pass equal
        # values (the same object unchanged passes without a device sync)
        self._static = {j: (x._version, x.clone()) for j, x in enumerate(args)
                        if j not in self.time_args and isinstance(x, Tensor)}
        self.device = x0.device
        try:
            self.plan = self._plan(model, args, settings)
        except IncrementalizeError as err:
            own = self._model_error_at(model, args, max_len)
            if own is not None:  # the model's own limit, not a decode problem
                raise ValueError(f"lcsm decoder: the model itself fails at max_len={max_len} ({own}); "
                                 "decode up to the length it runs at") from err
            raise
        self._build_program()
        try:
            self._check_model(model, args, L)
        except IncrementalizeError as err:
            modal = [c for c in self.plan.long_convs if c.strategy is not None and c.strategy.name == "modal"]
            if not modal or not isinstance(err, StepMismatch):
                raise
            # The recurrence was confirmed on the filter alone; the model check is the last word.
            why = f"modal recurrence disagreed with the model ({err.problems[0][1]}): tiling"
            warnings.warn(f"lcsm decoder: {why}", stacklevel=3)
            for c in modal:
                c.strategy = Strategy("long", why)
            self._build_program(like=self.program)
            self._check_model(model, args, L)
        counters["decode"]["decoders"] += 1

    def _build_program(self, like: StepProgram | None = None) -> None:
        self.program = StepProgram(self.plan, self.device, floor=self.engine == "floor",
                                   engine_factory=ENGINES[self.engine], like=like,
                                   compiler=SegmentCompiler.for_device(self.device, self.settings))
        self._graphs, self._prefilled = None, False
        self._fed_graphs: dict = {}  # feed -> its token graphs (generate() keeps one feed per ids dtype and eos)
        self._use_graphs = (self.device.type == "cuda" and self.settings.cuda_graphs
                            and all(getattr(e, "backend", "") == "triton" for e in self.program.engines))

    # ------------------------------------------------------------ build
    def _plan(self, model, args: list, settings: Settings) -> StepPlan:
        L = args[self.time_args[0]].shape[self.dim]
        cap_args = _at_length(args, self.time_args, max(L, 2), self.dim)
        report, cg = capture(model, cap_args, settings.replace(max_len=self.max_len), True, self.time_args)
        filters = mixers = None
        if not cg.symbolic:  # dynamo specialized L: structure at a prime length, filters at max_len
            Lp = self._prime_length(cg)
            cap_args = _at_length(args, self.time_args, Lp, self.dim)
            report, cg = capture(model, cap_args, settings, False, self.time_args)
            if report.unsupported:
                raise IncrementalizeError([(u.node, u.reason) for u in report.unsupported])
            full = _at_length(args, self.time_args, self.max_len, self.dim)
            report_full, cg_full = capture(model, full, settings, False, self.time_args)
            convs = [n for n in cg_full.gm.graph.nodes if n.target is CAUSAL_CONV]
            filters = [_filter_of(cg_full, n.args[1]) for n in convs]
            mixers = [mixer_of(cg_full, n) for n in convs]
            report = dataclasses.replace(report, unsupported=report.unsupported + report_full.unsupported)
        self._seq_arg = []
        for inp in cg.inputs:
            if inp.role == "sequence":
                j = next((j for j, a in enumerate(cap_args) if a is inp.value), None)
                if j is None:
                    raise IncrementalizeError([(inp.source, "a graph input that is neither a weight nor an "
                                                "argument of the call")])
                self._seq_arg.append(j)
        with torch._C._DisableAutocast():
            return incrementalize(cg, settings, self.max_len, report.unsupported, filters, mixers)

    def _model_error_at(self, model, args: list, n: int) -> str | None:
        """The model's own error at length n (a filter or position table shorter than n), if any."""
        try:
            with torch.no_grad():
                model(*_at_length(args, self.time_args, n, self.dim))
        except Exception as e:  # noqa: BLE001 - any: it is reported, with the decode error as cause
            return f"{type(e).__name__}: {e}"
        return None

    def _prime_length(self, cg) -> int:
        sizes = {int(s) for inp in cg.inputs if inp.role == "static" for s in inp.value.shape} | {self.batch}
        for p in _PRIMES:
            if p <= self.max_len and not any(s % p == 0 for s in sizes if s):
                return p
        raise IncrementalizeError([("capture", f"dynamo specialized the length and max_len={self.max_len} "
                                    "is too short to capture the model at a distinctive length")])

    def _check_model(self, model, args: list, L: int) -> None:
        """Find the model's outputs among the graph's, then check prefill + steps against eager."""
        V = min(self.max_len, max(L, 12))
        full = _at_length(args, self.time_args, V, self.dim)
        with torch.no_grad():
            ref = model(*full)  # under the caller's autocast, if any: the model the decoder follows
            graph_out = self.program.forward(self._seq(full), V)
        # The graph computes convolutions in fp32 where eager autocast rounds to bf16.
        match_tol = 3e-2 if self.autocast else 1e-3
        leaves, self._spec = pytree.tree_flatten(ref)
        self._leaves = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                self._leaves.append(("const", leaf))
                continue
            scores = [(_rel(o, leaf), j) for j, o in enumerate(graph_out)
                      if isinstance(o, Tensor) and o.shape == leaf.shape and o.dtype == leaf.dtype]
            if not scores or min(scores)[0] > match_tol:
                raise IncrementalizeError([("output", f"model output {i} {tuple(leaf.shape)} is not among the "
                                            "graph's outputs")])
            j = min(scores)[1]
            self._leaves.append(("out", j) if self.plan.output_time[j] is not None else ("const", leaf))
        if not self.settings.verify or self.engine == "floor":
            return
        tol = 1e-4 if _full_precision(graph_out) and not self.autocast else 3e-2
        P0 = max(1, V // 2)
        checks = [(P0 - 1, self.prefill(*self._slice(full, 0, P0)))]
        for t in range(P0, V):
            checks.append((t, self.step(*self._slice(full, t, t + 1))))
        ref_leaves = [leaf for leaf in leaves]
        for t, out in checks:
            for (kind, j), got, want in zip(self._leaves, pytree.tree_flatten(out)[0], ref_leaves):
                if kind != "out":
                    continue
                d = self.plan.output_time[j]
                err = _rel(got, want.narrow(d, t, 1))
                if not err <= tol:
                    self.reset()
                    raise StepMismatch([("step program", f"disagrees with the model at position {t}: "
                                                f"relative error {err:.2e} > {tol:.0e}")])
        self.reset()

    # ------------------------------------------------------------ inputs
    def _seq(self, inputs) -> list[Tensor]:
        # The graph was traced for contiguous inputs (its views assume it); dynamo would guard.
        return [inputs[j].contiguous() for j in self._seq_arg]

    def _slice(self, inputs, a: int, b: int) -> list:
        return [x.narrow(self.dim, a, b - a) if j in self.time_args else x for j, x in enumerate(inputs)]

    def _check(self, inputs: tuple, step: bool) -> int:
        name = "step" if step else "prefill"
        if len(inputs) != len(self.specs):
            raise ValueError(f"lcsm decoder: {name} takes {len(self.specs)} input(s) like the example, "
                             f"got {len(inputs)}")
        length = None
        for j, (x, spec) in enumerate(zip(inputs, self.specs)):
            if j not in self.time_args:
                if not self._same_static(j, x):
                    raise ValueError(f"lcsm decoder: input {j} has no time axis, so the decoder holds the "
                                     "example's value for it; pass an equal value (build another decoder "
                                     "for another one)")
                continue
            if not isinstance(x, Tensor) or x.dim() != len(spec[0]) + 1:
                raise ValueError(f"lcsm decoder: input {j} must be a tensor of rank {len(spec[0]) + 1}")
            rest = tuple(x.shape[: self.dim]) + tuple(x.shape[self.dim + 1:])
            if rest != spec[0]:
                what = "batch" if x.shape[0] != spec[0][0] else "shape"
                raise ValueError(f"lcsm decoder: input {j} has {what} {tuple(x.shape)}; the decoder was built "
                                 f"for {spec[0][:self.dim] + ('L',) + spec[0][self.dim:]} (batch {self.batch})")
            if x.dtype != spec[1] or x.device != spec[2]:
                raise ValueError(f"lcsm decoder: input {j} is {x.dtype} on {x.device}, expected {spec[1]} on "
                                 f"{spec[2]}")
            n = int(x.shape[self.dim])
            if length is not None and n != length:
                raise ValueError(f"lcsm decoder: inputs have different lengths {length} and {n}")
            length = n
        if step and length != 1:
            raise ValueError(f"lcsm decoder: step takes one position (time dim of length 1), got {length}")
        if not step and not 1 <= length <= self.max_len:
            raise ValueError(f"lcsm decoder: prompt of length {length} must be between 1 and max_len="
                             f"{self.max_len}")
        return length

    def _same_static(self, j: int, x) -> bool:
        spec = self.specs[j]
        if j not in self._static:
            return x is spec or (not isinstance(x, Tensor) and x == spec)
        version, value = self._static[j]
        if x is spec and x._version == version:
            return True
        return (isinstance(x, Tensor) and x.shape == value.shape and x.dtype == value.dtype
                and x.device == value.device and torch.equal(x, value))

    def _cleared(self, e: BaseException) -> None:
        """After work that changes the decode state failed part way (an index past the vocabulary,
        say): the state is cleared, so that a later step() cannot run on half of it. A plain
        try/except at the callers, not a context manager: steps are the per-token path."""
        self.reset()
        if hasattr(e, "add_note"):  # Python 3.11+
            e.add_note("lcsm decoder: the decode state was cleared; call prefill() again")

    def _token_graphs(self, feed=None):
        """The CUDA graphs of a token (a feed's own set: their inputs are its buffers), captured
        on first use."""
        graphs = self._graphs if feed is None else self._fed_graphs.get(feed)
        if graphs is None:
            from .cuda_graphs import StepGraphs  # noqa: PLC0415

            graphs = StepGraphs(self.program, feed=feed)
            if feed is None:
                self._graphs = graphs
            else:
                self._fed_graphs[feed] = graphs
        return graphs

    def _structure(self, outs: list):
        leaves = [outs[v] if kind == "out" else v for kind, v in self._leaves]
        return pytree.tree_unflatten(leaves, self._spec)

    # ------------------------------------------------------------ API
    @property
    def position(self) -> int:
        """The next position step() computes (the number of positions seen)."""
        return self.program.position

    def reset(self) -> None:
        self.program.reset()
        self._prefilled = False

    def prefill(self, *inputs):
        """Outputs at the last prompt position; the state now holds the prompt."""
        P = self._check(inputs, step=False)
        try:
            outs = self.program.prefill(self._seq(inputs), P)
        except BaseException as e:
            self._cleared(e)
            raise
        self._prefilled = True
        counters["decode"]["prefill_positions"] += P
        return self._structure([o.narrow(d, P - 1, 1).clone() if d is not None else o
                                for o, d in zip(outs, self.plan.output_time)])

    def step(self, *inputs):
        """Outputs at the current position, which then advances by one."""
        return self._structure([o.clone() if isinstance(o, Tensor) else o for o in self._step(inputs)])

    def _step(self, inputs) -> list:
        """step() without copies: the outputs may be the program's static buffers."""
        self._check(inputs, step=True)
        self._check_can_step()
        counters["decode"]["step_positions"] += 1
        try:
            if not self._use_graphs:
                return self.program.step(self._seq(inputs))
            return self._token_graphs().replay(self._seq(inputs))
        except BaseException as e:
            self._cleared(e)
            raise

    def _fed_step(self, feed) -> None:
        """A step whose inputs the previous one chose: the sequence inputs are `feed.inputs` (device
        buffers), and `feed(outputs)` (device work only: in a CUDA graph it is captured into the
        token's graph) writes the next position's inputs into them after each step. Nothing
        returns to the host, so a loop of these needs no sync (generate's greedy tokens)."""
        self._check_can_step()
        counters["decode"]["fed_step_positions"] += 1
        try:
            if not self._use_graphs:
                feed(self.program.step(feed.inputs))
            else:
                self._token_graphs(feed).replay(None)
        except BaseException as e:
            self._cleared(e)
            raise

    def _check_can_step(self) -> None:
        if not self._prefilled:
            raise RuntimeError("lcsm decoder: step() before prefill(); call prefill(prompt) first")
        if self.position >= self.max_len:
            raise RuntimeError(f"lcsm decoder: position {self.position} is past max_len={self.max_len}; "
                               "build the decoder with a larger max_len")

    def __repr__(self) -> str:
        p = self.plan
        return (f"Decoder(batch={self.batch}, max_len={self.max_len}, position={self.position}, "
                f"long_convs={len(p.long_convs)}, short_convs={len(p.convs) - len(p.long_convs)}, "
                f"segments={len(p.segments)}, cuda_graphs={self._use_graphs})")


def _full_precision(outs: list) -> bool:
    return all(o.dtype in (torch.float32, torch.float64) for o in outs
               if isinstance(o, Tensor) and o.is_floating_point())


def decoder(model: torch.nn.Module, *example_inputs, max_len: int, engine: str = "online", **options) -> Decoder:
    """A step-wise decoder for `model`: prefill(*inputs), step(*inputs_at_t), reset().

    `example_inputs` fix the batch size, the dtypes and every input without a time axis; their
    values are used to check the decoder against the model. engine="online" (the O(L log^2 L)
    tiling), "lazy" (each step sums the whole history: the baseline, eager launches) or
    "lazy-graphed" (the same sums, one CUDA graph replay per token like "online": the baseline
    without launch overhead). `options` are the backend's (lcsm_compile.Settings);
    inner_backend="inductor" (the default) compiles the step."""
    return Decoder(model, example_inputs, max_len, Settings.from_options(options), engine)
