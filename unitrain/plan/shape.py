"""Model shape without weights: exact parameter counts per module from a transformers config.

Two paths give the same numbers (tests check one against the other):
- `shape_from_config` counts analytically for the Llama family (llama, mistral, qwen2, qwen3, gemma,
  gemma2, gemma3_text, phi3) from the config dict — no transformers import, so `unitrain plan` stays fast;
- `shape_from_meta` instantiates the model on the `meta` device (no memory, no weights) with two decoder
  layers and scales the per-layer counts by the real depth; it covers every other causal-LM config.

Where a config comes from (`load_model_config`): a recipe's `model.config` dict; a local folder or
.gguf file (transformers' AutoConfig, gguf support); a hub name whose config.json is already in the HF
cache; else the built-in table of well-known shapes below (so `unitrain plan` works offline for them);
else AutoConfig.from_pretrained (which may download).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from unitrain.errors import ModelError

# Published config.json values (hub repos named in the keys), enough to count parameters and activations.
_LLAMA32 = dict(model_type="llama", vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu")
KNOWN_CONFIGS: dict[str, dict] = {
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                                       hidden_act="silu"),
    "meta-llama/Llama-3.2-1B": dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    head_dim=64, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B": dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                    num_attention_heads=24, head_dim=128, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(_LLAMA32, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    tie_word_embeddings=False),
    "meta-llama/Llama-3.1-70B": dict(_LLAMA32, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64, tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=32768, hidden_act="silu"),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            tie_word_embeddings=False, max_position_embeddings=131072, hidden_act="silu"),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768,
                                      hidden_act="silu"),
}


def _table_key(name: str) -> str | None:
    """'meta-llama/Llama-3.1-8B-Instruct', 'Llama-3.1-8B', 'SmolLM2-135M-Instruct' -> table key. Strict: the model
    name must match a key's exactly (any case) up to an -Instruct/-Chat/-it tag, and an org, when given, must be the
    key's, so a misspelled name is reported rather than planned as some other model."""
    def split(s):
        org, _, model = s.lower().rpartition("/")
        return org, re.sub(r"-(instruct|chat|it)(?=-v\d|$)", "", model)

    org, model = split(name)
    for key in KNOWN_CONFIGS:
        key_org, key_model = split(key)
        if model == key_model and org in ("", key_org):
            return key
    return None


def close_table_keys(name: str) -> list[str]:
    """Built-in shapes whose name is close to `name` (for 'did you mean')."""
    import difflib

    lower = {k.lower(): k for k in KNOWN_CONFIGS}
    tail = {k.split("/")[-1].lower(): k for k in KNOWN_CONFIGS}
    hits = difflib.get_close_matches(name.lower(), lower, n=2, cutoff=0.7) or \
        difflib.get_close_matches(name.split("/")[-1].lower(), tail, n=2, cutoff=0.7)
    return [lower.get(h) or tail[h] for h in hits]


@dataclass
class Linear:
    name: str  # module name inside a decoder layer, e.g. "self_attn.q_proj"
    d_in: int
    d_out: int
    bias: bool
    group: str  # which input it reads: attn_in | attn_out | mlp_in | mlp_out

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)


@dataclass
class ModelShape:
    """Sizes and exact parameter counts; per-layer numbers are for one decoder layer."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    linears: list[Linear]  # per decoder layer
    layer_params: int  # one decoder layer, all parameters (linears + norms + extras)
    norms_per_layer: int  # RMSNorms over the hidden size per layer (2 for Llama, 4 for Gemma 2/3)
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embedding
    final_norm_params: int
    qk_norm: bool = False  # Qwen3/Gemma3: RMSNorm on q and k per head
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate, up, down)
    llama_like: bool = True  # the tensor-by-tensor activation model applies
    source: str = ""  # where the config came from
    config: dict = field(default_factory=dict, repr=False)

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.final_norm_params + \
            self.num_layers * self.layer_params

    @property
    def linear_params_per_layer(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all decoder linears + the output projection
        (h·V, also when tied). The embedding lookup costs no FLOPs."""
        return self.num_layers * self.linear_params_per_layer + self.hidden_size * self.vocab_size

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def largest_module_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's 'largest layer' in its ZeRO-3 estimator)."""
        return max([self.embedding_params, self.lm_head_params] + [lin.params for lin in self.linears])

    def lora_params(self, r: int, targets="all-linear") -> int:
        """r·(d_in + d_out) per adapted matrix (peft's all-linear = every decoder linear, not lm_head)."""
        return self.num_layers * sum(r * (lin.d_in + lin.d_out) for lin in self.lora_targets(targets))

    def lora_targets(self, targets="all-linear") -> list[Linear]:
        if targets in ("all-linear", "all", None):
            return list(self.linears)
        names = [targets] if isinstance(targets, str) else list(targets)
        return [lin for lin in self.linears if lin.name.split(".")[-1] in names]

    def summary(self) -> str:
        return (f"{self.name}: {self.total_params / 1e9:.3g}B params, {self.num_layers} layers, h={self.hidden_size}, "
                f"ffn={self.intermediate_size}, heads={self.num_heads}/{self.num_kv_heads} kv, V={self.vocab_size}")


_HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma": 256, "gemma2": 256, "gemma3_text": 256}  # transformers' class defaults
_ANALYTIC = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def shape_from_config(cfg: dict, name: str = "", source: str = "") -> ModelShape:
    """Analytic counts for the Llama family; other model types go through the meta device."""
    cfg = dict(cfg)
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:  # multimodal wrapper: the LM part
        cfg = dict(cfg["text_config"], model_type="gemma3_text")
    mt = cfg.get("model_type")
    if mt not in _ANALYTIC:
        return shape_from_meta(cfg, name, source)
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or _HEAD_DIM_DEFAULT.get(mt) or h // nh
    vocab = cfg["vocab_size"]
    default_tie = mt in ("gemma", "gemma2", "gemma3_text")
    tied = bool(cfg.get("tie_word_embeddings", default_tie))
    qkv_bias = {"qwen2": True}.get(mt, bool(cfg.get("attention_bias", False)))
    o_bias = False if mt == "qwen2" else bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    if mt == "phi3":
        lins = [Linear("self_attn.qkv_proj", h, (nh + 2 * nkv) * hd, False, "attn_in"),
                Linear("self_attn.o_proj", nh * hd, h, False, "attn_out"),
                Linear("mlp.gate_up_proj", h, 2 * inter, False, "mlp_in"),
                Linear("mlp.down_proj", inter, h, False, "mlp_out")]
    else:
        lins = [Linear("self_attn.q_proj", h, nh * hd, qkv_bias, "attn_in"),
                Linear("self_attn.k_proj", h, nkv * hd, qkv_bias, "attn_in"),
                Linear("self_attn.v_proj", h, nkv * hd, qkv_bias, "attn_in"),
                Linear("self_attn.o_proj", nh * hd, h, o_bias, "attn_out"),
                Linear("mlp.gate_proj", h, inter, mlp_bias, "mlp_in"),
                Linear("mlp.up_proj", h, inter, mlp_bias, "mlp_in"),
                Linear("mlp.down_proj", inter, h, mlp_bias, "mlp_out")]
    norms = 4 if mt in ("gemma2", "gemma3_text") else 2
    qk_norm = mt in ("qwen3", "gemma3_text")
    layer = sum(x.params for x in lins) + norms * h + (2 * hd if qk_norm else 0)
    layers = cfg["num_hidden_layers"]
    return ModelShape(name=name or cfg.get("_name_or_path", "") or mt, model_type=mt, hidden_size=h,
                      intermediate_size=inter, num_layers=layers, num_heads=nh, num_kv_heads=nkv, head_dim=hd,
                      vocab_size=vocab, tied_embeddings=tied, linears=lins, layer_params=layer,
                      norms_per_layer=norms, embedding_params=vocab * h, lm_head_params=0 if tied else vocab * h,
                      final_norm_params=h, qk_norm=qk_norm, source=source, config=cfg)


_GROUPS = [("attn_in", ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "wqkv", "c_attn")),
           ("attn_out", ("o_proj", "out_proj", "dense", "c_proj")),
           ("mlp_in", ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc")),
           ("mlp_out", ("down_proj", "fc2", "w2"))]


def _group(name: str) -> str:
    leaf = name.split(".")[-1]
    parent = name.split(".")[0]
    for group, leaves in _GROUPS:
        if leaf in leaves:
            return "mlp_out" if group == "attn_out" and parent == "mlp" else group
    return "attn_in"


