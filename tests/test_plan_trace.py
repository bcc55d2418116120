"""`unitrain plan --trace`: an exact MemTracker trace on fake tensors; the phase-aware formula checked against it."""

from __future__ import annotations

import pytest

from unitrain.plan.memory import LoraSpec, estimate_memory
from unitrain.plan.schema import Execution
from unitrain.plan.shape import KNOWN_CONFIGS, shape_from_config
from unitrain.train.trace import TraceError, trace_memory
from unitrain.train.trace_check import candidates_to_trace, compare, config_key, trace_factors

# Llama-like ratios at a tiny size: vocabulary 32 × hidden (Llama-3.1-8B: 31), FFN 2.75 × hidden, GQA.
LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True)
QWEN2 = dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=False)  # q/k/v biases, untied head
DEEP = dict(LLAMA, num_hidden_layers=8, intermediate_size=512, vocab_size=1024)  # layers outweigh the head
LORA = LoraSpec(8, 0.05)


def traced(cfg, method, ckpt, accum, seq=128, dtype="bfloat16", **kw):
    st = Execution(method=method, checkpointing=ckpt, micro_batch_size=1, grad_accum=accum, dtype=dtype)
    on_cpu = dtype == "float32"
    tr = trace_memory(cfg, st, seq, LORA, on_cpu=on_cpu, **kw)
    est = estimate_memory(shape_from_config(cfg), st, seq, 1, 1, on_cpu, LORA, **kw)
    return tr, est


def check(tr, est, tol=(-0.01, 0.03)):
    cmp = compare(tr, est)
    rows = {what: (t, f) for what, t, f, _ in cmp.rows}
    for what in ("weights", "gradients", "optimizer"):  # exact but for fused AdamW's 4-byte step counters
        t, f = rows[what]
        assert abs(f - t) <= 1e-3 * t + 4096, (what, t, f)
    t, f = rows["alive after forward"]
    assert abs(f - t) <= 0.005 * t, ("alive after forward", t, f)
    assert tol[0] <= cmp.peak_error <= tol[1], (cmp.peak_error, cmp.trace_peak_phase, cmp.formula_peak_phase)
    return cmp


@pytest.mark.parametrize("cfg,method,ckpt,accum", [
    (LLAMA, "full", "off", 1), (LLAMA, "full", "off", 2), (LLAMA, "full", "full", 1), (LLAMA, "full", "full", 2),
    (LLAMA, "lora", "off", 1), (LLAMA, "lora", "off", 2), (LLAMA, "lora", "full", 1), (LLAMA, "lora", "full", 2),
    (QWEN2, "full", "off", 1), (QWEN2, "full", "full", 2), (QWEN2, "lora", "full", 2), (LLAMA, "full", 2, 2)],
    ids=lambda x: x["model_type"] if isinstance(x, dict) else str(x))
def test_the_formula_matches_the_trace(cfg, method, ckpt, accum):
    """Shapes × methods × checkpointing × micro-batches (bf16 autocast, the CUDA regime): every category exact, the
    allocated peak within −1 % / +3 % of the traced steady-state step's."""
    check(*traced(cfg, method, ckpt, accum))


@pytest.mark.parametrize("method,ckpt", [("full", "full"), ("lora", "off")])
def test_the_formula_matches_the_trace_of_a_cpu_plan(method, ckpt):
    """fp32 everywhere, CPU dropout (a float mask), no autocast."""
    check(*traced(LLAMA, method, ckpt, 2, dtype="float32"))


def test_the_peak_phase_is_where_the_trace_finds_it():
    tr, est = traced(DEEP, "full", "full", 2)  # the autocast cache: every layer's copy alive at the 2nd forward
    assert tr.peak.phase == "forward, micro-batch 2" and est.peak_phase == "forward"
    tr, est = traced(LLAMA, "lora", "full", 1)  # LoRA + checkpointing: log_softmax's backward, nothing on top
    assert tr.peak.phase == "head backward" and est.peak_phase == "head backward"


