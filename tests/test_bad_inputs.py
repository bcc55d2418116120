"""Every malformed or impossible input the issue-15 trial met gets a clear error naming the key and the fix (or, for bad
rows, `data.bad_rows: skip` with counts and line numbers) — and those that need the model's config, before any
weights are loaded and before anything is written into the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unitrain import preflight
from unitrain.cli import main
from unitrain.data.formats import detect_format
from unitrain.data.load import load_examples, load_rows
from unitrain.errors import UnitrainError, DataError, ModelError, RecipeError
from unitrain.recipe import ModelConfig, apply_overrides, load_recipe, parse_overrides, validate

from conftest import WORD_LLAMA, word_recipe_dict

GOOD = {"model": {"name": "some/model"}, "data": {"train": "some/hub-dataset"}}


@pytest.fixture
def recipe(word_corpus, tmp_path):
    def make(**overrides):
        return validate(apply_overrides(word_recipe_dict(word_corpus, tmp_path / "runs", "bad"), overrides))

    return make


@pytest.fixture
def word_tok(word_corpus):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(word_corpus / "tok")


def _qa(tmp_path: Path, rows: list, name="qa.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


ROWS = [{"question": f"w{i % 40} w{(i * 7) % 40}", "answer": f"w{(i * 3) % 40}"} for i in range(30)]


# ---------------------------------------------------------------- the recipe and its overrides
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    p = tmp_path / "r.yaml"
    p.write_text(OmegaConf.to_yaml(OmegaConf.create(GOOD)))
    with pytest.raises(RecipeError, match=r"training.lr: must be a finite number, got (nan|inf|-inf)"):
        load_recipe(p, [f"training.lr={value}"], check_files=False)
    with pytest.raises(RecipeError, match="training.betas: must be a finite number"):
        validate({**GOOD, "training": {"betas": [0.9, float("nan")]}})


def test_an_override_that_is_not_yaml_is_named():
    with pytest.raises(RecipeError) as e:
        parse_overrides(["training.lr=1e-3", "training.betas=[0.9,"])
    assert e.value.problems[0].startswith("override 'training.betas=[0.9,': the value is not valid YAML (")
    assert "training.betas=[0.9,0.95]" in e.value.problems[0] and len(e.value.problems) == 1


def test_a_folder_given_as_the_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    with pytest.raises(RecipeError, match=rf"{tmp_path} is a folder; give a recipe file \(YAML\), e.g. "
                                          rf"{tmp_path / 'a.yaml'} \(this folder holds: a.yaml\)"):
        load_recipe(tmp_path)


def test_memory_without_a_unit_suggests_one(capsys):
    assert main(["plan", str(Path(__file__).parents[1] / "recipes" / "plan-llama8b-lora-24g.yaml"),
                 "--gpu-memory", "80"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "resources.gpu_memory: memory size 80 has no unit and would mean 80 bytes; did you mean '80GiB'?" in err


@pytest.mark.parametrize("name", ["models/missing/llama", "./models/llama", "~/nowhere/llama"])
def test_a_model_folder_that_does_not_exist_is_named_in_the_recipe(name):
    with pytest.raises(RecipeError, match=rf"model.name: file or folder not found: {name}"):
        validate({**GOOD, "model": {"name": name}})


def test_a_missing_relative_model_folder_is_not_a_connection_problem(tmp_path, monkeypatch):
    from unitrain.model import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        load_config(ModelConfig(name="models/missing"))
    msg = str(e.value)
    assert msg.startswith(f"could not load the model config from 'models/missing': there is no folder or file "
                          f"'models/missing' (looked in {tmp_path}), and read as a hub name it is not in the HF cache")


def test_a_misspelled_hub_name_is_not_planned_as_another_model(monkeypatch):
    from unitrain.plan.shape import _table_key, model_shape

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _table_key("meta-llama/Llama-3.1-8B-Instruct") == _table_key("llama-3.1-8b") == "meta-llama/Llama-3.1-8B"
    for typo in ("meta-lama/Llama-3.1-8B", "meta-llama/Lama-3.1-8B", "mistralai/Mistral-7B"):
        assert _table_key(typo) is None
    with pytest.raises(ModelError, match="Did you mean 'meta-llama/Llama-3.1-8B'"):
        model_shape(ModelConfig(name="meta-lama/Llama-3.1-8B"))


# ---------------------------------------------------------------- the model config, before any weights
def test_a_typo_inside_model_config_is_caught_with_a_suggestion():
    cfg = dict(WORD_LLAMA, hiden_size=64, rope_theta=1e4, torch_dtype="float32")  # legacy names are fine
    assert preflight.config_key_problems(cfg) == [
        "model.config.hiden_size: not a setting of LlamaConfig (model_type llama) — did you mean "
        "'model.config.hidden_size'?"]
    assert preflight.config_key_problems(dict(WORD_LLAMA)) == []


def test_lora_targets_that_match_nothing(recipe):
    r = recipe(**{"method.name": "lora", "method.lora.target_modules": ["q_proj", "v_prj"]})
    [problem] = preflight.lora_target_problems(r, dict(WORD_LLAMA))
    assert problem.startswith("method.lora.target_modules: 'v_prj' matches no module of this model — did you mean "
                              "'v_proj'? (its adaptable modules: down_proj, embed_tokens, gate_proj, k_proj, lm_head")
    ok = recipe(**{"method.name": "lora", "method.lora.target_modules": ["q_proj", "mlp.down_proj", "lm_head"]})
    assert preflight.lora_target_problems(ok, dict(WORD_LLAMA)) == []
    regex = recipe(**{"method.name": "lora", "method.lora.target_modules": r".*\.layers\.1\.self_attn\.q_proj"})
    assert preflight.lora_target_problems(regex, dict(WORD_LLAMA)) == []  # layer 1 exists although the copy has 1
    nothing = recipe(**{"method.name": "lora", "method.lora.target_modules": r".*\.attention\.wq"})
    assert "matches no module name" in preflight.lora_target_problems(nothing, dict(WORD_LLAMA))[0]


def test_max_length_past_the_models_positions(recipe):
    assert preflight.length_problems(recipe(**{"data.max_length": 128}), dict(WORD_LLAMA)) == []
    [p] = preflight.length_problems(recipe(**{"data.max_length": 256}), dict(WORD_LLAMA))
    assert p.startswith("data.max_length=256 is above the model's max_position_embeddings=128")


def test_a_vocabulary_smaller_than_the_tokenizers(recipe, word_tok):
    [p] = preflight.vocab_problems(recipe(), dict(WORD_LLAMA, vocab_size=32), word_tok)
    assert p.startswith("model.config.vocab_size=32 is smaller than the tokenizer's vocabulary (50 tokens")
    assert preflight.vocab_problems(recipe(), dict(WORD_LLAMA), word_tok) == []


def test_several_gpus_asked_of_a_single_process(recipe):
    from unitrain.resources import resolve_resources

    r = recipe(**{"resources.gpus_per_node": 2})
    with pytest.raises(RecipeError, match=r"resources.gpus_per_node=2: asks for 2 processes, but this is a single "
                                          r"process \(not started by torchrun or deepspeed\). Launch it with: torchrun "
                                          r"--nproc_per_node 2 -m unitrain run RECIPE"):
        preflight.check_launch(r, resolve_resources(r.resources), world=1)
    preflight.check_launch(r, resolve_resources(r.resources, world_size=2), world=2)  # launched: fine


@pytest.mark.parametrize("bad, message", [
    ({"model.config.hiden_size": 64}, "model.config.hiden_size: not a setting of LlamaConfig"),
    ({"method.name": "lora", "method.lora.target_modules": ["q_prj"]}, "'q_prj' matches no module"),
    ({"model.config.vocab_size": 32}, "model.config.vocab_size=32 is smaller than the tokenizer's"),
    ({"data.max_length": 256}, "data.max_length=256 is above the model's max_position_embeddings=128"),
    ({"resources.gpus_per_node": 2}, r"the recipe asks for 2 × GPU \(resources.gpus_per_node=2"),  # none here
])
def test_run_refuses_before_loading_weights_or_writing_the_run_directory(recipe, monkeypatch, bad, message):
    from unitrain import model as M
    from unitrain.train.run import run_recipe

    def no(*a, **kw):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(M, "load_model", no)
    monkeypatch.setattr("unitrain.data.pipeline.tokenize_data", no)
    r = recipe(**bad)
    with pytest.raises(UnitrainError, match=message):
        run_recipe(r)
    assert not r.run_dir.exists()  # no recipe.yaml, no plan.json, the lock released: the refused launch left no trace


def test_plan_and_run_agree_on_a_budget(recipe, tmp_path, capsys):
    """A budget pays for the evals too; with the data local, plan scans it and counts them as run does: a budget
    too small for one step is refused by both, and a sufficient one gives both the same length."""
    from unitrain.plan import make_plan
    from unitrain.train.run import run_recipe

    step = make_plan(recipe(**{"training.max_steps": None})).compute.flops_per_step
    small = recipe(**{"training.max_steps": None, "resources.budget": 0.5 * step})
    p = tmp_path / "r.yaml"
    p.write_text(OmegaConf.to_yaml(OmegaConf.create(small.to_dict())))
    assert main(["plan", str(p)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "note: scanned the data to count the evals" in err and "too small for a single optimizer step" in err
    with pytest.raises(UnitrainError, match="too small for a single optimizer step"):
        run_recipe(small)
    assert main(["plan", str(p), f"resources.budget={12.5 * step:.6e}", "--json"]) == 0  # stdout stays JSON
    planned = json.loads(capsys.readouterr().out)["length"]["steps"]
    res = run_recipe(recipe(**{"training.max_steps": None, "resources.budget": 12.5 * step}))
    assert planned > 0 and json.loads((res.run_dir / "plan.json").read_text())["length"]["steps"] == planned


# ---------------------------------------------------------------- the data
def test_rows_with_null_answers_are_an_error_or_skipped_by_line(recipe, word_tok, tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    rows[3]["answer"] = None
    rows[17]["answer"] = "  "
    del rows[20]["answer"]
    path = _qa(tmp_path, rows[:10] + [""] + rows[10:])  # a blank line: line numbers follow the file, not the rows
    r = recipe(**{"data.train": str(path), "data.format": "auto", "data.eval_split": 4})
    with pytest.raises(DataError) as e:
        load_examples(r.data, word_tok, 0)
    assert str(e.value) == (f"data.train: 3 of 30 rows have nothing to train on — 3 with no 'answer' (null, missing "
                            f"or blank): qa.jsonl lines 4, 19, 22. Fix or remove them, or set data.bad_rows=skip to "
                            f"train without them (counted and printed)")
    skip = recipe(**{"data.train": str(path), "data.format": "auto", "data.eval_split": 4, "data.bad_rows": "skip"})
    with caplog.at_level(logging.WARNING, logger="unitrain"):
        tok = load_examples(skip.data, word_tok, 0)
    assert "data.train: skipped 3 of 30 rows (data.bad_rows=skip) — 3 with no 'answer'" in caplog.text
    assert "qa.jsonl lines 4, 19, 22" in caplog.text
    assert len(tok.train) + len(tok.eval) == 27 and tok.skipped["bad_rows"] == 3


def test_two_corrupt_lines_are_named_or_skipped(recipe, word_tok, tmp_path, caplog):
    lines = [json.dumps(r) for r in ROWS]
    lines[4], lines[9] = lines[4][:-3], "{not json"
    path = _qa(tmp_path, lines)
    r = recipe(**{"data.train": str(path), "data.format": "auto", "data.eval_split": 4})
    with caplog.at_level(logging.WARNING):
        with pytest.raises(DataError) as e:
            load_examples(r.data, word_tok, 0)
    assert str(e.value).startswith(f"data.train: 2 lines are not valid JSON objects — {path}: line 5 (")
    assert "line 10 (Expecting property name enclosed in double quotes). Fix them, or set data.bad_rows=skip" in \
        str(e.value)
    assert "Failed to load JSON" not in caplog.text  # datasets' internal error is not printed (twice) any more
    skip = recipe(**{"data.train": str(path), "data.format": "auto", "data.eval_split": 4, "data.bad_rows": "skip"})
    tok = load_examples(skip.data, word_tok, 0)
    assert len(tok.train) + len(tok.eval) == 28 and tok.skipped["bad_json_lines"] == 2


def test_an_empty_file_and_a_binary_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data file .*empty.jsonl is empty \(0 bytes\)"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        load_rows(str(tmp_path / "blank.jsonl"))
    (tmp_path / "model.txt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match=r"model.txt is not text \(it holds NUL bytes: a binary file\?\)"):
        load_rows(str(tmp_path / "model.txt"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1") * 10)
    with pytest.raises(DataError, match=r"is not text \(not UTF-8"):
        load_rows(str(tmp_path / "latin1.jsonl"))


def test_a_mapped_column_that_does_not_exist_names_the_columns():
    with pytest.raises(DataError, match=r"data.fields.question=problm: the data has no column 'problm' \(did you "
                                        r"mean data.fields.question=problem\?\); its columns are \['problem', "
                                        r"'solution'\]"):
        detect_format(["problem", "solution"], {"question": "problm", "answer": "solution"})
