"""What a run prints (unitrain/console.py, unitrain/train/progress.py): off a terminal plain lines, one per logged
step, never wrapped or redrawn; on a terminal a bar that fits 80 columns, redrawn at a bounded rate, with a real ETA
and every step line and warning on its own line above it; third-party noise gone; summary.json's fractions say of
what. The two end-to-end tests run the command line in a subprocess (a log file; a pseudo-terminal of 80 columns)
on tiny runs that provoke the known noise lines (NOISY)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
from rich.cells import cell_len
from rich.console import Console

from unitrain import console as C
from unitrain.recipe import recipe_to_yaml
from unitrain.train import progress as P

# The third-party lines unitrain silences (console.NOISE and the progress bars), as they appeared in real runs.
NOISE_LINES = ("Setting accelerator to CPU", "Loading weights", "Writing model shards", "is_gradient_checkpointing",
               "gradient_checkpointing_enable", "gemm_4bit_forward", "it/s]", "de-quantizing GGUF")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEP_LINE = re.compile(r"step=\d+( [a-z_]+=\S+)+")
WARNED = "memory: measured exceeds the plan's prediction (planted by the test)"  # short: one line at 80 columns
PY_WARNED = "a python warning mid-run (planted by the test)"
# The command line with a warning from the unitrain logger and a Python warning planted at each of the SAVES
# checkpoint saves (while the bar is up; Python shows a warning once per place).
LAUNCH = f"""
import logging, sys, warnings
from unitrain.train.loop import Trainer
save = Trainer._save
def _save(self):
    logging.getLogger("unitrain.train.memory_check").warning({WARNED!r})
    warnings.warn({PY_WARNED!r}, stacklevel=2)
    save(self)
Trainer._save = _save
from unitrain.cli import main
sys.exit(main(sys.argv[1:]))
"""
STEPS = 4
SAVES = 2  # save_every=2: at step 2, and the final one at step 4


# Each provokes its share of the noise on every run: QLoRA with checkpointing bitsandbytes' kernels probe, the
# "Loading weights" bar and peft's FutureWarnings; full fine-tuning (its export: save_pretrained imports DeepSpeed)
# the accelerator probe and the "Writing model shards" bar.
NOISY = {"qlora": {"method.name": "qlora", "training.gradient_checkpointing": "full"}, "full": {"method.name": "full"}}


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    def make(kind):
        recipe = tiny_recipe(**NOISY[kind], **{"training.max_steps": STEPS, "training.eval_every": 2,
                                               "tracking.progress": True, "output.save_every": 2})
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe_to_yaml(recipe))
        return recipe, path

    return make


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR",
                                                            "TERM", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS",
                                                            "DS_ACCELERATOR", "UNITRAIN_LOG")}
    return env | {"UNITRAIN_CALIBRATION": str(tmp_path / "calibration.json"), **extra}


def _on_pty(cmd: list[str], cols: int, env: dict, cwd) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a raw pseudo-terminal `cols` wide; -> (status, every byte it wrote)."""
    import fcntl
    import pty
    import struct
    import termios
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)  # no newline translation: the bytes as the program wrote them
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=600), out.decode("utf-8", "replace")


def _screen(raw: str) -> list[list[str]]:
    """Each terminal line as the successive states it was drawn in (a carriage return redraws it), ANSI removed."""
    return [[ANSI.sub("", seg) for seg in line.split("\r")] for line in raw.split("\n")]


def _summary_fractions_say_of_what(run_dir) -> None:
    gov = json.loads((run_dir / "summary.json").read_text())["extra"]["governor"]
    assert gov["budget"] is None and "fraction_of_budget" not in gov  # no budget: no fraction of it
    assert gov["fraction_of_plan"] == pytest.approx(gov["used"]["flops"] / gov["planned_flops"])
    assert "gpu_hours" not in gov["used"] and gov["used"]["process_hours"] > 0  # a CPU run: no GPU-hours
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert not any("fraction_of_budget" in r or "gpu_hours_used" in r for r in rows)


