"""Runtime truth: the first optimizer step's measured memory next to the plan's prediction (DESIGN.md, principle 3).

Measured once per process, on the first step:
- activations: every tensor autograd saves for backward during the first micro-batch's forward
  (torch.autograd.graph.saved_tensors_hooks), deduplicated by storage, parameters excluded; a layer under
  non-reentrant checkpointing hides its internals from outer hooks and keeps only its inputs, which a forward
  pre-hook records (as unitrain.plan.calibrate.measure_cpu_memory does);
- gradients (+ ZeRO's gradient partitions and buckets): tensors held at the accumulation boundary, before the
  optimizer step, that are neither weights nor optimizer state;
- weights: parameter storages (ZeRO-3: this rank's partitions; QLoRA: NF4 codes + their quantization state);
- optimizer: state tensors after the step, plus the fp32 master partitions ZeRO keeps.
Each is exact tensor bytes (no allocator, no fragmentation). On CUDA the allocator's peak
(torch.cuda.max_memory_allocated) is compared with plan.memory.allocated_peak as well. The plan's side of each
category comes from unitrain.plan.calibrate.predicted_categories, the one mapping of measured categories to
memory components that calibration uses too (ZeRO buffers count with the gradients on both sides). Results go to
`memory_check.json` in the run directory and to the first metrics row; a warning names every part where the
measurement exceeds the prediction by more than TOLERANCE.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from unitrain.plan.calibrate import activations_at, predicted_categories

log = logging.getLogger("unitrain")
TOLERANCE = 0.01  # exact byte counts; 1 % covers alignment padding of flat ZeRO buffers
MiB = 2**20


def _key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _tensors(obj, depth: int = 2):
    """Tensors reachable from obj through lists, tuples and dicts (depth levels)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth - 1)


def _bytes(tensors, exclude: set | None = None) -> tuple[int, set]:
    seen: dict = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        k = _key(t)
        if k[0] != 0 and k not in (exclude or ()):
            seen[k] = k[1]
    return sum(seen.values()), set(seen)


def weight_tensors(model):
    """Parameters as stored: ZeRO-3 partitions (ds_tensor) and bitsandbytes quantization state included."""
    for p in model.parameters():
        yield p
        if getattr(p, "ds_tensor", None) is not None:
            yield p.ds_tensor
        q = getattr(p, "quant_state", None)
        if q is not None:
            yield from (t for t in (q.absmax, q.code) if torch.is_tensor(t))
            if q.nested:
                yield from (t for t in (q.state2.absmax, q.state2.code, q.offset) if torch.is_tensor(t))


