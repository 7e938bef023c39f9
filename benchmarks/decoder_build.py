"""How long `lcsm_compile.decoder` takes to build, and how much inductor's FX-graph cache saves.

    python benchmarks/decoder_build.py [--batch 1] [--max-len 4096] [--runs 2]
    python benchmarks/decoder_build.py --smoke      # CPU, tiny Hyena: exercises the script only

Each run is a fresh Python process (the cache that counts is the on-disk one a new process
finds): run 1 starts from an empty inductor cache directory of its own, later runs reuse it.
Every run builds the Hyena 153M decoder (inductor segments, CUDA graphs), checks it against the
eager forward over a prefill and 16 steps, and reports the build's seconds with inductor's
FX-graph cache hits / misses / bypasses. Writes benchmarks/results/decoder_build_<device>.json
(or under $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_build(args) -> dict:
    """The child process: build once, check, print one JSON line."""
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _common import DEV, rel, sync  # noqa: PLC0415
    from generate import make_model, options  # noqa: PLC0415
    from torch._dynamo.utils import counters as dyn_counters  # noqa: PLC0415

    import lcsm_compile  # noqa: PLC0415

    model = make_model(args.smoke, 1.0)
    B, P, steps = args.batch, 16, 16
    x = torch.randint(0, model.vocab_size, (B, P + steps), device=DEV)
    sync()
    t0 = time.perf_counter()
    dec = lcsm_compile.decoder(model, x[:, :1], max_len=args.max_len, **options(args.smoke))
    sync()
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(x)
        outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, P + steps)]
    err = rel(torch.cat(outs, 1), ref[:, P - 1 :])
    ind = dyn_counters["inductor"]
    return {"build_s": build_s, "rel_err": err,
            "fxgraph_cache_hit": ind.get("fxgraph_cache_hit", 0),
            "fxgraph_cache_miss": ind.get("fxgraph_cache_miss", 0),
            "fxgraph_cache_bypass": ind.get("fxgraph_cache_bypass", 0),
            "segment_compiles_without_cache": lcsm_compile.counters["decode"]["segment_compiles_without_cache"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=None, help="default 4096 (--smoke: 512)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.max_len = args.max_len or (512 if args.smoke else 4096)
    if args.child:
        print("RESULT " + json.dumps(one_build(args)), flush=True)
        return

    import torch  # noqa: PLC0415

    cache = tempfile.mkdtemp(prefix="lcsm_inductor_cache_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    runs = []
    for i in range(args.runs):
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--max-len", str(args.max_len)]
        cmd += ["--smoke"] if args.smoke else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"run {i + 1} failed (rc {proc.returncode})")
        runs.append(json.loads(line[0][7:]) | {"run": i + 1})
        print(f"run {i + 1}: {runs[-1]}", flush=True)
    bad = [r for r in runs if not r["rel_err"] <= 1e-4]
    if bad:
        raise SystemExit(f"decoder differs from eager: {bad}")
    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name().lower().replace(" ", "_") if cuda else "cpu"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton  # noqa: PLC0415

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "batch": args.batch, "max_len": args.max_len, "smoke": args.smoke, "runs": runs}
    (out_dir / f"decoder_build_{dev}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'run':>4} {'build s':>8} {'hits':>5} {'misses':>6} {'bypass':>6} {'rel err':>9}")
    for r in runs:
        print(f"{r['run']:>4} {r['build_s']:8.1f} {r['fxgraph_cache_hit']:>5} {r['fxgraph_cache_miss']:>6} "
              f"{r['fxgraph_cache_bypass']:>6} {r['rel_err']:9.2e}")


if __name__ == "__main__":
    main()
