"""LLM text is data: make it safe for files, the terminal, Markdown/HTML and subtitles.

`clean` runs on every string an LLM server sends, where it enters the project: no control
character (NUL, ESC, BEL, C1) and no lone surrogate reaches a file, a log or a prompt. The
other helpers make cleaned text inert where it is shown: a terminal, Markdown/HTML (report.md
and the Prefect artifacts), SubRip subtitles.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls except tab and newline, DEL, C1 controls; lone surrogates (json.loads turns a
# "\ud800" escape into one, and UTF-8 cannot encode it).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Bidirectional embeddings, overrides and isolates reorder what a terminal shows.
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
_SRT_SAFE = str.maketrans("<>{}", "\u2039\u203a()")
_MD_INLINE = re.compile(r"([\\`*_\[\]|~#])")
_MD_BULLET = re.compile(r"^(\s*)([-+=])")
_MD_NUMBERED = re.compile(r"^(\s*\d+)([.)])")


def clean(text: str) -> str:
    """Text as the project keeps it: control characters removed, lone surrogates replaced."""
    return _SURROGATE.sub("\ufffd", _CONTROL.sub("", text))


def clean_json(value: Any) -> Any:
    """`clean` applied to every string (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean(str(k)): clean_json(v) for k, v in value.items()}
    return value


def one_line(text: str, limit: int = 300) -> str:
    """Clean, on one line, at most `limit` characters: for error messages and logs."""
    flat = " ".join(_BIDI.sub("", clean(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def terminal(text: str) -> str:
    """Multi-line text for a terminal: nothing in it can move the cursor or set a title."""
    return _BIDI.sub("", clean(text.replace("\t", " ")))


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code(text: str) -> str:
    """Inline Markdown code span: literal, and never auto-linked (a URL of a server that
    is gone by morning stays text)."""
    return "`" + " ".join(clean(text).replace("`", "'").split()) + "`"


def md(text: str) -> str:
    """Inline Markdown: shows the text literally, on one line (no link, image, HTML or table
    break can come out of it)."""
    flat = " ".join(clean(text).split())
    return _MD_INLINE.sub(r"\\\1", _escape_html(flat))


def md_block(text: str) -> str:
    """Paragraphs of Markdown that show the text literally, keeping its line breaks."""
    lines = []
    for line in clean(text).split("\n"):
        escaped = _MD_INLINE.sub(r"\\\1", _escape_html(line.rstrip()))
        escaped = _MD_BULLET.sub(r"\1\\\2", escaped)
        lines.append(_MD_NUMBERED.sub(r"\1\\\2", escaped))
    return "\n".join(lines)


def srt(text: str) -> str:
    """One SubRip caption line: players read <tags> and {\\overrides}, and a blank line or
    '-->' would end the cue early; none of them can survive."""
    flat = " ".join(clean(text).split())
    return flat.translate(_SRT_SAFE)