class SavedTensors:
    """Bytes autograd saves for backward inside the context (storage-deduplicated, parameters excluded)."""

    def __init__(self, model):
        self.model = model
        self.saved: dict = {}
        self._params = {_key(t) for t in weight_tensors(model)}

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            k = _key(t)
            if k[0] != 0 and k not in self._params:
                self.saved.setdefault(k, k[1])
        return t

    def _checkpoint_inputs(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        for t in [x, *(kwargs.get("position_embeddings") or ())]:
            self._pack(t)

    @contextlib.contextmanager
    def watch(self):
        hooks = [m.register_forward_pre_hook(self._checkpoint_inputs, with_kwargs=True) for m in self.model.modules()
                 if getattr(m, "gradient_checkpointing", False) is True and m.training
                 and type(m).__name__.endswith(("DecoderLayer", "Block"))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in hooks:
                h.remove()

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


class MemoryCheck:
    """Used by the Trainer: watch(model) around the first forward, before_step/after_step around the first step."""

    def __init__(self, plan, run_dir: Path | None, shape=None, lora=None):
        self.plan, self.run_dir, self.shape, self.lora = plan, run_dir, shape, lora
        self.batch_shape: tuple[int, int] | None = None  # (sequences, width) of the measured micro-batch
        self.model_prediction: dict = {}  # the model's own prediction at the measured shape (what calibration uses)
        self.done = False
        self.saved: SavedTensors | None = None
        self.measured: dict = {}
        self._weights: set = set()
        self._held: list | None = None  # tensors alive at the accumulation boundary

    def watch(self, model, batch_shape: tuple[int, int] | None = None):
        """Context for a forward: records saved-for-backward bytes the first time only."""
        if self.done or self.saved is not None:
            return contextlib.nullcontext()
        self.batch_shape = tuple(batch_shape) if batch_shape is not None else None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.saved = SavedTensors(model)
        return self.saved.watch()

    def before_step(self, backend) -> None:
        """At the accumulation boundary: gradients and ZeRO's gradient buffers are held now."""
        if self.done or self.saved is None:
            return
        model = backend.unwrap()
        self.measured["weights"], self._weights = _bytes(weight_tensors(model))
        held = [p.grad for p in model.parameters() if p.grad is not None]
        zero = getattr(getattr(backend, "engine", None), "optimizer", None)
        if zero is not None and zero is not backend.optimizer:  # ZeRO wrapper: partitions, buckets, fp32 grads
            held += [t for v in vars(zero).values() for t in _tensors(v)]
        self._held = held

    def after_step(self, backend) -> dict:
        """After the first step: optimizer state exists; compare, report, write memory_check.json. -> metrics."""
        if self.done or self._held is None:
            return {}
        self.done = True
        opt = backend.optimizer
        state = [t for s in opt.state.values() for t in _tensors(s) if t.dim() > 0]
        # Master copies: ZeRO's fp32 partitions (ZeRO-3 detaches them from param_groups between steps, the state
        # stays keyed by them); on the torch path these are the weights themselves, excluded below.
        master = [p for g in opt.param_groups for p in g["params"]] + [p for p in opt.state if torch.is_tensor(p)]
        m = self.measured
        m["optimizer"], opt_keys = _bytes(state + master, exclude=self._weights)
        m["gradients"], _ = _bytes(self._held, exclude=self._weights | opt_keys)
        m["activations"] = self.saved.bytes
        self._held = None
        pred = predicted_categories(self.plan.memory.components)
        self.model_prediction = dict(self.plan.calibration.model)
        if self.shape is not None and self.batch_shape is not None:  # compare at the shape actually measured
            pred["activations"], self.model_prediction["activations"] = activations_at(
                self.plan, self.shape, self.lora, *self.batch_shape)
        report = {"execution": asdict(self.plan.execution), "measured": dict(m), "predicted": pred,
                  "measured_batch": self.batch_shape,
                  "tolerance": TOLERANCE, "exceeds": {}}
        if torch.cuda.is_available():
            report["measured"]["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            report["predicted"]["cuda_max_allocated"] = self.plan.memory.allocated_peak
        for k, meas in report["measured"].items():
            p = report["predicted"].get(k)
            if p is not None and meas > p * (1 + TOLERANCE):
                report["exceeds"][k] = {"measured": meas, "predicted": p, "ratio": round(meas / max(p, 1), 4)}
        parts = ("weights", "gradients", "optimizer", "activations")
        report["measured"]["total"] = sum(m[k] for k in parts)
        report["predicted"]["total"] = sum(pred[k] for k in parts)
        if report["exceeds"]:
            log.warning("memory: measured exceeds the plan's prediction: %s", ", ".join(
                f"{k} {v['measured'] / MiB:.2f} MiB > {v['predicted'] / MiB:.2f} MiB"
                for k, v in report["exceeds"].items()))
        if self.run_dir is not None:
            (self.run_dir / "memory_check.json").write_text(json.dumps(report, indent=1, default=str))
        row = {"mem_measured_mib": report["measured"]["total"] / MiB,
               "mem_predicted_mib": report["predicted"]["total"] / MiB}
        if "cuda_max_allocated" in report["measured"]:
            row["mem_peak_predicted_gib"] = self.plan.memory.allocated_peak / 2**30
        return row
