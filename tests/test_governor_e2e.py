"""The budget governor driving real training runs end to end (issue 5), on CPU in seconds.

A tiny Llama (vocabulary 64) learns a generated text of Zipf-distributed words with a word-level
tokenizer: its loss falls fast to the text's entropy and then flattens, the shape the marginal-gain
rule is for, and a step takes milliseconds. Checked: a FLOP or token budget is never exceeded by more
than one step; a flattened curve stops by 'marginal_gain', cools the LR down and writes the report,
plot and decision log; a non-finite loss stops at once and keeps the checkpoints written before it;
a budget too small for one step is an error before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unitrain.errors import UnitrainError
from unitrain.recipe import apply_overrides, validate
from unitrain.train import checkpoint as ckpt
from unitrain.train.loop import Trainer
from unitrain.train.run import run_recipe
from unitrain.train.track import read_metrics

N_WORDS = 48
SEQ, BATCH = 64, 4
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "vocab_size": 64, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """train.txt (800 paragraphs of Zipf-distributed words) and a word-level tokenizer in tok/."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("words")
    vocab = [f"w{i}" for i in range(N_WORDS)]
    p = 1.0 / np.arange(1, N_WORDS + 1)
    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(rng.choice(vocab, size=60, p=p / p.sum())) for _ in range(800))
    (d / "train.txt").write_text(text)
    ids = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *vocab])}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token="[UNK]").save_pretrained(d / "tok")
    return d


@pytest.fixture
def recipe(words, tmp_path):
    def make(**overrides):
        data = {
            "name": "gov",
            "model": {"config": dict(TINY), "tokenizer": str(words / "tok")},
            "data": {"train": str(words / "train.txt"), "format": "text", "eval_split": 24, "max_length": SEQ,
                     "select": False, "cache_dir": str(tmp_path / "tokenized")},  # all of it: no selector
            "method": {"name": "full"},
            "training": {"lr": 1e-2, "global_batch_size": BATCH, "micro_batch_size": BATCH, "eval_every": 2,
                         "gradient_checkpointing": "off", "kernels": "off"},
            "resources": {"gpus_per_node": 0},
            "output": {"dir": str(tmp_path / "runs"), "save_every": 0, "keep_last": 5},
            "tracking": {"progress": False},
        }
        return validate(apply_overrides(data, overrides))

    return make


def _flops_per_step(r) -> float:
    from unitrain.plan import make_plan

    return make_plan(r).compute.flops_per_step


def _governor(run_dir: Path) -> tuple[dict, list[dict]]:
    g = json.loads((run_dir / "governor.json").read_text())
    log = [json.loads(x) for x in (run_dir / "governor.jsonl").read_text().splitlines()]
    return g, log


# --------------------------------------------------------------------------- the budget


