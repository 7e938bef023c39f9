"""`lcsm-compile` on the command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lcsm-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="compile a small Hyena LM, check it against eager, generate")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo  # noqa: PLC0415

        return run_demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
