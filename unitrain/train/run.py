"""One run, in the order of DESIGN.md's flow: recipe -> data (tokenize, clean, stats) -> plan -> subset -> build ->
train -> export.

Nothing is written into the run directory until the recipe, the resources, the data and the plan have all been
resolved: a launch that is refused leaves the run directory as it was. A relaunch of a run that has checkpoints
executes the run's stored plan.json (it re-plans only with `replan=True`, and then the trainer refuses to
continue if the plan changed); recipe keys that do not change the math may change between launches, any other
change is refused with the list of what changed (resume.py). `plan_file` (`unitrain run RECIPE --plan plan.json`)
executes a plan made elsewhere (`unitrain plan ... --scan-data --out plan.json`) exactly, after checking that it is
this recipe's and that the machine found here is the one planned (plan_check.py). A fresh plan is made for this
machine: the processes the launcher started and the packages installed here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from unitrain import dist, preflight
from unitrain.data import pipeline
from unitrain.errors import UnitrainError
from unitrain.recipe import recipe_to_yaml
from unitrain.train import checkpoint as ckpt
from unitrain.train import plan_check, resume

log = logging.getLogger("unitrain")


def check_run_dir(recipe) -> Path:
    """The run directory must be creatable and writable, and a fresh run never lands on someone's checkpoints.
    Writes nothing."""
    run_dir = recipe.run_dir
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UnitrainError(f"output folder {run_dir} is not writable ({probe} is not a writable folder); choose "
                            f"another with output.dir=/path/with/space or fix its permissions")
    has_ckpt = any((run_dir / "checkpoints").glob("step-*"))
    if recipe.output.resume == "never" and has_ckpt and not recipe.output.overwrite:
        raise UnitrainError(f"run directory {run_dir} already holds checkpoints and output.resume=never. Continue "
                            f"it with output.resume=auto, or start a new run with name=<new name> (set "
                            f"output.overwrite=true to train from scratch there; old checkpoints are pruned only "
                            f"as new ones complete)")
    return run_dir


def choose_subset(tok, cleaning, recipe, plan) -> tuple[list[int] | None, dict]:
    """Which clean examples fill the tokens the plan decided (plan.data); the selector ranks, the plan sizes."""
    d = plan.data
    if d.policy == "all":
        return list(cleaning.clean), {"policy": "all", "reason": d.reason, "n_kept": len(cleaning.clean),
                                      "tokens_kept": cleaning.tokens, "dropped_by_reason": _counts(cleaning),
                                      "skipped": dict(cleaning.skipped), "selector_flops": 0.0, "seconds": 0.0}
    t0 = time.perf_counter()
    sel = select_for_plan(tok, cleaning, recipe, plan)
    report = sel.report()
    keys = ("policy", "reason", "n_kept", "tokens_kept", "dropped_by_reason", "skipped", "selector_flops")
    return sel.indices, {**{k: report[k] for k in keys}, "seconds": time.perf_counter() - t0}


def _counts(cleaning) -> dict:
    out: dict = {}
    for v in cleaning.dropped.values():
        out[v["why"]] = out.get(v["why"], 0) + 1
    return out


def select_for_plan(tok, cleaning, recipe, plan, encoder: str | None = "recipe"):
    """The selector on the clean pool, filling plan.data.subset_tokens; embeddings only when the plan buys them."""
    from unitrain.data.load import default_cache_dir
    from unitrain.data.select import select_subset

    d = plan.data
    if encoder == "recipe":
        encoder = recipe.data.select_encoder if d.embed else None
    budget_flops = plan.budget.value if plan.budget.kind == "flops" else None
    return select_subset(tok.train_records, d.subset_tokens if d.scanned else None, seq_len=plan.seq_len,
                         seed=recipe.training.seed, encoder=encoder, batch_size=max(1, plan.global_batch_size),
                         budget_flops=budget_flops, cleaning=cleaning,
                         cache_dir=default_cache_dir(recipe.data).parent / "embeddings")


def prepare_data(recipe, tokenizer, ctx):
    """Tokenize (rank 0 fills the caches first), clean, and measure: -> (tokenized, cleaning, stats)."""
    if not ctx.is_main:
        dist.barrier()
    tok = pipeline.tokenize_data(recipe, tokenizer)
    cleaning = pipeline.clean(tok, recipe)
    if ctx.is_main:
        dist.barrier()
    return tok, cleaning, pipeline.data_stats(tok, recipe, tokenizer.pad_token_id, cleaning)


def run_recipe(recipe, console=None, *, replan: bool = False, plan_file: str | None = None,
               extend: bool = False):
    """Plan (or load the stored plan, or the plan file), build and train one recipe; -> RunResult. Raises
    UnitrainError for anything the user can fix."""
    from unitrain import model as M
    from unitrain.console import device_chosen
    from unitrain.plan import make_plan
    from unitrain.resources import resolve_resources
    from unitrain.train.lock import RunLock
    from unitrain.train.loop import Trainer
    from unitrain.train.timing import Timings

    timings = Timings()
    ctx = dist.init()
    lock, created, done = None, not recipe.run_dir.exists(), False
    try:
        run_dir = check_run_dir(recipe) if ctx.is_main else recipe.run_dir
        # one run per directory; the lock is the only thing written before everything is resolved, and a
        # refused launch into a directory it created removes it again (finally)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir, lambda m: _say(console, m)).acquire()
        dist.barrier()
        resuming = _resuming(run_dir, recipe)
        executing = (resuming or plan_file is not None) and not replan and not extend  # checked below
        spec = None if executing else resolve_resources(recipe.resources, world_size=ctx.world, mode="run")
        if spec is not None:
            device_chosen(spec.on_cpu)  # before anything imports DeepSpeed
            preflight.check_launch(recipe, spec, ctx.world)
        with timings.phase("startup"):  # torch and transformers are imported here
            tokenizer = M.load_tokenizer(recipe.model, recipe.base_dir)
            model_config = M.load_config(recipe.model, recipe.base_dir)
        if recipe.model.max_layers:
            model_config.num_hidden_layers = min(model_config.num_hidden_layers, recipe.model.max_layers)
        preflight.check_model(recipe, model_config, tokenizer)  # before the data and the weights
        with timings.phase("data"):
            tok, cleaning, stats = prepare_data(recipe, tokenizer, ctx)
        preflight.check_token_ids(tok, model_config)
        with timings.phase("plan"):
            extend_from, source = None, ""
            if extend:  # a longer plan, continued from the state just before the old one's LR cooldown
                old = resume.stored_plan(run_dir, recipe, extend=True)
                pre = ckpt.pre_cooldown(run_dir / "checkpoints")
                new = make_plan(recipe, spec, model_config, stats, world_size=ctx.world)
                plan = resume.check_extension(old, new, pre, run_dir)
                extend_from, stored = pre[1], None
            else:
                stored, source = _plan_to_execute(run_dir, recipe, model_config, stats, ctx, resuming, replan,
                                                  plan_file)
                plan = stored or make_plan(recipe, spec, model_config, stats, world_size=ctx.world)
        plan_check.check_packages(plan)  # the packages on this machine, not the planning one's
        device_chosen(plan.resources.on_cpu)  # (an executed plan's device; before the backend imports DeepSpeed)
        with timings.phase("data"):
            keep, subset = choose_subset(tok, cleaning, recipe, plan)
            data = pipeline.finalize(tok, recipe, tokenizer.pad_token_id, keep, subset)
        if len(data.train) < 1:
            raise UnitrainError("the training data packs into no sequence; add data or lower data.max_length")
        # Everything is resolved: only now does the run directory change.
        done = True
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            plan.save(run_dir / "plan.json")
            (run_dir / "selection.json").write_text(json.dumps(subset, indent=1, default=float))
            if stored is not None:
                _say(console, f"{'resuming' if resuming else 'executing'}: the plan from {source}")
            _print_plan(plan, console)
        dist.barrier()
        with timings.phase("model"):
            model = M.load_model(recipe.model, plan.execution, recipe.training.seed, recipe.base_dir)
            model = M.apply_method(model, plan.execution.method, recipe.method.lora, plan.execution.checkpointing)
            M.apply_checkpointing(model, plan.execution.checkpointing)
            kernel_report = M.apply_kernels(model, plan.execution.kernels, recipe.training.kernels)
        if kernel_report is not None and ctx.is_main:
            _say(console, f"kernels: {kernel_report}")
        trainer = Trainer(recipe, plan, data, model, tokenizer, run_dir, console, extend_from=extend_from,
                          timings=timings)
        try:
            return _train_and_score(trainer, recipe, data, tok, run_dir, ctx,
                                    (subset.get("selector_flops", 0.0), subset.get("seconds", 0.0)))
        except Exception as e:
            if dist.is_peer_failure(e):
                raise UnitrainError(
                    f"rank {ctx.rank} of {ctx.world} stopped: another rank failed or stopped answering ({e}). "
                    f"Check that rank's log for the cause. Complete checkpoints are kept; relaunch with "
                    f"output.resume=auto to continue") from None
            raise
    finally:
        if lock is not None:
            lock.release()
            if created and not done and recipe.run_dir.is_dir() and not any(recipe.run_dir.iterdir()):
                recipe.run_dir.rmdir()  # a refused launch leaves no trace
        dist.shutdown()


def _resuming(run_dir: Path, recipe) -> bool:
    """Does this launch continue from a checkpoint? Read-only: the trainer's find_resume verifies and picks."""
    if recipe.output.resume == "never":
        return False
    return recipe.output.resume != "auto" or bool(ckpt.list_complete(run_dir / "checkpoints"))


