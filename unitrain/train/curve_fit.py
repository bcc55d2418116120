"""Learning-curve fit for the budget governor: L(t) = a + b·t^(−c), t in optimizer steps.

Why steps and not FLOPs: under one plan every step has the same batch shape, so FLOPs are a constant
multiple of steps and the exponent c is the same either way; steps keep the fit independent of errors
in the FLOP model and keep the numbers well scaled. The governor converts the slope to loss per FLOP
by dividing by the measured FLOPs per step.

The fit is robust: the eval losses are smoothed with a centred running median of 3 (exact on a
monotone noise-free curve, so it adds no lag, and it removes single outliers), then fitted with
scipy's least_squares under a soft-L1 loss whose scale is the measured eval noise, from a few
starting points, with a ∈ [0, min(loss) + 3σ], b ≥ 0, c ∈ [C_MIN, C_MAX].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

C_MIN, C_MAX = 1e-3, 5.0
MIN_FIT_POINTS = 4  # three parameters need a fourth point before a residual means anything


@dataclass
class CurveFit:
    """L(t) = a + b·t^(−c) with its quality numbers (computed on the raw, unsmoothed losses)."""

    a: float
    b: float
    c: float
    r2: float  # 1 − SS_res/SS_tot over every fitted eval; the early drop keeps it high when the law holds
    rmse: float  # root-mean-square residual, in loss units
    noise: float  # eval noise σ from the residuals (robust, loss units)
    tail_residual: float  # mean residual (observed − fit) of the last TAIL evals; < 0: falling faster
    n: int
    t_first: float
    t_last: float
    cov: list | None = None  # 3 × 3 covariance of (a, b, c): Gauss-Newton at the solution, σ² from the residuals

    def loss(self, t: float) -> float:
        return self.a + self.b * float(t) ** (-self.c)

    def slope(self, t: float) -> float:
        """−dL/dt = b·c·t^(−c−1): loss gained per step at step t (≥ 0)."""
        return self.b * self.c * float(t) ** (-self.c - 1.0)

    def params(self):
        """The curve with its uncertainty, as the quality model (unitrain.plan.quality) reads it."""
        from unitrain.plan.quality import CurveParams

        return CurveParams(self.a, self.b, self.c, self.cov, self.noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CurveFit":
        return cls(**d)


TAIL = 3


def smooth(y: np.ndarray) -> np.ndarray:
    """Centred running median of 3; the two ends are kept as they are."""
    if len(y) < 3:
        return y.copy()
    out = y.copy()
    out[1:-1] = np.median(np.stack([y[:-2], y[1:-1], y[2:]]), axis=0)
    return out


def noise_sigma(y: np.ndarray) -> float:
    """Eval noise σ from second differences: for i.i.d. noise they have variance 6σ², and a smooth
    curve adds only a slowly varying offset. Returns the larger of a robust (MAD) and a plain (RMS)
    estimate: on a handful of evals either alone often comes out far too small, and an
    underestimate makes the patience rule fire on noise."""
    if len(y) < 4:
        return 0.0
    d2 = y[2:] - 2 * y[1:-1] + y[:-2]
    mad = 1.4826 * float(np.median(np.abs(d2 - np.median(d2))))
    rms = float(np.sqrt(np.mean(d2**2)))
    return max(mad, rms) / math.sqrt(6)


def fit_power_law(steps, losses) -> CurveFit | None:
    """Fit L(t) = a + b·t^(−c) to eval losses at steps t ≥ 1. None with fewer than MIN_FIT_POINTS."""
    t = np.asarray(steps, dtype=float)
    y = np.asarray(losses, dtype=float)
    keep = (t >= 1) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < MIN_FIT_POINTS:
        return None
    ys = smooth(y)
    sigma = noise_sigma(y)
    span = float(ys.max() - ys.min())
    # soft-L1 is quadratic below f_scale and linear above: residuals beyond a few σ lose their pull.
    f_scale = max(2 * sigma, 1e-3 * span, 1e-6 * float(np.abs(ys).mean()), 1e-12)
    # Work in u = t / t_last so u ∈ (0, 1] and b is the loss above a at the last eval: well scaled.
    ts = float(t.max())
    u = t / ts
    a_hi = float(ys.min()) + 3 * sigma
    lo, hi = [0.0, 0.0, C_MIN], [max(a_hi, 1e-9), np.inf, C_MAX]

    log_u = np.log(u)

    def resid(p):
        return p[0] + p[1] * u ** (-p[2]) - ys

    def jac(p):  # ∂/∂a = 1, ∂/∂b = u^−c, ∂/∂c = −b·u^−c·ln u
        uc = u ** (-p[2])
        return np.stack([np.ones_like(u), uc, -p[1] * uc * log_u], axis=1)

    best = None
    # Two starts, a slow law with a low floor and a fast one with a high floor: on 60 random noisy
    # synthetic curves, nine starts all reached the same optimum; two guard against the odd valley.
    for c0, frac in ((0.4, 0.3), (1.5, 0.9)):
        a0 = min(frac * float(ys.min()), hi[0] * (1 - 1e-9))
        b0 = max(float(ys[-1]) - a0, 1e-6 * max(span, 1e-6))
        r = least_squares(resid, [a0, b0, c0], jac=jac, bounds=(lo, hi), loss="soft_l1", f_scale=f_scale,
                          x_scale=[max(abs(a0), 1e-3), max(b0, 1e-3), 1.0], max_nfev=400)
        if best is None or r.cost < best.cost:
            best = r
    a, bu, c = (float(v) for v in best.x)
    b = bu * ts**c  # back from u to steps: b·t^(−c) = bu·(t/ts)^(−c)
    fitted = a + b * t ** (-c)
    res = y - fitted
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float((res**2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    # Residual noise: robust (MAD) and corrected for the 3 fitted parameters.
    res_sigma = 1.4826 * float(np.median(np.abs(res - np.median(res)))) * math.sqrt(len(y) / (len(y) - 3))
    # Parameter covariance σ²·(JᵀJ)⁺ with J the model's Jacobian in (a, b, c) at the solution; σ² is the larger of
    # the residual variance and the robust noise: a fit through few points must not look more certain than the
    # evals it came from. The pseudo-inverse keeps a direction pinned at a bound (a = 0, c at its limit) finite.
    tc = t ** (-c)
    J = np.stack([np.ones_like(t), tc, -b * tc * np.log(t)], axis=1)
    s2 = max(ss_res / max(1, len(y) - 3), res_sigma ** 2)
    cov = (s2 * np.linalg.pinv(J.T @ J)).tolist()
    return CurveFit(a=a, b=b, c=c, r2=r2, rmse=math.sqrt(ss_res / len(y)), noise=res_sigma,
                    tail_residual=float(res[-TAIL:].mean()), n=len(y), t_first=float(t[0]),
                    t_last=float(t[-1]), cov=cov)
