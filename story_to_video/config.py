"""One typed settings object: TOML file < environment (STV_*) < CLI flags.

Bad values raise ConfigError with one line per field: the dotted field name, what was
given, and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

LLMBackendName = Literal["llamacpp-embedded", "lmstudio", "ollama", "openai-compatible"]
StructuredMode = Literal["auto", "json_schema", "json_object_schema", "prompt"]
EngineName = Literal["preview", "comfyui"]
StartImages = Literal["none", "chain", "keyframe", "keyframe+chain"]

DEFAULT_BASE_URLS: dict[str, str] = {
    "lmstudio": "http://localhost:1234/v1",
    "ollama": "http://localhost:11434/v1",
}

CONFIG_ENV = "STV_CONFIG"
DEFAULT_CONFIG_FILE = "story-to-video.toml"


class ConfigError(ValueError):
    """A setting is invalid; the message names the field and what is allowed."""


def check_url(v: str) -> str:
    """An http(s) URL with a host and a valid port, no spaces and no credentials (they would
    show in logs and messages)."""
    if not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(v)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as err:
        raise ValueError(f"is not a valid URL ({err})") from None
    if not parts.hostname:
        raise ValueError("has no host name, e.g. http://localhost:1234/v1")
    if port == 0:
        raise ValueError("port 0 is not a port a server listens on")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user or password; give the key via llm.api_key_env")
    return v


_SECRET_NAME = re.compile(r"key|token|secret|passw|auth|cred", re.IGNORECASE)


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: LLMBackendName = "llamacpp-embedded"
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL; defaults per backend"
    )
    model: str | None = Field(default=None, min_length=1, max_length=200,
                              description="model name; None = the server's first")
    api_key_env: str | None = Field(
        default=None, description="name of the env variable holding the API key (never logged)"
    )
    structured_output: StructuredMode = "auto"
    timeout_s: float = Field(default=300.0, gt=0, le=3600,
                             description="no data from the server this long: it stalled")
    connect_retries: int = Field(default=3, ge=0, le=10, description="retries of a failed call: "
                                 "refused connection, 408/429/5xx, dropped or cut-off stream")
    call_deadline_s: float = Field(default=600.0, gt=0, le=86400,
                                   description="one LLM call, its retries included")
    stage_deadline_s: float = Field(default=1800.0, gt=0, le=86400,
                                    description="story, bible or scenes, repairs included")
    retry_wait_max_s: float = Field(default=30.0, ge=0, le=600,
                                    description="longest Retry-After honoured; longer fails")
    max_reply_chars: int = Field(default=200_000, ge=1000, le=10_000_000,
                                 description="hard cap on one reply (story or JSON)")
    max_repair_tries: int = Field(default=3, ge=1, le=10)
    temperature: float = Field(default=0.7, ge=0, le=2)
    # Embedded server only.
    embedded_n_ctx: int = Field(default=4096, ge=512, le=32768)
    embedded_threads: int = Field(default=2, ge=1, le=256)
    embedded_gpu_layers: int = Field(default=0, ge=-1)
    embedded_start_timeout_s: float = Field(default=120.0, gt=0)
    # A llama.cpp server the project starts from this command (with base_url), e.g.
    # ["llama-server", "-m", "model.gguf", "--port", "8080", "-ngl", "99"].
    server_command: list[str] | None = Field(default=None, min_length=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return check_url(v).rstrip("/") if v is not None else v

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v):
            raise ValueError("must be the name of an environment variable (letters, digits, _)"
                             " that holds the key, not the key itself")
        return v

    def resolved_base_url(self) -> str | None:
        """The URL to use, or None for the embedded server (its port is chosen at start)."""
        if self.base_url:
            return self.base_url
        if self.backend == "openai-compatible":
            raise ConfigError(
                "llm.base_url: required for backend 'openai-compatible' (e.g. http://host:8000/v1)"
            )
        return DEFAULT_BASE_URLS.get(self.backend)

    def api_key(self) -> str:
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return "not-needed"


class VideoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(default=832, ge=128, le=2048, multiple_of=16)
    height: int = Field(default=480, ge=128, le=2048, multiple_of=16)
    fps: int = Field(default=16, ge=4, le=60)
    max_shots_per_scene: int = Field(default=3, ge=1, le=8)
    crossfade_s: float = Field(default=0.0, ge=0, le=2, description="overlap between shots")
    burn_captions: bool = Field(default=False, description="shot text burnt into final.mp4")
    output_fps: int | None = Field(default=None, ge=4, le=120,
                                   description="interpolate final.mp4 up to this fps")
    seed: int | None = Field(default=None, ge=0, description="base seed; None = derived from idea")
    start_images: StartImages = Field(
        default="none", description="where each shot's start image comes from: none "
        "(text to video), chain (a scene's later shots start from the last frame of the shot "
        "before), keyframe (a keyframe image generated per shot), keyframe+chain (a keyframe "
        "for each scene's first shot, then chained); images the user gives always count")


class ComfyUISettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = "http://127.0.0.1:8188"
    workflow: str = "wan22_ti2v_5b"
    binding: str | None = None
    # When set, the project starts and supervises ComfyUI itself.
    command: list[str] | None = None
    cwd: str | None = None
    start_timeout_s: float = Field(default=180.0, gt=0)
    stall_timeout_s: float = Field(default=600.0, gt=0)
    shot_timeout_s: float = Field(default=3600.0, gt=0)
    pass_major: bool = Field(default=False, description="all high passes, then all low, then "
                             "all decodes: each expert loads once per run")
    force_fresh: bool = Field(default=False, description="reset ComfyUI's cache before each "
                              "shot, so nothing is answered from it; ComfyUI 0.33 then also "
                              "unloads the models, and every shot pays its loads")
    keyframe_workflow: str | None = Field(
        default=None, description="text-to-image workflow for keyframes (a built-in name); "
        "None: the Wan 2.2 keyframe workflow matching `workflow`")
    keyframe_binding: str | None = Field(default=None, description="your own keyframe "
                                         "workflow's binding file (output = \"image\")")
    decode: Literal["auto", "full", "tiled"] = Field(
        default="auto", description="auto: the broker decides per shot; full or tiled: always")

    _url = field_validator("url")(check_url)


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpu_index: int = Field(default=0, ge=0)
    gpu_count: int | None = Field(default=None, ge=0, description="GPUs on this host, for "
                                  "machines where NVML cannot count them (no NVIDIA driver)")
    budget_gib: float | None = Field(default=None, gt=0, description="cap below the card's total")
    safety_margin_gib: float = Field(default=1.0, ge=0)
    restart_every_n_scenes: int = Field(default=0, ge=0, description="0 = off")
    leak_threshold_gib: float = Field(default=1.5, gt=0)
    leak_check_every_n_scenes: int = Field(
        default=4, ge=1, description="/free and read the free VRAM every N scenes (each "
        "/free makes ComfyUI load its models again)")
    sample_interval_s: float = Field(default=0.5, gt=0)
    llm_gib: float = Field(default=0.0, ge=0, description="VRAM the LLM holds, if not measured")
    concurrency_limit: bool = Field(default=True, description="one heavy job per GPU")
    strategy: Literal["auto", "one-prompt", "staged", "broker"] = Field(
        default="auto", description="auto: what measured best on the ComfyUI in use (one "
        "prompt per shot; batches pass by pass on the classic loader); one-prompt or staged "
        "(high pass, low pass, decode as three prompts): always; broker: the broker's own "
        "VRAM plan (both experts kept where they fit, else staged, else block swap)")


class UISettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    media_url: str = Field(default="http://127.0.0.1:4300", description="where `story-to-video "
                           "serve` serves the run folders; video links in the UI point here")

    @field_validator("media_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STV_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    llm: LLMSettings = LLMSettings()
    engine: EngineName = "preview"
    video: VideoSettings = VideoSettings()
    comfyui: ComfyUISettings = ComfyUISettings()
    broker: BrokerSettings = BrokerSettings()
    ui: UISettings = UISettings()
    output_dir: str = "runs"
    style: str = Field(default="cinematic", min_length=1, max_length=200)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _config_file_in_use()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_explicit_file: Path | None = None


def _config_file_in_use() -> Path | None:
    if _explicit_file is not None:
        return _explicit_file
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the settings section that `loc` (an error location) points into."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _shown_value(name: str, given: Any) -> str:
    """The offending value as the message shows it; never one that may hold a secret."""
    if isinstance(given, dict):
        return "{...}"
    if _SECRET_NAME.search(name) or (isinstance(given, str) and "@" in given):
        return "(value not shown)"
    return repr(given)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(settings)"
        if e["type"] == "extra_forbidden":  # a misplaced key must not be printed back
            known = ", ".join(_known_fields(e["loc"]))
            lines.append(f"invalid setting {field} (value not shown): Extra inputs are not "
                         f"permitted; this section has: {known}")
            continue
        shown = _shown_value(str(e["loc"][-1]) if e["loc"] else "", e.get("input"))
        lines.append(f"invalid setting {field}={shown}: {e['msg']}")
    return "\n".join(lines)


def _config_path(config_file: str | Path | None) -> Path | None:
    """The file given by --config or else STV_CONFIG, which must then exist: a name that
    is wrong is an error, never silently ignored."""
    origin = "config file"
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file, origin = os.environ[CONFIG_ENV], f"config file from {CONFIG_ENV}"
    if config_file is None:
        return None
    path = Path(config_file)
    if not path.exists():
        raise ConfigError(f"{origin} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{origin} {path} is not a file")
    try:
        path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{origin} {path} cannot be read: {err.strerror}") from None
    return path


def load_settings(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build settings; `overrides` (CLI flags) win over env, which wins over the TOML file."""
    global _explicit_file
    _explicit_file = _config_path(config_file)
    try:
        clean = {k: v for k, v in (overrides or {}).items() if v is not None}
        # pydantic-settings deep-merges init values over env and TOML, field by field.
        return Settings(**_nest(clean))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    except (ValueError, RecursionError) as err:  # TOML syntax, not UTF-8, nesting, env JSON
        raise ConfigError(f"config: {err}") from None
    finally:
        _explicit_file = None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'llm.backend': x} -> {'llm': {'backend': x}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
