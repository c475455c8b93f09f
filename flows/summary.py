"""The run a user lands on tells the story: run names after the idea (or the batch), and a
summary artifact on the parent run with what was made, links to each video's run, report and
final.mp4, and failures with their reasons.

Entry points for the flows: `parent_run_name`, `video_run_name` (Prefect `flow_run_name`
callables), `VideoOutcome.from_state`, `publish_run_summary`, `publish_batch_table`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State

from story_to_video.textsafe import md
from story_to_video.ui import (
    TITLE_CHARS,
    artifact_key,
    artifact_link,
    flow_run_link,
    key_words,
    media_link,
    run_title,
)

IDEA_CELL_CHARS = 36


def _parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters)


def parent_run_name() -> str:
    """`story-to-video` runs are named after their idea, or `batch <file name>`."""
    params = _parameters()
    if params.get("batch"):
        return f"batch {Path(str(params['batch'])).stem}"
    return run_title(str(params.get("idea") or "story-to-video"))


def video_run_name() -> str:
    """`video` runs: the run name if one was given, else the idea."""
    params = _parameters()
    return run_title(str(params.get("run_name") or params.get("idea") or "video"))


@dataclass
class VideoOutcome:
    """One idea's result, as the summary shows it."""

    idea: str
    state: str  # Completed, Failed, Crashed, ... or Skipped (never run)
    final: str | None = None
    flow_run_id: UUID | None = None
    reason: str = ""
    where: str = ""  # the batch line, if any
    slug: str = ""  # its artifacts' keys end so (a night renders every idea in one run)
    made_by: str = ""  # the workers and GPUs that rendered it (a night over several)

    @classmethod
    def from_state(cls, idea: str, state: State[Any], where: str = "") -> VideoOutcome:
        """From the final state of a `video` subflow called with `return_state=True`."""
        run_id = state.state_details.flow_run_id
        if state.is_completed():
            return cls(idea, state.name or "Completed", str(state.result()), run_id,
                       where=where)
        err = state.result(raise_on_failure=False)
        reason = (f"{type(err).__name__}: {err}" if isinstance(err, BaseException)
                  else state.message or "")
        return cls(idea, state.name or state.type.value.title(), None, run_id, reason, where)


def _video_cell(o: VideoOutcome, media_url: str) -> str:
    """The final video's link and its length, read from its manifest."""
    if not o.final:
        return ""
    final = Path(o.final)
    link = f"[final.mp4]({media_link(media_url, final.parent, final.name)})"
    try:
        manifest = json.loads((final.parent / "manifest.json").read_text(encoding="utf-8"))
        return f"{link} {manifest['final']['seconds']:.1f} s"
    except (OSError, ValueError, KeyError):
        return link


def _artifacts_of(flow_run_id: UUID | None, slug: str = "") -> dict[str, UUID]:
    """The latest artifact of each kind (report, vram, ...) a video run created (of one
    idea's, when a run made several)."""
    if flow_run_id is None:
        return {}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    kinds: dict[str, UUID] = {}
    for a in sorted(found, key=lambda a: a.created or 0):
        if a.key and (not slug or a.key.endswith(f"-{slug}")):
            kinds[a.key.split("-", 1)[0]] = a.id
    return kinds


def _label(o: VideoOutcome, limit: int = TITLE_CHARS) -> str:
    """`line 3: an idea`, either part left out when unknown."""
    title = run_title(o.idea, max(limit - len(o.where) - 2, 12))
    return ": ".join(p for p in (o.where, _cell(title)) if p) or "-"


def _cell(text: str) -> str:
    """Table-safe text: one line, no column break, link, image or HTML (reasons can quote
    LLM output)."""
    return md(text)


def summary_markdown(title: str, outcomes: list[VideoOutcome], media_url: str) -> str:
    done = [o for o in outcomes if o.final]
    failed = [o for o in outcomes if not o.final and o.state != "Skipped"]
    skipped = [o for o in outcomes if o.state == "Skipped"]
    lines = [f"# {md(title)}", "",
             f"{len(done)} made, {len(failed)} failed, {len(skipped)} skipped. Videos open "
             f"through `story-to-video serve` at {media_url}; paths on disk are below.", "",
             # The UI never wraps a table cell: short cells keep the table within the page.
             "| idea | state | video | open |", "|---|---|---|---|"]
    makers = any(o.made_by for o in outcomes)
    if makers:
        lines[-2:] = ["| idea | state | video | made by | open |", "|---|---|---|---|---|"]
    for o in outcomes:
        arts = _artifacts_of(o.flow_run_id, o.slug)
        links = [f"[run]({flow_run_link(o.flow_run_id)})"] if o.flow_run_id else []
        links += [f"[{kind}]({artifact_link(arts[kind])})" for kind in ("report", "vram")
                  if kind in arts]
        made = f" {_cell(o.made_by)} |" if makers else ""
        lines.append(f"| {_label(o, IDEA_CELL_CHARS)} | {o.state} | {_video_cell(o, media_url)}"
                     f" |{made} {' · '.join(links)} |")
    if failed or skipped:
        lines += ["", "## Not made", ""]
        lines += [f"- {_label(o)}: **{o.state}**: {_cell(o.reason)}" for o in failed + skipped]
    if done:
        lines += ["", "## On disk", ""]
        lines += [f"- `{o.final}`" for o in done]
    return "\n".join(lines) + "\n"


def _publish(key: str, markdown: str, description: str, outcomes: list[VideoOutcome],
             media_url: str) -> None:
    """The artifact, and the same links in the run's log: the tab a user lands on."""
    from prefect import get_run_logger

    run_log = get_run_logger()
    try:
        art = create_markdown_artifact(markdown, key=key, description=description)
        run_log.info("summary: %s", artifact_link(art))
    except Exception as err:  # the summary must never turn a finished night into a failure
        run_log.warning("could not publish the summary artifact %s: %s", key, err)
    for o in outcomes:
        run = f"; video run {flow_run_link(o.flow_run_id)}" if o.flow_run_id else ""
        if o.final:
            play = media_link(media_url, Path(o.final).parent, Path(o.final).name)
            by = f" by {o.made_by}" if o.made_by else ""
            run_log.info("%s: made %s%s (play: %s)%s", _label(o), o.final, by, play, run)
        else:
            run_log.info("%s: %s: %s%s", _label(o), o.state, o.reason, run)


def publish_run_summary(outcome: VideoOutcome, media_url: str) -> None:
    """The parent run's summary of one idea (key `summary-<idea words>`)."""
    _publish(artifact_key("summary", key_words(outcome.idea)),
             summary_markdown(run_title(outcome.idea), [outcome], media_url),
             "what this run made, with links to the video run, report and final.mp4",
             [outcome], media_url)


def publish_batch_table(name: str, outcomes: list[VideoOutcome], media_url: str) -> None:
    """The batch run's table of its ideas and their state (key `batch-<name>`); call it
    again as ideas finish: each call is a new version of the same artifact."""
    _publish(artifact_key("batch", key_words(name)),
             summary_markdown(f"batch {name}", outcomes, media_url),
             f"batch {name}: every idea, its state, links to its run, report and final.mp4",
             outcomes, media_url)
