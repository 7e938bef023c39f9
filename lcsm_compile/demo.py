"""`lcsm-compile demo`: the tool end to end on the zoo's small Hyena LM, in well under a minute on CPU.

1. build zoo:hyena_lm (seeded, embedded config, no download) and print `explain()`;
2. parity: compiled prefill (`torch.compile(model, backend="lcsm")`) and the decoder (prefill, then
   one step per token, teacher-forced) against the eager model at every position;
3. greedy generation of N tokens after the prompt, three ways, each with a progress bar:
   eager recompute (the full forward pass per token, as HF-style `generate` does for models
   without a cache), lazy (`decoder(engine="lazy")`: each long convolution sums over the whole
   history) and lcsm (`generate()`: O(L log^2 L) online convolutions); the tokens must agree;
   then tokens/s side by side (best of 3 runs each). Exit status 1 if any check fails.
"""
from __future__ import annotations

import platform
import sys
import time
import warnings

import torch

import lcsm_compile

from .runtime.generate import cached_decoder
from .zoo import ZOO

MODEL = "hyena_lm"
REPEATS = 3  # timed generations per method; the fastest counts (the first shows the progress bar)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error over positions: max_{b,t} |y[b,t] - ref[b,t]| / |ref[b,t]| (L2 over the last dim)."""
    y, ref = y.double(), ref.double()
    return ((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max().item()


def last_logits(out: torch.Tensor) -> torch.Tensor:
    """(B, V) logits from a step/prefill output shaped (B, V) or (B, T, V)."""
    return out[:, -1] if out.dim() == 3 else out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=f"{desc:16s}", unit="tok", disable=not enabled, leave=True, file=sys.stderr,
                bar_format="{l_bar}{bar:30}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}]")


class Checks:
    def __init__(self, tol: float):
        self.tol = tol
        self.failed: list[str] = []

    def report(self, name: str, err: float) -> None:
        ok = err <= self.tol
        if not ok:
            self.failed.append(name)
        print(f"  {name:44s} max rel err {err:.1e}  {'PASS' if ok else 'FAIL'} (tol {self.tol:.0e})", flush=True)

    def fail(self, name: str, why: str) -> None:
        self.failed.append(name)
        print(f"  {name:44s} {why}", flush=True)

    def same(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a != b).sum().item()
        if diff:
            self.failed.append(name)
        print(f"  {name:44s} {'identical' if not diff else f'{diff} token(s) differ':>25s}  "
              f"{'PASS' if not diff else 'FAIL'}", flush=True)


def lcsm_backend_name():
    """"lcsm" (the entry point pip registers); the backend itself when run from an uninstalled checkout."""
    if "lcsm" in torch._dynamo.list_backends(exclude_tags=()):
        return "lcsm"
    from .backend import lcsm_backend  # noqa: PLC0415

    return lcsm_backend


def make_decoder(model, prompt, max_len: int, inner: str, engine: str = "online"):
    """(decoder, None), or (None, "FAIL: why") when it cannot be built."""
    options = {"inner_backend": inner}
    try:
        if engine == "online":  # the decoder generate() will use (built once, cached per model)
            return cached_decoder(model, prompt, max_len, options), None
        return lcsm_compile.decoder(model, prompt, max_len=max_len, engine=engine, **options), None
    except Exception as e:  # noqa: BLE001  (reported as a failed check, not a traceback)
        return None, f"FAIL: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def greedy_recompute(model, prompt, n: int, bar) -> torch.Tensor:
    ids = prompt
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if bar is not None:
            bar.update()
    return ids[:, prompt.shape[1]:]


def greedy_decoder(dec, prompt, n: int, bar) -> torch.Tensor:
    dec.reset()
    logits = last_logits(dec.prefill(prompt))
    out = []
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < n:
            logits = last_logits(dec.step(nxt))
        if bar is not None:
            bar.update()
    return torch.cat(out, dim=1)


def timed(fn, device: str, desc: str | None = None, show: bool = True, total: int = 0):
    """Run fn(bar) REPEATS times: (its first result, the shortest wall time). A progress bar (when
    `desc` is given) on the first run only; fn(None) must run without one."""
    best, result = float("inf"), None
    for i in range(REPEATS):
        bar = progress(total, desc, show) if desc is not None and i == 0 else None
        sync(device)
        start = time.perf_counter()
        out = fn(bar)
        sync(device)
        best = min(best, time.perf_counter() - start)
        if bar is not None:
            bar.close()
        result = out if i == 0 else result
    return result, best


def run_demo(args) -> int:
    from .cli.models import pick_device  # noqa: PLC0415

    begin = time.perf_counter()
    device = pick_device(args.device)
    inner = args.inner_backend or ("inductor" if device == "cuda" else "eager")
    P, N, B = args.prompt_len, args.new_tokens, args.batch
    show = not args.no_progress
    entry = ZOO[MODEL]
    model = entry.build().to(device)
    if P + N > model.max_len:
        from .cli.errors import CliError  # noqa: PLC0415

        raise CliError(f"--prompt-len + --new-tokens = {P + N} exceeds the model's max_len {model.max_len}")
    if device == "cuda":  # fp32 parity means fp32: no TF32 in the eager reference either
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    checks = Checks(tol=1e-5 if device == "cpu" else 1e-4)
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lcsm-compile demo: {name}, torch {torch.__version__}, inner backend {inner}")
    print(f"model: zoo:{MODEL} ({entry.paper.split(',')[0]}): {len(model.layers)} layers, d_model "
          f"{model.d_model}, vocab {model.vocab_size}, max_len {model.max_len}, {n_params / 1e3:.0f}K params, "
          f"fp32, seeded weights; batch {B}, prompt {P}, {N} new tokens\n", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    full = torch.randint(0, model.vocab_size, (B, P + N), generator=gen).to(device)
    prompt = full[:, :P]

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("ignore", message="lcsm:")  # explain() below lists the same findings
        warnings.filterwarnings("ignore", message="TensorFloat32")  # inductor's advice; parity here is fp32
        print(f"{lcsm_compile.explain(model, prompt)}\n", flush=True)

        print("parity against the eager model (fresh random tokens, every position):", flush=True)
        ref = model(full)
        compiled = torch.compile(model, backend=lcsm_backend_name(), options={"inner_backend": inner})
        for length in (P, P + N):
            x = full[:, :length].clone()
            torch._dynamo.maybe_mark_dynamic(x, 1)
            checks.report(f"compiled prefill, L={length}", rel_err(compiled(x), ref[:, :length]))
        dec, why = make_decoder(model, prompt, P + N, inner)
        if dec is None:
            checks.fail("decoder", why)
        else:
            out = dec.prefill(prompt)  # the outputs at the last prompt position (or at all of them)
            errs = [rel_err(out, ref[:, P - out.shape[1]:P] if out.dim() == 3 else ref[:, P - 1])]
            for t in range(P, P + N - 1):
                errs.append(rel_err(last_logits(dec.step(full[:, t:t + 1])), ref[:, t]))
            checks.report(f"decoder, prefill {P} + {N - 1} steps", max(errs))
            dec.reset()

        print(f"\ngreedy generation of {N} tokens after the {P}-token prompt:", flush=True)
        rows = []
        # each method: the best of REPEATS timed generations; a progress bar on the first
        want, seconds = timed(lambda bar: greedy_recompute(model, prompt, N, bar), device, "eager recompute", show, N)
        rows.append(("eager recompute", "a full forward pass over the whole sequence", seconds))
        lazy, why = make_decoder(model, prompt, P + N, inner, engine="lazy")
        if lazy is None:
            checks.fail("lazy decoder", why)
        else:
            greedy_decoder(lazy, prompt, 2, None)  # warm-up
            got, seconds = timed(lambda bar: greedy_decoder(lazy, prompt, N, bar), device, "lazy", show, N)
            rows.append(("lazy", "decoder step; each long conv sums over the whole history", seconds))
            checks.same("lazy tokens == eager recompute tokens", got, want)
        first = [True]

        def run_generate(_):  # lcsm: the one-call API, with its own progress bar, on the decoder checked above
            shown, first[0] = first[0] and show, False
            return lcsm_compile.generate(model, prompt, N, progress=shown, inner_backend=inner)

        if dec is not None:
            lcsm_compile.generate(model, prompt, N, inner_backend=inner)  # warm-up
            ids, seconds = timed(run_generate, device)
            rows.append(("lcsm generate()", "decoder step; online convolutions, O(log^2 L)", seconds))
            checks.same("lcsm tokens == eager recompute tokens", ids[:, P:], want)

    print(f"\n  {'method':16s} {'tokens/s':>9s} {'ms/token':>9s} {'speed-up':>8s}  each token costs")
    for method, what, seconds in rows:
        print(f"  {method:16s} {B * N / seconds:9.1f} {1e3 * seconds / N:9.2f} {rows[0][2] / seconds:7.2f}x  {what}")
    hint = "try --prompt-len 512 -n 256, or see `lcsm-compile bench`" if P + N < 512 else "see `lcsm-compile bench`"
    print(f"  (B={B}, prompt prefill + {N} tokens, best of {REPEATS} runs, setup and compilation excluded.\n"
          f"   Sequences end at L={P + N}; the gap grows with the length: {hint})")
    status = "FAIL: " + ", ".join(checks.failed) if checks.failed else "all parity checks PASS"
    print(f"\n{status}; demo took {time.perf_counter() - begin:.1f} s", flush=True)
    return 1 if checks.failed else 0
