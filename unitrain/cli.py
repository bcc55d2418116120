"""`unitrain` command line: parse, call, print. User mistakes print one paragraph and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from rich.console import Console

from unitrain import __version__
from unitrain.console import make_console, setup_output
from unitrain.errors import RecipeError, UnitrainError

EPILOG = """examples:
  unitrain run recipes/quickstart.yaml
  unitrain run recipes/quickstart.yaml training.lr=1e-4 name=lr-sweep-1
  unitrain plan recipes/llama-lora.yaml --gpus 1 --gpu-memory 24GiB --budget 2e18
  unitrain plan recipes/llama-lora.yaml --advise --deadline 12h
  torchrun --nproc_per_node 2 -m unitrain run RECIPE
  deepspeed --num_gpus 2 $(which unitrain) run RECIPE
"""

PLAN_EPILOG = """--gpus N means N GPUs whatever this machine has: of --accelerator, else of this machine's GPU, else of the
default H100 (the plan says which it assumed). The software assumed is the pinned image's (deepspeed,
bitsandbytes, triton) unless --local-packages.

examples:
  unitrain plan recipes/llama-lora.yaml --gpus 8 --accelerator A100-80GB
  unitrain plan recipes/llama-lora.yaml --gpus 1 --accelerator L4 --json
  unitrain plan recipes/llama-lora.yaml --advise --deadline 12h
  unitrain plan recipes/quickstart.yaml --scan-data --out plan.json
  unitrain run recipes/quickstart.yaml --plan plan.json
