"""Recipe validation: good recipes load; every bad one is reported with its key path, all problems at once."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from unitrain.errors import RecipeError
from unitrain.recipe import Recipe, apply_overrides, field_docs, load_recipe, validate

REPO = Path(__file__).resolve().parents[1]
GOOD = {"model": {"name": "some/model"}, "data": {"train": "some/hub-dataset"}}


def _merge(base: dict, patch: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in patch.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_minimal_recipe_gets_defaults():
    r = validate(GOOD)
    assert isinstance(r, Recipe)
    assert r.methods == ["lora"] and r.training.schedule == "wsd" and r.output.resume == "auto"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_document_their_launch(path):
    first = path.read_text().splitlines()[0]
    assert re.match(r"# (Launch: )?(unitrain|torchrun|deepspeed) ", first), first
    load_recipe(path, check_files=False)


BAD = [
    ({"modle": {"name": "x"}}, "modle: unknown key — did you mean 'model'?"),
    ({"model": {"nmae": "x"}}, "model.nmae: unknown key — did you mean 'model.name'?"),
    ({"training": {"lr": "fast"}}, "training.lr: expected float"),
    ({"training": {"lr": -1.0}}, "training.lr: must be > 0"),
    ({"training": {"global_batch_size": 0}}, "training.global_batch_size: must be an integer >= 1 or 'auto'"),
    ({"training": {"global_batch_size": 10, "micro_batch_size": 4, "gradient_accumulation": 1}},
     "is not a multiple of micro_batch_size"),
    ({"training": {"schedule": "linear"}}, "training.schedule: expected 'wsd' | 'cosine' | 'constant'"),
    ({"training": {"optimizer": "sgd"}}, "training.optimizer: expected"),
    ({"training": {"betas": [0.9]}}, "training.betas: expected two numbers"),
    ({"training": {"warmup_ratio": 0.7, "cooldown_ratio": 0.5}}, "warmup_ratio + cooldown_ratio must be <= 1"),
    ({"training": {"gradient_checkpointing": "sometimes"}}, "training.gradient_checkpointing: use auto, off, full"),
    ({"method": {"name": "dora"}}, "method.name: unknown method 'dora'"),
    ({"method": {"lora": {"r": 0}}}, "method.lora.r: must be >= 1"),
    ({"method": {"lora": {"dropout": 1.5}}}, "method.lora.dropout: must be in [0, 1)"),
    ({"data": {"train": "missing/file.jsonl"}}, "data.train: file not found: missing/file.jsonl"),
    ({"data": {"train": None}}, "data.train: required"),
    ({"data": {"max_length": 2}}, "data.max_length: must be >= 8"),
    ({"data": {"fields": {"prompt": "q"}}}, "data.fields.prompt: unknown role"),
    ({"data": {"format": "csv"}}, "data.format: expected"),
    ({"model": {"name": None}}, "model: set exactly one of model.name"),
    ({"model": {"name": None, "config": {"hidden_size": 8}}}, "model.config: needs 'model_type'"),
    ({"resources": {"budget": "3 parsecs"}}, "resources.budget: cannot read budget '3 parsecs'"),
    ({"resources": {"budget": "-5h"}}, "resources.budget"),
    ({"resources": {"gpu_memory": "lots"}}, "resources.gpu_memory: cannot read memory size 'lots'"),
    ({"resources": {"accelerator": "TPUv9"}}, "resources.accelerator: unknown accelerator 'TPUv9'"),
    ({"resources": {"nodes": 0}}, "resources.nodes: must be >= 1"),
    ({"strategy": {"zero_stage": 4}}, "strategy.zero_stage: use 0, 1, 2, 3 or auto"),
    ({"stopping": {"loss_per_flop": -1e-18}}, "stopping.loss_per_flop: must be > 0"),
    ({"stopping": {"min_evals": 1}}, "stopping.min_evals: a learning curve needs >= 2 evals"),
    ({"output": {"keep_last": 0}}, "output.keep_last: must be >= 1"),
    ({"output": {"resume": "/no/such/checkpoint"}}, "output.resume: checkpoint not found"),
    ({"tracking": {"wandb": "yes"}}, "tracking.wandb: expected"),
    ({"name": "a/b"}, "name: must be a non-empty name without '/'"),
]


@pytest.mark.parametrize("patch,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipe_names_the_key_and_problem(patch, expected):
    with pytest.raises(RecipeError) as e:
        validate(_merge(GOOD, patch))
    assert expected in str(e.value), str(e.value)


def test_all_problems_reported_at_once():
    bad = _merge(GOOD, {"training": {"lr": "x", "global_batch_size": 0}, "model": {"nmae": "y"},
                        "resources": {"budget": "soon"}})
    with pytest.raises(RecipeError) as e:
        validate(bad)
    problems = e.value.problems
    assert any(p.startswith("training.lr") for p in problems)
    assert any(p.startswith("training.global_batch_size") for p in problems)
    assert any(p.startswith("model.nmae") for p in problems)
    assert any(p.startswith("resources.budget") for p in problems)


def test_overrides_merge_and_are_typed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: some/model}\ndata: {train: some/hub-dataset}\ntraining: {lr: 1.0e-3}\n")
    r = load_recipe(p, ["training.lr=5e-5", "training.max_steps=7", "method.name=full", "name=x"])
    assert r.training.lr == pytest.approx(5e-5) and r.training.max_steps == 7 and r.methods == ["full"]
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(p, ["training.lr"])
    with pytest.raises(RecipeError, match="training.lrr: unknown key — did you mean 'training.lr'"):
        load_recipe(p, ["training.lrr=1"])


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)


def test_relative_data_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent("""
        model: {name: some/model}
        data: {train: d.jsonl}
    """))
    r = load_recipe(p)
    assert r.resolve_path(r.data.train) == tmp_path / "d.jsonl"


def test_every_field_is_documented():
    rows = field_docs()
    undocumented = [k for k, _, doc in rows if not doc]
    assert not undocumented, undocumented


def test_apply_overrides_sets_dotted_keys_and_replaces_mappings():
    data = {"model": {"config": {"hidden_size": 64, "num_hidden_layers": 2}}, "training": {"lr": 1e-3}}
    out = apply_overrides(data, {"training.lr": 5e-4, "method.lora.r": 8, "model.config": {"hidden_size": 32}})
    assert out == {"model": {"config": {"hidden_size": 32}}, "training": {"lr": 5e-4}, "method": {"lora": {"r": 8}}}
    assert data["training"]["lr"] == 1e-3  # the input is left alone
