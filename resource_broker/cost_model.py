"""VRAM cost model: predicted peak of each stage of a shot, from model sizes and the shot.

Calibrated from shared/ANCHORS.md (H100, Wan 2.2 A14B architecture, bf16, SDPA):
activations 0.108 MiB per latent token (linear over 14k-76k tokens), one expert 13.57 GiB in
fp8 / 26.7 GiB in bf16, VAE full decode 4.38 GiB at 832x480 and 10.1 at 1280x720 (81 frames).
The Wan VAE decodes two latent frames at a time with a cache of the frames before, so its
working set follows the frame's area, not the clip's length; what grows with length is the
decoded clip, kept on the GPU in bf16 until the decode ends (6 bytes per pixel-frame). On
real ComfyUI (torch's peak counter, five sizes) that form holds within 1%. Measured peaks
refine the per-token and per-pixel figures per machine (`Calibration.refine`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    name: str
    experts: int  # 2 for Wan 2.2 A14B (high-noise + low-noise), 1 otherwise
    expert_bytes: int  # one expert's weights as stored
    blocks: int  # transformer blocks (block swap granularity)
    patch_div: int  # pixels per latent token side: VAE stride x patch (8x2 = 16, 16x2 = 32)
    act_bytes_per_token: float
    vae_weight_bytes: int
    vae_bytes_per_frame_pixel: float  # full decode's working set, per pixel of one frame
    vae_tiled_base_bytes: int  # tiled decode with default tiles: base + per pixel-frame
    vae_tiled_bytes_per_pixel_frame: float
    text_encoder_bytes: int

    @property
    def block_bytes(self) -> int:
        return self.expert_bytes // self.blocks


# Anchors (shared/ANCHORS.md). The 5B TI2V: 5.0 B params in fp16 (10 GiB), 30 blocks, dim
# 3072 (activations scale by width vs the 14B's 5120), VAE stride 16 with 2x2 patches.
_ACT_14B = 0.108 * MIB
# The decoded clip: RGB in bf16, on the GPU until the last chunk is decoded.
OUT_BYTES_PER_PIXEL_FRAME = 6
# The anchors' full decode at 81 frames less its output: 11.3 KB per pixel of a frame (the
# same at 832x480 and 1280x720).
_VAE_FP = 4.38 * GIB / (832 * 480) - 81 * OUT_BYTES_PER_PIXEL_FRAME
_TILED_BASE, _TILED_PF = int(0.17 * GIB), 25.6
_UMT5_FP8 = int(6.27e9)
# The Wan 2.1 VAE as ComfyUI 0.33 loads it (bf16): "242.03 MB loaded" in every H100 log
# (the anchors' 0.93 GiB was diffusers' fp32 master copy).
_VAE_21 = int(0.24 * GIB)

MODELS: dict[str, ModelSpec] = {
    "wan2.2-14b": ModelSpec("wan2.2-14b", 2, int(13.57 * GIB), 40, 16, _ACT_14B,
                            _VAE_21, _VAE_FP, _TILED_BASE, _TILED_PF, _UMT5_FP8),
    "wan2.2-14b-bf16": ModelSpec("wan2.2-14b-bf16", 2, int(26.7 * GIB), 40, 16, _ACT_14B,
                                 _VAE_21, _VAE_FP, _TILED_BASE, _TILED_PF, _UMT5_FP8),
    "wan2.1-14b": ModelSpec("wan2.1-14b", 1, int(13.57 * GIB), 40, 16, _ACT_14B,
                            _VAE_21, _VAE_FP, _TILED_BASE, _TILED_PF, _UMT5_FP8),
    "wan2.2-5b": ModelSpec("wan2.2-5b", 1, int(9.3 * GIB), 30, 32, _ACT_14B * 3072 / 5120,
                           int(1.4 * GIB), _VAE_FP * 1.5, _TILED_BASE, _TILED_PF * 1.5,
                           _UMT5_FP8),
    "wan2.1-1.3b": ModelSpec("wan2.1-1.3b", 1, int(2.6 * GIB), 30, 16, _ACT_14B * 1536 / 5120,
                             _VAE_21, _VAE_FP, _TILED_BASE, _TILED_PF, _UMT5_FP8),
}
CUDA_CONTEXT_BYTES = int(0.55 * GIB)


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1


def tokens(spec: ModelSpec, frames: int, width: int, height: int) -> int:
    return latent_frames(frames) * (height // spec.patch_div) * (width // spec.patch_div)


def expert_bytes_from_file(size_bytes: int, dtype: str) -> int:
    """Weights in VRAM for a checkpoint file: fp8 files load as stored; a bf16/fp16 file
    loaded as fp8 (weight_dtype fp8_e4m3fn) takes half its size."""
    return size_bytes // 2 if dtype.startswith("fp8") and size_bytes > 20 * GIB else size_bytes


@dataclass
class Calibration:
    """Per-machine refinements from measured peaks: scale and fixed overhead of the
    activation and decode figures. Measured peaks include what the allocator keeps
    (fragmentation, kernel workspaces), which the anchors' figures do not."""

    act_scale: float = 1.0
    act_base: int = 0
    # What a sampling stage takes above its weights however small the shot: measured on real
    # ComfyUI (benchmarks/calibrate_vram.py), about 5 GiB that the anchors' per-token figure
    # misses below ~50k tokens (load-time temporaries the allocator keeps).
    act_floor: int = 0
    vae_scale: float = 1.0
    vae_base: int = 0
    samples: int = 0

    def fit(self, kind: str, points: list[tuple[float, int]], per_unit: float) -> None:
        """Least-squares line through (units, measured bytes): slope becomes a scale of the
        anchor's per-unit figure, the intercept a fixed overhead (never negative)."""
        if not points:
            return
        if len(points) == 1:
            (x, y), = points
            slope, base = y / x, 0.0
        else:
            n = len(points)
            mx = sum(p[0] for p in points) / n
            my = sum(p[1] for p in points) / n
            var = sum((p[0] - mx) ** 2 for p in points)
            slope = sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else my / mx
            base = my - slope * mx
            if base < 0:
                slope, base = my / mx, 0.0
        if kind == "act":
            self.act_scale, self.act_base = slope / per_unit, int(base)
        else:
            self.vae_scale, self.vae_base = slope / per_unit, int(base)
        self.samples += len(points)

    def refine(self, kind: str, predicted: int, measured: int, weight: float = 0.3) -> None:
        """Nudge a scale toward one more measured peak (used after every real shot)."""
        if predicted <= 0 or measured <= 0:
            return
        ratio = measured / predicted
        if kind == "act":
            self.act_scale *= (1 - weight) + weight * ratio
        elif kind == "vae":
            self.vae_scale *= (1 - weight) + weight * ratio
        self.samples += 1

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> Calibration:
        return Calibration(**json.loads(path.read_text())) if path.is_file() else Calibration()


