"""The quality model: predicted held-out loss as a function of the training tokens, the unique tokens and the method.

Form (the one the governor fits during the run, DESIGN.md "Marginal-gain stopping"):

    L(D) = a + b · (D_eff / D_1)^(−c)

with D the real training tokens, D_1 the tokens of one optimizer step (so the exponent reads the same in steps,
and the fit is well scaled) and D_eff the *effective* tokens of data-constrained scaling (Muennighoff et al. 2023):
with U unique tokens and D = R·U trained (R epochs), the repeats are worth less and less,

    D_eff = D                                        for R ≤ 1,
    D_eff = U + U · R* · (1 − exp(−(R − 1) / R*))    for R > 1,     R* = 15.4,

so at 4 epochs the data is worth 3.7 fresh epochs, at 16 epochs 10.6, and it saturates at 16.4 — the reason a
budget-derived length is capped near 4 epochs, and the reason a curve that flattens in steps under heavy repetition
flattens further: the governor fits and extrapolates in D_eff, not in steps.

Where the numbers come from, in order of trust:
1. the run's own evals (the governor's fit at every eval: a refined prediction of the loss at the budget's end);
2. stored curves of earlier runs on the same model × method × data (calibration store, kind "curve"): the level,
   the exponent and the time scale, refitted from their evals; the plan's prediction with an interval;
3. nothing measured: the plan says the level is unknown until the first evals (a power law carries no level of
   its own), and compares alternatives by effective tokens alone (a lower loss for more effective tokens: under
   the prior every method learns equally per effective token).

Intervals are central 80 % intervals from the fit's parameter covariance (Gauss-Newton at the solution,
σ² from the residuals or the eval noise, whichever is larger), by the delta method; `benchmarks/early_stopping.py`
and `benchmarks/budget_vs_hf.py` report how often they cover the achieved loss, and how wide they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

R_STAR = 15.4  # Muennighoff et al. 2023: the "half-life" of repeated data, in repetitions
Z80 = 1.2816  # two-sided 80 % normal interval: ±1.2816 σ


def effective_tokens(tokens: float, unique: float) -> float:
    """D_eff of `tokens` trained over `unique` distinct tokens (data-constrained scaling)."""
    if unique <= 0 or tokens <= unique:
        return float(tokens)
    return unique + unique * R_STAR * (1 - math.exp(-(tokens / unique - 1) / R_STAR))


def effective_steps(steps: float, tokens_per_step: float, unique: float) -> float:
    """The step count whose fresh tokens equal the effective tokens of `steps` (identical up to one epoch)."""
    if tokens_per_step <= 0:
        return float(steps)
    return effective_tokens(steps * tokens_per_step, unique) / tokens_per_step


def marginal_value(tokens: float, unique: float) -> float:
    """d D_eff / d D: what one more trained token is worth in fresh tokens (1 within the first epoch)."""
    if unique <= 0 or tokens <= unique:
        return 1.0
    return math.exp(-(tokens / unique - 1) / R_STAR)


@dataclass
class CurveParams:
    """A learning curve in effective steps: L(t) = a + b·t^(−c), with the covariance of (a, b, c)."""

    a: float
    b: float
    c: float
    cov: list | None = None  # 3 × 3 covariance of (a, b, c), or None when unknown
    noise: float = 0.0  # eval noise σ (loss units)

    def loss(self, t: float) -> float:
        return self.a + self.b * max(float(t), 1e-9) ** (-self.c)

    def _grad(self, t: float) -> list[float]:
        u = max(float(t), 1e-9) ** (-self.c)
        return [1.0, u, -self.b * u * math.log(max(float(t), 1e-9))]

    def sd(self, t: float, minus: float | None = None) -> float:
        """σ of L(t) (or of L(t) − L(minus)) from the parameter covariance: the delta method."""
        if not self.cov:
            return float("inf")
        g = self._grad(t)
        if minus is not None:
            g = [x - y for x, y in zip(g, self._grad(minus))]
        var = sum(g[i] * self.cov[i][j] * g[j] for i in range(3) for j in range(3))
        return math.sqrt(max(0.0, var))

    def interval(self, t: float, z: float = Z80) -> tuple[float, float]:
        """Central interval of the loss *measured* at t: the curve's uncertainty and one eval's noise."""
        s = math.sqrt(self.sd(t) ** 2 + self.noise ** 2)
        m = self.loss(t)
        return m - z * s, m + z * s


# ------------------------------------------------------------------------------------------- stored curves

def curve_key(model: str, params: int, method: str, lr: float, data: str) -> str:
    """Learning curves are stored per model × method × learning rate × data (clean pool and eval split)."""
    return f"curve|{model or '?'}|{params}|{method}|{lr:g}|{data or '?'}"


def curve_facts(fit, tokens_per_step: float, unique: float, final_step: int, final_loss: float | None,
                initial_loss: float | None) -> dict:
    """What a finished run stores about its learning curve (calibration store, kind "curve"): the fit in its
    effective steps, the tokens of one step (to read the curve in tokens), and the cooldown's factor — the final
    eval (after the LR cooldown) over the constant-LR curve at the same point."""
    end = effective_steps(final_step, tokens_per_step, unique)
    factor = (final_loss / fit.loss(end)) if final_loss and fit.loss(end) > 0 else 1.0
    return {"a": fit.a, "b": fit.b, "c": fit.c, "cov": fit.cov, "noise": fit.noise, "n": fit.n,
            "tokens_per_step": tokens_per_step, "unique_tokens": unique, "final_step": final_step,
            "final_loss": final_loss, "initial_loss": initial_loss, "cooldown_factor": factor}


def predict_from(facts: dict, effective: float, coverage: float = 0.8) -> tuple[float, float, float]:
    """(loss, low, high) after `effective` effective tokens, from a stored curve: the constant-LR curve at that
    point times the cooldown factor that run measured; the interval carries the curve's parameter uncertainty and
    one eval's noise (central `coverage`)."""
    from statistics import NormalDist

    curve = CurveParams(facts["a"], facts["b"], facts["c"], facts.get("cov"), facts.get("noise", 0.0))
    t = effective / max(1e-9, facts["tokens_per_step"])
    k = facts.get("cooldown_factor", 1.0)
    lo, hi = curve.interval(t, NormalDist().inv_cdf(0.5 + coverage / 2))
    return curve.loss(t) * k, lo * k, hi * k
