"""One typed settings object: TOML file < environment (STV_*) < CLI flags.

Bad values raise ConfigError with one line per field: the dotted field name, what was
given, and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

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

DEFAULT_BASE_URLS: dict[str, str] = {
    "lmstudio": "http://localhost:1234/v1",
    "ollama": "http://localhost:11434/v1",
}

CONFIG_ENV = "STV_CONFIG"
DEFAULT_CONFIG_FILE = "story-to-video.toml"


class ConfigError(ValueError):
    """A setting is invalid; the message names the field and what is allowed."""


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: LLMBackendName = "llamacpp-embedded"
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL; defaults per backend"
    )
    model: str | None = Field(default=None, description="model name; None = the server's first")
    api_key_env: str | None = Field(
        default=None, description="name of the env variable holding the API key (never logged)"
    )
    structured_output: StructuredMode = "auto"
    timeout_s: float = Field(default=300.0, gt=0, le=3600)
    connect_retries: int = Field(default=3, ge=0, le=10)
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
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

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


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpu_index: int = Field(default=0, ge=0)
    budget_gib: float | None = Field(default=None, gt=0, description="cap below the card's total")
    safety_margin_gib: float = Field(default=1.0, ge=0)
    restart_every_n_scenes: int = Field(default=0, ge=0, description="0 = off")
    leak_threshold_gib: float = Field(default=1.5, gt=0)
    sample_interval_s: float = Field(default=0.5, gt=0)
    llm_gib: float = Field(default=0.0, ge=0, description="VRAM the LLM holds, if not measured")
    concurrency_limit: bool = Field(default=True, description="one heavy job per GPU")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STV_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    llm: LLMSettings = LLMSettings()
    engine: EngineName = "preview"
    video: VideoSettings = VideoSettings()
    comfyui: ComfyUISettings = ComfyUISettings()
    broker: BrokerSettings = BrokerSettings()
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


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(settings)"
        given = e.get("input")
        shown = repr(given) if not isinstance(given, dict) else "{...}"
        lines.append(f"invalid setting {field}={shown}: {e['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build settings; `overrides` (CLI flags) win over env, which wins over the TOML file."""
    global _explicit_file
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        _explicit_file = path
    try:
        clean = {k: v for k, v in (overrides or {}).items() if v is not None}
        # pydantic-settings deep-merges init values over env and TOML, field by field.
        return Settings(**_nest(clean))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    except ValueError as err:  # TOML syntax errors and friends
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
