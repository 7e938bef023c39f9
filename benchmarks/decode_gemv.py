"""Decode-step matrix-vector products on Hyena-153M's shapes: cuBLAS vs inductor's fused reduction
(what passes/decode_gemv.py emits today) vs the Triton GEMV (kernels/gemv.py), the reduction
split along K in 2 and 4 (the pass's decode_gemv_splits option, an experiment). A tl.dot form
(exact fp32, M padded to 16) was 3.3-7.2x slower than the Triton GEMV at M = 8 on the H200
(2026-12-01, decode_gemv_h200_m8_warps_dot.json) and was removed.

    python benchmarks/decode_gemv.py [--rows 1 8] [--dtypes float32 bfloat16] [--shapes in_proj fc2]

Each product runs inside a CUDA graph (as in a decode step) over enough copies of its weight to
overflow the L2 cache (a 9 MB weight would otherwise be read from L2, not HBM), and the time per
product is the graph's time over the copies. Correctness first (every method vs an fp64/fp32
reference), then times, the Triton kernel at its default blocks and at the best of a small
sweep; a table last, JSON + PNG in benchmarks/results (or $OUT).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CUDA, log, rel  # noqa: E402

from lcsm_compile.kernels.gemv import gemv, gemv_blocks, gemv_reference  # noqa: E402
from lcsm_compile.passes.decode_gemv import COMPILE_OPTIONS, decompose_gemv  # noqa: E402

# Hyena-153M (d_model 864, MLP 1728, vocab 50257 padded to 8): (name, K, N) per layer and the head
SHAPES = [("in_proj", 864, 2592), ("fc1", 864, 1728), ("fc2", 1728, 864), ("out_proj", 864, 864),
          ("lm_head", 864, 50264)]
L2_BYTES = 60 << 20  # H100 50 MB, H200 60 MB of L2: the copies of a weight exceed it
# Triton compiles once per (blocks, dtype, rows) and reuses it across shapes: the sweep stays cheap.
SPLITS = (2, 4)  # split-K variants of the inductor reduction (K = 864 and 1728 divide by both)
TIMED = ("cublas", "inductor", "triton", "triton_pdl", "triton_best", *(f"split{S}" for S in SPLITS))
# (rows a program, BLOCK_K, warps) of the Triton kernel; a tile holds at most 16384 weight
# elements and at most 128 a thread. Fewer warps mean fewer cross-warp steps in the per-row
# reductions (at M = 8 on the H200, 2026-12-01: 1 warp best at every shape, 4 beat 8).
SWEEP = [(r, bk, w) for r in (1, 2, 4, 8, 16) for bk in (1024, 2048) for w in (1, 2, 4, 8)
         if r * bk <= 16384 and r * bk <= 128 * 32 * w]


def inductor_reduction(x, w, b, splits: int = 1):
    """What a decode segment's addmm becomes: passes/decode_gemv.py's reduction (split along K
    into `splits` partial sums: the decode_gemv_splits option), compiled by inductor with the
    decode path's options (one compile per shape, dtype and split)."""
    from torch._inductor import config  # noqa: PLC0415
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    # a tuple out, so that [0] below is the product (of a bare tensor it would be row 0, which
    # broadcasts against the reference at M = 1 and hid the mistake until M = 8)
    gm = make_fx(lambda x, w, b: (torch.addmm(b, x, w),))(x, w, b)
    assert decompose_gemv(gm, max_rows=x.shape[0], splits=splits) == 1
    with config.patch(COMPILE_OPTIONS):
        fn = compile_fx(gm, [x, w, b])
    return lambda x, w, b: fn(x, w, b)[0]


