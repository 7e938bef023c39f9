"""Prefill benchmark (issue 7): Triton causal FFT conv vs the torch.fft path vs inductor.

    python benchmarks/prefill.py --out benchmarks/results [--quick] [--no-inductor]
    python benchmarks/prefill.py --plot benchmarks/results/prefill_h100.json   # PNG from a JSON

The torch.fft path is stripedhyena / fla `fft_conv` (rfft of u and k at 2L, multiply, irfft,
+ D*u); inductor is torch.compile of that same function. Ours: `fft_conv(u, spectrum, skip=D)`
with the filter's spectrum prepared once (the folded-filter case). B in {1, 64}, D = 768,
L = 256 .. 2^20 (sizes that do not fit in memory are skipped), bf16 and fp32.

Order: every Triton variant is compiled (in parallel processes), checked for correctness on
fresh random inputs (odd B, poisoned output, vs fp64), then timed (triton.testing.do_bench:
median, L2 flushed, warm-up excluded). Writes prefill_<device>.json, prefill_<device>.png and
dispatch_table.json (the faster of triton / torch.fft per dtype, N, rows) and prints a table last.
The end-to-end Hyena-153M prefill (eager vs inductor vs lcsm) is benchmarks/prefill_e2e.py.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_MODEL = 768
LENGTHS = [256 << i for i in range(13)]       # 256 .. 2^20
BATCHES = (64, 1)
BF16_TOL, FP32_TOL = 1e-2, 1e-5


def fftconv_ref(u, k, D):
    """stripedhyena / safari `fftconv_ref` (without dropout and gelu)."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


# ---- Triton variants per FFT size (B = 64 sweep); the dispatch table keeps the best ----

def _v(n, r, m1, nw=None, persistent=False, precision="tf32x3", fwd_dot=None, inv_dot=None):
    return dict(n=n, r=r, m1=m1, num_warps=nw, persistent=persistent, precision=precision,
                fwd_dot=fwd_dot, inv_dot=inv_dot)


def variants(n: int, dtype: torch.dtype, quick: bool = False) -> list[dict]:
    from lcsm_compile.kernels.fftconv import make_plan

    if dtype == torch.bfloat16:
        table = {
            512: [_v(512, 1, 16, 2), _v(512, 1, 16, 4)],
            1024: [_v(1024, 1, 32, 4), _v(1024, 1, 16, 4)],
            2048: [_v(2048, 1, 32, 4), _v(2048, 1, 16, 4)],
            4096: [_v(4096, 1, 64, 4), _v(4096, 1, 32, 4)],
            8192: [_v(8192, 2, 64, 4, inv_dot=False), _v(8192, 2, 64, 4, inv_dot=True),
                   _v(8192, 4, 32, 4, inv_dot=False), _v(8192, 2, 64, 4, True, inv_dot=False)],
            16384: [_v(16384, 4, 64, 4, inv_dot=False), _v(16384, 4, 64, 4, inv_dot=True),
                    _v(16384, 8, 32, 4, inv_dot=True), _v(16384, 4, 64, 4, True, inv_dot=False)],
            32768: [_v(32768, 8, 64, 4, inv_dot=True), _v(32768, 8, 64, 4, inv_dot=False),
                    _v(32768, 16, 32, 4, inv_dot=True), _v(32768, 8, 64, 4, True, inv_dot=True)],
        }
    else:
        table = {
            512: [_v(512, 1, 16, 4), _v(512, 1, 16, 4, precision="ieee")],
            1024: [_v(1024, 1, 32, 4), _v(1024, 1, 32, 8)],
            2048: [_v(2048, 1, 32, 8), _v(2048, 1, 32, 8, precision="tf32")],
            4096: [_v(4096, 1, 64, 8), _v(4096, 1, 32, 8)],
            8192: [_v(8192, 4, 32, 8, inv_dot=False)],
            16384: [_v(16384, 8, 32, 8, inv_dot=True)],
            32768: [_v(32768, 16, 32, 8, inv_dot=True)],
        }
    out = table.get(n)
    if out is None:
        plan = make_plan(n)
        out = [] if plan is None else [plan.as_dict()]
    return out[:1] if quick else out


