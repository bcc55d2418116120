"""patch_model / unpatch_model on tiny transformers models (Llama, Qwen2, Mistral, Gemma), with peft.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1 via the fixture) in fp32, so a patched
model must give the unpatched model's loss and gradients to fp32 round-off.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import transformers  # noqa: E402

from unitrain_kernels import KernelError  # noqa: E402
from unitrain_kernels import KERNEL_NAMES, patch_model, patched_kernel, unpatch_model  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
FAMILIES = ["Llama", "Qwen2", "Mistral"]


pytestmark = pytest.mark.usefixtures("triton_mode")


def tiny(family, **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**TINY, **overrides})
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def batch(vocab=300):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt mask, as the data pipeline writes it
    return ids, labels


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_replaces_the_right_modules_and_keeps_the_training_signal(family):
    model = tiny(family)
    ids, labels = batch()
    before = loss_and_grads(model, ids, labels)
    modeling = sys.modules[type(model).__module__]
    original_rope = modeling.apply_rotary_pos_emb

    report = patch_model(model, mode="on")
    n_layers = model.config.num_hidden_layers
    assert len(report.active["rmsnorm"]) == 2 * n_layers + 1
    assert report.active["swiglu"] == [f"model.layers.{i}.mlp" for i in range(n_layers)]
    assert report.active["rope"] == [f"{modeling.__name__}.apply_rotary_pos_emb"]
    assert report.active["fused_ce"] == [type(model).__name__]
    assert report.fallback == {"lora": ["no matching module in this model"]}  # no peft adapters here
    assert patched_kernel(model.model.norm) == "rmsnorm" and patched_kernel(model.model.layers[1].mlp) == "swiglu"
    assert patched_kernel(model) == "fused_ce" and patched_kernel(model.lm_head) is None
    assert modeling.apply_rotary_pos_emb is not original_rope

    after = loss_and_grads(model, ids, labels)
    assert after[0].logits is None  # the fused loss never forms the logits
    assert_same_training_signal(before, after)
    logits_patched = model(input_ids=ids).logits  # no labels: the original head, with the other kernels

    unpatch_model(model)
    assert all(patched_kernel(m) is None and "forward" not in m.__dict__ for m in model.modules())
    assert modeling.apply_rotary_pos_emb is original_rope
    restored = loss_and_grads(model, ids, labels)
    assert restored[0].logits.shape == (2, 9, 300)
    assert_same_training_signal(before, restored)
    torch.testing.assert_close(logits_patched, restored[0].logits, rtol=1e-5, atol=1e-5)


def test_gemma_style_norm_is_detected_and_gelu_mlp_falls_back():
    model = tiny("Gemma", head_dim=16, hidden_activation="gelu_pytorch_tanh")
    with torch.no_grad():  # Gemma initialises its norm weights to 0: make the (1 + w) offset matter
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.normal_(0, 0.5)
    ids, labels = batch()
    before = loss_and_grads(model, ids, labels)
    report = patch_model(model, mode="on")
    assert model.model.norm._unitrain_spec[1:] == (1.0, False)  # (1 + w), multiplied in fp32
    assert "swiglu" not in report.active
    assert all("not SiLU" in why for why in report.fallback["swiglu"])
    assert report.is_active("rope") and report.is_active("fused_ce")
    assert_same_training_signal(before, loss_and_grads(model, ids, labels))
    unpatch_model(model)


def test_moe_model_keeps_its_own_loss_but_gets_the_other_kernels():
    model = tiny("Qwen2Moe", head_dim=16)
    report = patch_model(model, mode="on")
    assert "fused_ce" not in report.active  # its forward adds the router's auxiliary loss
    assert "MoeCausalLMOutputWithPast" in report.fallback["fused_ce"][0]
    assert report.is_active("rmsnorm") and report.is_active("rope") and report.is_active("swiglu")
    unpatch_model(model)


def test_peft_lora_model_keeps_calling_the_lora_layers():
    peft = pytest.importorskip("peft")
    model = tiny("Llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, labels = batch()
    before = loss_and_grads(model, ids, labels)
    report = patch_model(model, mode="on")
    inner = model.get_base_model()
    assert report.active["fused_ce"] == ["base_model.model"] and patched_kernel(inner) == "fused_ce"
    assert patched_kernel(model) is None  # PeftModelForCausalLM itself is left alone
    mlp = inner.model.layers[0].mlp
    assert patched_kernel(mlp) == "swiglu" and type(mlp.gate_proj).__module__.startswith("peft")
    assert len(report.active["lora"]) == 5 * 2 and patched_kernel(mlp.gate_proj) == "lora"  # 5 targets × 2 layers
    assert patched_kernel(mlp.gate_proj.base_layer) is None and "lora" not in report.fallback
    after = loss_and_grads(model, ids, labels)
    assert any("lora_B" in n for n in after[1]) and not any("lm_head" in n for n in after[1])
    assert_same_training_signal(before, after)
    unpatch_model(model)
    assert all(patched_kernel(m) is None for m in model.modules())


def _lora_model(dropout=0.0, **config):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("Llama"), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                               target_modules="all-linear", **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_fused_lora_gives_peft_training_signal_with_dropout_and_falls_back_when_it_must():
    model = _lora_model(dropout=0.3)
    ids, labels = batch()
    torch.manual_seed(5)
    before = loss_and_grads(model.train(), ids, labels)
    report = patch_model(model, kernels=["lora"], mode="on")
    assert len(report.active["lora"]) == 7 * 2  # q, k, v, o, gate, up, down in both layers
    torch.manual_seed(5)  # the same dropout masks: the kernel draws them through the layer's own nn.Dropout
    after = loss_and_grads(model, ids, labels)
    assert_same_training_signal(before, after)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():  # run time: merged adapters (or a second active adapter) go to peft's forward
        x = torch.randn(3, 64)
        q_proj.merge()
        torch.testing.assert_close(q_proj(x), q_proj.base_layer(x))
        q_proj.unmerge()
    unpatch_model(model)
    assert all(patched_kernel(m) is None for m in model.modules())


def test_fused_lora_declines_dora_and_non_linear_bases():
    dora = _lora_model(use_dora=True)
    report = patch_model(dora, kernels=["lora"], mode="on")
    assert "lora" not in report.active and all("variant" in why for why in report.fallback["lora"])
    unpatch_model(dora)
    peft = pytest.importorskip("peft")

    class Scaled(torch.nn.Linear):  # a base layer that is not a plain nn.Linear (as a quantized one)
        pass

    model = tiny("Llama")
    layer = model.model.layers[0].mlp
    layer.up_proj = Scaled(64, 96, bias=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["up_proj"]))
    report = patch_model(model, kernels=["lora"], mode="on")
    assert len(report.active["lora"]) == 1 and "not nn.Linear" in report.fallback["lora"][0]
    unpatch_model(model)


def test_fused_lora_saves_what_peft_saves():
    """Saved-for-backward bytes (the planner's activation model) are the same with and without the kernel."""
    from unitrain.train.memory_check import SavedTensors

    model = _lora_model()
    ids, labels = batch()
    saved = []
    for patched in (False, True):
        if patched:
            patch_model(model, kernels=["lora"], mode="on")
        with SavedTensors(model).watch() as rec:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        saved.append(rec.bytes)
    assert saved[0] == saved[1] > 0
    unpatch_model(model)


def test_hf_loss_options_num_items_shift_labels_and_tuple_output():
    model = tiny("Llama")
    ids, labels = batch()
    n_items = torch.tensor(11)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    want = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
    want_shift = model(input_ids=ids, labels=labels, shift_labels=shifted).loss
    patch_model(model, kernels=["fused_ce"], mode="on")
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss, want)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, shift_labels=shifted).loss, want_shift)
    as_tuple = model(ids, None, None, None, None, labels, return_dict=False)  # positional, as old callers do
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model(input_ids=ids, labels=labels).loss)
    unpatch_model(model)