def test_log_output_is_plain_whole_lines(recipe_file, tmp_path):
    """Off a terminal: no redraws and no colour; one plain line per logged step; no message wrapped (the plan's
    notes, up to 130 characters, stay whole); tables laid out within console.LOG_WIDTH; warnings on their own lines;
    no third-party noise."""
    from unitrain.plan.report import _length_lines
    from unitrain.plan.schema import Plan

    recipe, path = recipe_file("qlora")
    log = tmp_path / "run.log"
    with log.open("w") as f:
        res = subprocess.run([sys.executable, "-c", LAUNCH, "run", str(path)], stdout=f, stderr=subprocess.STDOUT,
                             env=_env(tmp_path), cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert res.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    steps = [line for line in lines if line.startswith("step=")]
    assert [int(s.split()[0][5:]) for s in steps] == list(range(STEPS + 1))  # step 0's eval, then every step
    assert all(STEP_LINE.fullmatch(s) for s in steps), steps
    plan = Plan.load(recipe.run_dir / "plan.json")
    whole = [f"note: {n}" for n in plan.notes] + _length_lines(plan)
    assert max(map(len, whole)) > C.LOG_WIDTH  # a message longer than any width a log could wrap it at ...
    assert not [w for w in whole if w not in lines]  # ... is still one line
    tables = [line for line in lines if set(line) & set("│┃━")]
    assert tables and max(map(len, tables)) <= C.LOG_WIDTH
    assert lines.count(f"warning: {WARNED}") == SAVES and f"warning: {PY_WARNED}" in lines  # raised from loop.py:
    # unitrain's own, so just the message
    assert not [n for n in NOISE_LINES if n in text], [line for line in lines if any(n in line for n in NOISE_LINES)]
    _summary_fractions_say_of_what(recipe.run_dir)
    _summary_says_where_the_time_went(recipe.run_dir, lines)


def _summary_says_where_the_time_went(run_dir, lines) -> None:
    """summary.json's `seconds`: every phase of the run, adding up to its total; the step phase is the sum of the
    step times metrics.jsonl logged (every step is logged here); the last lines say it too."""
    from unitrain.train.timing import time_line

    sec = json.loads((run_dir / "summary.json").read_text())["seconds"]
    assert {"startup", "data", "plan", "model", "exact match", "steps", "evals", "checkpoints", "export"} <= set(sec)
    assert all(v >= 0 for v in sec.values())
    assert sum(v for k, v in sec.items() if k != "total") == pytest.approx(sec["total"], abs=0.05)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert sum(r.get("step_s", 0.0) for r in rows) == pytest.approx(sec["steps"], abs=0.05)
    assert time_line(sec) in lines


def test_time_line_adds_up_and_names_the_largest_first():
    from unitrain.train.timing import Timings, time_line

    t = Timings(start=0.0)
    t.add("steps", 90.0)
    t.add("exact match", 30.0)
    t.add("steps", 30.0)
    t.add("plan", 0.5)
    rep = t.report(now=200.0)  # the run ends 200 s after it began
    assert rep == {"plan": 0.5, "exact match": 30.0, "steps": 120.0, "other": 49.5, "total": 200.0}
    assert time_line(rep) == "time 3:20: steps 2:00 (60%), other 0:50 (25%), exact match 0:30 (15%)"  # plan < 1%


def test_terminal_bar_fits_80_columns_with_lines_above(recipe_file, tmp_path):
    """On an 80-column terminal: nothing drawn wider than 80; every step line and warning persists on its own line
    (never glued onto the bar); the bar shows a clock ETA from the start and ends in 'done'; it is redrawn at most
    REFRESH_HZ a second plus once per line printed above it; no third-party noise."""
    recipe, path = recipe_file("full")
    status, raw = _on_pty([sys.executable, "-c", LAUNCH, "run", str(path)], 80,
                          _env(tmp_path, TERM="xterm-256color"), tmp_path)
    assert status == 0, raw[-3000:]
    screen = _screen(raw)
    drawn = [seg for line in screen for seg in line]
    assert max(cell_len(seg) for seg in drawn) <= 80
    final = [line[-1] for line in screen]  # what stays on screen
    bars = [seg for seg in drawn if seg.startswith("train ")]
    assert bars and all(re.search(r"\d+/\d+ ", b) for b in bars)
    assert all(re.search(r"ETA \d+:\d\d$", b) for b in bars[:-1]) and bars[-1].endswith("done")
    assert [s for s in final if s.startswith("step=")] == [s for s in final if STEP_LINE.fullmatch(s)]
    assert len([s for s in final if s.startswith("step=")]) == STEPS + 1
    assert final.count(f"warning: {WARNED}") == SAVES and f"warning: {PY_WARNED}" in final
    assert not [b for b in bars if "warning" in b]
    printed_above = sum(1 for line in screen[:-1] if len(line) > 1)  # lines drawn over the bar
    seconds = int(re.search(r"(\d+):(\d\d) elapsed", bars[-1]).group(2)) + 60 * int(
        re.search(r"(\d+):(\d\d) elapsed", bars[-1]).group(1))
    assert len(bars) <= printed_above + (seconds + 2) * P.REFRESH_HZ + 3, (len(bars), printed_above, seconds)
    assert not [n for n in NOISE_LINES if n in raw], [s for s in final if any(n in s for n in NOISE_LINES)]
    _summary_fractions_say_of_what(recipe.run_dir)


# --------------------------------------------------------------------------- the pieces, in process


def test_bar_layout_fits_every_width():
    """At 80 columns nothing is cut: fields are dropped whole (lowest priority first) and the bar shrinks; the step
    count and the ETA always stay."""
    eta = P.Eta(step_s=2.0, eval_s=10.0, eval_every=4, has_evals=True)
    states = [P.BarState(0, 16), P.BarState(5, 16, loss=0.6416, eval_loss=0.6326, tok_per_s=98.33, budget=0.4),
              P.BarState(123456, 1000000, loss=12.345678, eval_loss=11.9, tok_per_s=123456.0, budget=0.999)]
    for state in states:
        for width in (200, 120, 80, 60, 40, 30):
            out = io.StringIO()
            Console(file=out, width=width, force_terminal=True, color_system=None).print(P.ProgressLine(state, eta))
            line = out.getvalue().rstrip("\n")
            assert "\n" not in line and cell_len(line) <= width, (width, line)
            assert f"{state.step}/{state.total}" in line and re.search(r"ETA \d", line) and "…" not in line
            if width >= 80 and state.loss is not None:
                assert f"loss {state.loss:.4g}" in line  # the loss stays at 80 columns
    wide = P.ProgressLine(states[1], eta).render(200).plain
    assert all(f in wide for f in ("loss 0.6416", "eval 0.6326", "98.3 tok/s", "budget 40.0%", "elapsed"))


def test_eta_from_the_plan_then_from_measurements():
    """Before a step is measured: steps left × plan.compute.step_time_s + evals left × the planned eval time (an
    eval's FLOPs at the step's FLOP rate); after: running medians of the measured step and eval seconds."""
    plan = {"compute": {"step_time_s": 2.0, "flops_per_step": 6e12}, "evals": {"flops": 1.5e12, "every": 4,
                                                                              "sequences": 8}}
    eta = P.Eta.from_plan(plan)
    assert (eta.step_s, eta.eval_s) == (2.0, 0.5)
    # 16 steps from 0: evals at 4, 8, 12 and the final one
    assert eta.evals_left(0, 16) == 4 and eta.evals_left(12, 16) == 1 and eta.evals_left(11, 16) == 2
    assert eta.seconds_left(0, 16) == pytest.approx(16 * 2.0 + 4 * 0.5)
    state = P.BarState(0, 16)
    assert "ETA 0:34" in P.ProgressLine(state, eta).render(80).plain  # a number from the first redraw on
    for s in (30.0, 3.0, 3.2, 2.8):  # a slow first step does not dominate: the median
        eta.add_step(s)
    eta.add_eval(6.0)
    assert eta.seconds_left(4, 16) == pytest.approx(12 * 3.1 + 3 * 6.0)
    state.step = 4
    assert f"ETA {P.clock(12 * 3.1 + 3 * 6.0)}" in P.ProgressLine(state, eta).render(80).plain
    # between measurements it counts down, by at most one step (a step running long does not reach zero)
    assert eta.seconds_left(4, 16, since=1.5) == pytest.approx(12 * 3.1 + 3 * 6.0 - 1.5)
    assert eta.seconds_left(4, 16, since=60.0) == pytest.approx(11 * 3.1 + 3 * 6.0)
    later = P.ProgressLine(state, eta, now=lambda: state.changed + 10.0)
    assert f"ETA {P.clock(11 * 3.1 + 3 * 6.0)}" in later.render(80).plain
    assert P.Eta.from_plan({}).seconds_left(0, 10) == 0  # no plan (a bare Tracker): no crash
    assert [P.clock(x) for x in (5, 65, 3725, 93784)] == ["0:05", "1:05", "1:02:05", "1d 02:03"]


def test_step_line():
    row = {"step": 4, "loss": 0.64163, "eval_loss": 0.63261, "lr": 0.002, "grad_norm": 1.0912, "tok_per_s": 98.331,
           "tokens": 1000, "fraction_of_budget": 0.25, "mem_rss_gib": 4.4}
    assert P.step_line(row) == ("step=4 loss=0.6416 eval_loss=0.6326 lr=0.002 grad_norm=1.091 tok_per_s=98.33 "
                                "budget=25.0%")
    assert P.step_line({"step": 3, "tokens": 10}) is None


@contextlib.contextmanager
def _routed(console, monkeypatch):
    """console.setup_output(console); logging, warnings (its restore function) and the environment as they were
    after."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)  # what setup_output sets: back as it was after
    root = logging.getLogger()
    before = (root.handlers[:], root.level, logging.getLogger("unitrain").level)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning
        restore = C.setup_output(console)
        try:
            yield
        finally:
            restore()
        assert warnings.showwarning is shown
    assert (root.handlers, root.level, logging.getLogger("unitrain").level) == before


@pytest.fixture
def routed(monkeypatch):
    """setup_output on a terminal-like console writing into a buffer."""
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    with _routed(console, monkeypatch):
        yield console, out


def test_library_bars_are_off_in_a_log(tmp_path):
    """Off a terminal every tqdm bar is off (the GGUF conversion's "Converting and de-quantizing GGUF tensors" bar
    drew ten states into the log; tqdm reads TQDM_DISABLE when imported, after setup_output as in the command line);
    on a terminal that long conversion keeps its bar. transformers' and the hub's bars are off everywhere."""
    code = ("import sys; from unitrain.console import make_console, setup_output; setup_output(make_console()); "
            "from tqdm.auto import tqdm; [x for x in tqdm(range(3), desc='Converting and de-quantizing GGUF "
            "tensors...', file=sys.stdout)]; import os; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    env = _env(tmp_path)
    log = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert log.returncode == 0 and log.stdout == "1\n" and log.stderr == "", (log.stdout, log.stderr)
    status, raw = _on_pty([sys.executable, "-c", code], 80, env | {"TERM": "xterm-256color"}, tmp_path)
    assert status == 0 and "Converting and de-quantizing GGUF tensors...: 100%" in raw


def test_warnings_print_above_the_bar_on_their_own_line(routed):
    console, out = routed
    bar = P.TerminalBar(console, 3, 10, P.Eta(1.0))
    logging.getLogger("unitrain.train.memory_check").warning("memory: measured exceeds the plan's prediction")
    warnings.warn("something a user should see", UserWarning, stacklevel=1)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from ...")
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    time.sleep(0.05)
    bar.stop()
    final = [line[-1] for line in _screen(out.getvalue())]
    assert "warning: memory: measured exceeds the plan's prediction" in final
    assert any(re.fullmatch(r"warning: UserWarning: something a user should see \(test_output.py:\d+\)", s)
               for s in final), final
    assert not [s for s in final if "gemm_4bit" in s or "is_gradient_checkpointing" in s]  # noise: debug only
    assert final[-2].startswith("train ") and final[-2].endswith("done") and "warning" not in final[-2]


def test_noise_is_kept_at_debug(routed):
    """UNITRAIN_LOG=DEBUG shows what is otherwise hidden."""
    console, out = routed
    C.setup_output(console, "debug")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from ...")
    assert "debug: bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward" in out.getvalue()


def test_governor_without_a_budget_reports_a_fraction_of_the_plan():
    from test_governor import make_plan  # tests/test_governor.py

    from unitrain.recipe import StoppingConfig
    from unitrain.train.governor import Governor

    gov = Governor(make_plan(10), StoppingConfig(enabled=False), None)
    gov.account(100, 5e12, 1.0)
    rep, prog = gov.finalize(1, 1.0), gov.progress()
    assert "fraction_of_budget" not in prog and "fraction_of_budget" not in rep and rep["budget"] is None
    assert rep["fraction_of_plan"] == prog["fraction_of_plan"] == pytest.approx(5e12 / rep["planned_flops"])
    budgeted = Governor(make_plan(10, budget={"kind": "flops", "value": 1e14}), StoppingConfig(enabled=False), None)
    budgeted.account(100, 5e12, 1.0)
    assert budgeted.finalize(1, 1.0)["fraction_of_budget"] == pytest.approx(0.05)
    assert "fraction_of_plan" not in budgeted.progress() and gov.progress()["gpu_hours_used"] > 0  # an H100 plan
