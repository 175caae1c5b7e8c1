"""fp16 fix: rescale a KL VAE's weights so that no activation can overflow half precision, with
its fp32 function unchanged (`fp16_scales`), then prove it. One call for the CLI (and a node):
`fp16_fix(model, images, ...) -> Fp16FixResult`.

1. Run the VAE in fp32 on the images (the built-in probes by default) and record the largest |value|
   every conv and block outputs (forward hooks; encode, then decode of the posterior mean).
2. Per stream segment, the factor that brings its largest value to `bound` (default fp16's largest,
   65504, over 16: headroom for images the probes did not cover); per `conv1` the same. Nothing is
   scaled up. Tensors no rescaling reaches (the norms' inputs to `conv_out`, `conv_out` itself,
   the quant convs) are checked against the bound and named when over it.
3. Prove on the images and on held-out ones: the fixed VAE in fp32 against the original (latent means,
   decoded pixels), and in fp16 against the original fp32 (finite?, PSNR, mean difference).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import viz
from .errors import InputError
from .fp16_scales import apply_scales, inner_convs, segments
from .model import AttnBlock, AutoencoderKL, Downsample, ResnetBlock, Upsample
from .progress import ProgressFn, Steps
from .repair import psnr, to_unit
from .result import Picture, Result

FP16_MAX = 65504.0
DEFAULT_HEADROOM = 16.0
MIN_PSNR = 40.0          # dB of fp16 against fp32 decoded pixels: below it the fix is not written
WATCHED = (nn.Conv2d, ResnetBlock, AttnBlock, Downsample, Upsample, nn.GroupNorm)


@torch.no_grad()
def record_peaks(model: AutoencoderKL, images: list[torch.Tensor], steps: Optional[Steps] = None) -> dict[str, float]:
    """{module name: largest |output|} over `images` (`[1, 3, H, W]` 0..1), encode then decode."""
    peaks: dict[str, float] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, WATCHED)}

    def hook(module, _inputs, output):  # measured at once: the next op may add into it in place
        v = float(output.detach().abs().amax()) if torch.isfinite(output).all() else math.inf
        peaks[names[module]] = max(peaks.get(names[module], 0.0), v)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        for x in images:
            moments = model.moments((x * 2 - 1).to(next(model.parameters())))
            if model.decoder is not None:
                model.decode(moments[:, :model.config.latent_channels])
            if steps:
                steps.step()
    finally:
        for h in handles:
            h.remove()
    return peaks


def plan_scales(model: AutoencoderKL, peaks: dict[str, float], bound: float) -> tuple[dict, dict]:
    """(stream factors per (side, index), conv1 factors per name): each brings its peak to `bound`."""
    names = {m: n for n, m in model.named_modules()}
    stream = {}
    for seg in segments(model):
        peak = max(peaks.get(names[m], 0.0) for m in seg.outputs)
        stream[(seg.side, seg.index)] = min(1.0, bound / peak) if peak > 0 else 1.0
    inner = {}
    for conv in inner_convs(model):
        peak = peaks.get(names[conv], 0.0)
        inner[names[conv]] = min(1.0, bound / peak) if peak > 0 else 1.0
    return stream, inner


@torch.no_grad()
def prove(original: AutoencoderKL, fixed: AutoencoderKL, images: list[torch.Tensor], names: list[str],
          steps: Optional[Steps] = None) -> list[dict]:
    """Per image: the fixed VAE in fp32 against the original, and in fp16 against the original's fp32."""
    half, c = copy.deepcopy(fixed).half(), original.config.latent_channels
    original_half = copy.deepcopy(original).half()
    rows = []
    for x, name in zip(images, names):
        x = x * 2 - 1
        ref = original.moments(x)
        row = {"image": name, "size": list(x.shape[-2:]),
               "fp32_mean_max_rel_diff": _rel(fixed.moments(x)[:, :c], ref[:, :c])}
        m16 = half.moments(x.half()).float()
        row["fp16_moments_finite"] = bool(torch.isfinite(m16).all())
        row["fp16_mean_max_abs_diff"] = float((m16[:, :c] - ref[:, :c]).abs().max()) if row["fp16_moments_finite"] else None
        row["original_fp16_finite"] = bool(torch.isfinite(original_half.moments(x.half())).all())
        if original.decoder is not None:
            z = ref[:, :c]
            pixels = to_unit(original.decode(z))
            row["fp32_pixel_max_abs_diff"] = float((to_unit(fixed.decode(z)) - pixels).abs().max())
            p16, o16 = half.decode(z.half()).float(), original_half.decode(z.half()).float()
            row["fp16_decode_finite"] = bool(torch.isfinite(p16).all())
            row["original_fp16_decode_finite"] = bool(torch.isfinite(o16).all())
            row["fp16_psnr_db"] = psnr(to_unit(p16), pixels) if row["fp16_decode_finite"] else None
            row["original_fp16_psnr_db"] = psnr(to_unit(o16), pixels) if row["original_fp16_decode_finite"] else None
        rows.append(row)
        if steps:
            steps.step()
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@dataclass
class Fp16FixResult(Result):
    """The fixed model (a copy; the input is untouched), the factors, peaks before/after, the proof."""
    json_name = "fp16_fix"

    model: AutoencoderKL
    bound: float
    stream: dict
    inner: dict
    before: dict
    after: dict
    proof: list
    held_out: list
    limits: list = field(default_factory=list)   # layers no rescaling brings under the bound

    @property
    def changed(self) -> bool:
        return any(v != 1.0 for v in list(self.stream.values()) + list(self.inner.values()))

    @property
    def safe(self) -> bool:
        rows = self.proof + self.held_out
        return all(r["fp16_moments_finite"] and r.get("fp16_decode_finite", True) for r in rows) and \
            all((r.get("fp16_psnr_db") or math.inf) >= MIN_PSNR for r in rows) and not self.limits

    def to_json(self) -> dict:
        return {"bound": self.bound, "fp16_max": FP16_MAX, "changed": self.changed, "fp16_safe": self.safe,
                "min_psnr_db": MIN_PSNR, "limits": list(self.limits),
                "stream_scales": [{"side": s, "segment": i, "scale": v} for (s, i), v in self.stream.items()],
                "inner_scales": [{"layer": n, "scale": v} for n, v in self.inner.items() if v != 1.0],
                "peaks": [{"layer": n, "before": self.before[n], "after": self.after.get(n)} for n in self.before],
                "largest_before": max(self.before.values()), "largest_after": max(self.after.values()),
                "proof": list(self.proof), "held_out": list(self.held_out)}

    def summary(self) -> str:
        rows = self.proof + self.held_out
        worst = min((r.get("fp16_psnr_db") or math.inf for r in rows), default=math.inf)
        broken = sum(not (r.get("original_fp16_decode_finite", True) and r["original_fp16_finite"]) for r in rows)
        lines = [f"largest activation {max(self.before.values()):.4g} before, {max(self.after.values()):.4g} after "
                 f"(bound {self.bound:g}, fp16 max {FP16_MAX:g})",
                 f"original in fp16: non-finite on {broken}/{len(rows)} images; fixed in fp16: "
                 f"{'finite on all' if self.safe or worst < math.inf else 'NOT finite'}, worst PSNR against fp32 "
                 f"{'identical' if worst == math.inf else f'{worst:.1f} dB'}",
                 f"fixed in fp32 against the original: pixels within "
                 f"{max((r.get('fp32_pixel_max_abs_diff') or 0.0) for r in rows):.2e}, means within "
                 f"{max(r['fp32_mean_max_rel_diff'] for r in rows):.2e} (relative)"]
        if not self.changed:
            lines.insert(0, "already fp16-safe: no activation over the bound, nothing to rescale")
        lines += [f"limit: {lim}" for lim in self.limits]
        lines.append("fp16-safe: yes" if self.safe else "fp16-safe: NO (the file is not written as a fix)")
        return "\n".join(lines)

    def pictures(self) -> dict[str, Picture]:
        return {"activations": activation_plot(self.before, self.after, self.bound)}


