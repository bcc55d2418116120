"""Tokenize examples with the model's chat template and loss masks (labels = -100 off the response).

Supervised examples are tokenized segment by segment — each prompt part (everything the template
puts before an assistant turn, generation prompt included) and each assistant part separately — so
the prompt tokens are exactly what inference sees and the mask boundary is exact. Models without a
chat template get a plain "### User / ### Assistant" layout. Raw text is tokenized whole.
"""

from __future__ import annotations

import hashlib
import json

from unitrain.data.formats import Example

IGNORE = -100
PLAIN_ROLES = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TOKENIZE_VERSION = 3  # bump when the output of tokenize_example changes: invalidates caches


def _template(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments_with_template(tokenizer, messages) -> list[tuple[str, bool]]:
    """[(text, is_response)] whose concatenation is the templated conversation."""
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], True)
        full = _template(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("chat template is not prefix-stable")  # caller falls back to the plain layout
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _segments_plain(tokenizer, messages) -> list[tuple[str, bool]]:
    segments, pending = [], ""
    for m in messages:
        if m["role"] == "assistant":
            segments += [(pending + PLAIN_ROLES["assistant"], False), (m["content"] + (tokenizer.eos_token or ""), True)]
            pending = "\n\n"
        else:
            pending += PLAIN_ROLES.get(m["role"], f"### {m['role']}:\n") + m["content"] + "\n\n"
    return segments


def prompt_text(tokenizer, messages: list[dict], use_template: bool) -> str:
    """The text a model sees before generating the final assistant turn (for exact-match eval)."""
    context = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    if use_template and tokenizer.chat_template:
        return _template(tokenizer, context, True)
    return "".join(t for t, _ in _segments_plain(tokenizer, context + [{"role": "assistant", "content": ""}])[:-1])


def tokenize_example(ex: Example, tokenizer, max_length: int, use_template: bool) -> dict:
    """-> {input_ids, labels, n_tokens, n_loss_tokens, truncated}."""
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        segments = None
        if use_template and tokenizer.chat_template:
            try:
                segments = _segments_with_template(tokenizer, ex.messages)
            except ValueError:
                segments = None
        if segments is None:
            segments = _segments_plain(tokenizer, ex.messages)
        ids, labels = [], []
        for text, is_response in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if is_response else [IGNORE] * len(piece)
    if ex.text is not None:  # raw text is cut into max_length blocks by packing, never truncated
        return {"input_ids": ids, "labels": labels, "n_tokens": len(ids), "n_loss_tokens": max(0, len(ids) - 1),
                "truncated": False}
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "n_tokens": len(ids),
            "n_loss_tokens": sum(1 for x in labels[1:] if x != IGNORE), "truncated": truncated}


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer.chat_template or "",
                         tokenizer.eos_token or "", tokenizer.bos_token or ""]).encode())
    h.update(json.dumps(tokenizer("unitrain fingerprint: 0123 ĉ 日本")["input_ids"]).encode())
    return h.hexdigest()[:16]
