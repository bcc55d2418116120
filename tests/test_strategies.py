"""Every memory strategy the planner can choose runs through the one trainer on CPU and uses the memory it predicts.

ZeRO 1-3 (with and without CPU offload) run DeepSpeed in one process (gloo, CPU accelerator) and must give the
plain torch path's loss trajectory: fp32, relative tolerance 1e-5 (ZeRO's AdamW updates one flat fp32 buffer
instead of each tensor, which changes nothing but the summation order; we see ~2e-7).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

import synth  # tests/synth.py
from conftest import sigterm_after
from unitrain.errors import MissingPackageError
from unitrain.train.run import run_recipe
from unitrain.train.track import read_metrics

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or
                                importlib.util.find_spec("bitsandbytes") is None,
                                reason="needs deepspeed and bitsandbytes (pip install 'unitrain[deepspeed,bnb]')")
REL = 1e-5
FAST = {"training.max_steps": 4, "training.eval_every": 0, "output.save_every": 0}
BASE = {"data.select": False, "data.eval_split": 4}  # the same examples for every strategy; short evals
_REFERENCE: dict = {}  # torch-path runs shared by the parametrized comparisons (method -> losses, weights)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """The built-in skills rows as raw text: packed into full max_length blocks, so every batch has the planned shape
    and the measured activations must equal the prediction exactly (qa examples shorter than max_length would give
    shorter batches); and learnable in the 4 steps a test runs."""
    return synth.write_jsonl(tmp_path_factory.mktemp("data") / "skills.jsonl", synth.skills_documents(80, seed=1))


@pytest.fixture
def recipe(tiny_recipe, documents):
    return lambda **kw: tiny_recipe(**{**BASE, "data.train": str(documents), **kw})


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _exported(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(final / name))


def _force_strategy(monkeypatch, **fields) -> None:
    """Run a strategy the planner does not offer (e.g. 8-bit Adam inside ZeRO) by editing the plan it made."""
    import unitrain.plan as P

    make = P.make_plan

    def edited(*a, **k):
        plan = make(*a, **k)
        for key, value in fields.items():
            setattr(plan.execution, key, value)
        return plan

    monkeypatch.setattr(P, "make_plan", edited)


def _reference(recipe, method: str):
    if method not in _REFERENCE:
        res = run_recipe(recipe(name=f"torch-{method}", **{"method.name": method}, **FAST))
        _REFERENCE[method] = (_losses(res.run_dir), _exported(res.run_dir), res.final_eval_loss)
    return _REFERENCE[method]


@pytest.mark.parametrize("method, strategy", [
    pytest.param("full", {"strategy.zero_stage": 1}, marks=pytest.mark.slow),
    ("full", {"strategy.zero_stage": 2}),
    ("full", {"strategy.zero_stage": 3}),
    pytest.param("full", {"strategy.zero_stage": 2, "strategy.offload_optimizer": True}, marks=pytest.mark.slow),
    pytest.param("full", {"strategy.zero_stage": 3, "strategy.offload_optimizer": True,
                          "strategy.offload_params": True}, marks=pytest.mark.slow),
    pytest.param("lora", {"strategy.zero_stage": 3}, marks=pytest.mark.slow),
    pytest.param("qlora", {"strategy.zero_stage": 2}, marks=pytest.mark.slow),
], ids=["z1", "z2", "z3", "z2-offload", "z3-offload-params", "lora-z3", "qlora-z2"])
def test_zero_reproduces_the_torch_trajectory_and_exports(recipe, method, strategy):
    ref_losses, ref_weights, ref_eval = _reference(recipe, method)
    res = run_recipe(recipe(name="ds", **{"method.name": method}, **strategy, **FAST))
    plan = json.loads((res.run_dir / "plan.json").read_text())["execution"]
    assert plan["zero_stage"] == strategy["strategy.zero_stage"] and plan["method"] == method
    assert plan["offload_optimizer"] == strategy.get("strategy.offload_optimizer", False)
    losses = _losses(res.run_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert losses == pytest.approx(ref_losses, rel=REL)
    assert res.final_eval_loss == pytest.approx(ref_eval, rel=REL)
    # final/ is a plain HF model or adapter (ZeRO-3: gathered from the partitions) equal to the torch run's
    weights = _exported(res.run_dir)
    assert weights.keys() == ref_weights.keys()
    for k, v in weights.items():
        # Adam turns ~1e-12 gradient differences on rarely seen embedding rows into up to ~3e-5 weight differences
        # (we see 5 of 3.1M elements above 1e-5); 1e-4 is 3 % of one Adam step at lr 3e-3
        assert v.shape == ref_weights[k].shape and float((v - ref_weights[k]).abs().max()) < 1e-4, k
    # runtime truth: measured next to predicted (exact on CPU for weights and activations)
    check = json.loads((res.run_dir / "memory_check.json").read_text())
    m, p = check["measured"], check["predicted"]
    assert m["weights"] == pytest.approx(p["weights"], rel=0.01)
    assert m["activations"] == pytest.approx(p["activations"], abs=64)  # 0-dim scalars (loss normaliser) aside
    assert m["optimizer"] <= p["optimizer"] * 1.01
    # ZeRO's gradient partitions and, offloaded, its host buffers; predicted buckets stay unallocated in one process
    assert m["gradients"] <= p["gradients"] * 1.01
    first = next(r for r in read_metrics(res.run_dir) if r.get("step") == 1 and "loss" in r)
    assert first["mem_measured_mib"] > 0 and first["mem_predicted_mib"] > 0
    # calibration divides measured by predicted in the same categories: ZeRO's buffers sit with the gradients on
    # both sides, so the stored gradient factor is not inflated (one process allocates no buckets: at most 1)
    cal = json.loads((res.run_dir / "calibration.json").read_text())
    assert cal["predicted"]["gradients"] == p["gradients"]
    # (a factor outside [0.25, 4] is not stored: LoRA's tiny gradient partitions next to ZeRO's h² buckets)
    assert cal["factors"].get("gradients", 1.0) <= 1.01


@pytest.mark.parametrize("optimizer, zero", [("adamw8bit", 0), ("adamw8bit", 2),
                                             pytest.param("paged_adamw8bit", 0, marks=pytest.mark.slow),
                                             pytest.param("paged_adamw8bit", 3, marks=pytest.mark.slow)])
def test_8bit_optimizers_train_on_both_paths(recipe, optimizer, zero):
    res = run_recipe(recipe(**{"training.optimizer": optimizer, "strategy.zero_stage": zero}, **FAST))
    assert json.loads((res.run_dir / "plan.json").read_text())["execution"]["optimizer"] == optimizer
    losses = _losses(res.run_dir)
    assert losses[-1] < losses[0] - 0.3
    check = json.loads((res.run_dir / "memory_check.json").read_text())
    params = json.loads((res.run_dir / "plan.json").read_text())["model"]["params"]
    master = 4 * params if zero else 0  # ZeRO keeps an fp32 master copy beside the optimizer state
    state = check["measured"]["optimizer"] - master
    assert 0 < state < 8 * params / 3.5  # 8-bit moments: ~2 B/param instead of AdamW's 8 B/param
    if zero:  # over ZeRO's flat partitions (padded to an alignment, hence not byte-exact)
        assert check["measured"]["optimizer"] == pytest.approx(check["predicted"]["optimizer"], rel=0.005)
    else:
        assert check["measured"]["optimizer"] == check["predicted"]["optimizer"]


def test_8bit_adam_state_is_about_4x_smaller_than_adamw(tmp_path):
    """Measured after one step on a model whose matrices all have >= 4096 elements (smaller ones stay 32-bit)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unitrain.plan.memory import LoraSpec, optimizer_state_bytes, trainable_tensors
    from unitrain.plan.schema import Execution
    from unitrain.plan.shape import shape_from_config
    from unitrain.train.backends import build_optimizer
    from unitrain.train.memory_check import _bytes, _tensors

    cfg = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True)
    shape = shape_from_config(cfg)
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    measured = {}
    for name in ("adamw", "adamw8bit", "paged_adamw8bit"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        opt = build_optimizer(model, name, 1e-3, 0.0, (0.9, 0.95))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        measured[name], _ = _bytes(t for s in opt.state.values() for t in _tensors(s) if t.dim() > 0)
        predicted, _ = optimizer_state_bytes(shape, Execution(method="full", optimizer=name),
                                             trainable_tensors(shape, "full", LoraSpec()), master=False)
        assert measured[name] == predicted, name  # the planner's bytes, exactly
    assert 3.7 < measured["adamw"] / measured["adamw8bit"] < 4.0
    assert measured["paged_adamw8bit"] == measured["adamw8bit"]  # paging absorbs spikes, same steady state


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_recomputes_the_planned_layers_and_saves_what_the_planner_predicts(method):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unitrain import model as M
    from unitrain.plan.memory import LoraSpec, activation_bytes, precision_for
    from unitrain.plan.schema import Execution
    from unitrain.plan.shape import shape_from_config
    from unitrain.recipe import LoraConfig
    from unitrain.train.memory_check import SavedTensors

    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    shape, lora = shape_from_config(cfg), LoraConfig(dropout=0.0)
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    saved = {}
    for mode, expect in (("off", []), ("full", [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3])):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), attn_implementation="sdpa")
        model.config.use_cache = False
        model = M.apply_method(model, method, lora, mode)
        assert M.apply_checkpointing(model, mode) == len(expect)
        model.train()
        layers = (model.get_base_model() if method == "lora" else model).model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # the MLP runs twice in a checkpointed layer: forward + recompute
            layer.mlp.forward = _counted(layer.mlp.forward, calls, i)  # (module hooks do not fire in recompute)
        rec = SavedTensors(model)
        with rec.watch():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert [i for i, c in enumerate(calls) if c == 2] == expect and all(c in (1, 2) for c in calls)
        st = Execution(method=method, checkpointing=mode, micro_batch_size=2)
        predicted = activation_bytes(shape, 2, 48, st, precision_for(st, on_cpu=True), LoraSpec.of(lora))["total"]
        assert rec.bytes == pytest.approx(predicted, abs=64), mode  # exact but for the loss's 0-dim scalars
        saved[mode] = rec.bytes
    assert saved["full"] < saved[2] == saved[3] < saved["off"]  # k=2 and k=3 both keep 2 of 4 layers