def fp16_fix(model: AutoencoderKL, images: list[torch.Tensor], names: list[str], *, held_out=(), held_out_names=(),
             headroom: float = DEFAULT_HEADROOM, progress: Optional[ProgressFn] = None) -> Fp16FixResult:
    """Rescale a copy of `model` (fp32, CPU or device) so every activation on `images` stays under
    FP16_MAX / headroom, and prove it on `images` and `held_out` (`[1, 3, H, W]` 0..1 each)."""
    if not isinstance(model, AutoencoderKL):
        raise InputError("vae", f"got {type(model).__name__}", "a KL VAE (AutoencoderKL) read by the strict loader")
    if not (isinstance(headroom, (int, float)) and headroom >= 1):
        raise InputError("headroom", f"{headroom!r}", "a number >= 1 (the bound is 65504 / headroom)")
    model = copy.deepcopy(model).float().eval()
    bound = FP16_MAX / headroom
    steps = Steps(progress, 2 * len(images) + len(images) + len(held_out))
    before = record_peaks(model, images, steps)
    stream, inner = plan_scales(model, before, bound)
    fixed = copy.deepcopy(model)
    apply_scales(fixed, stream, inner)
    after = record_peaks(fixed, images, steps)
    limits = [f"{n}: largest |value| {v:.4g} stays over the bound {bound:g} (not reachable by rescaling)"
              for n, v in after.items() if v > bound * 1.01]
    proof = prove(model, fixed, images, names, steps)
    held = prove(model, fixed, list(held_out), list(held_out_names), steps)
    return Fp16FixResult(fixed, bound, stream, inner, before, after, proof, held, limits)


