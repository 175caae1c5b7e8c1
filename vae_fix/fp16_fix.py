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

`fix_file` does all of it for a validated VAE file (the CLI and the node): `result.file` is the fixed
file in the source's own layout, or None when there was nothing to fix or the fix is not safe.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import viz
from .builders.planted import demo_image
from .errors import InputError
from .fp16_scales import ScalePlan, apply_scales, compvis_plan
from .fp16_tune import TuneSettings, shrink, tune
from .model import AutoencoderKL
from .probes import SIZES, probe_images
from .progress import ProgressFn, Steps
from .repair import psnr, to_unit
from .result import Picture, Result

FP16_MAX = 65504.0
DEFAULT_HEADROOM = 16.0
BATCH_PIXELS = 4 * 256 * 256  # pixels proven in one batch (`_batches`): ten probes of 128 px, four of 256
MIN_PSNR = 40.0          # dB of fp16 against fp32 decoded pixels: below it the fix is not written
WATCHED = (nn.Conv2d, nn.Conv3d, nn.GroupNorm)  # besides the plan's blocks: every tensor the plot shows


@dataclass(frozen=True)
class Runner:
    """How the fix runs one kind of model (the model itself, or a half-precision copy of it):
    `means(model, x)` for x `[B, 3, H, W]` in -1..1 gives the posterior means; `decode(model, z)`
    the pixels in -1..1 `[B, 3, H, W]`, or None for a model without a decoder; `plan(model)` the
    links to rescale (`fp16_scales`)."""
    family: str
    means: Callable
    decode: Callable
    plan: Callable[[nn.Module], ScalePlan]
    emulate_half: bool = False  # fp16 emulated (see `half_copy`): for devices without fast fp16 (3-D convs on CPUs)

    def half(self, t: torch.Tensor) -> torch.Tensor:
        return t.half().float() if self.emulate_half else t.half()


def _to_half(output):
    if isinstance(output, torch.Tensor):
        return output.half().float() if output.is_floating_point() else output
    return tuple(_to_half(o) for o in output) if isinstance(output, tuple) else output


def half_copy(model: nn.Module, emulate: bool = False) -> nn.Module:
    """A half-precision copy of `model`. Emulated: fp16 weights and every module's output rounded to
    fp16 (overflow gives inf exactly where fp16 would), arithmetic inside a layer in fp32 as a GPU's
    fp16 convolutions accumulate; for CPUs, where fp16 3-D convolutions are hundreds of times slower."""
    twin = copy.deepcopy(model)
    if not emulate:
        return twin.half()
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.half().float())
    for m in twin.modules():
        m.register_forward_hook(lambda _m, _i, output: _to_half(output))
    return twin


def _kl_decode(model: AutoencoderKL, z: torch.Tensor):
    return model.decode(z) if model.decoder is not None else None


KL = Runner("KL autoencoder (SD1.x/2.x, SDXL, SD3, Flux, retrained KL-F8)",
            lambda model, x: model.moments(x)[:, :model.config.latent_channels], _kl_decode, compvis_plan)


@torch.no_grad()
def record_peaks(model: nn.Module, plan: ScalePlan, runner: Runner, images: list[torch.Tensor],
                 steps: Optional[Steps] = None) -> dict[str, float]:
    """{module name: largest |output|} over `images` (`[1, 3, H, W]` 0..1), encode then decode, in
    call order: every conv and norm, and every block whose output is a residual stream."""
    peaks: dict[str, float] = {}
    blocks = {m for modules in plan.measured.values() for m in modules}
    names = {m: n for n, m in model.named_modules() if isinstance(m, WATCHED) or m in blocks}

    def hook(module, _inputs, output):  # measured at once: the next op may add into it in place
        v = float(output.detach().abs().amax()) if torch.isfinite(output).all() else math.inf
        peaks[names[module]] = max(peaks.get(names[module], 0.0), v)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        for x in images:
            runner.decode(model, runner.means(model, (x * 2 - 1).to(next(model.parameters()))))
            if steps:
                steps.step()
    finally:
        for h in handles:
            h.remove()
    return peaks


def plan_scales(model: nn.Module, plan: ScalePlan, peaks: dict[str, float], bound: float) -> dict:
    """{key: factor}: each stretch of a stream and each inner conv brought to `bound` (never up)."""
    names = {m: n for n, m in model.named_modules()}
    factors = {}
    for key, modules in plan.measured.items():
        peak = max(peaks.get(names[m], 0.0) for m in modules)
        factors[key] = min(1.0, bound / peak) if peak > 0 else 1.0
    return factors


