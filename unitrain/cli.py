"""`unitrain` command line: parse, call, print. User mistakes print one paragraph and exit non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from unitrain import __version__
from unitrain.errors import UnitrainError

EPILOG = """examples:
  unitrain run recipes/quickstart.yaml
  unitrain run recipes/quickstart.yaml training.lr=1e-4 name=lr-sweep-1
  unitrain plan recipes/llama-lora.yaml --gpus 1 --gpu-memory 24GiB --budget 2e18
  torchrun --nproc_per_node 2 -m unitrain run RECIPE
  deepspeed --num_gpus 2 $(which unitrain) run RECIPE
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unitrain", description="Train language models under explicit resource limits: "
                                "plan, run, and stop when more compute stops paying.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"unitrain {__version__}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="plan and train a recipe", description="Plan, then train RECIPE. Overrides are "
                         "key=value pairs merged into the recipe, e.g. training.lr=1e-4.")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    plan = sub.add_parser("plan", help="print the plan for a recipe without training")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--gpus", type=int, help="GPUs per node")
    plan.add_argument("--nodes", type=int)
    plan.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB")
    plan.add_argument("--cpu-memory", help="CPU memory per node, e.g. 512GiB")
    plan.add_argument("--accelerator", help="e.g. H100, A100-80GB, L4")
    plan.add_argument("--budget", help="FLOPs (2e19), GPU-hours (6h) or tokens (50M tokens)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--deepspeed-config", metavar="OUT.json", help="write the DeepSpeed config the plan implies")
    plan.add_argument("--scan-data", action="store_true", help="tokenize the data to plan epochs and subset size")
    plan.add_argument("--trace", action="store_true", help="trace the chosen strategy's memory exactly (fake tensors, "
                      "no GPU; seconds to minutes) and show it next to the formula")

    cal = sub.add_parser("calibrate", help="run a few real steps and store measured/predicted factors for later plans")
    cal.add_argument("recipe")
    cal.add_argument("overrides", nargs="*", metavar="key=value")
    cal.add_argument("--steps", type=int, default=6, help="optimizer steps to measure (>= 4)")

    sel = sub.add_parser("select", help="score the data and write the subset the budget affords")
    sel.add_argument("recipe")
    sel.add_argument("overrides", nargs="*", metavar="key=value")
    sel.add_argument("--budget", help="FLOPs, GPU-hours or tokens; replaces the recipe's budget and "
                     "training.max_steps (default: the recipe's)")
    sel.add_argument("--out", required=True, help="subset JSONL to write (the report goes beside it)")
    sel.add_argument("--encoder", help="sentence-transformers model for embeddings, or none (default: the recipe's "
                     "data.select_encoder, as `unitrain run` uses)")
    return p


def _load(args, extra: list[str] = ()):  # noqa: ANN001
    from unitrain.recipe import load_recipe

    return load_recipe(args.recipe, list(args.overrides) + list(extra))


def cmd_run(args, console) -> int:
    from unitrain.train.run import run_recipe

    recipe = _load(args)
    result = run_recipe(recipe, console)
    if result.exit_code == 0 and int(os.environ.get("RANK", "0")) == 0:
        line = f"done: {result.steps} steps ({result.stop_reason})"
        if result.final_eval_loss is not None:
            before = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
            line += f", eval loss {before}{result.final_eval_loss:.4f}"
        if result.exact_match is not None:
            before = f"{result.initial_exact_match:.3f} -> " if result.initial_exact_match is not None else ""
            line += f", exact match {before}{result.exact_match:.3f}"
        console.print(line, highlight=False)
        for extra in _governor_lines(result.extra.get("governor") or {}):
            console.print(extra, highlight=False)
        console.print(f"run directory: {result.run_dir}", highlight=False)
    return result.exit_code


def _governor_lines(report: dict) -> list[str]:
    """Budget used vs given, and what stopping early bought (from the governor's final report)."""
    lines = []
    if report.get("budget"):
        b = report["budget"]
        lines.append(f"budget: {100 * report['fraction_of_budget']:.1f}% of {b['value']:.3g} {b['kind']} used")
    stop = report.get("stop")
    if stop and stop.get("reason") in ("marginal_gain", "patience"):
        pred = report.get("predicted_loss_full_budget")
        saved = report.get("compute_saved", {})
        lines.append(f"stopped early at step {stop['step']} ({stop['reason']}): saved {saved.get('steps', 0):.0f} "
                     f"steps; predicted eval loss had it continued: {pred:.4f}" if pred is not None else
                     f"stopped early at step {stop['step']} ({stop['reason']})")
    return lines


