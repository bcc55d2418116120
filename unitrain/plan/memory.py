"""Per-GPU memory model, component by component, each with the formula and the inputs that produced it.

Notation: Ψ all parameters, Ψt trainable ones, N data-parallel ranks, T = b·s tokens per micro-batch,
h hidden, I FFN width, hq = heads·head_dim, hkv = kv_heads·head_dim, V vocabulary, L layers, r LoRA rank.

Precision regimes (what the trainer is expected to build; see `Precision`):
- CPU / float32: everything fp32; CPU dropout saves a float mask of the input's dtype.
- full fine-tuning without DeepSpeed on CUDA: fp32 parameters + torch.autocast(bf16) (HF Trainer's bf16=True):
  the residual stream stays fp32, every matmul input is cast to bf16 separately per projection and the
  bf16 copies of the trainable weights are cached by autocast until backward (2 B × matmul weights).
- full fine-tuning under DeepSpeed ZeRO: bf16 parameters, fp32 master + Adam moments in the optimizer.
- LoRA on CUDA: frozen base in bf16, fp32 adapters under autocast (peft default).
- QLoRA on CUDA: NF4 linears; peft's prepare_model_for_kbit_training upcasts embeddings, norms and lm_head
  to fp32, so the residual stream and bnb's Linear4bit outputs are fp32; attention runs in bf16 (autocast).

Activations are counted tensor by tensor for Llama-family blocks (RMSNorm, GQA, SDPA/flash attention,
SwiGLU, no dropout) exactly as autograd saves them; the storage-deduplicated measurement in
`calibrate.measure_cpu_memory` and benchmarks/planner_accuracy.py check them.

The peak is not a sum of the components: `step_phases` says how much of each is alive at each moment of the
steady-state step (each micro-batch's forward, the head's backward, the layers' backward, the optimizer step) and
the peak is the largest moment (`MemoryEstimate.peak_phase`); an exact MemTracker trace on fake tensors checks it
(`unitrain plan --trace`, train/trace.py; benchmarks/planner_vs_trace.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unitrain.plan.deepspeed import bucket_elements
from unitrain.plan.schema import Execution, MemoryComponent
from unitrain.plan.shape import ModelShape

GiB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks ≈ 4.127 bits


def nf4_bytes(n: int) -> int:
    """Exact bitsandbytes NF4 + double-quant bytes of an n-element matrix: packed codes, uint8 absmax per 64,
    fp32 absmax per 256 blocks, and the per-tensor tables (256-entry fp32 code of the 2nd level, 16-entry NF4
    code, fp32 offset)."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)
BNB_MIN_8BIT = 4096  # bitsandbytes keeps fp32 optimizer state for tensors smaller than this
BNB_BLOCK = 256  # bitsandbytes blockwise 8-bit optimizer state: one fp32 absmax per 256 values per moment
CUDA_CONTEXT = int(0.5 * GiB)  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator
NCCL_BUFFERS = int(0.25 * GiB)  # NCCL channels' buffers when N > 1 (outside the allocator)
FRAGMENTATION = 0.05  # caching-allocator reserved - allocated, as a fraction of the allocated peak
PROCESS_CPU = 2 * GiB  # host memory of one training process (python, torch, CUDA libraries)
DS_SUB_GROUP = 1_000_000_000  # DeepSpeed ZeRO-3 sub_group_size default (elements per optimizer sub-group)


@dataclass(frozen=True)
class Precision:
    name: str
    param: int  # bytes per stored parameter of the (base) model
    compute: int  # bytes of matmul inputs, attention tensors, MLP intermediates
    stream: int  # bytes of the residual stream (norm inputs, checkpointed layer inputs)
    mask: int  # bytes per dropout-mask element (bool on CUDA; CPU dropout multiplies by a mask in the input dtype)
    amp_casts: bool  # autocast: one bf16 copy of each matmul input per projection + cached bf16 weight copies
    adapter_param: int  # bytes per LoRA adapter parameter
    linear_out: int = 0  # bytes of linear outputs (MLP intermediates); 0 = compute

    @property
    def adapter_shares_input(self) -> bool:
        """fp32 everywhere: peft's cast to the adapter dtype is a no-op, so lora_A saves the module input itself."""
        return self.compute == 4