def _plan_to_execute(run_dir, recipe, model_config, stats, ctx, resuming: bool, replan: bool, plan_file):
    """(the plan a relaunch or `--plan FILE` executes, where it came from), or (None, "") to plan here. Either is
    checked against this recipe, its data and the machine found here before anything runs."""
    from unitrain.plan.shape import model_shape

    if replan:
        return None, ""
    if resuming:
        plan, source = resume.stored_plan(run_dir, recipe), f"{run_dir / 'plan.json'} (stored)"
        resume.check_data(plan, stats)
        if plan_file is not None:
            from unitrain.plan.schema import Plan

            if Plan.load(plan_file).execution != plan.execution:
                raise UnitrainError(f"{run_dir} was started from another plan than {plan_file}; a relaunch executes "
                                    f"its stored plan.json: drop --plan, or start a new run with name=<new name>")
    elif plan_file is not None:
        shape = model_shape(recipe.model, model_config, recipe.base_dir)
        plan, source = plan_check.load_plan_file(plan_file, recipe, shape, stats), f"plan file {plan_file}"
    else:
        return None, ""
    found = plan_check.machine_resources(ctx.world, plan.resources.nodes, cpu=plan.resources.on_cpu)
    plan_check.check_machine(plan, found, source)
    return plan, source


