"""The quality model (unitrain/plan/quality.py) and the decisions the planner makes with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unitrain.plan import DataStats, calibrate, make_plan, quality
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_budget, parse_memory
from unitrain.train.curve_fit import fit_power_law


def test_effective_tokens_follow_data_constrained_scaling():
    U = 1000.0
    assert quality.effective_tokens(500, U) == 500 and quality.effective_tokens(U, U) == U  # fresh data
    four = quality.effective_tokens(4 * U, U) / U
    sixteen = quality.effective_tokens(16 * U, U) / U
    assert 3.6 < four < 3.8 and 10.4 < sixteen < 10.8  # Muennighoff et al.: ~4 epochs nearly fresh, 16 much less
    assert quality.effective_tokens(1e6 * U, U) / U == pytest.approx(1 + quality.R_STAR, rel=1e-6)  # saturates
    assert quality.marginal_value(0.5 * U, U) == 1.0 and quality.marginal_value(5 * U, U) < 0.8


def test_the_delta_method_interval_covers_a_noisy_curve_about_as_often_as_it_says():
    """80 % intervals from the fit's covariance, on synthetic curves with known noise: the extrapolated
    loss at 2× the last eval falls inside roughly 80 % of the time (neither 30 % nor 100 %)."""
    inside, n = 0, 200
    for seed in range(n):
        rng = np.random.default_rng(seed)
        t = np.arange(10, 210, 10, dtype=float)
        truth = lambda x: 2.0 + 3.0 * x ** -0.5  # noqa: E731
        y = truth(t) + rng.normal(0, 0.02, len(t))
        fit = fit_power_law(t, y)
        lo, hi = fit.params().interval(400.0)
        inside += lo <= truth(400.0) + rng.normal(0, 0.02) <= hi
    assert 0.6 < inside / n < 0.97, inside / n


def _recipe(**training):
    return validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "org/ds", "max_length": 512},
                     "method": {"name": "lora"}, "training": {"global_batch_size": 8, **training}},
                    check_files=False)


def _spec(budget):
    a = lookup_accelerator("H100")
    return ResourceSpec(1, 1, a.memory, parse_memory("256GiB"), a.name, a.peak_flops, a.mfu, parse_budget(budget))


def _stats(fp="data-1"):
    return DataStats(n_examples=2000, total_tokens=2000 * 400, n_sequences=1600, seq_len=512,
                     train_lengths=[500] * 1600, eval_lengths=[400] * 64, cleaned=True, fingerprint=fp)


def test_a_plan_without_a_measured_curve_says_the_level_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    p = make_plan(_recipe(), _spec("2e14"), data_stats=_stats())
    assert p.prediction.loss is None and p.prediction.source == "prior"
    assert p.prediction.effective_tokens == pytest.approx(p.data.train_tokens)  # one pass: D_eff = D
    assert p.prediction.key.startswith("curve|") and p.prediction.key.endswith("|data-1")
    from unitrain.plan.report import plan_summary_lines

    assert any("unknown until the first evals" in x for x in plan_summary_lines(p))


def test_a_stored_curve_gives_the_next_plan_a_prediction_with_its_interval(tmp_path, monkeypatch):
    """An earlier run on the same model, method, lr and data stored its curve: a later plan (another budget)
    predicts its final eval loss from it, with an 80 % interval; other data keeps the prior."""
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    first = make_plan(_recipe(), _spec("2e14"), data_stats=_stats())
    t = np.arange(2, 60, 2, dtype=float)
    fit = fit_power_law(t, 1.0 + 2.0 * t ** -0.4 + np.random.default_rng(0).normal(0, 0.01, len(t)))
    facts = quality.curve_facts(fit, first.length.tokens_per_step, first.data.subset_tokens, 60, 1.3, 2.9)
    calibrate.record(first.prediction.key, {}, {}, "runs/first", kind="curve", facts=facts)
    later = make_plan(_recipe(), _spec("5e14"), data_stats=_stats())
    p = later.prediction
    assert p.source == "runs/first" and p.low < p.loss < p.high and p.coverage == 0.8
    steps_eff = p.effective_tokens / first.length.tokens_per_step
    assert p.loss == pytest.approx(fit.loss(steps_eff) * facts["cooldown_factor"])
    assert later.data.train_tokens > first.data.train_tokens
    other = make_plan(_recipe(), _spec("5e14"), data_stats=_stats("data-2"))
    assert other.prediction.loss is None  # another data fingerprint: no curve
    other_lr = make_plan(_recipe(lr=1e-3), _spec("5e14"), data_stats=_stats())
    assert other_lr.prediction.loss is None  # another learning rate: another curve


def test_alternatives_are_chosen_by_predicted_outcome_not_list_order(tmp_path, monkeypatch):
    """`method.name: [full, lora]` under a FLOP budget: LoRA trains 1.5× the tokens of full fine-tuning for the same
    FLOPs (4Ψ vs 6Ψ per token), so with no measured curve the prior (equal learning per effective token) predicts
    the lower loss for LoRA; the rejected full plan says by how much fewer effective tokens. Without a budget the
    list order still decides (equal tokens)."""
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    r = validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "org/ds", "max_length": 512},
                  "method": {"name": ["full", "lora"]}, "training": {"global_batch_size": 8}}, check_files=False)
    p = make_plan(r, _spec("2e14"), data_stats=_stats())
    assert p.execution.method == "lora"
    why = next(x["reason"] for x in p.rejected if x["strategy"].startswith("full"))
    assert "fewer effective tokens" in why
    fixed = make_plan(validate({**r.to_dict(), "training": {**r.to_dict()["training"], "max_steps": 10}},
                               check_files=False), _spec("2e14"), data_stats=_stats())
    assert fixed.execution.method == "full"  # max_steps fixes the tokens: the list order breaks the tie