@lru_cache(maxsize=32)
def _meta_counts(cfg_json: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(cfg_json)
    config = AutoConfig.for_model(**d)
    layers = config.num_hidden_layers
    config.num_hidden_layers = min(layers, 2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_module, seen = {}, set()
    for n, m in model.named_modules():  # a tied weight counts once, under the module that registers it first
        fresh = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        per_module[n] = sum(p.numel() for p in fresh)
    linears = [(n, m.in_features, m.out_features, m.bias is not None) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return per_module, linears, tied, layers


def shape_from_meta(cfg: dict, name: str = "", source: str = "") -> ModelShape:
    """Counts from the model built on the meta device (2 layers, scaled by depth: decoder layers are identical)."""
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        per_module, linears, tied, layers = _meta_counts(json.dumps(cfg, sort_keys=True, default=str))
    except Exception as e:  # unknown model_type, bad sizes
        raise ModelError(f"cannot build model shape from config (model_type={cfg.get('model_type')!r}): {e}") from e
    in_layer = re.compile(r"\.(?:layers?|h|blocks)\.(\d+)(?:\.|$)")
    layer_lin, out_emb = [], 0
    for n, d_in, d_out, bias in linears:
        m = in_layer.search(n)
        if m and m.group(1) == "0":
            inner = n[m.end():]
            layer_lin.append(Linear(inner, d_in, d_out, bias, _group(inner)))
        elif not m:
            out_emb = d_in * d_out
    layer0 = sum(c for n, c in per_module.items() if (m := in_layer.search(n)) and m.group(1) == "0")
    outside = sum(c for n, c in per_module.items() if not in_layer.search(n))
    h = cfg.get("hidden_size") or cfg.get("n_embd")
    vocab = cfg["vocab_size"]
    emb = vocab * h
    head = 0 if tied else out_emb
    nh = cfg.get("num_attention_heads") or cfg.get("n_head")
    nkv = cfg.get("num_key_value_heads") or nh
    return ModelShape(name=name or cfg.get("model_type", "model"), model_type=cfg.get("model_type", "?"),
                      hidden_size=h, intermediate_size=cfg.get("intermediate_size") or 4 * h, num_layers=layers,
                      num_heads=nh, num_kv_heads=nkv, head_dim=cfg.get("head_dim") or h // nh, vocab_size=vocab,
                      tied_embeddings=tied, linears=layer_lin, layer_params=layer0, norms_per_layer=2,
                      embedding_params=emb, lm_head_params=head, final_norm_params=outside - emb - head,
                      gated_mlp=sum(lin.group == "mlp_in" for lin in layer_lin) >= 2 or
                      any("gate_up" in lin.name for lin in layer_lin),
                      llama_like=False, source=source, config=cfg)


def _gguf_config(path: Path) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except Exception as e:
        raise ModelError(f"cannot read the model config from GGUF file {path}: {e} "
                         f"(needs the 'gguf' package: pip install gguf)") from e


def _cached_hub_config(name: str) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _with_defaults(cfg: dict) -> dict:
    """Fill what a partial config dict leaves to transformers' class defaults."""
    if cfg.get("model_type") not in _ANALYTIC or all(k in cfg for k in _REQUIRED):
        return cfg
    from transformers import AutoConfig

    c = dict(cfg)
    try:
        return AutoConfig.for_model(c.pop("model_type"), **c).to_dict()
    except Exception as e:
        raise ModelError(f"model.config: {type(e).__name__}: {e}") from None


def load_model_config(model_cfg, base_dir: str | None = None) -> tuple[dict, str]:
    """(config dict, where it came from) for a recipe's `model` section. Never loads or converts weights."""
    if model_cfg.config is not None:
        return _with_defaults(dict(model_cfg.config)), "recipe model.config"
    name = model_cfg.name
    where, gguf = name, None
    if name.startswith("package:") or name.endswith(".gguf") or model_cfg.gguf_file or Path(name).expanduser().exists() \
            or (base_dir and (Path(base_dir) / name).exists()):
        from unitrain.sources import gguf_cache, resolve_source

        where, gguf = resolve_source(name, model_cfg.gguf_file, base_dir)
    if gguf:
        converted = gguf_cache(where, gguf, model_cfg) / "config.json"  # the trainer's one-time conversion
        if converted.is_file():
            return json.loads(converted.read_text()), f"GGUF {gguf} (converted copy)"
        return _gguf_config(Path(where) / gguf), f"GGUF {gguf}"
    if (Path(where) / "config.json").is_file():
        return json.loads((Path(where) / "config.json").read_text()), f"{where}/config.json"
    cached = _cached_hub_config(name)
    if cached is not None:
        return cached, f"HF cache {name}"
    key = _table_key(name)
    if key is not None:
        return dict(KNOWN_CONFIGS[key]), f"built-in table ({key})"
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code).to_dict(), name
    except Exception as e:
        close = close_table_keys(name)
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ModelError(f"model.name: cannot load the config of {name!r} ({type(e).__name__}: {e}). {hint}Give a "
                         f"local folder, a .gguf file, a cached hub model, model.config (a config dict), or one of "
                         f"the built-in shapes: {', '.join(KNOWN_CONFIGS)}") from None


def model_shape(model_cfg=None, config: dict | None = None, base_dir: str | None = None) -> ModelShape:
    """Shape for a recipe's `model` section (or a config dict); honours model.max_layers."""
    if config is None:
        config, source = load_model_config(model_cfg, base_dir)
    else:
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        source = "given config"
    if model_cfg is not None and model_cfg.max_layers:
        config = dict(config, num_hidden_layers=min(model_cfg.max_layers, config["num_hidden_layers"]))
    name = (model_cfg.name if model_cfg is not None and model_cfg.name else None) or config.get("_name_or_path", "")
    return shape_from_config(config, name=name, source=source)