def precision_for(strategy: Execution, on_cpu: bool) -> Precision:
    if strategy.dtype == "float32":
        return Precision("fp32", 4, 4, 4, 4 if on_cpu else 1, False, 4)
    if strategy.method == "qlora":  # peft's prepare_model_for_kbit_training upcasts every non-4-bit tensor to
        # fp32, so the residual stream is fp32 and bnb's Linear4bit returns its input dtype (fp32)
        return Precision(f"NF4 base, fp32 rest, autocast {strategy.dtype}", 4, 2, 4, 1, False, 4, 4)
    if strategy.method == "full" and strategy.zero_stage == 0:
        return Precision("fp32 params + autocast " + strategy.dtype, 4, 2, 4, 1, True, 4)
    if strategy.method == "full":
        return Precision(strategy.dtype + " params (DeepSpeed), fp32 master", 2, 2, 2, 1, False, 2)
    return Precision(strategy.dtype + " base, adapters " + ("bf16 (DeepSpeed)" if strategy.zero_stage else "fp32"),
                     2, 2, 2, 1, False, 2 if strategy.zero_stage else 4)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    dropout: float = 0.05
    targets: object = "all-linear"

    @classmethod
    def of(cls, cfg) -> "LoraSpec":
        t = cfg.target_modules
        return cls(cfg.r, cfg.dropout, t if isinstance(t, str) else tuple(t))


def _checkpointed_layers(ckpt, layers: int) -> int:
    """off -> 0, full -> L, k -> layers 0, k, 2k, ... i.e. ceil(L / k)."""
    if ckpt in ("off", None, 0):
        return 0
    if ckpt == "full":
        return layers
    return math.ceil(layers / int(ckpt))


def layer_activations(shape: ModelShape, b: int, s: int, st: Execution, p: Precision, lora: LoraSpec,
                      input_requires_grad: bool = True) -> dict[str, int]:
    """Bytes autograd saves for one decoder layer, by part (storage-deduplicated)."""
    T, h, I, c = b * s, shape.hidden_size, shape.intermediate_size, p.compute
    hq, hkv, lo = shape.q_dim, shape.kv_dim, p.linear_out or p.compute
    full = st.method == "full"
    fused_norm, fused_mlp = "rmsnorm" in st.kernels, "swiglu" in st.kernels

    def norm(width):  # RMSNorm: fp32 input (or its fp32 copy) + rstd (+ normalised output when weight trains)
        if fused_norm:
            return T * width * p.stream + 4 * T
        return 4 * T * width + 4 * T + (T * width * p.stream if full else 0)

    parts = {"norms": (norm(h) if input_requires_grad else 0) + (shape.norms_per_layer - 1) * norm(h)}
    by_group: dict[str, list] = {}
    for lin in shape.linears:
        by_group.setdefault(lin.group, []).append(lin)
    # SDPA/flash: q, k, v (kv heads, GQA), output, and the fp32 log-sum-exp per head and query.
    parts["attention"] = T * (2 * hq + 2 * hkv) * c + 4 * b * shape.num_heads * s
    if shape.qk_norm:
        parts["attention"] += 4 * T * (hq + hkv) + 4 * T * (shape.num_heads + shape.num_kv_heads) + \
            (T * (hq + hkv) * c if full else 0)
    if shape.gated_mlp:  # act(gate) needs gate; act(gate)·up saves both factors; a fused SwiGLU recomputes act
        parts["mlp"] = (2 if fused_mlp else 3) * T * I * lo
    else:  # fc1 output (saved by the activation)
        parts["mlp"] = T * I * lo
    if full:  # inputs of the trainable linears (weight gradients need them)
        n_in = len(by_group.get("attn_in", [])) if p.amp_casts else 1
        n_mlp = len(by_group.get("mlp_in", [])) if p.amp_casts else 1
        parts["linear_inputs"] = (n_in + n_mlp) * T * h * c + T * I * c  # o_proj's input is the SDPA output
    else:
        parts["lora"] = _lora_saved(shape, T, p, lora, by_group, input_requires_grad)
    return parts


def _lora_saved(shape, T, p: Precision, lora: LoraSpec, by_group, input_requires_grad: bool = True) -> int:
    """Per adapted matrix: dropout mask + lora_A's input (d_in each) and lora_B's input (r).
    Dropout on an input that needs no grad (layer 0 with a frozen embedding) records no mask."""
    targets = {lin.name for lin in shape.lora_targets(lora.targets)}
    total = 0
    for group, lins in by_group.items():
        chosen = [lin for lin in lins if lin.name in targets]
        if not chosen:
            continue
        d_in = chosen[0].d_in
        if lora.dropout > 0:
            mask = p.mask if input_requires_grad or group != "attn_in" else 0
            total += len(chosen) * T * d_in * (mask + p.compute)  # mask + (cast) dropout output
        elif p.adapter_shares_input:  # the same input tensor for the whole group; o_proj's is the SDPA output
            total += 0 if group == "attn_out" else T * d_in * p.compute
        else:  # cast to fp32 then back to bf16 by autocast: a fresh copy per matrix
            total += len(chosen) * T * d_in * p.compute
        total += len(chosen) * T * lora.r * p.compute
    return total


