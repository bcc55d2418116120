"""`unitrain plan --trace`: the memory of a training step traced exactly, for any architecture, without a GPU.

The model is built from its config under torch's FakeTensorMode on the CPU device (tensors carry shapes, dtypes
and storages but no data: an 8B model costs < 0.5 GiB of host memory), the plan's method, checkpointing and
optimizer are applied as the trainer applies them, and two training steps run under PyTorch's own
`torch.distributed._tools.mem_tracker.MemTracker`, which follows every storage's life. The second step is the
steady state (the optimizer states exist). The peak of each phase — each micro-batch's forward, the head's
backward (loss, logits, lm_head), the layers' backward, the optimizer step — is reported by category next to the
formula's prediction (`unitrain.plan.memory.estimate_memory`).

The CUDA precision regime is reproduced on the CPU device: fp32 parameters + autocast(bf16) for full fine-tuning,
a 16-bit frozen base with fp32 adapters (peft) for LoRA, fp32 for CPU plans; dropout keeps a bool mask as CUDA's
fused dropout does. What a CPU trace cannot see is said in `CANNOT_SEE`.

This module imports torch and transformers: it is not on the planner's fast path (plan/ stays free of
unitrain.train imports; the model is built with unitrain.model's apply_method / apply_checkpointing).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

from unitrain.errors import UnitrainError
from unitrain.plan.memory import LoraSpec
from unitrain.plan.schema import Execution

GiB = 1024**3

CANNOT_SEE = ("what a CPU trace cannot see: the saved tensors and scratch of CUDA's own kernels (it traces CPU "
              "flash attention's output + logsumexp; CUDA's flash / memory-efficient attention pad the logsumexp and "
              "keep RNG state), the cuBLAS workspace, the caching allocator's rounding (512 B blocks, 2 MiB "
              "segments) and fragmentation, the CUDA context, NCCL/DDP buffers; and CPU autocast casts a few ops "
              "(softmax, pow, exp on 16-bit inputs) differently from CUDA's lists. The GPU measurements check those.")
CANNOT_SEE_CPU = ("a CPU plan's trace counts tensor bytes exactly; the process itself (libraries, allocator) is the "
                  "formula's overhead term")

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")


class TraceError(UnitrainError):
    """The model or the plan cannot be traced on fake tensors; the message says why and what to use instead."""


@dataclass
class PhasePeak:
    """The largest total inside one phase, by MemTracker category, and where in the phase it happened."""

    phase: str
    total: int
    by_category: dict
    where: str = ""


@dataclass
class TraceResult:
    model_type: str
    strategy: Execution
    seq_len: int
    params: int  # all parameters (elements)
    trainable: int
    weights: int  # bytes: parameters + buffers
    gradients: int  # after the last micro-batch's backward
    optimizer: int  # after the optimizer step
    saved_after_forward: int  # what the first forward leaves alive for backward (saved tensors, logits, loss)
    phases: list[PhasePeak]  # steady-state step (the second), in order
    first_step_peak: int
    leak: int  # bytes MemTracker kept alive across the step boundary (subtracted from the steady-state numbers)
    casts: tuple  # (number, bytes) of 16-bit casts of trainable fp32 weights in the steady-state step
    seconds: float
    on_cpu: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases, key=lambda p: p.total)


# ------------------------------------------------------------------------------------------------------------------
# The tracker
# ------------------------------------------------------------------------------------------------------------------

def _tracker_class():
    import torch
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class PhaseTracker(MemTracker):
        """MemTracker + the peak per phase; grad hooks only on parameters that train (a frozen parameter cannot
        take a hook: MemTracker registers one on every parameter and raises on LoRA's base)."""

        def __init__(self):
            super().__init__()
            self.phase, self.where = "setup", ""
            self.peaks: dict[str, PhasePeak] = {}
            self.casts = [0, 0]  # autocast's casts of trainable fp32 leaves: count, bytes written

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.nn.Parameter) and \
                    args[0].dtype == torch.float32 and (kwargs or {}).get("dtype") in (torch.bfloat16, torch.float16):
                self.casts[0] += 1
                self.casts[1] += args[0].numel() * 2
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                def grad_hook(grad):  # returns None: the gradient itself is left unchanged
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(grad_hook),
                            p.register_post_accumulate_grad_hook(lambda q: grad_hook(q.grad)))
            return out

        def _update_peak_stats(self, peak_state):
            # Only the peak per phase: MemTracker's per-module peaks (a scan of every module after every op, the
            # larger part of a trace's time with LoRA's thousand modules) are not used here.
            snap = self._curr_mem_snap.get(torch.device("cpu"))
            if snap is None:
                return
            cur = self.peaks.get(self.phase)
            if cur is None or snap[_TOTAL_KEY] > cur.total:
                self.peaks[self.phase] = PhasePeak(self.phase, snap[_TOTAL_KEY], _by_category(snap), self.where)

        def current(self) -> dict:
            snap = self._curr_mem_snap.get(torch.device("cpu"))
            return _by_category(snap) if snap else dict.fromkeys(CATEGORIES + ("total",), 0)

    return PhaseTracker


