"""Which ComfyUI we talk to: version, device, memory management and cache mode.

Read from `/system_stats` (version, devices, and `argv`, the server's own command line), so
it works the same for a ComfyUI the project started and for one it attached to. What cannot
be read is said, never guessed: the broker then falls back to its safest measured strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ComfyUI 0.33's defaults (comfy/cli_args.py): RAM-pressure caching; dynamic VRAM through
# comfy-aimdo on NVIDIA unless --disable-dynamic-vram, --highvram, --gpu-only, --novram, --cpu.
CACHE_MODES = ("ram", "classic", "lru", "none")
# The first release we measured with these defaults. Older servers are treated as the
# cautious case (classic cache, estimate-based loading) unless their flags say otherwise.
DEFAULTS_SINCE = (0, 33)


def _version(text: str) -> tuple[int, ...] | None:
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def _flag_value(argv: list[str], flag: str) -> str | None:
    """Value of `--flag V` or `--flag=V`; '' for a bare flag; None when absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@dataclass(frozen=True)
class ServerInfo:
    version: str
    device_type: str  # "cuda", "cpu", "mps", ... (devices[0].type)
    device_name: str
    vram_total_bytes: int | None  # None when the device is the CPU (then it reports RAM)
    argv: list[str] = field(default_factory=list)
    known: bool = True  # False when /system_stats lacked what we need

    @staticmethod
    def from_system_stats(stats: dict[str, Any]) -> ServerInfo:
        system = stats.get("system") or {}
        devices = stats.get("devices") or [{}]
        dev = devices[0] if isinstance(devices[0], dict) else {}
        dtype = str(dev.get("type") or "unknown")
        argv = [str(a) for a in system.get("argv") or []]
        total = dev.get("vram_total")
        return ServerInfo(
            version=str(system.get("comfyui_version") or "unknown"), device_type=dtype,
            device_name=str(dev.get("name") or "?"),
            vram_total_bytes=int(total) if isinstance(total, int) and dtype != "cpu" else None,
            argv=argv, known=bool(system.get("comfyui_version")) and bool(argv))

    @property
    def on_gpu(self) -> bool:
        return self.device_type not in ("cpu", "unknown")

    @property
    def version_tuple(self) -> tuple[int, ...] | None:
        return _version(self.version)

    def flag(self, name: str) -> str | None:
        return _flag_value(self.argv, name)

    @property
    def cache_mode(self) -> str:
        if self.flag("--cache-classic") is not None or self.flag("--high-ram") is not None:
            return "classic"
        if self.flag("--cache-none") is not None:
            return "none"
        lru = self.flag("--cache-lru")
        if lru and lru != "0":
            return "lru"
        v = self.version_tuple
        if v is None or v < DEFAULTS_SINCE:
            return "classic"  # ComfyUI 0.8 kept only the latest prompt's outputs
        return "ram"

    @property
    def cache_lru_size(self) -> int:
        lru = self.flag("--cache-lru")
        return int(lru) if lru and lru.isdigit() else 0

    @property
    def dynamic_vram(self) -> bool | None:
        """True/False when it can be told, None when the version is unknown."""
        if not self.on_gpu:
            return False
        if self.flag("--enable-dynamic-vram") is not None:
            return True
        if any(self.flag(f) is not None for f in ("--disable-dynamic-vram", "--highvram",
                                                  "--gpu-only", "--novram")):
            return False
        v = self.version_tuple
        if v is None:
            return None
        return v >= DEFAULTS_SINCE

    def gib_flag(self, name: str) -> float | None:
        val = self.flag(name)
        try:
            return float(val) if val else None
        except ValueError:
            return None

    @property
    def reserve_vram_gib(self) -> float | None:
        return self.gib_flag("--reserve-vram")

    @property
    def vram_headroom_gib(self) -> float | None:
        return self.gib_flag("--vram-headroom")

    def keeps_outputs_between_prompts(self, nodes_needed: int = 0) -> bool:
        """Do the outputs of one prompt (e.g. the text encoder's) survive the next prompts?
        ram: until RAM runs short; lru: the last N node results; classic: only nodes that
        the very next prompt has too; none: nothing."""
        mode = self.cache_mode
        if mode == "ram":
            return True
        if mode == "lru":
            return self.cache_lru_size >= nodes_needed
        return False

    def folders(self) -> list[Path]:
        """Where this server reads input and writes output, when its command line says so
        (absolute paths only: a relative one depends on a working folder we cannot see)."""
        out = []
        base = self.flag("--base-directory")
        for name, flag in (("input", "--input-directory"), ("output", "--output-directory")):
            value = self.flag(flag)
            if value:
                out.append(Path(value))
            elif base:
                out.append(Path(base) / name)
        main = next((a for a in self.argv if a.endswith("main.py")), None)
        if not base and main and Path(main).is_absolute():
            root = Path(main).parent
            out += [root / "input", root / "output"]
        return [p for p in out if p.is_absolute()]

    def describe(self) -> str:
        if not self.known:
            return (f"ComfyUI {self.version} on {self.device_name}: version or command line "
                    "not reported")
        dyn = {True: "dynamic VRAM on", False: "dynamic VRAM off",
               None: "dynamic VRAM unknown"}[self.dynamic_vram]
        extra = []
        if self.reserve_vram_gib is not None:
            extra.append(f"--reserve-vram {self.reserve_vram_gib:g}")
        if self.vram_headroom_gib is not None:
            extra.append(f"--vram-headroom {self.vram_headroom_gib:g}")
        cache = self.cache_mode + (f" {self.cache_lru_size}" if self.cache_mode == "lru"
                                   else "")
        return (f"ComfyUI {self.version} on {self.device_name} ({self.device_type}), {dyn}, "
                f"cache {cache}" + (f", {', '.join(extra)}" if extra else ""))
