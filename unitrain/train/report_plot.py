"""governor.png: the eval curve, the fitted learning curve, the stop point, and gain vs threshold.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and does not disturb a caller's own matplotlib state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unitrain.train.curve_fit import CurveFit


def plot_governor(path: str | Path, evals: list, decisions: list[dict], report: dict, eff=lambda t: t) -> Path:
    """Write the two-panel report figure to `path` and return it.

    evals: [step, loss, fitted] rows; decisions: Governor decision rows; report: Governor.finalize's dict.
    """
    path = Path(path)
    fig = Figure(figsize=(8, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})

    pts = np.array([[e[0], e[1]] for e in evals if e[2]], dtype=float).reshape(-1, 2)
    post = np.array([[e[0], e[1]] for e in evals if not e[2]], dtype=float).reshape(-1, 2)
    if len(pts):
        ax.plot(pts[:, 0], pts[:, 1], "o", ms=4, color="tab:blue", label="eval loss")
    if len(post):
        ax.plot(post[:, 0], post[:, 1], "s", ms=5, color="tab:purple", label="eval after stop (cooldown)")

    horizon = float(report.get("horizon_step") or (pts[:, 0].max() if len(pts) else 1))
    if report.get("fit"):
        fit = CurveFit.from_dict(report["fit"])  # in effective steps: `eff` maps a step to them
        last = float(report.get("stop", {}) and report["stop"].get("step") or (pts[:, 0].max() if len(pts) else 1))
        first = float(pts[:, 0].min()) if len(pts) else 1.0
        t_fit = np.linspace(max(first, 1.0), max(first, last), 200)
        ax.plot(t_fit, [fit.loss(eff(t)) for t in t_fit], "-", color="tab:orange",
                label=f"fit a + b·t_eff^-c: a={fit.a:.3g}, b={fit.b:.3g}, c={fit.c:.3g}, R²={fit.r2:.3f}")
        if horizon > last:
            t_ext = np.linspace(last, horizon, 100)
            ax.plot(t_ext, [fit.loss(eff(t)) for t in t_ext], "--", color="tab:orange", label="fit, extrapolated")
        if report.get("predicted_loss_full_budget") is not None:
            ax.plot([horizon], [report["predicted_loss_full_budget"]], "x", ms=9, mew=2, color="tab:orange",
                    label=f"predicted at full budget (step {horizon:.0f}): "
                          f"{report['predicted_loss_full_budget']:.4g}")

    stop = report.get("stop")
    if stop and stop.get("step") is not None:
        for a in (ax, ax2):
            a.axvline(stop["step"], color="tab:red", ls=":", lw=1.5)
        ax.plot([], [], ":", color="tab:red", label=f"stop at step {stop['step']} ({stop['reason']})")
    if report.get("achieved_loss") is not None:
        ax.plot([report["final_step"]], [report["achieved_loss"]], "*", ms=13, color="tab:green",
                label=f"final eval (step {report['final_step']}): {report['achieved_loss']:.4g}")
    ax.set_ylabel("eval loss")
    saved = report.get("compute_saved", {}).get("fraction")
    ax.set_title("budget governor" + (f" — {100 * saved:.0f}% of the budget saved" if saved else ""))
    if ax.get_legend_handles_labels()[0]:  # a run with no eval has nothing to label
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)

    rows = [d for d in decisions if d.get("marginal_gain") is not None and d.get("step") is not None]
    if rows:
        steps = [d["step"] for d in rows]
        ax2.semilogy(steps, [max(d["marginal_gain"], 1e-300) for d in rows], "o-", ms=3, color="tab:blue",
                     label="marginal gain (loss/FLOP)")
        thr = [(d["step"], d["threshold"]) for d in rows if d.get("threshold")]
        if thr:
            ax2.semilogy(*zip(*thr), "--", color="tab:red", label="threshold λ")
        ax2.legend(fontsize=7, loc="upper right")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("loss per FLOP")
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
