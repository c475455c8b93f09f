"""`story-to-video serve`: the run folders over HTTP, so the videos linked from the Prefect UI
open in the browser. Prefect's UI cannot serve files and Markdown cannot embed videos; this
server outlives the runs (start it beside `prefect server start`). Range requests (seeking)
come with Starlette's FileResponse; a folder moved or deleted after its run answers with a
page saying so."""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

SHOWN = (".mp4", ".png", ".md", ".json", ".srt", ".log")


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>{escape(title)}</title>"
                        f"<body style='font-family:sans-serif'><h2>{escape(title)}</h2>"
                        f"{body}</body>", status_code=status)


def _visible(path: Path) -> bool:
    return not any(part.startswith(".") for part in path.parts)


def media_app(roots: list[Path]) -> Starlette:
    """Serve `<root>/<run folder>/<file>` as `/<run folder>/<file>` for each root, read-only."""
    roots = [r.resolve() for r in roots]

    def find_run(name: str) -> Path | None:
        for root in roots:
            folder = (root / name).resolve()
            if folder.parent == root and folder.is_dir() and _visible(Path(name)):
                return folder
        return None

    def missing_run(name: str) -> HTMLResponse:
        where = ", ".join(str(r) for r in roots)
        return _page("Run folder not found", (
            f"<p>The run folder <code>{escape(name)}</code> is not in <code>{escape(where)}"
            "</code>: it was moved or deleted after the run, or this server serves another "
            "folder.</p><p>Serve the folder that holds it: <code>story-to-video serve --dir "
            "&lt;that folder&gt;</code>. The report shows where the run was written.</p>"),
            status=404)

    async def index(request: Request) -> Response:
        items = [f"<li><a href='/{quote(p.name)}/'>{escape(p.name)}</a></li>"
                 for root in roots if root.is_dir()
                 for p in sorted(root.iterdir()) if p.is_dir() and _visible(Path(p.name))]
        return _page("story-to-video runs", "<ul>" + "".join(items) + "</ul>")

    async def run_file(request: Request) -> Response:
        name, rel = request.path_params["run"], request.path_params.get("path", "")
        folder = find_run(name)
        if folder is None:
            return missing_run(name)
        target = (folder / rel).resolve()
        if not rel or target.is_dir():
            files = sorted(p.relative_to(folder) for p in folder.rglob("*")
                           if p.is_file() and p.suffix in SHOWN
                           and _visible(p.relative_to(folder)))
            items = "".join(f"<li><a href='/{quote(name)}/{quote(str(f))}'>{escape(str(f))}"
                            "</a></li>" for f in files)
            return _page(str(folder), f"<ul>{items}</ul>")
        if folder not in target.parents or not _visible(target.relative_to(folder)) \
                or not target.is_file():
            return _page("File not found", (
                f"<p><code>{escape(rel)}</code> is not in <code>{escape(str(folder))}</code>"
                ": deleted, or the run did not get that far.</p>"), status=404)
        return FileResponse(target)

    return Starlette(routes=[
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/{run}", run_file, methods=["GET", "HEAD"]),
        Route("/{run}/{path:path}", run_file, methods=["GET", "HEAD"]),
    ])


def serve(roots: list[Path], host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(media_app(roots), host=host, port=port, log_level="warning")