def test_no_autocast_cache_in_checkpoints_saves_the_copies_at_no_extra_casts():
    on, est_on = traced(DEEP, "full", "full", 2)
    off, est_off = traced(DEEP, "full", "full", 2, autocast_cache_in_checkpoints=False)
    shape = shape_from_config(DEEP)
    fwd = {p.phase: p.total for p in on.phases}["forward, micro-batch 2"] - \
        {p.phase: p.total for p in off.phases}["forward, micro-batch 2"]
    assert fwd == 2 * shape.num_layers * shape.linear_params_per_layer  # every checkpointed layer's bf16 copies
    assert off.peak.total < on.peak.total and est_off.allocated_peak < est_on.allocated_peak
    assert on.casts == off.casts  # each weight is cast once per forward either way (recompute: a fresh cache)
    check(on, est_on)
    check(off, est_off)


def test_trace_traps_lora_checkpointing_leaves_nothing_behind():
    """Frozen parameters take no grad hook, peft's adapters move without Module.to, and the embedding output that
    checkpointing makes a leaf (and MemTracker's hooks would keep alive) is freed: after the optimizer step only
    weights, gradients and optimizer states are alive."""
    tr, _ = traced(LLAMA, "lora", "full", 2)
    assert tr.leak == 0
    step = next(p for p in tr.phases if p.phase == "optimizer step")
    assert step.by_category["activations"] + step.by_category["temporaries"] < 4096  # clip_grad_norm_'s scalars
    assert tr.trainable == LORA.r * sum(x.d_in + x.d_out for x in shape_from_config(LLAMA).linears) * 4


@pytest.mark.parametrize("cfg", [
    dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=2048, n_positions=256),
    dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=2048, pad_token_id=None),
    dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=16, vocab_size=2048, sliding_window=32),
    dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=2048, num_local_experts=4, num_experts_per_tok=2)],
    ids=lambda c: c["model_type"])
def test_any_architecture_traces_and_its_factors_make_the_formula_exact(cfg):
    """Architectures the tensor-by-tensor formula does not know (GPT-2, Phi-3, Gemma 2 with eager attention, a MoE):
    the trace runs; trace_factors, applied as the planner applies scale factors, give the traced peak."""
    st = Execution(method="full", checkpointing="off", micro_batch_size=2, grad_accum=1, dtype="bfloat16")
    tr = trace_memory(cfg, st, 64, LORA)
    shape = shape_from_config(cfg)
    assert tr.params == shape.total_params
    est = estimate_memory(shape, st, 64, 1, 1, False, LORA)
    factors = trace_factors(tr, est)
    fixed = estimate_memory(shape, st, 64, 1, 1, False, LORA, scale=factors)
    assert abs(fixed.allocated_peak / tr.peak.total - 1) <= 0.01, (factors, fixed.allocated_peak, tr.peak.total)
    if cfg["model_type"] == "gpt2":  # GELU MLP, LayerNorm, learned positions: far from the Llama formula
        assert abs(est.allocated_peak / tr.peak.total - 1) > 0.1 and factors


def test_config_key_names_the_family_not_the_checkpoint():
    assert config_key(dict(LLAMA, _name_or_path="a/b", eos_token_id=2)) == config_key(LLAMA)
    assert config_key(dict(LLAMA, hidden_size=256)) != config_key(LLAMA)
    assert config_key(QWEN2).startswith("trace|qwen2|")


def test_trace_factors_are_empty_where_the_formula_is_right():
    assert trace_factors(*traced(LLAMA, "lora", "off", 1)) == {}


@pytest.mark.parametrize("st,why", [(Execution(method="full", zero_stage=2, dtype="bfloat16"), "ZeRO-2"),
                                    (Execution(method="qlora", dtype="bfloat16"), "4-bit"),
                                    (Execution(method="lora", optimizer="adamw8bit", dtype="bfloat16"), "adamw8bit")])
