"""`lcsm-compile` as a user runs it: every subcommand as a subprocess, with its exit status and output.

Errors in what was asked exit 2 with one line on stderr and no traceback; the demo exits 0 with its
parity checks passing. The subprocesses run concurrently (each pays the torch import); the rest of
the file calls main(argv) in-process, which is what the console script runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["demo", "explain", "generate", "export", "bench"]
CONSOLE = shutil.which("lcsm-compile") or str(Path(sys.executable).parent / "lcsm-compile")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_MININTERVAL": "1"}


def assert_clean_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr starting `lcsm-compile: error:`, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lcsm-compile: error: "), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands concurrently (each pays the torch import), wait for all."""
    procs = {k: subprocess.Popen(argv if argv[0] == CONSOLE else [sys.executable, "-m", "lcsm_compile.cli", *argv],
                                 cwd=ROOT, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, argv in commands.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess of this file, started together: --help of each command, the demo, explain on a
    zoo model and on a bad path, bench without a GPU."""
    commands = {f"help {c}": [c, "--help"] for c in COMMANDS}
    # the top level through the console script `pip install` makes, when there is one
    commands["help "] = [CONSOLE, "--help"] if Path(CONSOLE).exists() else ["--help"]
    commands["bad module"] = ["explain", "no_such_module_xyz:build"]
    commands["bench all"] = ["bench", "all"]
    commands["demo"] = ["demo"]
    commands["explain zoo"] = ["explain", "zoo:hyena_lm", "--length", "64"]
    return _run_all(commands)


@pytest.mark.parametrize("command", ["", *COMMANDS], ids=lambda c: c or "top")
def test_help(runs, command):
    p = runs[f"help {command}"]
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: lcsm-compile{' ' + command if command else ''}"), p.stdout
    if command:
        assert len(p.stdout.splitlines()) > 5  # a description and documented options
    else:
        for c in COMMANDS:
            assert c in p.stdout


def test_explain_bad_module_path(runs):
    assert_clean_error(runs["bad module"], "cannot import 'no_such_module_xyz'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_bench_without_gpu(runs):
    assert_clean_error(runs["bench all"], "needs a CUDA GPU")


def test_demo_end_to_end(runs):
    p = runs["demo"]
    out = p.stdout
    assert p.returncode == 0, (out[-4000:], p.stderr[-4000:])
    assert "lcsm explain:" in out and "4 mixer(s) rewritten" in out
    assert out.count("compiled prefill") == 2 and "FAIL" not in out
    for line in out.splitlines():
        if "max rel err" in line or "tokens == eager" in line:
            assert re.search(r"PASS( \(tol [0-9.e-]+\))?$", line.rstrip()), line
    for check in ("decoder, prefill 48 + 63 steps", "lazy tokens == eager recompute tokens",
                  "lcsm tokens == eager recompute tokens"):
        assert check in out, check
    for method in ("eager recompute", "lazy", "lcsm generate()"):
        assert re.search(rf"^  {re.escape(method)} +[0-9.]+ +[0-9.]+ +[0-9.]+x", out, re.M), method
    assert "all parity checks PASS" in out


def test_explain_zoo_model(runs):
    p = runs["explain zoo"]
    assert p.returncode == 0, p.stderr
    assert "4 mixer(s) rewritten, 0 left unchanged" in p.stdout
    assert "fft" in p.stdout and "hyena.py" in p.stdout


# ---- the rest in-process (main(argv) is what the console script calls), to keep the file fast ----

def run_main(capsys, *args) -> subprocess.CompletedProcess:
    from lcsm_compile.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def test_explain_unsupported_model_says_why(capsys):
    p = run_main(capsys, "explain", "zoo:neg_time_flip", "--length", "64")
    assert "0 mixer(s) rewritten" in p.stdout and "non-causal: flips the time axis" in p.stdout
    assert_clean_error(p, "zoo:neg_time_flip", "no causal convolution could be rewritten")


@pytest.mark.parametrize("spec, needle", [
    ("lcsm_compile.zoo:no_such_factory", "has no attribute 'no_such_factory'"),
    ("zoo:no_such_model", "no zoo model 'no_such_model'"),
    ("just_a_name", "expected MODULE:FACTORY"),
    ("missing_file.py:build", "no such file"),
], ids=["attribute", "zoo", "syntax", "file"])
def test_explain_bad_model_path(capsys, spec, needle):
    assert_clean_error(run_main(capsys, "explain", spec), needle)


def test_explain_factory_from_file(capsys, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "class Smooth(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.h = torch.nn.Parameter(torch.randn(8, 3))\n"
        "    def forward(self, x):\n"
        "        u = torch.nn.functional.pad(x.transpose(1, 2), (2, 0))\n"
        "        return torch.nn.functional.conv1d(u, self.h[:, None], groups=8).transpose(1, 2)\n"
        "def build():\n"
        "    return Smooth()\n"
        "build.lcsm_input = 'float:8'\n"
        "def no_input_known():\n"
        "    return torch.nn.Identity()\n"
        "def broken():\n"
        "    raise RuntimeError('boom')\n"
    )
    monkeypatch.chdir(tmp_path)  # MODULE:FACTORY imports from the current directory
    monkeypatch.syspath_prepend(str(tmp_path))
    p = run_main(capsys, "explain", "my_models:build", "--length", "40")
    assert p.returncode == 0, p.stderr
    assert "1 mixer(s) rewritten" in p.stdout
    assert_clean_error(run_main(capsys, "explain", "my_models.py:no_input_known"), "--input")
    assert_clean_error(run_main(capsys, "explain", "my_models:broken"), "the factory failed: RuntimeError: boom")
    assert_clean_error(run_main(capsys, "explain", "my_models:build", "--input", "float"), "expected ids:VOCAB")


def test_generate(capsys):
    p = run_main(capsys, "generate", "zoo:hyena_lm", "--prompt-len", "16", "-n", "8", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "prompt (16 tokens)" in p.stdout and "generated (8 tokens)" in p.stdout and "tokens/s" in p.stdout
    p = run_main(capsys, "generate", "zoo:hyena_lm", "--prompt", "1,2,3", "-n", "4", "--do-sample", "--top-k", "5",
                 "--temperature", "0.7", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "prompt (3 tokens): [1, 2, 3]" in p.stdout and "generated (4 tokens)" in p.stdout
    assert_clean_error(run_main(capsys, "generate", "zoo:hyena_lm", "-n", "5000"), "exceeds", "max_len 1024")
    assert_clean_error(run_main(capsys, "generate", "--prompt", "1,x"), "comma-separated token ids")


def test_generate_rejects_float_models(capsys):
    assert_clean_error(run_main(capsys, "generate", "zoo:long_conv", "-n", "2"), "token ids")


def test_export(capsys, tmp_path):
    p = run_main(capsys, "export", "zoo:hyena_lm", "--out-dir", str(tmp_path / "artifact"), "--max-len", "256",
                 "--length", "16", "--no-check")  # export's own tests run the artifact with onnxruntime
    assert p.returncode == 0, p.stderr
    assert "exported zoo:hyena_lm" in p.stdout and "4 mixer(s)" in p.stdout and "manifest.json" in p.stdout
    assert (tmp_path / "artifact" / "manifest.json").exists()
    assert_clean_error(run_main(capsys, "export", "zoo:hyena_lm", "--out-dir", str(tmp_path / "x"), "--opset", "9"),
                       "cannot be exported", "opset 9")


def test_bench_show_and_unknown(capsys, tmp_path):
    (tmp_path / "online_conv_testgpu.json").write_text(json.dumps(
        {"device": "Test GPU", "date": "2026-01-01",
         "results": {"1": [{"L": 1024, "ours_us": 12.5, "lazy_us": 40.0}]}}))
    p = run_main(capsys, "bench", "online_conv", "--show", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "Test GPU" in p.stdout and "ours_us" in p.stdout and "12.5" in p.stdout
    assert_clean_error(run_main(capsys, "bench", "no_such_bench", "--show"), "no benchmark 'no_such_bench'")
    assert_clean_error(run_main(capsys, "bench", "online_conv", "--show", "--out", str(tmp_path / "none")),
                       "no results")
