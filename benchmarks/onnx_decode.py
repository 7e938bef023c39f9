"""ONNX export benchmarks (issue 6).

    python benchmarks/onnx_decode.py conv      # onnxruntime CPU: a long causal conv as DFT vs Conv
    python benchmarks/onnx_decode.py decode    # OnnxDecoder vs the PyTorch decoder, tokens/s
    python benchmarks/onnx_decode.py decode --config 153m --max-len 8192 --providers cuda

conv: one depthwise causal convolution u (1, C, L) with a filter of K = L taps, exported with
  torch.onnx at opset 18 both ways -- our DFT translation (export/onnx_conv.py, power-of-two
  length) and a padded depthwise Conv with the flipped filter -- and run in onnxruntime's CPU
  provider; torch.fft (causal_conv_fft) beside them. Correctness first (vs the fp64 reference).
decode: the same model exported (OnnxDecoder: segments in onnxruntime, long mixers in OnlineConv)
  and decoded with lcsm_compile.decoder (PyTorch); per-token time over --tokens steps after a
  prompt, warm-up excluded; outputs of both against each other first.
Writes benchmarks/results/onnx_<mode>_<device>.json (or under $OUT when set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lcsm_compile  # noqa: E402
from lcsm_compile.export import OnnxDecoder  # noqa: E402
from lcsm_compile.ops import causal_conv_fft, causal_conv_reference  # noqa: E402


def log(*a):
    print(*a, flush=True)


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class DFTConv(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.register_buffer("lcsm_filter_0", h)

    def forward(self, u):
        return torch.ops.lcsm.causal_conv(u, self.lcsm_filter_0[:, : u.shape[-1]])


class ConvConv(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.K = h.shape[-1]
        self.register_buffer("w", h.flip(-1).unsqueeze(1))

    def forward(self, u):
        return torch.nn.functional.conv1d(torch.nn.functional.pad(u, (self.K - 1, 0)), self.w, groups=u.shape[1])


def bench_conv(args) -> dict:
    import onnxruntime as ort

    from lcsm_compile.export.onnx_conv import causal_conv_translation

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    rows = []
    for L in args.lengths:
        C = args.channels
        h = torch.randn(C, L) * torch.exp(-torch.arange(L) / (L / 4))
        u = torch.randn(1, C, L)
        ref = causal_conv_reference(u.double(), h.double())
        row = {"L": L, "C": C}
        for name, mod in (("dft", DFTConv(h).eval()), ("conv", ConvConv(h).eval())):
            with tempfile.TemporaryDirectory() as d:
                torch.onnx.export(mod, (u,), f"{d}/m.onnx", dynamo=True, opset_version=18, verbose=False,
                                  custom_translation_table={torch.ops.lcsm.causal_conv.default:
                                                            causal_conv_translation(18)})
                sess = ort.InferenceSession(f"{d}/m.onnx", so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: u.numpy()}
            y = sess.run(None, feed)[0]
            row[f"{name}_rel_err"] = float(np.abs(y - ref.numpy()).max() / np.abs(ref.numpy()).max())
            row[f"{name}_ms"] = 1e3 * best_of(lambda: sess.run(None, feed), args.repeat)
        torch.set_num_threads(args.threads)
        row["torch_fft_ms"] = 1e3 * best_of(lambda: causal_conv_fft(u, h), args.repeat)
        rows.append(row)
        log(json.dumps(row))
    return {"rows": rows, "threads": args.threads}


def _model(config: str, max_len: int):
    from lcsm_compile.zoo import hyena_153m, hyena_tiny

    torch.manual_seed(0)
    model = (hyena_153m(max_len) if config == "153m" else hyena_tiny(max_len)).eval()
    return model


def bench_decode(args) -> dict:
    device = "cuda" if args.providers == "cuda" else "cpu"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    model = _model(args.config, args.max_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (args.batch, args.prompt + args.tokens + 1), generator=g)
    if args.artifact:  # an export of the same config and max_len, reused
        out, export_s = Path(args.artifact), None
    else:
        out = Path(tempfile.mkdtemp())
        t = time.perf_counter()
        lcsm_compile.export_onnx(model, ids[:, : args.prompt], out_dir=out, max_len=args.max_len)
        export_s = time.perf_counter() - t
        log(f"exported in {export_s:.1f} s to {out}")
    dec = OnnxDecoder(out, providers=providers, mixer_device=device)
    model_dev = model.to(device)
    pt = lcsm_compile.decoder(model_dev, ids[:, : args.prompt].to(device), max_len=args.max_len)

    # correctness first: both decoders, same inputs, a few steps
    a = dec.prefill(ids[:, : args.prompt])
    b = pt.prefill(ids[:, : args.prompt].to(device))
    errs = [float(np.abs(a - b.float().cpu().numpy()).max())]
    for s in range(3):
        x = ids[:, args.prompt + s : args.prompt + s + 1]
        errs.append(float(np.abs(dec.step(x) - pt.step(x.to(device)).float().cpu().numpy()).max()))
    log(f"max |onnx - torch| over prefill + 3 steps: {max(errs):.2e}")

    def run_onnx():
        dec.prefill(ids[:, : args.prompt])
        t0 = time.perf_counter()
        for s in range(args.tokens):
            dec.step(ids[:, args.prompt + s : args.prompt + s + 1])
        return time.perf_counter() - t0

    def run_torch():
        pt.prefill(ids[:, : args.prompt].to(device))
        x = ids.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(args.tokens):
            pt.step(x[:, args.prompt + s : args.prompt + s + 1])
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: the first runs of each session allocate
        run_onnx(), run_torch()
    t_onnx = min(run_onnx() for _ in range(args.repeat))
    t_torch = min(run_torch() for _ in range(args.repeat))
    row = {"config": args.config, "batch": args.batch, "prompt": args.prompt, "tokens": args.tokens,
           "max_len": args.max_len, "export_s": export_s, "max_abs_diff": max(errs),
           "onnx_tokens_per_s": args.batch * args.tokens / t_onnx, "onnx_ms_per_step": 1e3 * t_onnx / args.tokens,
           "torch_tokens_per_s": args.batch * args.tokens / t_torch, "torch_ms_per_step": 1e3 * t_torch / args.tokens,
           "providers": providers, "segments": len(dec.manifest["segments"])}
    log(json.dumps(row))
    return {"rows": [row]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["conv", "decode"])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 1024, 4096])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--config", choices=["tiny", "153m"], default="tiny")
    p.add_argument("--providers", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--artifact", help="decode: reuse this export (same config and max_len) instead of exporting")
    args = p.parse_args()
    result = bench_conv(args) if args.mode == "conv" else bench_decode(args)
    device = torch.cuda.get_device_name() if args.providers == "cuda" else platform.processor() or "cpu"
    import onnxruntime

    result.update(mode=args.mode, device=device, date=datetime.date.today().isoformat(),
                  load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,  # shared CPUs skew times
                  torch=torch.__version__, onnxruntime=onnxruntime.__version__, args=vars(args))
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if args.providers == "cuda" else "cpu"
    name = f"onnx_decode_{args.config}" if args.mode == "decode" else "onnx_conv"
    path = out / f"{name}_{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
