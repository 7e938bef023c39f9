"""Generation benchmark (issue 5): Hyena 153M (18 x 864, fp32) generating up to L = 2^17, B = 1 and 8.

    python benchmarks/generate.py              # GPU
    python benchmarks/generate.py --smoke      # CPU, tiny Hyena: exercises the script only
    python benchmarks/generate.py --autocast   # the model under bf16 autocast (bf16 weights, cast once)

Five ways to produce token t+1 from tokens 0..t, per config (B, L):
- eager recompute: the model's full forward over the whole prefix for every token (what HF
  `generate(use_cache=False)` does); f(n) = one forward at length n, timed at n = 2^10 .. L,
  interpolated linearly in n and summed over the generation;
- lazy: `decoder(engine="lazy")`: the same compiled step program, each long conv summing its
  whole history (O(t) per token; eager launches, its shapes change with t); timed at several
  t, interpolated, summed;
- lazy, graphed (`lazy-g`): the same sums with launches that replay (`engine="lazy-graphed"`),
  one CUDA graph per token and window level (the smallest power of two > t), like ours: the
  lazy baseline without its launch overhead. Each level used is timed at both of its ends
  (affine in t in between) and summed over the generation (_generate_lazy.py);
- ours: `lcsm_compile.decoder`: inductor-compiled segments + the online conv engine, one CUDA
  graph replay per token. A token costs base + tile(level(t)); every level's token graph is
  timed, and a generation's total is the level-weighted sum (the schedule is known), checked
  against a real timed greedy run of W tokens;
- floor: the same step program with the long mixers removed (y = u), one CUDA graph per token:
  what the position-wise part alone costs.
Correctness first (decoder vs the eager forward at every position of a prefill + 128 steps,
greedy tokens vs an eager greedy loop), table last. Writes benchmarks/results/generate_<dev>.json
and .png (or under $OUT when set). The fp32 decode state (history and accumulator rings of L / 2
slots, 2 + 2 bytes per M*B*D*L; spectra ~4 bytes per M*D*L) is 73 GB at B = 8, L = 2^17.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import CUDA, log, sync, timed  # noqa: E402
from _generate_lazy import lazy_costs, lazy_graphed_costs  # noqa: E402
from _generate_report import P, ours_total, plot, rescore, summarize, table  # noqa: E402

import lcsm_compile  # noqa: E402
from lcsm_compile.runtime.decoder import Decoder  # noqa: E402
from lcsm_compile.runtime.generate import _generate_fed  # noqa: E402
from lcsm_compile.runtime.step_program import StepProgram  # noqa: E402
from lcsm_compile.zoo import HyenaLM, hyena_153m, hyena_tiny  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
W_TOKENS = 2048  # tokens of the real timed run (--tokens)
AUTOCAST = False  # --autocast: the model under bf16 autocast (eager, and the decoder built under it)


def amp():
    """The caller's autocast for what runs the model itself (eager, and the decoder's capture);
    the step programs hold the captured casts and switch autocast off themselves."""
    return torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=AUTOCAST)


def rel_per_position(got, want):
    g, w = got.double(), want.double()
    return ((g - w).norm(dim=(0, 2)) / w.norm(dim=(0, 2)).clamp_min(1e-30)).max().item()


def make_model(smoke: bool, w: float):
    """hyena_153m's architecture (18 x 864, MLP 1728, filter order 64, emb 33); the sine frequency
    of its implicit filters is `w` (the zoo's 14 by default). Speed does not depend on w; with
    w = 14 the filter generator amplifies fp32 rounding (~1e-7 -> ~3e-5 of max|h|), which on a GPU
    (matmul results differ slightly between lengths) fails the fold pass's prefix check."""
    with torch.random.fork_rng(devices=[DEV] if CUDA else []), torch.device(DEV):
        torch.manual_seed(0)
        if smoke:
            model = hyena_tiny(max_len=1024)
        elif w == 14.0:
            model = hyena_153m(max_len=2**17)
        else:
            model = HyenaLM(vocab_size=50257, d_model=864, n_layer=18, max_len=2**17, d_inner=2 * 864,
                            filter_order=64, emb_dim=33, w=w, pad_vocab_size_multiple=8)
    return model.float().eval()


def options(smoke: bool) -> dict:
    return {"inner_backend": "eager" if smoke else "inductor", "cuda_graphs": True}


# ---------------------------------------------------------------- correctness
@torch.no_grad()
def check(model, dec: Decoder, B: int, steps: int, greedy: int) -> dict:
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randint(0, model.vocab_size, (B, P + steps), generator=g, device=DEV)
    with amp():
        ref = model(x)
    outs = [dec.prefill(x[:, :P])] + [dec.step(x[:, t : t + 1]) for t in range(P, P + steps)]
    err = rel_per_position(torch.cat(outs, 1), ref[:, P - 1 :])
    ids = x[:, :P]
    eager = ids
    for _ in range(greedy):
        with amp():
            eager = torch.cat([eager, model(eager)[:, -1].argmax(-1, keepdim=True)], 1)
    ours = greedy_run(dec, ids, greedy)
    same = int((ours == eager).all(1).sum())
    dec.reset()
    return {"max_rel_err_per_position": err, "positions": steps + 1, "greedy_tokens": greedy,
            "greedy_identical_rows": same, "rows": B}


@torch.no_grad()
def greedy_run(dec: Decoder, ids, n):
    out = dec.prefill(ids)
    toks = [ids]
    for i in range(n):
        tok = out[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        if i + 1 < n:
            out = dec._step((tok,))[0]
    return torch.cat(toks, 1)


# ---------------------------------------------------------------- timings
@torch.no_grad()
def eager_costs(model, B, L, smoke) -> dict:
    """Seconds per full forward at length n (one token of recompute decoding)."""
    costs = {}
    lo = 5 if smoke else 10
    for k in range(lo, L.bit_length()):
        n = 1 << k
        x = torch.randint(0, model.vocab_size, (B, n), device=DEV)
        try:
            with amp():
                costs[n] = timed(lambda: model(x), reps=3 if n <= 4096 else 1)
        except torch.OutOfMemoryError:
            log(f"    eager forward at n={n}: out of memory; stopping here")
            break
        finally:
            del x
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        log(f"    eager forward B={B} n={n}: {costs[n] * 1e3:.2f} ms")
    return costs


@torch.no_grad()
def level_costs(dec: Decoder, reps: int) -> dict:
    """Seconds per token by tile level: each level's token graph replayed at the scratch position."""
    graphs, prog = dec._graphs, dec.program
    with ExitStack() as stack:
        for eng in graphs.engines:
            stack.enter_context(eng.scratch_position())
        scratch = [eng.pos.clone() for eng in graphs.engines]
        saved = {k: r.clone() for k, r in prog.rings.items()}
        t_s = max(prog.max_len - 2, 0)

        def reset():
            for eng, s in zip(graphs.engines, scratch):
                eng.pos.copy_(s)
            prog.t.fill_(t_s)

        base = timed(lambda: [reset() for _ in range(reps)]) / reps
        costs = {}
        for level in graphs.levels:
            g = graphs.graphs[level]
            once = timed(lambda: (reset(), g.replay()))
            n = max(3, min(reps, int(0.3 / max(once, 1e-9))))  # ~0.3 s a level: the top ones take 0.1 s a token at B = 8
            costs[level] = timed(lambda: [(reset(), g.replay()) for _ in range(n)]) / n - base
        for k, r in prog.rings.items():
            r.copy_(saved[k])
    dec.reset()
    return costs


@torch.no_grad()
def timed_run(dec: Decoder, B: int, W: int, vocab: int) -> tuple[float, float, float]:
    """Seconds of a real greedy run of W tokens (its prompt's prefill included) with each token
    through the host, the same with generate()'s feed (the choice inside the token graph), and
    of the prefill alone. The two runs' tokens must agree."""
    ids = torch.randint(0, vocab, (B, P), device=DEV)
    out = torch.empty(B, P + W, dtype=ids.dtype, device=DEV)
    out[:, :P] = ids

    def fed():
        _generate_fed(dec, ids, out, W, None, None)
        dec.reset()

    greedy_run(dec, ids, 2)  # capture (first step after a prefill)
    dec.reset()
    t = timed(lambda: greedy_run(dec, ids, W))
    host = greedy_run(dec, ids, W)
    dec.reset()
    t_fed = timed(fed)
    if not torch.equal(out, host):
        raise SystemExit(f"generate's feed and the host loop disagree on {int((out != host).sum())} tokens")
    t_prefill = timed(lambda: (dec.reset(), dec.prefill(ids)), reps=3)
    dec.reset()
    return t, t_fed, t_prefill


@torch.no_grad()
def floor_cost(dec: Decoder, reps: int) -> float:
    prog = StepProgram(dec.plan, DEV, floor=True, like=dec.program)
    if CUDA:
        from lcsm_compile.runtime.cuda_graphs import StepGraphs

        graphs = StepGraphs(prog)
        g = graphs.graphs[None]

        def run():
            prog.t.zero_()
            g.replay()
    else:
        x = [torch.zeros(1, 1, dtype=torch.long, device=DEV).expand(dec.batch, 1).contiguous()]

        def run():
            prog.t.zero_()
            prog.run_segments(x)
    return timed(lambda: [run() for _ in range(reps)]) / reps


@torch.no_grad()
def weights_read(dec: Decoder, reps: int) -> dict:
    """The least memory traffic of a position-wise step: every tensor its segments take (each
    distinct one once; a positional table one row), read once at the rate of one large read.
    No step program of this model can run its position-wise part faster than that."""
    prog, seen, parts = dec.program, set(), []
    for seg in dec.plan.segments:
        for key in seg.inputs:
            if key[0] not in ("static", "positional") or not isinstance(prog.frontier.get(key[1]), torch.Tensor):
                continue
            v = prog.frontier[key[1]]
            if key[0] == "positional":
                v = v.select(dec.plan.time_dim[key[1]], 0)
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                parts.append(v.detach().contiguous().reshape(-1).view(torch.uint8))
    flat = torch.cat(parts)
    n = flat.numel()
    words = torch.nn.functional.pad(flat, (0, -n % 4)).view(torch.float32)  # read as 4-byte words
    del flat, parts
    s = timed(lambda: words.sum(), reps)
    return {"bytes": n, "tensors": len(seen), "read_s": s, "read_tb_per_s": n / s / 1e12}


def _peak_gib() -> float | None:
    """The peak since the last call (then reset): one phase's high-water mark."""
    if not CUDA:
        return None
    gc.collect()
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


# ---------------------------------------------------------------- driver
def run_config(model, B, L, smoke, report, save):
    res = {"B": B, "max_len": L}
    report["configs"].append(res)
    log(f"== B={B}, L={L} ==")
    log("  eager recompute: forward times")
    _peak_gib()  # start this config's count
    res["eager_forward_s"] = eager_costs(model, B, L, smoke)
    peak = {"eager": _peak_gib()}  # GiB allocated at most in each phase (does a max_len fit a smaller card?)
    save()
    t0 = time.perf_counter()
    ids = torch.randint(0, model.vocab_size, (B, P), device=DEV)
    with amp():
        dec = lcsm_compile.decoder(model, ids, max_len=L, **options(smoke))
    sync()
    res["build_s"] = time.perf_counter() - t0
    res["decoder"] = repr(dec)
    res["engine_memory_elements"] = [e.memory_elements() for e in dec.program.engines if hasattr(e, "memory_elements")]
    log(f"  built {dec} in {res['build_s']:.1f} s")
    log("  correctness")
    res["check"] = check(model, dec, B, 32 if smoke else 128, 16 if smoke else 48)
    log(f"    {res['check']}")
    save()
    W = 64 if smoke else W_TOKENS
    reps = 3 if smoke else 30
    t_run, t_fed, t_prefill = timed_run(dec, B, W, model.vocab_size)
    res["ours_run"] = {"tokens": W, "s": t_run, "prefill_s": t_prefill, "us_per_token": t_run / W * 1e6,
                       "us_per_token_after_prefill": (t_run - t_prefill) / W * 1e6,
                       "fed_s": t_fed, "fed_us_per_token_after_prefill": (t_fed - t_prefill) / W * 1e6}
    log(f"  ours: real greedy run of {W} tokens: {t_run / W * 1e6:.1f} us/token, "
        f"{(t_run - t_prefill) / W * 1e6:.1f} without its {t_prefill * 1e3:.1f} ms prefill; "
        f"generate()'s feed {(t_fed - t_prefill) / W * 1e6:.1f}")
    if dec._graphs is not None:
        costs = level_costs(dec, reps)
    else:
        costs = {None: (t_run - t_prefill) / W}
    res["ours_token_s_by_level"] = {str(k): v for k, v in costs.items()}
    predicted = ours_total(costs, P + W)
    res["ours_run"]["model_s"] = predicted
    log(f"  ours by level (us): {' '.join(f'{k}:{v * 1e6:.1f}' for k, v in costs.items())}; model predicts "
        f"{predicted / W * 1e6:.1f} us/token for the run")
    res["floor_token_s"] = floor_cost(dec, 20 if smoke else 200)
    peak["ours"] = _peak_gib()
    log(f"  floor: {res['floor_token_s'] * 1e6:.1f} us/token")
    res["weights_read"] = weights_read(dec, 5 if smoke else 50)
    wr = res["weights_read"]
    log(f"  the step's weights, read once: {wr['bytes'] / 1e6:.1f} MB in {wr['tensors']} tensors, "
        f"{wr['read_s'] * 1e6:.1f} us ({wr['read_tb_per_s']:.2f} TB/s): the floor's bound")
    save()
    # lazy: a program of the same plan sharing the compiled segments; ours' state freed first
    dec._graphs = None
    dec.program.engines, dec.program.where = [], {}
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    res["lazy_token_s"] = {str(k): v for k, v in lazy_costs(dec, L, 3 if smoke else 5, model.vocab_size).items()}
    peak["lazy"] = _peak_gib()
    save()
    graphed = lazy_graphed_costs(dec, L, 3 if smoke else 20, model.vocab_size)
    res["lazy_graphed_token_s"] = {str(k): v for k, v in graphed.items()}
    peak["lazy_graphed"] = _peak_gib()
    res["peak_gib_by_phase"] = peak
    log(f"  peak GiB allocated: {peak}")
    if CUDA:
        res["peak_memory_gb"] = max(peak.values())  # the whole config's (GiB, as in earlier runs)
    del dec
    gc.collect()
    res["rows"] = summarize(res, smoke)
    save()


def summary(results: dict) -> str:
    """What `lcsm-compile bench --show generate` prints."""
    return table(results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny Hyena on CPU: exercise the script")
    ap.add_argument("--configs", default=None, help="B:log2L,... (default 1:17,8:15)")
    ap.add_argument("--sine-freq", type=float, default=14.0, help="implicit filter sine frequency w (zoo: 14)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the real timed greedy run")
    ap.add_argument("--autocast", action="store_true", help="the model under bf16 autocast (weights cast once)")
    ap.add_argument("--rescore", metavar="JSON", help="recompute a saved run's table and plot from its measured costs")
    args = ap.parse_args()
    if args.rescore:
        return rescore(Path(args.rescore))
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "model": "zoo.hyena_tiny" if args.smoke else f"zoo.hyena_153m architecture (18 x 864, fp32{' under bf16 autocast' if args.autocast else ''}), w={args.sine_freq}",
              "prompt": P,
              "smoke": args.smoke, "configs": [], "errors": []}
    slug = "cpu_smoke" if args.smoke else "".join(c if c.isalnum() else "_" for c in report["device"].lower())
    slug = "h100" if "h100" in slug else slug
    path = out_dir / f"generate_{slug}{'_autocast' if args.autocast else ''}.json"
    save = lambda: path.write_text(json.dumps(report, indent=1, default=str))  # noqa: E731
    log(f"generate benchmark on {report['device']}, torch {report['torch']}, triton {report['triton']}")
    spec = args.configs or ("1:8,2:7" if args.smoke else "1:17,8:15")
    configs = [(int(b), 1 << int(k)) for b, k in (c.split(":") for c in spec.split(","))]
    model = make_model(args.smoke, args.sine_freq)
    global W_TOKENS, AUTOCAST
    W_TOKENS, AUTOCAST = args.tokens, args.autocast
    queue = list(configs)
    while queue:
        B, L = queue.pop(0)
        try:
            run_config(model, B, L, args.smoke, report, save)
        except Exception as e:  # noqa: BLE001 - keep what the other configs measured
            report["errors"].append(f"B={B} L={L}: {type(e).__name__}: {str(e)[:2000]}")
            log(traceback.format_exc()[-3000:])
            if "decoder" not in report["configs"][-1] and L >= 2**14 and not args.smoke:
                queue.insert(0, (B, L // 2))  # the build failed (out of memory): half the max_len
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        save()
    try:
        plot(report, path.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001
        report["errors"].append(f"plot: {e}")
    save()
    log("\n" + table(report))
    if report["errors"]:
        log("errors: " + "; ".join(report["errors"]))


if __name__ == "__main__":
    main()
