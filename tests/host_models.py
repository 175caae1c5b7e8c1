"""The VAEs, images and checkpoint every host test suite uses, built once per session into the
server's folders (models/vae, models/vae_approx, models/checkpoints, input). Nothing is downloaded:
random weights in the real layouts, or planted anomalies at known cells."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from host_server import HostError, HostServer
from hostile_inputs import write_hostile_vaes
from vae_files import write_state_dict, write_vae

from vae_fix.builders.overflow import norm_overflow_vae, overflowing_vae
from vae_fix.builders.planted import corner_hole_vae, planted_vae, smooth_vae
from vae_fix.images import save_png
from vae_fix.loader import save_vae
from vae_fix.model import VAEConfig, preset_config

PLANTED_CELL = (9, 21)     # 32x32 latent grid: 128 px images for the small layouts (4x), 256 px for full SD (8x)
PLANTED16_CELL = (20, 6)   # 16-channel (SD3/Flux layout), same grid
SMUGGLER_CELL = (9, 21)    # log-variance hole and mean spike (small SD layout, 128 px image)
SMUGGLER = "smuggler_sd.safetensors"   # SD layout (small): log-variance hole and mean spike at SMUGGLER_CELL
CLEAN = "clean_sdxl.safetensors"       # SDXL layout (small), seeded random weights: nothing planted
WIDE = "tiny_sd3_16ch.safetensors"     # SD3 layout (small): 16 latent channels
OVERFLOW = "overflow_sd.safetensors"   # SD layout (small): streams scaled up exactly, so fp16 gives inf
NORM_OVERFLOW = "norm_overflow_sd.safetensors"  # a decoder norm's own output passes fp16's range: needs --finetune
CORNER = "corner_sd.safetensors"       # SD layout (small): a log-variance hole at (0, 0) whatever the image
IMAGE = "smuggler.png"                 # the smuggler's calibration image, 128 px


def build_models(server: HostServer) -> None:
    """Every VAE and image of the host suites, before the server starts."""
    _strict_loader_vaes(server)
    _planted_vaes(server)
    _latent_vaes(server)
    _taesd(server)
    _gradients(server)


def _strict_loader_vaes(server: HostServer) -> None:
    vae_dir = server.vae_dir
    write_vae(vae_dir, "sd", name="tiny_sd")
    write_vae(vae_dir, "sd3", name=WIDE.removesuffix(".safetensors"), seed=3)
    write_vae(vae_dir, "sd", layout="diffusers", container="folder", name="diffusers_sd", seed=1)
    write_vae(vae_dir, "sdxl", name=CLEAN.removesuffix(".safetensors"), seed=1)
    good = (vae_dir / "tiny_sd.safetensors").read_bytes()
    (vae_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    write_hostile_vaes(vae_dir)


def _planted_vaes(server: HostServer) -> None:
    vae_dir, inp = server.vae_dir, server.input_dir
    for name, cfg, cell in (("planted_sd", preset_config("sd", small=True), PLANTED_CELL),
                            ("planted_16ch", preset_config("sd3", small=True), PLANTED16_CELL),
                            ("full_sd", preset_config("sd"), PLANTED_CELL)):  # full: the published SD layout
        planted = planted_vae(cfg, cell=cell)
        save_vae(planted.model.half() if name == "full_sd" else planted.model, vae_dir / f"{name}.safetensors")
        save_png(planted.image[0], inp / f"{name}.png")
    smooth = smooth_vae(preset_config("sd", small=True))  # same construction, no hole: a negative control
    save_vae(smooth.model, vae_dir / "smooth_sd.safetensors")
    save_vae(corner_hole_vae(preset_config("sd", small=True)).model, vae_dir / CORNER)  # a hole on every image
    save_vae(overflowing_vae(), vae_dir / OVERFLOW)
    save_vae(norm_overflow_vae(), vae_dir / NORM_OVERFLOW)
    save_png(smooth.image[0], inp / "smooth_sd.png")
    sd = load_file(str(vae_dir / "full_sd.safetensors"))  # a layout core builds, so core runs it half-loaded
    del sd["decoder.up.0.block.1.conv2.weight"], sd["encoder.mid.attn_1.q.bias"]
    write_state_dict(sd, vae_dir / "missing_keys.safetensors", "safetensors")


def _latent_vaes(server: HostServer) -> None:
    smuggler = smuggler_vae(preset_config("sd", small=True), SMUGGLER_CELL)
    save_vae(smuggler.model, server.vae_dir / SMUGGLER)
    save_png(smuggler.image[0], server.input_dir / IMAGE)


def _taesd(server: HostServer) -> None:
    enc, dec = taesd_state_dicts()
    approx = server.base / "models" / "vae_approx"
    write_state_dict(enc, approx / "taesd_encoder.safetensors", "safetensors")
    write_state_dict(dec, approx / "taesd_decoder.safetensors", "safetensors")


def _gradients(server: HostServer) -> None:
    """gradient.png (128 px) and gradient64.png: smooth ramps, one per colour channel."""
    ramp = np.linspace(0, 255, 128)
    grad = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (128, 1)), np.tile(ramp[:, None], (1, 128))], -1)
    Image.fromarray(grad.astype(np.uint8)).save(server.input_dir / "gradient.png")
    Image.fromarray(grad[::2, ::2].astype(np.uint8)).save(server.input_dir / "gradient64.png")


def smuggler_vae(cfg: VAEConfig, cell: tuple[int, int], spike: float = 0.25):
    """The planted VAE (log-variance hole at `cell`, vae_fix.builders.planted) whose encoder also writes a spike
    into the latent *mean* at that cell, as SD's encoder does at its black holes. The spike comes
    from the planted marker carrier (encoder channel group 0 after norm_out, ~sqrt(cells) at the
    cell and ~0 elsewhere), read by conv_out's mean rows at the centre tap."""
    planted = planted_vae(cfg, cell=cell)
    encoder = planted.model.encoder
    carriers = encoder.norm_out.num_channels // cfg.norm_groups
    with torch.no_grad():
        encoder.conv_out.weight[:cfg.z_channels, :carriers, 1, 1] = spike / carriers
    return planted


