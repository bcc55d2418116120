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


def test_the_store_records_lists_and_resets(tmp_path):
    path = tmp_path / "cal.json"
    e = calibrate.record("fp", {"activations": 100, "step_time": 2.0, "weights": 10},
                         {"activations": 110, "step_time": 3.0, "weights": 100}, "runs/a", path=path)
    assert e.factors == {"activations": 1.1, "step_time": 1.5}  # 10x is not a correction but a broken measurement
    assert calibrate.lookup("fp", path).factors == e.factors and calibrate.lookup("other", path) is None
    stored = json.loads(path.read_text())
    assert stored["version"] == calibrate.STORE_VERSION and stored["entries"]["fp"]["measured"]["weights"] == 100
    assert stored["entries"]["fp"]["source"] == "runs/a" and stored["entries"]["fp"]["kind"] == "run"
    calibrate.record("fp2", {"step_time": 1.0}, {"step_time": 1.2}, path=path, facts={"curve": {"a": 1.0}})
    assert [x.key for x in calibrate.entries(path)] == ["fp", "fp2"]
    assert calibrate.lookup("fp2", path).facts == {"curve": {"a": 1.0}}  # room for other measured facts
    assert calibrate.reset("fp", path) == 1 and calibrate.lookup("fp", path) is None
    assert calibrate.reset(None, path) == 1 and calibrate.entries(path) == []


def test_an_old_store_is_not_reused(tmp_path):
    """Version-1 stores divided ZeRO's gradient buffers by a prediction without them (an inflated factor)."""
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"fp": {"factors": {"gradients": 1.9}}}))
    assert calibrate.lookup("fp", path) is None


def test_later_plans_use_the_stored_factors_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    before = make_plan(_recipe(), _spec())
    assert before.calibration.factors == {} and before.calibration.key
    act = before.memory.component("activations")
    calibrate.record(before.calibration.key, {"activations": act.bytes, "step_time": before.compute.step_time_s},
                     {"activations": act.bytes * 1.2, "step_time": before.compute.step_time_s * 0.8}, "runs/first")
    after = make_plan(_recipe(), _spec())
    act2 = after.memory.component("activations")
    assert after.calibration.factors == {"activations": 1.2, "step_time": 0.8}
    assert after.calibration.source == "runs/first" and after.calibration.time > 0
    assert abs(act2.bytes / act.bytes - 1.2) < 1e-6 and act2.inputs["calibration_factor"] == 1.2
    assert abs(after.compute.step_time_s / before.compute.step_time_s - 0.8) < 1e-9
    assert after.memory.peak > before.memory.peak
    # what the next measurement is divided by is the model's own prediction, not the corrected one
    assert after.calibration.model == before.calibration.model
    from unitrain.plan.report import plan_summary_lines

    line = next(x for x in plan_summary_lines(after) if x.startswith("calibration applied"))
    assert "activations ×1.2" in line and "runs/first" in line and "--reset" in line


def test_gradient_category_covers_zero_buffers():
    """Measured gradients include ZeRO's partitions, buckets and offload staging: so does the prediction they are
    divided by, and a gradients factor scales all of those components."""
    from unitrain.plan.schema import MemoryComponent

    comps = [MemoryComponent("gradients", 100, ""), MemoryComponent("comm_buffers", 30, ""),
             MemoryComponent("offload_staging", 5, ""), MemoryComponent("activations", 50, ""),
             MemoryComponent("logits_loss", 80, "", {"saved": 20})]
    pred = calibrate.predicted_categories(comps)
    assert pred["gradients"] == 135 and pred["activations"] == 70 and pred["weights"] == 0
    assert calibrate.component_scale({"gradients": 1.1}) == {n: 1.1 for n in calibrate.CATEGORIES["gradients"]}


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
    factors = calibrate.record(plan.calibration.key, plan.calibration.model, measured).factors
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
    assert after.calibration.factors == stored["factors"]  # the stored factors were applied
    assert after.calibration.source == str(r.run_dir.parent / "tiny-calibrate")
    if "step_time" in stored["factors"]:  # kept when within [0.25, 4] of the prediction (a sane measurement)
        assert after.compute.step_time_s == pytest.approx(before.compute.step_time_s * stored["factors"]["step_time"],
                                                          rel=1e-6)
    else:  # a machine fast or slow enough to leave the range is told so, and the plan keeps its own step time
        assert "step_time" in out and "not stored" in out
        assert after.compute.step_time_s == pytest.approx(before.compute.step_time_s, rel=1e-6)
    # measuring again divides by the model's own prediction again: the factors do not compound or oscillate
    assert main(["calibrate", str(path), "--steps", "5"]) == 0
    again = json.loads((r.run_dir.parent / "tiny-calibrate" / "calibration.json").read_text())
    assert again["predicted"] == stored["predicted"]
    assert again["factors"]["weights"] == stored["factors"]["weights"]
    assert main(["calibrate", "--list"]) == 0 and after.calibration.key in capsys.readouterr().out
    assert main(["calibrate", "--reset"]) == 0 and make_plan(r).calibration.factors == {}


def test_a_factor_outside_the_sane_range_is_shown_and_not_stored(tiny_recipe, capsys, monkeypatch):
    """A measurement far from the model (here: any step time not within 1 % of it) is printed with its ratio and
    the reason, and neither stored nor applied, so one odd machine does not skew later plans."""
    from unitrain.cli import main
    from unitrain.plan import calibrate, make_plan
    from unitrain.recipe import recipe_to_yaml

    monkeypatch.setattr(calibrate, "SANE_RANGE", (0.99, 1.01))  # CPU bytes are exact (1.000); step time is not
    r = tiny_recipe(**{"training.max_steps": 6})
    path = r.run_dir.parent / "r.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_to_yaml(r))
    assert main(["calibrate", str(path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "weights      measured / predicted = 1.000" in out
    assert "step_time" in out and "outside [0.99, 1.01], not stored" in out
    assert "step_time" not in make_plan(r).calibration.factors


def test_a_relaunch_after_calibration_executes_the_same_plan(tiny_recipe, monkeypatch):
    """Calibration written during the first launch changes the *next* plan, not a relaunch of this run: resume
    executes the stored plan.json, so the run continues under the plan its checkpoints were made with."""
    from conftest import sigterm_after
    from unitrain.plan.schema import Plan
    from unitrain.train.run import run_recipe

    r = tiny_recipe(**{"training.max_steps": 8, "output.save_every": 0})
    with monkeypatch.context() as m:
        sigterm_after(m, 5)  # past the calibration steps
        first = run_recipe(r)
    assert first.exit_code == 143 and (first.run_dir / "calibration.json").exists()
    stored = Plan.load(first.run_dir / "plan.json")
    assert stored.calibration.factors == {}
    assert make_plan(r).calibration.factors  # a fresh plan now would be calibrated (and so differ) ...
    resumed = run_recipe(r)
    assert resumed.exit_code == 0 and resumed.steps == stored.length.steps
    assert Plan.load(first.run_dir / "plan.json") == stored  # ... the relaunch executed the stored one
