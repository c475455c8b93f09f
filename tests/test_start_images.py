"""Start images: sources per mode, files named by identity, chains in rendering order,
resume and invalidation, the preview engine and the contact sheet, bad user images.

The flows run for real in Prefect with the preview engine (no GPU); the real-ComfyUI side
is in tests/test_keyframes_real.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flows.pipeline import make_video
from resource_broker.policy import plan_keyframe
from resource_broker.schedule import WorkItem, render_order
from story_to_video.engines.preview import PreviewEngine
from story_to_video.engines.video_io import read_frame
from story_to_video.models import Bible, Character, DraftScene, Scene, ShotPlan
from story_to_video.planner import compose_prompt
from story_to_video.report import contact_sheet
from story_to_video.run import RunFolder, RunSpec
from story_to_video.start_images import (
    StartImageError,
    StartImages,
    UserImages,
    keyframe_prompt,
    sources,
)
from tests.real_comfyui import make_shot

BIBLE = Bible(style="cinematic, 35mm", palette="teal and amber",
              characters=[Character(name="Keeper", look="old, grey beard",
                                    wardrobe="yellow coat"),
                          Character(name="Whale", look="huge, scarred", wardrobe="barnacles")])


def plan_of(shots_per_scene: list[int], **kw: Any) -> ShotPlan:
    scenes = [Scene(index=i, title=f"Scene {i + 1}", setting="a stone pier, dusk",
                    shots=[make_shot(i, j, width=128, height=128, characters=["Keeper"], **kw)
                           for j in range(n)]) for i, n in enumerate(shots_per_scene)]
    total = sum(s.frames for sc in scenes for s in sc.shots) / 16
    return ShotPlan(idea="a keeper and a whale", story="The keeper walks.", style="cinematic",
                    target_seconds=round(total, 3), prompt_version="test", bible=BIBLE,
                    scenes=scenes)


def kinds(plan: ShotPlan, mode: str, user: UserImages | None = None) -> list[str]:
    return [f"{src.kind}:{src.after or ''}" for src in sources(plan, mode, user).values()]


def test_sources_per_mode_and_user_images_win() -> None:
    plan = plan_of([2, 1])
    assert kinds(plan, "none") == ["none:", "none:", "none:"]
    assert kinds(plan, "chain") == ["none:", "chain:s01_sh01", "none:"]
    assert kinds(plan, "keyframe") == ["keyframe:", "keyframe:", "keyframe:"]
    assert kinds(plan, "keyframe+chain") == ["keyframe:", "chain:s01_sh01", "keyframe:"]
    # a shot's own image beats a chain; a character image beats a keyframe, not a chain
    user = UserImages(shots={"s01_sh02": "/x.png"}, characters={"keeper": "/k.png"})
    assert kinds(plan, "keyframe+chain", user) == ["character:", "user:", "character:"]
    assert kinds(plan, "none", UserImages(characters={"Keeper": "/k.png"})) == \
        ["character:", "character:", "character:"]


def test_each_character_is_described_once() -> None:
    """A small model lists one character three times: its description appears once."""
    scene = DraftScene(title="Pier", setting="a stone pier, dusk",
                       shots=[{"action": "the keeper waves at the sea", "camera": "static"}])
    text = compose_prompt("the keeper waves", scene, BIBLE,
                          ["Keeper", "keeper", "Keeper", "Whale"], "static")
    assert text.count("Keeper: old, grey beard, wearing yellow coat.") == 1
    assert text.count("Whale: huge, scarred") == 1
    plan = plan_of([1])
    shot = plan.shots[0].model_copy(update={"characters": ["Keeper", "Keeper", "Keeper"]})
    kf = keyframe_prompt(plan, shot)
    assert kf.count("Keeper: old, grey beard, wearing yellow coat.") == 1
    assert "Setting: a stone pier, dusk." in kf and "Style: cinematic, 35mm." in kf
    assert "camera" not in kf.lower()  # a still has no camera move


def seeded(tmp_path: Path, plan: ShotPlan) -> RunFolder:
    spec = RunSpec(idea=plan.idea, scenes=len(plan.scenes), target_seconds=plan.target_seconds,
                   style=plan.style, engine="preview", output_dir=tmp_path / "runs")
    folder = RunFolder(spec)
    folder.prepare()
    folder.save_plan(plan)
    return folder


def run(folder: RunFolder, mode: str, tmp_path: Path) -> dict[str, Any]:
    cfg = tmp_path / "stv.toml"
    cfg.write_text(f'[video]\nstart_images = "{mode}"\n')
    spec = folder.spec
    make_video(idea=spec.idea, scenes=spec.scenes, target_seconds=spec.target_seconds,
               engine="preview", output_dir=str(spec.output_dir), config_file=str(cfg))
    data: dict[str, Any] = json.loads(folder.manifest_path.read_text())
    return data


def by_id(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["shot_id"]: r for r in m["shots"]}


@pytest.mark.slow
def test_chain_starts_from_the_last_frame_resumes_and_invalidates_only_the_chain(
        prefect_harness: None, tmp_path: Path) -> None:
    folder = seeded(tmp_path, plan_of([3, 1]))
    m = by_id(run(folder, "chain", tmp_path))
    assert m["s01_sh01"]["start_image"] is None and m["s02_sh01"]["start_image"] is None
    for prev, nxt in (("s01_sh01", "s01_sh02"), ("s01_sh02", "s01_sh03")):
        start = folder.root / m[nxt]["start_image"]
        assert start.name == f"{nxt.replace('_', '-')}-chain-{m[prev]['key']}.png"
        last = read_frame(folder.clips / m[prev]["clip"], m[prev]["frames"] - 1)
        assert np.array_equal(np.asarray(Image.open(start)), last)  # pixel for pixel
        # the animatic opens on it (frame 0, within H.264's loss)
        first = read_frame(folder.clips / m[nxt]["clip"], 0).astype(int)
        assert np.abs(first - last.astype(int)).mean() < 4
    sheet = Image.open(folder.root / "contact-sheet.png")
    assert sheet.width == 2 * (2 * 128 + 4)  # two shots a row, start image beside each frame

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.clips.glob("*.mp4")}
    again = by_id(run(folder, "chain", tmp_path))
    assert all(r["resumed"] for r in again.values())
    assert {p.name: p.stat().st_mtime_ns for p in folder.clips.glob("*.mp4")} == mtimes

    # a change to s01_sh02 re-renders it and the shot chained after it, nothing else
    plan = folder.load_plan()
    assert plan is not None
    shots = plan.scenes[0].shots
    shots[1] = shots[1].model_copy(update={"seed": 999})
    folder.save_plan(plan)
    changed = by_id(run(folder, "chain", tmp_path))
    fresh = sorted(k for k, r in changed.items() if not r["resumed"])
    assert fresh == ["s01_sh02", "s01_sh03"]
    assert changed["s01_sh01"]["key"] == m["s01_sh01"]["key"]


@pytest.mark.slow
def test_keyframes_render_first_once_and_a_changed_keyframe_redoes_only_its_chain(
        prefect_harness: None, tmp_path: Path) -> None:
    folder = seeded(tmp_path, plan_of([2, 2]))
    m = by_id(run(folder, "keyframe+chain", tmp_path))
    kfs = sorted(p.name for p in (folder.root / "keyframes").glob("*-kf-*.png"))
    assert [k.split("-kf-")[0] for k in kfs] == ["s01-sh01", "s02-sh01"]
    assert m["s01_sh01"]["start_image"] == f"keyframes/{kfs[0]}"
    assert m["s01_sh02"]["start_image"].startswith("keyframes/s01-sh02-chain-")
    record = json.loads((folder.root / "keyframes" / kfs[0]).with_suffix(".json").read_text())
    assert "Keeper: old, grey beard, wearing yellow coat." in record["prompt"]
    kf_mtimes = {p: p.stat().st_mtime_ns for p in (folder.root / "keyframes").glob("*")}

    # scene 2's first shot changes its action: its keyframe and its chain, nothing else
    plan = folder.load_plan()
    assert plan is not None
    sh = plan.scenes[1].shots
    sh[0] = sh[0].model_copy(update={"action": "the keeper climbs the lighthouse stairs"})
    folder.save_plan(plan)
    again = by_id(run(folder, "keyframe+chain", tmp_path))
    assert sorted(k for k, r in again.items() if not r["resumed"]) == ["s02_sh01", "s02_sh02"]
    after = {p: p.stat().st_mtime_ns for p in (folder.root / "keyframes").glob("*")}
    assert {p: t for p, t in after.items() if p in kf_mtimes} == kf_mtimes  # none redone
    assert len(list((folder.root / "keyframes").glob("s02-sh01-kf-*.png"))) == 2


def test_user_images_scaled_and_cropped_or_refused_with_the_file_named(
        tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = (250, 10, 10)  # the red middle third survives the centre crop
    Image.fromarray(img).save(wide)
    plan = plan_of([1])
    plan.scenes[0].shots[0] = plan.shots[0].model_copy(update={"start_image": str(wide)})
    folder = seeded(tmp_path, plan)
    starts = StartImages(plan, folder, "none", PreviewEngine().fingerprint)
    shot = starts.prepared(plan.shots[0])
    assert shot is not None and shot.start_image is not None
    out = np.asarray(Image.open(shot.start_image))
    assert out.shape == (128, 128, 3) and out[:, :, 0].mean() > 200  # cropped, not squeezed
    assert Path(shot.start_image).name.startswith("s01-sh01-user-")

    for bad, why in ((tmp_path / "missing.png", "does not exist"),
                     (tmp_path / "garbage.png", "is not a readable image")):
        if "garbage" in bad.name:
            bad.write_bytes(b"\x89PNG not really")
        plan.scenes[0].shots[0] = plan.shots[0].model_copy(update={"start_image": str(bad)})
        with pytest.raises(StartImageError, match=f"shot s01_sh01: start image {bad} {why}"):
            StartImages(plan, folder, "none", PreviewEngine().fingerprint).check()


def test_a_chain_whose_previous_clip_is_missing_says_so(tmp_path: Path) -> None:
    plan = plan_of([2])
    folder = seeded(tmp_path, plan)
    starts = StartImages(plan, folder, "chain", PreviewEngine().fingerprint)
    assert starts.prepared(plan.shots[1]) is None  # waits
    with pytest.raises(StartImageError, match="shot s01_sh02 starts from the last frame of "
                       "s01_sh01, which has no finished clip"):
        starts.prepared(plan.shots[1], strict=True)


def test_chained_shots_render_after_their_chain_in_pass_major_layers() -> None:
    items = [WorkItem(0, "s01_sh01", 9, 64, 64), WorkItem(0, "s01_sh02", 9, 64, 64,
                                                          ("s01_sh01",)),
             WorkItem(0, "s02_sh01", 9, 64, 64), WorkItem(1, "s01_sh01", 9, 64, 64),
             WorkItem(1, "s01_sh02", 9, 64, 64, ("s01_sh01",))]
    groups = render_order(items, pass_major=True, seconds=lambda g: 1.0)
    assert [[it.key for it in g.items] for g in groups] == [
        ["0/s01_sh01", "0/s02_sh01", "1/s01_sh01"], ["0/s01_sh02", "1/s01_sh02"]]


def test_broker_orders_keyframes_first_and_unloads_only_when_both_do_not_fit() -> None:
    tight = plan_keyframe(28.0, 20.0, budget_gib=32, margin_gib=1, keyframes=3, clips=6,
                          shared_models=False)
    assert tight.action == "keyframes-first-unload-after" and tight.params["unload_after"]
    assert tight.params["model_loads"] == {"keyframes_first": 2, "interleaved": 6}
    roomy = plan_keyframe(8.0, 20.0, budget_gib=80, margin_gib=1, keyframes=3, clips=6,
                          shared_models=False)
    assert roomy.action == "keyframes-first-keep-loaded" and not roomy.params["unload_after"]
    shared = plan_keyframe(28.0, 28.0, budget_gib=32, margin_gib=1, keyframes=3, clips=6,
                           shared_models=True)
    assert not shared.params["unload_after"] and "model files" in shared.reason
    dyn = plan_keyframe(28.0, 20.0, budget_gib=32, margin_gib=1, keyframes=3, clips=6,
                        shared_models=False, memory_mode="dynamic")
    assert not dyn.params["unload_after"]


def test_contact_sheet_puts_the_start_image_beside_the_clip_frame(tmp_path: Path) -> None:
    from story_to_video.engines.preview import render_preview_frames
    from story_to_video.engines.video_io import write_frames

    shot = make_shot(0, 0, width=128, height=128)
    clip = tmp_path / "c.mp4"
    write_frames(render_preview_frames(shot, "S"), 16, clip)
    start = tmp_path / "start.png"
    Image.new("RGB", (128, 128), (0, 200, 0)).save(start)
    out = contact_sheet([("s01_sh01", clip, 9), ("s01_sh02", clip, 9)],
                        tmp_path / "sheet.png", starts={"s01_sh01": start})
    sheet = np.asarray(Image.open(out)).astype(int)
    assert sheet.shape[1] == 2 * (2 * 128 + 4)
    left = sheet[10:60, 10:100]
    assert left[..., 1].mean() > 180 and left[..., 0].mean() < 40  # the green start image
    assert sheet[10:60, 2 * 128 + 4 + 10:2 * 128 + 4 + 100, 1].mean() < 180  # empty slot


def test_keyframe_workflow_must_save_an_image(tmp_path: Path) -> None:
    import workflows
    from story_to_video.engines.comfyui import WorkflowError
    from story_to_video.engines.comfyui.engine import load_keyframe_workflow

    with pytest.raises(WorkflowError, match='must say output = "image" and name its image '
                       r"output node \(e.g. SaveImage\)"):
        load_keyframe_workflow(workflows.binding_path("wan22_14b_t2v"))
    src = workflows.binding_path("wan22_14b_t2v_keyframe")
    wf = json.loads((src.parent / "wan22_14b_t2v_keyframe.json").read_text())
    wf["80"] = {"class_type": "SaveVideo", "inputs": {"video": ["87", 0],
                                                      "filename_prefix": "x"}}
    (tmp_path / "kf.json").write_text(json.dumps(wf))
    binding = tmp_path / "kf.binding.toml"
    binding.write_text(src.read_text().replace("wan22_14b_t2v_keyframe.json", "kf.json"))
    with pytest.raises(WorkflowError, match="nodes.output 80 is SaveVideo, which saves a video"):
        load_keyframe_workflow(binding)


def test_ti2v_cuts_its_load_image_for_a_shot_without_start_image(tmp_path: Path) -> None:
    import workflows
    from story_to_video.engines.comfyui import (
        AttachedComfyUI,
        BoundWorkflow,
        ComfyUIClient,
        ComfyUIEngine,
    )

    url = "http://127.0.0.1:9"
    engine = ComfyUIEngine(ComfyUIClient(url),
                           BoundWorkflow.load(workflows.binding_path("wan22_ti2v_5b")),
                           AttachedComfyUI(url))
    engine.check_shots([make_shot(0, 0)])  # optional: no refusal
    prompt = engine._prompt(make_shot(0, 0), None)
    assert "56" not in prompt and "start_image" not in prompt["55"]["inputs"]
    assert prompt["55"]["inputs"]["width"] == 128



class LayeredPreview(PreviewEngine):
    """The preview engine with a pass-major entry point that records its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def can_pass_major(self) -> bool:
        return True

    def pass_major_refusal(self, shots: int) -> str | None:
        return None

    def render_pass_major(self, shots: list[Any], out_paths: list[Path],
                          progress: Any = None) -> list[Any]:
        self.batches.append([s.id for s in shots])
        return [self.render(s, p) for s, p in zip(shots, out_paths, strict=True)]