def head_activations(shape: ModelShape, b: int, s: int, st: Execution, p: Precision) -> dict[str, int]:
    """Saved outside the decoder layers: ids, final norm, lm_head input, loss, rotary tables."""
    T, h, V, c = b * s, shape.hidden_size, shape.vocab_size, p.compute
    full = st.method == "full"
    norm = T * h * p.stream + 4 * T if "rmsnorm" in st.kernels else 4 * T * h + 4 * T + (T * h * p.stream if full else 0)
    parts = {"embedding_ids": 8 * T if full else 0, "final_norm": norm,
             "lm_head_input": T * h * c if full else 0, "rotary": 2 * s * shape.head_dim * p.stream}
    if "fused_ce" in st.kernels:  # chunked linear+CE: keeps only d(loss)/d(hidden), computed in the forward
        parts["loss"] = T * h * c + 8 * T
    else:  # log_softmax output in fp32 (the loss upcasts) + int64 targets
        parts["loss"] = 4 * T * V + 8 * T
    return parts


def activation_bytes(shape: ModelShape, b: int, s: int, st: Execution, p: Precision, lora: LoraSpec) -> dict:
    """Saved-for-backward bytes of one micro-batch: {'layers', 'checkpoint_inputs', 'head', 'per_layer', 'n_ckpt'}."""
    L = shape.num_layers
    n_ckpt = _checkpointed_layers(st.checkpointing, L)
    # Layer 0's input needs no grad when the embedding is frozen (LoRA) unless checkpointing makes it require one.
    input_grad = st.method == "full" or n_ckpt > 0
    first = sum(layer_activations(shape, b, s, st, p, lora, input_grad).values())
    other = sum(layer_activations(shape, b, s, st, p, lora, True).values())
    plain = L - n_ckpt  # un-checkpointed layers: with every k-th checkpointed, layer 0 is one of the checkpointed
    layers = (other * plain if n_ckpt else first + other * (L - 1))
    ckpt_inputs = n_ckpt * b * s * shape.hidden_size * p.stream
    head = head_activations(shape, b, s, st, p)
    return {"layers": layers, "checkpoint_inputs": ckpt_inputs, "head": sum(head.values()), "head_parts": head,
            "per_layer": other, "n_ckpt": n_ckpt, "total": layers + ckpt_inputs + sum(head.values())}


def optimizer_state_bytes(shape: ModelShape, st: Execution, trainable: list[int], master: bool) -> tuple[float, str]:
    """Optimizer bytes for the trainable tensors (element counts), before partitioning."""
    n = sum(trainable)
    if st.optimizer == "adamw":
        per = 12 if master else 8
        return per * n, f"{per} B × Ψt (" + ("master, " if master else "") + "m, v fp32)"
    return eight_bit_state_bytes(trainable), "2 B × Ψt (8-bit m, v) + absmax/256 + fp32 small tensors"


def eight_bit_state_bytes(tensors: list[int]) -> int:
    """bitsandbytes 8-bit Adam state over tensors of these element counts: two uint8 moments and one fp32 absmax
    per 256-value block each; tensors under 4096 elements keep fp32 moments; two shared 256-entry fp32 maps."""
    small = sum(t for t in tensors if t < BNB_MIN_8BIT)
    big = sum(tensors) - small
    blocks = sum(math.ceil(t / BNB_BLOCK) for t in tensors if t >= BNB_MIN_8BIT)
    qmaps = 2 * 256 * 4 if big else 0
    return 2 * big + 8 * blocks + 8 * small + qmaps


def zero_partitions(shape: ModelShape, method: str, lora: LoraSpec, N: int, zero_stage: int) -> list[int]:
    """The tensors a ZeRO-wrapped optimizer holds state for on one rank: per param group (decay = matrices,
    no-decay = vectors; strategy.param_groups) one flat fp32 partition of ⌈Ψ_group / N⌉ elements; ZeRO-3 further
    splits it into sub-groups of at most sub_group_size (1e9) elements."""
    vectors = 0
    if method == "full":
        per_layer = sum(lin.d_out for lin in shape.linears if lin.bias) + shape.hidden_size * shape.norms_per_layer
        vectors = shape.num_layers * (per_layer + (2 * shape.head_dim if shape.qk_norm else 0)) + \
            shape.final_norm_params
    matrices = sum(trainable_tensors(shape, method, lora)) - vectors
    parts = []
    for group in (matrices, vectors):
        left = math.ceil(group / N)
        while left > 0:
            chunk = min(left, DS_SUB_GROUP) if zero_stage == 3 else left
            parts.append(chunk)
            left -= chunk
    return parts


