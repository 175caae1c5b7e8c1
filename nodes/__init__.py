"""The ComfyUI nodes of VAE Fix (V3 API). Importing a node module needs ComfyUI; the engine does not.

Each module in `NODE_MODULES` exports `NODES`, a list of `io.ComfyNode` classes. To add nodes,
write a module in the same style (thin: ComfyUI types in, engine calls, ComfyUI types out; host
internals only through `host.py`) and append its name here.
"""
from __future__ import annotations

import importlib

NODE_MODULES = ["loader", "convert", "fp16_fix", "health", "inspect", "logvar_map", "edit", "safe", "stats", "reach", "latent_preview", "repair", "compare"]


def all_nodes() -> list:
    """Every node class of the pack, in menu order."""
    nodes = []
    for name in NODE_MODULES:
        nodes.extend(importlib.import_module(f".{name}", __name__).NODES)
    return nodes
