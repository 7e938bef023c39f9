"""`lcsm-compile`: the command line.

    lcsm-compile demo                         compile a small Hyena LM, check it, generate, time it
    lcsm-compile explain zoo:hyena_lm         what the compiler finds in a model, and why not
    lcsm-compile explain my_pkg.models:build --input ids:50257 --length 1024
    lcsm-compile generate zoo:hyena_lm -n 64
    lcsm-compile export my_pkg.models:build --out-dir artifact/ --max-len 65536
    lcsm-compile bench online_conv | prefill | all      (needs a CUDA GPU)

A model is named `zoo:NAME` (see `lcsm-compile explain --list`), `MODULE:FACTORY` (an importable
callable returning an nn.Module; the current directory is importable) or `path/to/file.py:FACTORY`.
Its input is `--input ids:VOCAB` (token ids, (B, L) int64) or `--input float:D` ((B, L, D)); without
the flag, a `lcsm_input` attribute on the factory or the model ("ids:V", "float:D", or a callable
(model, batch, length, generator) -> tuple of inputs), else the model's `vocab_size` / `d_model`.
Errors in what was asked (a bad model path, a model the compiler cannot handle, no GPU where one is
required, a feature not in this build) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------- models and their inputs

def load_model(spec: str):
    """`zoo:NAME`, `MODULE:FACTORY` or `file.py:FACTORY` -> (model in eval mode, input maker)."""
    import torch  # noqa: PLC0415

    if spec.startswith("zoo:"):
        from .zoo import ZOO  # noqa: PLC0415

        name = spec[4:]
        if name not in ZOO:
            raise CliError(f"no zoo model {name!r}; known: {', '.join(ZOO)}")
        entry = ZOO[name]
        model = entry.build()
        return model, lambda batch, length, gen: entry.make_inputs(model, batch, length, gen)
    if ":" not in spec:
        raise CliError(f"model {spec!r}: expected MODULE:FACTORY, path/to/file.py:FACTORY or zoo:NAME")
    where, _, attr = spec.rpartition(":")
    factory = getattr_path(import_target(where), attr, spec)
    if not callable(factory):
        raise CliError(f"{spec}: {attr!r} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001  (the factory is user code)
        raise CliError(f"{spec}: the factory failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    make = getattr(factory, "lcsm_input", None) or getattr(model, "lcsm_input", None)
    return model.eval(), (lambda b, l, g: input_maker(make, model, spec)(b, l, g))


def import_target(where: str):
    """A module by dotted name (the current directory importable, as with `python -m`) or a .py file."""
    try:
        if not where.endswith(".py"):
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            return importlib.import_module(where)
        path = Path(where)
        if not path.is_file():
            raise CliError(f"no such file: {where}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    except CliError:
        raise
    except ModuleNotFoundError as e:
        raise CliError(f"cannot import {where!r}: {e}") from e
    except Exception as e:  # noqa: BLE001  (importing user code)
        raise CliError(f"importing {where!r} failed: {type(e).__name__}: {one_line(e)}") from e


def getattr_path(obj, dotted: str, spec: str):
    for part in dotted.split("."):
        if not part or not hasattr(obj, part):
            raise CliError(f"{spec}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def parse_input(text: str):
    """'ids:VOCAB' or 'float:D' -> (kind, size)."""
    kind, _, size = text.partition(":")
    if kind not in ("ids", "float") or not size.isdigit() or int(size) < 1:
        raise CliError(f"--input {text!r}: expected ids:VOCAB (token ids) or float:D (features)")
    return kind, int(size)


def input_maker(make, model, spec: str):
    import torch  # noqa: PLC0415

    if callable(make):
        return lambda b, l, g: tuple(make(model, b, l, g))
    if isinstance(make, str):
        kind, size = parse_input(make)
    elif isinstance(getattr(model, "vocab_size", None), int):
        kind, size = "ids", model.vocab_size
    elif isinstance(getattr(model, "d_model", None), int):
        kind, size = "float", model.d_model
    else:
        raise CliError(f"cannot tell what input {spec} takes; pass --input ids:VOCAB or --input float:D")
    if kind == "ids":
        return lambda b, l, g: (torch.randint(0, size, (b, l), generator=g),)
    return lambda b, l, g: (torch.randn(b, l, size, generator=g),)


def model_and_inputs(args):
    """The model named on the command line with a seeded input maker, honouring --input."""
    import torch  # noqa: PLC0415

    torch.manual_seed(args.seed)
    model, make = load_model(args.model)
    if getattr(args, "input", None):
        make = input_maker(args.input, model, args.model)
    return model.float().eval(), make


def pick_device(name: str) -> str:
    import torch  # noqa: PLC0415

    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available on this machine")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def not_in_build(what: str, e: NotImplementedError) -> CliError:
    return CliError(f"{what} is not available in this build of lcsm_compile ({e})")


# ---------------------------------------------------------------- subcommands

def cmd_demo(args) -> int:
    from .demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def cmd_explain(args) -> int:
    if args.list:
        from .zoo import ZOO  # noqa: PLC0415

        for e in ZOO.values():
            status = f"{e.expected_convs} conv(s)" if e.positive else f"negative: {e.reason}"
            print(f"zoo:{e.name:24s} {e.kind:4s} {status}")
        return 0
    if not args.model:
        raise CliError("explain: name a model (MODULE:FACTORY or zoo:NAME), or --list")
    import torch  # noqa: PLC0415
    import lcsm_compile  # noqa: PLC0415

    model, make = model_and_inputs(args)
    inputs = make(args.batch, args.length, torch.Generator().manual_seed(args.seed))
    try:
        with warnings.catch_warnings():  # the report below says what the backend's warnings say
            warnings.filterwarnings("ignore", message="lcsm:")
            report = lcsm_compile.explain(model, *inputs)
    except Exception as e:  # noqa: BLE001  (running the user's model)
        raise CliError(f"{args.model}: the model failed on a {describe(inputs)} input: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    print(report)
    if not report.mixers:
        raise CliError(f"{args.model}: no causal convolution could be rewritten"
                       + (" (reasons above)" if report.unsupported else " (none found)"))
    if report.unsupported:
        print(f"note: {len(report.unsupported)} node(s) run unchanged (as the inner compiler runs them)")
    return 0


def describe(inputs) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)


def cmd_generate(args) -> int:
    import torch  # noqa: PLC0415
    import lcsm_compile  # noqa: PLC0415
    from .runtime import IncrementalizeError  # noqa: PLC0415

    device = pick_device(args.device)
    model, make = model_and_inputs(args)
    model = model.to(device)
    if args.prompt:
        try:
            ids = torch.tensor([[int(t) for t in args.prompt.split(",")]])
        except ValueError:
            raise CliError(f"--prompt {args.prompt!r}: expected comma-separated token ids") from None
    else:
        (ids,) = make(1, args.prompt_len, torch.Generator().manual_seed(args.seed))
    if ids.dtype != torch.long:
        raise CliError(f"{args.model} takes float features, not token ids; generate needs a language model")
    kwargs = {"do_sample": args.do_sample, "progress": not args.no_progress, "eos_token_id": args.eos_token_id,
              "inner_backend": args.inner_backend or ("inductor" if device == "cuda" else "eager")}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      generator=torch.Generator(device).manual_seed(args.seed))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    params = inspect.signature(lcsm_compile.generate).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        missing = [k for k in kwargs if k not in params]
        if missing:
            raise CliError(f"this build's lcsm_compile.generate does not take {', '.join(missing)}")
    total, limit = ids.shape[1] + args.max_new_tokens, getattr(model, "max_len", None)
    if isinstance(limit, int) and total > limit:
        raise CliError(f"prompt + new tokens = {total} exceeds {args.model}'s max_len {limit}")
    torch.manual_seed(args.seed)
    ids = ids.to(device)
    warnings.filterwarnings("ignore", message="lcsm:")  # an error below names the same reasons
    try:
        start = time.perf_counter()
        setup = build_decoder(model, ids, args.max_new_tokens, kwargs["inner_backend"])
        start = time.perf_counter()
        out = lcsm_compile.generate(model, ids, args.max_new_tokens, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    except NotImplementedError as e:
        raise not_in_build("generate()", e) from e
    except IncrementalizeError as e:  # the model cannot be decoded step by step; says where and why
        raise CliError(f"{args.model} cannot be decoded step by step: {one_line(e)}") from e
    except ValueError as e:
        raise CliError(f"generate: {one_line(e)}") from e
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    print(f"prompt ({ids.shape[1]} tokens): {ids[0].tolist()}")
    print(f"generated ({len(new)} tokens): {new}")
    setup = f"decoder built in {setup:.1f} s" if setup is not None else "including the decoder's setup"
    print(f"{len(new) / seconds:.1f} tokens/s on {device} ({len(new)} tokens in {seconds:.2f} s; {setup})")
    return 0


def build_decoder(model, ids, max_new_tokens: int, inner_backend: str) -> float | None:
    """Build (and cache) the decoder generate() will use, so its time is not counted as decoding."""
    try:
        from .runtime.generate import cached_decoder  # noqa: PLC0415
    except ImportError:
        return None
    start = time.perf_counter()
    cached_decoder(model, ids, ids.shape[1] + max_new_tokens, {"inner_backend": inner_backend})
    return time.perf_counter() - start


def cmd_export(args) -> int:
    import torch  # noqa: PLC0415
    import lcsm_compile  # noqa: PLC0415

    model, make = model_and_inputs(args)
    inputs = make(1, args.length, torch.Generator().manual_seed(args.seed))
    max_len = args.max_len or getattr(model, "max_len", None)
    if not max_len:
        raise CliError(f"{args.model}: pass --max-len (the model has no max_len attribute)")
    kwargs = {"out_dir": args.out_dir, "max_len": max_len, "opset": args.opset}
    if args.no_check:
        kwargs["check"] = False
    warnings.filterwarnings("ignore", message="lcsm:")  # an error below names the same reasons
    start = time.perf_counter()
    try:
        manifest = lcsm_compile.export_onnx(model, *inputs, **kwargs)
    except NotImplementedError as e:
        raise not_in_build("ONNX export (lcsm_compile.export_onnx)", e) from e
    except (ValueError, RuntimeError) as e:  # ExportError, IncrementalizeError, a bad opset or length
        raise CliError(f"{args.model} cannot be exported: {one_line(e)}") from e
    out = Path(args.out_dir)
    print(f"exported {args.model} to {out}/ in {time.perf_counter() - start:.1f} s "
          f"(max_len {max_len}, opset {args.opset}"
          + (f", {len(manifest.get('mixers', []))} mixer(s)" if isinstance(manifest, dict) else "") + ")")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)!s:32s} {path.stat().st_size / 1024:9.1f} KiB")
    if not args.no_check:
        print("checked: the artifact run with onnxruntime (prefill, then steps) matches the eager model")
    return 0


def bench_names() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def cmd_bench(args) -> int:
    if not BENCH_DIR.is_dir():
        raise CliError(f"no benchmarks/ folder next to the package ({BENCH_DIR}); run from a source checkout")
    names = bench_names()
    if args.name is None or args.name == "list":
        print("benchmarks:", " ".join(names) or "(none)")
        return 0
    chosen = names if args.name == "all" else [args.name]
    for name in chosen:
        if name not in names:
            raise CliError(f"no benchmark {name!r}; available: {', '.join(names)}, all")
    out = Path(args.out)
    if args.show:
        return show_results(out, chosen, since=None)
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        raise CliError("bench needs a CUDA GPU and none is available (the benchmarks time GPU kernels); "
                       "`lcsm-compile bench --show all` prints the results already measured")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    failed = []
    for name in chosen:
        script = BENCH_DIR / f"{name}.py"
        cmd = [sys.executable, str(script), *args.extra]
        if '"--out"' in script.read_text():
            cmd[2:2] = ["--out", str(out)]
        print(f"$ {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env={**os.environ, "OUT": str(out)})
        if rc:
            failed.append(f"{name} (exit {rc})")
    show_results(out, chosen, since=start)
    if failed:
        print(f"lcsm-compile: error: benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def show_results(out: Path, names: list[str], since: float | None) -> int:
    """Print each benchmark's latest results JSON in `out` (those written after `since`, if given)."""
    every = bench_names()

    def owner(path: Path) -> str | None:  # the longest benchmark name the file is named after
        return max((n for n in every if path.stem.startswith(n)), key=len, default=None)

    files = [p for p in sorted(out.glob("*.json"))
             if owner(p) in names and (since is None or p.stat().st_mtime >= since)]
    if not files:
        raise CliError(f"no results for {', '.join(names)} in {out}/")
    for path in files:
        data = json.loads(path.read_text())
        print(f"\n== {path}  ({', '.join(str(data[k]) for k in ('device', 'torch', 'date') if k in data)})")
        summary = script_summary(owner(path))
        try:
            text = summary(data) if summary is not None else None
        except Exception:  # noqa: BLE001  (an older JSON layout: fall back to the generic tables)
            text = None
        if text is not None:
            print(text)
        else:
            tables = list(row_tables(data))
            for title, rows in [t for t in tables if t[0].split("[")[0] in ("rows", "results")] or tables:
                print(f"-- {title}")
                print(format_table(rows))
        png = path.with_suffix(".png")
        if png.exists():
            print(f"plot: {png}")
    return 0