def trainable_tensors(shape: ModelShape, method: str, lora: LoraSpec) -> list[int]:
    if method == "full":
        per_layer = [lin.d_in * lin.d_out for lin in shape.linears] + \
            [lin.d_out for lin in shape.linears if lin.bias] + [shape.hidden_size] * shape.norms_per_layer
        if shape.qk_norm:
            per_layer += [shape.head_dim] * 2
        rest = [shape.embedding_params, shape.final_norm_params] + ([shape.lm_head_params] if shape.lm_head_params else [])
        return per_layer * shape.num_layers + rest
    per_layer = []
    for lin in shape.lora_targets(lora.targets):
        per_layer += [lora.r * lin.d_in, lora.r * lin.d_out]
    return per_layer * shape.num_layers


@dataclass
class MemoryEstimate:
    components: list[MemoryComponent]
    peak: int  # predicted peak per GPU (allocated + context + fragmentation)
    allocated_peak: int  # comparable to torch.cuda.max_memory_allocated
    cpu_needed: int  # per node: offloaded states + process overhead
    activations: dict = field(default_factory=dict)
    trainable_params: int = 0
    peak_phase: str = ""  # the moment of the step where the allocated peak is (one of PHASES)
    phases: dict = field(default_factory=dict)  # phase -> allocated bytes alive at its peak moment

    def component(self, name: str) -> MemoryComponent | None:
        return next((c for c in self.components if c.name == name), None)