def _by_category(snap: dict) -> dict:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType as R

    return {"weights": snap[R.PARAM] + snap[R.BUFFER], "gradients": snap[R.GRAD], "optimizer": snap[R.OPT],
            "activations": snap[R.ACT] + snap[R.OTH], "temporaries": snap[R.TEMP], "total": snap[_TOTAL_KEY]}


# ------------------------------------------------------------------------------------------------------------------
# Building the model as the trainer does, on fake tensors
# ------------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _fake_safe_module_to():
    """peft moves each adapter to its base layer's device and dtype with Module.to, whose parameter swap fails on
    FakeTensors; reassign the parameters instead (same result: new tensors of the target device/dtype)."""
    import torch
    from torch import nn

    orig = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for mod in self.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    new = p.to(device=device, dtype=dtype if dtype is not None and p.is_floating_point() else None)
                    if new is not p:
                        mod._parameters[name] = nn.Parameter(new, requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.to(device=device,
                                              dtype=dtype if dtype is not None and b.is_floating_point() else None)
        return self

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = orig


@contextlib.contextmanager
def _cuda_dropout():
    """CUDA's fused dropout (native_dropout) saves a bool mask; CPU's composite dropout saves a float one. Trace the
    CUDA behaviour for GPU plans."""
    import torch
    import torch.nn.functional as F

    orig = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = orig


@contextlib.contextmanager
def _unpacked_rows():
    """transformers treats FakeTensors as tracing: it cannot prove from position_ids that the rows are not packed,
    builds a 4-D mask and then sdpa's repeat_kv materialises K/V per query head. On real unpacked input it finds
    no packing and lets SDPA run causal without a mask; take that path."""
    from transformers import masking_utils

    orig = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


def untraceable(st: Execution) -> str | None:
    """Why a strategy cannot be traced on fake tensors (None when it can)."""
    why = None
    if st.zero_stage:
        why = (f"ZeRO-{st.zero_stage} partitions states across ranks inside DeepSpeed, which does not run on fake "
               f"tensors; the formula's ZeRO model states are checked against DeepSpeed's own estimators "
               f"(benchmarks/planner_accuracy.py, part 2)")
    elif st.method == "qlora":
        why = "bitsandbytes' 4-bit layers do not run on fake tensors"
    elif st.optimizer != "adamw":
        why = f"bitsandbytes' {st.optimizer} does not run on fake tensors"
    return why


def _supported(st: Execution) -> None:
    why = untraceable(st)
    if why:
        raise TraceError(f"--trace cannot trace this plan: {why}. Trace a comparable plan instead (e.g. "
                         f"strategy.zero_stage=0 method.name=lora training.optimizer=adamw), or measure it: unitrain "
                         f"calibrate RECIPE")


def build_traced_model(config: dict, st: Execution, lora: LoraSpec, on_cpu: bool, notes: list[str]):
    """(model, optimizer) on fake tensors, as unitrain.model builds them for the plan. Call inside FakeTensorMode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unitrain import model as M

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:  # multimodal wrapper: the LM part (as shape.py)
        cfg = dict(cfg["text_config"], model_type="gemma3_text")
    mt = cfg.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(mt, **cfg)
    except Exception as e:
        raise TraceError(f"--trace: transformers cannot build a config for model_type={mt!r}: {e}") from None
    dtype = torch.float32
    if st.method != "full" and st.dtype != "float32":  # the frozen base in 16 bit; peft keeps adapters fp32
        dtype = getattr(torch, st.dtype)
    try:
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        except ValueError as e:  # e.g. Gemma 2: no SDPA support in transformers; it runs eager attention
            if "attention implementation" not in str(e):
                raise
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
            notes.append(f"transformers has no SDPA attention for {mt}: traced with eager attention (it keeps the "
                         f"b·heads·s² scores; the trainer asks for SDPA and would be refused the same way)")
    except Exception as e:
        raise TraceError(f"--trace: transformers cannot build {mt!r} on fake tensors ({type(e).__name__}: {e}); the "
                         f"plan above stands on the formula alone") from None
    model.config.use_cache = False
    lcfg = SimpleNamespace(r=lora.r, alpha=2 * lora.r, dropout=lora.dropout,
                           target_modules=lora.targets if isinstance(lora.targets, str) else list(lora.targets))
    try:
        with _fake_safe_module_to():
            model = M.apply_method(model, st.method, lcfg, st.checkpointing)
    except ValueError as e:  # peft refuses the target modules (e.g. MoE expert parameters with dropout)
        raise TraceError(f"--trace: peft cannot apply LoRA to {mt!r} as planned ({e}); the trainer would refuse it "
                         f"too: change method.lora (target_modules, dropout)") from None
    M.apply_checkpointing(model, st.checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # unitrain's torch AdamW (strategy.build_optimizer)
    return model, opt


@contextlib.contextmanager
def _quiet_fake_tensor_logs():
    """FakeTensorMode logs a traceback for an op its meta function refuses before raising; the TraceError says it."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _moe_fallback_grouped_mm():
    """MoE experts: torch._grouped_mm's meta function accepts bf16 only (fp32 master weights are not), so route the
    experts through transformers' own grouped_mm fallback op, which saves the same tensors (input, weight)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        yield
        return
    orig = moe._can_use_grouped_mm
    moe._can_use_grouped_mm = lambda *a, **k: False
    try:
        yield
    finally:
        moe._can_use_grouped_mm = orig


def _release(leaves: list) -> None:
    """A frozen embedding's output made to require grad (enable_input_require_grads, for checkpointing) is a leaf:
    backward accumulates its .grad, and both die with the graph — but MemTracker's multi-grad hooks on it form a
    reference cycle through its AccumulateGrad node that keeps them alive. Free them where training would."""
    for t in leaves:
        if t.grad is not None:
            t.grad.untyped_storage().resize_(0)
            t.grad = None
        t.untyped_storage().resize_(0)
    leaves.clear()


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise TraceError("--trace: no decoder layers (transformers GradientCheckpointingLayer) found in the model")
    return layers


# ------------------------------------------------------------------------------------------------------------------
# The traced steps
# ------------------------------------------------------------------------------------------------------------------

def _instrument(model, tracker, layers: list, leaves: list) -> list:
    """Hooks that name where backward is: each layer's output gradient (and the last one's switches the phase from
    the head's backward to the layers'), and the embedding's output."""
    import torch

    def mark(label):
        def hook(_grad):  # fires when backward has computed the gradient of this tensor
            tracker.where = label
        return hook

    def to_layers(_grad):
        tracker.phase = tracker.phase.replace("head backward", "layers backward")

    def on_layer_output(i):
        def fwd_hook(_mod, _args, out):
            x = out[0] if isinstance(out, tuple) else out
            if isinstance(x, torch.Tensor) and x.requires_grad and tracker.phase.startswith("forward"):
                x.register_hook(mark(f"layer {i}"))
                if i == len(layers) - 1:
                    x.register_hook(to_layers)
        return fwd_hook

    def emb_hook(_mod, _args, out):  # registered after the model's own (enable_input_require_grads) hook
        if out.requires_grad:
            out.register_hook(mark("embedding"))
            if out.is_leaf:
                leaves.append(out)

    handles = [layer.register_forward_hook(on_layer_output(i)) for i, layer in enumerate(layers)]
    handles.append(model.get_input_embeddings().register_forward_hook(emb_hook))
    return handles


