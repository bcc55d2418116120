"""Calibration: stored per fingerprint, used by later plans, applied to existing plans."""

from __future__ import annotations

import json

import pytest

from unitrain.plan import calibrate, make_plan
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_memory


def _recipe():
    return validate({"model": {"name": "meta-llama/Llama-3.2-1B"}, "data": {"train": "org/ds", "max_length": 1024},
                     "method": {"name": "lora"}, "training": {"global_batch_size": 8, "micro_batch_size": 2,
                                                              "gradient_checkpointing": "off"}}, check_files=False)


def _spec():
    a = lookup_accelerator("H100")
    return ResourceSpec(1, 1, a.memory, parse_memory("256GiB"), a.name, a.peak_flops, a.mfu)


def test_record_and_load_factors(tmp_path):
    path = tmp_path / "cal.json"
    f = calibrate.record_calibration("fp", {"activations": 100, "step_time": 2.0, "weights": 10},
                                     {"activations": 110, "step_time": 3.0, "weights": 100}, path)
    assert f == {"activations": 1.1, "step_time": 1.5}  # 10x is not a correction but a broken measurement
    assert calibrate.factors_for("fp", path) == f
    assert calibrate.factors_for("other", path) == {}
    assert json.loads(path.read_text())["fp"]["measured"]["weights"] == 100


def test_later_plans_use_the_stored_factors(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    before = make_plan(_recipe(), _spec())
    assert before.calibration is None and before.calibration_key
    act = next(c for c in before.memory if c.name == "activations")
    calibrate.record_calibration(before.calibration_key, {"activations": act.bytes, "step_time": before.step_time_s},
                                 {"activations": act.bytes * 1.2, "step_time": before.step_time_s * 0.8})
    after = make_plan(_recipe(), _spec())
    act2 = next(c for c in after.memory if c.name == "activations")
    assert after.calibration == {"activations": 1.2, "step_time": 0.8}
    assert abs(act2.bytes / act.bytes - 1.2) < 1e-6 and act2.inputs["calibration_factor"] == 1.2
    assert abs(after.step_time_s / before.step_time_s - 0.8) < 1e-9
    assert after.peak_memory > before.peak_memory


def test_apply_calibration_rescales_an_existing_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    plan = make_plan(_recipe(), _spec())
    peak, t = plan.peak_memory, plan.step_time_s
    calibrate.apply_calibration(plan, {"peak": 1.1, "step_time": 2.0})
    assert plan.peak_memory == int(peak * 1.1) and plan.step_time_s == 2 * t
    calibrate.apply_calibration(plan, {"peak": 1.1})  # applied once only
    assert plan.peak_memory == int(peak * 1.1)


def test_cpu_measurement_calibrates_to_one(tmp_path, monkeypatch):
    """A real CPU step measured with measure_cpu_memory agrees with the plan: every stored factor is ~1."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    r = validate({"model": {"config": cfg, "tokenizer": "x"}, "data": {"train": "org/ds", "max_length": 32},
                  "method": {"name": "full"}, "training": {"global_batch_size": 2, "micro_batch_size": 2,
                                                           "gradient_checkpointing": "off"}}, check_files=False)
    plan = make_plan(r, ResourceSpec(0, 1, 8 * 2**30, 8 * 2**30, "CPU", 50e9, 0.5))
    c = dict(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c), attn_implementation="sdpa")
    model.train()
    ids = torch.randint(0, 1000, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    measured = calibrate.measure_cpu_memory(model, {"input_ids": ids, "labels": ids}, optimizer=opt)
    measured = {k: v for k, v in measured.items() if k in ("weights", "gradients", "optimizer", "activations")} | \
        {"weights": measured["parameters"]}
    factors = calibrate.record_calibration(plan.calibration_key, calibrate.predicted_from_plan(plan), measured)
    assert set(factors) == {"weights", "gradients", "optimizer", "activations"}
    assert all(abs(f - 1) < 0.001 for f in factors.values()), factors


def test_a_run_records_calibration_and_the_next_plan_uses_it(tiny_recipe, capsys):
    """`unitrain calibrate` measures real steps; the factors land in the store and scale the next plan."""
    import json

    from unitrain.cli import main
    from unitrain.plan import make_plan
    from unitrain.recipe import recipe_to_yaml

    r = tiny_recipe(**{"training.max_steps": 6})
    before = make_plan(r)
    path = r.run_dir.parent / "r.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_to_yaml(r))
    assert main(["calibrate", str(path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "step_time" in out and "measured / predicted" in out
    stored = json.loads((r.run_dir.parent / "tiny-calibrate" / "calibration.json").read_text())
    assert stored["measured"]["step_time"] > 0
    assert set(stored["factors"]) >= {"weights", "activations"}
    assert stored["factors"]["weights"] == pytest.approx(1.0, abs=0.01)  # CPU accounting is exact
    after = make_plan(r)
    assert after.calibration  # the stored factors were applied
    if "step_time" in stored["factors"]:  # kept when within [0.25, 4] of the prediction (a sane measurement)
        assert after.step_time_s == pytest.approx(before.step_time_s * stored["factors"]["step_time"], rel=0.05)
