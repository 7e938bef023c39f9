"""Can a decode step's products stream their weights while the previous kernel runs?

    python benchmarks/decode_chain.py [--layers 18] [--reps 50] [--smoke]

A decode step at B = 1 is a chain of dependent matrix-vector products (Hyena-153M: in_proj,
out_proj, fc1, fc2 per layer, 24 MB of fp32 weights). Inductor's kernels for them (what the step
program compiles today, passes/decode_gemv.py) wait for the previous kernel before their first
load, so weights are read strictly one product after another (benchmarks/NOTES_decode_floor.md).
This script holds that against a hand-written Triton product whose programs load their weight
rows *before* the grid-dependency wait (programmatic dependent launch, Hopper): a dependent
kernel's blocks that are resident early stream their weights under the previous kernel. Same
chain, same shapes, a pointwise nonlinearity between products (softsign, fused into the next
product's load as inductor fuses the model's activations):

- inductor: the chain traced and compiled by the step program's SegmentCompiler (reductions,
  PDL, persistent K), one CUDA graph;
- stream+pdl: the Triton product, weight rows loaded before `gdc_wait`, launched with PDL, one
  CUDA graph (and a small sweep of rows per program and warps); `stream`: the same kernel and
  graph without PDL (is it the early loads or the kernel itself?);
- persistent: the whole chain in one launch, one program per SM, a grid-wide barrier between
  products, each program's next weight tile loaded before it waits (benchmarks/_persistent_chain.py:
  the test for a fused decode step);
- read only: every weight byte read once by one reduction, the floor under any chain.

The product kernel is its own, not kernels/gemv.py's: that one streams x and w together in
K-blocks, while the test needs a program's whole weight rows loaded before the wait.

Correctness first (every variant vs an fp64 torch chain), then the time per chain (graph
replays), its read rate of the weights and the time per layer; a table last; JSON + PNG in
benchmarks/results (or $OUT). --smoke: tiny shapes on CPU (Triton through the interpreter,
no PDL, no inductor variant), to exercise the script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CUDA, DEV, log, rel  # noqa: E402
from _online_conv_cases import graph_time  # noqa: E402
from _persistent_chain import persistent_chain  # noqa: E402

from lcsm_compile.kernels.gemv import pdl_supported  # noqa: E402

# (name, K, N, K of the vector it reads): out_proj reads the first 864 of in_proj's 2592 outputs
LAYER = [("in_proj", 864, 2592), ("out_proj", 864, 864), ("fc1", 864, 1728), ("fc2", 1728, 864)]
SMOKE_LAYER = [("in_proj", 24, 72), ("out_proj", 24, 24), ("fc1", 24, 48), ("fc2", 48, 24)]
SMS = 132  # H100 / H200


@triton.jit
def _stream_product_kernel(x_ptr, w_ptr, y_ptr, N, K, ROWS: tl.constexpr, BK: tl.constexpr,
                           SOFTSIGN: tl.constexpr, USE_GDC: tl.constexpr):
    # y[n] = sum_k w[n, k] f(x[k]), f = softsign or identity; w row-major (N, K)
    o_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_k = tl.arange(0, BK)
    m_w = (o_n < N)[:, None] & (o_k < K)[None, :]
    w = tl.load(w_ptr + o_n[:, None].to(tl.int64) * K + o_k[None, :], mask=m_w, other=0.0)
    if USE_GDC:
        # the weight is no output of the previous kernel: its load is issued before the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + o_k, mask=o_k < K, other=0.0)
    if SOFTSIGN:
        x = x / (1.0 + tl.abs(x))
    y = tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + o_n, y, mask=o_n < N)


def rows_for(N: int, smoke: bool, scale: float = 1.0) -> int:
    """Rows per program: enough programs to cover the SMs, at most 16 rows (times `scale`, for
    the sweep), a power of two."""
    if smoke:
        return 8
    r = 1
    while r * 2 <= min(16, N // SMS) * scale:
        r *= 2
    return r


# the stream kernel's sweep: (rows scale, warps); the first is the default
SWEEP = [(1.0, 8), (1.0, 4), (0.5, 4), (0.5, 8), (2.0, 8), (2.0, 16)]
# the persistent kernel's (rows a tile, warps)
PERSISTENT = [(4, 8), (8, 8), (8, 16), (16, 16)]


def make_chain(layers: int, shapes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = []
    for _ in range(layers):
        for _, K, N in shapes:
            ws.append((torch.randn(N, K, generator=g) / K ** 0.5).to(DEV))
    x = torch.randn(shapes[0][1], generator=g).to(DEV)
    return x, ws


def chain_reference(x, ws, shapes):
    """fp64 torch: each product reads the first K of the previous output, softsign after the first."""
    v = x.double()
    for i, w in enumerate(ws):
        K = w.shape[1]
        u = v[:K]
        if i:
            u = u / (1 + u.abs())
        v = w.double() @ u
    return v


def triton_chain(x, ws, smoke: bool, pdl: bool, scale: float = 1.0, warps: int = 8):
    """Launches of the Triton chain on fixed buffers; returns (run, output buffer)."""
    outs = [torch.empty(w.shape[0], device=DEV) for w in ws]
    warps = 4 if smoke else warps

    def run():
        v = x
        for i, (w, y) in enumerate(zip(ws, outs)):
            N, K = w.shape
            rows = rows_for(N, smoke, scale)
            kw = {"launch_pdl": True} if pdl else {}
            _stream_product_kernel[(triton.cdiv(N, rows),)](
                v, w, y, N, K, ROWS=rows, BK=triton.next_power_of_2(K), SOFTSIGN=i > 0, USE_GDC=pdl,
                num_warps=warps, **kw)
            v = y
    return run, outs[-1]


def read_only(ws):
    """The floor under any chain: every weight byte read once by one reduction over one buffer."""
    flat = torch.cat([w.reshape(-1) for w in ws])
    out = {}

    def run():
        out["s"] = flat.sum()
    return run


def inductor_chain(x, ws):
    """The same chain as the step program compiles a segment (mm -> reductions, PDL, persistent K)."""
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    from lcsm_compile.runtime.segment_compile import SegmentCompiler  # noqa: PLC0415
    from lcsm_compile.settings import Settings  # noqa: PLC0415

    def chain(v, *wts):  # wts: (K, N) views of the (N, K) weights, as nn.Linear hands them to mm
        v = v[None]
        for i, wt in enumerate(wts):
            u = v[:, : wt.shape[0]]
            if i:
                u = u / (1 + u.abs())
            v = torch.mm(u, wt)
        return v[0]

    wts = [w.t() for w in ws]
    gm = make_fx(chain)(x, *wts)
    compiled = SegmentCompiler.for_device(torch.device(DEV), Settings())(gm, [x, *wts])
    out = {}

    def run():
        out["y"] = compiled(x, *wts)
    return run, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    shapes = SMOKE_LAYER if args.smoke else LAYER
    layers = 2 if args.smoke else args.layers
    torch.backends.cuda.matmul.allow_tf32 = False
    x, ws = make_chain(layers, shapes)
    ref = chain_reference(x, ws, shapes)
    weight_bytes = sum(w.numel() * w.element_size() for w in ws)
    variants = {"stream": triton_chain(x, ws, args.smoke, pdl=False)}
    pdl = pdl_supported(torch.device(DEV))
    if pdl:
        variants["stream+pdl"] = triton_chain(x, ws, args.smoke, pdl=True)
        for scale, warps in SWEEP[1:]:
            variants[f"stream+pdl r{scale:g}w{warps}"] = triton_chain(x, ws, args.smoke, True, scale, warps)
    if CUDA:
        variants["inductor"] = inductor_chain(x, ws)
    # one program per SM (all resident: the grid barrier needs it); the interpreter runs one
    programs = torch.cuda.get_device_properties(DEV).multi_processor_count if CUDA else 1
    for rows, warps in PERSISTENT if CUDA else PERSISTENT[:1]:
        variants[f"persistent r{rows}w{warps}"] = persistent_chain(x, ws, programs, rows, warps)
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "layers": layers, "shapes": shapes, "weight_bytes": weight_bytes, "smoke": args.smoke,
              "rows": {name: rows_for(N, args.smoke) for name, _, N in shapes}, "variants": {}}
    # correctness first: every variant against the fp64 chain; a variant that fails is reported
    for name, (run, out) in list(variants.items()):
        try:
            run()
        except Exception as e:  # noqa: BLE001 - e.g. a Triton without launch_pdl: say so, go on
            report["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:300], "rel_err": float("nan")}
            log(f"{name:12s} failed: {report['variants'][name]['error']}")
            del variants[name]
            continue
        got = out["y"] if isinstance(out, dict) else out
        err = rel(got, ref)
        report["variants"][name] = {"rel_err": err}
        log(f"{name:12s} vs fp64 chain: relative error {err:.1e}")
        if err > 1e-4:  # reported, not timed; the other variants go on
            log(f"{name:12s} is off the reference ({err:.1e}): not timed")
            del variants[name]
    if CUDA:
        for name, (run, _) in variants.items():
            s = graph_time(run, reps=args.reps)  # the chain captured reps times in one graph
            report["variants"][name].update(us=s * 1e6, tbps=weight_bytes / s / 1e12, us_per_layer=s * 1e6 / layers)
        s = graph_time(read_only(ws), reps=args.reps)
        report["variants"]["read only"] = {"rel_err": 0.0, "us": s * 1e6, "tbps": weight_bytes / s / 1e12,
                                           "us_per_layer": s * 1e6 / layers}
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu_smoke" if args.smoke else "".join(c if c.isalnum() else "_" for c in report["device"].lower())
    (out_dir / f"decode_chain_{slug}.json").write_text(json.dumps(report, indent=1))
    if CUDA:
        plot(report, out_dir / f"decode_chain_{slug}.png")
    log(f"\n{layers} layers x {len(shapes)} products, {weight_bytes / 1e6:.0f} MB of fp32 weights, "
        f"rows per program {report['rows']}")
    log(f"{'variant':12s} {'us/chain':>9s} {'us/layer':>9s} {'TB/s':>6s} {'rel err':>8s}")
    for name, v in report["variants"].items():
        log(f"{name:12s} {v.get('us', float('nan')):9.1f} {v.get('us_per_layer', float('nan')):9.2f} "
            f"{v.get('tbps', float('nan')):6.2f} {v['rel_err']:8.1e}")


def plot(report: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [n for n, v in report["variants"].items() if "us_per_layer" in v]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [report["variants"][n]["us_per_layer"] for n in names], color="tab:blue")
    ax.set_ylabel("µs per layer (4 dependent products)")
    ax.set_title(f"{report['device']}, {report['layers']} layers, fp32, B = 1\n"
                 f"torch {report['torch']}, triton {report['triton']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
