"""Checks that need the model's config, the tokenizer or the launcher, but no weights (issue 15).

`unitrain run` calls them after reading the config and tokenizer (seconds) and before tokenizing the data and loading
the weights (minutes for a large model), so a mistake is reported before anything slow or anything written;
`unitrain plan` calls the config-only ones. Each problem names the key and the fix; all are raised together as one
RecipeError.
"""

from __future__ import annotations

import difflib
import inspect
import re

from unitrain.errors import RecipeError

_LAYER = re.compile(r"(\.(?:layers?|h|blocks)\.)0(\.|$)")


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def config_key_problems(config: dict) -> list[str]:
    """`model.config` keys the model type's config class does not know. transformers keeps unknown keys as plain
    attributes, so `hiden_size: 64` silently builds a model of the default hidden size. A key is unknown when it is
    no parameter or default attribute of the class and transformers stores it as given (legacy names such as
    rope_theta or torch_dtype are converted, and pass)."""
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    mt = config.get("model_type")
    if mt not in CONFIG_MAPPING:
        return []  # load_config reports an unknown model_type
    cls = CONFIG_MAPPING[mt]
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    known |= set(PretrainedConfig().to_dict())
    try:
        known |= set(cls().to_dict())
    except Exception:  # a config class without defaults: its signature must do
        pass
    problems = []
    for key, value in config.items():
        if key in known or key in ("model_type", "kwargs") or key.startswith("_"):
            continue
        try:
            stored = key in AutoConfig.for_model(mt, **{key: value}).to_dict()
        except Exception:  # a value transformers rejects: load_config reports it
            continue
        if stored:
            close = difflib.get_close_matches(key, sorted(known - {"self", "kwargs"}), n=1, cutoff=0.7)
            hint = f" — did you mean 'model.config.{close[0]}'?" if close else ""
            problems.append(f"model.config.{key}: not a setting of {cls.__name__} (model_type {mt}){hint}")
    return problems


def module_names(config) -> tuple[list[str], list[str]]:
    """Every module name of the model, from a one-layer copy on the meta device (no memory, no weights), with the
    layer index expanded to the real depth (decoder layers are identical); and the leaf names LoRA can adapt."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not hasattr(config, "to_dict"):
        c = dict(config)
        config = AutoConfig.for_model(c.pop("model_type"), **c)
    cfg = copy.deepcopy(config)
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = []
    for n, _ in model.named_modules():
        if not n:
            continue
        names += [_LAYER.sub(rf"\g<1>{i}\g<2>", n) for i in range(layers)] if _LAYER.search(n) else [n]
    adaptable = sorted({n.split(".")[-1] for n, m in model.named_modules()
                        if type(m).__name__ in ("Linear", "Embedding", "Conv1D", "Conv2d")})
    return names, adaptable


def lora_target_problems(recipe, config) -> list[str]:
    """Each `method.lora.target_modules` entry must name a module (peft's rule: the full name, or its last dotted
    parts; a string is a regex over full names). peft only fails when none matches, after the full model load."""
    targets = recipe.method.lora.target_modules
    if not any(m in ("lora", "qlora") for m in recipe.methods) or targets in ("all-linear", "all"):
        return []
    names, leaves = module_names(config)
    if isinstance(targets, str):
        if any(re.fullmatch(targets, n) for n in names):
            return []
        return [f"method.lora.target_modules: the pattern {targets!r} matches no module name (a string is a regex "
                f"over full names such as {names[len(names) // 2]!r}); give a list of module names, e.g. "
                f"[q_proj, v_proj], or all-linear. This model's adaptable modules: {', '.join(leaves)}"]
    problems = []
    for t in targets:
        if any(n == t or n.endswith(f".{t}") for n in names):
            continue
        close = difflib.get_close_matches(str(t), leaves, n=1, cutoff=0.6)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        problems.append(f"method.lora.target_modules: {t!r} matches no module of this model{hint} (its adaptable "
                        f"modules: {', '.join(leaves)}; or use all-linear)")
    return problems


def length_problems(recipe, config) -> list[str]:
    c = _as_dict(config)
    limit = c.get("max_position_embeddings") or c.get("n_positions")
    L = recipe.data.max_length
    if not limit or L <= limit:
        return []
    fix = (f", or raise model.config.max_position_embeddings (a fresh model)" if recipe.model.config is not None
           else "")
    return [f"data.max_length={L} is above the model's max_position_embeddings={limit}: positions past {limit} "
            f"were never trained (some models cannot represent them at all); set data.max_length={limit} or "
            f"lower{fix}"]


def vocab_problems(recipe, config, tokenizer) -> list[str]:
    """A fresh model's embedding must hold every token id the tokenizer can produce (else an IndexError mid-step)."""
    V, n = _as_dict(config).get("vocab_size"), len(tokenizer)
    if recipe.model.config is None or not V or n <= V:
        return []
    return [f"model.config.vocab_size={V} is smaller than the tokenizer's vocabulary ({n} tokens, ids up to {n - 1}); "
            f"set model.config.vocab_size={n} (or more), or use the tokenizer the config was made for"]


def check_model(recipe, config, tokenizer=None) -> None:
    """Config (and tokenizer) checks before anything slow: raises one RecipeError naming every problem."""
    problems = config_key_problems(dict(recipe.model.config)) if recipe.model.config is not None else []
    problems += length_problems(recipe, config) + lora_target_problems(recipe, config)
    if tokenizer is not None:
        problems += vocab_problems(recipe, config, tokenizer)
    if problems:
        raise RecipeError(problems)


def check_token_ids(tok_data, config) -> None:
    """After tokenization: no token id past the embedding (a pretrained model whose tokenizer adds tokens)."""
    V = _as_dict(config).get("vocab_size")
    top = max((max(r["input_ids"], default=-1) for r in tok_data.train + tok_data.eval), default=-1)
    if V and top >= V:
        raise RecipeError([f"model: the tokenized data holds token id {top}, but the model's embedding has "
                           f"{V} rows (vocab_size); the tokenizer does not match the model (check model.tokenizer), "
                           f"or it adds tokens the model was not resized for"])


def check_launch(recipe, spec, world: int) -> None:
    """A recipe for several processes, started as one: the planner would plan for ranks that never come."""
    rs = recipe.resources
    if world > 1 or spec.world_size <= 1 or (rs.gpus_per_node == "auto" and rs.nodes == 1):
        return  # auto: what this process was given (resolve_resources' business)
    gpn = spec.gpus_per_node
    what = f"resources.gpus_per_node={rs.gpus_per_node}"
    if rs.nodes > 1:
        what += f" × nodes={rs.nodes}"
    launch = (f"torchrun --nproc_per_node {gpn} -m unitrain run RECIPE (or deepspeed --num_gpus {gpn} "
              f"$(which unitrain) run RECIPE)" if rs.nodes == 1 else
              f"torchrun --nnodes {rs.nodes} --nproc_per_node {gpn} --rdzv_endpoint HOST:PORT -m unitrain run RECIPE "
              f"on each node")
    raise RecipeError([f"{what}: asks for {spec.world_size} processes, but this is a single process (not "
                       f"started by torchrun or deepspeed). Launch it with: {launch}; or set "
                       f"resources.gpus_per_node=1 to train in this one process"])