def fixed_file(result: "Fp16FixResult", source):
    """The fixed weights as a `VAEFile` like `source` (same layout, metadata, stored dtype), for
    `loader.save_vae` and the host."""
    from dataclasses import replace

    dtypes = {v.dtype for v in source.state_dict.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in result.model.state_dict().items()}
    meta = {**source.metadata, "vae_fix_fp16_fix": f"weights rescaled, activations under {result.bound:g}"}
    return replace(source, state_dict=sd, metadata=meta, notes=list(source.notes) + ["fp16 fix applied"])


def activation_plot(before: dict, after: dict, bound: float, height: int = 260) -> Picture:
    """`[3, H, W]`: largest |activation| per layer (log scale, in call order), before (grey) and
    after (orange), with fp16's limit (red) and the bound (dashed)."""
    from PIL import Image, ImageDraw

    names = list(before)
    width = max(480, 6 * len(names) + 80)
    im = Image.new("RGB", (width, height + 40), "white")
    draw = ImageDraw.Draw(im)
    lo, hi = -3.0, max(math.log10(FP16_MAX) + 1, math.log10(max(max(before.values()), 1.0)) + 0.5)

    def y_of(v: float) -> int:
        v = min(max(math.log10(max(v, 1e-3)), lo), hi)
        return int(10 + (hi - v) / (hi - lo) * (height - 20))

    for v, colour, label in ((FP16_MAX, (220, 30, 30), "fp16 max"), (bound, (120, 120, 120), "bound")):
        draw.line([(60, y_of(v)), (width - 10, y_of(v))], fill=colour, width=1)
        draw.text((width - 60, y_of(v) - 13), label, fill=colour, font=viz.font(10))
    for e in range(-2, int(hi) + 1, 2):
        draw.text((30, y_of(10.0 ** e) - 6), f"1e{e}", fill=(90, 90, 90), font=viz.font(9))
    for i, n in enumerate(names):
        x = 64 + 6 * i
        draw.line([(x, y_of(1e-3)), (x, y_of(before[n]))], fill=(170, 170, 170), width=2)
        draw.rectangle([x - 1, y_of(after.get(n, 0.0)) - 1, x + 1, y_of(after.get(n, 0.0)) + 1], fill=(240, 120, 0))
    draw.text((64, height + 8), "layers in call order (encoder, then decoder); grey: before, orange: after; log scale",
              fill=(0, 0, 0), font=viz.font(11))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
