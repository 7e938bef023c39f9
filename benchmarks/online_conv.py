"""Decode benchmark of the online convolution engine (issue 4): lazy vs eager vs OnlineConv.

    python benchmarks/online_conv.py                 # GPU: M=18, D=864, B in {1, 8}, L = 2^10 ..
    python benchmarks/online_conv.py --smoke         # CPU, tiny sizes: exercises the script only

Per sequence length L, the cost per token averaged over a whole generation of L tokens:
- ours: OnlineConv, bf16 state, every token one CUDA graph replay (step of all M mixers + the
  position's tiles), timed over the full generation with CUDA events, two ways: through the
  engine API (TokenGraphs.replay, with its host bookkeeping) and as a tight replay loop;
- lazy: y[t] = sum_{s<=t} h[t-s] x[s] for all mixers in one batched product (bmm, or mul+sum,
  whichever is faster), CUDA-graphed at fixed t; its cost is linear in t, so the average over a
  generation is the mean over t = L/4, L/2, 3L/4;
- eager: A[t+1:] += h[1:L-t] u[t] (fp32 accumulators), CUDA-graphed at the same t.
Correctness first: every y_t of a bf16 and an fp32 run against an fp64 reference, and in each
timed configuration y at a few positions against a reference computed from the history.
Writes benchmarks/results/online_conv_<device>.json and .png (or under $OUT when set).
The measured cases are in _online_conv_cases.py; this script runs them and reports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from _online_conv_cases import CUDA, SDT, check_every_step, crossover, diagnose, eager_cost, lazy_cost, log, ours_cost


def ours_worker(B, Ls, direct_max, dot_min, smoke, out_path):
    """Child process: ours_cost for each L, one JSON line each (a crash loses only that L)."""
    M, D = (2, 8) if smoke else (18, 864)
    for L in Ls:
        res = ours_cost(M, D, B, L, direct_max, dot_min, {L // 3, L // 2 + 1, L - 1}, breakdown=L == max(Ls) and B == 1)
        log(f"  [worker] B={B} L={L}: ours {res['us_per_token_api']:.2f} us/token (api), "
            f"{res['us_per_token_tight']:.2f} (tight); check {res['check_rel_err']:.1e} "
            f"hist {res['check_history_ok']}; state+spectra {res['memory_elements']['per_MDL']:.3f} x MDL"
            + (f"\n  [worker] breakdown {json.dumps(res['breakdown_us'])}" if "breakdown_us" in res else ""))
        with open(out_path, "a") as f:
            f.write(json.dumps({"L": L, **res}) + "\n")
        torch.cuda.empty_cache() if CUDA else None


def run_ours_workers(B, Ls, direct_max, dot_min, smoke):
    """ours_cost for every L in child processes; after a crash, go on with the next L."""
    import subprocess
    import tempfile

    done, todo = {}, list(Ls)
    while todo:
        with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
            path = f.name
        cmd = [sys.executable, __file__, "--ours-worker", str(B), ",".join(map(str, todo)), "--out-jsonl", path]
        cmd += ["--direct-max", str(direct_max)] if direct_max else []
        cmd += ["--dot-min", str(dot_min)] if dot_min else []
        cmd += ["--smoke"] if smoke else []
        rc = subprocess.run(cmd).returncode
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            done[r["L"]] = r
        left = [L for L in todo if L not in done]
        if rc != 0 and left:
            done[left[0]] = {"ours_error": f"worker exit {rc} at L={left[0]}"}
            log(f"  ours worker failed at B={B} L={left[0]} (exit {rc}); going on")
            left = left[1:]
        todo = left
    return done


def device_slug():
    if not CUDA:
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key in ("h100", "h200", "a100", "l40", "4090"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "_" for c in name)


def plot(results, path, device=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {1: "-", 8: "--"}
    for B, rows in results.items():
        for key, label, color in (("lazy_us", "lazy", "tab:red"), ("eager_us", "eager", "tab:orange"),
                                  ("ours_us", "ours (OnlineConv, CUDA graphs)", "tab:blue")):
            pts = [(r["L"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), styles.get(B, ":"), marker="o", color=color, label=f"{label}, B={B}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (tokens generated)")
    ax.set_ylabel("µs per token (mean over the generation)")
    ax.set_title(f"Online long convolution decode, M=18 mixers, D=864, bf16\n{device or device_slug()}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU): exercise the script")
    ap.add_argument("--max-log2", type=int, default=18)
    ap.add_argument("--direct-max", type=int, default=None, help="skip the crossover measurement")
    ap.add_argument("--dot-min", type=int, default=None, help="tl.dot direct tiles from this size")
    ap.add_argument("--quick", action="store_true",
                    help="fewer correctness checks, no crossover sweep (the engine's measured defaults)")
    ap.add_argument("--plot", type=Path, default=None, help="only redraw the PNG from a results JSON")
    ap.add_argument("--ours-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-jsonl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--diagnose", nargs=5, type=int, default=None, metavar=("L", "M", "D", "DIRECT_MAX", "GRAPHS"),
                    help="run every tile level at position L-2 with a sync after each op")
    args = ap.parse_args()
    if args.ours_worker:
        B, Ls = int(args.ours_worker[0]), [int(x) for x in args.ours_worker[1].split(",")]
        ours_worker(B, Ls, args.direct_max, args.dot_min, args.smoke, args.out_jsonl)
        return
    if args.diagnose:
        L, M_, D_, dm, graphs = args.diagnose
        diagnose(L, M_, D_, 1, dm, bool(graphs))
        return
    if args.plot:
        data = json.loads(args.plot.read_text())
        plot({int(b): rows for b, rows in data["results"].items()}, args.plot.with_suffix(".png"), data["device"])
        return
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        M, D, Bs, logs, big = 2, 8, (1, 2), {1: range(5, 8), 2: range(5, 7)}, 64
    else:
        M, D, Bs, big = 18, 864, (1, 8), 1000
        logs = {1: range(10, args.max_log2 + 1), 8: range(10, min(args.max_log2, 16) + 1)}
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "M": M, "D": D, "state_dtype": str(SDT), "smoke": args.smoke}
    log(f"online_conv benchmark on {info['device']}, torch {info['torch']}, triton {info['triton']}")
    report = {**info, "checks": [], "crossover": None, "results": {}}

    log("== correctness: every y_t against fp64 ==")
    half_tol = 1e-2 if SDT == torch.bfloat16 else 1e-5
    # (dtype, tol, prompt, direct_max, path, L, B): B=8 takes the engine's batched defaults
    checks = [(SDT, half_tol, 100, None, "token_graphs", big, 2), (SDT, half_tol, 1, None, "eager", big // 4, 2),
              (torch.float32, 1e-5, 0, 0, "tile_graphs", big // 4, 2),
              (torch.float32, 1e-5, 7, 1 << 30, "token_graphs", big, 2),
              (torch.float32, 1e-5, 100, None, "token_graphs", big, 2),
              (SDT, half_tol, 7, None, "eager", big // 4, 8), (torch.float32, 1e-5, 7, None, "token_graphs", big // 4, 8)]
    if args.quick:
        checks = [checks[i] for i in (0, 2, 5, 6)]
    for dtype, tol, P, dm, mode, L, Bc in checks:
        try:
            report["checks"].append(check_every_step(dtype, M, D, Bc, L + 37, P, dm, tol, mode))
        except Exception:  # noqa: BLE001 - a failed check is recorded, the others still run
            traceback.print_exc()
            report["checks"].append({"dtype": str(dtype), "P": P, "mode": mode, "ok": False,
                                     "error": traceback.format_exc()[-500:]})

    direct_max, dot_min = args.direct_max, args.dot_min
    if direct_max is None and not args.quick:
        log(f"== crossover: direct (Triton) vs FFT (torch.fft) tile, M={M} D={D} B=1 ==")
        try:
            direct_max, dot_min, rows = crossover(M, D, 1, 64 if args.smoke else 8192,
                                                  max_direct=16 if args.smoke else 512, max_fma=16 if args.smoke else 64)
            report["crossover"] = {"B": 1, "direct_max": direct_max, "dot_min": dot_min, "rows": rows}
            log(f"  -> direct tiles up to U = {direct_max}; tl.dot from U = {dot_min}")
            log("== crossover, B=8 (recorded, not used) ==")
            dm8, dot8, rows8 = crossover(M, D, max(Bs), 64 if args.smoke else 8192,
                                         max_direct=16 if args.smoke else 128, max_fma=16 if args.smoke else 64)
            report[f"crossover_B{max(Bs)}"] = {"B": max(Bs), "direct_max": dm8, "dot_min": dot8, "rows": rows8}
        except Exception:  # noqa: BLE001 - the crossover is optional: keep the defaults
            traceback.print_exc()
            direct_max = None
    report["direct_max"], report["dot_min"] = direct_max, dot_min

    torch.cuda.empty_cache() if CUDA else None
    ours = {B: run_ours_workers(B, [1 << lg for lg in logs[B]], direct_max, dot_min, args.smoke) for B in Bs}
    for B in Bs:
        rows = report["results"][B] = []
        for lg in logs[B]:
            L = 1 << lg
            row = {"L": L, **ours[B].get(L, {"ours_error": "worker crashed"})}
            if "us_per_token_api" in row:
                row["ours_us"] = row["us_per_token_api"]
            log(f"== B={B} L={L} == ours: {row.get('ours_us', row.get('ours_error'))}")
            samples = [L // 4, L // 2, 3 * L // 4]
            for name, fn in (("lazy_us", lazy_cost), ("eager_us", eager_cost)):
                try:
                    row[name] = fn(M, D, B, L, samples) * 1e6
                    log(f"  {name[:-3]}: {row[name]:.1f} us/token")
                except Exception:  # noqa: BLE001 - one method failing keeps the others' times
                    traceback.print_exc()
                torch.cuda.empty_cache() if CUDA else None
            if row.get("ours_us") and row.get("lazy_us"):
                row["lazy_over_ours"] = row["lazy_us"] / row["ours_us"]
            if row.get("ours_us") and row.get("eager_us"):
                row["eager_over_ours"] = row["eager_us"] / row["ours_us"]
            rows.append(row)
            (out_dir / f"online_conv_{device_slug()}.json").write_text(json.dumps(report, indent=1, default=str))

    for B, rows in report["results"].items():
        ours = {r["L"]: r["ours_us"] for r in rows if r.get("ours_us")}
        if (1 << 12) in ours and (1 << 17) in ours:
            report.setdefault("flatness_2e12_to_2e17", {})[B] = ours[1 << 17] / ours[1 << 12]
    (out_dir / f"online_conv_{device_slug()}.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        plot(report["results"], out_dir / f"online_conv_{device_slug()}.png", info["device"])
    except Exception:  # noqa: BLE001 - the JSON is written; a plot failure is reported
        traceback.print_exc()

    log("\n== checks ==")
    for c in report["checks"]:
        log(f"  {c.get('dtype')} {c.get('mode')} B={c.get('B')} L={c.get('L')} P={c.get('P')} dm={c.get('direct_max')}: {c.get('worst_rel_err', float('nan')):.2e} "
            f"{'OK' if c.get('ok') else 'FAIL'}")
    log(f"crossover direct_max = {direct_max}, dot_min = {dot_min}; flatness 2^17/2^12: {report.get('flatness_2e12_to_2e17')}")
    log(f"{'B':>2} {'L':>7} {'ours api':>9} {'ours tight':>10} {'lazy':>9} {'eager':>9} {'lazy/ours':>9} "
        f"{'eager/ours':>10} {'check':>8} {'xMDL':>6}")
    for B, rows in report["results"].items():
        for r in rows:
            f = lambda k, w=9, p=1: f"{r[k]:{w}.{p}f}" if isinstance(r.get(k), float) else f"{'-':>{w}}"  # noqa: E731
            log(f"{B:>2} {r['L']:>7} {f('ours_us', 9, 2)} {f('us_per_token_tight', 10, 2)} {f('lazy_us')} "
                f"{f('eager_us')} {f('lazy_over_ours')} {f('eager_over_ours', 10)} "
                f"{r.get('check_rel_err', float('nan')):8.1e} "
                f"{r.get('memory_elements', {}).get('per_MDL', float('nan')):6.3f}")


if __name__ == "__main__":
    main()