@pytest.mark.slow
def test_pass_major_goes_layer_by_layer_of_the_chains(prefect_harness: None,
                                                      tmp_path: Path) -> None:
    from flows.pipeline import pass_major_layers

    plan = plan_of([3, 2])
    folder = seeded(tmp_path, plan)
    engine = LayeredPreview()
    pass_major_layers(engine, StartImages(plan, folder, "chain", engine.fingerprint), folder)
    assert engine.batches == [["s01_sh01", "s02_sh01"], ["s01_sh02", "s02_sh02"],
                              ["s01_sh03"]]
    assert len(list(folder.clips.glob("*.mp4"))) == 5


def test_the_night_declares_chains_as_dependencies(tmp_path: Path) -> None:
    from flows.night import Idea, idea_items
    from story_to_video.config import Settings, VideoSettings

    plan = plan_of([2, 1])
    folder = seeded(tmp_path, plan)

    def deps(mode: str, workflow: str = "wan22_14b_i2v", engine: str = "comfyui"
             ) -> list[tuple[str, ...]]:
        settings = Settings(engine=engine, video=VideoSettings(start_images=mode),
                            comfyui={"workflow": workflow})
        items, _estimated = idea_items(Idea(0, "line 1", plan.idea, settings, folder, plan))
        return [it.deps for it in items]

    assert deps("chain") == [(), ("s01_sh01",), ()]
    assert deps("keyframe+chain", engine="preview") == [(), ("s01_sh01",), ()]
    assert deps("keyframe") == [(), (), ()]
    assert deps("chain", workflow="wan22_14b_t2v") == [(), (), ()]  # no start images there