"""


class _Parser(argparse.ArgumentParser):
    """argparse, except that with --json a usage error is JSON on stdout too."""

    json_errors = False

    def error(self, message):
        if _Parser.json_errors:
            print(json.dumps({"error": message, "fix": f"see `{self.prog} --help`"}))
            sys.exit(2)
        super().error(message)


_FIX_START = re.compile(r"(?:[;.:]\s+|—\s*|\(|,\s+)(?=(?:set|use|raise|lower|give|add|make|install|run|restore|"
                        r"choose|start|launch|pass|plan|try|either|rerun|continue|check|fix|remove|drop|name|"
                        r"relaunch|resume|describe|point|pick|did you mean|expected|must|examples?)\b)", re.IGNORECASE)


def error_fix(e: UnitrainError) -> str | None:
    """The fix an error states: the one it was raised with, else its first clause that says what to do."""
    if e.fix:
        return e.fix
    if isinstance(e, RecipeError):  # one fix per problem, each under its key
        return "; ".join(f"{p.split(': ', 1)[0]}: {_clause_fix(p.split(': ', 1)[-1]) or p.split(': ', 1)[-1]}"
                         for p in e.problems)
    return _clause_fix(str(e))


def _clause_fix(msg: str) -> str | None:
    m = _FIX_START.search(msg)
    return msg[m.end():].strip().rstrip(".") if m else None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="unitrain", description="Train language models under explicit resource limits: "
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
    run.add_argument("--plan", metavar="PLAN.json", help="execute this plan file (from unitrain plan --out) after "
                     "checking it was made for this recipe and for the machine found here")
    run.add_argument("--replan", action="store_true", help="make a new plan for this machine instead of executing "
                     "the run's stored plan.json or the --plan file (a relaunch continues only if the new plan "
                     "matches its checkpoints)")
    run.add_argument("--extend", action="store_true", help="train a finished run longer: change training.max_steps, "
                     "training.epochs or resources.budget, and it continues from its checkpoint before the LR "
                     "cooldown under the longer plan")

    plan = sub.add_parser("plan", help="print the plan for a recipe without training", epilog=PLAN_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--gpus", type=int, help="GPUs per node (GPUs even on a machine without one; 0 = CPU)")
    plan.add_argument("--nodes", type=int)
    plan.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (default: the accelerator's)")
    plan.add_argument("--cpu-memory", help="CPU memory per node, e.g. 512GiB")
    plan.add_argument("--accelerator", help="e.g. H100, A100-80GB, L4, RTX4090 (unitrain/hardware.json), or CPU")
    plan.add_argument("--budget", help="FLOPs (2e19), GPU-hours (6h) or tokens (50M tokens)")
    plan.add_argument("--local-packages", action="store_true", help="plan with this machine's deepspeed / "
                      "bitsandbytes / triton instead of the pinned image's (resources.packages=local)")
    plan.add_argument("--prices", metavar="FILE", help="hardware data file replacing or extending "
                      "unitrain/hardware.json: accelerators, interconnect, hourly prices (resources.hardware)")
    plan.add_argument("--json", action="store_true", help="print the plan (or the --advise rows) as JSON on stdout; "
                      "errors too, as {\"error\": ..., \"fix\": ...} with a non-zero exit")
    plan.add_argument("--out", metavar="PLAN.json", help="save the plan for `unitrain run RECIPE --plan PLAN.json` "
                      "(needs --scan-data: the plan file carries the data decision)")
    plan.add_argument("--deepspeed-config", metavar="OUT.json", help="write the DeepSpeed config the plan implies")
    plan.add_argument("--scan-data", action="store_true", help="tokenize the data to plan epochs and subset size")
    plan.add_argument("--advise", action="store_true", help="compare every priced accelerator × 1-64 GPUs for this "
                      "recipe: fits, strategy, step and wall time, GPU-hours, cost")
    plan.add_argument("--deadline", help="with --advise: the wall time to meet, e.g. 12h, 90m, 2d")
    plan.add_argument("--trace", action="store_true", help="trace the chosen strategy's memory exactly (fake tensors, "
                      "no GPU; seconds to minutes) and show it next to the formula")

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
    result = run_recipe(recipe, console, replan=args.replan, plan_file=args.plan, extend=args.extend)
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
        if result.seconds:
            from unitrain.train.timing import time_line

            console.print(time_line(result.seconds), highlight=False)
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
             "budget": "resources.budget", "prices": "resources.hardware"}
    out = [f"{key}={getattr(args, a)}" for a, key in pairs.items() if getattr(args, a, None) is not None]
    return out + (["resources.packages=local"] if getattr(args, "local_packages", False) else [])


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

    if args.advise:
        return cmd_advise(args, console)
    if args.deadline:
        raise UnitrainError("--deadline ranks the hardware table of --advise; add --advise", fix="add --advise")
    if args.out and not args.scan_data:
        raise UnitrainError(f"--out {args.out}: a plan file is what `unitrain run --plan` executes exactly, so it must "
                            f"hold the data decision (subset, epochs, evals); add --scan-data, which tokenizes and "
                            f"cleans the data as `unitrain run` does", fix="add --scan-data")
    recipe = _load(args, _resource_overrides(args))
    _preflight_plan(recipe)
    stats = None
    if args.scan_data or _budget_pays_for_evals(recipe):
        scanned = _scan(recipe, required=args.scan_data)
        stats = scanned[2] if scanned else None
    plan = make_plan(recipe, data_stats=stats)
    trace_lines: list[str] = []
    if args.trace:  # stores the trace's numbers for this model family; the plan shown is the one made with them
        from unitrain.train.trace_check import trace_and_record

        trace_lines, plan = trace_and_record(plan, recipe, stats)
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan, console)
    if args.out:
        plan.save(args.out)
        Console(stderr=True).print(f"plan written to {args.out}; execute it with `unitrain run {args.recipe} --plan "
                                   f"{args.out}` (it checks the world size, accelerator and memory it finds)",
                                   highlight=False, markup=False)
    if trace_lines:
        out = Console(stderr=True) if args.json else console  # keep stdout parseable JSON
        out.print("\n".join(trace_lines), highlight=False, markup=False, soft_wrap=True)
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


def cmd_advise(args, console) -> int:
    """`unitrain plan RECIPE --advise`: one make_plan per accelerator × GPU count (plan/advise.py)."""
    from unitrain.plan.advise import advise, parse_hours, print_advice

    if args.out or args.deepspeed_config:
        raise UnitrainError("--advise compares many plans; --out and --deepspeed-config take one: drop --advise and "
                            "name the hardware (--accelerator X --gpus N)", fix="drop --advise, or drop --out / "
                            "--deepspeed-config")
    deadline = parse_hours(args.deadline) if args.deadline else None
    opts = _resource_overrides(args)
    base = _load(args, opts)
    stats = _scan(base)[2] if args.scan_data else None
    keep = list(args.overrides)  # what every row's command repeats (the hardware options are each row's own)
    keep += ["--budget", args.budget] if args.budget else []
    keep += ["--prices", args.prices] if args.prices else []
    keep += ["--local-packages"] if args.local_packages else []
    keep += ["--scan-data"] if args.scan_data else []
    adv = advise(args.recipe, lambda extra: _load(args, opts + list(extra)), keep, stats, deadline)
    if args.json:
        print(adv.to_json())
    else:
        print_advice(adv, console)
    return 0


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
    lo, hi = calibrate.SANE_RANGE
    for key in sorted(set(cal["predicted"]) & set(cal["measured"])):
        if key in cal["factors"]:
            console.print(f"{key:12s} measured / predicted = {cal['factors'][key]:.3f}", highlight=False)
        elif cal["predicted"][key]:  # a ratio this far off says the model (or the measurement) is wrong here
            ratio = cal["measured"][key] / cal["predicted"][key]
            console.print(f"{key:12s} measured / predicted = {ratio:.3f}: outside [{lo:g}, {hi:g}], not stored "
                          f"(later plans keep the model's own {key})", highlight=False)
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
    json_mode = "--json" in (sys.argv[1:] if argv is None else argv)  # then stdout is JSON, errors included
    _Parser.json_errors = json_mode
    try:
        return _main(argv, json_mode)
    except SystemExit as e:  # argparse: a usage error (printed as JSON with --json) or --help
        if not json_mode:
            raise
        return e.code if isinstance(e.code, int) else 2
    finally:
        _Parser.json_errors = False


def _main(argv, json_mode: bool) -> int:
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
        if json_mode:
            print(json.dumps({"error": str(e), "fix": error_fix(e)}))
        else:
            make_console(stderr=True).print(f"error: {e}", markup=False, highlight=False, style="red")
        return e.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except Exception as e:
        if not json_mode:
            raise
        import traceback

        traceback.print_exc()  # to stderr: stdout stays JSON
        print(json.dumps({"error": f"internal error: {type(e).__name__}: {e}",
                          "fix": "this is a bug in unitrain; report it with the traceback printed on stderr"}))
        return 1
    finally:
        restore_output()


if __name__ == "__main__":
    sys.exit(main())
