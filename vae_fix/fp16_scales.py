"""Exact, function-preserving weight rescaling of a KL VAE (the maths of the fp16 fix).

Every ResnetBlock and attention block reads its input through a GroupNorm, which ignores the scale
of what it normalises (up to its eps, 1e-6). So the residual stream between two convolutions that
write it can be multiplied by any factor s if everything that writes into that stretch is: the conv
that starts it (`conv_in`, a block's `nin_shortcut`, a down/upsample conv: weight by s_new/s_old,
bias by s_new), each block's `conv2` and each attention `proj_out` that add into it (weight and bias
by s). A block's `conv1` feeds only `norm2`, so it takes its own factor. What leaves the stream
(`norm_out`, then `conv_out`) is unchanged, so moments and pixels are the same in exact arithmetic.

A *segment* is one such stretch: (side, index) → the modules whose outputs scale with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .model import AttnBlock, AutoencoderKL, Downsample, ResnetBlock, Upsample


@dataclass
class Segment:
    side: str                                   # "encoder" | "decoder"
    index: int
    start: nn.Conv2d                            # the conv that writes the stream first in this stretch
    writers: list = field(default_factory=list)  # convs adding into the stream here (conv2, proj_out)
    outputs: list = field(default_factory=list)  # modules whose outputs are in this segment's scale


def _stream_layers(model: AutoencoderKL, side: str) -> list[nn.Module]:
    net = getattr(model, side)
    if side == "encoder":
        return [m for level in net.down for m in level.layers()] + list(net.mid.layers())
    return list(net.mid.layers()) + [m for level in reversed(net.up) for m in level.layers()]


def segments(model: AutoencoderKL) -> list[Segment]:
    """Every stretch of the encoder's and decoder's residual streams, in call order."""
    found = []
    for side in ("encoder", "decoder") if model.decoder is not None else ("encoder",):
        seg = Segment(side, 0, getattr(model, side).conv_in, outputs=[getattr(model, side).conv_in])
        found.append(seg)
        for layer in _stream_layers(model, side):
            if isinstance(layer, ResnetBlock) and layer.nin_shortcut is not None:
                seg = Segment(side, seg.index + 1, layer.nin_shortcut, outputs=[layer.nin_shortcut])
                found.append(seg)
            elif isinstance(layer, (Downsample, Upsample)):
                seg = Segment(side, seg.index + 1, layer.conv, outputs=[layer.conv, layer])
                found.append(seg)
                continue
            if isinstance(layer, ResnetBlock):
                seg.writers.append(layer.conv2)
                seg.outputs += [layer.conv2, layer]
            elif isinstance(layer, AttnBlock):
                seg.writers.append(layer.proj_out)
                seg.outputs.append(layer)
    return found


def inner_convs(model: AutoencoderKL) -> list[nn.Conv2d]:
    """The `conv1` of every block: each feeds only a GroupNorm, so it scales on its own."""
    return [m.conv1 for m in model.modules() if isinstance(m, ResnetBlock)]


@torch.no_grad()
def _scale(conv: nn.Conv2d, weight: float, bias: float) -> None:
    conv.weight.mul_(weight)
    if conv.bias is not None:
        conv.bias.mul_(bias)


@torch.no_grad()
def apply_scales(model: AutoencoderKL, stream: dict, inner: dict) -> None:
    """Multiply stream segment (side, index) by `stream[(side, index)]` and each `conv1` named in
    `inner` by its factor (missing: 1). In place; the function is unchanged up to the norms' eps."""
    previous = {}
    for seg in segments(model):
        s = float(stream.get((seg.side, seg.index), 1.0))
        s_old = 1.0 if seg.index == 0 else previous[seg.side]
        _scale(seg.start, s / s_old, s)
        for conv in seg.writers:
            _scale(conv, s, s)
        previous[seg.side] = s
    names = {m: n for n, m in model.named_modules()}
    for conv in inner_convs(model):
        t = float(inner.get(names[conv], 1.0))
        if t != 1.0:
            _scale(conv, t, t)
