"""Random-weight model files with the names the shipped workflows use, for a real ComfyUI.

Run by `comfyui_test_server.py` with ComfyUI's own Python, from inside a ComfyUI checkout, so
that every tensor name and shape comes from ComfyUI's own classes (built on the meta device:
nothing is allocated). Tensors are written one by one with a streaming safetensors writer, so
the full-size 14B experts (13.6 GiB in fp8) never have to fit in RAM.

Profiles:
  tiny  CPU tests: 2-layer Wan experts (dim 128), a narrow Wan 2.1 VAE, dummy LoRAs; the
        umt5-xxl text encoder and the Wan 2.2 VAE at full size (ComfyUI fixes their config).
  full  GPU benchmarks: Wan 2.2 A14B experts at full size in the fp8_scaled format ComfyUI
        users download, the full Wan 2.1 VAE and rank-64 LoRAs on every attention and FFN
        linear of the experts.

Usage: python comfyui_models.py PROFILE MODELS_DIR [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SEED = 1234
STD = 0.02
POOL_ELEMENTS = 1 << 22  # values are drawn once and tiled: random enough, and fast to write
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}

# name -> (folder, builder). The builders return {tensor name: (shape, dtype)} or raw tensors.
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _pool(dtype: torch.dtype) -> bytes:
    g = torch.Generator().manual_seed(SEED)
    values = torch.randn(POOL_ELEMENTS, generator=g) * STD
    return values.to(dtype).view(torch.uint8).numpy().tobytes()


_POOLS: dict[torch.dtype, bytes] = {}


def _random_bytes(dtype: torch.dtype, nbytes: int, salt: int) -> Iterator[bytes]:
    pool = _POOLS.setdefault(dtype, _pool(dtype))
    step = torch.tensor([], dtype=dtype).element_size()
    start = (salt * 7919 * step) % len(pool)
    start -= start % step
    left = nbytes
    while left > 0:
        chunk = pool[start:start + left]
        yield chunk
        left -= len(chunk)
        start = 0


def write_safetensors(path: Path, spec: Spec, fixed: dict[str, torch.Tensor] | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Stream a safetensors file: random values for `spec`, exact values for `fixed`."""
    fixed = fixed or {}
    header: dict[str, object] = {}
    offset = 0
    entries: list[tuple[str, torch.dtype, int]] = []
    for name, (shape, dtype) in spec.items():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        entries.append((name, dtype, nbytes))
        offset += nbytes
    for name, t in fixed.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for i, (_, dtype, nbytes) in enumerate(entries):
            for chunk in _random_bytes(dtype, nbytes, i):
                fh.write(chunk)
        for t in fixed.values():
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def _meta_spec(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> Spec:
    with torch.device("meta"):
        module = build()
    return {k: (tuple(v.shape), dtype) for k, v in module.state_dict().items()}


# -- Wan diffusion models ----------------------------------------------------------------------
def wan_spec(dim: int, ffn: int, layers: int, in_dim: int, out_dim: int) -> Spec:
    import comfy.ldm.wan.model as wan
    import comfy.ops

    return _meta_spec(lambda: wan.WanModel(
        model_type="t2v", in_dim=in_dim, dim=dim, ffn_dim=ffn, num_heads=max(1, dim // 128),
        num_layers=layers, out_dim=out_dim, operations=comfy.ops.disable_weight_init),
        torch.bfloat16)


def fp8_scaled(spec: Spec) -> tuple[Spec, dict[str, torch.Tensor]]:
    """The 'fp8_scaled' layout of ComfyUI's Wan files: 2-D block weights in fp8 e4m3fn with
    a float32 `scale_weight` each, the rest in bf16, and a `scaled_fp8` marker tensor."""
    out: Spec = {}
    fixed: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for name, (shape, dtype) in spec.items():
        if name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
            out[name] = (shape, torch.float8_e4m3fn)
            fixed[name.removesuffix(".weight") + ".scale_weight"] = torch.ones(
                (), dtype=torch.float32)
        else:
            out[name] = (shape, dtype)
    return out, fixed


def lora_spec(base: Spec, rank: int) -> Spec:
    """A LoRA on every 2-D linear of the transformer blocks, in the key form ComfyUI maps."""
    out: Spec = {}
    for name, (shape, _) in base.items():
        if name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2:
            stem = "diffusion_model." + name.removesuffix(".weight")
            out[f"{stem}.lora_down.weight"] = ((rank, shape[1]), torch.bfloat16)
            out[f"{stem}.lora_up.weight"] = ((shape[0], rank), torch.bfloat16)
    return out


# -- VAEs --------------------------------------------------------------------------------------
def vae21_spec(dim: int) -> Spec:
    import comfy.ldm.wan.vae as vae

    return _meta_spec(lambda: vae.WanVAE(
        dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3),
        torch.bfloat16)


def vae22_spec() -> Spec:
    import comfy.ldm.wan.vae2_2 as vae

    return _meta_spec(lambda: vae.WanVAE(
        dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True]), torch.float16)


# -- umt5-xxl ----------------------------------------------------------------------------------
def umt5_spec() -> Spec:
    import comfy.ops
    import comfy.text_encoders.t5 as t5

    cfg = json.loads((Path("comfy/text_encoders/umt5_config_xxl.json")).read_text())
    return _meta_spec(lambda: t5.T5(cfg, torch.float8_e4m3fn, None,
                                    comfy.ops.disable_weight_init), torch.float8_e4m3fn)


def spiece_model(vocab: int = 1000) -> torch.Tensor:
    """A small SentencePiece model (trained here on generated text) as uint8 bytes."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(SEED)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "el", "an", "or", "us", "ph",
            "th", "st", "ing", "er", "ed", "wa", "le"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    lines += ["a lighthouse keeper walks along the pier at dusk, cinematic, 35mm film"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=vocab, model_type="unigram",
                                   hard_vocab_limit=False, minloglevel=2)
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8).clone()


# -- profiles ----------------------------------------------------------------------------------
TINY = {"dim": 128, "ffn": 256, "layers": 2}
FULL = {"dim": 5120, "ffn": 13824, "layers": 40}


def jobs(profile: str) -> dict[str, Callable[[Path], None]]:
    size = TINY if profile == "tiny" else FULL

    def expert(in_dim: int, out_dim: int = 16, shape: dict[str, int] | None = None
               ) -> Callable[[Path], None]:
        def make(path: Path) -> None:
            s = shape or size
            spec = wan_spec(s["dim"], s["ffn"], s["layers"], in_dim, out_dim)
            if profile == "full" and s is FULL:
                scaled, fixed = fp8_scaled(spec)
                write_safetensors(path, scaled, fixed)
            else:
                write_safetensors(path, spec)
        return make

    def lora(path: Path) -> None:
        if profile == "tiny":  # ComfyUI warns about keys it cannot map and goes on
            write_safetensors(path, {"dummy.lora_up.weight": ((1, 1), torch.bfloat16)})
        else:
            write_safetensors(path, lora_spec(wan_spec(**_wan_args(FULL), in_dim=16,
                                                       out_dim=16), 64))

    def umt5(path: Path) -> None:
        write_safetensors(path, umt5_spec(), {"spiece_model": spiece_model()})

    out: dict[str, Callable[[Path], None]] = {
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": umt5,
        "vae/wan_2.1_vae.safetensors":
            lambda p: write_safetensors(p, vae21_spec(16 if profile == "tiny" else 96)),
        "diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": expert(16),
        "diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": expert(16),
        "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": lora,
        "loras/wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": lora,
    }
    if profile == "tiny":  # the GPU benchmark runs the T2V workflow only
        out.update({
            "diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors": expert(36),
            "diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors": expert(36),
            "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": lora,
            "loras/wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": lora,
            "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors": expert(48, 48),
            "vae/wan2.2_vae.safetensors": lambda p: write_safetensors(p, vae22_spec()),
        })
    return out


def _wan_args(size: dict[str, int]) -> dict[str, int]:
    return {"dim": size["dim"], "ffn": size["ffn"], "layers": size["layers"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", choices=["tiny", "full"])
    ap.add_argument("models_dir", type=Path)
    ap.add_argument("--only", nargs="*", default=None, help="relative paths to (re)make")
    ap.add_argument("--cpu", action="store_true", help="import ComfyUI in --cpu mode")
    args = ap.parse_args()
    sys.argv = [sys.argv[0]] + (["--cpu"] if args.cpu else [])
    sys.path.insert(0, os.getcwd())  # run from inside the ComfyUI checkout
    import comfy.options

    comfy.options.enable_args_parsing(True)
    for rel, make in jobs(args.profile).items():
        if args.only is not None and rel not in args.only:
            continue
        path = args.models_dir / rel
        if path.is_file():
            continue
        t = time.monotonic()
        make(path)
        print(f"{rel}: {path.stat().st_size / 2**30:.2f} GiB in {time.monotonic() - t:.1f}s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
