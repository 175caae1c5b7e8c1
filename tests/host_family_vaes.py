"""Random-weight VAEs of every family the host builds, made by the host's own classes and saved in
the layout the host detects (its sentinel keys), for the family host tests.

The host picks a family's class and its fixed sizes from a few sentinel keys, so each file is built
by handing `comfy.sd.VAE` just those keys (their loading skipped), then giving every weight of the
model it built a seeded random value. Nothing of ComfyUI is copied here: the sizes are the host's.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from host_server import HostError, HostServer
from vae_fix.probes import photo

# family -> sentinel keys and the shapes the host reads off them (comfy/sd.py, VAE.__init__)
SENTINELS = {
    "wan21": {"decoder.middle.0.residual.0.gamma": (384, 1, 1)},
    "wan22": {"decoder.middle.0.residual.0.gamma": (1024, 1, 1),
              "decoder.upsamples.0.upsamples.0.residual.2.weight": (1, 1)},
    "hunyuan_video": {"decoder.conv_in.conv.weight": (512, 16, 3, 3, 3), "post_quant_conv.weight": (16, 16, 1, 1, 1)},
    "hunyuan_video15": {"decoder.conv_in.weight": (1024, 32, 3, 3, 3)},
    "hunyuan_image": {"decoder.conv_in.weight": (1024, 64, 3, 3)},
    "hunyuan_image_refiner": {"decoder.conv_in.conv.weight": (1024, 32, 3, 3, 3)},
    "mochi": {"decoder.blocks.2.blocks.3.stack.5.weight": (1,), "encoder.layers.4.layers.1.attn_block.attn.qkv.weight": (1,)},
    "ltxv": {"decoder.up_blocks.0.res_blocks.0.conv1.conv.weight": (512, 1)},
    "svd": {"decoder.mid.block_1.mix_factor": (1,), "decoder.conv_in.weight": (512, 4, 3, 3)},
    "cosmos": {"decoder.unpatcher3d.wavelets": (1,)},
}

_SCRIPT = r'''
import json, sys
family, out, seed, sentinels = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
overflow, repo = sys.argv[5], sys.argv[6]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.sd
from safetensors.torch import save_file

load = torch.nn.Module.load_state_dict
torch.nn.Module.load_state_dict = lambda self, sd, strict=True, assign=False: ([], [])  # sentinels only
try:
    vae = comfy.sd.VAE(sd={k: torch.zeros(s) for k, s in sentinels.items()})
finally:
    torch.nn.Module.load_state_dict = load
g = torch.Generator().manual_seed(seed)
sd = {}
for k, v in vae.first_stage_model.state_dict().items():
    if v.is_floating_point():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("gamma", "weight", "scale") and (v.dim() <= 1 or leaf == "gamma"):
            v = torch.ones(v.shape)                                   # norm scales
        elif "std" in leaf:
            v = torch.ones(v.shape)                                   # LTXV's latent statistics
        elif v.dim() > 1:
            v = torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5
        else:
            v = 0.02 * torch.randn(v.shape, generator=g)              # biases, means, mixing factors
        v = v.half()
    sd[k] = v.contiguous()
if overflow:  # every stretch of the residual streams scaled up exactly (the pack's plan): fp16 gives inf
    sys.path.insert(0, repo)
    from vae_fix.fp16_scales import PLANS, apply_scales
    model = vae.first_stage_model.float()
    model.load_state_dict(sd)
    plan = PLANS[overflow](model)
    apply_scales(plan, {key: 3e4 * (1 + key[1]) for key in plan.stream_keys})
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # float32: scaled weights pass fp16's range
for k, s in sentinels.items():
    sd.setdefault(k, torch.zeros(s).half())  # a sentinel the model does not keep (Cosmos' wavelets buffer)
save_file(sd, out)
print(json.dumps({"model": type(vae.first_stage_model).__name__, "tensors": len(sd),
                  "params": sum(v.numel() for v in sd.values()), "latent_channels": vae.latent_channels}))
'''

_BUILT: dict = {}


def family_vae(server: HostServer, family: str, seed: int = 0, overflow: str = "") -> tuple[str, dict]:
    """`family`'s random-weight VAE in the server's models/vae (built once per server): (file name, what was
    built). `overflow`: the structure of its residual streams (`fp16_scales.PLANS`), scaled up so fp16 overflows."""
    name = f"family_{family}{'_overflow' if overflow else ''}.safetensors"
    key = (str(server.base), name)
    if key not in _BUILT:
        env = dict(os.environ, PYTHONPATH=str(server.comfy_path))
        done = subprocess.run([server.python, "-c", _SCRIPT, family, str(Path(server.vae_dir) / name), str(seed),
                               json.dumps(SENTINELS[family]), overflow, str(Path(__file__).resolve().parents[1])],
                              cwd=server.comfy_path, env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise HostError(f"could not build the {family} VAE:\n{done.stderr[-3000:]}")
        _BUILT[key] = json.loads(done.stdout.strip().splitlines()[-1])
    return name, _BUILT[key]


CLIP = "pan_6_frames.webp"


def write_clip(host, frames: int = 6, size: int = 64) -> str:
    """An animated WebP of a photo panning right 4 px a frame: Load Image gives one image per frame."""
    pan = (photo("chelsea", size + 4 * frames)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(pan[:size, 4 * t:4 * t + size]) for t in range(frames)]
    images[0].save(host.input_dir / CLIP, save_all=True, append_images=images[1:], lossless=True, duration=100)
    return CLIP
