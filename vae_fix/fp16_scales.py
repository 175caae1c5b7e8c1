"""Exact, function-preserving weight rescaling of a VAE (the maths of the fp16 fix).

Every residual block and attention block reads its input through a scale-invariant norm (GroupNorm
up to its eps, 1e-6; Wan's RMS norm, `F.normalize`). So the residual stream between two layers that
start it can be multiplied by any factor s if everything that writes into that stretch is: the
layer that starts it (`conv_in`, a block's `nin_shortcut`, a resampling conv: weight by s / s_old,
bias by s), and each block's last conv and attention output projection that add into it (weight and
bias by s). A block's first conv feeds only a norm, so it takes its own factor. What leaves the
stream through a norm (`norm_out` then `conv_out`, Wan's `head`) is unchanged, so moments and pixels
are the same in exact arithmetic.

A plan lists every linear layer that must change as a `Link` between two scales (keys), and for each
key the modules whose outputs carry it (where the fix measures). Keys: (side, index) for the k-th
stretch of a side's stream, ("inner", name) for a conv feeding only a norm. Plans are found from the
model's structure by attribute names (duck typing, no host import): the CompVis layout (this
engine's model; ComfyUI's KL and HunyuanVideo 1.0 models) and Wan 2.1's and 2.2's (`PLANS`). Where a
parameter-free shortcut (Wan 2.2's channel-averaging stages) adds a block's input to its output, the
whole block keeps its input's scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

Key = tuple


@dataclass(frozen=True)
class Link:
    """A linear layer whose input is at scale `into` (None: it reads through a norm or the VAE's own
    input, whose scale never changes) and whose output is at scale `out`."""
    module: nn.Module
    into: Optional[Key]
    out: Key


@dataclass
class ScalePlan:
    links: list = field(default_factory=list)      # Link, in call order
    measured: dict = field(default_factory=dict)   # key -> modules whose outputs are at that key's scale
    structure: str = ""                            # "CompVis" | "Wan"

    @property
    def stream_keys(self) -> list:
        return [k for k in self.measured if k[0] != "inner"]


class _Builder:
    """Walks one side's residual stream in call order and records its links."""

    def __init__(self, plan: ScalePlan, side: str, names: dict):
        self.plan, self.side, self.names, self.key = plan, side, names, None
        self.pinned = 0  # inside a block whose parameter-free shortcut ties its output to its input's scale

    def start(self, module: nn.Module, *outputs: nn.Module) -> None:
        """`module` reads the stream at the current scale and starts a new stretch (keeps the current
        one where the stream's scale is pinned)."""
        if self.pinned:
            self.keep(module)
            self.plan.measured[self.key] += list(outputs)
            return
        new = (self.side, 0 if self.key is None else self.key[1] + 1)
        self.plan.links.append(Link(module, self.key, new))
        self.plan.measured[new] = [module, *outputs]
        self.key = new

    def keep(self, module: nn.Module) -> None:
        """`module` reads and writes the current stretch (bias by s, weight unchanged)."""
        self.plan.links.append(Link(module, self.key, self.key))
        self.plan.measured[self.key].append(module)

    def write(self, module: nn.Module, block: nn.Module) -> None:
        """`module` reads through a norm and adds into the current stretch (`block`'s output)."""
        self.plan.links.append(Link(module, None, self.key))
        self.plan.measured[self.key] += [module, block]

    def inner(self, module: nn.Module) -> None:
        """`module` reads through a norm and feeds only a norm: a factor of its own."""
        key = ("inner", self.names[module])
        self.plan.links.append(Link(module, None, key))
        self.plan.measured[key] = [module]


# ---------------------------------------------------------------- CompVis layout

def _compvis_layers(net: nn.Module, side: str) -> list:
    mid = [m for m in (getattr(net.mid, n, None) for n in ("block_1", "attn_1", "block_2")) if m is not None]
    levels = net.down if side == "encoder" else list(reversed(net.up))
    layers = [] if side == "encoder" else mid
    for level in levels:
        attns = list(getattr(level, "attn", []))
        for i, block in enumerate(level.block):
            layers += [block] + ([attns[i]] if i < len(attns) else [])
        layers += [m for m in (getattr(level, n, None) for n in ("downsample", "upsample")) if m is not None]
    return layers + (mid if side == "encoder" else [])


