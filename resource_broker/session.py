"""The broker wired to a ComfyUI engine: which memory mode the server runs in, and the broker
built for it. Free of Prefect, so that the GPU benchmark drives the same code as a run."""

from __future__ import annotations

import logging
from pathlib import Path

from story_to_video.config import Settings
from story_to_video.engines.comfyui import ComfyUIEngine
from story_to_video.engines.comfyui.server_info import ServerInfo

from .broker import Broker
from .cost_model import Calibration, CostModel
from .gpu import GpuMonitor, settled_free_gib
from .llm_control import LLMControl

log = logging.getLogger("resource_broker.session")


def memory_mode(info: ServerInfo) -> str:
    """Who manages VRAM inside this ComfyUI (resource_broker.policy.MEMORY_MODES)."""
    if not info.on_gpu:
        return "cpu"
    if info.dynamic_vram:
        return "dynamic"
    if info.dynamic_vram is None:
        log.warning("%s: cannot tell whether dynamic VRAM is on; the broker plans as for "
                    "the classic loader (it never relies on ComfyUI freeing memory)",
                    info.describe())
    return "estimate"


def calibration_path(engine: ComfyUIEngine, folder: Path) -> Path:
    """Measured peaks and times, per machine (folder) and model."""
    return folder / f".broker-calibration-{engine.bound.binding.model}.json"


def make_broker(settings: Settings, engine: ComfyUIEngine, monitor: GpuMonitor,
                llm: LLMControl, calibration_file: Path) -> Broker:
    """The broker for this engine's server, attached to the engine."""
    cost = CostModel.for_model(engine.bound.binding.model, Calibration.load(calibration_file))
    broker = Broker(monitor, cost, budget_gib=settings.broker.budget_gib,
                    margin_gib=settings.broker.safety_margin_gib,
                    restart_every_n_scenes=settings.broker.restart_every_n_scenes,
                    leak_threshold_gib=settings.broker.leak_threshold_gib,
                    leak_check_every_n_scenes=settings.broker.leak_check_every_n_scenes,
                    llm=llm, memory_mode=memory_mode(engine.server_info()),
                    strategy=settings.broker.strategy)
    engine.broker = broker

    def free_vram() -> None:
        release_comfyui_vram(engine, monitor)

    broker.free_vram = free_vram
    return broker


def release_comfyui_vram(engine: ComfyUIEngine, monitor: GpuMonitor,
                         timeout_s: float = 15.0) -> float:
    """/free with unload and wait until the card's free memory stops rising (ComfyUI acts on
    /free between prompts, not when it answers). Returns the free GiB reached."""
    engine.client.free(unload_models=True, free_memory=True)
    if not monitor.available:
        return 0.0
    return settled_free_gib(monitor, timeout_s=timeout_s)
