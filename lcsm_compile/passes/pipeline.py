"""The pass pipeline, in one visible order, and what it reports.

    seq_axis -> match -> verify -> fold -> rewrite

Each pass reads and writes the CapturedGraph; the report records every mixer rewritten and
every mixing node left alone with the reason, for explain() and for the fallback warning.
"""
from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from torch import fx

from ..settings import Settings
from .capture import CapturedGraph
from .fold import fold
from .match import match
from .modal import Strategy, choose_strategy
from .region import backward_slice, describe_node
from .rewrite import rewrite
from .seq_axis import MIXING, mixing_reason, seq_axis
from .verify import Mixer, verify

__all__ = ["PIPELINE", "CompileReport", "run_pipeline", "counters"]

# Rewrites fired since the process started (or the last counters.clear()), like dynamo's.
counters: defaultdict[str, Counter] = defaultdict(Counter)


@dataclass
class MixerInfo:
    """One rewritten mixer. `strategy` is how a decoder steps it ("short" ring buffer, "modal"
    recurrence or "long" tiling) and `strategy_reason` why; both are decided on first read (modal
    recognition re-evaluates the filter subgraph, which a prefill-only compile never needs)."""

    kind: str
    filter_length: int
    channels: int
    node: str
    fold_length: int
    mixer: Mixer | None = field(default=None, repr=False, compare=False)
    settings: Settings | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def _strategy(self) -> Strategy:
        if self.mixer is None:
            return Strategy("long", "no filter subgraph recorded")
        return choose_strategy(self.mixer, self.settings or Settings())

    @property
    def strategy(self) -> str:
        return self._strategy.name

    @property
    def strategy_reason(self) -> str:
        return self._strategy.reason


@dataclass
class Unsupported:
    node: str
    reason: str


@dataclass
class CompileReport:
    length: int
    symbolic: bool
    mixers: list[MixerInfo] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    rewrites: Counter = field(default_factory=Counter)
    accepted: list[Mixer] = field(default_factory=list)


def run_pipeline(cg: CapturedGraph, settings: Settings) -> CompileReport:
    report = CompileReport(cg.length, cg.symbolic)
    n_mixing = seq_axis(cg)
    proposals, rejections = match(cg)
    mixers, rejected = verify(cg, proposals, settings)
    rejections += rejected
    mixers, rejected = fold(cg, mixers, settings)
    rejections += rejected
    covered: set[fx.Node] = set()
    for alternatives in proposals:
        for region in alternatives:
            covered |= set(backward_slice(region.y, region.u)[0])
    for mx in mixers:
        report.mixers.append(
            MixerInfo(mx.kind, mx.filter_length, mx.channels, mx.region.describe(), mx.length, mx, settings)
        )
    for rej in rejections:
        report.unsupported.append(Unsupported(rej.describe(), rej.reason))
    rejected_seeds = {r.node for r in rejections}
    for node in cg.gm.graph.nodes:
        if node.meta.get("lcsm_class") == MIXING and node not in covered and node not in rejected_seeds:
            report.unsupported.append(Unsupported(describe_node(node), mixing_reason(node)))
    report.accepted = mixers
    report.rewrites = rewrite(cg, mixers)
    for kind, n in report.rewrites.items():
        counters["rewrite"][kind] += n
    counters["graphs"]["mixing_nodes"] += n_mixing
    return report


PIPELINE = ("capture", "seq_axis", "match", "verify", "fold", "rewrite")
