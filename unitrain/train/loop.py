"""The Trainer: executes a Plan. setup() builds everything, train() is the one loop, cleanup() releases.

Per optimizer step (G = global batch, m = micro-batch, W = ranks):
  this rank's G/W sequences are split into G/(W·m) micro-batches; the loss of each is
  sum(token losses) / N_step where N_step = label tokens of the whole global batch, so summing the
  micro-batch losses (and the ranks' gradients) gives exactly the token-mean loss of the global
  batch — independent of m, accumulation and W. DDP and DeepSpeed average gradients over ranks, so
  the rank loss is scaled by W to keep the sum.
The trainer never re-decides: batch shape, strategy and length come from the plan; stopping comes
from the governor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitrain import dist
from unitrain.data.pack import BatchOrder
from unitrain.data.pipeline import PreparedData
from unitrain.data.tokenize import IGNORE
from unitrain.errors import CheckpointError, UnitrainError
from unitrain.plan.memory import LoraSpec
from unitrain.plan.schema import Plan
from unitrain.plan.shape import model_shape
from unitrain.train import checkpoint as ckpt
from unitrain.train.evaluate import eval_loss, exact_match
from unitrain.train.memory_check import MemoryCheck
from unitrain.train.schedule import Schedule
from unitrain.train.timing import Timings
from unitrain.train.track import Tracker

log = logging.getLogger("unitrain")
SIGTERM_EXIT = 143  # 128 + SIGTERM: schedulers (Slurm, Kubernetes) read it as "preempted", not "done"
CALIBRATION_STEPS = 4  # step time = median of steps 2..4 (step 1 pays warm-up and the memory measurement)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    stop_reason: str  # completed | marginal_gain | patience | budget | nonfinite | sigterm
    final_eval_loss: float | None = None
    exact_match: float | None = None
    initial_eval_loss: float | None = None
    initial_exact_match: float | None = None
    exit_code: int = 0
    extra: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # where the wall time went: timing.Timings.report()


class Trainer:
    def __init__(self, recipe, plan: Plan, data: PreparedData, model, tokenizer, run_dir: Path, console=None,
                 extend_from: Path | None = None, timings: Timings | None = None):
        """`extend_from`: a pre-cooldown checkpoint of this run to continue from under `plan`, a longer one.
        `timings`: the run's phase clock (steps, evals, checkpoints, export are added to it)."""
        self.timings = timings or Timings()
        self.recipe, self.plan, self.data = recipe, plan, data
        self.extend_from = extend_from
        self.model, self.tokenizer, self.run_dir = model, tokenizer, run_dir
        self.console = console
        self.ctx = dist.context()
        self._sigterm = False

    # ------------------------------------------------------------------ setup
    def setup(self, selection_cost: tuple[float, float] = (0.0, 0.0)) -> None:
        """Build the backend, schedule and governor from the plan; resume from a checkpoint when there is one.
        `selection_cost`: (FLOPs, seconds) the data selector spent for this run, charged to the budget once."""
        from unitrain.train.backends import build_backend
        from unitrain.train.governor import Governor

        p, ex, L = self.plan, self.plan.execution, self.plan.length
        self.device = self.ctx.device
        self.model.to(self.device)
        self.schedule = Schedule(L.schedule, L.steps, L.warmup, L.cooldown)
        self.backend = build_backend(p, self.model, self.recipe, self.schedule)
        self.memcheck = MemoryCheck(p, self.run_dir if self.ctx.is_main else None,
                                    model_shape(self.recipe.model, self.model.config), LoraSpec.of(self.recipe.method.lora))
        self.order = BatchOrder(len(self.data.train), p.global_batch_size, self.recipe.training.seed)
        self.governor = Governor(p, self.recipe.stopping, self.run_dir if self.ctx.is_main else None)
        self.autocast = (torch.autocast("cuda", dtype=getattr(torch, ex.dtype))
                         if self.device.type == "cuda" and ex.dtype != "float32" else None)
        self.step, self.end_step, self.stop_reason = 0, L.steps, "completed"
        self.eval_every = p.evals.every  # 0 when the plan runs only a final eval (the stop rule is off)
        self._has_evals = self.data.eval is not None and p.evals.sequences > 0
        self.state = {"tokens": 0, "flops": 0.0, "wall": 0.0, "evals": []}
        self.step_times: list[float] = []  # this process's step seconds, for calibration
        if self.extend_from is not None:
            self._extend(self.extend_from)
        elif (resume_from := ckpt.find_resume(self.run_dir / "checkpoints", self.recipe.output.resume,
                                              self.ctx.rank, self._say)) is not None:
            saved = ckpt.load_checkpoint(resume_from, self.backend, self.ctx.rank)
            if saved.get("plan_fingerprint") != self._plan_fingerprint():
                raise CheckpointError(
                    f"checkpoint {resume_from} was written under a different plan (batch shape, strategy or "
                    f"length changed). Resume with the recipe it was made with, or start a new run (name=...)")
            self.step, self.end_step = saved["step"], saved["end_step"]
            self.stop_reason = saved.get("stop_reason", "completed")
            self.state = saved["state"]
            self.governor.load_state_dict(saved["governor"])
            self._say(f"resumed from {resume_from} at step {self.step}")
        else:
            self.governor.account_selection(*selection_cost)
        self.tracker = Tracker(self.run_dir, self.recipe, p.to_dict(), self.end_step, self.step,
                               active=self.ctx.is_main, console=self.console)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _extend(self, path: Path) -> None:
        """Continue a finished (or stopped) run from its pre-cooldown checkpoint under the longer plan: the LR is
        still at its stable level there, so the new schedule picks it up as a run planned this long would have."""
        planned = dict(vars(self.schedule))
        saved = ckpt.load_checkpoint(path, self.backend, self.ctx.rank)
        # LambdaLR's state dict carries its lambda's attributes: loading it put the old length back into the schedule
        vars(self.schedule).update(planned)
        old, new = saved.get("plan_fingerprint", []), self._plan_fingerprint()
        if [x for i, x in enumerate(old) if i != 6] != [x for i, x in enumerate(new) if i != 6]:  # all but the length
            raise CheckpointError(f"{path} was written under a different batch shape, strategy or data than the "
                                  f"extended plan; --extend may change only the length (training.max_steps, "
                                  f"training.epochs, resources.budget)")
        self.step, self.end_step, self.stop_reason = saved["step"], self.plan.length.steps, "completed"
        self.state = saved["state"]
        self.governor.load_state_dict(saved["governor"])
        self.governor.extended()
        if self.ctx.is_main:
            gone = ckpt.supersede_after(self.run_dir / "checkpoints", self.step)
            if gone:
                self._say(f"extend: checkpoints of the old schedule's cooldown set aside: {', '.join(gone)}")
        dist.barrier()
        self._say(f"extend: continuing from {path.name} (step {self.step}, before the LR cooldown) to step "
                  f"{self.end_step}")

    def _save_pre_cooldown(self) -> None:
        """The state just before an LR cooldown begins: what `unitrain run --extend` continues from."""
        if not self.recipe.output.keep_pre_cooldown or self.plan.length.schedule != "wsd":
            return
        with self.timings.phase("checkpoints"):
            ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.backend, self._trainer_state(),
                                 self.recipe.output.keep_last, self.ctx.rank, dist.barrier,
                                 name=f"pre-cooldown-step-{self.step}")

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def _plan_fingerprint(self) -> list:
        p, s = self.plan, self.plan.execution
        return [p.global_batch_size, p.seq_len, p.world_size, s.method, s.zero_stage, s.optimizer, p.length.steps,
                len(self.data.train)]

    def _say(self, msg: str) -> None:
        if self.ctx.is_main:
            (self.console.print if self.console else print)(msg)

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        p = self.plan
        t = self.recipe.training
        micro = p.execution.micro_batch_size
        self.model.train()
        result = RunResult(self.run_dir, self.step, self.stop_reason)
        if self.state["evals"] and self.state["evals"][0][0] == 0:  # resumed: the step-0 eval is on record
            result.initial_eval_loss = self.state["evals"][0][1]
        if self.step == 0 and self._has_evals and p.evals.initial:
            result.initial_eval_loss = self._evaluate(0, observe=False)
            self.tracker.log({"step": 0, "eval_loss": result.initial_eval_loss})
        while self.step < self.end_step:
            t0 = time.perf_counter()
            index = self.order.micro_batches(self.step, micro, self.ctx.rank, self.ctx.world)
            batches = [self.data.train.batch(i) for i in index]
            n_items = dist.all_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches), self.device)
            n_items = max(1, n_items)
            # token counts from the host copies: no device sync inside the step
            tokens = sum(self.data.train.real_tokens(i) for i in index)
            padded = sum(b["input_ids"].numel() for b in batches)
            loss_sum = torch.zeros((), device=self.device)
            for i, b in enumerate(batches):
                b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
                with self.backend.no_sync(i == len(batches) - 1), self.autocast or contextlib.nullcontext(), \
                        self.memcheck.watch(self.backend.unwrap(), b["input_ids"].shape):
                    out = self.backend.forward(**b, num_items_in_batch=torch.tensor(n_items, device=self.device))
                    loss = out.loss * self.ctx.world  # ranks' gradients are averaged; keep the global sum
                self.backend.backward(loss)
                loss_sum += out.loss.detach().float()
                del out, loss  # the logits need not outlive their backward
            lr = self.backend.lr  # the LR this step's update uses
            self.memcheck.before_step(self.backend)
            grad_norm = self.backend.step()
            self.step += 1
            loss_total = dist.all_sum(float(loss_sum), self.device)  # one host sync per step
            tokens, padded = dist.all_sum(tokens, self.device), dist.all_sum(padded, self.device)
            dt = time.perf_counter() - t0
            flops = p.compute.flops_per_slot * padded  # FLOPs are charged on forwarded slots, padding included
            self.step_times.append(dt)
            self.timings.add("steps", dt)
            self.tracker.tick(self.step, dt)
            if len(self.step_times) == CALIBRATION_STEPS:
                self._calibrate()
            self.state["tokens"] += tokens
            self.state["flops"] += flops
            self.state["wall"] += dt
            decision = self.governor.observe_train_loss(self.step, loss_total)
            if decision is None or not decision.stop:
                decision = self.governor.account(tokens, flops, dt)
            row = {"step": self.step, "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                   "tokens": self.state["tokens"], "tok_per_s": tokens / dt if dt > 0 else 0.0, "step_s": dt,
                   "epoch": round(self.order.epoch_of(self.step), 4), **self._memory(), **self._budget()}
            if decision is not None and decision.stop:
                self._stop(decision, row)
                if decision.reason in ("budget", "nonfinite"):
                    self.tracker.log(row)
                    break
            if self.eval_every and self.step % self.eval_every == 0 and self.step < self.end_step:
                row["eval_loss"] = self._evaluate(self.step, observe=self.stop_reason == "completed")
            if self.step % max(1, t.log_every) == 0 or "eval_loss" in row:
                self.tracker.log(row)
            L = self.plan.length
            if L.cooldown and self.step == L.steps - L.cooldown and self.stop_reason == "completed":
                self._save_pre_cooldown()  # the planned cooldown starts with the next step
            if self._sigterm_agreed():
                self._save()
                self._say(f"SIGTERM: saved checkpoint step-{self.step}; relaunch with output.resume=auto to continue")
                self.tracker.close()
                result.steps, result.stop_reason, result.exit_code = self.step, "sigterm", SIGTERM_EXIT
                return result
            if self.recipe.output.save_every and self.step % self.recipe.output.save_every == 0 \
                    and self.step < self.end_step:
                self._save()
        return self._finish(result)

    def _stop(self, decision, row) -> None:
        self.stop_reason = decision.reason
        row["stop"] = decision.reason
        if decision.reason in ("marginal_gain", "patience"):
            self._save_pre_cooldown()  # a rule stop cools down from here: the run can be extended from this step
            self.end_step = self.schedule.begin_cooldown(self.step, decision.cooldown_steps)
            self.tracker.set_total(self.end_step)
            self._say(f"governor: stop ({decision.reason}) at step {self.step}: {decision.detail}; "
                      f"cooling the LR down until step {self.end_step}")
        else:  # budget or nonfinite: now. An eval's non-finite loss must end the loop (and skip saves) too.
            self.end_step = self.step
            self._say(f"governor: stop ({decision.reason}) at step {self.step}: {decision.detail}")

    def _finish(self, result: RunResult) -> RunResult:
        if self.stop_reason == "nonfinite":
            # Nothing is saved after the loss went non-finite: the newest checkpoint predates it.
            done = ckpt.list_complete(self.run_dir / "checkpoints")
            kept = (f"the last good checkpoint is kept: {done[-1][1]} (step {done[-1][0]}); lower training.lr and "
                    f"resume from it with output.resume=auto" if done else
                    "no checkpoint was written before it (raise the save frequency with output.save_every)")
            self._say(f"training diverged (non-finite loss at step {self.step}); {kept}. No export written")
            result.extra["governor"] = self.governor.finalize(self.step, None) if self.ctx.is_main else {}
            self.tracker.close()
            result.steps, result.stop_reason, result.exit_code = self.step, self.stop_reason, 3
            return result
        final_eval = self._evaluate(self.step, observe=False) if self._has_evals else None
        self._save()
        report = self.governor.finalize(self.step, final_eval, result.initial_eval_loss) if self.ctx.is_main else {}
        full_state = self.backend.full_state_dict()  # ZeRO-3: gathered onto rank 0 (collective); else None
        if self.ctx.is_main:
            from unitrain.model import export

            with self.timings.phase("export"):
                export(self.backend.unwrap(), self.tokenizer, self.run_dir / "final", self.plan.execution.method,
                       self.recipe.output.merge, state_dict=full_state)
            self.tracker.log_image("governor", self.run_dir / "governor.png")
        result.steps, result.stop_reason, result.final_eval_loss = self.step, self.stop_reason, final_eval
        result.extra["governor"] = report
        self.tracker.summary({"final_eval_loss": final_eval, "steps": self.step, "stop_reason": self.stop_reason})
        self.tracker.close()
        return result

    # ------------------------------------------------------------------ pieces
    def _evaluate(self, step: int, observe: bool) -> float:
        """One eval as the plan sized it: its first `sequences` eval sequences, charged its planned FLOPs."""
        t0 = time.perf_counter()
        ev = self.plan.evals
        total, count = eval_loss(self.backend.unwrap(), self.data.eval, ev.batch_size, ev.sequences, self.autocast,
                                 self.ctx.rank, self.ctx.world)
        total, count = dist.all_sum(total, self.device), dist.all_sum(count, self.device)
        loss = total / count if count else float("nan")
        dt = time.perf_counter() - t0
        self.timings.add("evals", dt)
        self.tracker.eval_done(dt)
        self.governor.account_eval(ev.flops, dt)
        self.state["evals"].append([step, loss])
        if observe:
            decision = self.governor.observe_eval(step, loss)
            if decision.stop:
                self._stop(decision, {})
        return loss

    def _trainer_state(self) -> dict:
        return {"step": self.step, "end_step": self.end_step, "stop_reason": self.stop_reason, "state": self.state,
                "governor": self.governor.state_dict(), "plan_fingerprint": self._plan_fingerprint()}

    def _save(self) -> None:
        with self.timings.phase("checkpoints"):
            ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.backend, self._trainer_state(),
                                 self.recipe.output.keep_last, self.ctx.rank, dist.barrier)

    def _calibrate(self) -> None:
        """Measured beats modelled: store measured/predicted memory and step time for later plans."""
        import statistics

        from unitrain.plan import calibrate

        if not self.ctx.is_main or not self.memcheck.measured:
            return
        measured = {k: v for k, v in self.memcheck.measured.items() if k in calibrate.CATEGORIES}
        measured["step_time"] = statistics.median(self.step_times[1:])
        if self.device.type == "cuda":
            measured["peak"] = torch.cuda.max_memory_allocated()
        key = self.plan.calibration.key
        entry = calibrate.record(key, self.memcheck.model_prediction or self.plan.calibration.model, measured,
                                 source=str(self.run_dir))
        write_json(self.run_dir / "calibration.json", {"key": key, "factors": entry.factors,
                                                       "predicted": entry.predicted, "measured": measured})

    def _sigterm_agreed(self) -> bool:
        return dist.any_true(self._sigterm, self.device)

    def _memory(self) -> dict:
        row = self.memcheck.after_step(self.backend)  # first step only: measured vs predicted, memory_check.json
        if self.device.type == "cuda":
            row["mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row

    def _budget(self) -> dict:
        prog = self.governor.progress()
        # "step" is the governor's count of accounted steps; the row's own step must win (they differ on
        # the step whose loss was non-finite, which is never accounted).
        return {k: v for k, v in prog.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


__all__ = ["Trainer", "RunResult", "UnitrainError", "exact_match"]