def to_plan(v: dict):
    from lcsm_compile.kernels.fftconv import make_plan
    from lcsm_compile.kernels.fftconv.plan import FFTPlan

    if "m2" in v:
        return FFTPlan(**v).check()
    plan = make_plan(v["n"], r=v["r"], m1=v["m1"], num_warps=v["num_warps"], persistent=v["persistent"],
                     precision=v["precision"], fwd_dot=v["fwd_dot"], inv_dot=v["inv_dot"])
    if plan is None:
        raise ValueError(f"bad variant {v}")
    return plan


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _compile_one(args):
    """Worker: one tiny launch fills Triton's on-disk cache (same specialization as the runs)."""
    v, dname = args
    try:
        from lcsm_compile.kernels.fftconv import fft_conv

        plan = to_plan(v)
        L = plan.n // 2
        u = torch.randn(2, 16, L, device="cuda", dtype=_dtype(dname))
        h = torch.randn(16, L, device="cuda")
        fft_conv(u, h, plan=plan, skip=torch.randn(16, device="cuda"))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - report, the main process skips the variant
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def precompile(jobs, workers: int):
    t = time.time()
    errors = {}
    if workers <= 1:
        res = [_compile_one(j) for j in jobs]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            res = list(ex.map(_compile_one, jobs))
    for (v, dname), r in zip(jobs, res):
        if r is not None:
            errors[(json.dumps(v, sort_keys=True), dname)] = r
    print(f"compiled {len(jobs)} variants in {time.time() - t:.0f}s, {len(errors)} failed", flush=True)
    for k, r in errors.items():
        print("  compile failed:", k, r, flush=True)
    return errors


# ---- correctness, timing ----

def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def check_variant(plan, dtype, L) -> tuple[float, dict]:
    """Fresh random inputs, odd B, output poisoned with NaN; vs fp64 torch.fft + skip."""
    from lcsm_compile.kernels.fftconv import fft_conv
    from lcsm_compile.kernels.fftconv.conv import LAST_KERNEL
    from lcsm_compile.ops import causal_conv_fft

    B, D = 3, 16
    u = torch.randn(B, D, L, device="cuda", dtype=dtype)
    h = torch.randn(D, L, device="cuda") / math.sqrt(L)
    skip = torch.randn(D, device="cuda")
    y = torch.full_like(u, float("nan"))
    fft_conv(u, h, plan=plan, skip=skip, out=y)
    torch.cuda.synchronize()
    ref = causal_conv_fft(u.double(), h.double()) + skip.double()[:, None] * u.double()
    k = LAST_KERNEL[0]
    info = {}
    for name in ("n_regs", "n_spills"):
        if hasattr(k, name):
            info[name] = getattr(k, name)
    try:
        info["shared"] = k.metadata.shared
    except AttributeError:
        pass
    return rel_err(y, ref), info


