"""StripedHyena (stripedhyena 0.2.2, Evo-1 width, Hyena blocks only): its own decoder vs ours.

    python benchmarks/thirdparty.py               # GPU: D=4096 (Evo-1), 1 layer, fp32, B=1, L up to 2^16
    python benchmarks/thirdparty.py --smoke       # CPU, tiny sizes: exercises the script only

Parts, each in its own process (one part's memory or failure never reaches another):
- own:     stripedhyena's recurrent decoding, `initialize_inference_params()` + stateful forward,
           one token per call, after prompts of P tokens (its cost does not depend on P);
- prefill: its stateless forward (FFT path; it recomputes the filter at L on every call) vs the
           model compiled with the lcsm backend (filters folded once, our conv kernels; the rest
           eager, since stripedhyena resizes its time vector per call and dynamo recompiles per L);
- ours:    `lcsm_compile.decoder` (inductor step, CUDA graphs), long convolutions on the online
           engine (Flash Inference tiling): every token of a generation from P0 to 2^16, the cost
           per token averaged over [P0, L] at L = 2^12 .. 2^16;
- modal:   the decoder as it builds itself: it recognises stripedhyena's filters as modal
           (Re sum r p^t) and steps them by `ModalRecurrence`: cost per token after prompts up to
           2^16 (the tiling above is the same decoder with modal_recurrence=False).
Correctness first: each decoder's outputs vs the full forward (relative error, in the JSON).
Tokens are fed from a fixed random sequence (no sampling, no host syncs inside timed loops).
Writes benchmarks/results/thirdparty_<device>.json (or under $OUT when set).

Memory: the lcsm fold evaluates stripedhyena's filter subgraph at max_len once per compile; its
intermediates (three complex (D, state, L) tensors, ~52 GB per layer at D=4096, L=2^16) bound
the number of layers that fit on an 80 GB H100 at L = 2^16 to one; the cost per token of both
decoders is per layer.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "thirdparty"))

import torch  # noqa: E402
from _common import CUDA, DEV, log, rel, sync  # noqa: E402

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def config(args):
    if args.smoke:
        return dict(hidden_size=32, num_layers=1, vocab_size=64, num_attention_heads=4, max_seqlen=512)
    return dict(hidden_size=4096, num_layers=args.layers, vocab_size=512, num_attention_heads=32,
                max_seqlen=args.max_len)


def build(args):
    """stripedhyena at Evo-1's shape, seeded, fp32, on the device; its time vector a buffer."""
    from stripedhyena.model import StripedHyena
    from thirdparty_models import draw_modal_parameters, evo1_config, keep_time_as_buffer

    cfg = evo1_config(**config(args))
    torch.manual_seed(0)
    with torch.device(DEV):
        model = StripedHyena(cfg)
    draw_modal_parameters(model, torch.Generator().manual_seed(1))
    keep_time_as_buffer(model, cfg.max_seqlen)  # as long as any call: no re-creation inside a capture
    return model.to(DEV).float().eval(), cfg


def tokens(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (1, n), generator=g).to(DEV)


def timed(fn, reps):
    """Median seconds of fn() over reps (one warm-up first)."""
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


# ---------------------------------------------------------------- parts
def part_own(args):
    """stripedhyena's own recurrent decoder: ms per token after prompts of P tokens."""
    from thirdparty_models import stripedhyena_recurrent_logits

    model, cfg = build(args)
    res = {}
    with torch.no_grad():
        ids = tokens(cfg, 96)
        full, _ = model(ids)
        rec = stripedhyena_recurrent_logits(model, ids, 32)
        res["rel_err_vs_forward"] = rel(rec[:, 31:], full[:, 31:])
        n = args.own_tokens
        for P in args.prompts_own:
            ids = tokens(cfg, P + n, seed=P)
            params = model.initialize_inference_params()
            model(ids[:, :P], inference_params_dict=params)
            for t in range(P, P + 8):  # warm-up steps
                model(ids[:, t : t + 1], inference_params_dict=params)
            sync()
            t0 = time.perf_counter()
            for t in range(P + 8, P + n):
                model(ids[:, t : t + 1], inference_params_dict=params)
            sync()
            dt = (time.perf_counter() - t0) / (n - 8)
            res[f"P={P}"] = {"ms_per_token": 1e3 * dt, "tokens_per_s": 1 / dt}
            log(f"own P={P}: {1e3 * dt:.3f} ms/token")
        # its mixer alone: one block's filter step (short FIR + modal recurrence + gating)
        block = model.blocks[0]
        z = torch.randn(1, 1, 3 * cfg.hidden_size, device=DEV)
        hp = params["hyena"]
        n = 4 * args.own_tokens
        for _ in range(8):
            block.filter(z, inference_params=hp)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            block.filter(z, inference_params=hp)
        sync()
        res["filter_step_ms"] = 1e3 * (time.perf_counter() - t0) / n
        log(f"own filter step alone: {res['filter_step_ms']:.4f} ms")
    return res


