"""The budget governor: accounts compute against the budget and decides when to stop (DESIGN.md).

Only the governor decides to stop; the trainer loop reports to it and acts on `Decision.stop`.

Accounting. After every optimizer step the loop calls `account(tokens, flops, seconds)` (global
tokens, FLOPs including recomputation, wall seconds); evals are charged with `account_eval`. The
budget is kept in its own unit: FLOPs, GPU-hours (= seconds × world_size / 3600) or training tokens.
A `budget` stop is returned as soon as  used + next step + one eval > budget,  with the next step
estimated as max(last step, moving average) and the eval as the last eval's cost. Whatever the
estimate, used ≤ budget before each step, so a run ends at most one step over its budget; the
reserved eval pays for the final eval.

Stop rule — on the same curve as the plan's quality model (unitrain/plan/quality.py). At every eval,
L(t) = a + b·t^(−c) is fitted (curve_fit.py) with t in *effective* steps: the steps whose fresh tokens equal
the effective tokens of the data trained so far (data-constrained scaling: repeats of the subset's tokens are
worth less and less; identical to steps within the first epoch), so a run that repeats its data many times
sees the flattening the repetition causes. The fit covers the evals after warmup in the last decade of
steps, [t/10, t] (at least the last 8): a power law is
scale-free, so one decade is a natural window, and it keeps an early transient (a fast,
exponential-looking drop while a fine-tune learns the format) from dictating the slope long after it
is over. A rule stop at step t trains on through a cooldown to t_e = t + cooldown(t) (about (1+ρ)·t,
ρ the plan's cooldown fraction); the full run would end at T = min(plan.max_steps, steps now +
remaining budget / measured cost per step), after its own cooldown. Both runs end cooled down, so on
the constant-LR curve the fit describes, the loss a stop gives up is  L(t_e) − L(T): the cooldown's
own gain is about the same fraction for both and cancels, and the stop is credited with the steps it
still trains. With F the measured FLOPs per step (training incl. recomputation, plus evals amortised),
the marginal gain per FLOP of continuing is the fitted gain per FLOP over the rest of the budget,

    g(t) = (L(t_e) − L(T)) / (F·(T − t_e)),

and the budget's threshold is the exchange rate at which that rest is worth ε of the final loss,

    λ_B = ε · L(T) / (F·(T − t_e)),        ε = `stopping.min_budget_gain` (default 0.01),

so the rule g < λ_B reads: stop when the fitted curve says that spending the rest of the budget would
lower the loss by less than ε of the predicted final loss L(T):  L(t_e) − L(T) < ε·L(T). The stop's
price on the fitted curve is then ε at most, which is what the user sets (the issue's target is
≤ 1 % higher loss). The gain L(t_e) − L(T) is taken at the fit's upper confidence bound (`stopping.confidence`,
default 0.8 one-sided: gain + z·σ_gain, σ from the fit's parameter covariance by the delta method): the less
certain the curve, the more evidence a stop needs. The rule must then hold at 2 evals in a row *and* over a
stretch of 1.25× the steps since it first held (CONFIRM_SPAN): a power law is scale-free, so evidence is counted
in log-time, and a plateau that ends soon after it was first judged flat has its drop inside the stretch. Why not the slope at t (the rule before): comparing g(t) = b·c·t^(−c−1)/F with
ε·L(T)/(F·T) extrapolates today's slope linearly over the whole budget; for the slow laws real runs
follow at constant LR (c ≈ 0.1-0.4, or c→0 with a = 0: a log-linear decline) that overstates the
remaining gain many times, and a stop needed the reducible loss within ~1 % of its floor: on the
benchmark it saved 5-7 % at 20 epochs where the curve had long flattened.
A larger budget never stops earlier: L(t_e) does not depend on the budget (cooldown(t) is the plan's
cooldown fraction of t) and L(T) falls as T grows, so L(t_e) − (1+ε)·L(T) only grows with T; the fit
depends only on the eval history, so this holds eval by eval for the fitted curve, not only the true
one. On an exact law L = a + b·(t/τ)^(−c) the stop step is

    t* = τ/(1+ρ) · (ε·L(T)/b + (T/τ)^(−c))^(−1/c).

E.g. ε = 0.01, ρ = 0.2, a = 1, b = 2, c = 1, τ = 10, T = 2000: t* ≈ 829, ending at 995 (half the
budget saved, 1 % loss). Every curve reaches the threshold shortly before T; how much a stop saves is
set by the curve's log-log slope α = −d ln L/d ln t at T: about ε/α of the budget. A flattened curve
(α ≈ 0.02-0.03 near T) stops with a third to a half of it left; one still falling steeply (α ≥ 0.5, no floor in
sight) would save less than its own cooldown and an eval interval, and runs to the budget
('end_of_budget'). A user-set exchange rate `stopping.loss_per_flop` = λ overrides all of this:
then the comparison is the slope now, b·c·t^(−c−1)/F < λ (continue while the next FLOP buys more
than λ; for a convex curve no later horizon buys more per FLOP), independent of the budget.

Every fitted decision carries the fit's predicted loss at the budget's end with its 80 % interval
(`predicted_interval`); `finalize` reports the plan's prediction and the first and last refined ones against
the achieved final eval loss, and stores the run's curve (one fit over all its evals, in effective steps, with
the cooldown's factor) in the calibration store, where the next plan on the same model, method, learning rate
and data finds it (plan.prediction).

Guards, in order: a non-finite loss stops at once ('nonfinite'); `patience` evals in a row whose
loss exceeds the best smoothed level so far by more than 5σ (σ: eval noise from second differences
of the last 32 evals; needs 6 evals) stop ('patience': overfitting, which a power law cannot see);
no rule stop before `min_evals` evals and 8 fitted evals after warmup ('min_evals': three
parameters and a noise level; with 4-7 evals the noise estimate is inflated by the post-warmup bump
and almost any fit passes); none while the fitted evals span less than 4× in steps, t/t_first
('min_span': over a shorter span a plateau, an early floor and a power law fit equally well — on the
benchmark, windows of steps 6-14 fitted floors at c = 2-5 or a flat b ≈ 0, and the runs stopped
at 10-20 % of the budget, 4-15 % above the full run's loss); none when the fitted drop across the
window is within 2σ of the eval noise unless the span is at least 8× ('flat_fit': a flat stretch
soon after warmup is as often a plateau before the next drop as a floor; only a flat stretch close
to a decade long counts as flattened); none while the fit is poor ('poor_fit': R² < `min_r2` on
the fitted evals while the RMS residual exceeds 2σ — a flat, noisy stretch has a low R² but a
residual at the noise level, and passes — or the last 3 evals lie below the fit by more than
2σ/√3 on average: the curve falls faster than the law, a new phase); none when stopping now plus the
cooldown would save nothing ('end_of_budget'); the rule must hold at 2 evals in a row ('confirming'
at the first). No guard can see a plateau that lasts longer than the span guards before the loss
falls again: such a run stops on the plateau. A rule stop carries `cooldown_steps`: the plan's
cooldown fraction of the steps trained so far (cooldown_steps / max_steps × step, at most
cooldown_steps). `stopping.enabled = false` keeps accounting, fitting and logging and stops only for
the budget or a non-finite loss ('disabled' marks where the rule would have stopped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from statistics import NormalDist
from pathlib import Path

import numpy as np

from unitrain.errors import UnitrainError
from unitrain.plan import quality
from unitrain.train.curve_fit import TAIL, CurveFit, fit_power_law, noise_sigma, smooth

PATIENCE_SIGMAS = 5.0  # a rise counts when it clears the best smoothed level by this many noise σ
PATIENCE_MIN_EVALS = 6  # below this the noise σ is too uncertain to call a rise
PATIENCE_NOISE_WINDOW = 32  # evals the patience rule's noise σ is measured on
EMA = 0.3  # weight of the newest step in the moving-average step cost
FIT_WINDOW = 0.1  # fit the last decade of steps, [0.1·t, t]: early transients are not the law now
FIT_WINDOW_POINTS = 8  # ... or the last 8 evals when the decade holds fewer
MIN_RULE_POINTS = 8  # fitted evals after warmup before any rule stop: 3 parameters and a noise level
MIN_SPAN = 4.0  # ... spanning at least this ratio t_last/t_first in steps
FLAT_SPAN = 8.0  # a fit without a drop beyond the noise needs (nearly) a full decade of steps
FLAT_SIGMAS = 2.0  # 'without a drop': the fitted drop across the window is below this many noise σ
LOF_SIGMAS = 2.0  # a low-R² fit still passes when its RMS residual is within this many noise σ
CONFIRM_EVALS = 2  # the rule must hold at this many evals in a row: one noisy eval cannot stop a run
CONFIRM_SPAN = 1.25  # ... and over this ratio of steps (t / t_first_below): a power law is scale-free, so the
# evidence must hold over a stretch of log-time, not a count of evals — a plateau that ends soon after it is
# first judged flat (a plateau-then-drop curve) has its drop inside the stretch


@dataclass
class Decision:
    stop: bool
    reason: str  # marginal_gain | patience | budget | nonfinite | continue | min_evals | min_span | poor_fit |
    #              flat_fit | end_of_budget | confirming | stopped (already stopping) | disabled (rule would stop)
    detail: str  # human readable, with the numbers
    fit: dict | None = None  # CurveFit.to_dict(): a, b, c, r2, rmse, noise, ...
    threshold: float | None = None  # λ, loss per FLOP
    marginal_gain: float | None = None  # g(t), loss per FLOP
    predicted_final_loss: float | None = None  # L(T): the fitted loss had the run gone to the budget
    predicted_interval: list | None = None  # its central 80 % interval (curve uncertainty and eval noise)
    step: int | None = None
    horizon_step: float | None = None  # T
    best_step: int | None = None  # the step with the lowest eval loss so far
    cooldown_steps: int | None = None  # rule stops: LR cooldown to run before the final eval and save

    def to_dict(self) -> dict:
        return asdict(self)


class Governor:
    """Budget accounting and the stop rule; see the module doc for every formula."""

    def __init__(self, plan, stopping, run_dir: Path | None):
        self.plan, self.cfg = plan, stopping
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.world_size = max(1, plan.world_size)
        self.budget = plan.budget.typed  # parsed once, by the resource spec; checked against one step by the planner
        self.max_steps, self.warmup, self.cooldown = plan.length.steps, plan.length.warmup, plan.length.cooldown
        self.flops_per_step = plan.compute.flops_per_step
        # effective steps (quality.effective_steps): repeats of the subset's tokens are worth less than fresh data
        self.tokens_per_step = plan.length.tokens_per_step
        self.unique = plan.data.subset_tokens if plan.data.scanned else 0
        self.z = NormalDist().inv_cdf(stopping.confidence)
        self.planned_flops = self.max_steps * self.flops_per_step + plan.evals.count * plan.evals.flops
        self.warnings: list[str] = []
        self._check_loss_per_flop()
        self._check_eval_cadence(plan.evals)
        self.steps = 0
        self.tokens = 0
        self.train_flops = self.eval_flops = self.selection_flops = 0.0
        self.train_s = self.eval_s = self.selection_s = 0.0
        self.step_cost_ema = 0.0  # budget units
        self.last_step_cost = 0.0
        self.last_eval_cost = 0.0
        self.evals: list[list] = []  # [step, loss, fitted?]
        self.best_loss, self.best_step, self.rising = math.inf, None, 0
        self.below = 0  # evals in a row with the marginal gain below the threshold
        self.below_since = 0  # the step of the first of them
        self.last_good_step = 0
        self.decisions: list[dict] = []
        self.stop_decision: dict | None = None
        self.budget_hit = False

    # ---------------------------------------------------------------- construction checks
    def _cost(self, flops: float, seconds: float, tokens: float) -> float:
        """A cost in the budget's unit."""
        kind = self.budget.kind if self.budget else "flops"
        if kind == "flops":
            return float(flops)
        if kind == "gpu_hours":
            return seconds * self.world_size / 3600.0
        return float(tokens)

    def _check_loss_per_flop(self) -> None:
        lam = self.cfg.loss_per_flop
        if lam is None:
            return
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise UnitrainError(f"stopping.loss_per_flop={lam!r}: must be a positive loss per FLOP "
                                f"(e.g. 1e-18), or unset to derive it from the budget")
        step_gain = lam * self.flops_per_step
        if step_gain >= 1:
            raise UnitrainError(
                f"stopping.loss_per_flop={lam:g} asks every optimizer step ({self.flops_per_step:.3g} "
                f"FLOPs) to lower the loss by {step_gain:.3g} nats: it reads like a loss per step or per "
                f"token, not per FLOP. Divide by the FLOPs per step, or unset it to derive it from the budget")
        whole = lam * self.planned_flops
        if whole > 10:
            self._warn(f"stopping.loss_per_flop={lam:g} × planned {self.planned_flops:.3g} FLOPs = {whole:.3g} "
                       f"nats: the run will stop at the first allowed eval; check the unit (loss per FLOP)")
        elif whole < 1e-6:
            self._warn(f"stopping.loss_per_flop={lam:g} × planned {self.planned_flops:.3g} FLOPs = {whole:.3g} "
                       f"nats: the marginal-gain rule will practically never stop; check the unit")

    def _check_eval_cadence(self, evals) -> None:
        if not self.cfg.enabled or not evals.sequences or not evals.stop_rule:
            return  # no evals, or the plan already says the stop rule is off (and why)
        need = max(self.cfg.min_evals, MIN_RULE_POINTS)
        every = evals.every
        n = self.max_steps // every if every > 0 else 0
        if n < need:
            hint = max(1, self.max_steps // (2 * need))
            self._warn(f"training.eval_every={every} gives {n} evals in {self.max_steps} steps; the "
                       f"stop rule needs {need} (stopping.min_evals and {MIN_RULE_POINTS} evals to fit after "
                       f"warmup) and cannot stop early; set training.eval_every={hint} or lower")

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=3)

    # ---------------------------------------------------------------- accounting
    def _used(self) -> float:
        return self._cost(self._flops_used(), self.train_s + self.eval_s + self.selection_s, self.tokens)

    def _flops_used(self) -> float:
        return self.train_flops + self.eval_flops + self.selection_flops

    def account(self, tokens: int, flops: float, seconds: float) -> Decision | None:
        """Charge one optimizer step; a 'budget' Decision when the next step would overrun."""
        self.steps += 1
        self.tokens += int(tokens)
        self.train_flops += float(flops)
        self.train_s += float(seconds)
        cost = self._cost(flops, seconds, tokens)
        self.step_cost_ema = cost if self.steps == 1 else EMA * cost + (1 - EMA) * self.step_cost_ema
        self.last_step_cost = cost
        if self.budget is None:
            return None
        used, b = self._used(), self.budget.value
        nxt = max(self.last_step_cost, self.step_cost_ema) + self.last_eval_cost
        if used + nxt <= b:
            return None
        d = Decision(True, "budget", f"budget {self.budget} reached: used {used:.4g} + next step and eval "
                     f"≈ {nxt:.3g} > {b:.4g} ({self.budget.kind}) after step {self.steps}", step=self.steps,
                     best_step=self.best_step)
        if not self.budget_hit:  # logged once; the loop saves and ends on it
            self.budget_hit = True
            self._record(d)
        return d

    def account_selection(self, flops: float, seconds: float) -> None:
        """The selector's embedding/scoring FLOPs, before the first step (not training tokens)."""
        self.selection_flops += float(flops)
        self.selection_s += float(seconds)

    def account_eval(self, flops: float, seconds: float) -> None:
        self.eval_flops += float(flops)
        self.eval_s += float(seconds)
        # Eval tokens are not training tokens: a tokens budget does not pay for them.
        self.last_eval_cost = self._cost(flops, seconds, 0)

    def _eff(self, step: float) -> float:
        return quality.effective_steps(step, self.tokens_per_step, self.unique)

    def _flops_per_step(self) -> float:
        """F: FLOPs per step including recomputation and amortised evals (the plan's until measured)."""
        if self.steps and self.train_flops > 0:
            return (self.train_flops + self.eval_flops) / self.steps
        return float(self.flops_per_step)

    def cooldown_for(self, step: int) -> int:
        """LR cooldown after a rule stop at `step`: the plan's cooldown fraction of the steps actually
        trained (WSD cooldowns scale with the run, Hägele et al.), never more than the plan's."""
        if self.max_steps <= 0 or self.cooldown <= 0:
            return 0
        return min(self.cooldown, math.ceil(self.cooldown * step / self.max_steps))

    def _horizon(self, step: int) -> float:
        """T: the step at which the run ends, from the plan and the budget left at the measured rate."""
        T = float(self.max_steps)
        if self.budget is not None and self.steps:
            used = self._used()
            per_step = used / self.steps
            if per_step > 0:
                T = min(T, step + max(0.0, self.budget.value - used) / per_step)
        return max(T, float(step))

    # ---------------------------------------------------------------- observations
    def observe_train_loss(self, step: int, loss: float) -> Decision | None:
        if math.isfinite(loss):
            self.last_good_step = step
            return None
        d = Decision(True, "nonfinite", f"training loss is {loss} at step {step}; stopping. Keep the last good "
                     f"state (step {self.last_good_step}); lower training.lr or check the data",
                     step=step, best_step=self.best_step)
        self._record(d)
        return d

    def observe_eval(self, step: int, eval_loss: float) -> Decision:
        """Record an eval, refit the curve and decide."""
        if not math.isfinite(eval_loss):
            d = Decision(True, "nonfinite", f"eval loss is {eval_loss} at step {step}; stopping. Keep the last "
                         f"good state (step {self.last_good_step})", step=step, best_step=self.best_step)
            return self._record(d)
        while self.evals and self.evals[-1][0] >= step:  # re-evaluated after a resume: newest wins
            self.evals.pop()
        fitted = self.stop_decision is None  # after a stop the cooldown bends the curve: keep, don't fit
        self.evals.append([int(step), float(eval_loss), fitted])
        if self.stop_decision is not None:
            s = self.stop_decision
            return self._record(Decision(True, "stopped", f"already stopping ({s['reason']}) since step "
                                         f"{s['step']}; eval at step {step} recorded, not fitted", step=step,
                                         best_step=self.best_step))
        self._update_patience(eval_loss, step)
        d = self._decide(step)
        if d.stop and d.reason in ("marginal_gain", "patience") and not (self.cfg.enabled and self.plan.evals.stop_rule):
            why = "stopping.enabled=false" if not self.cfg.enabled else \
                "the plan's evals are too small for the stop rule (plan.evals.stop_rule=false)"
            d = dataclasses.replace(d, stop=False, reason="disabled",
                                    detail=f"{why}; the rule would stop ({d.reason}): {d.detail}")
        return self._record(d)

    def _update_patience(self, loss: float, step: int) -> None:
        """Count evals in a row that rise clearly above the best level so far. The reference is the
        minimum of the median-of-3 smoothed history (the raw minimum sits ~2-3σ below the plateau,
        so comparing with it fires on noise); 'clearly' is PATIENCE_SIGMAS noise σ. Measured with
        patience 3: pure noise over 100 evals fires in 1 of 300 runs; a rise of 0.3σ per eval is
        caught after a median 16 evals (90th percentile 22). Inactive below PATIENCE_MIN_EVALS."""
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
        lo = max(1, self.warmup)
        window = np.array([e[1] for e in self.evals if e[2] and e[0] >= lo])
        if len(window) < PATIENCE_MIN_EVALS:
            self.rising, self._rise_ref, self._rise_delta = 0, None, None
            return
        ref = float(smooth(window[:-1]).min())
        # σ from the recent evals only: the steep start's curvature would inflate it for the whole run.
        delta = max(PATIENCE_SIGMAS * noise_sigma(window[-PATIENCE_NOISE_WINDOW:]), 1e-4 * abs(ref))
        self.rising = self.rising + 1 if loss > ref + delta else 0
        self._rise_ref, self._rise_delta = ref, delta

    def _decide(self, step: int) -> Decision:
        cfg = self.cfg
        common = dict(step=step, best_step=self.best_step)
        below, self.below = self.below, 0  # any guard that fires breaks the run of below-threshold evals
        if self.rising >= cfg.patience:
            return Decision(True, "patience", f"eval loss stayed more than {self._rise_delta:.2g} above the "
                            f"best smoothed level {self._rise_ref:.4g} for {self.rising} evals in a row: "
                            f"overfitting (best eval {self.best_loss:.4g} at step {self.best_step})",
                            cooldown_steps=self.cooldown_for(step), **common)
        pts = [(s, l) for s, l, f in self.evals if f and s >= max(1, self.warmup)]
        n_evals = sum(1 for e in self.evals if e[2])
        recent = [p for p in pts if p[0] >= FIT_WINDOW * step]
        pts = recent if len(recent) >= FIT_WINDOW_POINTS else pts[-FIT_WINDOW_POINTS:]
        if n_evals < cfg.min_evals or len(pts) < MIN_RULE_POINTS:
            return Decision(False, "min_evals", f"{n_evals} evals, {len(pts)} to fit after warmup; the rule needs "
                            f"{cfg.min_evals} evals and {MIN_RULE_POINTS} fitted points", **common)
        span = step / pts[0][0]
        if span < MIN_SPAN:
            return Decision(False, "min_span", f"the fitted evals span steps {pts[0][0]}-{step} ({span:.1f}×); "
                            f"the rule needs {MIN_SPAN:g}× to tell a power law from a plateau", **common)
        eff = self._eff  # fit and extrapolate in effective steps: repeated data is worth less (quality.py)
        fit = fit_power_law([eff(p[0]) for p in pts], [p[1] for p in pts])
        if fit is None:
            return Decision(False, "poor_fit", "no fit", **common)
        F, T = self._flops_per_step(), self._horizon(step)
        cooldown = self.cooldown_for(step)
        t_end = step + cooldown
        curve_q = fit.params()
        pred = fit.loss(eff(T))
        low, high = curve_q.interval(eff(T))
        if cfg.loss_per_flop is not None:
            slope = fit.slope(eff(step)) * quality.marginal_value(step * self.tokens_per_step, self.unique)
            gain, lam = slope / F, float(cfg.loss_per_flop)
            source = "stopping.loss_per_flop vs the slope now"
        elif T > t_end:  # the average gain per FLOP of training on from the stop's end to the budget's end
            rest = (T - t_end) * F
            # what the rest would buy, at the fit's upper confidence bound: a stop needs evidence that it is small
            g = fit.loss(eff(t_end)) - pred
            bound = g + self.z * curve_q.sd(eff(t_end), eff(T))
            gain, lam = bound / rest, cfg.min_budget_gain * pred / rest
            source = (f"ε={cfg.min_budget_gain:g} of the predicted loss over the {T - t_end:.0f} steps after "
                      f"the cooldown; the gain at the fit's {cfg.confidence:.0%} upper bound ({g:.3g} fitted)")
        else:  # the cooldown would reach the budget's end: nothing to compare (end_of_budget below)
            gain = lam = None
            source = ""
        nums = dict(fit=fit.to_dict(), threshold=lam, marginal_gain=gain, predicted_final_loss=pred,
                    predicted_interval=[low, high], horizon_step=T, **common)
        curve = f"L = {fit.a:.4g} + {fit.b:.4g}·t_eff^-{fit.c:.3g} (R² {fit.r2:.3f})"
        tail_limit = max(2 * fit.noise / math.sqrt(TAIL), 1e-4 * abs(fit.loss(fit.t_last)))
        noise = noise_sigma(np.array([p[1] for p in pts]))
        if fit.r2 < cfg.min_r2 and fit.rmse > LOF_SIGMAS * noise:
            return Decision(False, "poor_fit", f"{curve}: R² below stopping.min_r2={cfg.min_r2:g} and RMS "
                            f"residual {fit.rmse:.3g} above {LOF_SIGMAS:g}× the eval noise {noise:.3g}", **nums)
        if fit.tail_residual < -tail_limit:
            return Decision(False, "poor_fit", f"{curve}: the last {TAIL} evals lie {-fit.tail_residual:.3g} "
                            f"below the fit (> {tail_limit:.2g}): falling faster than the law", **nums)
        drop = fit.loss(fit.t_first) - fit.loss(fit.t_last)
        if drop < FLAT_SIGMAS * noise and span < FLAT_SPAN:
            return Decision(False, "flat_fit", f"{curve}: the fitted drop {drop:.3g} across steps {pts[0][0]}-"
                            f"{step} (noise σ {noise:.3g}) leaves the evals mostly noise over only {span:.1f}×: "
                            f"a plateau and a floor look alike until {FLAT_SPAN:g}×", **nums)
        saved = T - t_end
        if saved <= 0:
            return Decision(False, "end_of_budget", f"{curve}: {T - step:.0f} steps left, cooldown "
                            f"{cooldown}: stopping now would save nothing", **nums)
        text = (f"{curve}; gain {gain:.3g} loss/FLOP vs threshold {lam:.3g} ({source}); predicted loss at "
                f"step {t_end} {fit.loss(eff(t_end)):.4g}, at step {T:.0f} {pred:.4g} (80 % interval "
                f"{low:.4g}–{high:.4g})")
        self.below = below + 1 if gain < lam else 0
        if self.below == 1:
            self.below_since = step
        if self.below >= CONFIRM_EVALS and step >= CONFIRM_SPAN * self.below_since:
            return Decision(True, "marginal_gain", f"stop: {text}; cooldown {cooldown} steps, saves "
                            f"~{saved:.0f} steps", cooldown_steps=cooldown, **nums)
        if self.below:
            return Decision(False, "confirming", f"below the threshold at {self.below} evals in a row since step "
                            f"{self.below_since}; a stop needs {CONFIRM_EVALS} and steps up to "
                            f"{math.ceil(CONFIRM_SPAN * self.below_since)}: {text}", **nums)
        return Decision(False, "continue", text, **nums)

    # ---------------------------------------------------------------- log, progress, state
    def _record(self, d: Decision) -> Decision:
        row = d.to_dict() | {"time": time.time(), "flops_used": self._flops_used()}
        self.decisions.append(row)
        if d.stop and self.stop_decision is None:
            self.stop_decision = row
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "governor.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return d

    def progress(self) -> dict:
        """What was used, and the fraction of what: of the budget when there is one, else of the plan's FLOPs
        (`fraction_of_plan`: with no budget there is no fraction of it). Hours are wall × ranks: GPU-hours on GPUs,
        process-hours on a CPU run."""
        flops_used = self._flops_used()
        wall = self.train_s + self.eval_s + self.selection_s
        hours = "process_hours_used" if self.plan.resources.on_cpu else "gpu_hours_used"
        out = {"step": self.steps, "flops_used": flops_used, "tokens_seen": self.tokens, "wall_s": wall,
               hours: wall * self.world_size / 3600.0}
        if self.budget is not None:
            out |= {"budget_kind": self.budget.kind, "budget_used": self._used(),
                    "fraction_of_budget": self._used() / self.budget.value}
        else:
            out |= {"planned_flops": self.planned_flops,
                    "fraction_of_plan": flops_used / self.planned_flops if self.planned_flops else 0.0}
        return out

    _STATE = ("steps", "tokens", "train_flops", "eval_flops", "selection_flops", "train_s", "eval_s", "selection_s",
              "step_cost_ema",
              "last_step_cost", "last_eval_cost", "evals", "best_loss", "best_step", "rising", "below",
              "last_good_step", "decisions", "stop_decision", "budget_hit", "below_since")

    def state_dict(self) -> dict:
        d = json.loads(json.dumps({k: getattr(self, k) for k in self._STATE}))  # a deep copy
        d["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss  # JSON has no inf
        return d

    def extended(self) -> None:
        """The run continues under a longer plan (`--extend`): a stop decided under the old horizon no longer
        holds; the eval history and the accounting carry on."""
        self.stop_decision, self.below, self.below_since, self.budget_hit = None, 0, 0, False

    def load_state_dict(self, d: dict) -> None:
        missing = [k for k in self._STATE if k not in d]
        if missing:
            raise UnitrainError(f"governor state is missing {missing}; the checkpoint is from another version")
        for k in self._STATE:
            setattr(self, k, json.loads(json.dumps(d[k])))
        self.best_loss = math.inf if self.best_loss is None else float(self.best_loss)

    # ---------------------------------------------------------------- report
    def prediction_report(self, final_step: int, final_eval_loss: float | None) -> dict:
        """Predicted vs achieved final eval loss: the plan's prediction (for the planned end), and the governor's
        refined ones — its first fit and its last — read at the step the run actually ended, with their 80 %
        intervals (curve uncertainty and one eval's noise) and whether the achieved loss fell inside."""
        p = self.plan.prediction
        k = p.cooldown_factor  # final evals come after the LR cooldown; the fitted curve is the constant-LR one

        def covered(lo, hi):
            return None if final_eval_loss is None or lo is None else bool(lo <= final_eval_loss <= hi)

        out = {"achieved": final_eval_loss, "final_step": final_step, "cooldown_factor": k,
               "plan": {"loss": p.loss, "low": p.low, "high": p.high, "source": p.source,
                        "planned_steps": self.max_steps, "covered": covered(p.low, p.high)}}
        fits = [d for d in self.decisions if d.get("fit") and d["reason"] != "stopped"]
        for name, d in (("refined_first", fits[0] if fits else None), ("refined_last", fits[-1] if fits else None)):
            if d is None:
                out[name] = None
                continue
            curve = CurveFit.from_dict(d["fit"]).params()
            t = self._eff(final_step)
            lo, hi = curve.interval(t)
            out[name] = {"at_step": d["step"], "loss": curve.loss(t) * k, "low": lo * k, "high": hi * k,
                         "covered": covered(lo * k, hi * k)}
        return out

    def store_curve(self, final_step: int, final_eval_loss: float | None, initial_loss: float | None) -> None:
        """The run's learning curve for later plans on the same model, method, learning rate and data: one fit
        over every eval before the stop, in effective steps (calibration store, kind "curve")."""
        from unitrain.plan import calibrate

        key = self.plan.prediction.key
        pts = [(s, l) for s, l, f in self.evals if f and s >= max(1, self.warmup)]
        if not key or "|?" in key or len(pts) < MIN_RULE_POINTS or final_eval_loss is None:
            return
        fit = fit_power_law([self._eff(s) for s, _ in pts], [l for _, l in pts])
        if fit is None:
            return
        facts = quality.curve_facts(fit, self.tokens_per_step, self.unique, final_step, final_eval_loss,
                                    initial_loss)
        calibrate.record(key, {}, {}, str(self.run_dir or ""), kind="curve", facts=facts)

    def finalize(self, final_step: int, final_eval_loss: float | None, initial_loss: float | None = None) -> dict:
        """Budget used vs given, predicted vs achieved loss, compute saved; writes governor.json/.png."""
        fitted = [d for d in self.decisions if d.get("fit")]
        last = fitted[-1] if fitted else None
        if self.stop_decision and self.stop_decision.get("fit"):
            last = self.stop_decision
        T = last["horizon_step"] if last else float(self.max_steps)
        F = self._flops_per_step()
        used_flops, prog = self._flops_used(), self.progress()
        hours = "process_hours_used" if "process_hours_used" in prog else "gpu_hours_used"
        of = ({"fraction_of_budget": prog["fraction_of_budget"]} if self.budget is not None else
              {"planned_flops": prog["planned_flops"], "fraction_of_plan": prog["fraction_of_plan"]})
        report = {
            "budget": asdict(self.budget) if self.budget else None,
            "used": {"flops": used_flops, "train_flops": self.train_flops, "eval_flops": self.eval_flops,
                     "selection_flops": self.selection_flops, "tokens": self.tokens,
                     hours.removesuffix("_used"): prog[hours], "wall_s": prog["wall_s"], "steps": self.steps},
            **of,
            "planned_steps": self.max_steps, "final_step": final_step,
            "stop": {k: self.stop_decision[k] for k in ("step", "reason", "detail")} if self.stop_decision
            else None,
            "achieved_loss": final_eval_loss,
            "predicted_loss_full_budget": last["predicted_final_loss"] if last else None,
            "horizon_step": T,
            "fit": last["fit"] if last else None,
            "prediction": self.prediction_report(final_step, final_eval_loss),
            "compute_saved": {"steps": max(0.0, T - final_step), "flops": max(0.0, T - final_step) * F,
                              "fraction": max(0.0, 1.0 - prog.get("fraction_of_budget", prog.get("fraction_of_plan",
                                                                                                       0.0)))},
            "warnings": self.warnings,
        }
        if self.run_dir is None:
            return report
        self.store_curve(final_step, final_eval_loss, initial_loss)
        try:
            from unitrain.train.report_plot import plot_governor

            report["plot"] = str(plot_governor(self.run_dir / "governor.png", self.evals, self.decisions, report,
                                                self._eff))
        except Exception as e:  # a missing plot must never cost the run its report
            self._warn(f"could not draw governor.png: {e}")
        out = {"report": report, "decisions": self.decisions, "evals": self.evals,
               "stopping": asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else dict(self.cfg)}
        (self.run_dir / "governor.json").write_text(json.dumps(out, indent=2))
        return report
