"""`unitrain select` on 150 generated word problems (tests/synth.py): subset + report, determinism, every drop
explained, the run's path."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from unitrain.cli import main
from unitrain.recipe import recipe_to_yaml

import synth  # tests/synth.py

N_ROWS = 150  # generated GSM8K-like training rows; planted below: one exact and one near duplicate of short rows
FILTER_REASONS = {"missing_text", "invalid_utf8", "empty", "too_long", "truncated_answer"}
DUP_REASONS = {"exact_duplicate", "near_duplicate", "embedding_duplicate"}


@pytest.fixture
def slice_recipe(tmp_path, tiny_recipe):
    """A recipe file on 150 generated problems plus a copy of the shortest (case and spacing changed) and the
    second shortest with one word added; a fixed 16-row eval file, so every training row reaches the selector.
    -> (the two planted sources, make(**overrides) -> (Recipe, its yaml path))."""
    rows = synth.word_problems(N_ROWS, seed=0)
    a, b = sorted(rows, key=lambda r: len(r["question"] + r["answer"]))[:2]  # short: never too_long
    copy = {"question": "  " + a["question"].upper(), "answer": a["answer"].replace(" ", "  ")}
    near = {"question": b["question"], "answer": b["answer"].replace(" ", " so ", 1)}
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows + [copy, near]))
    synth.write_jsonl(held, synth.word_problems(16, seed=99))

    def make(**overrides):
        recipe = tiny_recipe(**{"data.train": str(train), "data.eval": str(held), "data.max_examples": None,
                                "data.max_length": 256, "data.select": True, "data.select_encoder": None,
                                **overrides})
        path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
        path.write_text(recipe_to_yaml(recipe))
        return recipe, path

    return (a, b), make


def _select(recipe_path, out, *args):
    assert main(["select", str(recipe_path), "--out", str(out), *args]) == 0
    subset = [json.loads(line) for line in out.open()]
    return subset, json.loads(out.with_suffix(".report.json").read_text())


def _explains_every_drop(subset: list[dict], report: dict) -> dict[int, dict]:
    """Each of the n records is kept once or dropped once with a reason; the counts add up."""
    assert len(report["kept"]) == len(subset)  # one entry per written row, in the file's order
    kept = [k["index"] for k in report["kept"]]
    dropped = {int(i): d for i, d in report["dropped"].items()}
    assert len(set(kept)) == len(kept) == report["n_kept"]
    assert not set(kept) & set(dropped)
    assert set(kept) | set(dropped) == set(range(report["n_records"]))
    assert dict(Counter(d["why"] for d in dropped.values())) == report["dropped_by_reason"]
    assert report["tokens_kept"] == sum(k["n_tokens"] for k in report["kept"])
    for d in dropped.values():
        assert d["why"] in FILTER_REASONS | DUP_REASONS | {"not_selected"}
        if d["why"] in DUP_REASONS:  # names the clean copy it repeats (kept, or later not selected) and the similarity
            assert d["of"] is not None and 0 < d["score"] <= 1
            assert dropped.get(d["of"], {"why": "kept"})["why"] in ("kept", "not_selected")
        if d["why"] == "too_long":  # the tokenizer cut it at max_length
            assert d["score"] == 256
    return dropped


def test_budgeted_select_is_deterministic_and_explains_every_drop(slice_recipe, tmp_path, capsys):
    _, make = slice_recipe
    recipe, path = make()
    a, rep_a = _select(path, tmp_path / "a.jsonl", "--budget", "8k tokens", "--encoder", "none")
    out = capsys.readouterr().out
    assert "select_clean_random" in out and str(tmp_path / "a.report.json") in out
    _, rep_b = _select(path, tmp_path / "b.jsonl", "--budget", "8k tokens", "--encoder", "none")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    for rep in (rep_a, rep_b):  # stage timings are measured, so they differ; everything else is identical
        rep["details"].pop("seconds")
    assert rep_a == rep_b
    assert rep_a["n_records"] == N_ROWS + 2 and rep_a["policy"] == "select_clean_random"
    assert rep_a["details"]["seed"] == recipe.training.seed and "epochs" not in rep_a
    dropped = _explains_every_drop(a, rep_a)
    why = Counter(d["why"] for d in dropped.values())
    assert why["exact_duplicate"] == 1 and why["too_long"] >= 1 and why["not_selected"] > N_ROWS / 3
    # a token budget counts real tokens: the planned steps carry at most 8k of them, and the subset holds those
    assert 0.5 * 8000 < rep_a["tokens_kept"] <= 8000 + 256
    other, rep_other = _select(path, tmp_path / "c.jsonl", "--budget", "8k tokens", "--encoder", "none",
                               "training.seed=1")
    assert rep_other["policy"] == "select_clean_random"
    assert other != a and {k["index"] for k in rep_other["kept"]} != {k["index"] for k in rep_a["kept"]}  # the seed
    # matters, it is not a constant


def test_budget_beyond_the_data_keeps_all_clean_data_and_repeats_it(slice_recipe, tmp_path):
    (a, b), make = slice_recipe
    _, path = make()
    subset, rep = _select(path, tmp_path / "all.jsonl", "--budget", "1M tokens", "--encoder", "none")
    assert rep["policy"] == "keep_all" and "covers the clean data" in rep["reason"]
    dropped = _explains_every_drop(subset, rep)
    assert {d["why"] for d in dropped.values()} <= FILTER_REASONS | DUP_REASONS  # nothing clean is left out
    by_index = {k["index"]: row for k, row in zip(rep["kept"], subset)}  # rows as read: the input's columns
    exact = [d for d in dropped.values() if d["why"] == "exact_duplicate"]
    near = [d for d in dropped.values() if d["why"] == "near_duplicate"]
    assert len(exact) == 1 and by_index[exact[0]["of"]]["question"] == a["question"]
    assert len(near) == 1 and by_index[near[0]["of"]]["question"] == b["question"]
    assert near[0]["on"] == "text" and 0.8 <= near[0]["score"] < 1


def test_run_path_picks_the_cli_subset_and_it_fits_the_plan(slice_recipe, tmp_path):
    """`unitrain run` (choose_subset) and `unitrain select` agree; unpacked sequences are mostly padding,
    so the subset is sized by the real tokens the planned steps carry, not by their slots."""
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.plan import make_plan
    from unitrain.train.run import choose_subset

    recipe, path = slice_recipe[1](**{"data.packing": False, "training.max_steps": 10})
    subset, rep = _select(path, tmp_path / "s.jsonl")  # no --encoder: the recipe's (null), as `run` uses
    assert rep["policy"] == "select_clean_random"
    tokenizer = M.load_tokenizer(recipe.model, recipe.base_dir)
    tok = pipeline.tokenize_data(recipe, tokenizer)
    cleaning = pipeline.clean(tok, recipe)
    plan = make_plan(recipe, data_stats=pipeline.data_stats(tok, recipe, tokenizer.pad_token_id, cleaning))
    keep, info = choose_subset(tok, cleaning, recipe, plan)
    assert keep == [k["index"] for k in rep["kept"]] and info["policy"] == rep["policy"]
    # Unpacked, the 10 planned steps reach 40 examples. The budget is in real tokens, so a random draw of
    # examples matches it to within an example or two; sized by slot tokens (10 × 4 × 256) it held ~55.
    steps_hold = plan.length.steps * plan.global_batch_size
    assert 0.85 * steps_hold <= len(keep) <= 1.1 * steps_hold


def test_the_subset_trains_as_data_train_as_it_is(tiny_recipe, tmp_path, capsys):
    """`unitrain select --out subset.jsonl` writes the input's own rows (builtin:skills: question/answer, not the
    internal prompt/response form), so `unitrain run RECIPE data.train=subset.jsonl` trains on them with no
    data.fields mapping; the held-out split it was carved from comes beside it, apart from the subset."""
    from unitrain.data.demo import generate
    from unitrain.plan.schema import Plan

    recipe = tiny_recipe(**{"data.select": True, "data.select_encoder": None, "training.max_steps": 2,
                            "training.eval_every": 0, "output.save_every": 0})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(recipe))
    out = tmp_path / "subset.jsonl"
    subset, rep = _select(path, out, "--budget", "1k tokens")
    assert 0 < len(subset) < recipe.data.max_examples - recipe.data.eval_split and rep["policy"] != "keep_all"
    source = {json.dumps(r, sort_keys=True) for r in generate("skills")}
    assert all(set(r) == {"question", "answer"} and json.dumps(r, sort_keys=True) in source for r in subset)
    held = [json.loads(line) for line in (tmp_path / "subset.eval.jsonl").open()]
    assert len(held) == recipe.data.eval_split and not {json.dumps(r) for r in held} & {json.dumps(r) for r in subset}
    printed = capsys.readouterr().out
    assert f"data.train={out} data.eval={tmp_path / 'subset.eval.jsonl'}" in printed  # the command to train on it

    assert main(["run", str(path), f"data.train={out}", f"data.eval={tmp_path / 'subset.eval.jsonl'}"]) == 0
    run_dir = recipe.run_dir
    plan = Plan.load(run_dir / "plan.json")
    assert plan.data.unique_examples == len(subset)  # exactly the subset's rows, every one clean
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
