"""Find the JSON object in an LLM reply: bare, fenced, or wrapped in prose."""

from __future__ import annotations

import json
from typing import Any

from .textsafe import clean_json

# Replies beyond this are not plans; refusing early keeps a 10 MB reply from costing minutes.
MAX_REPLY_CHARS = 200_000
_MAX_CANDIDATES = 200


class JSONExtractError(ValueError):
    pass


def extract_json_object(text: str) -> dict[str, Any]:
    if len(text) > MAX_REPLY_CHARS:
        raise JSONExtractError(
            f"reply is {len(text):,} characters, more than the {MAX_REPLY_CHARS:,} a plan can be"
        )
    stripped = text.strip()
    if not stripped:
        raise JSONExtractError("reply is empty")
    try:
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = _first_object(stripped)
    except RecursionError:
        raise JSONExtractError("reply is JSON nested too deeply to be a plan") from None
    if not isinstance(value, dict):
        raise JSONExtractError(f"reply is JSON but a {type(value).__name__}, not an object")
    # "\u001b" or "\ud800" escapes decode to control characters and lone surrogates.
    cleaned: dict[str, Any] = clean_json(value)
    return cleaned


def _first_object(text: str) -> Any:
    decoder = json.JSONDecoder()
    start = text.find("{")
    tried = 0
    last_error = "no '{' found"
    while start != -1 and tried < _MAX_CANDIDATES:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError as err:
            last_error = f"{err.msg} at character {err.pos}"
        tried += 1
        start = text.find("{", start + 1)
    raise JSONExtractError(f"no complete JSON object in the reply ({last_error})")
