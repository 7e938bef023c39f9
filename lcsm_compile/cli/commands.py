"""The subcommands that load a model: demo, explain, generate, export.

Each handler imports the compiler itself, so that `--help` and usage errors do not pay for it.
"""
from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path

from .errors import CliError, one_line
from .models import model_and_inputs, pick_device


def not_in_build(what: str, e: NotImplementedError) -> CliError:
    return CliError(f"{what} is not available in this build of lcsm_compile ({e})")


def cmd_demo(args) -> int:
    from ..demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def cmd_explain(args) -> int:
    if args.list:
        from ..zoo import ZOO  # noqa: PLC0415

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

    from ..runtime import IncrementalizeError  # noqa: PLC0415

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
        from ..runtime.generate import cached_decoder  # noqa: PLC0415
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

