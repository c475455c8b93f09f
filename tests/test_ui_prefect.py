"""What the Prefect API holds after real runs (temporary Prefect server, fake ComfyUI, broker
in no-GPU mode): run names, summary and batch tables, artifact keys stable across resumes,
the report of a run that stopped with no shot finished, broker lines in their tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, FlowRun

from flows.pipeline import story_to_video
from story_to_video.engines.comfyui.errors import GpuOutOfMemory
from story_to_video.llm.embedded import free_port
from story_to_video.ui import key_words
from tests.fake_comfyui import FakeComfyUI
from tests.test_flow_comfyui import seed_plan

pytestmark = pytest.mark.slow


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> Iterator[FakeComfyUI]:
    server = FakeComfyUI().start()
    server.faults.step_delay_s = 0.0
    monkeypatch.setenv("STV_COMFYUI__URL", server.url)
    monkeypatch.setenv("STV_COMFYUI__WORKFLOW", "wan22_14b_t2v")
    monkeypatch.setenv("STV_UI__MEDIA_URL", "http://media-box:4300")
    yield server
    server.stop()


@pytest.fixture()
def client() -> Iterator[SyncPrefectClient]:
    with get_client(sync_client=True) as c:
        yield c


def by_key(client: SyncPrefectClient, key: str) -> list[Artifact]:
    return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
        any_=[key])))


def parent_of(client: SyncPrefectClient, key: str) -> FlowRun:
    """The run that created the newest artifact with this key."""
    art = max(by_key(client, key), key=lambda a: a.created or 0)
    assert art.flow_run_id is not None
    return client.read_flow_run(art.flow_run_id)


def logs_by_task(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, list[str]]:
    """Log messages of a flow run, by task run name ('' for the flow's own lines)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    tasks = {t.id: t.name for t in client.read_task_runs(task_run_filter=TaskRunFilter(
        flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))}
    out: dict[str, list[str]] = {}
    for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id]))):
        out.setdefault(tasks.get(log.task_run_id, "") if log.task_run_id else "",
                       []).append(log.message)
    return out


def test_parent_summary_keys_and_broker_lines(fake: FakeComfyUI, tmp_path: Path,
                                              client: SyncPrefectClient) -> None:
    idea = "a heron counts the tide"
    folder = seed_plan(tmp_path, idea)
    kw: dict[str, Any] = {"idea": idea, "scenes": 2, "target_seconds": 10,
                          "engine": "comfyui", "output_dir": str(tmp_path)}
    story_to_video(**kw)
    story_to_video(**kw)  # a resume: same keys, a new version of each artifact
    slug = f"{key_words(idea)}-{folder.spec.key}"
    for kind in ("report", "vram", "progress"):
        assert len(by_key(client, f"{kind}-{slug}")) == 2, kind
    summaries = by_key(client, "summary-a-heron-counts-the-tide")
    assert len(summaries) == 2
    parent = parent_of(client, "summary-a-heron-counts-the-tide")
    assert parent.name == idea and parent.parent_task_run_id is None
    text = str(summaries[0].data)
    assert "1 made, 0 failed, 0 skipped" in text
    assert f"[final.mp4](http://media-box:4300/{folder.root.name}/final.mp4)" in text
    assert "/runs/flow-run/" in text and "/artifacts/artifact/" in text
    assert f"`{folder.root / 'final.mp4'}`" in text  # the path on disk too

    first = min(by_key(client, f"report-{slug}"), key=lambda a: a.created or 0)
    video = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
        any_=[first.flow_run_id])))[0]  # the first run rendered; the resume had nothing to do
    assert video.name == idea
    logs = logs_by_task(client, video.id)
    for shot in ("s01_sh01", "s02_sh01"):
        lines = [m for m in logs[f"render-{shot}"] if m.startswith("broker ")]
        assert any(f"broker experts [{shot}]: one-prompt (need " in m
                   and " GiB, free " in m for m in lines), lines
        assert any(m.startswith(f"broker decode [{shot}]") for m in lines), lines
    assert any(m.startswith("broker llm: none") for m in logs["place-llm"])
    # no broker decision is left at the flow level, away from its task
    assert not [m for m in logs[""] if m.startswith("broker ")], logs[""]
    parent_logs = logs_by_task(client, parent.id)[""]
    assert any(m.startswith(f"{idea}: made {folder.root / 'final.mp4'} (play: "
                            f"http://media-box:4300/") for m in parent_logs), parent_logs


def test_run_with_no_finished_shot_reports_why(fake: FakeComfyUI, tmp_path: Path,
                                               client: SyncPrefectClient) -> None:
    idea = "a moth circles a lamp"
    folder = seed_plan(tmp_path, idea)
    fake.faults.oom_at = "KSamplerAdvanced"  # every shot runs out of memory, even leaner
    with pytest.raises(GpuOutOfMemory):
        story_to_video(idea=idea, scenes=2, target_seconds=10, engine="comfyui",
                       output_dir=str(tmp_path))
    report = (folder.root / "report.md").read_text()
    assert "**Not finished**: 0 of 2 shots done. GpuOutOfMemory" in report
    assert "No shot finished, so there is no contact sheet yet." in report
    art = by_key(client, f"report-{key_words(idea)}-{folder.spec.key}")
    assert len(art) == 1 and "0 of 2 shots done" in str(art[0].data)
    summary = str(by_key(client, "summary-a-moth-circles-a-lamp")[0].data)
    assert "0 made, 1 failed" in summary and "| Failed |" in summary
    assert "**Failed**: GpuOutOfMemory" in summary


def test_batch_run_shows_a_table_of_its_ideas(fake: FakeComfyUI, tmp_path: Path,
                                             client: SyncPrefectClient) -> None:
    seed_plan(tmp_path, "a crab guards a shell")
    file = tmp_path / "night one.jsonl"
    file.write_text('{"idea": "a crab guards a shell", "scenes": 2, "target_seconds": 10}\n'
                    'not json\n'
                    '{"idea": "a crab guards a shell", "scenes": 2, "target_seconds": 10}\n'
                    '{"idea": "a fox with no plan yet"}\n')
    dead = f"http://127.0.0.1:{free_port()}/v1"
    story_to_video(batch=str(file), engine="comfyui", output_dir=str(tmp_path),
                   llm={"backend": "lmstudio", "base_url": dead, "connect_retries": 0})
    table = by_key(client, "batch-night-one")
    assert len(table) == 1
    assert parent_of(client, "batch-night-one").name == "batch night one"
    text = str(table[0].data)
    assert "1 made, 1 failed, 2 skipped" in text
    rows = [line for line in text.splitlines() if line.startswith("| line ")]
    assert [r.split(" | ")[1] for r in rows] == ["Skipped", "Completed", "Skipped", "Failed"]
    assert "[run](" in rows[1] and "[final.mp4](http://media-box:4300/" in rows[1]
    assert "[report](" in rows[1] and "[vram](" in rows[1]
    assert "[run](" in rows[3] and "final.mp4" not in rows[3]
    assert "line 3: a crab guards a shell: **Skipped**: duplicate of line 1" in text
    assert "line 4: a fox with no plan yet: **Failed**: LLMNotReachable: " in text
    assert "- line 2: **Skipped**: not JSON" in text
