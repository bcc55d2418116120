"""Example formats: detect them from the columns and turn each row into a conversation.

Every supervised row becomes a list of chat messages; loss goes only on assistant turns. Raw text
becomes one `text` string with loss on every token. The canonical record for selection is
{"prompt": ..., "response": ...} (prompt "" for raw text).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from unitrain.errors import DataError

# role -> default column name
DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "output": "output", "messages": "messages",
                  "question": "question", "answer": "answer", "text": "text", "system": "system"}

FORMAT_KEYS = {  # columns that identify each format (after field mapping)
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "qa": ("question", "answer"),
    "text": ("text",),
}


@dataclass
class Example:
    messages: list[dict] | None = None  # supervised: [{"role", "content"}, ...]
    text: str | None = None  # raw text

    def canonical(self) -> dict:
        if self.text is not None:
            return {"prompt": "", "response": self.text}
        prompt = "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")
        response = "\n".join(m["content"] for m in self.messages if m["role"] == "assistant")
        return {"prompt": prompt, "response": response}


def resolve_fields(fields: dict) -> dict:
    return {**DEFAULT_FIELDS, **fields}


def detect_format(columns: list[str], fields: dict, requested: str = "auto") -> str:
    """Pick the format whose (mapped) columns are present; explain what is missing otherwise."""
    f = resolve_fields(fields)
    cols = set(columns)
    missing = {role: col for role, col in fields.items() if col not in cols}
    if missing:
        role, col = next(iter(missing.items()))
        close = difflib.get_close_matches(str(col), sorted(cols), n=1)
        hint = f" (did you mean data.fields.{role}={close[0]}?)" if close else ""
        raise DataError(f"data.fields.{role}={col}: the data has no column {col!r}{hint}; its columns are "
                        f"{sorted(cols)}")
    if requested != "auto":
        missing = [f[k] for k in FORMAT_KEYS[requested] if f[k] not in cols]
        if missing:
            raise DataError(
                f"data.format={requested} needs column(s) {missing}, but the data has {sorted(cols)}. Map your "
                f"columns with data.fields, e.g. data.fields.{FORMAT_KEYS[requested][0]}={sorted(cols)[0]}")
        return requested
    for name in ("chat", "instruction", "qa", "text"):
        if all(f[k] in cols for k in FORMAT_KEYS[name]):
            return name
    raise DataError(
        f"cannot tell the data format from its columns {sorted(cols)}: expected messages (chat), "
        f"instruction+output (instruction), question+answer (qa) or text (raw text). Set data.format and map "
        f"the columns with data.fields, e.g. data.fields.question=problem data.fields.answer=solution")


def _text(value, col: str, row_index: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"row {row_index}: column {col!r} should hold text, got {type(value).__name__}; "
                        f"map the right column with data.fields")
    return value


def row_to_example(row: dict, fmt: str, fields: dict, system_prompt: str | None, row_index: int) -> Example:
    f = resolve_fields(fields)
    if fmt == "text":
        return Example(text=_text(row.get(f["text"]), f["text"], row_index))
    if fmt == "chat":
        msgs = row.get(f["messages"])
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in msgs):
            raise DataError(f"row {row_index}: {f['messages']!r} must be a list of {{role, content}} messages")
        messages = [{"role": m["role"], "content": _text(m["content"], "content", row_index)} for m in msgs]
    elif fmt == "instruction":
        instruction = _text(row.get(f["instruction"]), f["instruction"], row_index)
        extra = _text(row.get(f["input"]), f["input"], row_index)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(row.get(f["output"]), f["output"], row_index)}]
    elif fmt == "qa":
        messages = [{"role": "user", "content": _text(row.get(f["question"]), f["question"], row_index)},
                    {"role": "assistant", "content": _text(row.get(f["answer"]), f["answer"], row_index)}]
    else:
        raise DataError(f"unknown data.format {fmt!r}")
    system = row.get(f["system"]) if f["system"] in row else None
    system = system or system_prompt
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return Example(messages=messages)
