"""benchmarks/generate.py's arithmetic: a run's measured per-token costs summed over a generation,
the table and the plot. No device needed (`generate.py --rescore` uses it on a saved JSON)."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from _common import log

from lcsm_compile.kernels.online_conv.schedule import level_at
from lcsm_compile.runtime.lazy_graphed import window_level

P = 64  # prompt length of every generation


def interp(points: dict, n: float) -> float:
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]  # beyond the last point: extrapolate the last segment (an underestimate of n log n)
    return points[b] + (points[b] - points[a]) * (n - b) / (b - a)


def eager_total(costs: dict, L: int) -> float:
    # sum_{n=P+1}^{L} f(n), by the trapezoid rule on the interpolant
    xs = sorted({P + 1, L, *[n for n in costs if P + 1 < n < L]})
    return sum((interp(costs, a) + interp(costs, b)) / 2 * (b - a) for a, b in zip(xs, xs[1:])) + interp(costs, P + 1)


def ours_total(costs: dict, L: int, start: int = P) -> float:
    n_levels = max(k for k in costs if k is not None) + 1 if any(k is not None for k in costs) else 0
    counts: dict = {}
    for t in range(start, L):
        lv = level_at(t, L) if n_levels else None
        counts[lv] = counts.get(lv, 0) + 1
    return sum(costs[lv] * c for lv, c in counts.items())


def lazy_total(costs: dict, L: int) -> float:
    """sum_{t=P}^{L-1} lazy(t), lazy piecewise linear through the measured positions (flat before
    the first). Not a straight-line fit: the lazy's cost is flat while launches dominate, then
    grows with its history reads (H200: 4.2 ms/token to t = 2^15, 9.2 ms at 2^17)."""
    pts = dict(costs)
    pts.setdefault(P, costs[min(costs)])
    xs = sorted({P, L - 1, *[t for t in pts if P < t < L - 1]})
    return sum((interp(pts, a) + interp(pts, b)) / 2 * (b - a) for a, b in zip(xs, xs[1:])) + interp(pts, L - 1)


def lazy_graphed_positions(L: int) -> list[int]:
    """Where the graphed lazy is timed: both ends of every window level of positions P .. L-1."""
    ends = set()
    for k in range(window_level(P), window_level(L - 1) + 1):
        ends |= {max(1 << k, P), min((2 << k) - 1, L - 1)}
    return sorted(ends)


def lazy_graphed_total(costs: dict, L: int) -> float | None:
    """sum_{t=P}^{L-1} of the graphed lazy's cost at t: the cost of t's window level, affine in t
    within the level through its two measured ends (so the level's sum is its count times the
    value at its midpoint). None when a level was not measured (an older run)."""
    total = 0.0
    for k in range(window_level(P), window_level(L - 1) + 1):
        lo, hi = max(1 << k, P), min((2 << k) - 1, L - 1)
        pts = {t: s for t, s in costs.items() if lo <= t <= hi}
        if not pts:
            return None
        total += (hi - lo + 1) * (interp(pts, (lo + hi) / 2) if len(pts) > 1 else next(iter(pts.values())))
    return total


def summarize(res: dict, smoke: bool) -> list:
    """The table's rows for every L = 2^k up to the config's max_len, from the measured costs."""
    costs = {None if k == "None" else int(k): v for k, v in res["ours_token_s_by_level"].items()}
    lazy_pts = {int(t): v for t, v in res["lazy_token_s"].items()}
    eager_pts = {int(n): v for n, v in res["eager_forward_s"].items()}  # JSON keys are strings
    graphed_pts = {int(t): v for t, v in res.get("lazy_graphed_token_s", {}).items()}
    rows = []
    for k in range(10 if not smoke else 7, res["max_len"].bit_length()):
        n = 1 << k
        eager = eager_total(eager_pts, n) if eager_pts else None
        lazy, ours = lazy_total(lazy_pts, n), ours_total(costs, n)
        floor = res["floor_token_s"] * (n - P)
        graphed = lazy_graphed_total(graphed_pts, n) if graphed_pts else None
        read = res.get("weights_read", {}).get("read_s")
        # both decoders with their position-wise part at the weights' read time: what the ratio
        # to lazy-g could be at best, however the position-wise step were built
        at_read = ((graphed - floor + read * (n - P)) / (ours - floor + read * (n - P))
                   if graphed is not None and read else None)
        rows.append({"L": n, "eager_s": eager, "lazy_s": lazy, "lazy_graphed_s": graphed, "ours_s": ours,
                     "floor_s": floor, "ours_us_per_token": ours / (n - P) * 1e6, "lazy_over_ours": lazy / ours,
                     "lazy_graphed_over_ours": graphed / ours if graphed is not None else None,
                     "ours_over_floor": ours / floor, "lazy_graphed_over_ours_at_weights_read": at_read})
    return rows


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["configs"]), figsize=(6 * len(report["configs"]), 4.5), squeeze=False)
    for ax, res in zip(axes[0], report["configs"]):
        rows = res.get("rows") or []
        for key, label, color in (("eager_s", "eager recompute (HF-style)", "tab:orange"),
                                  ("lazy_s", "lazy cache", "tab:red"),
                                  ("lazy_graphed_s", "lazy cache, CUDA-graphed", "tab:purple"),
                                  ("ours_s", "lcsm decoder (ours)", "tab:blue"),
                                  ("floor_s", "position-wise floor", "tab:gray")):
            pts = [(r["L"], r[key] / (r["L"] - P) * 1e6) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens generated L (prompt 64)")
        ax.set_ylabel("µs per token, mean over the generation")
        ax.set_title(f"Hyena {'tiny' if report['smoke'] else '153M'}, B={res['B']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['device']}  torch {report['torch']}  {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(report) -> str:
    """lazy-g: the lazy decoder replayed as CUDA graphs (no launch overhead), as ours is. @read:
    lazy-g/ours with both decoders' position-wise part at the time of one read of its weights."""
    lines = [(f"{'B':>2} {'L':>7} {'eager s':>10} {'lazy s':>9} {'lazy-g s':>9} {'ours s':>8} {'floor s':>8} "
              f"{'ours us/tok':>11} {'lazy/ours':>9} {'lazy-g/ours':>11} {'ours/floor':>10} {'@read':>6}")]

    def cell(v, width: int, fmt: str) -> str:
        return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"

    for res in report["configs"]:
        for r in res.get("rows") or []:
            lines.append(f"{res['B']:>2} {r['L']:>7} {cell(r['eager_s'] or None, 10, '.1f')} {r['lazy_s']:9.2f} "
                         f"{cell(r.get('lazy_graphed_s'), 9, '.2f')} {r['ours_s']:8.2f} {r['floor_s']:8.2f} "
                         f"{r['ours_us_per_token']:11.1f} {r['lazy_over_ours']:9.1f} "
                         f"{cell(r.get('lazy_graphed_over_ours'), 11, '.1f')} {r['ours_over_floor']:10.2f} "
                         f"{cell(r.get('lazy_graphed_over_ours_at_weights_read'), 6, '.1f')}")
    return "\n".join(lines)


def rescore(path: Path) -> None:
    """No device needed: the rows are sums of per-token costs the run saved."""
    report = json.loads(path.read_text())
    for res in report["configs"]:
        if "lazy_token_s" in res and "floor_token_s" in res:
            res["rows"] = summarize(res, report["smoke"])
    report["rescored"] = datetime.datetime.now().isoformat(timespec="seconds")
    path.write_text(json.dumps(report, indent=1, default=str))
    plot(report, path.with_suffix(".png"))
    log(table(report))