@torch.no_grad()
def prove(original: nn.Module, fixed: nn.Module, runner: Runner, images: list[torch.Tensor], names: list[str],
          steps: Optional[Steps] = None, same: bool = False) -> list[dict]:
    """Per image: the fixed VAE in fp32 against the original, and in fp16 against the original's fp32.
    `same`: nothing was rescaled, so `fixed` computes what `original` does and each pass runs once
    (half the fp16 work, the slow part on a CPU, for the common case of a VAE already safe)."""
    original_half = half_copy(original, runner.emulate_half)
    half = original_half if same else half_copy(fixed, runner.emulate_half)
    rows = []
    for x, batch_names in _batches(images, names):
        x = x * 2 - 1
        ref = runner.means(original, x)
        out = {"ref": ref, "mean": ref if same else runner.means(fixed, x),
               "o16_mean": runner.means(original_half, runner.half(x)).float()}
        out["m16"] = out["o16_mean"] if same else runner.means(half, runner.half(x)).float()
        decoded = runner.decode(original, ref)
        if decoded is not None:
            out["pixels"] = to_unit(decoded)
            out["mine"] = out["pixels"] if same else to_unit(runner.decode(fixed, ref))
            out["o16"] = runner.decode(original_half, runner.half(ref)).float()
            out["p16"] = out["o16"] if same else runner.decode(half, runner.half(ref)).float()
        rows += [_row(name, list(x.shape[-2:]), {k: v[i:i + 1] for k, v in out.items()})
                 for i, name in enumerate(batch_names)]
        if steps:
            steps.step(len(batch_names))
    return rows


def _batches(images: list[torch.Tensor], names: list[str]):
    """Runs of same-size images `[1, 3, H, W]` as batches `[B, 3, H, W]` of at most BATCH_PIXELS, with
    their names: a CPU's fp16 convolutions run about 4x quicker per image in a batch of 10 than alone."""
    batch: list = []
    for x, name in zip(images, names):
        if batch and (x.shape != batch[0][0].shape or (len(batch) + 1) * x.shape[-2] * x.shape[-1] > BATCH_PIXELS):
            yield torch.cat([b[0] for b in batch]), [b[1] for b in batch]
            batch = []
        batch.append((x, name))
    if batch:
        yield torch.cat([b[0] for b in batch]), [b[1] for b in batch]


def _row(name: str, size: list, t: dict) -> dict:
    """One image's proof row from its slices of the batch's outputs (`_batches`)."""
    row = {"image": name, "size": size, "fp32_mean_max_rel_diff": _rel(t["mean"], t["ref"])}
    row["fp16_moments_finite"] = bool(torch.isfinite(t["m16"]).all())
    row["fp16_mean_max_abs_diff"] = float((t["m16"] - t["ref"]).abs().max()) if row["fp16_moments_finite"] else None
    row["original_fp16_finite"] = bool(torch.isfinite(t["o16_mean"]).all())
    if "pixels" in t:
        pixels, p16, o16 = t["pixels"], t["p16"], t["o16"]
        row["fp32_pixel_max_abs_diff"] = float((t["mine"] - pixels).abs().max())
        row["fp16_decode_finite"] = bool(torch.isfinite(p16).all())
        row["original_fp16_decode_finite"] = bool(torch.isfinite(o16).all())
        row["fp16_psnr_db"] = psnr(to_unit(p16), pixels) if row["fp16_decode_finite"] else None
        row["original_fp16_psnr_db"] = psnr(to_unit(o16), pixels) if row["original_fp16_decode_finite"] else None
    return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@dataclass