def _train_and_score(trainer, recipe, data, tok, run_dir, ctx, selection_cost):
    """setup -> (exact match before) -> train -> (exact match after) -> summary.json (with where the time went)."""
    from unitrain.train.loop import write_json

    timings = trainer.timings
    with timings.phase("model"):  # the backend: optimizer, DeepSpeed engine, device placement
        trainer.setup(selection_cost)
    em_n = recipe.training.exact_match_examples if tok.format != "text" else 0
    if em_n and ctx.world > 1 and trainer.plan.execution.zero_stage == 3:
        em_n = 0  # generation runs on rank 0 alone; ZeRO-3 would need every rank for each forward
        log.warning("exact match skipped: not supported with ZeRO-3 across several ranks")
    try:
        with timings.phase("exact match"):
            em_before = _exact_match(trainer, data, recipe, em_n) if em_n and trainer.step == 0 and ctx.is_main \
                else None
        result = trainer.train()
    finally:  # an error mid-run: the progress bar stops (and gives the cursor back) before the message
        trainer.tracker.close()
    if em_n and ctx.is_main and result.exit_code == 0:
        result.initial_exact_match = em_before[0] if em_before else None
        with timings.phase("exact match"):
            result.exact_match, rows = _exact_match(trainer, data, recipe, em_n)
        write_json(run_dir / "exact_match.json", {"before": result.initial_exact_match,
                                                  "after": result.exact_match, "examples": rows})
    if ctx.is_main:
        result.seconds = timings.report()
        summary = {k: v for k, v in vars(result).items() if k != "run_dir"}
        summary["prediction"] = (result.extra.get("governor") or {}).get("prediction")  # predicted vs achieved
        write_json(run_dir / "summary.json", summary)
    return result


def _exact_match(trainer, data, recipe, n):
    from unitrain.train.evaluate import exact_match

    examples = [e for e in data.eval_examples if e.messages][:n]
    if not examples:
        return None
    return exact_match(trainer.backend.unwrap(), trainer.tokenizer, examples, recipe.data.chat_template,
                       recipe.training.exact_match_max_new_tokens)


def _say(console, msg):
    (console.print if console else print)(msg)


def _print_plan(plan, console) -> None:
    try:
        from unitrain.plan.report import print_plan

        print_plan(plan, console)
    except ImportError:
        _say(console, plan.to_json()[:2000])


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
