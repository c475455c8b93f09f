"""A ComfyUI extension, loaded only by the benchmark's own server (`comfyui_gpu.py` copies it
into the server's `custom_nodes`): GET /stv/torch_peak answers the most torch allocated since
the previous call, then starts a new interval.

Why: /system_stats gives the allocation at the instant it is asked. A VAE decode allocates and
frees within each 0.1 to 0.3 s chunk, so samples of it miss the peaks and report a maximum
that grows with the number of samples taken (a 33-frame decode read lower than a 161-frame
one at the same size). torch's own peak counter misses nothing between two reads.
"""

from __future__ import annotations

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict[str, type] = {}  # no nodes; ComfyUI skips a module without it


@PromptServer.instance.routes.get("/stv/torch_peak")
async def torch_peak(_request: web.Request) -> web.Response:
    if not torch.cuda.is_available():
        return web.json_response({"cuda": False})
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return web.json_response({"cuda": True, "peak": peak,
                              "allocated": torch.cuda.memory_allocated(),
                              "reserved": torch.cuda.memory_reserved(),
                              "total": torch.cuda.get_device_properties(0).total_memory})
