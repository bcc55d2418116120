"""The trainer end to end on CPU: a tiny Llama trains, resumes exactly, survives SIGTERM, exports and reloads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unitrain.errors import CheckpointError, UnitrainError
from unitrain.train import checkpoint as ckpt
from unitrain.train.run import run_recipe
from unitrain.train.track import read_metrics

from conftest import sigterm_after

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_tiny_full_run_learns_and_writes_the_run_directory(tiny_recipe):
    r = tiny_recipe(**{"training.max_steps": 8})
    res = run_recipe(r)
    run = res.run_dir
    assert res.exit_code == 0 and res.steps == 8 and res.stop_reason == "completed"
    assert res.final_eval_loss < res.initial_eval_loss - 0.5  # a fresh model learns token statistics fast
    for name in ("recipe.yaml", "plan.json", "metrics.jsonl", "summary.json", "final/config.json",
                 "final/tokenizer_config.json"):
        assert (run / name).exists(), name
    losses = _losses(run)
    assert list(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert [s for s, _ in ckpt.list_complete(run / "checkpoints")] == [6, 8]  # keep_last=2, save_every=2
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny_recipe, monkeypatch, method):
    kw = {"method.name": method, "training.max_steps": 7, "output.save_every": 0, "method.lora.dropout": 0.1}
    ref = run_recipe(tiny_recipe(name="ref", **kw))
    with monkeypatch.context() as m:
        sigterm_after(m, 3)
        first = run_recipe(tiny_recipe(name="cut", **kw))
    assert first.exit_code == 143 and first.stop_reason == "sigterm" and first.steps == 3
    assert not (first.run_dir / "final").exists()
    resumed = run_recipe(tiny_recipe(name="cut", **kw))
    assert resumed.exit_code == 0 and resumed.steps == 7
    assert _losses(resumed.run_dir) == _losses(ref.run_dir)  # bitwise on CPU
    assert resumed.final_eval_loss == ref.final_eval_loss


def test_sigterm_in_a_real_process_saves_and_exits_cleanly(tiny_recipe, tmp_path):
    r = tiny_recipe(**{"training.max_steps": 200, "output.save_every": 0})
    recipe_file = tmp_path / "r.yaml"
    from unitrain.recipe import recipe_to_yaml

    recipe_file.write_text(recipe_to_yaml(r))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unitrain", "run", str(recipe_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = r.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM: saved checkpoint" in out and "Traceback" not in out
    done = ckpt.list_complete(r.run_dir / "checkpoints")
    assert done and done[-1][0] >= 2


def test_export_reloads_with_identical_logits(tiny_recipe):
    from peft import PeftModel

    r = tiny_recipe(**{"method.name": "lora", "training.max_steps": 3, "training.lr": 5e-2})
    res = run_recipe(r)
    final = res.run_dir / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    # rebuild the base exactly as the run did (same config + seed), then load the adapter
    from unitrain.model import load_model
    from unitrain.plan.schema import Plan

    plan = Plan.load(res.run_dir / "plan.json")
    base = load_model(r.model, plan.execution, r.training.seed)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    state = ckpt.list_complete(res.run_dir / "checkpoints")[-1][1]
    from safetensors.torch import load_file

    trained = load_file(str(state / "trainable.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # the adapter did move
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    fresh = PeftModel.from_pretrained(load_model(r.model, plan.execution, r.training.seed), final).eval()
    with torch.no_grad():
        a, b = reloaded(ids).logits, fresh(ids).logits
        plain = load_model(r.model, plan.execution, r.training.seed).eval()(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)  # the adapter changes the outputs


def test_full_export_is_a_plain_hf_model(tiny_recipe):
    from transformers import AutoModelForCausalLM

    res = run_recipe(tiny_recipe(**{"training.max_steps": 2}))
    m = AutoModelForCausalLM.from_pretrained(res.run_dir / "final")
    assert m.config.num_hidden_layers == 2


def test_partial_checkpoint_is_set_aside(tiny_recipe):
    """A damaged newest checkpoint falls back to the older one: tests/test_checkpoint.py."""
    r = tiny_recipe(**{"training.max_steps": 4})
    res = run_recipe(r)
    ckdir = res.run_dir / "checkpoints"
    shutil.copytree(ckdir / "step-4", ckdir / "step-9")
    (ckdir / "step-9" / ckpt.MARKER).unlink()  # a crash mid-write looks like this at worst
    assert ckpt.find_resume(ckdir, "auto") == ckdir / "step-4"
    assert not (ckdir / "step-9").exists() and len(list(ckdir.glob("step-9.incomplete-*"))) == 1


def test_fresh_run_never_lands_on_existing_checkpoints(tiny_recipe):
    run_recipe(tiny_recipe(**{"training.max_steps": 2}))
    with pytest.raises(UnitrainError, match="already holds checkpoints"):
        run_recipe(tiny_recipe(**{"training.max_steps": 2, "output.resume": "never"}))


def test_unwritable_output_folder(tiny_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UnitrainError, match="not writable"):
        run_recipe(tiny_recipe(**{"output.dir": str(blocker / "sub")}))


def test_gradient_accumulation_matches_one_big_batch(tiny_recipe):
    a = run_recipe(tiny_recipe(name="acc", **{"training.micro_batch_size": 1, "training.max_steps": 3}))
    b = run_recipe(tiny_recipe(name="big", **{"training.micro_batch_size": 4, "training.max_steps": 3}))
    la, lb = _losses(a.run_dir), _losses(b.run_dir)
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-4)


@pytest.mark.parametrize("world, n", [(1, None), (2, None), (3, None), (2, 5)])
def test_eval_cost_is_the_slots_the_model_forwards(world, n):
    """The plan charges an eval by forwarded_slots: every batch trimmed to its longest sequence, and the
    padding forwards that keep ranks in step, summed over ranks — exactly what the model sees."""
    from unitrain.data.pack import _to_arrays
    from unitrain.plan.allocate import forwarded_slots
    from unitrain.train.evaluate import eval_loss

    lengths = [5, 9, 3, 12, 7, 2, 11]
    seqs = _to_arrays([(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths], 16, 0)

    class Counting(torch.nn.Module):
        seen = 0
        device = torch.device("cpu")

        def forward(self, input_ids, labels, num_items_in_batch):
            Counting.seen += input_ids.numel()
            return type("Out", (), {"loss": torch.tensor(1.0)})

    for rank in range(world):
        eval_loss(Counting(), seqs, 2, n, rank=rank, world=world)
    assert Counting.seen == forwarded_slots(seqs.lengths, 2, len(lengths) if n is None else n, world)
    assert forwarded_slots(seqs.lengths, 2, 7, 1) == 2 * 9 + 2 * 12 + 2 * 7 + 11


@pytest.mark.slow
def test_lora_run_with_kernels_on_follows_the_reference_run(tiny_recipe, monkeypatch, capsys):
    """`training.kernels: on` through the whole trainer (Triton interpreter, fp32, LoRA dropout 0.05): the plan lists
    the fused LoRA linear, the patcher reports it active on every adapter layer, and the losses follow the
    kernels-off run — the same dropout masks, so patching must not move the RNG."""
    pytest.importorskip("triton")
    from unitrain.train.run import run_recipe
    from unitrain.train.track import read_metrics

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    losses = {}
    for mode in ("off", "on"):
        r = tiny_recipe(name=f"k-{mode}", **{"method.name": "lora", "training.kernels": mode,
                                              "training.max_steps": 4, "training.eval_every": 0, "training.lr": 1e-2})
        res = run_recipe(r)
        losses[mode] = [m["loss"] for m in read_metrics(res.run_dir) if "loss" in m]
        kernels = json.loads((res.run_dir / "plan.json").read_text())["execution"]["kernels"]
        assert ("lora" in kernels) == (mode == "on")
    out = capsys.readouterr().out
    assert "lora: active on 14" in out  # 7 linear layers × 2 decoder layers
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4) and losses["on"][-1] < losses["on"][0]


@pytest.mark.parametrize("select", [False, True])
def test_the_plans_data_decision_is_what_the_run_executes(tiny_recipe, select):
    """One data decision: plan.json's DataPlan (policy, subset tokens) is what selection.json reports the run did —
    with data.select=false every clean example; with selection on, the selector fills the plan's tokens."""
    from unitrain.plan.schema import Plan

    r = tiny_recipe(name=f"sel-{select}", **{"data.select": select, "data.select_encoder": None,
                                             "data.max_length": 256, "training.max_steps": 2})
    res = run_recipe(r)
    plan = Plan.load(res.run_dir / "plan.json")
    done = json.loads((res.run_dir / "selection.json").read_text())
    assert plan.data.scanned and plan.data.cleaned
    if not select:
        assert plan.data.policy == done["policy"] == "all"
        assert done["tokens_kept"] == plan.data.subset_tokens == plan.data.unique_tokens
    else:
        assert plan.data.policy == "select" and done["policy"].startswith("select")
        assert plan.data.subset_tokens == plan.data.train_tokens < plan.data.unique_tokens
        # filled to within one example of the plan's tokens (whole examples only)
        assert abs(done["tokens_kept"] - plan.data.subset_tokens) <= 256


