"""Put the Triton kernels into a transformers causal LM, found by structure, and take them out again.

One patcher for every Llama-like family (Llama, Qwen2/3, Mistral, Gemma, ...):
  rmsnorm   modules whose class name ends in "RMSNorm" with a 1-D `weight` and `variance_epsilon`/`eps`;
            a probe of one instance per class tells Llama-style w·x̂ from Gemma-style (1 + w)·x̂;
  swiglu    modules with gate_proj/up_proj/down_proj and a SiLU `act_fn` (the projections may be peft
            LoRA layers or quantized linears: they are still called), checked once per class by a probe;
  rope      the modeling module's global `apply_rotary_pos_emb`, replaced when a probe shows it is the
            rotate_half RoPE (the swap is per modeling module, reference-counted across models);
  fused_ce  the *ForCausalLM's forward: with labels it runs the base model and computes the loss from
            lm_head.weight with the fused linear cross-entropy, returning logits=None;
  lora      peft LoRA layers over a plain nn.Linear (one active adapter, no DoRA/variant, not merged):
            base GEMM and scaled low-rank update in one kernel (lora.py).
Forwards are replaced on the instance (module identity, parameters and hooks stay, so peft, DeepSpeed
and state_dict see the same model) and dispatch at run time: tensors Triton cannot take (CPU without
the interpreter, an odd dtype, a ZeRO-3-partitioned lm_head) go to the original forward.
"""

import contextlib
import inspect
import logging
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._triton import triton_unavailable_reason
from .fused_ce import fused_ce_supported, fused_linear_cross_entropy
from .lora import lora_linear, lora_linear_reference, lora_supported
from .rmsnorm import MAX_COLS, RMSNormFunction, rmsnorm_reference, rmsnorm_supported
from .rope import apply_rope, rope_reference
from .swiglu import SwiGLUFunction, swiglu_supported

log = logging.getLogger("unitrain.kernels")


class KernelError(ValueError):
    """A kernel request that cannot be honoured (bad mode, Triton unavailable with `on`). The kernels package stands
    alone: callers translate this into their own error type (unitrain.model.apply_kernels does)."""


KERNEL_NAMES = ("rmsnorm", "rope", "swiglu", "fused_ce", "lora")
MODES = ("on", "auto", "off")
_MARK = "_unitrain_kernel"        # set on every module whose forward we replaced
_PREV = "_unitrain_prev_forward"  # the instance-level forward we replaced, if there was one
_ROPE_MODULES = "_unitrain_rope_modules"
_ROPE_PATCHES: dict[str, list] = {}  # modeling module name -> [original function, models using it]


@dataclass
class PatchReport:
    """Which kernels are active where, and where each one fell back to the original code and why."""

    mode: str
    active: dict[str, list[str]] = field(default_factory=dict)
    fallback: dict[str, list[str]] = field(default_factory=dict)

    def is_active(self, kernel: str) -> bool:
        return bool(self.active.get(kernel))

    def _add(self, table, kernel, text):
        table.setdefault(kernel, []).append(text)

    def lines(self) -> list[str]:
        out = []
        for k in KERNEL_NAMES:
            if k in self.active:
                out.append(f"{k}: active on {len(self.active[k])} ({_short(self.active[k])})")
            for why in self.fallback.get(k, []):
                out.append(f"{k}: fallback: {why}")
        return out

    def __str__(self) -> str:
        return f"kernels ({self.mode}):\n  " + "\n  ".join(self.lines() or ["nothing requested"])


def _short(names, n=3):
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