def copies_per_layer(shape: ModelShape, st: Execution, psi_t: int) -> int:
    return 2 * (shape.linear_params_per_layer if st.method == "full" else psi_t // shape.num_layers)


def autocast_weight_copies(shape: ModelShape, st: Execution, n_ckpt: int, psi_t: int) -> int:
    """bf16 copies autocast makes of trainable fp32 matmul weights, saved for backward. Inside checkpointed layers
    they are recast during recomputation instead (one layer at a time)."""
    head = 2 * shape.hidden_size * shape.vocab_size if st.method == "full" else 0
    return (shape.num_layers - n_ckpt) * copies_per_layer(shape, st, psi_t) + head


def autocast_cached_copies(shape: ModelShape, st: Execution, psi_t: int) -> int:
    """What autocast's weight cache holds at the end of the forward. torch caches the cast of a leaf fp32 tensor that
    requires grad (aten/src/ATen/autocast_mode.cpp, cached_cast: every trainable matmul weight and bias, LoRA's
    adapters too) and clears the cache only when the outermost autocast exits (torch/amp/autocast_mode.py __exit__:
    autocast_decrement_nesting() == 0 -> clear_autocast_cache). A checkpointed layer discards its saved tensors but
    not the cache, so every layer's copies are alive at the loss; the checkpointed ones die when the forward's
    autocast exits, and the recomputation (a fresh outermost autocast) recasts one layer at a time."""
    return autocast_weight_copies(shape, st, 0, psi_t)


def embedding_grad_transients(shape: ModelShape, st: Execution, g_bytes: int, autocast: bool) -> dict[str, int]:
    """Pending V·h gradient tensors (plain torch, full fine-tuning; E = V·h·4 B) beyond the .grad of earlier
    micro-batches, at two moments:
    - lm_head's weight gradient: E new (+ the 16-bit gradient it is cast from under autocast, V·h·2 B);
    - the embedding's backward: tied: lm_head's gradient waits in autograd's input buffer for the embedding's dense
      gradient and their sum is a third tensor (2E above the gradient itself; 3E when a .grad from an earlier
      micro-batch exists, into which the sum is then added in place); untied: the embedding's dense gradient
      becomes .grad (0), or is added in place into the earlier micro-batches' .grad (E)."""
    if st.method != "full":
        return {"lm_head": 0, "embedding": 0}
    E = g_bytes * shape.vocab_size * shape.hidden_size
    later = st.grad_accum > 1
    return {"lm_head": E + (2 * shape.vocab_size * shape.hidden_size if autocast else 0),
            "embedding": (3 if later else 2) * E if shape.tied_embeddings else (E if later else 0)}


PHASES = ("forward", "head backward", "head backward (lm_head gradient)", "layers backward (top layer)",
          "layers backward (layer 0)", "layers backward (embedding)", "optimizer step")


def step_phases(shape: ModelShape, st: Execution, p: Precision, act: dict, comps: list[MemoryComponent], zs: int,
                T: int) -> dict[str, dict[str, float]]:
    """Bytes alive (before calibration factors) per component whose size changes over the step, at the peak moment
    of each phase of the steady-state step. Components not listed are resident throughout. The moments, with what
    autograd frees between them (checked against MemTracker traces: benchmarks/planner_vs_trace.py):
    - forward: at the last micro-batch's log_softmax: saved activations, every cached autocast weight copy, the
      16-bit logits, their fp32 upcast (16-bit compute), the log-probs, the final hidden state; the gradients of
      earlier micro-batches;
    - head backward: log_softmax's backward: log-probs + their gradient + the logits' gradient (8 B × T·V); the
      upcast and the checkpointed layers' copies are gone;
    - head backward (lm_head gradient, full fine-tuning): the loss's tensors and lm_head's saved input and weight
      copy are freed, its weight gradient (V·h·4 B; under autocast also the 16-bit one it is cast from) is new;
    - layers backward (top layer): head tensors freed but the logits, which the trainer holds until the step ends;
      lm_head's gradient; the saved layers, one layer's backward working memory (and recomputation);
    - layers backward (layer 0): every gradient but the embedding's, one layer's activations;
    - layers backward (embedding): all gradients plus the pending embedding/lm_head gradients;
    - optimizer step: gradients + the optimizer's temporaries (activations are gone)."""
    by = {c.name: c for c in comps if c.device == "gpu"}

    def u(name):
        c = by.get(name)
        return 0 if c is None else c.bytes / c.inputs.get("calibration_factor", 1.0)

    V, h, L, c, stream = shape.vocab_size, shape.hidden_size, shape.num_layers, p.compute, p.stream
    full, m, n_ckpt, head = st.method == "full", max(1, st.grad_accum), act["n_ckpt"], act["head_parts"]
    out: dict[str, dict[str, float]] = {ph: {} for ph in PHASES}
    # Gradients: those of earlier micro-batches (ZeRO keeps its gradient buffers: counted throughout).
    G = u("gradients")
    early = G if m > 1 or zs > 0 else 0
    lm_head_grad = min(G, 4 * V * h) if full and zs == 0 else 0
    for ph, g in (("forward", early), ("head backward", early), ("head backward (lm_head gradient)", early),
                  ("layers backward (top layer)", max(early, lm_head_grad)),
                  ("layers backward (layer 0)", G if early or not full or shape.tied_embeddings else G - 4 * V * h),
                  ("layers backward (embedding)", G), ("optimizer step", G)):
        out[ph]["gradients"] = g
    if "grad_transients" in by:  # tied + accumulation: lm_head's gradient waits for the embedding's all backward long
        E = 4 * V * h
        waiting = E if shape.tied_embeddings and m > 1 else 0
        out["head backward (lm_head gradient)"]["grad_transients"] = by["grad_transients"].inputs["lm_head"]
        out["layers backward (top layer)"]["grad_transients"] = waiting
        out["layers backward (layer 0)"]["grad_transients"] = waiting
        out["layers backward (embedding)"]["grad_transients"] = by["grad_transients"].inputs["embedding"]
    if "autocast_weight_copies" in by:
        ac = by["autocast_weight_copies"].inputs
        per, saved = ac["per_layer"], ac["saved"]
        head_copy = saved - (L - n_ckpt) * per
        # at the loss every layer is done: with the cache all copies are alive, without it those saved for backward
        out["forward"]["autocast_weight_copies"] = u("autocast_weight_copies") if ac["cache_in_checkpoints"] else saved
        out["head backward"]["autocast_weight_copies"] = saved
        out["head backward (lm_head gradient)"]["autocast_weight_copies"] = saved - head_copy
        out["layers backward (top layer)"]["autocast_weight_copies"] = saved - head_copy + (per if n_ckpt else 0)
        out["layers backward (layer 0)"]["autocast_weight_copies"] = per
    A = u("activations")
    top = A - head["final_norm"] - head["lm_head_input"]
    out["forward"]["activations"] = out["head backward"]["activations"] = A
    out["layers backward (top layer)"]["activations"] = top
    out["head backward (lm_head gradient)"]["activations"] = A - head["lm_head_input"]
    out["layers backward (layer 0)"]["activations"] = min(top, head["rotary"] + head["embedding_ids"] + (
        T * h * stream if n_ckpt else act["per_layer"]))
    out["layers backward (embedding)"]["activations"] = min(top, head["embedding_ids"])
    loss = u("logits_loss")
    if "fused_ce" in st.kernels:
        out["forward"]["logits_loss"] = out["head backward"]["logits_loss"] = loss
    else:
        held = c * T * V  # lm_head's output: the trainer's `out` keeps it until after backward
        upcast = 4 * T * V if c < 4 else 0  # the loss's logits.float() (a no-op in fp32)
        final_hidden = 0 if full and c == stream else T * h * stream  # alive while the loss runs, unless saved
        out["forward"]["logits_loss"] = min(loss, head["loss"] + held + upcast + final_hidden)
        out["head backward"]["logits_loss"] = loss
        for ph in ("head backward (lm_head gradient)", "layers backward (top layer)", "layers backward (layer 0)",
                   "layers backward (embedding)"):
            out[ph]["logits_loss"] = held
    for ph in ("layers backward (top layer)", "layers backward (layer 0)"):
        out[ph]["backward_transient"] = u("backward_transient")
    out["head backward (lm_head gradient)"]["backward_transient"] = min(u("backward_transient"), T * h * stream)
    if "step_temporaries" in by:
        out["optimizer step"]["step_temporaries"] = u("step_temporaries")
    if not full:  # a frozen lm_head and embedding have no weight gradients
        del out["layers backward (embedding)"], out["head backward (lm_head gradient)"]
    phased = {c.name for c in comps if c.inputs.get("phase") != "always"} | {"gradients"}
    for ph in out:
        for name in phased - set(out[ph]):
            out[ph][name] = 0
    return out


def phase_totals(comps: list[MemoryComponent]) -> dict[str, int]:
    """Allocated bytes per phase: the components' `alive` bytes (resident ones count their bytes throughout)."""
    gpu = [c for c in comps if c.device == "gpu" and c.name != "overhead"]
    phases = next((list(c.inputs["alive"]) for c in gpu if "alive" in c.inputs), [])
    return {ph: sum(c.inputs["alive"][ph] if "alive" in c.inputs else c.bytes for c in gpu) for ph in phases}


def peak_of(comps: list[MemoryComponent]) -> tuple[int, str]:
    """(allocated peak, its phase). calibrate.apply_calibration can re-evaluate a scaled plan with this, after
    scaling each component's `alive` bytes by the same factor as its bytes."""
    totals = phase_totals(comps)
    phase = max(totals, key=totals.get)
    return totals[phase], phase


def estimate_memory(shape: ModelShape, st: Execution, seq_len: int, world_size: int, gpus_per_node: int,
                    on_cpu: bool, lora: LoraSpec = LoraSpec(), scale: dict | None = None,
                    autocast_cache_in_checkpoints: bool = True) -> MemoryEstimate:
    """Predicted per-GPU memory of one training step: the largest of what is alive at each phase's peak moment
    (`step_phases`), plus context and fragmentation.

    `scale` maps component names to calibration factors (measured / predicted) applied to their bytes.
    `autocast_cache_in_checkpoints=False`: checkpointed layers run under torch.autocast(cache_enabled=False)
    (trace.no_autocast_cache_in_checkpoints), so their 16-bit weight copies are not held through the whole forward.
    """
    p = precision_for(st, on_cpu)
    N, zs, b, s = max(1, world_size), st.zero_stage, st.micro_batch_size, seq_len
    ranks_per_node = max(1, gpus_per_node)
    comps: list[MemoryComponent] = []

    def add(name, nbytes, formula, device="gpu", phase="always", **inputs):
        f = (scale or {}).get(name, 1.0)
        if f != 1.0:
            inputs["calibration_factor"] = f
        comps.append(MemoryComponent(name, int(nbytes * f), formula, dict(inputs, phase=phase), device))

    psi = shape.total_params
    tensors = trainable_tensors(shape, st.method, lora)
    psi_t = sum(tensors)
    part3 = N if zs == 3 else 1
    w_dev = "cpu" if st.offload_params else "gpu"
    # Weights (the base model for LoRA/QLoRA).
    if st.method == "qlora":
        q = shape.num_layers * shape.linear_params_per_layer
        q_bytes = shape.num_layers * sum(nf4_bytes(lin.d_in * lin.d_out) + (lin.d_out * p.param if lin.bias else 0)
                                         for lin in shape.linears)
        add("weights", (q_bytes + (psi - q) * p.param) / part3,
            f"{NF4_BYTES:.3f} B × Ψ_linear (NF4+DQ) + {p.param} B × rest" + (" / N" if part3 > 1 else ""), w_dev,
            psi=psi, psi_linear=q, N=part3)
    else:
        add("weights", psi * p.param / part3, f"{p.param} B × Ψ" + (" / N" if part3 > 1 else ""), w_dev,
            psi=psi, bytes=p.param, N=part3)
    if zs == 3:
        gathered = 2 * shape.largest_module_params * p.param + \
            shape.num_layers * shape.norms_per_layer * shape.hidden_size * p.param
        add("zero3_gathered", gathered, f"2 × largest module × {p.param} B + norms",
            largest_module=shape.largest_module_params)
    if st.method != "full":
        add("adapters", psi_t * p.adapter_param / part3, f"{p.adapter_param} B × Ψt (r·(d_in+d_out) per matrix)",
            psi_t=psi_t, r=lora.r)
    n_ckpt = _checkpointed_layers(st.checkpointing, shape.num_layers)
    if not on_cpu and zs == 0 and p.compute == 2:
        per, saved = copies_per_layer(shape, st, psi_t), autocast_weight_copies(shape, st, n_ckpt, psi_t)
        cached = autocast_cached_copies(shape, st, psi_t) if autocast_cache_in_checkpoints else \
            saved + (per if n_ckpt else 0)
        cache_ckpt = n_ckpt and autocast_cache_in_checkpoints
        add("autocast_weight_copies", cached, "2 B × trained fp32 matmul weights: autocast caches a bf16 copy of each "
            "until the forward ends" + (", checkpointed layers too" if cache_ckpt else "") +
            ("; those outside checkpoints stay saved for backward" if n_ckpt else ""), phase="fwd_bwd",
            saved=saved, per_layer=per, cache_in_checkpoints=autocast_cache_in_checkpoints)
    # Gradients.
    offload_opt = st.offload_optimizer
    g_bytes = 4 if zs == 0 and st.method == "full" else (p.adapter_param if st.method != "full" else p.param)
    if zs == 0:
        add("gradients", psi_t * g_bytes, f"{g_bytes} B × Ψt", psi_t=psi_t)
    elif offload_opt:
        add("gradients", 4 * psi_t / N, "4 B × Ψt / N (fp32 partition)", "cpu",
            psi_t=psi_t, N=N)
    else:
        n_g = 1 if zs == 1 else N
        add("gradients", psi_t * g_bytes / n_g, f"{g_bytes} B × Ψt" + (" / N" if n_g > 1 else ""),
            psi_t=psi_t, N=n_g)
    # Optimizer states.
    if zs > 0 and st.optimizer != "adamw":  # bitsandbytes over ZeRO's flat fp32 partitions (one per param group)
        parts = zero_partitions(shape, st.method, lora, N, zs)
        add("optimizer", 4 * sum(parts) + eight_bit_state_bytes(parts),
            "4 B × Ψt / N (fp32 master) + 2 B × Ψt / N (8-bit m, v over flat partitions) + absmax/256",
            "cpu" if offload_opt else "gpu", psi_t=psi_t, N=N, optimizer=st.optimizer, partitions=parts)
    else:
        opt, formula = optimizer_state_bytes(shape, st, tensors, master=zs > 0)
        n_o = N if zs > 0 else 1
        add("optimizer", opt / n_o, formula + (" / N" if n_o > 1 else ""),
            "cpu" if offload_opt else "gpu", psi_t=psi_t, N=n_o, optimizer=st.optimizer)
    if offload_opt and zs in (1, 2):
        # DeepSpeed stage_1_and_2 with cpu_offload (all sizes in the trainable dtype): a host copy of the partition
        # to send the updated weights back, per-parameter host gradient accumulators when accumulating, and one
        # staging buffer of the largest trainable tensor on each side of the device-to-host gradient copy.
        tb, largest = (p.param if st.method == "full" else p.adapter_param), max(tensors)
        accum = 2 if st.grad_accum > 1 else 1
        add("offload_buffers", tb * (accum * psi_t / N + largest),
            f"{tb} B × ({'2 × ' if accum > 1 else ''}Ψt / N + largest tensor) (host param copy"
            + (", grad accumulators" if accum > 1 else "") + ", staging)", "cpu", psi_t=psi_t, N=N, largest=largest)
        add("offload_staging", tb * largest, f"{tb} B × largest trainable tensor (gradient staging)",
            largest=largest)
    # Optimizer-step temporaries (activations are gone by then). Offloaded: gradients land in the fp32 CPU buffer.
    if offload_opt:
        pass
    elif zs in (1, 2):  # step(): the partition's 16-bit grads are flattened and cast to a fp32 copy
        add("step_temporaries", 4 * psi_t / N, "4 B × Ψt / N (fp32 grad partition)", phase="step")
    elif zs == 3:  # per sub-group (1e9 elements) the fp32 grad replaces the freed 16-bit one: net +2 B
        part = min(psi_t / N, DS_SUB_GROUP)
        add("step_temporaries", 2 * part, "2 B × min(Ψt / N, 1e9) (fp32 grad replaces 16-bit)", phase="step")
    # zs == 0: unitrain's torch AdamW is fused (in-place per element, no tensor-sized temporaries).
    # Communication buffers.
    if zs == 0 and N > 1:
        add("comm_buffers", psi_t * g_bytes, f"{g_bytes} B × Ψt (DDP buckets)", psi_t=psi_t)
    elif zs in (1, 2):
        B = bucket_elements(shape.hidden_size)
        add("comm_buffers", 3 * B * p.param, f"3 × h² × {p.param} B (DeepSpeed buckets)",
            bucket=B)
    elif zs == 3:
        B = bucket_elements(shape.hidden_size)
        add("comm_buffers", 2 * B * p.param + int(0.9 * B) * p.param, f"2.9 × h² × {p.param} B (reduce + prefetch)",
            bucket=B)
    # Activations.
    act = activation_bytes(shape, b, s, st, p, lora)
    T, V, h = b * s, shape.vocab_size, shape.hidden_size
    add("activations", act["layers"] + act["checkpoint_inputs"] + act["head"] - act["head_parts"]["loss"],
        " + ".join(x for x in [f"{shape.num_layers - act['n_ckpt']} × {act['per_layer'] / 2**20:.4g} MiB/layer"
                               if act["n_ckpt"] < shape.num_layers else "",
                               f"{act['n_ckpt']} × T·h·{p.stream} B (ckpt inputs)" if act["n_ckpt"] else "", "head"] if x),
        phase="fwd_bwd", b=b, s=s, per_layer=act["per_layer"], layers=shape.num_layers, checkpointed=act["n_ckpt"],
        stream_bytes=p.stream, compute_bytes=p.compute, precision=p.name)
    if "fused_ce" in st.kernels:
        # unitrain_kernels.fused_linear_cross_entropy: chunks of C = min(T, 2^⌊log2(256 MiB / (V·e))⌋) tokens,
        # each chunk's logits rewritten in place into their gradient (C·V·e), plus an fp32 grad-W
        # accumulator (V·h·4 B) when lm_head trains (full fine-tuning).
        e = p.compute
        chunk = min(T, 2 ** int(math.log2(max(1, 256 * 2**20 // (V * e)))))
        grad_w = 4 * V * h if st.method == "full" else 0
        add("logits_loss", act["head_parts"]["loss"] + chunk * V * e + grad_w,
            f"T·h·{e} B + {chunk}×V × {e} B (chunk)" + (" + V·h × 4 B (grad W)" if grad_w else "") + " (fused CE)",
            phase="fwd_bwd", chunk=chunk, V=V, saved=act["head_parts"]["loss"], grad_w=grad_w)
    else:
        add("logits_loss", act["head_parts"]["loss"] + (8 + p.compute) * T * V,
            f"T·V × (4 B log-probs + 8 B fp32 grads + {p.compute} B logits)", phase="fwd_bwd", T=T,
            V=V, saved=act["head_parts"]["loss"])
    # One layer's backward: the MLP's three T·I gradients, the residual stream's gradient (+ the layer recomputed).
    work = 3 * T * shape.intermediate_size * p.compute + T * h * p.stream + (act["per_layer"] if act["n_ckpt"] else 0)
    add("backward_transient", work, f"3 × T·I·{p.compute} B (MLP grads) + T·h·{p.stream} B (residual grad)" +
        (" + 1 recomputed layer" if act["n_ckpt"] else ""), phase="fwd_bwd", residual_grad=T * h * p.stream)
    if zs == 0 and st.method == "full":
        pending = embedding_grad_transients(shape, st, g_bytes, not on_cpu and p.compute == 2)
        add("grad_transients", max(pending.values()), "V·h × 4 B per pending lm_head/embedding gradient (" +
            ("tied: lm_head's waits for the embedding's, then their sum" if shape.tied_embeddings else
             "then accumulated into .grad") + ")", phase="fwd_bwd", E=g_bytes * V * h, **pending)
    # Peak: the largest of what is alive at each moment of the step (memory.step_phases).
    alive = step_phases(shape, st, p, act, comps, zs, T)
    for c in comps:
        if c.device == "gpu" and any(c.name in parts for parts in alive.values()):
            f = c.inputs.get("calibration_factor", 1.0)
            c.inputs["alive"] = {ph: int(parts.get(c.name, 0) * f) for ph, parts in alive.items()}
    allocated, peak_phase = peak_of(comps)
    if scale and "peak" in scale and not any(c.name in scale for c in comps):  # a whole-peak correction only
        allocated = int(allocated * scale["peak"])
    if scale and "traced_peak" in scale:  # trace.trace_factors: what the phase model misses for this family
        allocated = int(allocated * scale["traced_peak"])
    if on_cpu:
        add("overhead", PROCESS_CPU, "torch process (libraries, allocator)", process=PROCESS_CPU)
    else:
        add("overhead", CUDA_CONTEXT + (NCCL_BUFFERS if N > 1 else 0) + FRAGMENTATION * allocated,
            "CUDA context" + (" + NCCL" if N > 1 else "") + " + 5 % fragmentation", allocated=allocated)
    peak = allocated + comps[-1].bytes
    offloaded = sum(c.bytes for c in comps if c.device == "cpu")
    cpu_needed = ranks_per_node * (offloaded + (0 if on_cpu else PROCESS_CPU))
    return MemoryEstimate(comps, int(peak), int(allocated), int(cpu_needed), act, psi_t, peak_phase,
                          phase_totals(comps))