def test_a_relaunch_refuses_changed_math_and_keeps_the_run_directory(tiny_recipe, monkeypatch):
    """Resume executes the stored plan: a changed key that changes what is trained is refused with the list of
    changes and the two ways on, and the refused launch writes nothing (recipe.yaml and plan.json stay as they
    were); keys that do not change the math may change; --replan plans again."""
    kw = {"training.max_steps": 6, "output.save_every": 0, "training.eval_every": 3}
    with monkeypatch.context() as m:
        sigterm_after(m, 2)
        first = run_recipe(tiny_recipe(**kw))
    assert first.exit_code == 143
    run = first.run_dir
    before = {f: (run / f).read_text() for f in ("recipe.yaml", "plan.json")}
    with pytest.raises(UnitrainError) as e:
        run_recipe(tiny_recipe(**{**kw, "training.lr": 1e-2, "training.global_batch_size": 8}))
    msg = str(e.value)
    assert "training.lr: 0.003 -> 0.01" in msg and "training.global_batch_size: 4 -> 8" in msg
    assert "name=" in msg and "restore" in msg
    assert {f: (run / f).read_text() for f in before} == before  # nothing written by the refused launch
    resumed = run_recipe(tiny_recipe(**{**kw, "training.eval_every": 2, "output.keep_last": 3}))
    assert resumed.exit_code == 0 and resumed.steps == 6
    from unitrain.plan.schema import Plan

    plan = Plan.load(run / "plan.json")
    assert plan.evals.every == 2 and plan.length == Plan.from_dict(json.loads(before["plan.json"])).length
    evals = [r["step"] for r in read_metrics(run) if "eval_loss" in r]
    assert evals == [0, 4]  # the new cadence after the resume at step 2 (the final eval is in the summary)