def patch_model(model: nn.Module, kernels=KERNEL_NAMES, mode: str = "auto") -> PatchReport:
    """Replace the forwards of `model`'s RMSNorm, SwiGLU MLP, rotary function and causal-LM loss with the
    Triton kernels. `mode`: "on" (raise if Triton cannot run here), "auto" (only with CUDA and Triton),
    "off" (change nothing). Patching again first undoes the previous patch."""
    kernels = (kernels,) if isinstance(kernels, str) else tuple(kernels)
    unknown = [k for k in kernels if k not in KERNEL_NAMES]
    if mode not in MODES or unknown:
        raise KernelError(f"kernels: mode must be one of {MODES} (got {mode!r}) and kernels a subset of "
                            f"{KERNEL_NAMES} (unknown: {unknown}); fix the recipe's `kernels` setting")
    report = PatchReport(mode)
    unpatch_model(model)
    if mode == "off":
        for k in kernels:
            report._add(report.fallback, k, "kernels: off")
        return report
    reason = triton_unavailable_reason()
    if reason is None and mode == "auto" and not torch.cuda.is_available():
        reason = "no CUDA device"
    if reason is not None:
        if mode == "on":
            raise KernelError(f"kernels: on, but the Triton kernels cannot run here: {reason}. "
                                "Use `kernels: auto` to fall back to the PyTorch code, or run on a CUDA GPU.")
        for k in kernels:
            report._add(report.fallback, k, reason)
        log.info("%s", report)
        return report

    # The probes draw random inputs: under fork_rng, so patching leaves the run's RNG stream (LoRA dropout masks,
    # later inits) exactly where the unpatched run has it.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        if "rmsnorm" in kernels:
            _patch_modules(model, report, "rmsnorm", _is_rmsnorm, _probe_rmsnorm, _rmsnorm_forward)
        if "swiglu" in kernels:
            _patch_modules(model, report, "swiglu", _is_swiglu_mlp, _probe_swiglu, _swiglu_forward)
        if "rope" in kernels:
            _patch_rope(model, report)
        if "fused_ce" in kernels:
            _patch_modules(model, report, "fused_ce", _is_causal_lm, _probe_causal_lm, _fused_ce_forward)
        if "lora" in kernels:
            # one peft class wraps every base layer type: probe per (LoRA class, base class)
            _patch_modules(model, report, "lora", _is_lora_linear, _probe_lora_linear, _lora_forward,
                           kind=lambda m: (type(m), type(m.base_layer)))
    for k in kernels:
        if k not in report.active and k not in report.fallback:
            report._add(report.fallback, k, "no matching module in this model")
    log.info("%s", report)
    return report


def unpatch_model(model: nn.Module) -> None:
    """Restore every forward and rotary function that patch_model replaced in `model`."""
    for m in model.modules():
        if _MARK in m.__dict__:
            prev = m.__dict__.pop(_PREV, None)
            if prev is not None:
                m.forward = prev
            else:
                m.__dict__.pop("forward", None)
            for attr in (_MARK, "_unitrain_spec"):
                m.__dict__.pop(attr, None)
    for name in model.__dict__.pop(_ROPE_MODULES, []):
        entry = _ROPE_PATCHES.get(name)
        if entry is None:
            continue
        entry[1] -= 1
        if entry[1] <= 0:
            setattr(sys.modules[name], "apply_rotary_pos_emb", entry[0])
            del _ROPE_PATCHES[name]


def patched_kernel(module: nn.Module) -> str | None:
    """The kernel whose forward replaced this module's, or None."""
    return module.__dict__.get(_MARK)


# ---------------------------------------------------------------- module forwards (patched per instance)

def _patch_modules(model, report, kernel, matches, probe, forward, kind=type):
    """Patch every module `matches` accepts; `probe(module)` (once per `kind(module)`, the class by default)
    returns (spec, None) or (None, reason)."""
    probed: dict[type, tuple] = {}
    for name, m in model.named_modules():
        if not matches(m):
            continue
        where = name or type(m).__name__
        if hasattr(m, "_hf_hook"):  # accelerate's device-map hook wraps the forward: leave it alone
            report._add(report.fallback, kernel, f"{where}: has an accelerate hook on its forward")
            continue
        cls, key = type(m), kind(m)
        if key not in probed:
            try:
                probed[key] = probe(m)
            except Exception as e:  # a probe that cannot run (meta/partitioned weights, odd forward)
                probed[key] = (None, f"probe failed: {type(e).__name__}: {e}")
        spec, why = probed[key]
        if spec is None:
            report._add(report.fallback, kernel, f"{where} ({cls.__name__}): {why}")
            continue
        m.__dict__[_PREV] = m.__dict__.get("forward")
        m._unitrain_spec = spec
        m.forward = types.MethodType(forward, m)
        m.__dict__[_MARK] = kernel
        report._add(report.active, kernel, where)


