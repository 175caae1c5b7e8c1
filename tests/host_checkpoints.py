"""Small whole checkpoints (diffusion model + text encoder + VAE) for the generation host tests.

Built at test time by the host's own classes, in the host's Python (ComfyUI imports torchvision,
which the pack's test environment need not have), with random weights: nothing is downloaded and
nothing is committed. Each builder then loads its file with `comfy.sd.load_checkpoint_guess_config`
and reports what the host detected, so a test can assert the detection instead of trusting it.

- SD1.5: a one-level `UNetModel` (model_channels 320, context 768, one transformer block, linear
  projections off): `supported_models.SD15` matches on exactly those keys. CLIP-L from
  `sd1_clip.SDClipModel`; a full-size SD VAE (core builds its VAE from the weights alone, 128 wide).
- SD3: an `MMDiT` of depth 2 (hidden 128) with only CLIP-L under `text_encoders.clip_l.`:
  `supported_models.SD3` matches on {"in_channels": 16, "pos_embed_scaling_factor": None} and
  `SD3.clip_target` takes only the text encoders it finds; a full-size 16-channel VAE.
- SDXL cannot be small: `supported_models.SDXL` (and its smallest relatives Segmind_Vega, KOALA)
  match `transformer_depth` exactly ([0, 0, 2, 2, 10, 10]; Vega [0, 0, 1, 1, 2, 2]) with
  `context_dim` 2048 and `adm_in_channels` 2816, and `SDXL.clip_target` always builds
  `sdxl_clip.SDXLClipModel`, whose CLIP-G has the fixed bigG size of `clip_config_bigg.json`
  (about 694 M parameters, built in full at load time whatever the file holds).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from host_server import HostError, HostServer
from vae_files import random_compvis

SD15_NAME = "v1-5-pruned-emaonly-fp16.safetensors"     # the name the SD1.5 example workflows use
SD3_NAME = "tiny_sd3_medium_incl_clips.safetensors"
SD15_VAE = "vae-ft-mse-840000-ema-pruned.safetensors"  # the VAE file the SD1.5 example workflows swap in
SD3_VAE = "tiny_sd3_vae_full.safetensors"
_BUILT: dict = {}  # (base dir, kind) -> what the host detected: each checkpoint built once per server

_SCRIPT = r'''
import json, sys
kind, out, vae_path = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.ops, comfy.sd, comfy.sd1_clip
from safetensors.torch import load_file, save_file

if kind == "sd15":
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    model = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                      channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                      context_dim=768, transformer_depth_middle=1, transformer_depth_output=[1, 1],
                      use_linear_in_transformer=False, operations=comfy.ops.manual_cast, device="cpu")
    clip_prefix = "cond_stage_model."
else:
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    model = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=2048,
                  context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                  pos_embed_max_size=16, num_patches=256, operations=comfy.ops.manual_cast, device="cpu")
    clip_prefix = "text_encoders.clip_l."
clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
g = torch.Generator().manual_seed(0)
sd = {}
for prefix, part in (("model.diffusion_model.", model), (clip_prefix, clip)):
    for k, v in part.state_dict().items():
        if v.is_floating_point():
            if v.dim() > 1:
                v = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
            else:
                v = torch.ones(v.shape) if k.endswith("weight") else 0.02 * torch.randn(v.shape, generator=g)
            v = v.half()
        sd[prefix + k] = v.contiguous()
sd.update({"first_stage_model." + k: v.half() for k, v in load_file(vae_path).items()})
save_file(sd, out)
m, c, vae = comfy.sd.load_checkpoint_guess_config(out)[:3]
print(json.dumps({"model": type(m.model).__name__, "config": type(m.model.model_config).__name__,
                  "latent_format": type(m.model.latent_format).__name__, "clip": type(c.cond_stage_model).__name__,
                  "vae_channels": vae.latent_channels, "vae_downscale": vae.downscale_ratio}))
'''


def build_checkpoint(server: HostServer, kind: str, name: str) -> dict:
    """Write checkpoint `name` ("sd15" or "sd3") into the server's models/checkpoints; returns what
    the host detected: {"model", "config", "latent_format", "clip", "vae_channels", "vae_downscale"}."""
    path = server.checkpoints_dir / name
    family = {"sd15": "sd", "sd3": "sd3"}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        vae_path = Path(tmp) / "vae.safetensors"
        save_file(random_compvis(family, small=False, seed=5), str(vae_path))
        env = dict(os.environ, PYTHONPATH=str(server.comfy_path))
        done = subprocess.run([server.python, "-c", _SCRIPT, kind, str(path), str(vae_path)], cwd=server.comfy_path,
                              env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise HostError(f"could not build the {kind} checkpoint:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generation_models(server: HostServer, kind: str) -> dict:
    """Checkpoint and swap-in VAE of `kind` ("sd15", "sd3") in the server's folders, built once per
    server; returns {"checkpoint", "vae", "detected"}."""
    key = (str(server.base), kind)
    if key not in _BUILT:
        checkpoint, vae, family = {"sd15": (SD15_NAME, SD15_VAE, "sd"), "sd3": (SD3_NAME, SD3_VAE, "sd3")}[kind]
        if not (server.vae_dir / vae).exists():
            write_workflow_vae(server, family, vae)
        _BUILT[key] = {"checkpoint": checkpoint, "vae": vae, "detected": build_checkpoint(server, kind, checkpoint)}
    return _BUILT[key]


def write_workflow_vae(server: HostServer, family: str, name: str, seed: int = 7) -> str:
    """A full-size VAE of `family` ("sd", "sd3") in models/vae under `name`, unlike the checkpoint's own."""
    sd = {k: v.half() for k, v in random_compvis(family, small=False, seed=seed).items()}
    save_file(sd, str(server.vae_dir / name))
    return name


