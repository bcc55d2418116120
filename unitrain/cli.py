"""`unitrain` command line: parse, call, print. User mistakes print one paragraph and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from unitrain import __version__
from unitrain.console import make_console, setup_output
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
    run.add_argument("--replan", action="store_true", help="relaunching a run: make a new plan instead of executing "
                     "the stored plan.json (the run continues only if the new plan matches its checkpoints)")

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

    cal = sub.add_parser("calibrate", help="run a few real steps and store measured/predicted factors for later "
                         "plans; --list / --reset show and clear the calibration store")
    cal.add_argument("recipe", nargs="?")
    cal.add_argument("overrides", nargs="*", metavar="key=value")
    cal.add_argument("--steps", type=int, default=6, help="optimizer steps to measure (>= 4)")
    cal.add_argument("--list", action="store_true", help="list the stored calibration entries")
    cal.add_argument("--reset", nargs="?", const="all", metavar="KEY", help="forget one entry (KEY) or all of them")

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
    result = run_recipe(recipe, console, replan=args.replan)
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


def _scan(recipe, required: bool = True):
    """Tokenize, clean and measure the data as `unitrain run` does (cached): -> (tokenized, cleaning, stats).
    Not `required` (a plan that only counts its evals): a data source that cannot be read here is a note on stderr
    (stdout may be --json) and None."""
    from unitrain import model as M
    from unitrain.data import pipeline
    from unitrain.errors import ModelError

    try:
        tokenizer = M.load_tokenizer(recipe.model, recipe.base_dir)
    except ModelError as e:
        if required:
            raise
        Console(stderr=True).print(f"note: evals are not counted against the budget: the data could not be scanned "
                                   f"here ({str(e)[:200]}); `unitrain run` counts them", highlight=False)
        return None
    if not required:
        Console(stderr=True).print("note: scanned the data to count the evals the budget pays for (as --scan-data)",
                                   highlight=False)
    tok = pipeline.tokenize_data(recipe, tokenizer)
    cleaning = pipeline.clean(tok, recipe)
    return tok, cleaning, pipeline.data_stats(tok, recipe, tokenizer.pad_token_id, cleaning)


def cmd_plan(args, console) -> int:
    # torch-importing modules only when needed: a plan for a hub name or config takes well under a second
    from unitrain.plan import make_plan
    from unitrain.plan.deepspeed import CLIENT_OPTIMIZER_NOTE
    from unitrain.plan.report import print_plan

    recipe = _load(args, _resource_overrides(args))
    _preflight_plan(recipe)
    stats = None
    if args.scan_data or _budget_pays_for_evals(recipe):
        scanned = _scan(recipe, required=args.scan_data)
        stats = scanned[2] if scanned else None
    plan = make_plan(recipe, data_stats=stats)
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, console)
    if args.deepspeed_config:
        ds = plan.execution.deepspeed
        if ds is None:
            raise UnitrainError(f"--deepspeed-config: this plan runs without DeepSpeed (ZeRO stage 0: plain torch"
                                f"{', DDP' if plan.world_size > 1 else ''}), so there is no engine config to write; "
                                f"ask for one with strategy.zero_stage=1, 2 or 3")
        with open(args.deepspeed_config, "w") as f:
            json.dump(ds, f, indent=2)
        err = Console(stderr=True)
        err.print(f"DeepSpeed config written to {args.deepspeed_config}: exactly what `unitrain run` passes to "
                  f"deepspeed.initialize for this plan", highlight=False)
        err.print(f"note: {CLIENT_OPTIMIZER_NOTE} (the plan's optimizer: {plan.execution.optimizer})", highlight=False)
    return 0


def _preflight_plan(recipe) -> None:
    """The config checks `unitrain run` makes before loading anything (typos in model.config, LoRA targets,
    max_length past the model's positions), so a plan that passes is one that run accepts."""
    from unitrain import preflight
    from unitrain.plan.shape import load_model_config

    preflight.check_model(recipe, load_model_config(recipe.model, recipe.base_dir)[0])


def _budget_pays_for_evals(recipe) -> bool:
    """A budget also pays for the evals, whose cost depends on the eval split's tokens: `run` counts them, so a plan
    without them would accept a budget that run refuses. Local data is scanned to count them (as --scan-data)."""
    d, t = recipe.data, recipe.training
    if not recipe.resources.budget or t.max_steps or not (d.eval or d.eval_split > 0):
        return False
    local = [p for p in (d.train, d.eval) if p]
    if all(p.startswith("builtin:") or recipe.resolve_path(p).exists() for p in local):
        return True
    Console(stderr=True).print("note: evals are not counted against the budget: the data is not local (a hub "
                               "dataset); `unitrain run` counts them, so it may train fewer steps than shown (add "
                               "--scan-data to count them here)", highlight=False)
    return False


def cmd_select(args, console) -> int:
    import shlex

    from unitrain.plan import make_plan
    from unitrain.train.run import select_for_plan

    # An explicit --budget decides the length: a recipe's training.max_steps would otherwise win silently.
    recipe = _load(args, [f"resources.budget={args.budget}", "training.max_steps=null"] if args.budget else [])
    tok, cleaning, stats = _scan(recipe)
    plan = make_plan(recipe, data_stats=stats)
    encoder = "recipe" if args.encoder is None else \
        None if args.encoder.lower() in ("none", "null") else args.encoder
    sel = select_for_plan(tok, cleaning, recipe, plan, encoder)
    out = sel.write(args.out, rows=tok.train_source)  # the input's own rows and columns: data.train as it is
    r = sel.report()
    console.print(f"{r['policy']}: {r['reason']}", highlight=False)
    console.print(f"kept {r['n_kept']} of {r['n_records']} examples ({r['tokens_kept']} tokens; the plan trains "
                  f"{plan.data.epochs:.2f} epochs over them); dropped {r['dropped_by_reason']}; skipped {r['skipped']}",
                  highlight=False)
    console.print(f"subset: {args.out}   report: {out}", highlight=False)
    train_on = [f"data.train={args.out}"]
    if tok.eval_source is not None:  # the held-out split was carved from data.train: keep it apart from the subset
        held = Path(args.out).with_suffix(".eval.jsonl")
        with held.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in tok.eval_source)
        console.print(f"held-out split ({len(tok.eval_source)} rows, carved from data.train): {held}", highlight=False)
        train_on.append(f"data.eval={held}")
    again = [args.recipe, *args.overrides] + ([f"resources.budget={args.budget}", "training.max_steps=null"]
                                              if args.budget else [])
    console.print(f"train on it: unitrain run {' '.join(map(shlex.quote, again + train_on))}", highlight=False,
                  markup=False, soft_wrap=True)
    return 0