_warned: set = set()


def _warn_once(kernel, why):
    """A patched forward that hands a call back to the original code says so once per reason."""
    if (kernel, why) not in _warned:
        _warned.add((kernel, why))
        log.warning("%s falls back to the original forward at run time: %s", kernel, why)


def _original_forward(m):
    prev = m.__dict__.get(_PREV)
    return prev if prev is not None else types.MethodType(type(m).forward, m)


@contextlib.contextmanager
def _eval_mode(m):
    """Probe in eval mode (no dropout), then give every submodule its own training flag back."""
    modes = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        yield
    finally:
        for mod, was in modes:
            mod.training = was


def _probe_weight_ok(w):
    if w.device.type == "meta" or w.numel() == 0:
        return f"weights are not materialised ({w.device.type}, {w.numel()} elements)"
    return None


# rmsnorm

def _eps_attr(m):
    return next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(m, a, None), float)), None)


def _is_rmsnorm(m):
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and _eps_attr(m) is not None)


def _probe_rmsnorm(m):
    """Llama-style (w·x̂, cast before the weight) or Gemma-style ((1 + w)·x̂ in fp32): compare outputs."""
    w = m.weight
    bad = _probe_weight_ok(w)
    if bad:
        return None, bad
    if w.shape[0] > MAX_COLS:
        return None, f"hidden size {w.shape[0]} > {MAX_COLS}"
    eps_attr = _eps_attr(m)
    x = torch.randn(3, w.shape[0], device=w.device, dtype=torch.float32)
    got = type(m).forward(m, x).float()
    for offset, cast in ((0.0, True), (1.0, False)):
        want = rmsnorm_reference(x, w.float(), getattr(m, eps_attr), offset, cast).float()
        if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return (eps_attr, offset, cast), None
    return None, "forward is neither w·x̂ nor (1 + w)·x̂ RMSNorm"


def _rmsnorm_forward(self, hidden_states):
    eps_attr, offset, cast = self._unitrain_spec
    why = rmsnorm_supported(hidden_states, self.weight)
    if why is None:
        return RMSNormFunction.apply(hidden_states, self.weight, getattr(self, eps_attr), offset, cast)
    _warn_once("rmsnorm", why)
    return _original_forward(self)(hidden_states)


# swiglu