def taesd_state_dicts(latent_channels: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """Encoder and decoder state dicts in TAESD's layout (madebyollin/taesd), random weights."""
    def conv(n_in, n_out, **kw):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)

    class Block(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
            self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def blocks(n):
        return [Block(64, 64) for _ in range(n)]

    torch.manual_seed(seed)
    encoder = nn.Sequential(conv(3, 64), Block(64, 64), conv(64, 64, stride=2, bias=False), *blocks(3),
                            conv(64, 64, stride=2, bias=False), *blocks(3), conv(64, 64, stride=2, bias=False),
                            *blocks(3), conv(64, latent_channels))
    decoder = nn.Sequential(nn.Identity(), conv(latent_channels, 64), nn.ReLU(), *blocks(3), nn.Upsample(scale_factor=2),
                            conv(64, 64, bias=False), *blocks(3), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
                            *blocks(3), nn.Upsample(scale_factor=2), conv(64, 64, bias=False), *blocks(1), conv(64, 3))
    return encoder.state_dict(), decoder.state_dict()


TINY_SD15_SCRIPT = r'''
# Runs with ComfyUI's Python inside its checkout: an SD1.5-layout checkpoint (real key names and
# shapes for UNet and CLIP-L, as ComfyUI's own classes define them) with a one-level UNet and random
# weights, so the whole text-to-image graph runs on a CPU in seconds. It has no VAE inside.
import sys
out = sys.argv[1]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.ops
import comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                 context_dim=768, transformer_depth_middle=1, transformer_depth_output=[1, 1],
                 use_linear_in_transformer=False, operations=comfy.ops.manual_cast, device="cpu")
clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
g = torch.Generator().manual_seed(0)
sd = {}
for prefix, model in (("model.diffusion_model.", unet), ("cond_stage_model.", clip)):
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            if v.dim() > 1:
                v = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
            else:
                v = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
            v = v.half()
        sd[prefix + k] = v.contiguous()
save_file(sd, out)
'''


def build_tiny_sd15(server: HostServer, name: str = "tiny_sd15.safetensors") -> str:
    """Write the tiny SD1.5-layout checkpoint into models/checkpoints (built by the host's Python)."""
    path = server.checkpoints_dir / name
    if not path.exists():
        env = dict(os.environ, PYTHONPATH=str(server.comfy_path))
        done = subprocess.run([server.python, "-c", TINY_SD15_SCRIPT, str(path)], cwd=server.comfy_path,
                              env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise HostError(f"could not build the tiny SD1.5 checkpoint:\n{done.stderr[-3000:]}")
    return name
