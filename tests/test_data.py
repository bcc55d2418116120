"""Data formats on generated data (tests/synth.py): detection, chat-template loss masks, packing, splits, caching,
bad input. The same pipeline on the real files in ../shared/data: tests/test_real_data.py."""

from __future__ import annotations

import numpy as np
import pytest

from unitrain.data import pipeline
from unitrain.data.formats import detect_format, row_to_example
from unitrain.data.pack import BatchOrder, pack_examples
from unitrain.data.tokenize import IGNORE, tokenize_example
from unitrain.errors import DataError

import synth  # tests/synth.py


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _loss_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def test_detect_formats_and_field_mapping():
    assert detect_format(["question", "answer"], {}) == "qa"
    assert detect_format(["instruction", "input", "output"], {}) == "instruction"
    assert detect_format(["messages"], {}) == "chat"
    assert detect_format(["text", "meta"], {}) == "text"
    assert detect_format(["problem", "solution"], {"question": "problem", "answer": "solution"}) == "qa"
    with pytest.raises(DataError, match="data.fields"):
        detect_format(["foo", "bar"], {})
    with pytest.raises(DataError, match=r"needs column\(s\) \['instruction', 'output'\]"):
        detect_format(["question", "answer"], {}, "instruction")


def test_qa_loss_only_on_the_answer(tokenizer):
    row = synth.word_problems(1, seed=3)[0]  # a multi-sentence question, a multi-line worked answer
    assert "\n" in row["answer"]
    ex = tokenize_example(row_to_example(row, "qa", {}, None, 0), tokenizer, 1024, use_template=True)
    trained = _loss_text(tokenizer, ex)
    assert trained.startswith(row["answer"]) and trained.endswith("<|im_end|>\n")
    assert row["question"] not in trained
    full = tokenizer.decode(ex["input_ids"])
    assert row["question"] in full and "<|im_start|>assistant\n" in full


def test_multi_turn_chat_masks_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ex = tokenize_example(row_to_example({"messages": msgs}, "chat", {}, None, 0), tokenizer, 512, True)
    trained = _loss_text(tokenizer, ex)
    assert "Hello!" in trained and "4<|im_end|>" in trained and "2+2?" not in trained and "Hi" not in trained


def test_instruction_format_without_template_uses_plain_layout(tokenizer):
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
    ex = tokenize_example(row_to_example(row, "instruction", {}, "Be brief.", 0), tokenizer, 512, False)
    full = tokenizer.decode(ex["input_ids"])
    assert "### System:\nBe brief." in full and "### User:\nTranslate\n\nbonjour" in full
    assert _loss_text(tokenizer, ex).strip().startswith("hello")


def test_raw_text_trains_every_token_and_is_cut_by_packing_not_truncated(tokenizer):
    import random

    from unitrain.data.pack import pack_text

    text = synth.document(random.Random(0), 600)[:2000]
    ex = tokenize_example(row_to_example({"text": text}, "text", {}, None, 0), tokenizer, 64, True)
    assert not ex["truncated"] and ex["n_tokens"] > 64 and ex["labels"] == ex["input_ids"]
    seqs = pack_text([ex], 64, pad_id=0)
    assert len(seqs) == ex["n_tokens"] // 64  # the whole document, in full blocks
    assert seqs.input_ids.ravel().tolist() == ex["input_ids"][: len(seqs) * 64]


def test_packing_keeps_examples_whole_and_masks_padding():
    exs = [{"input_ids": [1] * n, "labels": [IGNORE] * (n - 2) + [5, 5]} for n in (5, 4, 3, 7, 2)]
    seqs = pack_examples(exs, 10, pad_id=0, packing=True)
    assert seqs.lengths.tolist() == [9, 10, 2]  # 5+4 | 3+7 | 2
    assert (seqs.labels[0, 9:] == IGNORE).all()
    assert seqs.n_loss_tokens == 9  # 10 labelled, but the first token of a sequence is never predicted
    unpacked = pack_examples(exs, 10, pad_id=0, packing=False)
    assert len(unpacked) == 5


