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
import sys
import warnings

# the submodules import only the standard library at the top: `--help` and usage errors cost no more
# than importing the package (torch, not the compiler's passes)
from .bench import BENCH_DIR, bench_names, cmd_bench
from .commands import cmd_demo, cmd_explain, cmd_export, cmd_generate
from .errors import CliError


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

