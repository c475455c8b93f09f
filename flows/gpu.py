"""GPU side of a run: one heavy job per GPU, the broker wired to the engine, VRAM timeline."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect.concurrency.sync import concurrency

from resource_broker.broker import Broker
from resource_broker.cost_model import Calibration, CostModel
from resource_broker.gpu import GIB, GpuMonitor, NoGpuMonitor, open_monitor
from resource_broker.llm_control import (
    LlamaServerControl,
    LLMControl,
    LMStudioControl,
    NoLLM,
    OllamaControl,
    UncontrolledLLM,
)
from resource_broker.timeline import VramSampler
from story_to_video.config import Settings
from story_to_video.engines.base import VideoEngine
from story_to_video.engines.comfyui import ComfyUIEngine
from story_to_video.llm.embedded import LLMServer

log = logging.getLogger("resource_broker.session")


def llm_control(settings: Settings, server: LLMServer | None = None) -> LLMControl:
    """How the broker moves this LLM: a server the project started is restarted with other
    GPU layers; LM Studio and Ollama through their APIs; anything else is counted as taken."""
    cfg, gib = settings.llm, settings.broker.llm_gib
    if server is not None and server.running:
        return LlamaServerControl(server, gib)
    if cfg.backend == "llamacpp-embedded" or cfg.server_command:
        return NoLLM()  # the project's server was stopped after planning
    if cfg.backend == "ollama" and cfg.model:
        return OllamaControl(cfg.resolved_base_url() or "", cfg.model, gib)
    if cfg.backend == "lmstudio":
        return LMStudioControl(cfg.resolved_base_url() or "", cfg.model, gib,
                               api_key=cfg.api_key() if cfg.api_key_env else None)
    return UncontrolledLLM(cfg.backend, gib)


def ensure_gpu_limit(name: str) -> None:
    """Create the global concurrency limit `gpu-N` (1 slot) if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextlib.contextmanager
def gpu_slot(settings: Settings, engine: VideoEngine) -> Iterator[None]:
    """Hold the per-GPU concurrency slot for the video work, so two runs never share a card."""
    if engine.is_preview or not settings.broker.concurrency_limit:
        yield
        return
    name = f"gpu-{settings.broker.gpu_index}"
    ensure_gpu_limit(name)
    log.info("waiting for concurrency slot %s", name)
    with concurrency(name, occupy=1):
        yield


@dataclass
class GpuSession:
    broker: Broker | None
    sampler: VramSampler


@contextlib.contextmanager
def gpu_session(settings: Settings, engine: VideoEngine, run_dir: Path,
                llm: LLMControl | None = None) -> Iterator[GpuSession]:
    """Monitor + broker + VRAM sampler around the video work; writes the timeline plot."""
    monitor: GpuMonitor = (NoGpuMonitor("preview engine: no GPU work") if engine.is_preview
                           else open_monitor(settings.broker.gpu_index))
    log.info("GPU: %s", monitor.describe())
    sampler = VramSampler(monitor, settings.broker.sample_interval_s)
    broker = None
    if isinstance(engine, ComfyUIEngine):
        client = engine.client

        def from_system_stats() -> tuple[float, float]:
            dev = client.system_stats()["devices"][0]
            return ((dev["vram_total"] - dev["vram_free"]) / GIB, dev["vram_free"] / GIB)

        sampler.fallback = from_system_stats
        engine.timeline = sampler.timeline
        calibration_file = run_dir.parent / f".broker-calibration-{engine.bound.binding.model}.json"
        calibration = Calibration.load(calibration_file)
        cost = CostModel.for_model(engine.bound.binding.model, calibration)
        broker = Broker(monitor, cost, budget_gib=settings.broker.budget_gib,
                        margin_gib=settings.broker.safety_margin_gib,
                        restart_every_n_scenes=settings.broker.restart_every_n_scenes,
                        leak_threshold_gib=settings.broker.leak_threshold_gib,
                        llm=llm if llm is not None else llm_control(settings))
        engine.broker = broker
    with sampler:
        yield GpuSession(broker, sampler)
    if broker is not None and broker.acts:
        broker.cost.calibration.save(calibration_file)  # measured peaks refine the next run