def _is_silu(act):
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _is_swiglu_mlp(m):
    return (all(isinstance(getattr(m, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj"))
            and hasattr(m, "act_fn"))


def _probe_swiglu(m):
    """down(silu(gate(x)) · up(x)): check the activation, then the class forward on one token (eval mode,
    so LoRA dropout does not change the result)."""
    if not _is_silu(m.act_fn):
        return None, f"act_fn is {type(m.act_fn).__name__}, not SiLU"
    param = next(m.parameters(), None)
    if param is None or _probe_weight_ok(param):
        return None, "weights are not materialised"
    n_in = getattr(m, "hidden_size", None) or getattr(m.gate_proj, "in_features", None)
    if not isinstance(n_in, int):
        return None, "cannot tell the MLP's input size"
    with _eval_mode(m):
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        x = torch.randn(1, 1, n_in, device=param.device, dtype=dtype)
        got = type(m).forward(m, x)
        want = m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
    if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
        return None, "forward is not down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    return (), None


def _swiglu_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    why = swiglu_supported(gate, up)
    if why is None:
        return self.down_proj(SwiGLUFunction.apply(gate, up))
    _warn_once("swiglu", why)
    return self.down_proj(self.act_fn(gate) * up)


# fused linear cross-entropy

def _is_causal_lm(m):
    # lm_head and the base model must be direct children: peft's PeftModelForCausalLM only forwards them
    prefix = getattr(m, "base_model_prefix", None)
    return (type(m).__name__.endswith("ForCausalLM") and "lm_head" in m._modules and prefix in m._modules
            and "labels" in inspect.signature(type(m).forward).parameters)


def _probe_causal_lm(m):
    """The loss must be HF's ForCausalLMLoss of lm_head(hidden) alone (a MoE model's forward returns a
    MoeCausalLMOutputWithPast and adds a router loss) and lm_head a plain nn.Linear."""
    ret = inspect.signature(type(m).forward).return_annotation
    ret = ret if isinstance(ret, str) else getattr(ret, "__name__", "")
    if ret != "CausalLMOutputWithPast":
        return None, f"forward returns {ret or 'an unannotated output'}, not CausalLMOutputWithPast"
    if type(m.lm_head) is not nn.Linear:
        return None, f"lm_head is {type(m.lm_head).__name__} (LoRA/quantized/wrapped), not nn.Linear"
    if m.__dict__.get("_loss_function") is not None or getattr(m, "loss_type", None) not in (None, "ForCausalLM"):
        return None, "the model uses a custom loss function"
    softcap = getattr(m.config, "final_logit_softcapping", None)
    return (float(softcap) if softcap else None,), None


def _fused_ce_forward(self, *args, **kwargs):
    """Forward with labels: base model → hidden states → fused loss (no logits). Otherwise the original."""
    original = _original_forward(self)
    sig = inspect.signature(type(self).forward)
    bound = sig.bind(self, *args, **kwargs).arguments
    bound.pop(next(iter(sig.parameters)))  # self
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    call = {**{k: v for k, v in bound.items() if k != var_kw}, **bound.get(var_kw, {})}
    labels = call.get("labels")
    keep = call.get("logits_to_keep", 0)
    weight, bias = self.lm_head.weight, self.lm_head.bias
    why = None
    if labels is None:
        return original(*args, **kwargs)
    if not (isinstance(keep, int) and keep == 0):
        why = "logits_to_keep is set"
    elif hasattr(weight, "ds_id") or weight.numel() == 0:
        why = "lm_head.weight is partitioned (DeepSpeed ZeRO-3)"
    else:
        hidden_size = weight.shape[1]
        why = fused_ce_supported(weight.new_empty(0, hidden_size), weight, bias)
    if why is not None:
        _warn_once("fused_ce", why)
        return original(*args, **kwargs)

    for k in ("labels", "logits_to_keep"):
        call.pop(k, None)
    num_items = call.pop("num_items_in_batch", None)
    shift_labels = call.pop("shift_labels", None)
    ignore_index = call.pop("ignore_index", -100)
    return_dict = call.pop("return_dict", None)
    outputs = getattr(self, self.base_model_prefix)(**call)
    hidden = outputs[0]
    if shift_labels is None:  # tokens < n predict n, as ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    (softcap,) = self._unitrain_spec
    loss = fused_linear_cross_entropy(hidden, weight.to(hidden.dtype) if weight.dtype != hidden.dtype else weight,
                                      shift_labels.to(hidden.device), bias=bias, ignore_index=ignore_index,
                                      reduction="sum" if num_items is not None else "mean", softcap=softcap)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    extra = {k: v for k, v in outputs.items() if k in CausalLMOutputWithPast.__dataclass_fields__}
    extra.pop("logits", None)
    out = CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in extra.items() if k != "loss"})
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


# fused LoRA linear

def _is_lora_linear(m):
    return (isinstance(getattr(m, "base_layer", None), nn.Module) and isinstance(getattr(m, "lora_A", None),
            nn.ModuleDict) and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(m, "scaling", None), dict) and hasattr(m, "active_adapters"))


