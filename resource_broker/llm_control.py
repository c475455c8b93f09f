"""Moving the LLM off the GPU before video work and back after, per backend."""

from __future__ import annotations

import logging
from typing import Protocol
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)


class LLMControl(Protocol):
    name: str
    controllable: bool

    def gpu_gib(self) -> float:
        """VRAM the LLM holds now (best knowledge)."""
        ...

    def release(self, gpu_fraction: float = 0.0) -> str:
        """Unload (fraction 0) or keep `gpu_fraction` of its layers on the GPU."""
        ...

    def restore(self) -> str: ...


class NoLLM:
    """Nothing on the GPU: the embedded server was stopped after planning, or runs CPU-only."""

    name = "none"
    controllable = True

    def __init__(self, why: str = "the embedded LLM server stopped after planning") -> None:
        self.why = why

    def gpu_gib(self) -> float:
        return 0.0

    def release(self, gpu_fraction: float = 0.0) -> str:
        return f"nothing to move: {self.why}"

    def restore(self) -> str:
        return "nothing to restore"


class UncontrolledLLM:
    """A backend we cannot steer (a llama.cpp server we did not start, a remote API)."""

    name = "uncontrolled"
    controllable = False

    def __init__(self, backend: str, gib: float) -> None:
        self.backend, self.gib = backend, gib

    def gpu_gib(self) -> float:
        return self.gib

    def release(self, gpu_fraction: float = 0.0) -> str:
        return (f"{self.backend} cannot be moved off the GPU from here; its "
                f"{self.gib:.1f} GiB are counted as taken")

    def restore(self) -> str:
        return "nothing to restore"


class OllamaControl:
    """Ollama's native API: keep_alive 0 unloads; options.num_gpu sets offloaded layers."""

    name = "ollama"
    controllable = True

    def __init__(self, base_url: str, model: str, layers: int = 32) -> None:
        parts = urlsplit(base_url)
        self.root = f"{parts.scheme}://{parts.netloc}"
        self.model, self.layers = model, layers
        self.http = httpx.Client(base_url=self.root, timeout=60)

    def gpu_gib(self) -> float:
        r = self.http.get("/api/ps")
        r.raise_for_status()
        used = sum(int(m.get("size_vram", 0)) for m in r.json().get("models", [])
                   if str(m.get("name", "")).startswith(self.model))
        return used / 2**30

    def release(self, gpu_fraction: float = 0.0) -> str:
        if gpu_fraction <= 0:
            self.http.post("/api/generate", json={"model": self.model, "keep_alive": 0}
                           ).raise_for_status()
            return f"ollama: unloaded {self.model} (keep_alive 0)"
        layers = int(self.layers * gpu_fraction)
        self.http.post("/api/generate", json={"model": self.model, "keep_alive": "30m",
                                              "options": {"num_gpu": layers}}
                       ).raise_for_status()
        return f"ollama: reloaded {self.model} with num_gpu={layers}"

    def restore(self) -> str:
        self.http.post("/api/generate", json={"model": self.model}).raise_for_status()
        return f"ollama: {self.model} loaded with its default GPU layers"


class LMStudioControl:
    """LM Studio through its Python SDK (`pip install lmstudio`): unload, or reload with a
    GPU offload ratio."""

    name = "lmstudio"

    def __init__(self, model: str, gib: float) -> None:
        self.model, self.gib = model, gib
        try:
            import lmstudio  # noqa: F401

            self.controllable = True
        except ImportError:
            self.controllable = False

    def gpu_gib(self) -> float:
        return self.gib

    def release(self, gpu_fraction: float = 0.0) -> str:
        if not self.controllable:
            return ("LM Studio SDK not installed (pip install lmstudio): cannot unload; "
                    f"its {self.gib:.1f} GiB are counted as taken")
        import lmstudio as lms

        lms.llm(self.model).unload()
        if gpu_fraction > 0:
            lms.llm(self.model, config={"gpu": {"ratio": gpu_fraction}})
            return f"lmstudio: reloaded {self.model} with GPU ratio {gpu_fraction:.2f}"
        return f"lmstudio: unloaded {self.model}"

    def restore(self) -> str:
        if not self.controllable:
            return "nothing to restore"
        import lmstudio as lms

        lms.llm(self.model)
        return f"lmstudio: {self.model} loaded again"