class Fp16FixResult(Result):
    """The fixed model (a copy; the input is untouched), the factors, peaks before/after, the proof."""
    json_name = "fp16_fix"

    model: nn.Module
    family: str
    bound: float
    factors: dict                                # key (`fp16_scales`) -> factor
    before: dict
    after: dict
    proof: list
    held_out: list
    limits: list = field(default_factory=list)   # layers no rescaling brings under the bound
    emulated: bool = False                       # fp16 proven by emulation (`half_copy`)
    file: Optional[object] = None                # the fixed VAEFile (`fix_file`): safe and changed, else None
    tuned: Optional[dict] = None                 # what `--finetune` did (layers, settings, history), else None

    @property
    def changed(self) -> bool:
        return any(v != 1.0 for v in self.factors.values())

    @property
    def safe(self) -> bool:
        rows = self.proof + self.held_out
        return all(r["fp16_moments_finite"] and r.get("fp16_decode_finite", True) for r in rows) and \
            all((r.get("fp16_psnr_db") or math.inf) >= MIN_PSNR for r in rows) and not self.limits

    def to_json(self) -> dict:
        return {"family": self.family, "fp16": "emulated" if self.emulated else "native", "bound": self.bound, "fp16_max": FP16_MAX, "changed": self.changed,
                "fp16_safe": self.safe, "min_psnr_db": MIN_PSNR, "limits": list(self.limits),
                "stream_scales": [{"side": k[0], "segment": k[1], "scale": v} for k, v in self.factors.items()
                                  if k[0] != "inner"],
                "inner_scales": [{"layer": k[1], "scale": v} for k, v in self.factors.items() if k[0] == "inner" and v != 1.0],
                "peaks": [{"layer": n, "before": self.before[n], "after": self.after.get(n)} for n in self.before],
                "largest_before": max(self.before.values()), "largest_after": max(self.after.values()),
                "finetuned": self.tuned, "proof": list(self.proof), "held_out": list(self.held_out)}

    def summary(self) -> str:
        rows = self.proof + self.held_out
        scores = [r["fp16_psnr_db"] for r in rows if r.get("fp16_psnr_db") is not None]
        worst = "n/a" if not scores else "identical" if min(scores) == math.inf else f"{min(scores):.1f} dB"
        finite = sum(r["fp16_moments_finite"] and r.get("fp16_decode_finite", True) for r in rows)
        broken = sum(not (r.get("original_fp16_decode_finite", True) and r["original_fp16_finite"]) for r in rows)
        lines = [f"{self.family}; fp16 {'emulated (fp16 weights and layer outputs, fp32 inside each layer)' if self.emulated else 'native'}",
                 f"largest activation {max(self.before.values()):.4g} before, {max(self.after.values()):.4g} after "
                 f"(bound {self.bound:g}, fp16 max {FP16_MAX:g})",
                 f"original in fp16: non-finite on {broken}/{len(rows)} images; fixed in fp16: "
                 f"finite on {finite}/{len(rows)}, worst PSNR against fp32 {worst}",
                 f"fixed in fp32 against the original: pixels within "
                 f"{max((r.get('fp32_pixel_max_abs_diff') or 0.0) for r in rows):.2e}, means within "
                 f"{max(r['fp32_mean_max_rel_diff'] for r in rows):.2e} (relative)"]
        if not self.changed:
            lines.insert(0, "already fp16-safe: no activation over the bound, nothing to rescale")
        if self.tuned:
            lines.append(f"fine-tuned {len(self.tuned['layers'])} layers ({', '.join(self.tuned['layers'])}) for "
                         f"{self.tuned['settings']['steps']} steps in {self.tuned['seconds']:.0f} s: not exact, the "
                         f"fp32 differences above are what it changed")
        lines += [f"limit: {lim}" for lim in self.limits]
        lines.append("fp16-safe: yes" if self.safe else "fp16-safe: NO (the file is not written as a fix)")
        return "\n".join(lines)

    def pictures(self) -> dict[str, Picture]:
        return {"activations": activation_plot(self.before, self.after, self.bound)}

    def require_safe(self, name: str = "vae"):
        """The fixed VAEFile (the source itself when nothing needed fixing); InputError naming `name` and
        the layers when no exact rescaling makes it safe in fp16."""
        if not self.safe:
            raise InputError(name, "no exact rescaling makes it safe in fp16: " + "; ".join(self.limits or [self.summary()]),
                             "a VAE whose every activation can be rescaled (the report lists the layers)")
        return self.file


