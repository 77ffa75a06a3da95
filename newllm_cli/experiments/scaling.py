"""Scaling fits that do not overclaim: the power law PPL = A n^alpha beside the saturation law
PPL = PPL_min + A n^-a, each with AIC, profile-likelihood intervals and a flag on every parameter
that sits on a bound of its fit.

Both laws are fitted by the same criterion, relative least squares sum_i ((p_i - fit_i) / p_i)^2
(perplexity errors are multiplicative), so their AIC = n log(RSS / n) + 2k compare. For a fixed
exponent each law is linear in its other parameters (weighted least squares in closed form, with box
bounds by active sets), so the fit is a dense scan over the exponent refined by golden section: no
starting point to choose and no local optimum to fall into. A 95% profile interval is every value of a
parameter whose best fit keeps n log(RSS / RSS_min) <= 3.84 (chi-square, 1 df); an interval that
reaches a bound is open on that side. With 4-5 points and 3 parameters the floor PPL_min is weakly
identified: the flags and intervals say so instead of printing a bare number.
"""

from __future__ import annotations

import math

import numpy as np

CHI2_95 = 3.841458820694124  # chi-square quantile, 1 degree of freedom
EXPONENT = (0.0, 3.0)  # the saturation law's a
BIG = 1e15  # "no upper bound" on A


def _wls2(p: np.ndarray, u: np.ndarray, box: tuple) -> tuple[float, float, float]:
    """min over m, A in box of sum ((p - m - A u) / p)^2: (m, A, rss). Active sets: the interior
    optimum when feasible, else the best of the four edges' 1-d optima (clipped) and the corners."""
    w = 1.0 / p**2
    (m_lo, m_hi), (a_lo, a_hi) = box

    def rss(m: float, a: float) -> float:
        return float(np.sum(w * (p - m - a * u) ** 2))

    cands = []
    sw, su, suu, sp, sup = w.sum(), (w * u).sum(), (w * u * u).sum(), (w * p).sum(), (w * u * p).sum()
    det = sw * suu - su * su
    if det > 1e-300 * max(1.0, sw * suu):
        m, a = (suu * sp - su * sup) / det, (sw * sup - su * sp) / det
        if m_lo <= m <= m_hi and a_lo <= a <= a_hi:
            return m, a, rss(m, a)
    for m in (m_lo, m_hi):  # edges with m fixed: best A
        a = float(np.clip((sup - m * su) / suu, a_lo, a_hi)) if suu > 0 else a_lo
        cands.append((m, a))
    for a in (a_lo, a_hi):  # edges with A fixed: best m
        cands.append((float(np.clip((sp - a * su) / sw, m_lo, m_hi)), a))
    best = min(cands, key=lambda c: rss(*c))
    return best[0], best[1], rss(*best)


def _golden(f, lo: float, hi: float, steps: int = 60) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def _scan(f, lo: float, hi: float, points: int = 301) -> float:
    """The minimiser of f over [lo, hi]: a dense grid, then golden section around its best point."""
    grid = np.linspace(lo, hi, points)
    values = [f(x) for x in grid]
    i = int(np.argmin(values))
    x = _golden(f, grid[max(i - 1, 0)], grid[min(i + 1, points - 1)])
    return x if f(x) <= values[i] else float(grid[i])


def _interval(profile, lo: float, hi: float, best: float, rss_min: float, n: int, log: bool = False) -> dict:
    """The 95% profile interval of one parameter: scanned on a grid between its bounds."""
    log = log and best > 0
    grid = np.geomspace(max(lo, best * 1e-4), min(hi, best * 1e4), 241) if log else np.linspace(lo, hi, 241)
    grid = np.unique(np.concatenate([np.linspace(grid[0], grid[-1], 121) if not log else grid[::2], [best]]))
    floor = max(rss_min, 1e-12 * len(grid))  # exact data: a relative error of 1e-6 is no evidence
    inside = np.array([v == best or n * math.log(max(profile(v), floor) / floor) <= CHI2_95 for v in grid])
    where = grid[inside]
    low, high = float(where.min()), float(where.max())
    return {"low": low, "high": high, "open_low": bool(inside[0]), "open_high": bool(inside[-1])}


def _on_bound(value: float, lo: float, hi: float) -> bool:
    scale = max(abs(lo), abs(hi) if hi < BIG else abs(value), 1e-12)
    return abs(value - lo) <= 1e-6 * scale or (hi < BIG and abs(value - hi) <= 1e-6 * scale)