def part_prefill(args, L):
    """Its stateless forward (FFT path) vs the lcsm-compiled model, at length L."""
    from lcsm_compile.backend import lcsm_backend

    model, cfg = build(args)
    ids = tokens(cfg, L, seed=L)
    res = {"L": L}
    with torch.no_grad():
        t_theirs = timed(lambda: model(ids), args.reps)
        want, _ = model(ids)
        res["theirs_ms"] = 1e3 * t_theirs
        backend = functools.partial(lcsm_backend, options={"inner_backend": "eager", "strict": True})
        compiled = torch.compile(model, backend=backend)
        t0 = time.perf_counter()
        got, _ = compiled(ids)
        sync()
        res["compile_s"] = time.perf_counter() - t0
        res["rel_err"] = rel(got, want)
        del want, got
        t_ours = timed(lambda: compiled(ids), args.reps)
    res["ours_ms"] = 1e3 * t_ours
    res["speedup"] = t_theirs / t_ours
    log(f"prefill L={L}: theirs {1e3 * t_theirs:.2f} ms, ours {1e3 * t_ours:.2f} ms, rel err {res['rel_err']:.1e}")
    return res


def _fresh_time(model, L):
    """stripedhyena cuts its time vector to the length of its last call: a decoder built after
    calls would fold its filters only that far."""
    for f in model.modules():
        if "t" in getattr(f, "_buffers", {}):
            f.t = torch.arange(L, device=DEV)[None, None]


def _decoder(model, cfg, args, **options):
    """The lcsm decoder at max_len (modal recurrences where it recognises them, unless
    options turn them off), and the seconds its build took."""
    import lcsm_compile

    _fresh_time(model, args.max_len)
    t0 = time.perf_counter()
    dec = lcsm_compile.decoder(model, tokens(cfg, 16), max_len=args.max_len, inner_backend=args.inner, **options)
    return dec, time.perf_counter() - t0


def _check_decoder(dec, model, cfg, P, n):
    ids = tokens(cfg, P + n, seed=7)
    with torch.no_grad():
        want, _ = model(ids)
        out = [dec.prefill(ids[:, :P])[0]]
        for t in range(P, P + n):
            out.append(dec.step(ids[:, t : t + 1])[0])
    return rel(torch.cat(out, 1), want[:, P - 1 :])


def _generate(dec, ids, P, checkpoints):
    """Steps from P to the last checkpoint; seconds at each checkpoint (first 8 steps untimed)."""
    dec.prefill(ids[:, :P])
    for t in range(P, P + 8):
        dec._step((ids[:, t : t + 1],))
    sync()
    t0, out, t = time.perf_counter(), {}, P + 8
    for c in checkpoints:
        while t < c:
            dec._step((ids[:, t : t + 1],))
            t += 1
        sync()
        out[c] = time.perf_counter() - t0
    return out


def _modal_step_time(eng, n=2000):
    """One mixer's recurrence step (the fused kernel), replayed as a CUDA graph on GPU."""
    u = torch.randn(eng.B, eng.C, device=DEV)
    out = torch.empty_like(u)
    eng.reset()
    eng.prefill(0, torch.zeros(eng.B, eng.C, 1, device=DEV))
    with eng.scratch_position():
        if CUDA:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    eng.step(0, u, out=out)
                    eng._stepped.clear()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                eng.step(0, u, out=out)
            run = g.replay
        else:
            def run():
                eng.step(0, u, out=out)
                eng._stepped.clear()
        run()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        sync()
        dt = (time.perf_counter() - t0) / n
    eng.reset()
    return 1e3 * dt


def part_decoders(args):
    model, cfg = build(args)
    res = {"inner_backend": args.inner}
    # The tiling, forced (modal_recurrence=False), then the decoder as it chooses.
    dec, res["build_s"] = _decoder(model, cfg, args, modal_recurrence=False)
    res["cuda_graphs"] = dec._use_graphs
    res["tiling_rel_err"] = _check_decoder(dec, model, cfg, 64, 64)
    log(f"decoder built in {res['build_s']:.1f} s, tiling rel err {res['tiling_rel_err']:.1e}")
    L = args.max_len
    ids = tokens(cfg, L, seed=3)
    P0 = args.prompt0
    checkpoints = [c for c in args.checkpoints if P0 + 8 < c <= L]
    with torch.no_grad():
        secs = _generate(dec, ids, P0, checkpoints)
    res["tiling"] = {str(c): {"ms_per_token": 1e3 * s / (c - P0 - 8), "tokens_per_s": (c - P0 - 8) / s}
                     for c, s in secs.items()}
    for c, v in res["tiling"].items():
        log(f"ours (tiling) {P0}..{c}: {v['ms_per_token']:.4f} ms/token")
    del dec
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    dec, res["build_modal_s"] = _decoder(model, cfg, args)
    res["modal"] = [{"strategy": c.strategy.name, "reason": c.strategy.reason} for c in dec.plan.long_convs]
    if not all(c.strategy.name == "modal" for c in dec.plan.long_convs):
        raise RuntimeError(f"the decoder did not pick the modal recurrence: {res['modal']}")
    res["modal_rel_err"] = _check_decoder(dec, model, cfg, 64, 64)
    log(f"modal rel err {res['modal_rel_err']:.1e}")
    res["modal_step_ms"] = _modal_step_time(dec.program.engines[0])
    log(f"ModalRecurrence.step alone: {res['modal_step_ms']:.4f} ms")
    res["modal_decode"] = {}
    with torch.no_grad():
        for P in args.prompts_modal:
            P = min(P, L - args.modal_tokens - 8)
            secs = _generate(dec, ids, P, [P + 8 + args.modal_tokens])
            s = next(iter(secs.values()))
            res["modal_decode"][f"P={P}"] = {"ms_per_token": 1e3 * s / args.modal_tokens,
                                             "tokens_per_s": args.modal_tokens / s}
            log(f"ours (modal) after P={P}: {1e3 * s / args.modal_tokens:.4f} ms/token")
            dec.reset()
    del dec
    gc.collect()
    res["floor"] = part_floor(model, cfg, args)
    return res