def _probe_lora_linear(m):
    """Over a plain nn.Linear (not a quantized or Conv1D base), peft's forward must be base + B(A(x))·s."""
    base = m.base_layer
    if type(base) is not nn.Linear:
        return None, f"base layer is {type(base).__name__}, not nn.Linear (quantized bases keep peft's forward)"
    if getattr(m, "fan_in_fan_out", False):
        return None, "fan_in_fan_out (Conv1D) weights"
    bad = _probe_weight_ok(base.weight)
    if bad:
        return None, bad
    why = _lora_runtime_reason(m, (), {})
    if why is not None:
        return None, why
    ad = m.active_adapters[0]
    with _eval_mode(m):
        x = torch.randn(2, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
        got = type(m).forward(m, x)
        want = lora_linear_reference(x, base.weight, m.lora_A[ad].weight.to(x.dtype), m.lora_B[ad].weight.to(x.dtype),
                                     m.scaling[ad], base.bias)
    if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
        return None, "forward is not base(x) + lora_B(lora_A(dropout(x))) · scaling"
    return (), None


def _lora_runtime_reason(m, args, kwargs):
    """Why this call must go to peft's forward (None when the fused kernel computes the same thing)."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (mixed-adapter batch or variant kwargs)"
    if m.merged or m.disable_adapters:
        return "adapters merged or disabled"
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    ad = active[0]
    if ad in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(ad):
        return "a LoRA variant (DoRA, ...)"
    a, b = m.lora_A[ad], m.lora_B[ad]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or b.bias is not None:
        return "adapters are not bias-free nn.Linear"
    if any(mod._forward_hooks or mod._forward_pre_hooks for mod in (m.base_layer, a, b)):
        return "hooks on the base layer or adapters (e.g. DeepSpeed ZeRO-3 gathering)"
    return None


def _lora_forward(self, x, *args, **kwargs):
    why = _lora_runtime_reason(self, args, kwargs)
    if why is None:
        ad = self.active_adapters[0]
        base, a, b = self.base_layer, self.lora_A[ad].weight, self.lora_B[ad].weight
        why = lora_supported(x, base.weight, a, b, base.bias)
    if why is not None:
        _warn_once("lora", why)
        return _original_forward(self)(x, *args, **kwargs)
    drop = self.lora_dropout[ad]
    dropped = None if isinstance(drop, nn.Identity) or not drop.training or not getattr(drop, "p", 1) else drop(x)
    return lora_linear(x, base.weight, a, b, self.scaling[ad], base.bias, dropped)


# ---------------------------------------------------------------- rope (module-global function)

def _modeling_modules(model):
    names = []
    for m in model.modules():
        name = type(m).__module__
        mod = sys.modules.get(name)
        if name not in names and mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None)):
            names.append(name)
    return names


def _probe_rope(fn):
    """Compare with the rotate_half RoPE on random q/k (GQA) and random cos/sin."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    cos, sin = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    got = fn(q, k, cos, sin)
    want = rope_reference(q, k, cos, sin)
    return all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))


def _make_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """unitrain's Triton RoPE where it can run, else the model's own function."""
        if len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"}:
            unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
            return apply_rope(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._unitrain_original = original
    return apply_rotary_pos_emb


def _patch_rope(model, report):
    patched = model.__dict__.setdefault(_ROPE_MODULES, [])
    for name in _modeling_modules(model):
        mod = sys.modules[name]
        fn = mod.apply_rotary_pos_emb
        original = getattr(fn, "_unitrain_original", fn)
        try:
            ok = _probe_rope(original)
        except Exception as e:
            ok, why = False, f"probe failed: {type(e).__name__}: {e}"
        else:
            why = "apply_rotary_pos_emb is not the rotate_half RoPE (partial or interleaved rotary)"
        if not ok:
            report._add(report.fallback, "rope", f"{name}: {why}")
            continue
        if name not in _ROPE_PATCHES:
            _ROPE_PATCHES[name] = [original, 0]
            mod.apply_rotary_pos_emb = _make_rope(original)
        _ROPE_PATCHES[name][1] += 1
        patched.append(name)
        report._add(report.active, "rope", f"{name}.apply_rotary_pos_emb")
    if not patched:
        model.__dict__.pop(_ROPE_MODULES, None)
