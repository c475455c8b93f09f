"""LLM prompt templates (Jinja2). PROMPT_VERSION goes into every run manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

PROMPTS_DIR = Path(__file__).parent
# Bump when a template's meaning changes; the content hash catches edits without a bump.
PROMPT_SERIES = "1"

_env = Environment(
    loader=FileSystemLoader(PROMPTS_DIR),
    undefined=StrictUndefined,
    keep_trailing_newline=False,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,  # plain text for an LLM, not HTML
)


def render(name: str, **context: Any) -> str:
    return _env.get_template(f"{name}.j2").render(**context).strip()


def prompt_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(PROMPTS_DIR.glob("*.j2")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"v{PROMPT_SERIES}-{digest.hexdigest()[:10]}"
