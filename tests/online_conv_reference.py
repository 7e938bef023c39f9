"""run_against_lazy: an online convolution engine, prompt then steps, against the lazy O(t) sum
(shared by the torch-path and Triton-path OnlineConv tests; imported as a top-level module, like
graph_capture, since pytest puts tests/ on sys.path)."""
from __future__ import annotations

from lcsm_compile.kernels.online_conv import LazyOnlineConv


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def run_against_lazy(eng, filters, u, P, tol, all_at_once=False):
    """Feed u (L, M, B, D) through eng (prompt u[:P], then step by step) and the lazy reference;
    return the worst relative error over every prefill output and every y_t.

    The error of y_t is ||y_t - ref_t|| / max(||ref_t||, 0.01 ||scale_t||), scale_t the same sum
    over |h| and |u|: plain relative error unless y_t cancels to under 1% of its terms' size (with
    D = B = 1 a single scalar can come arbitrarily close to 0). The references run on the
    filters' device, whatever the engine's (the Triton tests hand CPU filters to a CUDA engine)."""
    L, M, B, D = u.shape
    lazy = LazyOnlineConv(filters.double(), B, eng.max_len)
    mags = LazyOnlineConv(filters.double().abs(), B, eng.max_len)
    prompt, ref_u = u[:P].permute(1, 2, 3, 0), u.double().to(filters.device)
    ref_prompt = ref_u[:P].permute(1, 2, 3, 0)
    worst = 0.0
    for m in range(M):
        y = eng.prefill(m, prompt[m].to(eng.dtype).contiguous())
        ref = lazy.prefill(m, ref_prompt[m])
        mags.prefill(m, ref_prompt[m].abs())
        assert y.shape == (B, D, P) and y.dtype == eng.dtype
        if P:
            err = _rel(y.to(ref.device), ref)
            assert err <= tol, f"prefill m={m}: relative error {err:.3g} > {tol}"
            worst = max(worst, err)
    assert eng.position == P
    for t in range(P, L):
        if all_at_once:
            ys = eng.step_all(u[t].to(eng.dtype))
        else:
            ys = [eng.step(m, u[t, m].to(eng.dtype)) for m in range(M)]
        for m in range(M):
            ref = lazy.step(m, ref_u[t, m])
            scale = mags.step(m, ref_u[t, m].abs())
            err = (ys[m].double().to(ref.device) - ref).norm().item() / max(
                ref.norm().item(), 0.01 * scale.norm().item(), 1e-300)
            assert err <= tol, f"t={t} m={m}: relative error {err:.3g} > {tol}"
            worst = max(worst, err)
        eng.advance()
        lazy.advance()
        mags.advance()
        assert eng.position == t + 1
    return worst
