"""Duplicate detection on generated data with planted duplicates: exactly the planted pairs are found, and the MinHash
index agrees with an exact all-pairs check. The hand-read pairs of ARC-Easy and GSM8K: tests/test_real_data.py."""

import numpy as np
import pytest
from scipy import sparse

from unitrain.data import dedup

import synth  # tests/synth.py

LEAD_IN = "Use the information below to answer the question. "


def problem_texts(n: int, seed: int) -> list[str]:
    return [r["question"] + "\n" + r["answer"] for r in synth.word_problems(n, seed=seed)]


def _typos(t: str, k: int = 1) -> str:  # two letters swapped in each of the first k long words
    for w in [w for w in dict.fromkeys(t.split(" ")) if len(w) >= 6 and w.isalpha()][:k]:
        t = t.replace(w, w[0] + w[2] + w[1] + w[3:], 1)
    return t


def _word_added(t: str) -> str:
    w = t.split(" ")
    return " ".join(w[:10] + ["really"] + w[10:])


def _word_dropped(t: str) -> str:
    w = t.split(" ")
    return " ".join(w[:20] + w[21:])


# Edits that keep a copy a near duplicate (Jaccard >= 0.8), the last one just: three typos (0.83 on its row).
PLANTED_EDITS = [_typos, _word_added, lambda t: LEAD_IN + t, lambda t: t.replace(". ", "! ", 1), _word_dropped,
                 lambda t: _typos(t, 3)]


def planted_corpus() -> tuple[list[str], dict[int, int], list[tuple[int, int]]]:
    """1000 generated problems, then edited copies of earlier rows, as ARC's hand-read near duplicates are: a typo,
    a word added, a lead-in added, punctuation only, a word dropped, three typos; and two close calls that are not
    duplicates: a row that shares a long question and its first steps with an earlier one but asks and answers
    something else (Jaccard 0.63, as ARC's shared passage), and a copy with six typos (0.71).
    -> (texts, {duplicate: the earlier row it copies}, [(close call, its earlier row)])."""
    texts = problem_texts(1000, seed=5)
    long_rows = [i for i, t in enumerate(texts) if 70 <= len(t.split()) <= 120][:8]
    dups = {}
    for base, edit in zip(long_rows, PLANTED_EDITS):
        assert edit(texts[base]) != texts[base]
        dups[len(texts)] = base
        texts.append(edit(texts[base]))
    close = long_rows[6]  # its story and first steps, then another question and answer
    question, _, answer = texts[close].partition("\n")
    texts.append(question.rsplit(".", 1)[0] + ". How many did the friends give in all?\n"
                 + "\n".join(answer.split("\n")[:-2]) + "\nAdding every gift gives the total.\n"
                 "The friends gave 41 in all.\n#### 41")
    texts.append(_typos(texts[long_rows[7]], 6))
    return texts, dups, [(len(texts) - 2, close), (len(texts) - 1, long_rows[7])]


def brute_force_near_dups(texts: list[str], threshold: float) -> dict[int, int]:
    """Exact Jaccard over all pairs (sparse shingle matrix), greedy like the detector: first kept wins."""
    vocab: dict[str, int] = {}
    r, c = [], []
    for i, t in enumerate(texts):
        for s in dedup.shingles(t):
            r.append(i)
            c.append(vocab.setdefault(s, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(texts), len(vocab)))
    inter = (x @ x.T).tocoo()
    size = np.asarray(x.sum(1)).ravel()
    sim: dict[int, dict[int, float]] = {}
    for i, j, v in zip(inter.row, inter.col, inter.data):
        if j < i:
            sim.setdefault(i, {})[j] = v / (size[i] + size[j] - v)
    dups = {}
    for i in range(len(texts)):
        cands = {j: s for j, s in sim.get(i, {}).items() if j not in dups and s >= threshold}
        if cands:
            dups[i] = max(sorted(cands), key=lambda j: cands[j])
    return dups


