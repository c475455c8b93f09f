"""Moving the LLM off the GPU before video work and back after, per backend.

Every control answers the same three questions (how much VRAM the LLM holds, release it,
restore it) through that server's own documented interface. None of them raises: a server
that does not answer is logged, its VRAM is counted as taken (`controllable` turns False)
and the broker plans around it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)
GIB = 2**30


class LLMControl(Protocol):
    name: str
    controllable: bool
    # False for a server the project started for the night: it stops with the night, so
    # giving it its GPU share back afterwards would reload it for nobody.
    outlives_night: bool

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
    outlives_night = False

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
    outlives_night = True

    def __init__(self, backend: str, gib: float) -> None:
        self.backend, self.gib = backend, gib

    def gpu_gib(self) -> float:
        return self.gib

    def release(self, gpu_fraction: float = 0.0) -> str:
        return (f"{self.backend} cannot be moved off the GPU from here; its "
                f"{self.gib:.1f} GiB are counted as taken")

    def restore(self) -> str:
        return "nothing to restore"


def _root(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def _error(r: httpx.Response) -> str:
    """The server's own error text (Ollama: {"error": "..."}; LM Studio and OpenAI-style
    servers: {"error": {"message": "..."}}), else the status line."""
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return f"HTTP {r.status_code}: {err}" if err else f"HTTP {r.status_code}"


class _ServerError(RuntimeError):
    pass


def _checked(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise _ServerError(_error(r))
    return r.json()


class _Failsafe:
    """Shared failure handling: a call that fails leaves the LLM where it is, counted."""

    name: str
    controllable: bool
    last_gib: float

    def _gave_up(self, what: str, err: Exception) -> str:
        self.controllable = False
        msg = (f"{self.name} did not {what} ({type(err).__name__}: {err}); its "
               f"{self.last_gib:.1f} GiB are counted as taken")
        log.warning(msg)
        return msg


class OllamaControl(_Failsafe):
    """Ollama's API (docs/api.md): `keep_alive: 0` with no prompt unloads, a request with no
    prompt loads, `options.num_gpu` sets the layers offloaded to the GPU, `/api/ps` reports
    `size_vram`, `/api/show` gives the layer count (`<arch>.block_count`)."""

    name = "ollama"
    outlives_night = True

    def __init__(self, base_url: str, model: str, gib: float = 0.0, *,
                 timeout_s: float = 60.0) -> None:
        self.model, self.last_gib = model, gib
        self.controllable = True
        self.http = httpx.Client(base_url=_root(base_url), timeout=timeout_s)

    def _mine(self, name: str) -> bool:
        return name in (self.model, f"{self.model}:latest")  # Ollama's default tag

    def gpu_gib(self) -> float:
        if not self.controllable:
            return self.last_gib
        try:
            models = _checked(self.http.get("/api/ps")).get("models", [])
        except (httpx.HTTPError, _ServerError, ValueError) as err:
            log.warning("ollama /api/ps failed (%s): using %.1f GiB", err, self.last_gib)
            return self.last_gib
        self.last_gib = sum(int(m.get("size_vram", 0)) for m in models
                            if self._mine(str(m.get("name", "")))) / GIB
        return self.last_gib

    def layers(self) -> int:
        info = _checked(self.http.post("/api/show", json={"model": self.model}))
        counts = [int(v) for k, v in (info.get("model_info") or {}).items()
                  if k.endswith(".block_count")]
        if not counts:
            raise _ServerError(f"/api/show gave no block_count for {self.model}")
        return counts[0] + 1  # + the output layer, as llama.cpp counts offloadable layers

    def release(self, gpu_fraction: float = 0.0) -> str:
        self.gpu_gib()
        try:
            if gpu_fraction <= 0:
                body = _checked(self.http.post("/api/generate", json={
                    "model": self.model, "keep_alive": 0}))
                if body.get("done_reason") not in (None, "unload"):
                    raise _ServerError(f"unexpected answer {body}")
                return f"ollama: unloaded {self.model} (keep_alive 0)"
            layers = max(1, int(self.layers() * gpu_fraction))
            _checked(self.http.post("/api/generate", json={"model": self.model, "keep_alive": 0}))
            _checked(self.http.post("/api/generate", json={
                "model": self.model, "keep_alive": "30m", "options": {"num_gpu": layers}}))
            return f"ollama: reloaded {self.model} with num_gpu={layers}"
        except (httpx.HTTPError, _ServerError, ValueError) as err:
            return self._gave_up("unload", err)

    def restore(self) -> str:
        try:
            _checked(self.http.post("/api/generate", json={"model": self.model, "keep_alive": 0}))
            _checked(self.http.post("/api/generate", json={"model": self.model}))
        except (httpx.HTTPError, _ServerError, ValueError) as err:
            return self._gave_up("reload", err)
        self.controllable = True
        return f"ollama: {self.model} loaded again with its default GPU layers"


class LMStudioControl(_Failsafe):
    """LM Studio (0.4+). Listing and unloading through its REST API (docs/developer/rest:
    GET /api/v1/models, POST /api/v1/models/unload, POST /api/v1/models/load); a reload with
    a GPU offload ratio through its Python SDK (`lmstudio`), because the REST load has no GPU
    setting: `client.llm.load_new_instance(key, config={"gpu": {"ratio": r}})`."""

    name = "lmstudio"
    outlives_night = True

    def __init__(self, base_url: str, model: str | None, gib: float = 0.0, *,
                 api_key: str | None = None, timeout_s: float = 60.0, sdk: Any = None) -> None:
        self.model, self.last_gib = model, gib
        self.controllable = True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=_root(base_url), headers=headers, timeout=timeout_s)
        self.api_host = urlsplit(base_url).netloc
        self._sdk = sdk
        self.released: list[str] = []  # model keys we unloaded, to load back

    def sdk(self) -> Any:
        """The SDK client for this server (created on first use; it probes the host)."""
        if self._sdk is None:
            import lmstudio

            self._sdk = lmstudio.Client(self.api_host)
        return self._sdk

    def _loaded(self) -> list[dict[str, Any]]:
        """Loaded LLM entries of GET /api/v1/models: ours, or every LLM if no model is set."""
        models = _checked(self.http.get("/api/v1/models")).get("models", [])
        return [m for m in models if m.get("type") == "llm" and m.get("loaded_instances")
                and (self.model is None or m.get("key") == self.model)]

    def gpu_gib(self) -> float:
        if not self.controllable:
            return self.last_gib
        try:
            loaded = self._loaded()
        except (httpx.HTTPError, _ServerError, ValueError) as err:
            log.warning("lmstudio /api/v1/models failed (%s): using %.1f GiB", err,
                        self.last_gib)
            return self.last_gib
        # The REST API reports file sizes, not VRAM; a configured figure (with the KV cache)
        # wins when it is larger.
        size = sum(m.get("size_bytes", 0) * len(m["loaded_instances"]) for m in loaded) / GIB
        self.last_gib = max(size, self.last_gib) if loaded else 0.0
        return self.last_gib

    def release(self, gpu_fraction: float = 0.0) -> str:
        self.gpu_gib()
        try:
            loaded = self._loaded()
            done = []
            for m in loaded:
                for inst in m["loaded_instances"]:
                    body = _checked(self.http.post("/api/v1/models/unload",
                                                   json={"instance_id": inst["id"]}))
                    done.append(str(body.get("instance_id", inst["id"])))
                self.released.append(str(m["key"]))
            if not loaded:
                return "lmstudio: no LLM loaded, nothing to unload"
            if gpu_fraction > 0:
                for key in self.released:
                    self.sdk().llm.load_new_instance(key, config={"gpu": {
                        "ratio": round(gpu_fraction, 2)}})
                return (f"lmstudio: reloaded {', '.join(self.released)} with GPU ratio "
                        f"{gpu_fraction:.2f}")
            return f"lmstudio: unloaded {', '.join(done)}"
        except Exception as err:  # httpx, SDK (LMStudioError) or a malformed answer
            return self._gave_up("unload", err)

    def restore(self) -> str:
        if not self.released:
            return "nothing to restore"
        try:
            for m in self._loaded():  # a partial-offload instance goes first
                for inst in m["loaded_instances"]:
                    _checked(self.http.post("/api/v1/models/unload",
                                            json={"instance_id": inst["id"]}))
            for key in self.released:
                _checked(self.http.post("/api/v1/models/load", json={"model": key}))
        except (httpx.HTTPError, _ServerError, ValueError) as err:
            return self._gave_up("reload", err)
        keys, self.released = self.released, []
        self.controllable = True
        return f"lmstudio: {', '.join(keys)} loaded again"


class LlamaServer(Protocol):
    """What the control needs from a llama.cpp server the project started."""

    gpu_layers: int

    @property
    def running(self) -> bool: ...

    def restart(self, gpu_layers: int | None = None) -> str: ...

    def layer_count(self) -> int: ...


class LlamaServerControl(_Failsafe):
    """A llama.cpp server the project started (the embedded default, or the user's command):
    moved by restarting it with another `--n_gpu_layers` (0 = CPU only). It stops with the
    night, so it is not given its GPU share back afterwards."""

    name = "llama.cpp"
    outlives_night = False

    def __init__(self, server: LlamaServer, gib: float) -> None:
        self.server, self.last_gib = server, gib
        self.full_layers = server.gpu_layers
        self.controllable = True

    def _share(self) -> float:
        layers = self.server.gpu_layers
        if not self.server.running or layers == 0:
            return 0.0
        return 1.0 if layers < 0 else min(1.0, layers / max(1, self.server.layer_count()))

    def gpu_gib(self) -> float:
        return self.last_gib * self._share() if self.controllable else self.last_gib

    def release(self, gpu_fraction: float = 0.0) -> str:
        layers = 0 if gpu_fraction <= 0 else max(1, round(
            self.server.layer_count() * gpu_fraction))
        try:
            self.server.restart(layers)
        except Exception as err:  # the server did not come back: its VRAM is unknown
            return self._gave_up("restart", err)
        return f"llama.cpp server restarted with --n_gpu_layers {layers}"

    def restore(self) -> str:
        if self.server.gpu_layers == self.full_layers:
            return "nothing to restore"
        try:
            self.server.restart(self.full_layers)
        except Exception as err:
            return self._gave_up("restart", err)
        return f"llama.cpp server restarted with --n_gpu_layers {self.full_layers}"
