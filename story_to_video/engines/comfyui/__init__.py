"""ComfyUI engine: client, workflows and bindings, graph surgery, process supervision."""

from .client import ComfyUIClient, Execution
from .engine import ComfyUIEngine
from .errors import (
    ComfyUIDied,
    ComfyUIError,
    ComfyUIUnavailable,
    ExecutionError,
    GpuOutOfMemory,
    Interrupted,
    PromptValidationError,
    StallError,
    WorkflowError,
)
from .process import AttachedComfyUI, ComfyUIProcess, RestartUnavailable
from .workflow import Binding, BoundWorkflow, load_binding, load_workflow

__all__ = [
    "AttachedComfyUI", "Binding", "BoundWorkflow", "ComfyUIClient", "ComfyUIDied",
    "ComfyUIEngine", "ComfyUIError", "ComfyUIProcess", "ComfyUIUnavailable", "Execution",
    "ExecutionError", "GpuOutOfMemory", "Interrupted", "PromptValidationError",
    "RestartUnavailable", "StallError", "WorkflowError", "load_binding", "load_workflow",
]