def test_batch_order_is_deterministic_disjoint_and_covers_each_epoch():
    order = BatchOrder(n=24, global_batch=8, seed=3)
    epoch0 = np.concatenate([order.step_indices(s) for s in range(3)])
    assert sorted(epoch0.tolist()) == list(range(24))  # every sequence once per epoch
    assert (order.step_indices(1) == BatchOrder(24, 8, 3).step_indices(1)).all()
    r0 = np.concatenate(order.micro_batches(2, micro=2, rank=0, world=2))
    r1 = np.concatenate(order.micro_batches(2, micro=2, rank=1, world=2))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 4
    assert not (order.step_indices(3) == order.step_indices(0)).all()  # epoch 1 is reshuffled


def _write_source(tmp_path, kind: str):
    if kind == "qa":
        return synth.write_jsonl(tmp_path / "qa.jsonl", synth.word_problems(60, seed=1))
    if kind == "text_jsonl":
        return synth.write_jsonl(tmp_path / "docs.jsonl", synth.documents(60, seed=1))
    path = tmp_path / "book.txt"  # plain text: one row per paragraph
    path.write_text("\n\n".join(d["text"] for d in synth.documents(30, seed=2)))
    return path


@pytest.mark.parametrize("kind,fmt", [("qa", "qa"), ("text_jsonl", "text"), ("txt", "text")])
def test_pipeline_on_each_kind_of_file(tiny_recipe, tokenizer, tmp_path, kind, fmt):
    r = tiny_recipe(**{"data.train": str(_write_source(tmp_path, kind)), "data.max_examples": 40})
    tok = pipeline.tokenize_data(r, tokenizer)
    assert tok.format == fmt and len(tok.train) > 0 and len(tok.eval) > 0
    data = pipeline.finalize(tok, r, tokenizer.pad_token_id)
    assert data.train.seq_len == r.data.max_length
    if fmt == "text":
        assert (data.train.lengths == r.data.max_length).all()  # full blocks


def test_tokenization_is_cached(tiny_recipe, tokenizer, tmp_path):
    r = tiny_recipe(**{"data.cache_dir": str(tmp_path / "cache")})
    pipeline.tokenize_data(r, tokenizer)
    files = sorted((tmp_path / "cache").glob("*.arrow"))
    assert len(files) == 2  # train + eval
    mtimes = [f.stat().st_mtime_ns for f in files]
    pipeline.tokenize_data(r, tokenizer)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not rewritten
    r2 = tiny_recipe(**{"data.cache_dir": str(tmp_path / "cache"), "data.max_length": 64})
    pipeline.tokenize_data(r2, tokenizer)
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 4  # new settings -> new cache entries


def test_bad_data_gets_clear_errors(tiny_recipe, tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"question": "q", "answer": ""}\n' * 5)
    with pytest.raises(DataError, match="5 of 5 rows have nothing to train on .* empty.jsonl lines 1, 2, 3, 4, 5"):
        pipeline.tokenize_data(tiny_recipe(**{"data.train": str(empty), "data.eval_split": 1}), tokenizer)
    with pytest.raises(DataError, match="every row was skipped as bad"):
        pipeline.tokenize_data(tiny_recipe(**{"data.train": str(empty), "data.eval_split": 1,
                                              "data.bad_rows": "skip"}), tokenizer)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "q", "completion": "a"}\n' * 5)
    with pytest.raises(DataError, match="cannot tell the data format"):
        pipeline.tokenize_data(tiny_recipe(**{"data.train": str(wrong)}), tokenizer)
    mapped = tiny_recipe(**{"data.train": str(wrong), "data.eval_split": 1,
                            "data.fields": {"question": "prompt", "answer": "completion"}})
    assert len(pipeline.tokenize_data(mapped, tokenizer).train) == 4
    with pytest.raises(DataError, match="data file not found"):
        from unitrain.data.load import load_rows

        load_rows(str(tmp_path / "missing.jsonl"))
