"""One run, in the order of DESIGN.md's flow: recipe -> data stats -> plan -> subset -> build -> train -> export."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from unitrain import dist, preflight
from unitrain.data import pipeline
from unitrain.errors import UnitrainError
from unitrain.recipe import recipe_to_yaml

log = logging.getLogger("unitrain")


def check_run_dir(recipe) -> Path:
    """The run directory must be writable, and a fresh run never lands on someone's checkpoints."""
    run_dir = recipe.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # per process: a concurrent run must not delete ours
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UnitrainError(f"output folder {run_dir} is not writable ({e.strerror}); choose another with "
                            f"output.dir=/path/with/space or fix its permissions") from None
    has_ckpt = any((run_dir / "checkpoints").glob("step-*"))
    if recipe.output.resume == "never" and has_ckpt and not recipe.output.overwrite:
        raise UnitrainError(f"run directory {run_dir} already holds checkpoints and output.resume=never. Continue "
                            f"it with output.resume=auto, or start a new run with name=<new name> (set "
                            f"output.overwrite=true to train from scratch there; old checkpoints are pruned only "
                            f"as new ones complete)")
    return run_dir


def choose_subset(tok, recipe, plan) -> tuple[list[int] | None, dict]:
    """Which examples fill the tokens the plan trains on (unitrain.data.select decides and explains)."""
    if not recipe.data.select:
        return None, {"policy": "all", "reason": "data.select=false: every example is used"}
    sel = select_for_plan(tok, recipe, plan, recipe.data.select_encoder)
    report = sel.report()
    keys = ("policy", "reason", "epochs", "n_kept", "tokens_kept", "dropped_by_reason", "skipped", "selector_flops")
    return sel.indices, {k: report[k] for k in keys}


def select_for_plan(tok, recipe, plan, encoder):
    """The selector on the tokenized training examples, for the tokens the plan trains on."""
    from unitrain.data.load import default_cache_dir
    from unitrain.data.select import select_subset

    budget = int(plan.total_tokens * _slot_fill(tok, recipe, plan.seq_len)) if plan.total_tokens else None
    return select_subset(tok.train_records, budget, seq_len=plan.seq_len,
                         seed=recipe.training.seed, encoder=encoder, batch_size=max(1, plan.global_batch_size),
                         cache_dir=default_cache_dir(recipe.data).parent / "embeddings")


def _slot_fill(tok, recipe, seq_len: int) -> float:
    """Real tokens per sequence slot, as a share of seq_len, for the examples the selector can keep.

    plan.total_tokens counts slots (steps × G × seq_len), but a packed sequence holds whole examples
    (~80-95% full) and an unpacked one a single example (often mostly padding); a subset sized in slot
    tokens would hold more examples than the planned steps reach. Supervised examples the tokenizer cut
    are left out of the estimate: the selector always drops them (too_long).
    """
    rows = tok.train if tok.format == "text" else [r for r in tok.train if not r["truncated"]] or tok.train
    seqs = pipeline.pack(rows, tok.format, seq_len, 0, recipe.data.packing)
    return min(1.0, sum(r["n_tokens"] for r in rows) / max(1, len(seqs) * seq_len))


def run_recipe(recipe, console=None):
    """Plan, build and train one recipe; -> RunResult. Raises UnitrainError for anything the user can fix."""
    from unitrain import model as M
    from unitrain.plan import make_plan
    from unitrain.resources import resolve_resources
    from unitrain.train.lock import RunLock
    from unitrain.train.loop import Trainer

    ctx = dist.init()
    lock = None
    try:
        run_dir = check_run_dir(recipe) if ctx.is_main else recipe.run_dir
        lock = RunLock(run_dir, lambda m: _say(console, m)).acquire() if ctx.is_main else None  # one run per dir
        dist.barrier()
        spec = resolve_resources(recipe.resources, world_size=ctx.world if ctx.world > 1 else None)
        preflight.check_launch(recipe, spec, ctx.world)
        tokenizer = M.load_tokenizer(recipe.model, recipe.base_dir)
        model_config = M.load_config(recipe.model, recipe.base_dir)
        if recipe.model.max_layers:
            model_config.num_hidden_layers = min(model_config.num_hidden_layers, recipe.model.max_layers)
        preflight.check_model(recipe, model_config, tokenizer)  # before the data and the weights
        if not ctx.is_main:
            dist.barrier()  # rank 0 fills the tokenization cache first
        tok = pipeline.tokenize_data(recipe, tokenizer)
        if ctx.is_main:
            dist.barrier()
        preflight.check_token_ids(tok, model_config)
        stats = pipeline.data_stats(tok, recipe, tokenizer.pad_token_id)
        plan = make_plan(recipe, spec, model_config, stats, world_size=ctx.world)
        keep, subset = choose_subset(tok, recipe, plan)
        data = pipeline.finalize(tok, recipe, tokenizer.pad_token_id, keep, subset)
        if len(data.train) < plan.global_batch_size // max(1, plan.world_size) and len(data.train) < 1:
            raise UnitrainError("the training data packs into no sequence; add data or lower data.max_length")
        plan.data.update({"examples": data.stats.n_examples, "tokens": data.stats.total_tokens,
                          "sequences": len(data.train), "skipped": data.skipped, "subset": subset})
        if ctx.is_main:
            (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            plan.save(run_dir / "plan.json")
            _print_plan(plan, console)
        model = M.load_model(recipe.model, plan.strategy, recipe.training.seed, recipe.base_dir)
        model = M.apply_method(model, plan.strategy.method, recipe.method.lora, plan.strategy.checkpointing)
        M.apply_checkpointing(model, plan.strategy.checkpointing)
        kernel_report = M.apply_kernels(model, plan.strategy.kernels, recipe.training.kernels)
        if kernel_report is not None and ctx.is_main:
            _say(console, f"kernels: {kernel_report}")
        trainer = Trainer(recipe, plan, data, model, tokenizer, run_dir, console)
        try:
            return _train_and_score(trainer, recipe, data, tok, run_dir, ctx)
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
        dist.shutdown()


def _train_and_score(trainer, recipe, data, tok, run_dir, ctx):
    """setup -> (exact match before) -> train -> (exact match after) -> summary.json."""
    from unitrain.train.loop import write_json

    trainer.setup()
    em_n = recipe.training.exact_match_examples if tok.format != "text" else 0
    if em_n and ctx.world > 1 and trainer.plan.strategy.zero_stage == 3:
        em_n = 0  # generation runs on rank 0 alone; ZeRO-3 would need every rank for each forward
        log.warning("exact match skipped: not supported with ZeRO-3 across several ranks")
    em_before = _exact_match(trainer, data, recipe, em_n) if em_n and trainer.step == 0 and ctx.is_main else None
    result = trainer.train()
    if em_n and ctx.is_main and result.exit_code == 0:
        result.initial_exact_match = em_before[0] if em_before else None
        result.exact_match, rows = _exact_match(trainer, data, recipe, em_n)
        write_json(run_dir / "exact_match.json", {"before": result.initial_exact_match,
                                                  "after": result.exact_match, "examples": rows})
    if ctx.is_main:
        write_json(run_dir / "summary.json", {k: v for k, v in vars(result).items() if k != "run_dir"})
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
        _say(console, json.dumps(plan.to_dict(), indent=1, default=str)[:2000])


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