def test_planted_near_duplicates_and_nothing_else():
    texts, planted, close = planted_corpus()
    # The test means something on both sides of the threshold: a copy just above it, close calls below it
    assert 0.8 <= min(dedup.pair_similarity(texts, i, j) for i, j in planted.items()) < 0.85
    assert [0.5 < dedup.pair_similarity(texts, i, j) < 0.8 for i, j in close] == [True, True]
    assert max(dedup.pair_similarity(texts, i, j) for i, j in close) > 0.7
    found = dedup.near_duplicates(enumerate(texts), threshold=0.8)
    pairs = {i: j for i, (j, _) in found.items()}
    assert pairs == planted  # every planted copy, pointing at its original; the close calls are not ones
    # Every pair the MinHash index reports has a true Jaccard >= 0.8, and it misses none (exact check).
    for i, (j, jac) in found.items():
        assert dedup.pair_similarity(texts, i, j) == pytest.approx(jac) and jac >= 0.8
    assert pairs == brute_force_near_dups(texts, 0.8)


def test_generated_problems_have_no_near_duplicates_but_the_repeated_question():
    """What the selection tests rely on: generated rows are distinct, in full and by question, at Jaccard 0.8 (and
    even 0.5); the hand-written repeated question is found on its question only, the variant is not."""
    rows = [(r["question"], r["answer"]) for r in synth.word_problems(1500, seed=0)]
    same, variant = synth.REPEATED_QUESTION, synth.VARIANT_QUESTION
    rows[100:100] = [same[0]]
    rows[900:900] = [variant, same[1]]  # at 900 and 901
    full = [q + "\n" + a for q, a in rows]
    questions = [q for q, _ in rows]
    assert dedup.near_duplicates(enumerate(full)) == {}
    assert brute_force_near_dups(full, 0.5) == {}
    q = dedup.near_duplicates(enumerate(questions), threshold=0.8)
    assert set(q) == {901} and q[901][0] == 100
    assert q[901][1] == pytest.approx(dedup.pair_similarity(questions, 100, 901)) and q[901][1] >= 0.8
    assert dedup.pair_similarity(questions, 100, 900) < 0.8
    assert set(brute_force_near_dups(questions, 0.5)) == {900, 901}  # the variant is close, just not a duplicate


def test_exact_duplicates_ignore_case_whitespace_and_unicode_forms():
    texts = list(enumerate(problem_texts(300, seed=1)))
    texts[5] = (5, "\n".join(synth.REPEATED_QUESTION[0]))
    assert "$" in texts[5][1]
    copies = {300: 5, 301: 17, 302: 5}
    texts += [(300, "  " + texts[5][1].upper().replace(" ", "\t ")), (301, texts[17][1].replace("\n", " \n\n")),
              (302, texts[5][1].replace("$", "\uff04"))]  # fullwidth dollar: NFKC folds it
    assert dedup.exact_duplicates(texts) == copies


def test_normalize_and_shingles():
    assert dedup.normalize_text("  Hello\n\tWORLD ") == "hello world"
    assert dedup.shingles("a b") == {"a b"}
    assert dedup.shingles("One, two; three four!") == {"one two three", "two three four"}


def test_embedding_duplicates_within_cluster_greedy():
    e = np.array([[1, 0, 0], [0.999, 0.0447, 0], [0, 1, 0], [0.998, 0.0632, 0], [0, 0.97, 0.243]], dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    same = dedup.embedding_duplicates(e, np.zeros(5, dtype=int), threshold=0.95)
    assert {i: j for i, (j, _) in same.items()} == {1: 0, 3: 0, 4: 2}
    # Rows in different clusters are never compared.
    split = dedup.embedding_duplicates(e, np.array([0, 1, 0, 1, 0]), threshold=0.95)
    assert {i: j for i, (j, _) in split.items()} == {3: 1, 4: 2}
