"""Plan for the target from anywhere, execute on the target: GPU counts mean GPUs, the pinned software stack,
plan files that `unitrain run --plan` executes exactly after checking the machine, and refusals that name
every mismatch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from unitrain import resources as R
from unitrain.errors import MissingPackageError, UnitrainError
from unitrain.plan.schema import Plan
from unitrain.recipe import ResourcesConfig, recipe_to_yaml
from unitrain.train import plan_check
from unitrain.train.run import run_recipe

GiB = 1024**3
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CPU_ONLY = {"gpus": 0, "gpu_memory": 32 * GiB, "accelerator": "CPU", "cpu_memory": 32 * GiB}
ONE_L4 = {"gpus": 1, "gpu_memory": int(22.5 * GiB), "accelerator": "NVIDIA L4", "cpu_memory": 64 * GiB}


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a given machine: `machine(CPU_ONLY)`, `machine(ONE_L4)`."""
    def set_to(hw):
        monkeypatch.setattr(R, "detect", lambda: dict(hw))
    set_to(CPU_ONLY)
    return set_to


def _cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    from unitrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


# ---------------------------------------------------------------------------------------------- GPU counts mean GPUs

def test_gpu_counts_mean_gpus_on_a_machine_without_one(machine):
    spec = R.resolve_resources(ResourcesConfig(gpus_per_node=1, gpu_memory="24GiB"))
    assert not spec.on_cpu and spec.accelerator == R.DEFAULT_ACCELERATOR and spec.gpu_memory == 24 * GiB
    assert any("accelerator H100, the default" in a and "--accelerator" in a for a in spec.assumed)
    spec = R.resolve_resources(ResourcesConfig(gpus_per_node=8, accelerator="a100-80g"))
    assert (spec.world_size, spec.accelerator, spec.gpu_memory, spec.on_cpu) == (8, "A100-80GB", 80 * GiB, False)
    assert spec.cpu_memory == 8 * 144 * GiB and any("CPU memory" in a for a in spec.assumed)  # the table's host
    one = R.resolve_resources(ResourcesConfig(accelerator="L4"))  # an accelerator without a count: one of it
    assert (one.world_size, one.accelerator, one.on_cpu) == (1, "L4", False) and "1 GPU per node" in one.assumed[0]
    # CPU only when asked for, or when nothing asks for a GPU on a machine without one
    for cfg in (ResourcesConfig(gpus_per_node=0), ResourcesConfig(accelerator="CPU"), ResourcesConfig()):
        assert R.resolve_resources(cfg).on_cpu


