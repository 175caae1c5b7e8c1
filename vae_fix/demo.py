"""The pack's demo: the VAEs trained here (`vae_fix/models/*.safetensors`), each given the Health
Check on the built-in probes, measured on probe photos it never saw in training, and (when two or
more are shipped) the first two compared side by side on the probe photos. No downloads, no
planted weights: what the demo shows is what training produced.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .compare import CompareResult, compare_vaes
from .errors import InputError
from .inspect import inspect_vae
from .loader import load_vae
from .probes import PHOTOS, photo
from .progress import ProgressFn, Steps
from .repair import side_by_side
from .result import Result
from .train_data import read_uint8
from .train_eval import held_out_metrics, reconstruct

MODELS = Path(__file__).with_name("models")
UNSEEN_PHOTOS = ("chelsea", "coffee")  # probe photos every shipped model was trained without (held out)
SIZES = (128, 256)


FIRST = ("sd_recipe_small", "floor_recipe_small")  # the SD recipe, then the fix it is compared with


def shipped_models() -> list[Path]:
    order = {name: i for i, name in enumerate(FIRST)}
    return sorted(MODELS.glob("*.safetensors"), key=lambda p: (order.get(p.stem, len(order)), p.name))


@dataclass
class DemoResult(Result):
    json_name = "demo"
    models: list                        # per model: name, file, parameters, training, verdict, unseen-photo numbers
    inspections: dict                   # name → InspectResult (the Health Check on the probes)
    reconstructions: dict               # name → [3, H, W]: each unseen photo at 256 px, then its reconstruction
    comparison: Optional[CompareResult] = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"models": self.models, "comparison": None if self.comparison is None else self.comparison.to_json(),
                "seconds": self.seconds}

    def summary(self) -> str:
        lines = []
        for m in self.models:
            psnr = ", ".join(f"{s} px {m['unseen']['psnr'][str(s)]['mean']:.2f} dB" for s in SIZES)
            lines += [f"{m['name']} ({m['parameters'] / 1e6:.1f} M parameters, {m['training']}):",
                      f"  health check: {m['verdict']}",
                      f"  photos it never saw ({', '.join(UNSEEN_PHOTOS)}): {psnr}; log-variance median "
                      f"{m['unseen']['logvar_median']:.2f}, lowest {m['unseen']['logvar_min']:.2f}"]
        if self.comparison is not None:
            lines += ["compared on the probe photos:", *("  " + s for s in self.comparison.summary().splitlines())]
        return "\n".join(lines)

    def pictures(self) -> dict:
        pics = {f"{name}_verdict": r.verdict_picture() for name, r in self.inspections.items()}
        pics.update({f"{name}_reconstructions": p for name, p in self.reconstructions.items()})
        if self.comparison is not None:
            pics["compare"] = self.comparison.rows
        return pics


def run_demo(paths: Sequence[Path] = (), progress: Optional[ProgressFn] = None) -> DemoResult:
    """The demo on the VAE files `paths` (default: the shipped ones), loaded strictly."""
    started, paths = time.monotonic(), [Path(p) for p in paths] or shipped_models()
    if not paths:
        raise InputError("models", f"no trained VAE in {MODELS}", "the pack's shipped models (reinstall the pack)")
    steps = Steps(progress, 2 * len(paths) + 1)
    unseen = [read_uint8(PHOTOS / f"{n}.jpg") for n in UNSEEN_PHOTOS]
    models, inspections, recons, codecs = [], {}, {}, []
    for path in paths:
        vae, name = load_vae(path), path.stem
        codecs.append(vae.codec(name))
        inspections[name] = inspect_vae(codecs[-1], None, progress=steps.sub(1))
        steps.step()
        numbers = held_out_metrics(vae.model, unseen, list(UNSEEN_PHOTOS), sizes=SIZES)
        recons[name] = _reconstructions(vae.model)
        models.append({"name": name, "file": str(path), "megabytes": round(path.stat().st_size / 1e6, 2),
                       "parameters": sum(p.numel() for p in vae.model.parameters()),
                       "training": _training(vae.file.metadata), "verdict": inspections[name].verdict.line(),
                       "status": inspections[name].verdict.status, "unseen": numbers})
        steps.step()
    comparison = None
    if len(codecs) >= 2:
        comparison = compare_vaes(codecs[0], codecs[1], [photo(n, 256) for n in UNSEEN_PHOTOS],
                                  paths=[f"probe:{n}@256" for n in UNSEEN_PHOTOS], progress=steps.sub(1))
    steps.step()
    return DemoResult(models, inspections, recons, comparison, time.monotonic() - started)


def _reconstructions(model) -> torch.Tensor:
    """`[3, H, W]`: every unseen photo at 256 px beside its reconstruction."""
    tiles = []
    for name in UNSEEN_PHOTOS:
        x = photo(name, 256)
        tiles += [x[0], reconstruct(model, x)[0][0]]
    return side_by_side(tiles)


def _training(metadata: dict) -> str:
    """How the file was trained, from the metadata `python -m vae_fix train` writes."""
    try:
        s = json.loads(metadata["vae_fix.train_settings"])
    except (KeyError, ValueError):
        return "training not recorded"
    fixes = [f"log-variance floor {s['logvar_floor']:g} (penalty {s['logvar_penalty']:g})" if s.get("logvar_penalty") else "",
             f"latent noise {s['latent_noise']:g}" if s.get("latent_noise") else "",
             "latent rolls" if s.get("latent_roll") else "",
             "pixel-norm decoder" if s.get("decoder_norm") == "pixel" else "",
             f"tanh-bounded latents (+-{s['latent_bound']:g})" if s.get("latent_bound") else ""]
    recipe = ", ".join(f for f in fixes if f) or "SD recipe"
    return f"{recipe}, KL weight {s['kl_weight']:g}, {metadata.get('vae_fix.train_step', '?')} steps"