def part_floor(model, cfg, args):
    """The decoder with no mixer at all (y = u: wrong outputs): what the position-wise part of a
    token costs (projections, MLP, norms: the weights' bytes), the floor under any mixer."""
    import lcsm_compile

    L = min(args.max_len, 1024)
    _fresh_time(model, L)
    dec = lcsm_compile.decoder(model, tokens(cfg, 16), max_len=L, inner_backend=args.inner, engine="floor")
    ids = tokens(cfg, L, seed=5)
    n = min(args.modal_tokens, L - 64 - 8)
    with torch.no_grad():
        secs = _generate(dec, ids, 64, [64 + 8 + n])
    s = next(iter(secs.values()))
    log(f"ours (floor, no mixer): {1e3 * s / n:.4f} ms/token")
    return {"ms_per_token": 1e3 * s / n, "tokens_per_s": n / s, "max_len": L}


# ---------------------------------------------------------------- driver
def run_part(name, argv, timeout):
    """One part in a fresh process; its JSON result, or the error."""
    cmd = [sys.executable, __file__, "--part", name, *argv]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    sys.stdout.write(p.stdout)
    sys.stderr.write(p.stderr[-4000:] if p.returncode else "")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall_s"] = time.perf_counter() - t0
            return r
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--part", default=None)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--only", default="own,prefill,decoders")
    args = ap.parse_args()
    if args.smoke:
        args.max_len, args.prefill_lengths, args.checkpoints = 512, [128, 512], [128, 256, 512]
        args.prompts_own, args.prompts_modal, args.prompt0 = [16, 64], [16, 400], 16
        args.own_tokens, args.modal_tokens, args.reps, args.inner = 24, 24, 2, "eager"
    else:
        # 2^16 does not fit an 80 GB H100: folding the filter at max_len keeps its subgraph's
        # intermediates (3 complex (D, 8, L) tensors) and the verifier probes on top (OOM, run 1)
        args.max_len, args.prefill_lengths = 1 << 15, [1 << 14, 1 << 15]
        args.checkpoints = [1 << k for k in range(11, 16)]
        args.prompts_own, args.prompts_modal, args.prompt0 = [1024, 8192], [1024, 1 << 15], 1024
        args.own_tokens, args.modal_tokens, args.reps = 200, 2000, 3
    if args.part:
        with torch.no_grad():
            if args.part == "own":
                r = part_own(args)
            elif args.part == "prefill":
                r = part_prefill(args, args.length)
            else:
                r = part_decoders(args)
        if CUDA:
            r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print("RESULT " + json.dumps(r), flush=True)
        return
    argv = (["--smoke"] if args.smoke else []) + ["--layers", str(args.layers), "--inner", args.inner]
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    results = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
               "config": {**config(args), "state_size": 8, "dtype": "fp32", "batch": 1,
                          "max_len": args.max_len, "model": "stripedhyena 0.2.2, Evo-1 shape, Hyena blocks only"}}
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    tag = "smoke" if args.smoke else ("h100" if "H100" in device else device.split()[-1].lower())
    path = out_dir / f"thirdparty_{tag}.json"
    only = args.only.split(",")

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    # the decoders first after the baseline: the prefill comparison is the part to lose on a timeout
    if "own" in only:
        results["own"] = run_part("own", argv, 150)
        save()
    if "decoders" in only:
        results["decoders"] = run_part("decoders", argv, 400)
        save()
    if "prefill" in only:
        results["prefill"] = []
        for L in args.prefill_lengths:
            results["prefill"].append(run_part("prefill", argv + ["--length", str(L)], 150))
            save()
    own = results.get("own", {}).get(f"P={args.prompts_own[0]}", {}).get("ms_per_token")
    dec = results.get("decoders", {})
    if own:
        for table in (dec.get("tiling", {}), dec.get("modal_decode", {})):
            for v in table.values():
                v["speedup_vs_own"] = own / v["ms_per_token"]
        save()
    log(json.dumps(results, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001 - the traceback, then a failing exit status
        traceback.print_exc()
        sys.exit(1)