def graph_us(run, copies: int) -> float:
    import triton.testing  # noqa: PLC0415

    return float(triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")) * 1e3 / copies


def sweep(method_for, configs, Ws, bs, copies) -> tuple[list, float, list]:
    """Each config's time (method_for(config) is a method like bench_shape's), the best time and
    its config."""
    times = []
    for c in configs:
        fn = method_for(c)
        times.append([list(c), graph_us(lambda fn=fn: [fn(W, b) for W, b in zip(Ws, bs)], copies)])
    best = min(times, key=lambda ct: ct[1])
    return times, best[1], best[0]


def bench_shape(name, K, N, M, dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(K * N + M)
    nbytes = K * N * torch.finfo(dtype).bits // 8
    copies = max(1, -(-3 * L2_BYTES // nbytes))
    Ws = [torch.randn(N, K, generator=g, device="cuda").to(dtype) for _ in range(copies)]
    bs = [torch.randn(N, generator=g, device="cuda").to(dtype) for _ in range(copies)]
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    want = gemv_reference(x, Ws[0].t(), bs[0])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    inductor = inductor_reduction(x, Ws[0].t(), bs[0])
    methods = {
        "cublas": lambda W, b: torch.nn.functional.linear(x, W, b),
        "inductor": lambda W, b: inductor(x, W.t(), b),
        "triton": lambda W, b: gemv(x, W.t(), b),
        # launched with PDL, each product's weight read overlaps the previous one's tail
        "triton_pdl": lambda W, b: gemv(x, W.t(), b, pdl=True),
    }
    for S in SPLITS:
        fn = inductor_reduction(x, Ws[0].t(), bs[0], splits=S)
        methods[f"split{S}"] = lambda W, b, fn=fn: fn(x, W.t(), b)
    row = {"name": name, "K": K, "N": N, "M": M, "dtype": str(dtype).removeprefix("torch."),
           "weight_mb": nbytes / 2**20, "copies": copies, "blocks": list(gemv_blocks(M, N, K, itemsize=x.element_size()))}
    for key, fn in methods.items():
        err = rel(fn(Ws[0], bs[0]), want)
        row[f"{key}_rel_err"] = err
        if err > tol:
            row[f"{key}_us"] = None
            log(f"  {name} {row['dtype']} M={M}: {key} rel err {err:.1e} > {tol}: not timed")
            continue
        row[f"{key}_us"] = graph_us(lambda fn=fn: [fn(W, b) for W, b in zip(Ws, bs)], copies)
    row["sweep"], row["triton_best_us"], row["triton_best_blocks"] = sweep(
        lambda c: lambda W, b: gemv(x, W.t(), b, blocks=c), [(row["blocks"][0], *c) for c in SWEEP], Ws, bs, copies)
    for key in TIMED:
        t = row.get(f"{key}_us")
        row[f"{key}_tbps"] = nbytes / (t * 1e-6) / 1e12 if t else None
    log(f"  {name:8s} {row['dtype']:8s} M={M}: " + "  ".join(
        f"{k} {row[f'{k}_us']:.2f} us" for k in TIMED if row.get(f"{k}_us")))
    return row


def table(report: dict) -> str:
    lines = [f"{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['date']}",
             f"{'shape':9s} {'dtype':8s} {'M':>2s} {'MB':>6s} | {'cuBLAS':>7s} {'inductor':>8s} {'triton':>7s} {'pdl':>7s} "
             f"{'best':>7s} " + " ".join(f"{'split' + str(S):>7s}" for S in SPLITS)
             + f" us | {'TB/s best':>9s} | best blocks"]
    for r in report["rows"]:
        f = lambda v: f"{v:7.2f}" if v else "      -"  # noqa: E731
        tb = r.get("triton_best_tbps")
        lines.append(f"{r['name']:9s} {r['dtype']:8s} {r['M']:>2d} {r['weight_mb']:6.1f} | {f(r['cublas_us'])} "
                     f"{f(r['inductor_us']):>8s} {f(r['triton_us'])} {f(r.get('triton_pdl_us'))} {f(r['triton_best_us'])} "
                     + " ".join(f(r.get(f"split{S}_us")) for S in SPLITS) + "    | "
                     f"{tb if tb is None else round(tb, 2)!s:>9s} | {r['triton_best_blocks']}")
    return "\n".join(lines)


def summary(results: dict) -> str:
    """What `lcsm-compile bench --show decode_gemv` prints."""
    return table(results)


def plot(report: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['name']}\n{r['dtype'][:4]} M={r['M']}" for r in rows]
    for i, key in enumerate(("cublas", "inductor", "triton", "triton_best")):
        ax.bar([j + 0.2 * i for j in range(len(rows))], [r.get(f"{key}_tbps") or 0 for r in rows], 0.2, label=key)
    ax.set_xticks([j + 0.3 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("weight read rate (TB/s)")
    ax.set_title(f"decode GEMV, Hyena-153M shapes: {report['device']}, {report['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    names = [name for name, _, _ in SHAPES]
    ap.add_argument("--shapes", nargs="+", default=names, choices=names)
    args = ap.parse_args()
    if not CUDA:
        raise SystemExit("decode_gemv: needs a CUDA device (tests/test_gemv.py covers the kernel on CPU)")
    import triton  # noqa: PLC0415

    report = {"benchmark": "decode_gemv", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "rows": []}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    slug = report["device"].split()[1].lower() if len(report["device"].split()) > 1 else "gpu"
    path = out / f"decode_gemv_{slug}.json"
    with torch.no_grad():
        for dtype in (getattr(torch, d) for d in args.dtypes):
            for M in args.rows:
                for name, K, N in (shape for shape in SHAPES if shape[0] in args.shapes):
                    report["rows"].append(bench_shape(name, K, N, M, dtype))
                    path.write_text(json.dumps(report, indent=1))
    plot(report, path.with_suffix(".png"))
    log("\n" + table(report))


if __name__ == "__main__":
    main()