def _resource_overrides(args) -> list[str]:
    pairs = {"gpus": "resources.gpus_per_node", "nodes": "resources.nodes", "gpu_memory": "resources.gpu_memory",
             "cpu_memory": "resources.cpu_memory", "accelerator": "resources.accelerator",
             "budget": "resources.budget"}
    return [f"{key}={getattr(args, a)}" for a, key in pairs.items() if getattr(args, a, None) is not None]


def cmd_plan(args, console) -> int:
    # torch-importing modules only when needed: a plan for a hub name or config takes well under a second
    from unitrain.plan import make_plan
    from unitrain.plan.report import print_plan

    recipe = _load(args, _resource_overrides(args))
    stats = None
    if args.scan_data:
        from unitrain import model as M
        from unitrain.data import pipeline

        tok = M.load_tokenizer(recipe.model, recipe.base_dir)
        stats = pipeline.data_stats(pipeline.tokenize_data(recipe, tok), recipe, tok.pad_token_id)
    plan = make_plan(recipe, data_stats=stats)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print_plan(plan, console)
    if args.trace:
        from rich.console import Console

        from unitrain.plan.trace import plan_trace_lines

        out = Console(stderr=True) if args.json else console  # keep stdout parseable JSON
        out.print("\n".join(plan_trace_lines(plan, recipe)), highlight=False, markup=False, soft_wrap=True)
    if args.deepspeed_config:
        from unitrain.strategy import deepspeed_config

        with open(args.deepspeed_config, "w") as f:
            json.dump(deepspeed_config(plan, recipe), f, indent=2)
        console.print(f"DeepSpeed config written to {args.deepspeed_config}")
        if plan.strategy.optimizer != "adamw":  # DeepSpeed has no bitsandbytes optimizer type
            console.print(f"note: the plan's optimizer is bitsandbytes {plan.strategy.optimizer}; the config names "
                          f"none, so pass it to deepspeed.initialize(optimizer=...) yourself (unitrain run does)")
    return 0


def cmd_select(args, console) -> int:
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.plan import make_plan
    from unitrain.train.run import select_for_plan

    # An explicit --budget decides the length: a recipe's training.max_steps would otherwise win silently.
    recipe = _load(args, [f"resources.budget={args.budget}", "training.max_steps=null"] if args.budget else [])
    tokenizer = M.load_tokenizer(recipe.model, recipe.base_dir)
    tok = pipeline.tokenize_data(recipe, tokenizer)
    plan = make_plan(recipe, data_stats=pipeline.data_stats(tok, recipe, tokenizer.pad_token_id))
    encoder = recipe.data.select_encoder if args.encoder is None else \
        None if args.encoder.lower() in ("none", "null") else args.encoder
    sel = select_for_plan(tok, recipe, plan, encoder)
    out = sel.write(args.out)
    r = sel.report()
    console.print(f"{r['policy']}: {r['reason']}", highlight=False)
    console.print(f"kept {r['n_kept']} of {r['n_records']} examples ({r['tokens_kept']} tokens, {r['epochs']:g} "
                  f"epochs); dropped {r['dropped_by_reason']}; skipped {r['skipped']}", highlight=False)
    console.print(f"subset: {args.out}   report: {out}", highlight=False)
    return 0


def cmd_calibrate(args, console) -> int:
    from unitrain.recipe import load_recipe
    from unitrain.train.run import run_recipe

    if args.steps < 4:
        raise UnitrainError(f"--steps {args.steps}: calibration needs at least 4 steps (the first one warms up)")
    base = load_recipe(args.recipe, list(args.overrides))
    recipe = load_recipe(args.recipe, list(args.overrides) + [
        f"name={base.name}-calibrate", f"training.max_steps={args.steps}", "training.eval_every=0",
        "training.exact_match_examples=0", "output.save_every=0", "output.resume=never", "output.overwrite=true",
        "stopping.enabled=false"])
    result = run_recipe(recipe, console)
    cal = json.loads((result.run_dir / "calibration.json").read_text())
    for key, factor in sorted(cal["factors"].items()):
        console.print(f"{key:12s} measured / predicted = {factor:.3f}", highlight=False)
    console.print(f"stored under {cal['key']!r}; later plans for this hardware and model use these factors",
                  highlight=False)
    return result.exit_code


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "select": cmd_select, "calibrate": cmd_calibrate}


def _quiet_libraries() -> None:
    """Library chatter that says nothing to a unitrain user."""
    import warnings

    # bitsandbytes on CPU looks for HF's optional `kernels` package and logs a warning when it's absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may also follow the options
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.local_rank is not None:  # the deepspeed launcher passes --local_rank; torch reads LOCAL_RANK
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.command is None:
        _parser().print_help()
        return 2
    logging.basicConfig(level=os.environ.get("UNITRAIN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    console = Console(stderr=False)
    try:
        return COMMANDS[args.command](args, console)
    except UnitrainError as e:
        Console(stderr=True).print(f"error: {e}", markup=False, highlight=False, style="red")
        return e.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
