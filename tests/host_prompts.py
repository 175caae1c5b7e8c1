"""API-format prompt pieces the host tests queue (one dict per node, inputs by name), and the
readers of what the nodes sent back."""
from __future__ import annotations

import math

import os
import uuid

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from host_models import IMAGE
from host_server import WORKFLOWS, HostServer, succeeded

# ---------------------------------------------------------------- core nodes

TILES = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}  # 8-cell tiles, 3 passes


def ours(name: str, dtype: str = "auto") -> dict:
    """The pack's strict Load VAE."""
    return {"class_type": "VAEFixLoadVAE", "inputs": {"vae_name": name, "dtype": dtype}}


def core(name: str) -> dict:
    """Core's Load VAE (also lists "taesd" and "pixel_space")."""
    return {"class_type": "VAELoader", "inputs": {"vae_name": name}}


def load_image(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def encode(pixels: list, vae: list) -> dict:
    return {"class_type": "VAEEncode", "inputs": {"pixels": pixels, "vae": vae}}


def preview_text(source: list) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": source}}


def save_latent(source: list, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": f"latents/{prefix}"}}


def encode_decode(vae_loader: dict, image: str, tiled: bool = False) -> dict:
    """Core VAE Encode → VAE Decode (or VAE Decode (Tiled)) → Save Image "5", with the given loader."""
    dec, extra = ("VAEDecodeTiled", TILES) if tiled else ("VAEDecode", {})
    return {"1": vae_loader, "2": load_image(image), "3": encode(["2", 0], ["1", 0]),
            "4": {"class_type": dec, "inputs": {"samples": ["3", 0], "vae": ["1", 0], **extra}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "roundtrip"}}}


def encoded(vae_name: str, image: str, *extra_nodes: tuple[str, dict]) -> dict:
    """Load VAE (strict) "1" → Load Image "2" → VAE Encode "3", plus the given nodes."""
    prompt = {"1": ours(vae_name), "2": load_image(image), "3": encode(["2", 0], ["1", 0])}
    prompt.update(dict(extra_nodes))
    return prompt


# ---------------------------------------------------------------- the pack's nodes, with the widgets' defaults

LV_DEFAULTS = {"value": "log-variance (raw)", "show": "lowest over channels", "channel": 0, "colormap": "magma",
               "range_mode": "percentile", "low": 1.0, "high": 99.0, "colorbar": False, "size_policy": "crop"}
EDIT_DEFAULTS = {"operation": "scale (x factor)", "channels": "all", "factor": 1.0, "offset": 0.0, "low": -4.0,
                 "high": 4.0, "limit": 3.0, "mean": 0.0, "std": 1.0, "target": "", "batch": "all"}
REACH_DEFAULTS = {"mode": "median", "factor": 2.0, "window": 3, "index": 0, "blocks": 3, "top": 5, "colormap": "inferno"}
CELL_DEFAULTS = {"cells": "", "mode": "median", "factor": 2.0, "window": 3, "index": 0, "batch_size": 4, "colormap": "inferno"}
REPAIR_DEFAULTS = {"source": "auto", "posterior_threshold": 5.0, "latent_threshold": 8.0, "window": 3, "measure_cells": 8,
                   "fast_map": True}
COMPARE_DEFAULTS = {"name_a": "A", "name_b": "B", "window": 3, "reach": True, "size_policy": "crop", "colormap": "magma"}


def lv_map(vae: dict, image: str, **widgets) -> dict:
    """Loader "1" → Load Image "2" → Log-Variance Map "3" → its statistics in PreviewAny "4"."""
    return {"1": vae, "2": load_image(image),
            "3": {"class_type": "VAEFixLogVarianceMap", "inputs": {"vae": ["1", 0], "image": ["2", 0], **LV_DEFAULTS, **widgets}},
            "4": preview_text(["3", 1])}


def channel_edit(latent: list, **widgets) -> dict:
    return {"class_type": "VAEFixLatentChannelEdit", "inputs": {"latent": latent, **EDIT_DEFAULTS, **widgets}}


def reach_map(vae: list, latent: list, **widgets) -> dict:
    return {"class_type": "VAEFixLatentReachMap", "inputs": {"vae": vae, "latent": latent, **REACH_DEFAULTS, **widgets}}


def cell_reach(vae: list, latent: list, **widgets) -> dict:
    return {"class_type": "VAEFixLatentCellReach", "inputs": {"vae": vae, "latent": latent, **CELL_DEFAULTS, **widgets}}


def repair_node(vae: list, latent: list, **widgets) -> dict:
    return {"class_type": "VAEFixRepairLatent", "inputs": {"vae": vae, "latent": latent, **REPAIR_DEFAULTS, **widgets}}


def compare_node(vae_a: list, vae_b: list, image: list, **widgets) -> dict:
    return {"class_type": "VAEFixCompareVAEs", "inputs": {"vae_a": vae_a, "vae_b": vae_b, "image": image,
                                                          **COMPARE_DEFAULTS, **widgets}}


# ---------------------------------------------------------------- the example workflows, with the tests' files

def fed_by(prompt: dict, class_type: str, source: str, slot: int) -> str:
    """The id of the one `class_type` node whose input is output `slot` of node `source`."""
    found = [k for k, n in prompt.items() if n["class_type"] == class_type and [source, slot] in n["inputs"].values()]
    assert len(found) == 1, f"expected one {class_type} fed by {source}:{slot}"
    return found[0]


def use_models(prompt: dict, vae: str, image: str = IMAGE) -> dict:
    """The workflow as shipped, with the tests' files in place of the user's."""
    for node in prompt.values():
        if node["class_type"] == "VAEFixLoadVAE":
            node["inputs"]["vae_name"] = vae
        elif node["class_type"] == "LoadImage":
            node["inputs"]["image"] = image
    return prompt


def cpu_sized(prompt: dict, checkpoint: str) -> dict:
    """The text-to-image graph as shipped, with the tiny checkpoint, 128 px and 3 steps (CPU)."""
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = checkpoint
        elif node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=128, height=128)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
    return prompt


