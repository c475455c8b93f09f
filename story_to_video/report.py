"""The morning report: report.md (+ contact sheet and VRAM plot) in the run folder, and the
same as Prefect artifacts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path, write_text_atomic
from .engines.video_io import read_frame
from .models import ShotPlan
from .textsafe import md, md_block

log = logging.getLogger(__name__)


def contact_sheet(clips: list[tuple[str, Path, int]], out: Path, thumb_w: int = 240) -> Path:
    """One middle frame per shot, in plan order, labelled with the shot id."""
    thumbs = []
    for shot_id, path, frames in clips:
        img = Image.fromarray(read_frame(path, frames // 2))
        img.thumbnail((thumb_w, thumb_w))
        draw = ImageDraw.Draw(img)  # label bottom-right, clear of the clip's own text
        font = ImageFont.load_default(size=14)
        x0, y0, x1, y1 = draw.textbbox((0, 0), shot_id, font=font)
        x, y = img.width - (x1 - x0) - 6, img.height - (y1 - y0) - 12
        draw.rectangle((x - 3, y - 2, img.width, img.height), fill=(0, 0, 0))
        draw.text((x, y - y0), shot_id, fill=(255, 255, 0), font=font)
        thumbs.append(img)
    cols = min(4, len(thumbs))
    rows = -(-len(thumbs) // cols)
    tw, th = thumbs[0].size
    sheet = Image.new("RGB", (cols * tw, rows * th), (20, 20, 20))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * tw, (i // cols) * th))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def vram_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        vram = (r.get("details") or {}).get("vram") or {}
        rows.append({
            "shot": r["shot_id"],
            "seconds": r.get("seconds"),
            "stage_seconds": (r.get("details") or {}).get("stage_seconds", {}),
            "predicted_peak_gib": vram.get("predicted_peak_gib"),
            "measured_peak_gib": vram.get("measured_peak_gib"),
            "min_free_gib": vram.get("min_free_gib"),
            "actions": ", ".join(a["action"] for a in vram.get("actions", [])) or "-",
            "cached": r.get("cached", False),
            "resumed": r.get("resumed", False),
        })
    return rows


def render_markdown(plan: ShotPlan, records: list[dict[str, Any]], *, final: str,
                    sheet: str | None, plot: str | None, run_info: dict[str, Any]) -> str:
    # LLM text (and the idea, the server's model name) is escaped: shown, never rendered.
    lines = [f"# {md(plan.idea)}", ""]
    if run_info.get("preview"):
        lines += ["> PREVIEW run: animatic clips from the preview engine, not generations.",
                  ""]
    lines += [f"- final video: [{final}]({final})",
              f"- engine: {run_info.get('engine')}; LLM: {md(str(run_info.get('llm')))}; prompts "
              f"{plan.prompt_version}",
              f"- {len(plan.scenes)} scenes, {len(plan.shots)} shots, {plan.duration_s:.1f}s "
              f"(target {plan.target_seconds:.1f}s)", ""]
    if sheet:
        lines += ["## Contact sheet", "", f"![contact sheet]({sheet})", ""]
    lines += ["## Story", "", md_block(plan.story), "", "## Bible", "",
              f"- style: {md(plan.bible.style)}", f"- palette: {md(plan.bible.palette)}"]
    lines += [f"- {md(c.name)}: {md(c.look)}; wears {md(c.wardrobe)}"
              for c in plan.bible.characters]
    lines += ["", "## Shots", "", "| shot | clip | frames | fps | camera | seconds | note |",
              "|---|---|---|---|---|---|---|"]
    by_id = {r["shot_id"]: r for r in records}
    for s in plan.shots:
        r = by_id.get(s.id, {})
        note = "cached" if r.get("cached") else "resumed" if r.get("resumed") else ""
        clip = r.get("clip", "")
        lines.append(f"| {s.id} | [{clip}](clips/{clip}) | {s.frames} | {s.fps} | {s.camera}"
                     f" | {r.get('seconds', '')} | {note} |")
    rows = vram_rows(records)
    if any(row["predicted_peak_gib"] is not None for row in rows):
        lines += ["", "## VRAM", "",
                  "| shot | predicted peak GiB | measured peak GiB | min free GiB | actions |"
                  " seconds per stage |", "|---|---|---|---|---|---|"]
        for row in rows:
            stages = ", ".join(f"{k} {v}s" for k, v in row["stage_seconds"].items())
            lines.append(f"| {row['shot']} | {row['predicted_peak_gib']} | "
                         f"{row['measured_peak_gib']} | {row['min_free_gib']} | "
                         f"{row['actions']} | {stages} |")
    if plot:
        lines += ["", f"![VRAM timeline]({plot})"]
    lines += ["", "## Prompts", ""]
    lines += [f"- **{s.id}**: {md(s.prompt)}" for s in plan.shots]
    return "\n".join(lines) + "\n"


def write_report(root: Path, plan: ShotPlan, records: list[dict[str, Any]],
                 run_info: dict[str, Any], plot: Path | None) -> Path:
    clips = [(r["shot_id"], root / "clips" / r["clip"], int(r["frames"])) for r in records]
    sheet = contact_sheet(clips, root / "contact-sheet.png") if clips else None
    text = render_markdown(plan, records, final="final.mp4",
                           sheet=sheet.name if sheet else None,
                           plot=plot.name if plot else None, run_info=run_info)
    out = root / "report.md"
    write_text_atomic(out, text)
    _artifacts(text, rows=vram_rows(records), key=root.name)
    return out


def _artifacts(markdown: str, rows: list[dict[str, Any]], key: str) -> None:
    """The same report in the Prefect UI (only inside a flow or task run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    slug = "".join(ch if ch.isalnum() else "-" for ch in key.lower())[:60]
    create_markdown_artifact(markdown, key=f"report-{slug}", description="run report")
    table = [{k: (str(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(table, key=f"vram-{slug}", description="per shot: predicted vs "
                          "measured VRAM peak, minimum free, actions, seconds per stage")