def test_rope_swap_is_shared_and_reference_counted():
    a, b = tiny("Llama"), tiny("Llama")
    modeling = sys.modules[type(a).__module__]
    original = modeling.apply_rotary_pos_emb
    patch_model(a, kernels=["rope"], mode="on")
    patch_model(b, kernels=["rope"], mode="on")
    patch_model(b, kernels=["rope"], mode="on")  # patching again replaces, it does not stack
    unpatch_model(a)
    assert modeling.apply_rotary_pos_emb is not original  # b still uses it
    unpatch_model(b)
    assert modeling.apply_rotary_pos_emb is original


def test_deepcopy_of_a_patched_model_runs_its_own_modules():
    model = tiny("Llama")
    patch_model(model, kernels=["rmsnorm", "swiglu"], mode="on")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.mul_(2.0)
    ids, _ = batch()
    assert twin.model.norm.forward.__self__ is twin.model.norm
    assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    unpatch_model(model)
    unpatch_model(twin)


def test_modes_and_errors(monkeypatch):
    model = tiny("Llama")
    report = patch_model(model, mode="off")
    assert not report.active and set(report.fallback) == set(KERNEL_NAMES)
    with pytest.raises(KernelError, match="mode"):
        patch_model(model, mode="fast")
    with pytest.raises(KernelError, match="unknown"):
        patch_model(model, kernels=["layernorm"], mode="on")
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        auto = patch_model(model, mode="auto")
        assert not auto.active and all("CUDA" in r[0] for r in auto.fallback.values())
        assert "fallback" in str(auto)
        with pytest.raises(KernelError, match="kernels: on"):
            patch_model(model, mode="on")
    assert all(patched_kernel(m) is None for m in model.modules())


