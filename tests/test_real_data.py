"""The checks whose point is real data: ../shared/data beside the repository (skipped with a reason where it is absent).

The mechanisms themselves (formats, filters, dedup, selection, training) are tested on generated data in the other
files; these three make sure they also hold on the real datasets: pairs read by hand are found and nothing else is
flagged, clean real data loses nothing, and every real file kind goes through the pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from unitrain.data import dedup
from unitrain.data import select as sel
from unitrain.data.score import read_rows, truncation_rule

from test_dedup import brute_force_near_dups

pytestmark = pytest.mark.real_data

# ARC-Easy near-duplicates, read by hand: the same question with a typo fixed ("n 1931" / "In 1931",
# "go" / "got", "is is" / "it is", "animal" / "animals"), a word added ("this second sample") or a
# lead-in added ("Use the information below ..."); the earlier row is kept.
ARC_NEAR_DUPS = {1302: 1078, 1401: 768, 1250: 154, 807: 145, 598: 270, 2141: 1252}
ARC_NOT_DUP = (1056, 1264)  # same passage, different question and answer: Jaccard 0.63, not a duplicate
ARC_SAME = [(1078, 1302), (768, 1401), (154, 1250), (145, 807), (1252, 2141)]  # typo-level edits, read by hand
ARC_DIFFERENT = [(1056, 1264), (1055, 2359)]  # shared passage / shared topic, different questions
GSM8K_SAME_QUESTION = (2483, 6691)  # the same problem, only the name changed (Josie / Amanda), solved in other words
GSM8K_VARIANT = (2228, 6119)  # an extra clause and another answer (96 vs 132): not the same question


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_arc_easy_hand_read_duplicates_are_found_and_nothing_else(shared_data):
    rows = _jsonl(shared_data / "eval" / "arc_easy.jsonl")
    texts = [r["query"] + "\n" + "\n".join(r["choices"]) + "\n" + r["choices"][r["gold"]] for r in rows]
    # MinHash: the hand-read pairs, verified against an exact all-pairs Jaccard
    found = dedup.near_duplicates(enumerate(texts), threshold=0.8)
    pairs = {i: j for i, (j, _) in found.items()}
    for dup, kept in ARC_NEAR_DUPS.items():
        assert pairs.get(dup) == kept, f"ARC row {dup} should be a near duplicate of {kept}"
    assert ARC_NOT_DUP[1] not in pairs
    for i, (j, jac) in found.items():
        assert dedup.pair_similarity(texts, i, j) == pytest.approx(jac) and jac >= 0.8
    assert pairs == brute_force_near_dups(texts, 0.8)
    # Embeddings (the bundled all-MiniLM-L6-v2): the typo-level pairs, not the shared passage or shared topic
    from unitrain.data import embed

    encoder = embed.load_encoder("default")
    recs = [{"prompt": r["query"] + "\n" + "\n".join(r["choices"]), "response": r["choices"][r["gold"]]} for r in rows]
    ids = sorted({i for p in ARC_SAME + ARC_DIFFERENT for i in p})
    picked, _ = read_rows([recs[i] for i in ids])
    e, _ = embed.embed_texts([sel.embed_text(r, encoder.max_tokens) for r in picked], encoder)
    found = dedup.embedding_duplicates(e, np.zeros(len(ids), dtype=int), threshold=sel.EMBED_DUP_COSINE)
    assert {(ids[j], ids[i]) for i, (j, _) in found.items()} == set(ARC_SAME)
    # ARC answers are choice phrases ("gravity"): most end in a letter, so no ending convention, no truncation flags
    assert truncation_rule(read_rows(recs[:200])[0]) == ("none", None)


def test_gsm8k_selection_finds_its_one_repeated_question_and_drops_nothing_else(shared_data):
    rows = _jsonl(shared_data / "gsm8k" / "train.jsonl")
    recs = [{"prompt": r["question"], "response": r["answer"], "id": i} for i, r in enumerate(rows)]
    # Clean real data loses nothing: no filter fires on GSM8K, and its "####" line is found as the convention
    s = sel.select_subset(recs, None, seq_len=2048, seed=0, encoder=None)
    assert s.policy == "keep_all" and s.dropped == {} and sorted(s.indices) == list(range(len(recs)))
    assert s.details["truncation_rule"] == {"kind": "marker", "marker": "####"}
    # Duplicates: none in full text (the worked solutions always differ), one question asked twice
    full = [r["question"] + "\n" + r["answer"] for r in rows]
    assert dedup.near_duplicates(enumerate(full)) == {}
    questions = [r["question"] for r in rows]
    q = dedup.near_duplicates(enumerate(questions), threshold=0.8)
    dup, kept = GSM8K_SAME_QUESTION[1], GSM8K_SAME_QUESTION[0]
    assert set(q) == {dup} and q[dup][0] == kept and q[dup][1] == pytest.approx(0.9333, abs=1e-3)
    assert dedup.pair_similarity(questions, *GSM8K_VARIANT) < 0.8
    # The selector keeps both while data is scarce and drops the repeat first when it must choose
    part = recs[2400:2600] + recs[6600:6800]  # rows 2483 and 6691 are here 83 and 291
    t = sum(len(r["prompt"] + "\n" + r["response"]) // 4 for r in part)
    assert {83, 291} <= set(sel.select_subset(part, 2 * t, seq_len=2048, seed=0, encoder=None).indices)
    t291 = len(part[291]["prompt"] + "\n" + part[291]["response"]) // 4
    pick = sel.select_subset(part, t - t291, seq_len=2048, seed=0, encoder=None)
    assert pick.dropped == {291: {"why": "near_duplicate", "of": 83, "score": 0.9333, "on": "prompt"}}


def test_every_real_file_kind_goes_through_the_pipeline(shared_data, tiny_recipe, smollm2_dir):
    from transformers import AutoTokenizer

    from unitrain.data import pipeline
    from unitrain.data.formats import row_to_example
    from unitrain.data.tokenize import IGNORE, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for source, fmt in [("gsm8k/train.jsonl", "qa"), ("pretrain/c4_demo.jsonl", "text"),
                        ("tinyshakespeare/input.txt", "text")]:
        r = tiny_recipe(**{"data.train": str(shared_data / source), "data.max_examples": 40})
        tok = pipeline.tokenize_data(r, tokenizer)
        assert tok.format == fmt and len(tok.train) > 0 and len(tok.eval) > 0, source
        data = pipeline.finalize(tok, r, tokenizer.pad_token_id)
        assert data.train.seq_len == r.data.max_length
        if fmt == "text":
            assert (data.train.lengths == r.data.max_length).all(), source  # full blocks
    # GSM8K through the chat template: the loss falls on the answer (and the end of turn) only
    row = json.loads((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    ex = tokenize_example(row_to_example(row, "qa", {}, None, 0), tokenizer, 1024, use_template=True)
    trained = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert trained.startswith(row["answer"]) and trained.endswith("<|im_end|>\n")
    assert row["question"] not in trained