def fp16_fix(model: nn.Module, images: list[torch.Tensor], names: list[str], *, held_out=(), held_out_names=(),
             headroom: float = DEFAULT_HEADROOM, progress: Optional[ProgressFn] = None, runner: Runner = KL,
             finetune: Optional[TuneSettings] = None, log: Optional[Callable[[str], None]] = None) -> Fp16FixResult:
    """Rescale a copy of `model` (fp32, CPU or device) so every activation on `images` stays under
    FP16_MAX / headroom, and prove it on `images` and `held_out` (`[1, 3, H, W]` 0..1 each).
    `runner`: how to run it (default: this engine's KL model). `finetune`: where layers stay over
    the bound, fine-tune them with the outputs held to the original's (`fp16_tune`; KL only)."""
    if runner is KL and not isinstance(model, AutoencoderKL):
        raise InputError("vae", f"got {type(model).__name__}", "a KL VAE (AutoencoderKL) read by the strict loader")
    if not (isinstance(headroom, (int, float)) and headroom >= 1):
        raise InputError("headroom", f"{headroom!r}", "a number >= 1 (the bound is 65504 / headroom)")
    if finetune is not None and runner is not KL:
        raise InputError("finetune", f"asked for a {runner.family}", "a KL VAE (the fine-tuning knows CompVis layers)")
    model = copy.deepcopy(model).float().eval()
    bound = FP16_MAX / headroom
    steps = Steps(progress, 2 * len(images) + len(images) + len(held_out))
    before = record_peaks(model, runner.plan(model), runner, images, steps)
    fixed, factors, after = _rescaled(model, runner, images, before, bound, steps)
    tuned = None
    if finetune is not None and any(v > bound * 1.01 for v in after.values()):
        fixed, factors, after, tuned = _tuned(model, fixed, factors, after, images, bound, finetune, steps, log)
    limits = [f"{n}: largest |value| {v:.4g} stays over the bound {bound:g} (not reachable by rescaling"
              f"{' or fine-tuning' if tuned else ''})" for n, v in after.items() if v > bound * 1.01]
    same = tuned is None and all(v == 1.0 for v in factors.values())
    proof = prove(model, fixed, runner, images, names, steps, same)
    held = prove(model, fixed, runner, list(held_out), list(held_out_names), steps, same)
    return Fp16FixResult(fixed, runner.family, bound, factors, before, after, proof, held, limits, runner.emulate_half,
                         tuned=tuned)


def _rescaled(model: nn.Module, runner: Runner, images, peaks: dict, bound: float, steps: Steps, factors=None):
    """(a rescaled copy, the factors, its peaks): exact, every stretch and inner conv under `bound`;
    `factors` already applied to `model` are folded into the ones returned."""
    fixed = copy.deepcopy(model)
    more = plan_scales(model, runner.plan(model), peaks, bound)
    apply_scales(runner.plan(fixed), more)
    factors = {k: v * (factors or {}).get(k, 1.0) for k, v in more.items()}
    return fixed, factors, record_peaks(fixed, runner.plan(fixed), runner, images, steps)


def _tuned(original, fixed, factors, after, images, bound: float, s: TuneSettings, steps: Steps, log) -> tuple:
    """`fp16_tune` on the layers over the bound, then the exact rescale again; what was done, for the report."""
    started, over = time.monotonic(), {n: v for n, v in after.items() if v > bound * 1.01}
    modules = dict(fixed.named_modules())
    layers = shrink(fixed, over, bound / 2) + [n for n in over if any(True for _ in modules[n].parameters())]
    steps.add(s.steps + 2 * len(images))
    history = tune(original, fixed, layers, list(over), [(x[0] * 255).round().to(torch.uint8) for x in images],
                   s, bound, steps.sub(s.steps), log)
    peaks = record_peaks(fixed, KL.plan(fixed), KL, images, steps)
    fixed, factors, after = _rescaled(fixed, KL, images, peaks, bound, steps, factors)
    return fixed, factors, after, {"layers": list(dict.fromkeys(layers)), "over_before": over, "settings": asdict(s),
                                   "history": history, "seconds": round(time.monotonic() - started, 1)}


def fix_file(source, probes=SIZES, checks=(512, 1024), extra=(), *, headroom: float = DEFAULT_HEADROOM,
             padding: str = "zeros", progress: Optional[ProgressFn] = None, finetune: Optional[TuneSettings] = None,
             log: Optional[Callable[[str], None]] = None) -> Fp16FixResult:
    """The fp16 fix of a validated KL `VAEFile`, measured on the built-in probes at `probes` sizes plus
    `extra` (image `[1, 3, H, W]`, name) pairs, proven on demo pictures at `checks` sizes it never saw."""
    from .loader import build_model

    images, names = probe_images(probes)
    held = [demo_image(s, s, None) for s in checks]
    result = fp16_fix(build_model(source, padding=padding).model, images + [x for x, _ in extra],
                      names + [n for _, n in extra], held_out=held, held_out_names=[f"demo@{s}" for s in checks],
                      headroom=headroom, progress=progress, finetune=finetune, log=log)
    result.file = (_fixed_file(result, source) if result.changed else source) if result.safe else None
    return result


def _fixed_file(result: "Fp16FixResult", source):
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