def _compvis_side(plan: ScalePlan, net: nn.Module, side: str, names: dict) -> None:
    walk = _Builder(plan, side, names)
    walk.start(net.conv_in)
    for layer in _compvis_layers(net, side):
        if hasattr(layer, "conv1") and hasattr(layer, "conv2"):  # ResnetBlock
            walk.inner(layer.conv1)
            shortcut = getattr(layer, "nin_shortcut", None) or getattr(layer, "conv_shortcut", None)
            if shortcut is not None:
                walk.start(shortcut)
            walk.write(layer.conv2, layer)
        elif hasattr(layer, "proj_out"):  # AttnBlock
            walk.write(layer.proj_out, layer)
        else:  # Downsample / Upsample: a conv on the (padded / interpolated) stream
            walk.start(layer.conv, layer)


def compvis_plan(model: nn.Module) -> ScalePlan:
    plan, names = ScalePlan(structure="CompVis"), {m: n for n, m in model.named_modules()}
    for side in ("encoder", "decoder"):
        if getattr(model, side, None) is not None:
            _compvis_side(plan, getattr(model, side), side, names)
    return plan


# ---------------------------------------------------------------- Wan 2.1 / 2.2 layout

def _wan_side(plan: ScalePlan, net: nn.Module, side: str, names: dict) -> None:
    walk = _Builder(plan, side, names)
    walk.start(net.conv1)
    _wan_layers(walk, list(net.downsamples) + list(net.middle) if side == "encoder" else
                list(net.middle) + list(net.upsamples))


def _wan_layers(walk: _Builder, layers) -> None:
    for layer in layers:
        if hasattr(layer, "avg_shortcut"):  # Wan 2.2's stage: its main path + a parameter-free shortcut of its input
            pinned = layer.avg_shortcut is not None
            walk.pinned += pinned
            _wan_layers(walk, layer.downsamples if hasattr(layer, "downsamples") else layer.upsamples)
            walk.pinned -= pinned
            walk.plan.measured[walk.key].append(layer)
        elif hasattr(layer, "residual"):  # ResidualBlock: norm, SiLU, conv, norm, SiLU, dropout, conv (+ shortcut)
            convs = [m for m in layer.residual if isinstance(m, (nn.Conv2d, nn.Conv3d))]
            walk.inner(convs[0])
            if isinstance(layer.shortcut, (nn.Conv2d, nn.Conv3d)):
                walk.start(layer.shortcut)
            walk.write(convs[-1], layer)
        elif hasattr(layer, "proj"):  # AttentionBlock
            walk.write(layer.proj, layer)
        elif hasattr(layer, "resample"):  # Resample: upsample3d runs time_conv first, downsample3d after
            time_conv, conv = getattr(layer, "time_conv", None), layer.resample[-1]
            if time_conv is not None and layer.mode.startswith("upsample"):
                walk.keep(time_conv)
            walk.start(conv, layer)
            if time_conv is not None and layer.mode.startswith("downsample"):
                walk.keep(time_conv)  # the first chunk skips it: its output must be at the new scale too


def wan_plan(model: nn.Module) -> ScalePlan:
    plan, names = ScalePlan(structure="Wan"), {m: n for n, m in model.named_modules()}
    for side in ("encoder", "decoder"):
        _wan_side(plan, getattr(model, side), side, names)
    return plan


PLANS = {"CompVis": compvis_plan, "Wan": wan_plan}  # structure -> plan (the host adapter names each family's)


# ---------------------------------------------------------------- applying factors

@torch.no_grad()
def _scale(module: nn.Module, weight: float, bias: float) -> None:
    if not hasattr(module, "weight"):  # a wrapper that pads, then runs its `conv` (HunyuanVideo's VideoConv3d)
        module = module.conv
    if weight != 1.0:
        module.weight.mul_(weight)
    if getattr(module, "bias", None) is not None and bias != 1.0:
        module.bias.mul_(bias)


def apply_scales(plan: ScalePlan, factors: dict) -> None:
    """Multiply every key's scale by `factors[key]` (missing: 1): each link's weight by
    out / into and its bias by out. In place; the function is unchanged up to the norms' eps."""
    for link in plan.links:
        out = float(factors.get(link.out, 1.0))
        into = 1.0 if link.into is None else float(factors.get(link.into, 1.0))
        _scale(link.module, out / into, out)