def script_summary(name: str):
    """The benchmark script's own `summary(results) -> str`, if it has one."""
    source = (BENCH_DIR / f"{name}.py").read_text()
    if "\ndef summary(" not in source:
        return None
    spec = importlib.util.spec_from_file_location(f"_lcsm_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001  (fall back to the generic tables)
        return None
    return module.summary


def row_tables(data, prefix: str = ""):
    """Every list of row dicts in a results JSON (two levels deep), with its key path."""
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}{key}" if not prefix else f"{prefix}[{key}]"
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                yield path, value
            elif isinstance(value, dict) and prefix.count("[") < 2:
                yield from row_tables(value, path)


def format_table(rows: list[dict]) -> str:
    cols = []
    for row in rows:
        cols += [k for k, v in row.items() if k not in cols and isinstance(v, (int, float, str, bool))]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)[:24]

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in table)


# ---------------------------------------------------------------- argument parsing

def add_model_args(p: argparse.ArgumentParser, default: str | None = None, length: int | None = 256,
                   optional: bool = False) -> None:
    p.add_argument("model", nargs="?" if default or optional else None, default=default,
                   help="zoo:NAME, MODULE:FACTORY or path/to/file.py:FACTORY"
                   + (f" (default {default})" if default else ""))
    p.add_argument("--input", metavar="ids:VOCAB|float:D",
                   help="what the model takes: token ids (B, L) or features (B, L, D)")
    if length is not None:
        p.add_argument("--length", type=int, default=length,
                       help=f"sequence length of the example input (default {length})")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the inputs")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="lcsm-compile", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="compile a small Hyena LM, check it against eager, generate",
                       description="Build the zoo's small Hyena LM (seeded, no download), print explain(), check the "
                       "compiled prefill and the decoder against eager at every position (PASS/FAIL, exit 1 on "
                       "failure), generate tokens and compare tokens/s: eager recompute vs lazy vs lcsm.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--inner-backend", choices=("eager", "inductor", "aot_eager"), default=None,
                   help="compiler for the non-mixer parts (default: eager on CPU, inductor on CUDA)")
    p.add_argument("--prompt-len", type=int, default=48, help="prompt length (default 48)")
    p.add_argument("-n", "--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the token sequences (the weights are the zoo's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", help="what the compiler rewrites in a model, and why not",
                       description="Trace MODEL on a random input and print every mixer found (kind, strategy, filter "
                       "length, source line) and every time-mixing node left unchanged with the reason. Exit 2 when "
                       "no causal convolution can be rewritten.")
    add_model_args(p, optional=True)
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--list", action="store_true", help="list the zoo models and exit")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("generate", help="generate tokens with lcsm_compile.generate",
                       description="Generate from a random (seeded) or given prompt with lcsm_compile.generate and "
                       "print the token ids and tokens/s. The model must take token ids.")
    add_model_args(p, default="zoo:hyena_lm", length=None)
    p.add_argument("--prompt-len", type=int, default=32, help="length of the random prompt (default 32)")
    p.add_argument("--prompt", help="the prompt as comma-separated token ids (instead of a random one)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--eos-token-id", type=int, default=None, help="stop once every sequence has produced it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    p.add_argument("--inner-backend", choices=("eager", "inductor", "aot_eager"), default=None,
                   help="compiler for the step's non-mixer parts (default: eager on CPU, inductor on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export a model to ONNX (lcsm_compile.export_onnx)",
                       description="Write the static parts of MODEL as ONNX graphs, folded filters as external data "
                       "and a manifest, for the onnxruntime-backed runner.")
    add_model_args(p, length=64)
    p.add_argument("--out-dir", required=True, help="folder to write the artifact to")
    p.add_argument("--max-len", type=int, default=None, help="longest sequence to serve (default: the model's max_len)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the artifact with onnxruntime against the eager model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="run the GPU benchmarks and print their results",
                       description="Run benchmarks/NAME.py (or all of them) in a subprocess; each writes a JSON and a "
                       "PNG under --out; then print the results as tables. Needs a CUDA GPU, except --show, which "
                       "prints results already measured. Arguments after `--` go to the script.")
    p.add_argument("name", nargs="?", help=f"one of {', '.join(bench_names()) or '(none found)'}, `all`, "
                   "or nothing / `list` to list them")
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="results folder (default benchmarks/results)")
    p.add_argument("--show", action="store_true", help="only print the latest results from --out (no GPU needed)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    if extra and args.command != "bench":
        parser.error(f"arguments after `--` are for `bench` only: {' '.join(extra)}")
    args.extra = extra
    try:
        with warnings.catch_warnings():  # commands silence the backend's warnings they report themselves
            return args.func(args)
    except CliError as e:
        print(f"lcsm-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcsm-compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
