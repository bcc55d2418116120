"""select_subset without embeddings on generated data: filters, bad rows, the budget policy, model signals, output.

The rows come from tests/synth.py (GSM8K-like word problems, ARC-like quiz rows, C4-like documents) with the
damage each test needs planted in it; the selector on the real GSM8K: tests/test_real_data.py.
"""

import json
from collections import Counter

import pytest

from unitrain.data import dedup
from unitrain.data import select as sel
from unitrain.data.score import MODEL_SIGNAL_MAX_SHARE, read_rows, truncation_rule
from unitrain.errors import DataError

import synth  # tests/synth.py

@pytest.fixture(scope="module")
def problems() -> list[dict]:
    rows = synth.word_problems(1500, seed=0)
    return [{"prompt": r["question"], "response": r["answer"], "id": i} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [{"prompt": "", "response": d["text"]} for d in synth.documents(40, seed=0)]


def partition_ok(s: sel.Selection, n: int) -> None:
    """Every record is kept once or dropped once, never both, never neither."""
    assert len(set(s.indices)) == len(s.indices)
    assert not set(s.indices) & set(s.dropped)
    assert set(s.indices) | set(s.dropped) == set(range(n))


def test_clean_data_loses_nothing_when_unbudgeted(problems):
    s = sel.select_subset(problems, None, seq_len=2048, seed=0, encoder=None)
    assert s.policy == "keep_all" and s.dropped == {} and sorted(s.indices) == list(range(len(problems)))
    assert s.tokens_kept == sum(len(r["prompt"] + "\n" + r["response"]) // 4 for r in problems)
    assert s.details["truncation_rule"] == {"kind": "marker", "marker": "####"}


def test_filters_remove_exactly_what_they_claim(problems, docs):
    recs = [dict(r) for r in problems[:400]] + docs
    cut = [3, 50, 51, 199, 377]  # answers cut before their "#### n" line
    for i in cut:
        recs[i]["response"] = recs[i]["response"].rsplit("\n", 1)[0]
    blank = [10, 420]  # one supervised, one raw text
    for i in blank:
        recs[i]["response"] = " \n "
    seq_len = 220
    long_sup = {i for i, r in enumerate(recs[:400]) if i not in blank
                and len(r["prompt"] + "\n" + r["response"]) // 4 > seq_len}
    assert 5 < len(long_sup) < 100  # the data has some long examples; the test means something
    s = sel.select_subset(recs, None, seq_len=seq_len, seed=0, encoder=None)
    partition_ok(s, len(recs))
    why = {i: d["why"] for i, d in s.dropped.items()}
    assert {i for i, w in why.items() if w == "empty"} == set(blank)
    assert {i for i, w in why.items() if w == "too_long"} == long_sup
    assert {i for i, w in why.items() if w == "truncated_answer"} == set(cut) - long_sup
    assert set(why) == set(blank) | long_sup | set(cut)  # nothing else: long raw C4 documents stay
    assert any(len(r["response"]) // 4 > seq_len for r in docs)
    # A tokenizer that already cut an example says so with "truncated": supervised goes, raw text stays.
    marked = [dict(r, n_tokens=seq_len, truncated=True) for r in (recs[0], recs[400])]
    s = sel.select_subset(recs[:20] + marked, None, seq_len=seq_len, seed=0, encoder=None)
    assert {i: d["why"] for i, d in s.dropped.items() if i >= 20} == {20: "too_long"} and 21 in s.indices


def test_truncation_rule_mid_sentence_and_mixed_data(problems):
    prose = [{"prompt": f"Question {i}?", "response": f"Answer number {i} is here."} for i in range(40)]
    prose[7]["response"] = "The answer is that the"
    rows, _ = read_rows(prose)
    assert truncation_rule(rows) == ("sentence", None)
    s = sel.select_subset(prose, None, seq_len=512, seed=0, encoder=None)
    assert {i: d["why"] for i, d in s.dropped.items()} == {7: "truncated_answer"}
    # Word problems mixed with prose: no common marker, but both end cleanly (digits, periods): only #7 is cut.
    mixed = problems[:40] + prose
    rows, _ = read_rows(mixed)
    assert truncation_rule(rows) == ("sentence", None)
    s = sel.select_subset(mixed, None, seq_len=512, seed=0, encoder=None)
    assert {i: d["why"] for i, d in s.dropped.items()} == {47: "truncated_answer"}
    # Multiple-choice answers are choice phrases ("gravity"): most end in a letter, so no convention, no flags.
    quiz = [{"prompt": r["question"], "response": r["choices"][r["gold"]]} for r in synth.quiz(200, seed=0)]
    rows, _ = read_rows(quiz)
    assert truncation_rule(rows) == ("none", None)
    assert sel.select_subset(quiz, None, seq_len=512, seed=0, encoder=None).details["truncation_rule"]["kind"] == "none"


def test_bad_rows_are_counted_never_silent(problems):
    recs = [dict(r) for r in problems[:50]]
    recs += [{"prompt": "q"}, {"response": "a"}, {"prompt": None, "response": "a"}, "not a dict",
             {"prompt": "q", "response": b"\xff\xfe bad"}, {"prompt": "q", "response": "lone \udc80 surrogate"},
             {"prompt": "q", "response": "mojibake \ufffd"}, {"prompt": "q", "response": "It is 5.\n#### 5".encode()}]
    s = sel.select_subset(recs, None, seq_len=1024, seed=0, encoder=None)
    assert s.skipped == {"missing_text": 4, "invalid_utf8": 3}
    assert {i: d["why"] for i, d in s.dropped.items() if i >= 50} == {
        50: "missing_text", 51: "missing_text", 52: "missing_text", 53: "missing_text",
        54: "invalid_utf8", 55: "invalid_utf8", 56: "invalid_utf8"}
    assert 57 in s.indices
    partition_ok(s, len(recs))
    assert s.report()["skipped"] == {"missing_text": 4, "invalid_utf8": 3}


def test_smaller_than_one_batch_is_an_error(problems):
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        sel.select_subset(problems[:5], None, seq_len=512, seed=0, encoder=None, batch_size=8)
    dup = [problems[0]] * 10  # ten rows, but one clean example
    with pytest.raises(DataError, match="1 clean example"):
        sel.select_subset(dup, None, seq_len=512, seed=0, encoder=None, batch_size=4)


def test_policy_follows_the_budget(problems):
    recs = problems[:1000]
    t = sel.select_subset(recs, None, seq_len=2048, seed=0, encoder=None).tokens_kept
    # the selector only fills: a budget that covers the clean data keeps all of it (how often it is repeated is the
    # plan's decision, plan.data.epochs), a smaller one is filled with ranked examples
    scarce = sel.select_subset(recs, int(2.5 * t), seq_len=2048, seed=0, encoder=None)
    assert scarce.policy == "keep_all" and "covers the clean data" in scarce.reason and not hasattr(scarce, "epochs")
    assert len(scarce.indices) == 1000 and scarce.dropped == {}
    small = sel.select_subset(recs, t // 10, seq_len=2048, seed=0, encoder=None)
    assert small.policy == "select_clean_random"
    assert abs(small.tokens_kept - t // 10) < 300  # filled to within one example
    assert Counter(d["why"] for d in small.dropped.values()) == {"not_selected": 1000 - len(small.indices)}
    partition_ok(small, 1000)


def test_repeated_question_goes_last_only_when_selecting(problems):
    recs = [dict(r) for r in problems[:400]]
    (q1, a1), (q2, a2) = synth.REPEATED_QUESTION
    recs[83], recs[291] = {"prompt": q1, "response": a1}, {"prompt": q2, "response": a2}
    on_prompt = dedup.pair_similarity([r["prompt"] for r in recs], 83, 291)
    assert 0.8 <= on_prompt < 1  # the same question ...
    assert dedup.pair_similarity([r["prompt"] + "\n" + r["response"] for r in recs], 83, 291) < 0.8  # ... not the text
    t = sum(len(r["prompt"] + "\n" + r["response"]) // 4 for r in recs)
    keep = sel.select_subset(recs, 2 * t, seq_len=2048, seed=0, encoder=None)
    assert {83, 291} <= set(keep.indices)  # scarce: both kept, they carry distinct tokens
    t291 = len(recs[291]["prompt"] + "\n" + recs[291]["response"]) // 4
    pick = sel.select_subset(recs, t - t291, seq_len=2048, seed=0, encoder=None)  # room for all but one
    assert pick.dropped == {291: {"why": "near_duplicate", "of": 83, "score": round(on_prompt, 4), "on": "prompt"}}
    assert "embeddings skipped (encoder=None)" in pick.reason


def test_reproducible_for_a_seed(problems):
    a = sel.select_subset(problems[:1000], 40_000, seq_len=512, seed=7, encoder=None)
    b = sel.select_subset(problems[:1000], 40_000, seq_len=512, seed=7, encoder=None)
    c = sel.select_subset(problems[:1000], 40_000, seq_len=512, seed=8, encoder=None)
    assert a.indices == b.indices and a.dropped == b.dropped
    assert set(a.indices) != set(c.indices)


def _fake_scorer(calls):
    def scorer(batch):
        calls.append(len(batch))
        # Longer solutions = more steps: a loss that grows with the answer's length.
        return [{"loss_answer_given_q": 0.5 + len(r["response"]) / 1000, "loss_answer": 2.0} for r in batch]
    return scorer


def test_model_signals_bought_only_when_they_pay(problems):
    recs = problems[:1500]
    budget = 30_000
    budget_flops = 6 * 135e6 * budget  # training a 135M model on the budget's tokens
    calls = []
    # The trained model as its own scorer (2Ψ per token) costs far more than 10% of the budget: skipped.
    no = sel.select_subset(recs, budget, seq_len=512, seed=0, encoder=None, model_scorer=_fake_scorer(calls),
                           scorer_flops_per_token=2 * 135e6, budget_flops=budget_flops)
    assert calls == [] and no.policy == "select_clean_random" and no.selector_flops == 0
    assert no.details["model_signals"]["used"] is False and "skipped" in no.reason
    # A proxy 1000x cheaper pays: candidates are scored in batches, FLOPs charged, easy ones kept.
    yes = sel.select_subset(recs, budget, seq_len=512, seed=0, encoder=None, model_scorer=_fake_scorer(calls),
                            scorer_flops_per_token=2 * 135e3, budget_flops=budget_flops)
    ms = yes.details["model_signals"]
    assert ms["used"] and sum(calls) == ms["candidates"] and max(calls) <= 256
    assert yes.selector_flops == pytest.approx(2 * 2 * 135e3 * sum(len(recs[i]["prompt"] + "\n" + recs[i]["response"])
                                                                   // 4 for i in range(1500) if yes.scores["ifd"][i] == yes.scores["ifd"][i]))
    assert yes.selector_flops <= MODEL_SIGNAL_MAX_SHARE * budget_flops
    assert yes.policy == "select_clean_easy_diverse"
    charged = int(budget * (1 - yes.selector_flops / budget_flops))
    assert abs(yes.tokens_kept - charged) < 300
    kept_len = sum(len(recs[i]["response"]) for i in yes.indices) / len(yes.indices)
    rand_len = sum(len(recs[i]["response"]) for i in no.indices) / len(no.indices)
    assert kept_len < 0.8 * rand_len  # low-IFD (short) answers were preferred


def test_random_subset_and_write(problems, tmp_path):
    idx = sel.random_subset(problems, 20_000, seed=3)
    assert abs(sum(len(problems[i]["prompt"] + "\n" + problems[i]["response"]) // 4 for i in idx) - 20_000) < 300
    assert idx == sel.random_subset(problems, 20_000, seed=3)
    s = sel.select_subset(problems[:300], 5_000, seq_len=512, seed=0, encoder=None)
    rep = s.write(tmp_path / "subset.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "subset.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == s.indices and lines[0]["prompt"] == problems[s.indices[0]]["prompt"]
    report = json.loads(rep.read_text())
    assert report["policy"] == s.policy and report["tokens_kept"] == s.tokens_kept
    assert len(report["dropped"]) == 300 - len(s.indices)
    assert report["score_distributions"]["n_tokens"]["n"] == 300