def test_runtime_fallback_when_the_tensors_leave_triton(monkeypatch):
    model = tiny("Llama")
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    patch_model(model, mode="on")
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors without the interpreter: every forward falls back
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None  # the original head ran
    torch.testing.assert_close(out.loss, want)
    unpatch_model(model)


DEEPSPEED_RUN = textwrap.dedent("""
    import json, os, sys
    import deepspeed, torch, torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from unitrain_kernels import patch_model
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    model, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    report = patch_model(model, mode="on")
    ds = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": int(sys.argv[1])},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, 300, (2, 9))
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    print("RESULT", json.dumps(dict(loss=out.loss.item(), want=reference(input_ids=ids, labels=ids).loss.item(),
                                    logits=out.logits is not None, active=sorted(report.active))))
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_patched_model_trains_under_deepspeed_zero(stage, tmp_path):
    """ZeRO-2: every kernel runs. ZeRO-3 partitions lm_head.weight, so the fused loss hands over to the
    original head at run time (logits come back); the other kernels run inside the modules' hooks."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + stage),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", DEEPSPEED_RUN, str(stage)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(line[len("RESULT"):])
    assert result["active"] == sorted(set(KERNEL_NAMES) - {"lora"})  # no adapters in this model
    assert abs(result["loss"] - result["want"]) < 1e-5
    assert result["logits"] is (stage == 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_auto_mode_patches_a_bf16_model_and_keeps_the_loss(family):
    model = tiny(family, hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=1000).to("cuda", torch.bfloat16)
    ids, labels = batch(vocab=1000)
    ids, labels = ids.cuda(), labels.cuda()
    before = loss_and_grads(model, ids, labels)
    report = patch_model(model, mode="auto")
    assert all(report.is_active(k) for k in KERNEL_NAMES if k != "lora"), str(report)
    after = loss_and_grads(model, ids, labels)
    assert after[0].logits is None
    torch.testing.assert_close(after[0].loss.float(), before[0].loss.float(), rtol=2e-2, atol=2e-2)
    for name, g in before[1].items():  # bf16: compare each gradient's direction and scale
        cos = torch.nn.functional.cosine_similarity(g.flatten().float(), after[1][name].flatten().float(), dim=0)
        assert cos > 0.98, (name, cos.item())
    unpatch_model(model)


def test_patching_leaves_the_global_rng_where_it_was():
    """The probes draw random inputs; a run with kernels must draw the same dropout masks as one without."""
    model = _lora_model(dropout=0.1)
    torch.manual_seed(3)
    patch_model(model, mode="on")
    after_patch = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after_patch, torch.rand(4))
    unpatch_model(model)