def vae_swapped_in(prompt: dict, loader: dict) -> dict:
    """`prompt` with every VAEFixLoadVAE replaced by `loader` (e.g. core VAELoader of the same file)."""
    return {k: (dict(loader) if n["class_type"] == "VAEFixLoadVAE" else n) for k, n in prompt.items()}


def cpu_sized(prompt: dict, size: int = 64, steps: int = 4) -> dict:
    """The generation graph as shipped, at `size` px and `steps` steps (in place; returned)."""
    for node in prompt.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=size, height=size)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = steps
    return prompt



# ---------------------------------------------------------------- graph pieces the generation tests share

def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def with_defaults(server: HostServer, class_type: str, **inputs) -> dict:
    """A node with every widget the server declares at its default, `inputs` on top: a test names only
    what it means to set, and follows a default the pack changes."""
    declared = server.get_json(f"/object_info/{class_type}")[class_type]["input"]
    widgets = {name: spec[1]["default"] for section in ("required", "optional")
               for name, spec in declared.get(section, {}).items() if len(spec) > 1 and "default" in spec[1]}
    return node(class_type, **{**widgets, **inputs})


def save_latent(source: list, prefix: str) -> dict:
    return node("SaveLatent", samples=source, filename_prefix=f"latents/{prefix}")


def saved_latent(server: HostServer, outputs: dict, node_id: str):
    """The samples a core Save Latent node wrote (`[B, C, h, w]`, raw VAE space)."""
    from safetensors.torch import load_file

    return load_file(str(server.output_file(outputs[node_id]["latents"][0])))["latent_tensor"]


def cell_mask(size: int, y: int, x: int) -> tuple[tuple[str, dict], ...]:
    """Nodes "cm0".."cm2": a `size`² mask (the latent grid), 1 at cell (y, x) only."""
    return (("cm0", node("SolidMask", value=0.0, width=size, height=size)),
            ("cm1", node("SolidMask", value=1.0, width=1, height=1)),
            ("cm2", node("MaskComposite", destination=["cm0", 0], source=["cm1", 0], x=x, y=y, operation="add")))
