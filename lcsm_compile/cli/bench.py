"""`lcsm-compile bench`: run the scripts in benchmarks/ and print their results JSON as tables.

Needs a source checkout (benchmarks/ is not packaged); scripts named `_*.py` are their helpers, not benchmarks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import CliError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


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
    sys.path.insert(0, str(BENCH_DIR))  # its helper modules (_common, _online_conv_cases) sit beside it
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001  (fall back to the generic tables)
        return None
    finally:
        sys.path.remove(str(BENCH_DIR))
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

