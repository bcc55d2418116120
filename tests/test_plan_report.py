"""Plan rendering and the plan.json round trip."""

from __future__ import annotations

from rich.console import Console

from unitrain.plan import make_plan
from unitrain.plan.report import plan_summary_lines, print_plan
from unitrain.plan.schema import Plan
from unitrain.recipe import validate
from unitrain.resources import ResourceSpec, lookup_accelerator, parse_budget, parse_memory


def _plan(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITRAIN_CALIBRATION", str(tmp_path / "cal.json"))
    r = validate({"model": {"name": "meta-llama/Llama-3.1-8B"}, "data": {"train": "org/ds", "max_length": 2048},
                  "method": {"name": "full"}, "training": {"global_batch_size": 64}}, check_files=False)
    a = lookup_accelerator("H100")
    return make_plan(r, ResourceSpec(8, 1, a.memory, parse_memory("1TiB"), a.name, a.peak_flops, a.mfu,
                                     parse_budget("2e19")))


def test_print_plan_shows_every_component_and_the_peak(tmp_path, monkeypatch):
    plan = _plan(tmp_path, monkeypatch)
    console = Console(record=True, width=160)
    print_plan(plan, console)
    text = console.export_text()
    for c in plan.memory.components:
        assert c.name in text
    assert "peak" in text and "rejected alternatives" in text and "FLOPs/slot" in text and "█" in text


def test_summary_lines_and_json_round_trip(tmp_path, monkeypatch):
    plan = _plan(tmp_path, monkeypatch)
    lines = plan_summary_lines(plan)
    assert lines[0].startswith("plan: full") and any(line.strip().startswith("weights") for line in lines)
    assert any(line.startswith("length:") and str(plan.length.steps) in line for line in lines)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
