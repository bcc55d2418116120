"""Per-example signals: row validity, format/length filters, and model-based difficulty with its cost.

Row validity (counted skips, never silent): a record whose `prompt` or `response` is missing or not
a string is `missing_text`; text that is not valid UTF-8 (bytes that fail to decode, lone
surrogates from a lossy decode, or more than 1% U+FFFD replacement characters left by one) is
`invalid_utf8`. A stray U+FFFD is kept: real crawls have a few (4 of the 300 C4 demo documents).

Format filters, each defined on the dataset rather than on one dataset's quirks:
- `empty`: the response is blank after stripping whitespace (nothing to learn).
- `too_long`: a supervised example (non-empty prompt) with more tokens than the sequence length,
  or marked `truncated: True` by a tokenizer that already cut it; truncation cuts its answer.
  Raw text is not filtered: the packer splits long documents into blocks.
- `truncated_answer`: a supervised answer that stops before the ending the dataset otherwise uses.
  Two rules, each active only when the dataset shows a convention (≥ 90% of answers follow it):
  (1) a final-line marker: the first token of a multi-line answer's last line (digits folded
      to 0), e.g. GSM8K's "####"; an answer with no line starting with the marker is truncated;
  (2) clean sentence ends: answers ending in a letter, comma, semicolon, colon, hyphen or an open
      bracket stop mid-sentence; flagged only when ≤ 10% of the answers end that way.
  Mixed datasets where no convention holds get no truncation flags (conservative by design).

Model-based signals (per-example loss under the model, IFD = loss(answer | question) / loss(answer),
Li et al. 2024) come from a callable the trainer side provides. They cost forward passes: FLOPs ≈
scorer_flops_per_token × tokens × passes (2 for IFD: with and without the question), charged to the
budget. `model_signals_pay` is the rule that decides whether they are bought.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from unitrain.errors import DataError

CONVENTION_SHARE = 0.9  # a dataset "has" an ending convention when ≥ 90% of its answers follow it
MODEL_SIGNAL_MAX_SHARE = 0.1  # model scoring may use at most 10% of the FLOP budget
REPLACEMENT_SHARE = 0.01  # more U+FFFD than this: the row was decoded from non-UTF-8 bytes
CANDIDATE_FACTOR = 2.0  # model scoring looks at ≤ 2× the tokens it will keep (cheap signals choose them)
_MID_SENTENCE = re.compile(r"[A-Za-z,;:\-(\[{]$")
_DIGITS = re.compile(r"\d+")


@dataclass
class Row:
    index: int
    prompt: str
    response: str
    n_tokens: int
    truncated: bool = False  # the tokenizer already cut it to the sequence length (record["truncated"])

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.response}" if self.prompt else self.response

    @property
    def supervised(self) -> bool:
        return bool(self.prompt.strip())


def _as_text(v) -> str | None:
    """The value as valid text, or None when it is not valid UTF-8; raises TypeError when not text."""
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(v, str):
        raise TypeError
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from errors="surrogateescape")
        return None
    return None if v.count("\ufffd") > REPLACEMENT_SHARE * len(v) else v


def read_rows(records: list[dict]) -> tuple[list[Row], dict[int, str]]:
    """Valid rows and {index: why} for the rows skipped ("missing_text" | "invalid_utf8")."""
    rows, bad = [], {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "response" not in r or "prompt" not in r:
            bad[i] = "missing_text"
            continue
        try:
            p, a = _as_text(r["prompt"]), _as_text(r["response"])
        except TypeError:
            bad[i] = "missing_text"
            continue
        if p is None or a is None:
            bad[i] = "invalid_utf8"
            continue
        n = r.get("n_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            n = max(1, len(f"{p}\n{a}" if p else a) // 4)  # ≈ 4 characters per token
        rows.append(Row(i, p, a, n, r.get("truncated") is True))
    return rows, bad


def final_marker(response: str) -> str:
    """First token of the last line (digits folded to 0); "" for a one-line answer (no separate final line)."""
    body, _, last = response.strip().rpartition("\n")
    return _DIGITS.sub("0", last.split()[0]) if body.strip() and last.strip() else ""


def truncation_rule(rows: list[Row]) -> tuple[str, str | None]:
    """The dataset's ending convention: ("marker", token) | ("sentence", None) | ("none", None)."""
    answers = [r.response for r in rows if r.supervised and r.response.strip()]
    if len(answers) < 20:  # too few answers to call anything a convention
        return "none", None
    marker, count = Counter(final_marker(a) for a in answers).most_common(1)[0]
    if marker and count >= CONVENTION_SHARE * len(answers):
        return "marker", marker
    mid = sum(bool(_MID_SENTENCE.search(a.rstrip())) for a in answers)
    if mid <= (1 - CONVENTION_SHARE) * len(answers):
        return "sentence", None
    return "none", None