def test_flop_budget_sets_the_length_and_is_never_exceeded(recipe):
    F = _flops_per_step(recipe())
    budget = 30.5 * F  # 30 steps of training, less what the evals (step 0, every 2 steps, the end) cost
    res = run_recipe(recipe(**{"resources.budget": f"{budget:.6e}", "stopping.enabled": False,
                               "training.eval_max_batches": 1, "training.eval_budget_share": 0.4}))
    plan = json.loads((res.run_dir / "plan.json").read_text())
    steps = plan["length"]["steps"]
    g, log = _governor(res.run_dir)
    per_eval = plan["evals"]["flops"]
    assert g["report"]["used"]["eval_flops"] == pytest.approx(per_eval * (2 + (steps - 1) // 2))  # as planned
    assert 0 < per_eval < F / 2
    # the planner's length comes from the budget with the evals reserved: the last step that still fits
    assert steps * F + (2 + (steps - 1) // 2) * per_eval <= budget
    assert (steps + 1) * F + (2 + steps // 2) * per_eval > budget
    assert steps < 30 and any("− evals" in n for n in plan["notes"])
    assert plan["budget"]["split"]["evals"] == pytest.approx(plan["evals"]["count"] * per_eval)
    assert plan["budget"]["split"]["evals"] <= 0.4 * budget  # within training.eval_budget_share
    # so the run trains every planned step: the governor's budget stop can only coincide with the planned end
    assert res.exit_code == 0 and res.steps == steps and res.stop_reason in ("budget", "completed")
    used = g["report"]["used"]["flops"]
    assert budget - F < used <= budget  # the budget spent, final eval included
    rows = [r for r in read_metrics(res.run_dir) if "flops_used" in r]
    flops = [r["flops_used"] for r in rows]
    assert flops == sorted(flops) and flops[-1] <= budget + F
    assert rows[-1]["fraction_of_budget"] == pytest.approx(flops[-1] / budget, rel=1e-6)
    assert all(r["budget_kind"] == "flops" for r in rows if "budget_kind" in r)
    assert g["report"]["budget"] == {"kind": "flops", "value": pytest.approx(budget, rel=1e-6)}
    if res.stop_reason == "budget":
        assert any(d["reason"] == "budget" for d in log)
    assert (res.run_dir / "final" / "config.json").exists()  # a budget stop still saves and exports


def test_token_budget_stops_a_longer_plan_within_one_step(recipe):
    budget = 5000  # 19.5 steps of 4 × 64 tokens; max_steps asks for 100
    res = run_recipe(recipe(**{"resources.budget": f"{budget} tokens", "training.max_steps": 100,
                               "stopping.enabled": False}))  # the rule would stop this flat curve first
    assert res.exit_code == 0 and res.stop_reason == "budget" and res.steps < 100
    g, log = _governor(res.run_dir)
    tokens = g["report"]["used"]["tokens"]
    assert budget - 2 * BATCH * SEQ < tokens <= budget + BATCH * SEQ
    assert [d["step"] for d in log if d["reason"] == "budget"] == [res.steps]
    last = [r for r in read_metrics(res.run_dir) if "tokens_seen" in r][-1]
    assert last["step"] == res.steps and last["tokens_seen"] == tokens and last.get("stop") == "budget"
    assert ckpt.list_complete(res.run_dir / "checkpoints")[-1][0] == res.steps


@pytest.mark.parametrize("budget", ["100 tokens", "1e3"])
def test_budget_smaller_than_one_step_is_an_error_before_training(recipe, budget):
    r = recipe(**{"resources.budget": budget})
    with pytest.raises(UnitrainError, match="too small for a single optimizer step"):
        run_recipe(r)
    assert not (r.run_dir / "metrics.jsonl").exists() and not (r.run_dir / "checkpoints").exists()


# --------------------------------------------------------------------------- the stop rule


def test_flattened_curve_stops_by_marginal_gain_with_cooldown_and_report(recipe):
    r = recipe(**{"resources.budget": "100k tokens"})  # 390 steps; the loss is flat long before
    res = run_recipe(r)
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["length"]["steps"] == 390
    assert res.exit_code == 0 and res.stop_reason == "marginal_gain"
    g, log = _governor(res.run_dir)
    stop = next(d for d in log if d["stop"])
    assert stop["reason"] == "marginal_gain" and stop["marginal_gain"] < stop["threshold"]
    assert {"a", "b", "c", "r2"} <= set(stop["fit"]) and stop["predicted_final_loss"] > 0
    assert stop["cooldown_steps"] > 0 and res.steps == stop["step"] + stop["cooldown_steps"]
    assert res.steps < 0.6 * plan["length"]["steps"]
    rows = {x["step"]: x for x in read_metrics(res.run_dir) if "lr" in x}
    cooldown = [rows[s]["lr"] for s in range(stop["step"] + 1, res.steps + 1)]
    assert rows[stop["step"]]["lr"] == pytest.approx(1e-2)  # stable phase of WSD at the stop, then linear decay
    assert cooldown == pytest.approx([1e-2 * (1 - k / len(cooldown)) for k in range(len(cooldown))])
    # the decisions before the stop: the rule waited for evals, then confirmed the stop at 2 evals in a row
    reasons = [d["reason"] for d in log]
    assert reasons[0] == "min_evals" and "confirming" in reasons
    rep = g["report"]
    assert rep["stop"]["reason"] == "marginal_gain" and rep["final_step"] == res.steps
    assert rep["compute_saved"]["fraction"] > 0.4 and rep["fraction_of_budget"] < 0.6
    assert rep["achieved_loss"] == pytest.approx(res.final_eval_loss)
    assert abs(rep["predicted_loss_full_budget"] - res.final_eval_loss) < 0.05 * res.final_eval_loss
    assert res.final_eval_loss < res.initial_eval_loss - 0.5
    png = res.run_dir / "governor.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert res.extra["governor"]["stop"]["step"] == stop["step"]
    assert (res.run_dir / "final" / "config.json").exists()


def test_disabled_rule_trains_on_and_logs_where_it_would_have_stopped(recipe):
    res = run_recipe(recipe(**{"resources.budget": "16k tokens", "stopping.enabled": False}))
    assert res.exit_code == 0 and res.stop_reason in ("completed", "budget") and res.steps >= 60
    g, log = _governor(res.run_dir)
    would = [d for d in log if d["reason"] == "disabled"]
    assert would and "marginal_gain" in would[0]["detail"] and would[0]["step"] < 50
    assert g["report"]["stop"] is None or g["report"]["stop"]["reason"] == "budget"


def test_too_few_evals_to_fit_warns(recipe):
    with pytest.warns(UserWarning, match="training.eval_every=5 gives 1 evals"):
        res = run_recipe(recipe(**{"training.max_steps": 6, "training.eval_every": 5}))
    assert res.stop_reason == "completed" and res.steps == 6


# --------------------------------------------------------------------------- a non-finite loss


def _poison_training_loss_from(step: int, monkeypatch) -> None:
    """Make the training loss NaN from optimizer step `step` on (its backward then writes NaN grads)."""
    original = Trainer.setup

    def setup(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        forward = trainer.backend.forward

        def poisoned(**kw):
            out = forward(**kw)
            if trainer.step + 1 >= step:  # trainer.step counts the steps done; this is the next one
                out.loss = out.loss * float("nan")
            return out

        trainer.backend.forward = poisoned

    monkeypatch.setattr(Trainer, "setup", setup)


def _assert_stopped_nonfinite_keeping(res, bad_step: int, kept: list[int], out: str) -> None:
    from safetensors.torch import load_file

    assert res.stop_reason == "nonfinite" and res.exit_code == 3 and res.steps == bad_step
    done = ckpt.list_complete(res.run_dir / "checkpoints")
    assert [s for s, _ in done] == kept  # nothing is written at or after the bad step
    weights = [p for p in done[-1][1].iterdir() if p.suffix == ".safetensors"]
    assert weights and all(bool(v.isfinite().all()) for p in weights for v in load_file(str(p)).values())
    assert not (res.run_dir / "final").exists()
    g, log = _governor(res.run_dir)  # the report and the decision log are written for a diverged run too
    assert g["report"]["stop"]["reason"] == "nonfinite" and g["report"]["stop"]["step"] == bad_step
    assert [d["step"] for d in log if d["reason"] == "nonfinite"] == [bad_step]
    assert res.extra["governor"]["stop"]["reason"] == "nonfinite"
    assert "non-finite" in out and f"{done[-1][1]} (step {kept[-1]})" in out  # says so, names the checkpoint


def test_nonfinite_training_loss_stops_and_keeps_the_checkpoints_before_it(recipe, monkeypatch, capsys):
    _poison_training_loss_from(5, monkeypatch)
    res = run_recipe(recipe(**{"training.max_steps": 20, "output.save_every": 2}))
    _assert_stopped_nonfinite_keeping(res, 5, [2, 4], capsys.readouterr().out)
    _, log = _governor(res.run_dir)
    assert "step 4" in next(d for d in log if d["reason"] == "nonfinite")["detail"]  # the last finite step
    rows = [x for x in read_metrics(res.run_dir) if x.get("step") == 5]
    assert len(rows) == 1 and rows[0]["stop"] == "nonfinite" and rows[0]["loss"] is None  # NaN is logged as null


def test_nonfinite_eval_loss_stops_at_once(recipe, monkeypatch, capsys):
    """An eval that returns NaN (at step 6, after the step-0, 2 and 4 evals) ends the run there: no more
    training steps, and the checkpoint due at step 6 is not written."""
    import unitrain.train.loop as loop

    calls = []

    def eval_loss(*args, **kw):
        total, count = real_eval_loss(*args, **kw)
        calls.append(1)
        return (float("nan") if len(calls) >= 4 else total), count

    real_eval_loss = loop.eval_loss
    monkeypatch.setattr(loop, "eval_loss", eval_loss)
    res = run_recipe(recipe(**{"training.max_steps": 20, "output.save_every": 2}))
    _assert_stopped_nonfinite_keeping(res, 6, [2, 4], capsys.readouterr().out)
    assert max(x["step"] for x in read_metrics(res.run_dir)) == 6
