"""recheck_lengths: where a dynamic-length region is checked again before it is rewritten.

The rewritten graph serves every length its shape guards admit, and the verifier can only run the
region at a few. They are: a longer and a shorter length (prefix consistency, a random probe), the
shortest admitted one (a fixed-length filter transformed at 2L wraps around at short lengths
first), and, for each FFT in the region, the first length at which it can wrap.

FFT wrap: an FFT product of two length-L signals is their linear convolution only if the FFT
size n is at least 2L - 1; below that, lags past n - L fold back onto the start. With a dynamic L
each size is an expression in L: `2 * L` never falls short, a constant n does from L = n // 2 + 1
on, and `L + 64` (a margin enough for a 65-tap filter) from L = 66 on, which sampled lengths
miss. At that length a filter long enough to wrap shows it (the region reads the future), and
only such a filter changes the output. A sufficient test, not an exact one, from sizes alone.
"""
from __future__ import annotations

import sympy
import torch
from torch import fx

from .capture import sym_expr

__all__ = ["recheck_lengths", "fft_sizes", "first_wrap_length"]

# Wrap lengths are searched up to here: a region is not run at a length its model cannot reach
# (verify skips a length where the model raises), and beyond 2^20 one check would cost too much.
MAX_WRAP_SEARCH = 1 << 20

aten = torch.ops.aten
_TRANSFORMS = (aten._fft_r2c.default, aten._fft_c2c.default, aten._fft_c2r.default)


def fft_sizes(nodes: list[fx.Node]) -> list:
    """The transform sizes (sympy expressions or ints) of every FFT among `nodes`."""
    sizes = []
    for node in nodes:
        if node.op != "call_function" or node.target not in _TRANSFORMS:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = [d % val.dim() for d in node.args[1]]
        dim_sizes = [sym_expr(val.shape[d]) for d in dims]
        if node.target is aten._fft_c2r.default:  # the real output's length is an argument
            last = node.args[3]
            dim_sizes[-1] = sym_expr(last.meta.get("val") if isinstance(last, fx.Node) else last)
        sizes.extend(dim_sizes)
    return sizes


def first_wrap_length(n, symbol: sympy.Symbol, lower: int, upper: int, hints: dict,
                      taps: int | None = None) -> int | None:
    """The least L in [lower, upper] where a transform of size n(L) is too short for the linear
    convolution of L inputs with a filter of `taps` taps (n < L + taps - 1; taps None: of L taps,
    n < 2L - 1), None if there is none (or n cannot be evaluated). A wrap shows in the output
    only from there: an 8-tap filter at a fixed n = 64 wraps from L = 58, not from L = 33.
    Doubling, then bisection: exact for n that grows slower than L + taps past its first
    shortfall (constants, L + c, affine n with a small slope), which is what FFT sizes are."""
    def short(L: int) -> bool | None:
        try:
            value = sympy.sympify(n).xreplace({**hints, symbol: sympy.Integer(L)})
            return int(value) < L + (L if taps is None else taps) - 1
        except Exception:  # noqa: BLE001 - a size sympy cannot evaluate: no threshold from it
            return None

    if lower > upper:
        return None
    ok, L = lower, lower
    while True:
        s = short(L)
        if s is None:
            return None
        if s:
            break
        if L >= upper:
            return None
        ok, L = L, min(2 * L, upper)
    if L == lower:
        return lower
    while L - ok > 1:  # short(ok) is False, short(L) is True
        mid = (ok + L) // 2
        s = short(mid)
        if s is None:
            return None
        ok, L = (ok, mid) if s else (mid, L)
    return L


def _env_symbol(size):
    """(shape env, time symbol) behind a SymInt time size; (None, None) if it is not a plain symbol."""
    node = getattr(size, "node", None)
    env, sym = getattr(node, "shape_env", None), getattr(node, "expr", None)
    return (env, sym) if env is not None and isinstance(sym, sympy.Symbol) else (None, None)


def _hints(env) -> dict:
    """Every symbol's value at capture (the other sizes are held there)."""
    return dict(env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val)


def _length_admitted(env, sym, hints: dict, L2: int) -> bool:
    """Whether the graph's shape guards hold with the time symbol `sym` at L2 and every other size
    at its hint: a graph traced through min(4, L) is guarded to L >= 4, and outside its guards it
    never runs. Guards that cannot be decided count as holding."""
    rng = env.var_to_range.get(sym)
    if rng is not None and not (rng.lower <= L2 <= rng.upper):
        return False
    hints = {**hints, sym: sympy.Integer(L2)}
    for guard in env.guards:
        try:
            value = guard.expr.xreplace(hints)
        except Exception:  # noqa: BLE001 - an expression sympy cannot substitute: undecided
            continue
        if value is sympy.false or value is False:
            return False
    return True


def _range_bound(env, sym, which: str, default: int) -> int:
    """The time symbol's lower or upper bound in the shape env, `default` when unknown or infinite."""
    rng = env.var_to_range.get(sym)
    try:
        return int(getattr(rng, which)) if rng is not None else default
    except Exception:  # noqa: BLE001 - an unbounded range (sympy's or torch's infinity)
        return default


def _other_lengths(L: int, admitted, lower: int = 2) -> list[int]:
    """Where a dynamic-L region is re-checked: longer, shorter, and the shortest length the graph's
    guards admit (from 2: a fixed-length filter transformed at 2L wraps around at short lengths
    first). Lengths the guards exclude are skipped (the graph never runs there)."""
    out: list[int] = []
    for L2 in (L + max(3, L // 2), L - L // 3):
        if L2 >= 2 and L2 != L and admitted(L2):
            out.append(L2)
    lo = max(2, lower)
    shortest = next((n for n in range(lo, min(L, lo + 32)) if admitted(n)), None)
    if shortest is not None and shortest not in out:
        out.append(shortest)
    return out


def recheck_lengths(L: int, size, nodes: list[fx.Node], taps: int | None = None) -> list[tuple[int, bool]]:
    """(length, full) pairs for a region captured at L with the symbolic time size `size`: `full`
    asks for the prefix and probe checks too (causality is checked at every length). `taps`: the
    filter's extent at L; a filter shorter than L wraps in a too-small transform only later."""
    env, sym = _env_symbol(size)
    if env is None:  # not a plain symbol: no guards to consult, no FFT sizes to solve
        return [(L2, L2 >= L - L // 3) for L2 in _other_lengths(L, lambda n: True)]
    hints = _hints(env)
    admitted = lambda n: _length_admitted(env, sym, hints, n)  # noqa: E731
    lower = max(2, _range_bound(env, sym, "lower", 2))
    upper = min(MAX_WRAP_SEARCH, _range_bound(env, sym, "upper", MAX_WRAP_SEARCH))
    # Prefix and probe at the longer and shorter length; causality everywhere (a prefix of a few
    # taps at the shortest length says little).
    out = [(L2, L2 >= L - L // 3) for L2 in _other_lengths(L, admitted, lower)]
    seen = {L} | {L2 for L2, _ in out}
    rules = (None,) if taps is None or taps >= L else (None, taps)  # full-length and as captured
    for n, rule in ((n, rule) for n in fft_sizes(nodes) for rule in rules):
        first = first_wrap_length(n, sym, lower, upper, hints, rule)
        if first is None:
            continue
        L2 = next((m for m in range(first, min(first + 32, upper + 1)) if admitted(m)), None)
        if L2 is not None and L2 not in seen:
            seen.add(L2)
            out.append((L2, True))
    return out
