"""The fp16 fix's `--finetune`: the layers no exact rescaling brings under the bound.

An exact rescale moves a factor through something that ignores it (a norm's input, a linear op).
A GroupNorm whose affine output is itself too large for fp16 has no such place: its output goes
through SiLU, which is not homogeneous. Two steps, both measured by the proof afterwards:

1. `shrink`: divide the norm's weight and bias by k and multiply the consumer convolution's weights
   by k (q/k/v after an attention norm: exact, they are linear; conv1/conv2/conv_out after SiLU:
   SiLU(v/k) x k = SiLU(v) only where |v| is large, which is where the values that overflow are).
2. `tune`: fine-tune only those layers, with the original's fp32 outputs as the target (the decoded
   pixels of the original's latent means, and the encoder's means and clamped log-variance), plus a
   penalty on every value of the named layers above half the bound; the training loop is
   `finetune.train_loop`, the one that fine-tunes an encoder.

CompVis layout (the KL engine model) only: consumers are found by its names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import World
from .errors import check_rules
from .finetune import train_loop
from .posterior import LOGVAR_MAX, LOGVAR_MIN
from .progress import ProgressFn

CONSUMERS = {"norm1": ("conv1",), "norm2": ("conv2",), "norm_out": ("conv_out",), "norm": ("q", "k", "v")}


@dataclass(frozen=True)
class TuneSettings:
    steps: int = 100
    batch: int = 8
    crop: int = 64
    lr: float = 1e-4
    seed: int = 0

    def check(self) -> "TuneSettings":
        check_rules(self, [("steps", 1 <= self.steps <= 100_000, "1 to 100000"), ("batch", 1 <= self.batch <= 256, "1 to 256"),
                           ("crop", 32 <= self.crop <= 1024, "32 to 1024 pixels"), ("lr", 0 < self.lr < 1, "between 0 and 1")])
        return self


def consumers(model: nn.Module, name: str) -> list[str]:
    """The convolutions that read norm `name`'s output (CompVis names), [] for anything else."""
    modules = dict(model.named_modules())
    parent, _, leaf = name.rpartition(".")
    if not isinstance(modules.get(name), nn.GroupNorm):
        return []
    return [f"{parent}.{c}" for c in CONSUMERS.get(leaf, ()) if f"{parent}.{c}" in modules]


@torch.no_grad()
def shrink(model: nn.Module, peaks: dict[str, float], target: float) -> list[str]:
    """Bring each norm in `peaks` ({name: largest |output|}) to `target` by moving the factor into
    its consumers (see the module docstring); the names of every layer changed."""
    modules, touched = dict(model.named_modules()), []
    for name, peak in peaks.items():
        after = consumers(model, name)
        if not after or peak <= target:
            continue
        k = peak / target
        modules[name].weight.div_(k)
        modules[name].bias.div_(k)
        for c in after:
            modules[c].weight.mul_(k)
        touched += [name, *after]
    return touched


def tune(teacher: nn.Module, student: nn.Module, layers: list[str], watched: list[str], images: list[torch.Tensor],
         s: TuneSettings, bound: float, progress: Optional[ProgressFn] = None,
         log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Train `layers` of `student` (the rest frozen) to give `teacher`'s fp32 outputs on crops of
    `images` (`[3, H, W]` uint8) while every output of the `watched` layers stays under bound / 2.
    The history of the loss terms (`train_loop`)."""
    s = s.check()
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        _normal_tensors(student)
        return _tune(teacher, student, layers, watched, images, s, bound, progress, log)


def _normal_tensors(model: nn.Module) -> None:
    """Replace `model`'s parameters and buffers by normal copies: under ComfyUI they were made in
    inference mode, which autograd refuses to save for backward."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.clone()


def _tune(teacher, student, layers, watched, images, s: TuneSettings, bound: float, progress, log) -> list[dict]:
    modules, teacher = dict(student.named_modules()), teacher.eval().requires_grad_(False)
    trained = [p for n in dict.fromkeys(layers) for p in modules[n].parameters()]
    for p in trained:
        p.requires_grad_(True)
    outputs: list[torch.Tensor] = []
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out: outputs.append(out)) for n in watched]
    encoder_side = any(n.startswith(("encoder.", "quant_conv")) for n in layers)
    say = log or (lambda text: None)
    say(f"fine-tuning {len(dict.fromkeys(layers))} layers ({sum(p.numel() for p in trained):,} parameters) for "
        f"{s.steps} steps, outputs held to the original's")
    try:
        history = train_loop(trained, lambda x: _loss(teacher, student, x, outputs, bound / 2, encoder_side),
                             images, s, World(), progress, say)
    finally:
        for h in hooks:
            h.remove()
    student.eval().requires_grad_(False)
    return history


def _loss(teacher, student, x: torch.Tensor, outputs: list, limit: float, encoder_side: bool) -> dict:
    """Outputs held (pixels in -1..1 of the teacher's means; the means over their variance and the
    clamped log-variance when the encoder is trained) plus the overflow penalty."""
    c = teacher.config.latent_channels
    with torch.no_grad():
        m0 = teacher.moments(x).float()
        mu0 = m0[:, :c].contiguous()
        pixels0 = teacher.decode(mu0).clamp(-1, 1) if teacher.decoder is not None else None
    outputs.clear()
    terms = {"pixels": torch.zeros(()), "means": torch.zeros(()), "logvar": torch.zeros(())}
    if encoder_side:
        m = student.moments(x).float()
        terms["means"] = F.mse_loss(m[:, :c], mu0) / mu0.var().clamp_min(1e-8)
        terms["logvar"] = F.mse_loss(m[:, c:].clamp(LOGVAR_MIN, LOGVAR_MAX), m0[:, c:].clamp(LOGVAR_MIN, LOGVAR_MAX))
    if pixels0 is not None:
        terms["pixels"] = F.mse_loss(student.decode(mu0).clamp(-1, 1), pixels0)
    over = [(o.abs() - limit).relu() for o in outputs]
    terms["overflow"] = sum((v.pow(2).sum() / (v > 0).sum().clamp_min(1)) for v in over) / limit ** 2 if over else torch.zeros(())
    loss = 1e4 * (terms["pixels"] + terms["means"]) + terms["logvar"] + terms["overflow"]
    return {"backward": loss, "loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