def test_qlora_trains_and_its_adapter_reloads_with_identical_outputs(recipe, monkeypatch):
    import bitsandbytes as bnb
    from peft import PeftModel

    import unitrain.model as M
    from unitrain.plan.schema import Plan

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    at_export = {}
    export = M.export

    def capture(model, *a, **k):
        model.eval()
        with torch.no_grad():
            at_export["logits"] = model(input_ids=ids).logits
        at_export["4bit"] = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return export(model, *a, **k)

    monkeypatch.setattr(M, "export", capture)
    r = recipe(**{"method.name": "qlora", "training.lr": 1e-2}, **FAST)
    res = run_recipe(r)
    losses = _losses(res.run_dir)
    assert losses[-1] < losses[0] - 0.2  # 10.80 -> 10.52 here; a tenth of the lr leaves 10.66
    q = at_export["4bit"][0].weight.quant_state
    assert len(at_export["4bit"]) == 7 * 2 and q.quant_type == "nf4" and q.nested  # all linears, double quant
    plan = Plan.load(res.run_dir / "plan.json")
    check = json.loads((res.run_dir / "memory_check.json").read_text())
    assert check["measured"]["weights"] == pytest.approx(check["predicted"]["weights"], rel=0.01)  # NF4 + DQ bytes
    reloaded = PeftModel.from_pretrained(M.load_model(r.model, plan.execution, r.training.seed), res.run_dir / "final")
    with torch.no_grad():
        logits = reloaded.eval()(input_ids=ids).logits
        base = M.load_model(r.model, plan.execution, r.training.seed).eval()(input_ids=ids).logits
    assert torch.equal(logits, at_export["logits"])
    assert not torch.allclose(logits, base)  # the adapter changes the outputs