def no_autocast_cache_in_checkpoints(model, device_type: str, dtype) -> list:
    """The alternative to paying for autocast's weight cache: run each checkpointed layer under a nested
    torch.autocast(cache_enabled=False). Its weights are then cast per use (and again when recomputed, as with the
    cache: the recomputation runs in a fresh outermost autocast whose cache starts empty), so the cache no longer
    holds a 16-bit copy of every checkpointed layer until the forward ends. -> hook handles (remove to undo)."""
    import torch

    handles = []
    for layer in _decoder_layers(model):
        if getattr(layer, "gradient_checkpointing", False) is not True:
            continue
        ctx: list = []

        def pre(_mod, _args, ctx=ctx):
            ctx.append(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
            ctx[-1].__enter__()

        def post(_mod, _args, _out, ctx=ctx):
            ctx.pop().__exit__(None, None, None)

        # inside the checkpointed call: GradientCheckpointingLayer.__call__ checkpoints Module.__call__, hooks included
        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post, always_call=True)]
    return handles


def _run_steps(model, opt, tracker, ids, st: Execution, steps: int, amp: bool, dtype, max_grad_norm: float,
               leaves: list):
    """The trainer's steps (loop.py / strategy.TorchBackend) under the tracker. -> (peaks per step, gradients after
    the last backward, optimizer states, what the first forward leaves alive, bytes the tracker leaked)."""
    import torch

    b, s = ids.shape
    m = min(max(1, st.grad_accum), 2)  # micro-batches 3, 4, ... hold exactly what the second holds
    per_step: list[dict] = []
    grads = optimizer = saved = leak = 0
    with tracker:
        for step in range(steps):
            tracker.peaks, tracker.casts = {}, [0, 0]
            for k in range(m):
                tracker.reset_mod_stats()  # MemTracker refuses a second forward of the root otherwise
                tag = f", micro-batch {k + 1}" if m > 1 else ""
                tracker.phase, tracker.where = "forward" + tag, ""
                with torch.autocast("cpu", dtype=dtype) if amp else contextlib.nullcontext():
                    out = model(input_ids=ids, labels=ids, num_items_in_batch=b * s * st.grad_accum)
                    loss = out.loss
                if step == 0 and k == 0:
                    cur = tracker.current()
                    saved = cur["activations"] + cur["temporaries"]
                tracker.phase, tracker.where = "head backward" + tag, "head"
                loss.backward()
                del out, loss  # as the trainer does: the logits live until their backward is done
                _release(leaves)
            grads = tracker.current()["gradients"]
            tracker.phase, tracker.where = "optimizer step", ""
            params = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            cur = tracker.current()
            optimizer = cur["optimizer"]
            if step == 0:  # anything alive now besides weights and optimizer states was kept by the tracker
                leak = cur["total"] - cur["weights"] - cur["optimizer"]
            per_step.append(dict(tracker.peaks))
    return per_step, grads, optimizer, saved, leak


