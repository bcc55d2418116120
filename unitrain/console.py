"""Where the command line's output goes: one console for results, step lines, warnings and library messages.

On a terminal (`console.is_terminal`): colour, and while training a progress bar under the step lines
(unitrain.train.progress). Off a terminal (a file, a pipe, CI, Slurm): plain text, no redraws, and no line is
ever wrapped: messages are printed whole (rich's soft wrap), tables are laid out at LOG_WIDTH columns ($COLUMNS
overrides).

Warnings — Python `warnings` and every logger's records, unitrain's and the libraries' — are printed through the
same console, one line each (`warning: ...`), so that on a terminal they land above the progress bar instead of
being glued onto it. Library lines that say nothing to a unitrain user (NOISE) are demoted to debug: shown only
with UNITRAIN_LOG=DEBUG. Third-party progress bars are off (transformers' and the hub's always, every tqdm bar off
a terminal).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

LOG_WIDTH = 120  # off a terminal: the width tables are laid out at; text lines are never wrapped

# Substrings of third-party messages that are routed to debug; each with why it says nothing to a user.
NOISE = (
    # DeepSpeed probing for an accelerator when unitrain already put the run on the CPU (DS_ACCELERATOR=cpu is set
    # then, see device_chosen; this catches a DeepSpeed imported before the device was resolved)
    "Setting accelerator to CPU. If you have GPU or other accelerator",
    # peft calling transformers 5's deprecated names (now activation_checkpointing); once per call site
    "`is_gradient_checkpointing` is deprecated",
    "`gradient_checkpointing_enable` is deprecated",
    # bitsandbytes on CPU probing HF's optional `kernels` package for a fused 4-bit matmul; it falls back itself
    "Failed to load CPU gemm_4bit_forward",
)


def is_noise(message: str) -> bool:
    return any(n in message for n in NOISE)


def make_console(stderr: bool = False) -> Console:
    """The console for one command: rich's own on a terminal; off it, no wrapping and tables at LOG_WIDTH."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=int(os.environ.get("COLUMNS") or LOG_WIDTH), soft_wrap=True)


class ConsoleHandler(logging.Handler):
    """Log records as whole lines through the console (above a progress bar when one is showing)."""

    def __init__(self, console: Console, level: int = logging.NOTSET):
        super().__init__(level)
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and is_noise(record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # demoted: shown only where its logger's level lets debug records through (UNITRAIN_LOG=DEBUG)
            if logging.getLogger(record.name).getEffectiveLevel() > logging.DEBUG:
                return False
        return record.levelno >= self.level and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            source = "" if record.name.split(".")[0] in ("unitrain", "py", "root") else f"{record.name}: "
            if record.levelno != logging.INFO or source:  # unitrain's info lines read as plain messages
                msg = f"{record.levelname.lower()}: {source}{msg}"
            style = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}.get(
                record.levelno, "dim" if record.levelno < logging.INFO else None)
            self.console.print(msg, style=style, markup=False, highlight=False)  # off a terminal: never wrapped
        except Exception:  # logging must never take the run down
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning`: one line through the logging handler (unitrain's own: just the message)."""
    text = str(message)
    ours = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    if not ours:
        where = filename.split("site-packages/")[-1] if "site-packages/" in filename else Path(filename).name
        text = f"{category.__name__}: {text} ({where}:{lineno})"
    logging.getLogger("unitrain" if ours else "py.warnings").log(
        logging.DEBUG if is_noise(text) else logging.WARNING, "%s", text)


def setup_output(console: Console, level: str | None = None):
    """Route logging and warnings through `console`, quiet third-party bars; -> a function that puts logging and
    warnings back as they were (the command line calls it on return: a caller's own logging, e.g. a test's, is
    left as found). `level` (UNITRAIN_LOG): the level for every logger; default WARNING for libraries, INFO for
    unitrain."""
    root, ours = logging.getLogger(), logging.getLogger("unitrain")
    before = (root.handlers[:], root.level, ours.level, warnings.showwarning)

    def restore() -> None:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
        ours.setLevel(before[2])
        warnings.showwarning = before[3]

    handler = ConsoleHandler(console)
    if level is not None and not isinstance(logging.getLevelName(level.upper()), int):
        console.print(f"warning: UNITRAIN_LOG={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR); "
                      f"using the default", markup=False, highlight=False, style="yellow")
        level = None
    level = level.upper() if level else None
    for h in list(root.handlers):
        if isinstance(h, ConsoleHandler) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level or logging.WARNING)
    ours.setLevel(level or logging.INFO)
    warnings.showwarning = _show_warning
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights", "Writing model
    if "transformers" in sys.modules:                          # shards" bars read it at import
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if not console.is_terminal:
        os.environ.setdefault("TQDM_DISABLE", "1")  # any other tqdm bar (GGUF conversion): redraws, in a log file
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    adopt_library_loggers()
    return restore


def adopt_library_loggers() -> None:
    """Libraries that print through their own stream handlers (DeepSpeed: straight to the stdout of its import
    time) go through the root handler instead, so their lines are not glued onto a progress bar."""
    if not any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers):
        return
    for name in ("DeepSpeed",):
        if name not in logging.Logger.manager.loggerDict:
            continue
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # not a FileHandler someone added
                lg.removeHandler(h)
        lg.propagate = True


def device_chosen(on_cpu: bool) -> None:
    """unitrain resolved the device: tell DeepSpeed, so that it does not probe and warn "Setting accelerator to
    CPU ... we were unable to detect it" (it reads DS_ACCELERATOR when first imported)."""
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