def test_qlora_adapter_init_does_not_depend_on_a_warm_model_cache(recipe, tmp_path, monkeypatch):
    """A QLoRA run of a `config:` model first saves the fresh weights once (bitsandbytes quantizes only inside
    from_pretrained). That write must not move the RNG the adapters are drawn from, or the same seed gives other
    adapters, and another trajectory, on a machine whose cache is cold."""
    import unitrain.model as M
    from unitrain.plan.schema import Execution

    monkeypatch.setenv("UNITRAIN_CACHE", str(tmp_path / "cold-cache"))
    r = recipe(**{"method.name": "qlora"})
    adapters = []
    for _ in ("cold", "warm"):
        model = M.apply_method(M.load_model(r.model, Execution(method="qlora"), seed=7), "qlora", r.method.lora, "off")
        adapters.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k


def _counted(fn, calls: list, i: int):
    def wrapper(*a, **k):
        calls[i] += 1
        return fn(*a, **k)

    return wrapper


@pytest.mark.parametrize("method, stage", [("full", 2), pytest.param("lora", 3, marks=pytest.mark.slow)])
def test_deepspeed_resume_reproduces_the_uninterrupted_losses(recipe, monkeypatch, method, stage):
    kw = {"method.name": method, "strategy.zero_stage": stage, "training.max_steps": 5, "training.eval_every": 0,
          "output.save_every": 0, "method.lora.dropout": 0.1}
    ref = run_recipe(recipe(name="ref", **kw))
    with monkeypatch.context() as m:
        sigterm_after(m, 2)
        cut = run_recipe(recipe(name="cut", **kw))
    assert cut.exit_code == 143 and cut.steps == 2
    ckpt = cut.run_dir / "checkpoints" / "step-2"
    assert (ckpt / "COMPLETE").exists() and list((ckpt / "ds").glob("*optim_states.pt"))
    resumed = run_recipe(recipe(name="cut", **kw))
    assert resumed.exit_code == 0 and resumed.steps == 5
    assert _losses(resumed.run_dir) == _losses(ref.run_dir)  # bitwise on CPU
    assert resumed.final_eval_loss == ref.final_eval_loss


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_under_zero_match_one_process(recipe, tmp_path, stage):
    from unitrain.recipe import recipe_to_yaml

    # An odd number of eval batches (3): under ZeRO-3 every forward is collective, so the rank with fewer
    # batches must run padding forwards rather than leave the other waiting.
    kw = {"training.micro_batch_size": 1, "training.eval_max_batches": 3, "training.eval_every": 2,
          **{k: v for k, v in FAST.items() if k != "training.eval_every"}}
    one = run_recipe(recipe(name="one", **kw))
    two = recipe(name=f"two-z{stage}", **{"strategy.zero_stage": stage, "resources.gpus_per_node": "auto"}, **kw)
    (tmp_path / "two.yaml").write_text(recipe_to_yaml(two))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "unitrain", "run", str(tmp_path / "two.yaml")]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    plan = json.loads((two.run_dir / "plan.json").read_text())
    assert plan["execution"]["world_size"] == 2 and plan["execution"]["dtype"] == "float32"  # CPU processes
    assert plan["resources"]["on_cpu"] is True
    assert _losses(two.run_dir) == pytest.approx(_losses(one.run_dir), rel=REL)
    assert len(list((two.run_dir / "checkpoints" / "step-4" / "ds").glob("*optim_states.pt"))) == 2  # a partition each
    a, b = _exported(one.run_dir), _exported(two.run_dir)  # ZeRO-3: gathered from both ranks
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) < 1e-4 for k in a)


