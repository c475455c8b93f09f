"""Typed ComfyUI failures. Each message names the node when ComfyUI named one."""

from __future__ import annotations

from typing import Any

from ..base import VideoEngineError


class ComfyUIError(VideoEngineError):
    pass


class ComfyUIUnavailable(ComfyUIError):
    """ComfyUI does not answer at its URL (not started, crashed, wrong port)."""


class ComfyUIDied(ComfyUIUnavailable):
    """ComfyUI went away while a prompt was running."""


class WorkflowError(ComfyUIError):
    """A workflow or binding is unusable; found before any GPU time is spent."""


class PromptValidationError(ComfyUIError):
    """HTTP 400 from POST /prompt: ComfyUI refused the graph."""

    def __init__(self, error: Any, node_errors: dict[str, Any]) -> None:
        self.error = error
        self.node_errors = node_errors
        parts = []
        for node_id, info in node_errors.items():
            for e in info.get("errors", []):
                detail = f" ({e['details']})" if e.get("details") else ""
                parts.append(f"node {node_id} ({info.get('class_type', '?')}): "
                             f"{e.get('message', '')}{detail}")
        head = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        extra = error.get("details") if isinstance(error, dict) else ""
        super().__init__(f"ComfyUI refused the workflow: {head}"
                         + (f" ({extra})" if extra else "")
                         + ("; " + "; ".join(parts) if parts else ""))


class ExecutionError(ComfyUIError):
    """`execution_error`: a node raised while running."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.node_id = str(data.get("node_id", "?"))
        self.node_type = str(data.get("node_type", "?"))
        self.exception_type = str(data.get("exception_type", ""))
        self.exception_message = str(data.get("exception_message", "")).strip()
        super().__init__(f"node {self.node_id} ({self.node_type}) failed: "
                         f"{self.exception_type}: {self.exception_message}")

    @staticmethod
    def from_message(data: dict[str, Any]) -> ExecutionError:
        text = f"{data.get('exception_type', '')} {data.get('exception_message', '')}"
        if "OutOfMemory" in text or "out of memory" in text.lower():
            return GpuOutOfMemory(data)
        return ExecutionError(data)


class GpuOutOfMemory(ExecutionError):
    """torch.OutOfMemoryError inside a node: the broker retries with a leaner plan."""


class Interrupted(ComfyUIError):
    """`execution_interrupted`: someone (or our watchdog) interrupted the prompt."""


class StallError(ComfyUIError):
    """No progress message for longer than the stall timeout (e.g. stuck at VAE decode)."""

    def __init__(self, seconds: float, node: str | None) -> None:
        self.seconds = seconds
        self.node = node
        where = f" in node {node}" if node else ""
        super().__init__(f"ComfyUI stalled{where}: no progress for {seconds:.0f}s; interrupted")
