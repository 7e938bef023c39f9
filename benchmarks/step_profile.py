"""Where one decode step's time goes: the kernels of a token of the Hyena 153M decoder.

    python benchmarks/step_profile.py [--batch 1] [--max-len 4096] [--sine-freq 1]
    python benchmarks/step_profile.py --smoke     # CPU, tiny Hyena: exercises the script only

Profiles (torch.profiler, CUDA activity) a number of replays of the decoder's token graph at
tile level -1 (no tile due) and of the position-wise floor (the same step program with the long
mixers removed), and prints, for each, the kernels grouped by name: calls per token, µs per token,
share. The wall time per replay (CUDA events) is printed beside the sum of kernel time, so the gap
between kernels shows too. Writes benchmarks/results/step_profile_<device>.json.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CUDA, DEV, log, rel, sync, timed  # noqa: E402
from generate import make_model, options  # noqa: E402

import lcsm_compile  # noqa: E402
from lcsm_compile.runtime.step_program import StepProgram  # noqa: E402

P = 64


def kernel_table(prof, replays: int) -> list[dict]:
    """Device kernels grouped by name, per token."""
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if not dev_us or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        rows.append({"kernel": ev.key[:90], "calls_per_token": ev.count / replays, "us_per_token": dev_us / replays})
    rows.sort(key=lambda r: -r["us_per_token"])
    return rows


def profile(name: str, fn, reps: int) -> dict:
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile

    wall = timed(fn, reps) * 1e6
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        sync()
    rows = kernel_table(prof, reps)
    total = sum(r["us_per_token"] for r in rows)
    log(f"\n== {name}: wall {wall:.1f} us/token, kernels {total:.1f} us/token, "
        f"{sum(r['calls_per_token'] for r in rows):.0f} kernels/token ==")
    log(f"{'us/tok':>8} {'share':>6} {'calls':>6}  kernel")
    for r in rows[:25]:
        log(f"{r['us_per_token']:8.1f} {r['us_per_token'] / max(total, 1e-9):6.1%} {r['calls_per_token']:6.1f}  "
            f"{r['kernel']}")
    return {"wall_us_per_token": wall, "kernel_us_per_token": total, "kernels": rows}


def summary(results: dict) -> str:
    """What `lcsm-compile bench --show step_profile` prints: the top kernels of each profile."""
    lines = [f"B={results['batch']} max_len={results['max_len']} options={results.get('options')}"
             + "".join(f" {k}={results[k]}" for k in ("inductor", "segment_compiler") if results.get(k))]
    if results.get("note"):
        lines.append(f"note: {results['note']}")
    for name, prof in results["profiles"].items():
        lines.append(f"-- {name}: wall {prof['wall_us_per_token']:.1f} us/token, kernels "
                     f"{prof['kernel_us_per_token']:.1f} us/token")
        lines += [f"{r['us_per_token']:8.1f} {r['calls_per_token']:6.1f}  {r['kernel'][:70]}" for r in prof["kernels"][:8]]
    return "\n".join(lines)


# decode options with a flag: (flag, option, file-name tag, type); the file name gets _{tag}{value}
OPTION_FLAGS = (("--gemv-rows", "decode_gemv_rows", "gemv", int),
                ("--gemv-kernel", "decode_gemv_kernel", "", str),
                ("--gemv-triton-rows", "decode_gemv_triton_rows", "tritonrows", int),
                ("--gemv-splits", "decode_gemv_splits", "split", int),
                ("--persistent-k", "decode_persistent_k", "persistent", int),
                ("--pdl", "decode_pdl", "pdl", lambda v: bool(int(v))),
                ("--fuse-norm", "decode_fuse_norm", "fusenorm", lambda v: bool(int(v))))


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def inductor_settings(pairs: list[str]) -> dict:
    """--inductor KEY=VALUE ... as a torch._inductor.config patch (values as Python literals)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=None, help="default 4096 (--smoke: 512, the tiny model's limit is 1024)")
    ap.add_argument("--sine-freq", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=50)
    for flag, option, _, kind in OPTION_FLAGS:
        ap.add_argument(flag, type=kind, default=None, help=f"the {option} option (default: the setting's)")
    ap.add_argument("--autocast", action="store_true", help="decoder built under bf16 autocast (weights cast once)")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="inductor config for the step's compiles, e.g. triton.multi_kernel=1 or "
                         "triton.mix_order_reduction=False (PDL: --pdl, the decode_pdl option, set inside)")
    args = ap.parse_args()
    args.inductor = inductor_settings(args.inductor)
    from torch._inductor import config as inductor_config  # noqa: PLC0415

    with torch.no_grad(), inductor_config.patch(args.inductor):
        profile_decoder(args)