def cmd_calibrate(args, console) -> int:
    from unitrain.plan import calibrate
    from unitrain.recipe import load_recipe
    from unitrain.train.run import run_recipe

    if args.list or args.reset:
        return _calibration_store(args, console, calibrate)
    if args.recipe is None:
        raise UnitrainError("unitrain calibrate needs a RECIPE to measure (or --list / --reset to manage the store)")
    if args.steps < 4:
        raise UnitrainError(f"--steps {args.steps}: calibration needs at least 4 steps (the first one warms up)")
    base = load_recipe(args.recipe, list(args.overrides))
    recipe = load_recipe(args.recipe, list(args.overrides) + [
        f"name={base.name}-calibrate", f"training.max_steps={args.steps}", "training.eval_every=0",
        "training.exact_match_examples=0", "output.save_every=0", "output.resume=never", "output.overwrite=true",
        "stopping.enabled=false"])
    result = run_recipe(recipe, console)
    if not (result.run_dir / "calibration.json").exists():
        raise UnitrainError(f"the calibration run ended after {result.steps} steps ({result.stop_reason}) before "
                            f"measuring; give it room for {args.steps} steps (a larger resources.budget)")
    cal = json.loads((result.run_dir / "calibration.json").read_text())
    for key, factor in sorted(cal["factors"].items()):
        console.print(f"{key:12s} measured / predicted = {factor:.3f}", highlight=False)
    console.print(f"stored under {cal['key']!r}; later plans for this hardware and model use these factors",
                  highlight=False)
    return result.exit_code


def _calibration_store(args, console, calibrate) -> int:
    """`unitrain calibrate --list` / `--reset [KEY]`."""
    import time

    if args.reset:
        n = calibrate.reset(None if args.reset == "all" else args.reset)
        if args.reset != "all" and n == 0:
            raise UnitrainError(f"--reset {args.reset}: no such entry in {calibrate.default_path()}; "
                                f"`unitrain calibrate --list` shows the keys")
        console.print(f"removed {n} calibration entr{'y' if n == 1 else 'ies'} from {calibrate.default_path()}",
                      highlight=False)
        return 0
    found = calibrate.entries()
    console.print(f"calibration store {calibrate.default_path()}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}",
                  highlight=False)
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.time))
        factors = ", ".join(f"{k} ×{v:.3g}" for k, v in sorted(e.factors.items())) or "none"
        console.print(f"{e.key}\n  {e.kind}, {when}, from {e.source or '?'}: {factors}", highlight=False, markup=False)
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "select": cmd_select, "calibrate": cmd_calibrate}


def main(argv: list[str] | None = None) -> int:
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
    # one console for results, step lines, warnings and library messages (unitrain/console.py); UNITRAIN_LOG=DEBUG
    # shows everything, the library chatter that is otherwise hidden included
    console = make_console()
    restore_output = setup_output(console, os.environ.get("UNITRAIN_LOG"))
    try:
        return COMMANDS[args.command](args, console)
    except UnitrainError as e:
        make_console(stderr=True).print(f"error: {e}", markup=False, highlight=False, style="red")
        return e.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    finally:
        restore_output()


if __name__ == "__main__":
    sys.exit(main())
