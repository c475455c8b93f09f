"""The morning report: report.md (+ contact sheet and VRAM plot) in the run folder, and the
same as Prefect artifacts.

report.md on disk links its files by relative path (it sits beside them). The Prefect UI
cannot serve files, so its copy carries the images inline (data: URIs) and links the videos
to `story-to-video serve` (see serve.py); paths on disk are shown in both.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path, write_text_atomic
from .engines.video_io import read_frame
from .models import ShotPlan
from .run import InputError, inside
from .textsafe import code, md, md_block
from .ui import artifact_key, media_link

log = logging.getLogger(__name__)

INLINE_MAX_WIDTH = 1200  # px: wider images are scaled down for the UI copy


def _label(img: Image.Image, text: str, colour: tuple[int, int, int]) -> None:
    draw = ImageDraw.Draw(img)  # label bottom-right, clear of the clip's own text
    font = ImageFont.load_default(size=14)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x, y = img.width - (x1 - x0) - 6, img.height - (y1 - y0) - 12
    draw.rectangle((x - 3, y - 2, img.width, img.height), fill=(0, 0, 0))
    draw.text((x, y - y0), text, fill=colour, font=font)


def contact_sheet(clips: list[tuple[str, Path, int]], out: Path, thumb_w: int = 240,
                  starts: dict[str, Path] | None = None) -> Path:
    """One middle frame per shot, in plan order, labelled with the shot id; with start
    images, each shot's start image beside its frame, so continuity shows at a glance."""
    starts = {k: v for k, v in (starts or {}).items() if v.is_file()}
    thumbs = []
    for shot_id, path, frames in clips:
        img = Image.fromarray(read_frame(path, frames // 2))
        img.thumbnail((thumb_w, thumb_w))
        _label(img, shot_id, (255, 255, 0))
        if starts:
            cell = Image.new("RGB", (img.width * 2 + 4, img.height), (20, 20, 20))
            if shot_id in starts:
                with Image.open(starts[shot_id]) as src:
                    first = src.convert("RGB").resize(img.size)
                _label(first, f"{shot_id} start", (120, 220, 255))
                cell.paste(first, (0, 0))
            cell.paste(img, (img.width + 4, 0))
            img = cell
        thumbs.append(img)
    cols = min(2 if starts else 4, len(thumbs))
    rows = -(-len(thumbs) // cols)
    tw, th = thumbs[0].size
    sheet = Image.new("RGB", (cols * tw, rows * th), (20, 20, 20))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * tw, (i // cols) * th))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


# -- how the report points at files --------------------------------------------------------
class DiskLinks:
    """report.md in the run folder: everything relative to it."""

    def image(self, path: Path) -> str:
        return path.name

    def file(self, rel: str) -> str:
        return rel


@dataclass(frozen=True)
class UILinks:
    """The Prefect UI copy: images inline, videos through the media server."""

    media_url: str
    root: Path

    def image(self, path: Path) -> str:
        return inline_image(path)

    def file(self, rel: str) -> str:
        return media_link(self.media_url, self.root, rel)


Links = DiskLinks | UILinks


def inline_image(path: Path) -> str:
    """A data: URI of the image for the UI copy: scaled to INLINE_MAX_WIDTH at most, as PNG
    or JPEG (quality 85), whichever is smaller: frames of real clips are photographs (JPEG
    is several times smaller), plots are line art (PNG is)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width > INLINE_MAX_WIDTH:
            img.thumbnail((INLINE_MAX_WIDTH, INLINE_MAX_WIDTH * 4))
        encoded = []
        for fmt, options in (("PNG", {"optimize": True}), ("JPEG", {"quality": 85})):
            buf = io.BytesIO()
            img.save(buf, format=fmt, **options)
            encoded.append((len(buf.getvalue()), fmt.lower(), buf.getvalue()))
    _size, kind, data = min(encoded)
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


# -- tables ---------------------------------------------------------------------------------
def _num(v: Any) -> str:
    """A cell: blank when there is no value (never '{}', 'None' or '-')."""
    if v is None or v == "" or v == {} or v == []:
        return ""
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _actions(vram: dict[str, Any], sep: str) -> str:
    """The broker's actions for a shot, each once, in order."""
    seen: list[str] = []
    for a in vram.get("actions", []):
        if a["action"] not in seen:
            seen.append(a["action"])
    return sep.join(seen)


def vram_rows(records: list[dict[str, Any]], sep: str = ", ") -> list[dict[str, str]]:
    """One compact row per shot for the VRAM table; the seconds per stage are in report.md.
    The UI's table cells never wrap: there the actions go one per line (sep a Markdown line
    break) to keep the table within the page."""
    rows = []
    for r in records:
        vram = (r.get("details") or {}).get("vram") or {}
        unmeasured = "not measured" if vram.get("predicted_peak_gib") is not None else ""
        rows.append({
            "shot": r["shot_id"],
            "predicted peak GiB": _num(vram.get("predicted_peak_gib")),
            "measured peak GiB": _num(vram.get("measured_peak_gib")) or unmeasured,
            "min free GiB": _num(vram.get("min_free_gib")) or unmeasured,
            "broker actions": _actions(vram, sep),
            "render s": _num(r.get("seconds")),
        })
    return rows


def _stage_seconds(record: dict[str, Any]) -> str:
    stages = (record.get("details") or {}).get("stage_seconds") or {}
    return ", ".join(f"{k} {v}s" for k, v in stages.items())


def has_vram(records: list[dict[str, Any]]) -> bool:
    return any(((r.get("details") or {}).get("vram") or {}).get("predicted_peak_gib")
               is not None for r in records)


# -- report.md ------------------------------------------------------------------------------
def render_markdown(plan: ShotPlan, records: list[dict[str, Any]], *, root: Path,
                    links: Links, sheet: Path | None, plot: Path | None,
                    run_info: dict[str, Any], failure: str | None = None) -> str:
    """The report; `failure` set when the run stopped before every shot was finished."""
    # LLM text (and the idea, the server's model name) is escaped: shown, never rendered.
    lines = [f"# {md(plan.idea)}", ""]
    if run_info.get("preview"):
        lines += ["> PREVIEW run: animatic clips from the preview engine, not generations.",
                  ""]
    if failure:
        lines += [f"> **Not finished**: {len(records)} of {len(plan.shots)} shots done. "
                  f"{md(failure)}", "> Re-run the same idea to resume: finished shots are kept.",
                  ""]
    lines += _overview(plan, root, links, run_info, final_done=failure is None)
    lines += ["## Contact sheet", ""]
    lines += [f"![contact sheet]({links.image(sheet)})" if sheet else
              "No shot finished, so there is no contact sheet yet.", ""]
    lines += ["## Story", "", md_block(plan.story), "", "## Bible", "",
              f"- style: {md(plan.bible.style)}", f"- palette: {md(plan.bible.palette)}"]
    lines += [f"- {md(c.name)}: {md(c.look)}; wears {md(c.wardrobe)}"
              for c in plan.bible.characters]
    lines += ["", *_shot_table(plan, records, links)]
    lines += ["", *_vram_section(records, plot, links, run_info)]
    lines += ["", "## Prompts", ""]
    lines += [f"- **{s.id}**: {md(s.prompt)}" for s in plan.shots]
    return "\n".join(lines) + "\n"


def _overview(plan: ShotPlan, root: Path, links: Links, run_info: dict[str, Any],
              final_done: bool) -> list[str]:
    lines = []
    if final_done:
        lines.append(f"- final video: [final.mp4]({links.file('final.mp4')}) "
                     f"(on disk: `{root / 'final.mp4'}`)")
    lines.append(f"- run folder: `{root}`")
    if isinstance(links, UILinks):
        lines.append(f"- videos open through `story-to-video serve` at {links.media_url}")
    # The LLM's description may hold a URL of a server that is gone by morning: no link.
    lines += [f"- engine: {run_info.get('engine')}; LLM: {code(str(run_info.get('llm')))}; prompts "
              f"{plan.prompt_version}",
              f"- {len(plan.scenes)} scenes, {len(plan.shots)} shots, {plan.duration_s:.1f}s "
              f"(target {plan.target_seconds:.1f}s)", ""]
    return lines


def _shot_table(plan: ShotPlan, records: list[dict[str, Any]], links: Links) -> list[str]:
    lines = ["## Shots", "",
             "| shot | clip | clip length s | frames | fps | camera | render time s | note |",
             "|---|---|---|---|---|---|---|---|"]
    by_id = {r["shot_id"]: r for r in records}
    for s in plan.shots:
        r = by_id.get(s.id)
        if r is None:
            lines.append(f"| {s.id} | not rendered | {s.duration_s:.2f} | {s.frames} | "
                         f"{s.fps} | {s.camera} |  | not finished |")
            continue
        note = "cached" if r.get("cached") else "resumed" if r.get("resumed") else ""
        clip = r["clip"]
        lines.append(f"| {s.id} | [{clip}]({links.file(f'clips/{clip}')}) | "
                     f"{s.duration_s:.2f} | {s.frames} | {s.fps} | {s.camera} | "
                     f"{_num(r.get('seconds'))} | {note} |")
    return lines


def _vram_section(records: list[dict[str, Any]], plot: Path | None, links: Links,
                  run_info: dict[str, Any]) -> list[str]:
    lines = ["## VRAM", ""]
    if has_vram(records):
        # Numbers in the table; the long texts in a list below it, where they wrap (the
        # UI never wraps a table cell).
        rows = vram_rows(records)
        cols = [c for c in rows[0] if c != "broker actions"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(row[c] for c in cols) + " |" for row in rows]
        lines += ["", "Broker actions and seconds per stage:", ""]
        lines += [f"- {row['shot']}: {row['broker actions'] or 'none'}; "
                  f"{_stage_seconds(r) or 'no stage timings'}"
                  for row, r in zip(rows, records, strict=True)]
    elif run_info.get("preview"):
        lines.append("Not measured: the preview engine does no GPU work.")
    else:
        lines.append("No broker data for these shots.")
    if plot:
        lines += ["", f"![VRAM timeline]({links.image(plot)})"]
    return lines


def _start_image(root: Path, record: dict[str, Any]) -> Path | None:
    """A record's start image, only where it lies inside the run folder."""
    name = record.get("start_image")
    if not isinstance(name, str) or not name:
        return None
    try:
        return inside(root, name)
    except InputError:
        return None


def write_report(root: Path, plan: ShotPlan, records: list[dict[str, Any]],
                 run_info: dict[str, Any], plot: Path | None, *, media_url: str,
                 slug: str, failure: str | None = None) -> Path:
    """report.md in `root` and, inside a Prefect run, the report and VRAM table artifacts
    (keys `report-<slug>`, `vram-<slug>`)."""
    clips = [(r["shot_id"], root / "clips" / r["clip"], int(r["frames"])) for r in records]
    starts = {r["shot_id"]: p for r in records if (p := _start_image(root, r))}
    sheet = contact_sheet(clips, root / "contact-sheet.png", starts=starts) if clips else None
    common: dict[str, Any] = {"root": root, "sheet": sheet, "plot": plot,
                              "run_info": run_info, "failure": failure}
    out = root / "report.md"
    write_text_atomic(out, render_markdown(plan, records, links=DiskLinks(), **common))
    if _in_prefect_run():
        ui_text = render_markdown(plan, records, links=UILinks(media_url, root), **common)
        _artifacts(ui_text, records, slug, preview=bool(run_info.get("preview")))
    return out


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _artifacts(markdown: str, records: list[dict[str, Any]], slug: str,
               preview: bool) -> None:
    """The report in the Prefect UI, and the VRAM table when there is something in it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown, key=artifact_key("report", slug),
                             description="run report: story, shots, videos, VRAM")
    if has_vram(records):
        create_table_artifact(vram_rows(records, sep="  \n"), key=artifact_key("vram", slug),
                              description="per shot: the broker's predicted VRAM peak, the "
                              "measured peak and minimum free VRAM, its actions, render time"
                              " (seconds per stage: in the report)")
    else:
        log.info("no VRAM table: %s", "the preview engine does no GPU work" if preview
                 else "no broker data for these shots")
