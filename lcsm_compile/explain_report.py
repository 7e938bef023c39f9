"""explain(model, *example_inputs): what the compiler finds, what it cannot rewrite, and why.

Runs the model once through dynamo with the lcsm pipeline listening (no rewrite is kept), with
the time dim marked dynamic where it can be, so filters are also checked across lengths. Each
graph with a dynamic time dim is also incrementalized (what decoder() and serving would do):
`decode` lists why one has no step form ([] if all have one, None if none could be checked).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .backend import lcsm_backend, report_listeners
from .passes.pipeline import MixerInfo, Unsupported
from .settings import Settings

__all__ = ["ExplainReport", "explain"]


@dataclass
class ExplainReport:
    mixers: list[MixerInfo] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    graphs: int = 0
    length: int = 0
    fold_length: int | None = None
    decode: list[tuple[str, str]] | None = None  # (node, reason) a step form is refused for

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def __str__(self) -> str:
        lines = [
            f"lcsm explain: {self.graphs} graph(s) at L={self.length}, {len(self.mixers)} mixer(s) rewritten, "
            f"{len(self.unsupported)} left unchanged"
            + (f", filters folded at {self.fold_length}" if self.fold_length and self.mixers else "")
        ]
        if self.mixers:
            lines.append(f"  {'#':>2}  {'kind':9} {'strategy':8} {'filter':>7} {'channels':>8}  node")
            for i, m in enumerate(self.mixers):
                lines.append(f"  {i:>2}  {m.kind:9} {m.strategy:8} {m.filter_length:>7} {m.channels:>8}  {m.node}")
            lines.append("  decode strategy:")
            for i, m in enumerate(self.mixers):
                lines.append(f"  {i:>2}  {m.strategy}: {m.strategy_reason}")
        if self.unsupported:
            lines.append("  left unchanged:")
            for u in self.unsupported:
                lines.append(f"   - {u.node}: {u.reason}")
        if self.decode is None:
            lines.append("  decode: not checked (no graph with a dynamic time dim)")
        elif not self.decode:
            lines.append("  decode: every graph has a step form")
        else:
            lines.append("  decode refused:")
            lines += [f"   - {node}: {reason}" for node, reason in self.decode]
        return "\n".join(lines)


def explain(model: torch.nn.Module, *example_inputs, **options) -> ExplainReport:
    settings = Settings.from_options(options)
    report = ExplainReport()

    def listen(rep, cg):
        report.graphs += 1
        report.length = rep.length
        report.mixers.extend(rep.mixers)
        report.unsupported.extend(rep.unsupported)
        report.fold_length = cg.facts.get("fold_length", report.fold_length)
        if cg.symbolic and (rep.rewrites or rep.unsupported):
            from .runtime.serving import decode_problems  # noqa: PLC0415 - the decode runtime loads on demand

            report.decode = (report.decode or []) + decode_problems(cg, rep, settings)

    inputs = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            x = x.clone()
            if x.dim() > settings.seq_dim and x.shape[settings.seq_dim] >= 2:
                torch._dynamo.maybe_mark_dynamic(x, settings.seq_dim)
        inputs.append(x)
    opts = {**options, "inner_backend": "eager", "strict": False}
    compiled = torch.compile(model, backend=functools.partial(lcsm_backend, options=opts))
    report_listeners.append(listen)
    try:
        with torch.no_grad():
            compiled(*inputs)
    finally:
        report_listeners.remove(listen)
    return report
