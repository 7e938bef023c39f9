"""The model named on the command line (`zoo:NAME`, `MODULE:FACTORY`, `file.py:FACTORY`) and its inputs.

torch and the zoo are imported inside the functions: importing the CLI stays cheap for `--help`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import CliError, one_line


def load_model(spec: str):
    """`zoo:NAME`, `MODULE:FACTORY` or `file.py:FACTORY` -> (model in eval mode, input maker)."""
    import torch  # noqa: PLC0415

    if spec.startswith("zoo:"):
        from ..zoo import ZOO  # noqa: PLC0415

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
    return model.eval(), (lambda b, n, g: input_maker(make, model, spec)(b, n, g))


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
        return lambda b, n, g: tuple(make(model, b, n, g))
    if isinstance(make, str):
        kind, size = parse_input(make)
    elif isinstance(getattr(model, "vocab_size", None), int):
        kind, size = "ids", model.vocab_size
    elif isinstance(getattr(model, "d_model", None), int):
        kind, size = "float", model.d_model
    else:
        raise CliError(f"cannot tell what input {spec} takes; pass --input ids:VOCAB or --input float:D")
    if kind == "ids":
        return lambda b, n, g: (torch.randint(0, size, (b, n), generator=g),)
    return lambda b, n, g: (torch.randn(b, n, size, generator=g),)


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
