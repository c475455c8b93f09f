"""ComfyUI API-format workflows shipped with the project, each with a `.binding.toml`."""

from __future__ import annotations

from pathlib import Path

WORKFLOWS_DIR = Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".binding.toml")
                  for p in WORKFLOWS_DIR.glob("*.binding.toml"))


def binding_path(name_or_path: str) -> Path:
    """A built-in workflow's binding by name, or a user's binding file by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return WORKFLOWS_DIR / f"{name_or_path}.binding.toml"
