"""What a person sees in the Prefect UI: run names, artifact keys, links to runs, artifacts
and to the videos served by `story-to-video serve`."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import quote

TITLE_CHARS = 60
KEY_WORD_CHARS = 48


def _cut_at_word(text: str, limit: int, sep: str) -> str:
    """`text` shortened to at most `limit` characters, cut between words only (a single
    word longer than the limit is the one thing cut inside)."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    cut = head.rfind(sep)
    return head[:cut] if cut > 0 else text[:limit]


def run_title(text: str, limit: int = TITLE_CHARS) -> str:
    """A readable run name from an idea: whitespace collapsed, whole words, '...' when cut."""
    flat = " ".join(text.split())
    short = _cut_at_word(flat, limit, " ")
    return short if short == flat else short.rstrip(" ,.;:-") + "..."


def key_words(text: str, limit: int = KEY_WORD_CHARS) -> str:
    """Lowercase ASCII words joined by dashes, cut between words: the readable part of an
    artifact key (Prefect keys allow lowercase letters, digits and dashes)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return _cut_at_word(slug, limit, "-") or "run"


def run_slug(idea: str, run_name: str | None, ident: str) -> str:
    """The readable, stable part of a run's artifact keys: the run name, or the idea's first
    words plus the run's input hash (the same on every resume of the run)."""
    if run_name:
        return key_words(run_name)
    return f"{key_words(idea)}-{ident.lower()}"


def artifact_key(kind: str, slug: str) -> str:
    """`<kind>-<slug>`: one entry per run on the Artifacts page, a version per resume."""
    return f"{kind}-{slug}"


def media_link(media_url: str, run_dir: Path, name: str) -> str:
    """URL of a file of a run folder as `story-to-video serve` serves it."""
    return f"{media_url.rstrip('/')}/{quote(run_dir.name)}/{quote(name)}"


def ui_base() -> str:
    """The Prefect UI's address, or '' for links relative to the page (ephemeral mode)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().ui_url
    return str(url).rstrip("/") if url else ""


def flow_run_link(flow_run_id: object) -> str:
    return f"{ui_base()}/runs/flow-run/{flow_run_id}"


def artifact_link(artifact_id: object) -> str:
    return f"{ui_base()}/artifacts/artifact/{artifact_id}"