@dataclass(frozen=True)
class ShotCost:
    """Bytes each part of a shot needs on the GPU."""

    model: str
    frames: int
    width: int
    height: int
    tokens: int
    expert: int
    activations: int
    vae_weights: int
    decode_full: int
    decode_tiled: int
    text_encoder: int
    context: int

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items() if isinstance(v, int)
                and k not in ("frames", "width", "height", "tokens")}


@dataclass
class CostModel:
    spec: ModelSpec
    calibration: Calibration = field(default_factory=Calibration)
    context_bytes: int = CUDA_CONTEXT_BYTES

    @staticmethod
    def for_model(name: str, calibration: Calibration | None = None) -> CostModel:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        return CostModel(MODELS[name], calibration or Calibration())

    def with_expert_bytes(self, expert_bytes: int) -> CostModel:
        return replace(self, spec=replace(self.spec, expert_bytes=expert_bytes))

    def shot(self, frames: int, width: int, height: int) -> ShotCost:
        s = self.spec
        n = tokens(s, frames, width, height)
        pf = frames * width * height
        area = width * height
        return ShotCost(
            model=s.name, frames=frames, width=width, height=height, tokens=n,
            expert=s.expert_bytes,
            activations=max(self.calibration.act_floor, int(
                self.calibration.act_base
                + n * s.act_bytes_per_token * self.calibration.act_scale)),
            vae_weights=s.vae_weight_bytes,
            decode_full=int(self.calibration.vae_base
                            + area * s.vae_bytes_per_frame_pixel * self.calibration.vae_scale
                            + pf * OUT_BYTES_PER_PIXEL_FRAME),
            decode_tiled=int(s.vae_tiled_base_bytes + pf * s.vae_tiled_bytes_per_pixel_frame),
            text_encoder=s.text_encoder_bytes, context=self.context_bytes,
        )

    def tiled_decode_bytes(self, tile: int, overlap: int, temporal: int, frames: int) -> int:
        """ComfyUI's VAEDecodeTiled decodes one (tile+overlap)^2 x temporal block at a time:
        the full decode's working set over one tile's area, and that block's output."""
        side = tile + overlap
        return int(side * side * (self.spec.vae_bytes_per_frame_pixel * self.calibration.vae_scale
                                  + min(temporal, frames) * OUT_BYTES_PER_PIXEL_FRAME))

    def swap_blocks_needed(self, over_bytes: int) -> int:
        """Blocks to keep in host RAM so that `over_bytes` fewer weight bytes are resident;
        one more block is resident as the prefetch buffer."""
        if over_bytes <= 0:
            return 0
        return min(self.spec.blocks, math.ceil(over_bytes / self.spec.block_bytes) + 1)