def _warn(n: int, k: int) -> list[str]:
    return [f"{n} points for {k} parameters (fewer than two per parameter): the fit is weakly identified"] * int(
        n < 2 * k
    )


def aic(rss: float, n: int, k: int) -> float:
    return n * math.log(max(rss, 1e-300) / n) + 2 * k


def power(n_tokens, perplexity) -> dict:
    """PPL = A n^alpha by relative least squares; alpha in [-3, 0], A >= 0."""
    n, p = np.asarray(n_tokens, np.float64), np.asarray(perplexity, np.float64)

    def best_a(alpha: float) -> tuple[float, float]:
        u = n**alpha / p
        a = max(float((u).sum() / (u * u).sum()), 0.0)
        return a, float(((1 - a * u) ** 2).sum())

    alpha = _scan(lambda x: best_a(x)[1], -3.0, 0.0)
    a, rss = best_a(alpha)
    return {"law": "power", "alpha": alpha, "A": a, "rss": rss, "aic": aic(rss, len(n), 2), "points": len(n),
            "on_bound": ["alpha"] * int(_on_bound(alpha, -3.0, 0.0)), "warnings": _warn(len(n), 2)}  # fmt: skip


def saturation(n_tokens, perplexity, floor: tuple | None = None, amplitude: tuple | None = None,
               exponent: tuple = EXPONENT) -> dict:  # fmt: skip
    """PPL = PPL_min + A n^-a by relative least squares within bounds (PPL_min in [0, min PPL] and
    A >= 0 unless given), with profile intervals and bound flags."""
    n, p = np.asarray(n_tokens, np.float64), np.asarray(perplexity, np.float64)
    m_box = floor or (0.0, float(p.min()))
    a_box = amplitude or (0.0, BIG)
    scale = float(np.exp(np.mean(np.log(n))))  # n / scale keeps n^-a within floating range
    x = n / scale

    def at(exp: float, m_box=m_box, a_box=a_box) -> tuple[float, float, float]:
        m, a, rss = _wls2(p, x**-exp, (m_box, (a_box[0] * scale**-exp, a_box[1] * scale**-exp)))
        return m, a * scale**exp, rss

    e = _scan(lambda v: at(v)[2], *exponent)
    m, a, rss = at(e)
    k = len(p)
    params = {"ppl_min": m, "A": a, "a": e}
    bounds = {"ppl_min": m_box, "A": a_box, "a": exponent}
    profiles = {
        "a": lambda v: at(v)[2],
        "ppl_min": lambda v: at(_scan(lambda s: at(s, (v, v))[2], exponent[0], exponent[1], 41), (v, v))[2],
        "A": lambda v: at(_scan(lambda s: at(s, m_box, (v, v))[2], exponent[0], exponent[1], 41), m_box, (v, v))[2],
    }
    intervals = {
        name: _interval(profiles[name], bounds[name][0], bounds[name][1], params[name], rss, k, name == "A")
        for name in params
    }
    return {"law": "saturation", **params, "rss": rss, "aic": aic(rss, k, 3), "points": k,
            "intervals": intervals, "bounds": {k_: list(b) for k_, b in bounds.items()},
            "on_bound": [name for name in params if _on_bound(params[name], *bounds[name])],
            "warnings": _warn(k, 3)}  # fmt: skip


def describe(fit: dict) -> str:
    """One line: the law, each parameter with its interval and bound flag, AIC, warnings."""
    if fit["law"] == "power":
        body = f"PPL = {fit['A']:.4g} x n^{fit['alpha']:.4f}"
    else:
        body, parts = "PPL = PPL_min + A n^-a", []
        for name in ("ppl_min", "A", "a"):
            iv = fit["intervals"][name]
            lo = "open" if iv["open_low"] else f"{iv['low']:.4g}"
            hi = "open" if iv["open_high"] else f"{iv['high']:.4g}"
            flag = " AT ITS BOUND: not identified" if name in fit["on_bound"] else ""
            parts.append(f"{name} = {fit[name]:.4g} (95% profile {lo} to {hi}){flag}")
        body += ": " + ", ".join(parts)
    if fit["law"] == "power" and fit["on_bound"]:
        body += " (alpha AT ITS BOUND)"
    notes = "".join(f"; {w}" for w in fit["warnings"])
    return f"{body}; AIC {fit['aic']:.2f} ({fit['points']} points){notes}"