def trace_memory(config: dict, st: Execution, seq_len: int, lora: LoraSpec = LoraSpec(), on_cpu: bool = False,
                 max_grad_norm: float = 1.0, steps: int = 2,
                 autocast_cache_in_checkpoints: bool = True) -> TraceResult:
    """Trace `steps` training steps of the plan's strategy (grad_accum micro-batches of micro_batch_size rows each),
    as unitrain's trainer runs them: forward under autocast, backward outside it, the outputs (logits) held until
    the micro-batch's backward is done, then gradient clipping, fused AdamW, zero_grad(set_to_none=True).

    `autocast_cache_in_checkpoints=False` traces `no_autocast_cache_in_checkpoints`. The result also counts the
    16-bit casts of trainable weights per step (`notes`), the cost side of that alternative.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    _supported(st)
    t0 = time.perf_counter()
    amp = st.dtype != "float32"
    dtype = getattr(torch, st.dtype)
    notes: list[str] = []
    with FakeTensorMode(), _unpacked_rows(), _moe_fallback_grouped_mm(), _quiet_fake_tensor_logs(), \
            (contextlib.nullcontext() if on_cpu else _cuda_dropout()):
        model, opt = build_traced_model(config, st, lora, on_cpu, notes)
        vocab = model.config.get_text_config().vocab_size
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tracker = _tracker_class()()
        tracker.track_external(model, opt)
        leaves: list = []
        handles = _instrument(model, tracker, _decoder_layers(model), leaves)
        if amp and not autocast_cache_in_checkpoints:
            handles += no_autocast_cache_in_checkpoints(model, "cpu", dtype)
        ids = torch.randint(0, vocab, (st.micro_batch_size, seq_len))
        try:
            per_step, grads, optimizer, saved, leak = _run_steps(model, opt, tracker, ids, st, steps, amp, dtype,
                                                                 max_grad_norm, leaves)
        except TraceError:
            raise
        except Exception as e:  # data-dependent shapes, ops without a fake implementation, ...
            raise TraceError(f"--trace: {config.get('model_type')!r} does not run on fake tensors ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); the plan above stands on the formula "
                             f"alone") from None
        finally:
            for h in handles:
                h.remove()
    if st.grad_accum > 2:
        notes.append(f"traced 2 of the {st.grad_accum} micro-batches per step: the later ones hold exactly what the "
                     f"second holds (the same tensors; the gradients already allocated)")
    if leak:
        notes.append(f"{leak / 2**20:.2f} MiB survived step 1 (kept alive by the tracker's hooks); subtracted from "
                     f"the steady-state peaks")
    if amp:
        notes.append(f"{tracker.casts[0]} casts of trainable fp32 weights to {st.dtype} per traced step "
                     f"({tracker.casts[1] / GiB:.2f} GiB written)")
    steady = [replace(p, total=p.total - leak) for p in per_step[-1].values()]
    return TraceResult(model_type=config.get("model_type", "?"), strategy=st, seq_len=seq_len, params=n_params,
                       trainable=n_train, weights=per_step[-1]["optimizer step"].by_category["weights"],
                       gradients=grads, optimizer=optimizer, saved_after_forward=saved, phases=steady,
                       first_step_peak=max(p.total for p in per_step[0].values()), leak=leak,
                       casts=tuple(tracker.casts), seconds=time.perf_counter() - t0, on_cpu=on_cpu, notes=notes)
