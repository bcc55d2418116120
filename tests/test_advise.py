"""`unitrain plan --advise`: every row is the plan of its own `unitrain plan` command, the work is held fixed,
the marks are right, and the hardware table can be replaced with --prices FILE."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import pytest

from unitrain import resources as R
from unitrain.cli import main
from unitrain.plan.advise import COUNTS, parse_hours, short_strategy
from unitrain.plan.schema import Plan

GiB = 1024**3
REPO = Path(__file__).resolve().parents[1]
LORA = "recipes/llama-lora.yaml"


@pytest.fixture(autouse=True)
def cpu_only_in_the_repo(monkeypatch):
    """A laptop: no GPU, none of the GPU packages; paths relative to the checkout, as the README shows them."""
    monkeypatch.setattr(R, "detect", lambda: {"gpus": 0, "gpu_memory": 16 * GiB, "accelerator": "CPU",
                                              "cpu_memory": 16 * GiB})
    monkeypatch.setattr(R, "installed_packages", lambda: [])
    monkeypatch.chdir(REPO)


def _json(argv) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv) + ["--json"])
    return code, json.loads(out.getvalue())


def test_each_row_is_the_plan_of_its_command():
    code, adv = _json(["plan", LORA, "--advise", "--deadline", "12h"])
    rows = adv["rows"]
    assert code == 0 and len(rows) == 9 * len(COUNTS)  # the 9 priced accelerators of the shipped table
    assert {r["accelerator"] for r in rows} >= {"H100", "H200", "A100-80GB", "A100-40GB", "L40S", "A10G", "L4",
                                                "RTX4090"}
    assert sum(r["fits"] for r in rows) >= 40
    for row in rows:
        argv = shlex.split(row["command"])
        assert argv[:2] == ["unitrain", "plan"] and "--advise" not in argv
        code, plan = _json(argv[1:])
        if not row["fits"]:
            assert code != 0 and "error" in plan, row["command"]
            continue
        p = Plan.from_dict(plan)
        assert code == 0, row["command"]
        assert (p.resources.accelerator, p.world_size) == (row["accelerator"], row["gpus"])
        assert short_strategy(p.execution) == row["strategy"]
        assert p.compute.step_time_s == row["step_time_s"] and p.length.steps == row["steps"]
        assert row["wall_h"] == pytest.approx(p.length.steps * p.compute.step_time_s / 3600, rel=1e-12)
        assert row["cost"] == pytest.approx(row["wall_h"] * row["gpus"] * row["price_per_gpu_hour"], rel=1e-12)


def test_the_work_is_held_fixed_and_the_marks_are_right():
    code, adv = _json(["plan", LORA, "--advise", "--deadline", "30m"])
    fits = [r for r in adv["rows"] if r["fits"]]
    # 4 GPU-hours on the reference 1 × H100 -> tokens; every row trains those tokens (G × seq per step here)
    ref = next(r for r in fits if (r["accelerator"], r["gpus"]) == ("H100", 1))
    assert ref["gpu_hours"] == pytest.approx(4.0, rel=0.01) and "reference 1 × H100" in adv["work"]
    assert len({r["steps"] for r in fits}) == 1 and len({r["tokens"] for r in fits}) == 1
    cheapest = [r for r in fits if "cheapest" in r["marks"]]
    fastest = [r for r in fits if "fastest" in r["marks"]]
    assert len(cheapest) == 1 and len(fastest) == 1
    on_time = [r for r in fits if r["wall_h"] <= 0.5]
    assert cheapest[0]["cost"] == min(r["cost"] for r in on_time) and cheapest[0]["meets_deadline"] is True
    assert fastest[0]["wall_h"] == min(r["wall_h"] for r in fits)
    late = [r for r in fits if r["wall_h"] > 0.5]
    assert late and all(r["meets_deadline"] is False for r in late)
    assert min(r["cost"] for r in fits) < cheapest[0]["cost"]  # the deadline changed the answer here
    _, loose = _json(["plan", LORA, "--advise"])
    c = next(r for r in loose["rows"] if "cheapest" in r["marks"])
    assert c["cost"] == min(r["cost"] for r in loose["rows"] if r["fits"])


def test_prices_file_replaces_the_table(tmp_path):
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"accelerators": [
        {"name": "h100 sxm", "price_per_gpu_hour": 1.0},  # a known one: only its price changes
        {"name": "X9", "peak_bf16_tflops": 500, "memory_gib": 96, "mfu": 0.4, "intra_node_bw_gbps": 100,
         "host_memory_gib_per_gpu": 128, "price_per_gpu_hour": 2.0, "price_source": "test"}]}))
    code, adv = _json(["plan", LORA, "--advise", "--prices", str(f)])
    assert code == 0 and {r["accelerator"] for r in adv["rows"]} == {"H100", "X9"} and adv["hardware"] == str(f)
    h1 = next(r for r in adv["rows"] if (r["accelerator"], r["gpus"]) == ("H100", 1))
    assert h1["price_per_gpu_hour"] == 1.0 and h1["cost"] == pytest.approx(h1["gpu_hours"])
    x9 = next(r for r in adv["rows"] if (r["accelerator"], r["gpus"]) == ("X9", 2))
    code, plan = _json(shlex.split(x9["command"])[1:])
    assert code == 0 and "--prices" in x9["command"] and plan["resources"]["gpu_memory"] == 96 * GiB
    assert plan["resources"]["intra_node_bw"] == 100e9 and plan["compute"]["step_time_s"] == x9["step_time_s"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"accelerators": [{"name": "X10", "price_per_gpu_hour": 1.0}]}))
    code, err = _json(["plan", LORA, "--advise", "--prices", str(bad)])
    assert code != 0 and "X10" in err["error"] and "peak_bf16_tflops" in err["error"]


def test_deadline_units():
    assert parse_hours("12h") == 12 and parse_hours("90m") == 1.5 and parse_hours("2d") == 48
