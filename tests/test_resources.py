"""Resource spec: units, the accelerator table, resolving a recipe's resources section."""

from __future__ import annotations

import pytest

from unitrain import resources as R
from unitrain.errors import UnitrainError
from unitrain.recipe import ResourcesConfig


def test_parse_memory_units():
    assert R.parse_memory("80GiB") == 80 * 2**30
    assert R.parse_memory("24GB") == 24 * 10**9
    assert R.parse_memory("512 MiB") == 512 * 2**20
    assert R.parse_memory(2**30) == R.parse_memory(str(2**30)) == 2**30  # a bare number is bytes
    for bad in ("eighty", "80XB", "-1GiB", 0, "0GiB", 80, "80", " 80 ", 1024):
        with pytest.raises(ValueError, match="80GiB"):
            R.parse_memory(bad)
    with pytest.raises(ValueError, match=r"memory size '80' has no unit and would mean 80 bytes; did you mean '80GiB'"):
        R.parse_memory("80")


def test_parse_budget_units():
    assert R.parse_budget("2e18") == R.Budget("flops", 2e18)
    assert R.parse_budget(3e19) == R.Budget("flops", 3e19)
    assert R.parse_budget("6h") == R.Budget("gpu_hours", 6.0)
    assert R.parse_budget("90m") == R.Budget("gpu_hours", 1.5)
    assert R.parse_budget("2.5 gpu-hours") == R.Budget("gpu_hours", 2.5)
    assert R.parse_budget("50M tokens") == R.Budget("tokens", 5e7)
    for bad in ("lots", "0", "-1e18", "0h"):
        with pytest.raises(ValueError, match="example"):
            R.parse_budget(bad)


def test_accelerator_table_and_lookup():
    for name in ("V100", "T4", "A10G", "L4", "L40S", "RTX4090", "A100-40GB", "A100-80GB", "H100", "H200", "MI300X"):
        a = R.lookup_accelerator(name)
        assert a.peak_flops > 1e13 and 0 < a.mfu < 1 and a.memory > 0 and a.intra_node_bw > 0
    table = R.load_table()
    assert table.from_device("NVIDIA H100 80GB HBM3").name == "H100"
    assert table.from_device("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert table.from_device("Tesla V100-SXM2-32GB").name == "V100"
    assert table.from_device("NVIDIA L40S").name == "L40S"  # not L4
    assert table.from_device("NVIDIA H200").name == "H200"
    assert R.lookup_accelerator("a100").name == "A100-80GB"
    assert R.lookup_accelerator("h100").peak_flops == 989e12  # dense bf16, no sparsity
    with pytest.raises(ValueError, match="known: H100"):
        R.lookup_accelerator("TPU-v9")


def test_typed_accelerator_names_match_exactly_up_to_spelling():
    for typed, name in [("a100-80g", "A100-80GB"), ("A100 80GB", "A100-80GB"), ("H100 SXM", "H100"),
                        ("h100_sxm5", "H100"), ("rtx 4090", "RTX4090"), ("GeForce RTX 4090", "RTX4090"),
                        ("l40s", "L40S"), ("cpu", "CPU"), ("H100 PCIe", "H100-PCIE")]:
        assert R.lookup_accelerator(typed).name == name, typed
    for typed, close in [("H1000", "H100"), ("A100-80", "A100-80GB"), ("L40", "L40S"), ("A10", "A10G")]:
        with pytest.raises(ValueError, match=f"did you mean {close}") as e:  # no substring guessing
            R.lookup_accelerator(typed)
        assert "known: H100, H100-PCIE, H200" in str(e.value)


def test_resolve_explicit_resources_needs_no_detection(monkeypatch):
    monkeypatch.setattr(R, "detect", lambda: pytest.fail("explicit resources must not probe the machine"))
    cfg = ResourcesConfig(gpus_per_node=8, nodes=2, gpu_memory="80GiB", cpu_memory="1TiB", accelerator="H100",
                          budget="2e19")
    spec = R.resolve_resources(cfg)
    assert (spec.world_size, spec.gpu_memory, spec.accelerator) == (16, 80 * 2**30, "H100")
    assert spec.budget == R.Budget("flops", 2e19) and not spec.on_cpu
    spec = R.resolve_resources(ResourcesConfig(gpus_per_node=1, gpu_memory="24GiB", cpu_memory="64GiB",
                                               accelerator="L4", peak_tflops=100))
    assert spec.peak_flops == 100e12


def test_launcher_world_size_conflicts_are_errors(monkeypatch):
    monkeypatch.setattr(R, "detect", lambda: {"gpus": 4, "gpu_memory": 80 * 2**30, "accelerator": "H100",
                                              "cpu_memory": 512 * 2**30})
    cfg = ResourcesConfig(gpus_per_node=2, gpu_memory="80GiB", cpu_memory="512GiB", accelerator="H100")
    with pytest.raises(UnitrainError, match="launcher started 4 processes"):
        R.resolve_resources(cfg, world_size=4)
    auto = R.resolve_resources(ResourcesConfig(), world_size=4)
    assert auto.world_size == 4 and auto.accelerator == "H100"