def is_truncated(row: Row, rule: tuple[str, str | None]) -> bool:
    kind, marker = rule
    if not row.supervised or kind == "none":
        return False
    if kind == "marker":
        return not any(_DIGITS.sub("0", line.split()[0]) == marker
                       for line in row.response.splitlines() if line.strip())
    return bool(_MID_SENTENCE.search(row.response.rstrip()))


def format_filter(row: Row, *, seq_len: int, rule: tuple[str, str | None]) -> str | None:
    """The first filter the row fails, or None."""
    if not row.response.strip():
        return "empty"
    if row.supervised and (row.n_tokens > seq_len or row.truncated):
        return "too_long"
    if is_truncated(row, rule):
        return "truncated_answer"
    return None


# ---------------------------------------------------------------------------------------------
# Model-based signals
# ---------------------------------------------------------------------------------------------

def model_scoring_flops(tokens: int, flops_per_token: float, ifd: bool) -> float:
    """One forward per example (loss), two for IFD (the answer with and without its question)."""
    return flops_per_token * tokens * (2 if ifd else 1)


def model_signals_pay(*, candidate_tokens: int, scorer_flops_per_token: float | None,
                      budget_flops: float | None, ifd: bool) -> tuple[bool, float, str]:
    """(use them?, their FLOPs, why). They pay only when they cost ≤ MODEL_SIGNAL_MAX_SHARE of the budget.

    Why this rule: scoring candidates with c× the kept tokens by the model being trained costs
    2Ψ·c·B (·2 for IFD) against 6Ψ·B (full) or 4Ψ·B (LoRA) to train on them, i.e. 67-200% of
    the training compute for c = 2 — more than any reported gain from loss-based selection
    (Yin & Rush 2024). So with the trained model as scorer they never pay; a proxy scorer ≥ 40×
    cheaper per token does.
    """
    if scorer_flops_per_token is None or budget_flops is None:
        return False, 0.0, "model scoring needs scorer_flops_per_token and budget_flops to be charged; skipped"
    cost = model_scoring_flops(candidate_tokens, scorer_flops_per_token, ifd)
    share = cost / budget_flops
    if share > MODEL_SIGNAL_MAX_SHARE:
        return False, cost, (f"model scoring of {candidate_tokens:,} candidate tokens would cost {cost:.3g} FLOPs "
                             f"= {share:.0%} of the budget (> {MODEL_SIGNAL_MAX_SHARE:.0%}); skipped")
    return True, cost, (f"model scoring of {candidate_tokens:,} candidate tokens costs {cost:.3g} FLOPs "
                        f"= {share:.1%} of the budget (≤ {MODEL_SIGNAL_MAX_SHARE:.0%}); charged")


def run_model_scorer(model_scorer: Callable, records: list[dict], indices: list[int],
                     batch: int = 256) -> dict[int, tuple[float, float | None]]:
    """{index: (loss_answer_given_q, IFD or None)} scored in batches of `batch` records."""
    out = {}
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        res = model_scorer([records[i] for i in idx])
        if not isinstance(res, (list, tuple)) or len(res) != len(idx):
            raise DataError(f"model_scorer returned {type(res).__name__} of length "
                            f"{len(res) if hasattr(res, '__len__') else '?'} for {len(idx)} records; it must "
                            f"return one dict(loss_answer_given_q, loss_answer) per record")
        for i, d in zip(idx, res):
            lq = float(d["loss_answer_given_q"])
            la = d.get("loss_answer")
            ifd = lq / float(la) if la is not None and float(la) > 0 and records[i].get("prompt") else None
            if math.isfinite(lq):
                out[i] = (lq, ifd)
    return out
