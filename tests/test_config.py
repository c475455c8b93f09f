from __future__ import annotations

from pathlib import Path

import pytest

from story_to_video.config import ConfigError, load_settings


def test_defaults_are_the_embedded_pipeline() -> None:
    s = load_settings()
    assert s.llm.backend == "llamacpp-embedded"
    assert s.llm.resolved_base_url() is None  # port chosen at start
    assert s.engine == "preview"
    assert (s.video.width, s.video.height, s.video.fps) == (832, 480, 16)


def test_toml_then_env_then_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('style = "noir"\n[llm]\nbackend = "lmstudio"\nmodel = "a"\n'
                   '[video]\nfps = 24\n')
    s = load_settings(cfg)
    assert (s.style, s.llm.backend, s.llm.model, s.video.fps) == ("noir", "lmstudio", "a", 24)
    assert s.llm.resolved_base_url() == "http://localhost:1234/v1"

    monkeypatch.setenv("STV_LLM__MODEL", "b")
    monkeypatch.setenv("STV_STYLE", "anime")
    s = load_settings(cfg)
    assert (s.style, s.llm.model, s.llm.backend) == ("anime", "b", "lmstudio")

    s = load_settings(cfg, {"llm.model": "c", "style": None})
    assert s.llm.model == "c"
    assert s.llm.backend == "lmstudio"  # a CLI value for one nested field keeps the others
    assert s.style == "anime"  # None means "flag not given"


def test_default_file_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / "story-to-video.toml").write_text('engine = "preview"\noutput_dir = "out"\n')
    assert load_settings().output_dir == "out"


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"llm.backend": "gpt"}, "llm.backend", "'llamacpp-embedded', 'lmstudio'"),
        ({"engine": "sora"}, "engine", "'preview' or 'comfyui'"),
        ({"video.width": 830}, "video.width", "multiple of 16"),
        ({"video.fps": 0}, "video.fps", "greater than or equal to 4"),
        ({"llm.base_url": "localhost:1234"}, "llm.base_url", "http://"),
    ],
)
def test_bad_value_names_field_and_allowed(overrides: dict[str, object], field: str,
                                           allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(overrides=overrides)
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1
    assert f"invalid setting {field}=" in msg
    assert allowed in msg


def test_unknown_key_in_toml_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[llm]\nbakend = 'ollama'\n")
    with pytest.raises(ConfigError, match=r"llm\.bakend.*Extra inputs are not permitted"):
        load_settings(cfg)


def test_env_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STV_VIDEO__HEIGHT", "481")
    with pytest.raises(ConfigError, match=r"video\.height='481'.*multiple of 16"):
        load_settings()


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("engine = \n")
    with pytest.raises(ConfigError, match="config"):
        load_settings(bad)


def test_openai_compatible_needs_url() -> None:
    s = load_settings(overrides={"llm.backend": "openai-compatible"})
    with pytest.raises(ConfigError, match="llm.base_url: required"):
        s.llm.resolved_base_url()


def test_api_key_comes_from_env_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-secret")
    s = load_settings(overrides={"llm.api_key_env": "MY_KEY"})
    assert s.llm.api_key() == "sk-secret"
    assert "sk-secret" not in s.model_dump_json()
