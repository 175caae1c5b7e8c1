"""VAE Fix for ComfyUI: strict drop-in VAE loading, raw log-variance maps and the SD-VAE
"black hole" detector, working on any KL VAE the host loads.

ComfyUI imports this file as the pack. Outside ComfyUI (tests, tools) it imports without error and
registers nothing; the engine (`vae_fix`) never needs ComfyUI.
"""
try:  # a pinned API version, not `latest`: newer hosts keep v0_0_2 while `latest` moves
    from comfy_api.v0_0_2 import ComfyExtension
except ModuleNotFoundError as e:  # not inside ComfyUI; any other import problem must surface
    if e.name not in ("comfy_api", "comfy_api.v0_0_2"):
        raise
    ComfyExtension = None

WEB_DIRECTORY = "./web"  # web/docs/<NodeId>.md (and <NodeId>/en.md, asked for first) are the help pages

if ComfyExtension is not None:
    from .nodes import all_nodes

    _NODES = all_nodes()  # imported now, so a broken module shows as IMPORT FAILED in the log

    class VAEFixExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return list(_NODES)

    async def comfy_entrypoint() -> VAEFixExtension:
        return VAEFixExtension()

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"] if ComfyExtension is not None else ["WEB_DIRECTORY"]