def test_plan_with_gpus_is_a_gpu_plan_and_says_what_it_assumed(machine, capsys):
    code, out = _cli("plan", RECIPES / "llama-lora.yaml", "--gpus", "1", "--gpu-memory", "24GiB", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["resources"]["on_cpu"] is False and plan["resources"]["accelerator"] == "H100"
    assert plan["execution"]["dtype"] == "bfloat16" and plan["execution"]["kernels"]
    code, out = _cli("plan", RECIPES / "llama-lora.yaml", "--gpus", "1", "--gpu-memory", "24GiB")
    head = out.splitlines()[:8]
    assert code == 0 and any(line.startswith("assumed: accelerator H100, the default") for line in head), head


def test_planning_assumes_the_pinned_stack_not_the_laptops(machine, monkeypatch):
    """The plan is the same whether the planning machine has deepspeed/bitsandbytes/triton or not."""
    from unitrain.plan import make_plan
    from unitrain.recipe import load_recipe

    def plan_with(packages):
        monkeypatch.setattr(R, "installed_packages", lambda: list(packages))
        return make_plan(load_recipe(RECIPES / "llama-lora.yaml", ["resources.gpus_per_node=1",
                                                                   "resources.gpu_memory=24GiB"]))

    bare, full = plan_with([]), plan_with(R.PINNED_PACKAGES)
    assert bare.execution == full.execution and bare.length == full.length and bare.execution.kernels
    assert bare.resources.packages == list(R.PINNED_PACKAGES)
    local = make_plan(load_recipe(RECIPES / "llama-lora.yaml", ["resources.gpus_per_node=1",
                                                                "resources.gpu_memory=24GiB",
                                                                "resources.packages=local"]))
    assert local.resources.packages == list(R.PINNED_PACKAGES)  # installed_packages() is still the full list here
    monkeypatch.setattr(R, "installed_packages", lambda: [])
    local = make_plan(load_recipe(RECIPES / "llama-lora.yaml", ["resources.gpus_per_node=1",
                                                                "resources.gpu_memory=24GiB",
                                                                "resources.packages=local"]))
    assert local.resources.packages == [] and not local.execution.kernels


def test_the_pinned_packages_are_pinned_in_the_image():
    pins = (RECIPES.parent / "docker" / "constraints.txt").read_text()
    for pkg in R.PINNED_PACKAGES:
        assert f"\n{pkg}==" in pins, pkg


def test_run_plans_for_what_it_runs_on(machine):
    with pytest.raises(UnitrainError, match=r"asks for 2 × GPU .*no CUDA GPU.*gpus_per_node=auto"):
        R.resolve_resources(ResourcesConfig(gpus_per_node=2), mode="run")
    with pytest.raises(UnitrainError, match=r"asks for H100 .*no CUDA GPU"):
        R.resolve_resources(ResourcesConfig(accelerator="H100"), mode="run")
    cpu = R.resolve_resources(ResourcesConfig(), world_size=2, mode="run")
    assert cpu.on_cpu and cpu.world_size == 2 and cpu.gpu_memory == 16 * GiB  # the launcher's processes
    machine(ONE_L4)
    with pytest.raises(UnitrainError, match=r"asks for H100 GPUs .*has 1 × NVIDIA L4 \(L4\)"):
        R.resolve_resources(ResourcesConfig(accelerator="H100"), mode="run")
    with pytest.raises(UnitrainError, match=r"asks for 4 GPUs per node .*has 1"):
        R.resolve_resources(ResourcesConfig(gpus_per_node=4), mode="run")
    with pytest.raises(UnitrainError, match=r"asks for 80 GiB per GPU .*has 22 GiB"):
        R.resolve_resources(ResourcesConfig(gpu_memory="80GiB"), mode="run")
    here = R.resolve_resources(ResourcesConfig(), mode="run")
    assert (here.accelerator, here.world_size, here.gpu_memory, here.on_cpu) == ("L4", 1, int(22.5 * GiB), False)
    assert R.resolve_resources(ResourcesConfig(), mode="run").packages == R.installed_packages()


# ---------------------------------------------------------------------------------------------- plan files

def _recipe_file(tmp_path, recipe) -> Path:
    f = tmp_path / f"{recipe.name}.yaml"
    f.write_text(recipe_to_yaml(recipe))
    return f


def test_a_plan_file_round_trips_and_run_executes_exactly_it(tiny_recipe, tmp_path, machine, capsys):
    r = tiny_recipe(name="pf")
    f, out = _recipe_file(tmp_path, r), tmp_path / "plan.json"
    code, _ = _cli("plan", f, "--scan-data", "--out", out)
    assert code == 0 and out.is_file() and not r.run_dir.exists()
    saved = json.loads(out.read_text())
    plan = Plan.load(out)
    assert Plan.from_dict(saved).to_dict() == saved and plan.data.scanned and plan.length.steps == 6
    # Hand-shorten the plan: a run that executes the file trains 4 steps, one that re-planned would train 6.
    short = replace(plan, length=replace(plan.length, steps=4, warmup=0, cooldown=1))
    short.save(out)
    res = run_recipe(r, plan_file=str(out))
    assert res.exit_code == 0 and res.steps == 4
    assert Plan.load(r.run_dir / "plan.json") == short  # the run directory holds exactly the executed plan
    assert f"executing: the plan from plan file {out}" in capsys.readouterr().out
    again = run_recipe(tiny_recipe(name="pf-replan"), plan_file=str(out), replan=True)
    assert again.steps == 6  # --replan plans for this machine instead


def test_a_plan_for_another_machine_is_refused_naming_each_mismatch(tiny_recipe, tmp_path, machine):
    r = tiny_recipe(name="elsewhere")
    f, out = _recipe_file(tmp_path, r), tmp_path / "gpu-plan.json"
    code, _ = _cli("plan", f, "--gpus", "2", "--accelerator", "H100", "--gpu-memory", "80GiB", "--scan-data",
                   "--out", out)
    assert code == 0 and Plan.load(out).resources.accelerator == "H100"
    with pytest.raises(UnitrainError) as e:  # on this CPU
        run_recipe(r, plan_file=str(out))
    msg = str(e.value)
    assert "device: planned for H100 GPUs, found no CUDA GPU (CPU)" in msg and "world size: planned 2" in msg
    assert "--replan" in msg and not r.run_dir.exists()  # nothing written before everything is resolved
    machine(ONE_L4)  # a GPU machine, but not the planned one
    found = plan_check.machine_resources(1)
    bad = plan_check.machine_mismatches(Plan.load(out), found)
    assert bad == ["accelerator: planned H100, found L4", "world size: planned 2 (1 node(s) × 2), found 1 "
                   "(1 node(s) × 1)", "memory per GPU: planned 80.0 GiB, found 22.5 GiB"]
    ok = replace(found, gpus_per_node=2, accelerator="H100", gpu_memory=int(79.6 * GiB))  # within 3 % of 80
    assert plan_check.machine_mismatches(Plan.load(out), ok) == []


def test_a_plan_file_for_another_recipe_or_without_data_is_refused(tiny_recipe, tmp_path, machine):
    r = tiny_recipe(name="a")
    out = tmp_path / "a.json"
    assert _cli("plan", _recipe_file(tmp_path, r), "--scan-data", "--out", out)[0] == 0
    other = tiny_recipe(name="b", **{"training.global_batch_size": 8, "data.max_length": 64})
    with pytest.raises(UnitrainError) as e:
        run_recipe(other, plan_file=str(out))
    assert "training.global_batch_size: the plan has 4, the recipe 8" in str(e.value)
    assert "sequence length: the plan has 128, the recipe 64" in str(e.value) and not other.run_dir.exists()
    code, text = _cli("plan", _recipe_file(tmp_path, r), "--out", tmp_path / "no-data.json", "--json")
    assert code != 0 and "--scan-data" in json.loads(text)["error"] and not (tmp_path / "no-data.json").exists()
    unscanned = Plan.load(out)
    unscanned.data.scanned = False
    unscanned.save(tmp_path / "unscanned.json")
    with pytest.raises(UnitrainError, match="made without the data"):
        run_recipe(r, plan_file=str(tmp_path / "unscanned.json"))


def test_run_refuses_a_plan_needing_a_missing_package(tiny_recipe, tmp_path, machine, monkeypatch):
    r = tiny_recipe(name="ds", **{"strategy.zero_stage": 1})
    out = tmp_path / "ds.json"
    assert _cli("plan", _recipe_file(tmp_path, r), "--scan-data", "--out", out)[0] == 0
    assert Plan.load(out).execution.zero_stage == 1
    monkeypatch.setattr(plan_check, "installed_packages", lambda: ["bitsandbytes", "triton"])  # no deepspeed here
    with pytest.raises(MissingPackageError, match=r"DeepSpeed ZeRO-1.*'deepspeed'.*pip install 'unitrain\[deepspeed\]'"):
        run_recipe(r, plan_file=str(out))
    assert not r.run_dir.exists()
    need = plan_check.needed_packages(replace(Plan.load(out), execution=replace(
        Plan.load(out).execution, method="qlora", optimizer="adamw8bit", kernels=["rmsnorm"])))
    assert set(need) == {"deepspeed", "bitsandbytes", "triton"}


# ---------------------------------------------------------------------------------------------- --json errors

@pytest.mark.parametrize("argv,needle", [
    (["--accelerator", "H1000"], "did you mean H100"),
    (["--gpus", "1", "--budget", "1e9"], "too small for a single optimizer step"),
    (["--gpus", "1", "--gpu-memory", "4GiB", "--cpu-memory", "4GiB", "--accelerator", "T4"], "nothing fits"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--advise", "--deadline", "soon"], "--deadline"),
])
def test_json_errors_are_json_on_stdout(argv, needle, machine, capsys):
    code, out = _cli("plan", RECIPES / "llama-lora.yaml", *argv, "--json")
    err = json.loads(out)
    assert code != 0 and set(err) == {"error", "fix"} and needle in err["error"] and err["fix"]
    assert "error:" not in capsys.readouterr().err  # not printed twice