def test_replan_makes_a_new_plan_and_the_trainer_refuses_a_different_one(tiny_recipe, monkeypatch):
    with monkeypatch.context() as m:
        sigterm_after(m, 2)
        run_recipe(tiny_recipe(**{"training.max_steps": 6, "output.save_every": 0}))
    import unitrain.plan as P

    make = P.make_plan

    def longer(*a, **k):  # a new plan that differs in its length
        plan = make(*a, **k)
        return dataclasses.replace(plan, length=dataclasses.replace(plan.length, steps=9))

    monkeypatch.setattr(P, "make_plan", longer)
    with pytest.raises(CheckpointError, match="different plan"):
        run_recipe(tiny_recipe(**{"training.max_steps": 6, "output.save_every": 0}), replan=True)


def test_extend_continues_a_finished_run_from_before_its_cooldown_exactly(tiny_recipe):
    """WSD's cooldown takes the LR to 0, so a finished run is extended from the checkpoint saved as its cooldown
    began, under the longer plan: the losses equal those of a run planned that long from the start."""
    kw = {"data.select": False, "output.save_every": 0, "training.eval_every": 3}
    ref = run_recipe(tiny_recipe(name="long", **{**kw, "training.max_steps": 12}))
    short = run_recipe(tiny_recipe(name="ext", **{**kw, "training.max_steps": 8}))
    ck = short.run_dir / "checkpoints"
    pre = ckpt.pre_cooldown(ck)
    assert pre is not None and pre[0] == 8 - 2  # cooldown_ratio 0.2 of 8 steps: the LR decays from step 6
    with pytest.raises(UnitrainError, match="--extend"):  # without the flag a longer length is a changed key
        run_recipe(tiny_recipe(name="ext", **{**kw, "training.max_steps": 12}))
    ext = run_recipe(tiny_recipe(name="ext", **{**kw, "training.max_steps": 12}), extend=True)
    assert ext.exit_code == 0 and ext.steps == 12
    assert _losses(ext.run_dir) == _losses(ref.run_dir)  # bitwise on CPU
    assert ext.final_eval_loss == ref.final_eval_loss
    assert [p.name for p in ck.iterdir() if p.name.startswith("step-8.superseded")]  # the old end, kept aside
    plan = json.loads((ext.run_dir / "plan.json").read_text())
    assert plan["length"]["steps"] == 12 and any("extended: continues from pre-cooldown-step-6" in n
                                                 for n in plan["notes"])