def profile_decoder(args) -> None:
    args.max_len = args.max_len or (512 if args.smoke else 4096)
    model = make_model(args.smoke, args.sine_freq)
    ids = torch.randint(0, model.vocab_size, (args.batch, P), device=DEV)
    opts = options(args.smoke) | {option: v for flag, option, _, _ in OPTION_FLAGS
                                  if (v := getattr(args, _dest(flag))) is not None}
    # the step programs hold the casts captured under autocast and switch it off themselves
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=args.autocast):
        dec = lcsm_compile.decoder(model, ids, max_len=args.max_len, **opts)
        log(f"built {dec}")
        out = dec.prefill(ids)
        tok, seq, outs = out[:, -1].argmax(-1, keepdim=True), [ids], [out]
        for _ in range(8):  # the first step after a prefill captures the graphs
            seq.append(tok)
            outs.append(dec.step(tok))
            tok = outs[-1][:, -1].argmax(-1, keepdim=True)
        # correctness first: a variant (options, --inductor) must still be the model
        err = rel(torch.cat(outs, 1).float(), model(torch.cat(seq, 1))[:, P - 1:].float())  # prefill: last position
    tol = 2e-2 if args.autocast else 1e-4
    log(f"decoder vs eager, prefill {P} + 8 steps: relative error {err:.1e} (tol {tol:.0e})")
    if err > tol:
        raise SystemExit(f"step_profile: the decoder is off the model ({err:.1e} > {tol:.0e}); not timed")
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "batch": args.batch,
              "max_len": args.max_len, "decoder": repr(dec), "options": opts, "autocast": args.autocast,
              "inductor": args.inductor, "segment_compiler": dataclasses.asdict(dec.program.compiler),
              "rel_err_vs_eager": err, "profiles": {}}
    try:
        import triton  # noqa: PLC0415

        report["triton"] = triton.__version__
    except ImportError:
        pass
    x = [tok]
    if dec._graphs is not None:
        g, prog = dec._graphs.graphs[dec._graphs.levels[0]], dec.program

        def ours():  # tile level -1 (or the recurrences' only graph) at a fixed position
            prog.t.fill_(P + 3)
            g.replay()
    else:
        def ours():
            dec.program.run_segments(x)
    report["profiles"]["ours_token"] = profile("ours: one token, no tile due", ours, args.reps)
    floor = StepProgram(dec.plan, torch.device(DEV), floor=True, like=dec.program)
    report["profiles"]["floor_eager"] = profile("floor, segments launched one by one",
                                                lambda: floor.run_segments(x), args.reps)
    if CUDA:
        from lcsm_compile.runtime.cuda_graphs import StepGraphs  # noqa: PLC0415

        fg = StepGraphs(floor).graphs[None]

        def floor_graph():
            floor.t.zero_()
            fg.replay()

        report["profiles"]["floor_graph"] = profile("floor, one CUDA graph", floor_graph, args.reps)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu_smoke" if args.smoke else "".join(c if c.isalnum() else "_" for c in report["device"].lower())
    variant = "".join(f"_{tag}{v}" for flag, _, tag, _ in OPTION_FLAGS
                      if (v := getattr(args, _dest(flag))) is not None) + ("_autocast" if args.autocast else "") + (
        "_" + "_".join(k.split(".")[-1] + "-" + str(v) for k, v in args.inductor.items())
        if args.inductor else "")
    (out_dir / f"step_profile_{slug}_b{args.batch}{variant}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