def panels(picture: np.ndarray) -> list[np.ndarray]:
    """The side-by-side panels of a strip `[H, W, 3]`, split at columns all of the background colour
    (the top-left pixel: the pack's pictures have a label band above their panels)."""
    flat = (picture == picture[:1, :1]).all(axis=(0, 2))  # columns entirely the corner's colour
    cuts, start = [], None
    for x, is_gap in enumerate(list(flat) + [True]):
        if not is_gap and start is None:
            start = x
        elif is_gap and start is not None:
            cuts.append((start, x)); start = None
    merged = []
    for a, b in cuts:  # a colour bar's bar, ticks and labels are narrow pieces of one panel
        if merged and b - a < picture.shape[0] // 3 and merged[-1][1] >= a - 12:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return [picture[:, a:b] for a, b in merged]


def card(picture: np.ndarray, gap: int = 6) -> np.ndarray:
    """A wide strip of panels rewrapped into rows so that it reads at a template card's (square) size."""
    h, w = picture.shape[:2]
    parts = panels(picture)
    if w < 2 * h or len(parts) < 3:
        return picture
    columns = math.ceil(math.sqrt(len(parts)))
    rows = [parts[i:i + columns] for i in range(0, len(parts), columns)]
    width = max(sum(p.shape[1] for p in row) + gap * (len(row) - 1) for row in rows)
    out = np.empty((h * len(rows) + gap * (len(rows) - 1), width, 3), picture.dtype)
    out[:] = picture[0, 0]
    for r, row in enumerate(rows):
        x = 0
        for p in row:
            out[r * (h + gap):r * (h + gap) + h, x:x + p.shape[1]] = p
            x += p.shape[1] + gap
    return out


def write_thumbnail(name: str, picture: np.ndarray, min_side: int = 256) -> None:
    """With VAEFIX_WRITE_THUMBNAILS=1, the picture a workflow produced becomes its template thumbnail."""
    if not os.environ.get("VAEFIX_WRITE_THUMBNAILS"):
        return
    im = Image.fromarray(card(picture))
    zoom = max(1, -(-min_side // min(im.size)))
    im.resize((im.width * zoom, im.height * zoom), Image.NEAREST).save(WORKFLOWS / f"{name}.jpg", quality=90)


# ---------------------------------------------------------------- reading the results

def text_of(outputs: dict, node_id: str) -> str:
    return outputs[node_id]["text"][0]


def saved_latent(server: HostServer, outputs: dict, node_id: str) -> torch.Tensor:
    """The samples a core Save Latent node wrote (`[B, C, h, w]`, raw VAE space)."""
    item = outputs[node_id]["latents"][0]
    return load_file(str(server.output_file(item)))["latent_tensor"]


def server_still_serves(host: HostServer) -> None:
    """After a node error the server answers and still *executes* prompts: a fresh encode of a
    never-seen image (random colour, so nothing comes from ComfyUI's cache) through the strict loader."""
    assert host.alive()
    assert "system" in host.get_json("/system_stats")
    tag = uuid.uuid4().hex[:8]
    prompt = {"1": ours("tiny_sd.safetensors"),
              "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                           "color": int(tag[:6], 16)}},
              "3": encode(["2", 0], ["1", 0]), "4": save_latent(["3", 0], f"alive_{tag}")}
    latent = saved_latent(host, succeeded(host.run(prompt)), "4")
    assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()