def bench_ms(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median"))


def fits(B, L, dtype, per_elem=72) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return B * D_MODEL * L * per_elem < 0.85 * free


def run(args):
    from lcsm_compile.kernels.fftconv import conv_size, fft_conv, prepare_filter, torch_fft_conv

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    dtypes = [torch.bfloat16, torch.float32]
    lengths = [L for L in LENGTHS if L <= args.max_len]
    log = {"variants": [], "rows": [], "failures": []}
    # 1. compile every variant in parallel
    jobs = []
    for dtype in dtypes:
        for L in lengths:
            for v in variants(conv_size(L, L), dtype, args.quick):
                job = (v, str(dtype).removeprefix("torch."))
                if job not in jobs:
                    jobs.append(job)
    failed = precompile(jobs, args.workers)
    # 2. correctness of every variant that compiled
    ok = {}
    for v, dname in jobs:
        key = (json.dumps(v, sort_keys=True), dname)
        dtype = _dtype(dname)
        if key in failed:
            log["failures"].append({"variant": v, "dtype": dname, "error": failed[key]})
            continue
        try:
            plan = to_plan(v)
            L = plan.n // 2 - 7
            err, info = check_variant(plan, dtype, L)
        except Exception as e:  # noqa: BLE001
            log["failures"].append({"variant": v, "dtype": dname, "error": repr(e)[:300]})
            print("check failed", v, dname, repr(e)[:300], flush=True)
            continue
        tol = BF16_TOL if dtype != torch.float32 else (FP32_TOL if v["precision"] != "tf32" else 1e-3)
        good = err == err and err < tol
        ok[key] = good
        log["variants"].append({"plan": plan.as_dict(), "dtype": dname, "rel_err": err, "pass": good, **info})
        print(f"check {dname:9s} {plan.key()} nw={plan.num_warps} pers={int(plan.persistent)} "
              f"{plan.precision:6s} err={err:.2e} {'ok' if good else 'FAIL'} {info}", flush=True)
    # 3. timings
    inductor = torch.compile(fftconv_ref, dynamic=True) if args.inductor else None
    best_by_n: dict[tuple, dict] = {}
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        for B in BATCHES:
            for L in lengths:
                if not fits(B, L, dtype):
                    print(f"skip {dname} B={B} L={L}: does not fit", flush=True)
                    continue
                n = conv_size(L, L)
                row = {"dtype": dname, "B": B, "D": D_MODEL, "L": L, "n": n}
                try:
                    u = torch.randn(B, D_MODEL, L, device="cuda", dtype=dtype)
                    k = torch.randn(D_MODEL, L, device="cuda") * torch.exp(
                        -torch.arange(L, device="cuda") / (L / 8)) / math.sqrt(L)
                    Dv = torch.randn(D_MODEL, device="cuda")
                    ref = fftconv_ref(u, k, Dv)
                    row["torch_fft_ms"] = bench_ms(lambda: fftconv_ref(u, k, Dv))
                    torch_fft_conv(u, k, skip=Dv)
                    row["torch_cached_ms"] = bench_ms(lambda: torch_fft_conv(u, k, skip=Dv))
                    if inductor is not None:
                        try:
                            yi = inductor(u, k, Dv)
                            row["inductor_err"] = rel_err(yi, ref.double())
                            row["inductor_ms"] = bench_ms(lambda: inductor(u, k, Dv))
                        except Exception as e:  # noqa: BLE001
                            row["inductor_error"] = repr(e)[:200]
                    # Triton: the B=64 sweep tries every checked variant, B=1 the best of B=64
                    cands = [v for v in variants(n, dtype, args.quick)
                             if ok.get((json.dumps(v, sort_keys=True), dname))]
                    if B != 64 and (dname, n) in best_by_n:
                        cands = [best_by_n[(dname, n)]]
                    times = []
                    for v in cands:
                        plan = to_plan(v)
                        spec = prepare_filter(k, L, plan)
                        y = fft_conv(u, spec, skip=Dv)
                        err = rel_err(y, ref.double())
                        ms = bench_ms(lambda: fft_conv(u, spec, skip=Dv))
                        times.append({"plan": plan.as_dict(), "ms": ms, "rel_err_vs_torch": err})
                        del spec, y
                    row["triton_variants"] = times
                    if times:
                        best = min(times, key=lambda t: t["ms"])
                        row["triton_ms"] = best["ms"]
                        row["triton_plan"] = best["plan"]
                        if B == 64:
                            best_by_n[(dname, n)] = next(v for v, t in zip(cands, times) if t is best)
                    else:
                        row["triton_note"] = "no Triton plan (not covered: torch.fft)" if not cands else "no passing variant"
                    for base in ("torch_fft_ms", "torch_cached_ms", "inductor_ms"):
                        if base in row and "triton_ms" in row:
                            row["speedup_vs_" + base.removesuffix("_ms")] = row[base] / row["triton_ms"]
                    del u, k, ref
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                    traceback.print_exc()
                torch.cuda.empty_cache()
                log["rows"].append(row)
                if args.partial:
                    Path(args.partial).write_text(json.dumps(log, indent=1))
                print("row", json.dumps({k: v for k, v in row.items() if k != "triton_variants"}), flush=True)
    meta = {
        "device": dev, "torch": torch.__version__, "triton": __import__("triton").__version__,
        "cuda": torch.version.cuda, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "D": D_MODEL, "timing": "triton.testing.do_bench median, warmup 10 ms, rep 30 ms, L2 flushed",
    }
    return {**meta, **log}


def dispatch_table(results: dict) -> dict:
    entries = []
    for row in results["rows"]:
        if "torch_cached_ms" not in row:
            continue
        tri = row.get("triton_ms")
        impl = "triton" if tri is not None and tri < row["torch_cached_ms"] else "torch"
        entries.append(dict(dtype=row["dtype"], n=row["n"], rows=row["B"] * row["D"], impl=impl,
                            plan=row.get("triton_plan"), triton_ms=tri, torch_ms=row["torch_cached_ms"]))
    return {"device": results["device"], "date": results["date"], "torch": results["torch"],
            "triton": results["triton"], "source": "benchmarks/prefill.py", "entries": entries}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, dname in zip(axes, ("bfloat16", "float32")):
        for B, ls in ((64, "-"), (1, "--")):
            rows = [r for r in results["rows"] if r["dtype"] == dname and r["B"] == B]
            for key, color in (("triton_ms", "C0"), ("torch_fft_ms", "C1"), ("inductor_ms", "C2")):
                pts = [(r["L"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), ls, color=color, marker="o", ms=3,
                            label=f"{key.removesuffix('_ms')} B={B}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"causal conv, D={results['D']}, {dname}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']}  torch {results['torch']}  triton {results['triton']}  {results['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(results: dict) -> str:
    lines = [f"{results['device']} | torch {results['torch']} | triton {results['triton']} | {results['date']}",
             f"{'dtype':9s} {'B':>3s} {'L':>8s} {'triton':>9s} {'torch.fft':>9s} {'inductor':>9s} "
             f"{'vs fft':>7s} {'vs ind':>7s}  plan"]
    for r in results["rows"]:
        def f(key):
            return f"{r[key]:9.3f}" if key in r else f"{'-':>9s}"

        def s(key):
            return f"{r[key]:7.2f}" if key in r else f"{'-':>7s}"

        p = r.get("triton_plan")
        ptxt = (f"r={p['r']} {p['m1']}x{p['m2']} w{p['num_warps']}{' P' if p['persistent'] else ''}"
                f"{'' if p['r'] == 1 else (' fd' if p.get('fwd_dot') else ' fe') + (' id' if p.get('inv_dot') else ' ie')}"
                f"{' ' + p['precision'] if r['dtype'] == 'float32' else ''}") if p else r.get("triton_note", r.get("error", ""))
        lines.append(f"{r['dtype']:9s} {r['B']:3d} {r['L']:8d} {f('triton_ms')} {f('torch_fft_ms')} {f('inductor_ms')} "
                     f"{s('speedup_vs_torch_fft')} {s('speedup_vs_inductor')}  {ptxt}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--table", default=None, help="also write the dispatch table here")
    ap.add_argument("--max-len", type=int, default=1 << 20)
    ap.add_argument("--quick", action="store_true", help="one variant per size")
    ap.add_argument("--no-inductor", dest="inductor", action="store_false")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--partial", default=None, help="rewrite this JSON after every row")
    ap.add_argument("--plot", default=None, help="only draw the PNG of an existing results JSON")
    args = ap.parse_args()
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        plot(res, Path(args.plot).with_suffix(".png"))
        print(summary(res))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    tag = "h100" if "H100" in res["device"] else res["device"].split()[-1].lower().replace(" ", "_")
    jpath = out / f"prefill_{tag}.json"
    table = dispatch_table(res)
    (out / "dispatch_table.json").write_text(json.dumps(table, indent=1))
    if args.table:
        Path(args.table).write_text(json.dumps(table, indent=1))
    jpath.write_text(json.dumps(res, indent=1))
    try:
        plot(res, jpath.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001
        print("plot failed:", repr(e))
    print(summary(res))


if __name__ == "__main__":
    main()