def test_untraceable_plans_say_why(st, why):
    with pytest.raises(TraceError, match=why):
        trace_memory(LLAMA, st, 64, LORA)


def test_a_model_that_cannot_be_built_or_adapted_falls_back_with_a_message():
    st = Execution(method="full", dtype="bfloat16")
    with pytest.raises(TraceError, match="cannot build a config"):
        trace_memory(dict(LLAMA, model_type="no-such-model"), st, 64, LORA)
    moe = dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, num_local_experts=4)
    with pytest.raises(TraceError, match="peft cannot apply LoRA"):  # expert parameters refuse LoRA dropout
        trace_memory(moe, Execution(method="lora", dtype="bfloat16"), 64, LoraSpec(8, 0.05))


def _recipe_file(tmp_path, config: dict, method: str = "lora", max_length: int = 128, gpu_memory: str = "24GiB",
                 **training):
    """A planning recipe for a `config:` model on one H100-class GPU, written to tmp_path; -> its path."""
    import yaml

    recipe = {"name": "t", "model": {"config": config, "tokenizer": "HuggingFaceTB/SmolLM2-135M"},
              "data": {"train": "org/dataset", "max_length": max_length}, "method": {"name": method},
              "training": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2, **training},
              "resources": {"gpus_per_node": 1, "gpu_memory": gpu_memory, "accelerator": "H100"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_plan_trace_flag(tmp_path, capsys):
    from unitrain.cli import main

    path = _recipe_file(tmp_path, dict(LLAMA, max_position_embeddings=512), gradient_checkpointing="full")
    assert main(["plan", str(path), "--trace"]) == 0
    out = capsys.readouterr().out
    assert "trace: llama" in out and "peak of head backward" in out and "formula − trace" in out
    assert "cannot see" in out and "cuBLAS workspace" in out
    assert main(["plan", str(path), "strategy.zero_stage=2", "--trace"]) == 0  # the plan stands; the trace says why
    assert "--trace cannot trace this plan: ZeRO-2" in capsys.readouterr().out


def test_candidates_to_trace_are_the_chosen_one_and_a_close_runner_up():
    from unitrain.plan import search
    from unitrain.recipe import validate
    from unitrain.resources import ResourceSpec, lookup_accelerator, parse_memory

    r = validate({"model": {"name": "meta-llama/Llama-3.2-1B"}, "data": {"train": "org/d", "max_length": 2048},
                  "method": {"name": ["full", "lora"]}, "strategy": {"zero_stage": 0},
                  "training": {"global_batch_size": 8, "optimizer": "adamw"}}, check_files=False)
    a = lookup_accelerator("H100")
    for mem, runner_up in (("30GiB", True), ("40GiB", False)):
        spec = ResourceSpec(1, 1, parse_memory(mem), parse_memory("256GiB"), a.name, a.peak_flops, a.mfu, None)
        best, cands, _ = search.search(r, spec, shape_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"]), 2048)
        usable = search.usable_memory(spec.gpu_memory, False)
        chosen = candidates_to_trace(best, cands, usable, r.methods)
        assert chosen[0] is best and len(chosen) == 1 + runner_up
        for c in chosen[1:]:  # preferred by the search, rejected for memory, within 10 % of the limit
            assert not c.feasible and usable < c.memory.peak <= 1.1 * usable
            assert search.sort_key(c, r.methods) < search.sort_key(best, r.methods)


@pytest.mark.slow
@pytest.mark.parametrize("method,ckpt,accum", [("full", "full", 2), ("lora", "full", 1)])
def test_published_shape_peak_within_goal(method, ckpt, accum):
    """SmolLM2-135M at seq 1024: the cases the formula before missed most (full + checkpointing with two
    micro-batches under-predicted; LoRA + checkpointing over-predicted)."""
    check(*traced(dict(KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"]), method, ckpt, accum, seq=1024))


GPT2 = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=2048, n_positions=256)


def test_a_trace_is_stored_for_the_family_and_later_plans_use_it(tmp_path, capsys):
    """`plan --trace` on an architecture the formula gets wrong (GPT-2) stores the trace's factors for the family ×
    method × checkpointing; the next plain `plan` (and a run's, from a transformers config object) applies them:
    its allocated peak is the traced one, and it says so; `calibrate --reset KEY` forgets them."""
    import json

    from unitrain.cli import main
    from unitrain.plan import calibrate, make_plan
    from unitrain.recipe import load_recipe

    path = _recipe_file(tmp_path, GPT2, "full", micro_batch_size=2, gradient_checkpointing="off")
    recipe = load_recipe(str(path), [], check_files=False)
    before = make_plan(recipe)
    assert not before.calibration.traced
    assert main(["plan", str(path), "--trace"]) == 0
    out = capsys.readouterr().out
    assert "stored for this model family, full, checkpointing off" in out
    [entry] = [e for e in calibrate.entries() if e.kind == "trace"]
    assert entry.key.startswith("trace|gpt2|") and entry.key.endswith("|full|ckpt=off") and entry.factors
    after = make_plan(recipe)
    assert after.calibration.traced["factors"] == entry.factors
    assert abs(after.memory.allocated_peak / entry.facts["trace_peak"] - 1) <= 0.01
    assert abs(before.memory.allocated_peak / entry.facts["trace_peak"] - 1) > 0.05  # the formula alone was off
    from transformers import GPT2Config

    as_run = make_plan(recipe, model_config=GPT2Config(**{k: v for k, v in GPT2.items() if k != "model_type"}))
    assert as_run.calibration.traced["key"] == entry.key  # the family's key does not depend on how the config came
    assert main(["plan", str(path)]) == 0
    assert "memory from a trace:" in capsys.readouterr().out
    other = make_plan(load_recipe(str(path), ["training.gradient_checkpointing=full"], check_files=False))
    assert not other.calibration.traced  # traced without checkpointing: says nothing about recomputation
    assert main(["calibrate", "--reset", entry.key]) == 0
    assert not make_plan(recipe).calibration.traced
    assert json.loads(after.to_json())["calibration"]["traced"]["key"] == entry.key


def test_an_agreeing_trace_stores_nothing(tmp_path, capsys):
    from unitrain.cli import main
    from unitrain.plan import calibrate

    path = _recipe_file(tmp_path, dict(LLAMA, max_position_embeddings=512), gradient_checkpointing="off")
    assert main(["plan", str(path), "--trace"]) == 0
    assert "the formula matches the trace within 1 % here: nothing stored" in capsys.readouterr().out
    assert not [e for e in calibrate.entries() if e.kind == "trace"]


def test_a_trace_that_shows_the_plan_does_not_fit_changes_it(tmp_path, capsys):
    """GPT-2 without checkpointing holds ~6× the activations the Llama formula predicts: on a GPU where the formula
    says it fits, `plan --trace` finds it does not, re-plans with the trace's numbers and traces the new choice too
    (until the choice is traced); a later plain `plan` makes that same plan from the store."""
    from unitrain.cli import main
    from unitrain.plan import make_plan
    from unitrain.recipe import load_recipe

    config = dict(GPT2, n_embd=256, n_layer=4, vocab_size=8192, n_positions=1024, bos_token_id=0, eos_token_id=0)
    path = _recipe_file(tmp_path, config, "full", max_length=1024, gpu_memory="3.5GiB", global_batch_size=8,
                        micro_batch_size=8)
    r = load_recipe(str(path), [], check_files=False)
    assert make_plan(r).execution.checkpointing == "off"  # the formula alone: fits without recomputation
    assert main(["plan", str(path), "--trace"]) == 0
    out = capsys.readouterr().out
    assert "the trace changes the plan: full, ZeRO-0, adamw, checkpointing off" in out
    after = make_plan(r)
    assert after.execution.checkpointing != "off" and after.calibration.traced
    assert f"checkpointing {after.execution.checkpointing}: " in out.split("the trace changes the plan")[-1]
    assert after.memory.peak <= after.memory.usable