def test_the_engine_receives_the_config_plan_writes(recipe, tmp_path, monkeypatch):
    """One DeepSpeed config: `unitrain plan --deepspeed-config` writes exactly what `unitrain run` passes to
    deepspeed.initialize (and what plan.json stores)."""
    import deepspeed

    from unitrain.cli import main
    from unitrain.recipe import recipe_to_yaml

    r = recipe(**{"strategy.zero_stage": 2, "training.max_steps": 1, "training.eval_every": 0,
                  "output.save_every": 0, "data.eval_split": 0})
    (tmp_path / "z2.yaml").write_text(recipe_to_yaml(r))
    assert main(["plan", str(tmp_path / "z2.yaml"), "--deepspeed-config", str(tmp_path / "ds.json")]) == 0
    seen = []
    real = deepspeed.initialize

    def spy(*args, **kwargs):
        seen.append(json.loads(json.dumps(kwargs["config"])))  # before DeepSpeed fills in its defaults
        return real(*args, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", spy)
    res = run_recipe(r)
    assert res.exit_code == 0 and len(seen) == 1
    assert seen[0] == json.loads((tmp_path / "ds.json").read_text())
    assert seen[0] == json.loads((res.run_dir / "plan.json").read_text())["execution"]["deepspeed"]


@pytest.mark.parametrize("overrides, package", [
    ({"strategy.zero_stage": 2}, "deepspeed"),
    ({"strategy.zero_stage": 3, "strategy.offload_params": True}, "deepspeed"),
    ({"training.optimizer": "paged_adamw8bit"}, "bitsandbytes"),
    ({"method.name": "qlora"}, "bitsandbytes"),
])
def test_a_missing_package_is_named_with_its_install_command_before_any_model_loads(recipe, monkeypatch,
                                                                                    overrides, package):
    import unitrain.model as M

    r = recipe(**overrides)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == package else real(name, *a, **k))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the missing package was reported")

    monkeypatch.setattr(M, "load_model", no_model)
    with pytest.raises(MissingPackageError) as e:
        run_recipe(r)
    assert f"'{package}'" in str(e.value) and "pip install" in str(e.value)


def test_memory_above_the_prediction_is_a_warning_in_the_run(recipe, monkeypatch, caplog):
    import unitrain.plan as P

    make = P.make_plan

    def optimistic(*a, **k):  # a plan that underestimates weights and activations by half
        plan = make(*a, **k)
        for c in plan.memory.components:
            if c.name in ("weights", "activations"):
                c.bytes //= 2
        return plan

    monkeypatch.setattr(P, "make_plan", optimistic)
    with caplog.at_level(logging.WARNING, logger="unitrain"):
        res = run_recipe(recipe(**{"training.max_steps": 1, "training.eval_every": 0}))
    check = json.loads((res.run_dir / "memory_check.json").read_text())
    assert set(check["exceeds"]) == {"weights", "activations"}
    assert check["exceeds"]["weights"]["ratio"] == pytest.approx(2.0, rel=0.01)
    assert "measured exceeds the plan's prediction: weights" in caplog.text and "activations" in caplog.text