@pytest.mark.slow
def test_a_missing_user_image_stops_the_run_before_any_clip(prefect_harness: None,
                                                            tmp_path: Path) -> None:
    plan = plan_of([2])
    plan.scenes[0].shots[1] = plan.shots[1].model_copy(
        update={"start_image": str(tmp_path / "gone.png")})
    folder = seeded(tmp_path, plan)
    with pytest.raises(StartImageError, match=f"shot s01_sh02: start image {tmp_path}/gone.png"
                       " does not exist"):
        run(folder, "chain", tmp_path)
    assert not list(folder.clips.glob("*.mp4"))


@pytest.mark.slow
def test_a_night_renders_keyframes_first_chains_in_order_and_resumes(
        prefect_harness: None, tmp_path: Path) -> None:
    """The batch's night (RealNight, preview engine, plans already made: no LLM) with
    keyframe+chain, a character image from the batch entry, then the same night again."""
    from prefect import flow

    from flows.night import NightOptions, run_night
    from story_to_video.batch import parse_batch_text

    face = tmp_path / "keeper.png"
    Image.new("RGB", (64, 64), (0, 0, 250)).save(face)
    first, second = plan_of([2, 1]), plan_of([2])
    second = second.model_copy(update={"idea": "a whale sings"})
    folders = [seeded(tmp_path, first), seeded(tmp_path, second)]
    cfg = tmp_path / "stv.toml"
    cfg.write_text('[video]\nstart_images = "keyframe+chain"\n')
    lines = [json.dumps({"idea": p.idea, "scenes": len(p.scenes),
                         "target_seconds": p.target_seconds, "style": p.style,
                         **({"character_images": {"Keeper": str(face)}} if n else {})})
             for n, p in enumerate((first, second))]

    @flow(name="test-night-keyframes")
    def night() -> dict[str, Any]:
        parsed = parse_batch_text("\n".join(lines), "jsonl")
        result, _eta = run_night(parsed, 1, 4.0, {"engine": "preview", "output_dir": str(
            tmp_path / "runs"), "config_file": str(cfg)}, NightOptions("t", tmp_path / "runs"))
        return result

    result = night()
    assert [d["idea"] for d in result["done"]] == [first.idea, second.idea], result
    recs = [by_id(json.loads(f.manifest_path.read_text())) for f in folders]
    # idea 1: keyframes for each scene's first shot, the second shot chained
    assert recs[0]["s01_sh01"]["start_image"].startswith("keyframes/s01-sh01-kf-")
    assert recs[0]["s02_sh01"]["start_image"].startswith("keyframes/s02-sh01-kf-")
    chained = folders[0].root / recs[0]["s01_sh02"]["start_image"]
    last = read_frame(folders[0].clips / recs[0]["s01_sh01"]["clip"], 8)
    assert np.array_equal(np.asarray(Image.open(chained)), last)
    # idea 2: the keeper's picture from the batch entry, fitted to the shot, then chained
    start = folders[1].root / recs[1]["s01_sh01"]["start_image"]
    assert start.name.startswith("s01-sh01-user-")
    assert np.asarray(Image.open(start))[..., 2].mean() > 240
    assert recs[1]["s01_sh02"]["start_image"].startswith("keyframes/s01-sh02-chain-")
    assert not list((folders[1].root / "keyframes").glob("*-kf-*"))

    files = {p: p.stat().st_mtime_ns for f in folders for p in f.root.rglob("*.png")
             if "keyframes" in p.parts or p.parent.name == "clips"}
    again = night()
    assert len(again["done"]) == 2
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing redone
